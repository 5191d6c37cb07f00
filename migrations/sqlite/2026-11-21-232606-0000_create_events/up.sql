-- Model names, stored once; events refer to them by id.
CREATE TABLE models (
    id INTEGER PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200)
);

-- One row per proxied request. Times are Unix milliseconds (UTC). There is no
-- foreign key to keys: events outlive their key, and key_row_id is NULL for
-- unauthenticated requests.
CREATE TABLE events (
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

CREATE INDEX events_by_key_ts ON events (key_row_id, ts);
CREATE INDEX events_by_ts ON events (ts);
