ALTER TABLE events RENAME TO events_partitioned;
ALTER INDEX events_by_key_ts RENAME TO events_partitioned_by_key_ts;
ALTER TABLE events_partitioned RENAME CONSTRAINT events_pkey TO events_partitioned_pkey;

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
);

CREATE INDEX events_by_key_ts ON events (key_row_id, ts);

INSERT INTO events SELECT * FROM events_partitioned;
DROP TABLE events_partitioned;
