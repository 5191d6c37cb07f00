CREATE TABLE events_by_id (
    id INTEGER PRIMARY KEY NOT NULL,
    ts BIGINT NOT NULL,
    key_row_id BIGINT,
    -- The model as requested, and after aliasing (NULL when the same).
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
    -- A short tag such as rate_limited, never a body.
    error TEXT,
    usage_unknown BOOLEAN NOT NULL DEFAULT 0,
    thinking_level TEXT
);

INSERT INTO events_by_id (id, ts, key_row_id, model_id, upstream_model_id, request_id,
    prompt_tokens, completion_tokens, cache_read_tokens, cache_creation_tokens,
    reasoning_tokens, status, latency_ms, error, usage_unknown, thinking_level)
SELECT id, ts, key_row_id, model_id, upstream_model_id, request_id,
    prompt_tokens, completion_tokens, cache_read_tokens, cache_creation_tokens,
    reasoning_tokens, status, latency_ms, error, usage_unknown, thinking_level
FROM events ORDER BY id;

DROP INDEX events_by_key_ts;
DROP TABLE events;
DROP TABLE sequences;
ALTER TABLE events_by_id RENAME TO events;

CREATE INDEX events_by_key_ts ON events (key_row_id, ts);
CREATE INDEX events_by_ts ON events (ts);
