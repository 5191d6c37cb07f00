-- Raw events partitioned by calendar month (UTC), so that retention drops
-- whole months instead of deleting rows one by one. The store's maintenance
-- keeps a partition for this month and the next (`events_mYYYYMM`); events
-- outside them (a backfill of older logs, a clock far ahead) go to
-- `events_default`, from which they are moved when their month's partition
-- is made, and where retention deletes them row by row.
ALTER TABLE events RENAME TO events_unpartitioned;
ALTER TABLE events_unpartitioned RENAME CONSTRAINT events_pkey TO events_unpartitioned_pkey;
ALTER INDEX events_by_key_ts RENAME TO events_unpartitioned_by_key_ts;

CREATE TABLE events (
    id BIGINT NOT NULL,
    ts BIGINT NOT NULL,
    key_row_id BIGINT,
    model_id BIGINT NOT NULL,
    upstream_model_id BIGINT,
    request_id TEXT,
    prompt_tokens INTEGER NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
    cache_read_tokens INTEGER NOT NULL CHECK (cache_read_tokens >= 0),
    cache_creation_tokens INTEGER NOT NULL CHECK (cache_creation_tokens >= 0),
    reasoning_tokens INTEGER NOT NULL CHECK (reasoning_tokens >= 0),
    status INTEGER NOT NULL,
    latency_ms INTEGER NOT NULL CHECK (latency_ms >= 0),
    error TEXT,
    usage_unknown BOOLEAN NOT NULL DEFAULT false,
    thinking_level TEXT,
    PRIMARY KEY (ts, id)
) PARTITION BY RANGE (ts);

CREATE INDEX events_by_key_ts ON events (key_row_id, ts);

CREATE TABLE events_default PARTITION OF events DEFAULT;

INSERT INTO events SELECT * FROM events_unpartitioned;
DROP TABLE events_unpartitioned;
