-- Events are stored in time order: the table's key is (ts, id), so a time
-- range (listing, pruning, the edges of a usage window) is one contiguous run
-- of the table and needs no index of its own. The id stays unique and grows
-- with every event recorded; the next one is kept in `sequences`, since the
-- table is no longer ordered by id.
CREATE TABLE events_by_time (
    id BIGINT NOT NULL,
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
    thinking_level TEXT,
    PRIMARY KEY (ts, id)
) WITHOUT ROWID;

INSERT INTO events_by_time (id, ts, key_row_id, model_id, upstream_model_id, request_id,
    prompt_tokens, completion_tokens, cache_read_tokens, cache_creation_tokens,
    reasoning_tokens, status, latency_ms, error, usage_unknown, thinking_level)
SELECT id, ts, key_row_id, model_id, upstream_model_id, request_id,
    prompt_tokens, completion_tokens, cache_read_tokens, cache_creation_tokens,
    reasoning_tokens, status, latency_ms, error, usage_unknown, thinking_level
FROM events ORDER BY ts, id;

-- Counters that must never go back, even when every row they numbered has
-- been deleted. `next` is the value the next row gets.
CREATE TABLE sequences (
    name TEXT PRIMARY KEY NOT NULL,
    next BIGINT NOT NULL CHECK (next >= 1)
) WITHOUT ROWID;

INSERT INTO sequences (name, next) SELECT 'events', coalesce(max(id), 0) + 1 FROM events;

DROP INDEX events_by_ts;
DROP INDEX events_by_key_ts;
DROP TABLE events;
ALTER TABLE events_by_time RENAME TO events;

CREATE INDEX events_by_key_ts ON events (key_row_id, ts);
