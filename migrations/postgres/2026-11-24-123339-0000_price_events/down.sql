ALTER TABLE usage_model_hourly DROP COLUMN unpriced_requests;
ALTER TABLE usage_model_hourly DROP COLUMN cost_nanos;
ALTER TABLE usage_key_hourly DROP COLUMN unpriced_requests;
ALTER TABLE usage_key_hourly DROP COLUMN cost_nanos;
ALTER TABLE events DROP COLUMN cost_nanos;
DROP TABLE prices;
