DROP TABLE usage_model_hourly;
DROP TABLE usage_key_hourly;
