-- SQLite keeps part of a key's spend in its rollups, from `rollup_hour` on.
-- PostgreSQL keeps the whole spend in `spend_nanos` (the row's lock orders
-- the replicas recording for the key), and the column NULL; it is here so
-- that both backends share one schema.
ALTER TABLE key_budgets ADD COLUMN rollup_hour BIGINT;
