-- keytally's tables on PostgreSQL: the same tables and columns as on SQLite
-- (schema.rs), in one migration, since PostgreSQL support starts here.
-- Times are Unix milliseconds (UTC) in BIGINT columns.

-- API keys. The secret itself is never stored: key_secrets holds the SHA-256
-- of each secret a key has had, so that a rotated secret can keep working for
-- a grace period. An identity column never hands out an id twice, and keys
-- are never deleted (a trigger below), so a row_id names one key forever.
CREATE TABLE keys (
    row_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The public key id: a UUID v7 as 16 bytes.
    id BYTEA NOT NULL UNIQUE CHECK (octet_length(id) = 16),
    -- The first characters of the current secret, to tell keys apart.
    display_prefix TEXT NOT NULL,
    tier TEXT NOT NULL CHECK (tier IN ('admin', 'client')),
    label TEXT NOT NULL,
    -- A JSON array of model names; ["*"] means any model.
    allowed_models TEXT NOT NULL,
    -- NULL means the gateway's global default.
    rate_limit_override BIGINT CHECK (rate_limit_override IS NULL OR rate_limit_override >= 0),
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT,
    last_used_at BIGINT
);

-- keytally's mark, in place of SQLite's application id: a schema whose keys
-- table does not carry it is another application's, and is not touched.
COMMENT ON TABLE keys IS 'keytally';

CREATE TABLE key_secrets (
    -- SHA-256 of the secret.
    secret_hash BYTEA PRIMARY KEY CHECK (octet_length(secret_hash) = 32),
    key_row_id BIGINT NOT NULL REFERENCES keys (row_id),
    created_at BIGINT NOT NULL,
    -- NULL for the key's current secret; for a rotated-out secret, the end of
    -- its grace period.
    valid_until BIGINT
);

CREATE INDEX key_secrets_by_key ON key_secrets (key_row_id);

-- Model names, stored once; events refer to them by id.
CREATE TABLE models (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL UNIQUE CHECK (char_length(name) BETWEEN 1 AND 200)
);

-- One row per proxied request, keyed by (ts, id). There is no foreign key to
-- keys: events outlive their key, and key_row_id is NULL for unauthenticated
-- requests.
CREATE TABLE events (
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
    usage_unknown BOOLEAN NOT NULL DEFAULT false,
    thinking_level TEXT,
    PRIMARY KEY (ts, id)
);

CREATE INDEX events_by_key_ts ON events (key_row_id, ts);

-- Event ids come from a sequence: unique across every process, with no row
-- that concurrent writers wait on (a sequence is not transactional; ids
-- skipped by rolled-back batches are never reused).
CREATE SEQUENCE event_ids AS BIGINT START 1;

-- Counters that must never go back: `key_changes`, moved by the triggers
-- below, which the resolve cache checks.
CREATE TABLE sequences (
    name TEXT PRIMARY KEY,
    next BIGINT NOT NULL CHECK (next >= 1)
);

INSERT INTO sequences (name, next) VALUES ('key_changes', 1);

-- Hourly usage rollups, kept in the same transaction as the events they
-- count. `hour` is Unix time in whole hours (ms / 3,600,000).

-- Per key (key_row_id 0 for unauthenticated requests) and model.
CREATE TABLE usage_key_hourly (
    key_row_id BIGINT NOT NULL,
    hour BIGINT NOT NULL,
    model_id BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cache_creation_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    latency_ms_sum BIGINT NOT NULL,
    latency_ms_max BIGINT NOT NULL,
    PRIMARY KEY (key_row_id, hour, model_id)
);

-- Per model, all keys together.
CREATE TABLE usage_model_hourly (
    hour BIGINT NOT NULL,
    model_id BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cache_creation_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    latency_ms_sum BIGINT NOT NULL,
    latency_ms_max BIGINT NOT NULL,
    PRIMARY KEY (hour, model_id)
);

-- The tier is fixed at creation; keys are never deleted and their row_id
-- never changes (events and rollups refer to it).
CREATE FUNCTION keytally_refuse_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'keys are never deleted: their ids stay in events and rollups; revoke the key instead';
    END IF;
    IF NEW.tier IS DISTINCT FROM OLD.tier THEN
        RAISE EXCEPTION 'the tier of a key cannot change';
    END IF;
    IF NEW.row_id IS DISTINCT FROM OLD.row_id THEN
        RAISE EXCEPTION 'a key''s row_id never changes: events and rollups refer to it';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER keys_keep_their_identity
BEFORE UPDATE OR DELETE ON keys
FOR EACH ROW EXECUTE FUNCTION keytally_refuse_key_change();

-- `key_changes` grows with every change to an existing key or secret that
-- could change what resolving a secret returns: any update of a key (but its
-- last_used_at), any update or deletion of a secret.
CREATE FUNCTION keytally_count_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'key_changes';
    RETURN NULL;
END;
$$;

CREATE TRIGGER keys_update_counts_as_a_key_change
AFTER UPDATE OF id, display_prefix, tier, label, allowed_models, rate_limit_override,
    created_at, expires_at, revoked_at ON keys
FOR EACH ROW EXECUTE FUNCTION keytally_count_key_change();

CREATE TRIGGER key_secrets_change_counts_as_a_key_change
AFTER UPDATE OR DELETE ON key_secrets
FOR EACH ROW EXECUTE FUNCTION keytally_count_key_change();
