-- API keys. The secret itself is never stored: key_secrets holds the SHA-256
-- of each secret a key has had, so that a rotated secret can keep working for
-- a grace period. Times are Unix milliseconds (UTC).
CREATE TABLE keys (
    -- Compact internal reference, used by key_secrets and events.
    row_id INTEGER PRIMARY KEY NOT NULL,
    -- The public key id: a UUID v7 as 16 bytes.
    id BLOB NOT NULL UNIQUE CHECK (length(id) = 16),
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

-- The tier is fixed at creation.
CREATE TRIGGER keys_tier_is_immutable
BEFORE UPDATE OF tier ON keys
WHEN NEW.tier IS NOT OLD.tier
BEGIN
    SELECT RAISE(ABORT, 'the tier of a key cannot change');
END;

CREATE TABLE key_secrets (
    -- SHA-256 of the secret.
    secret_hash BLOB PRIMARY KEY NOT NULL CHECK (length(secret_hash) = 32),
    key_row_id BIGINT NOT NULL REFERENCES keys (row_id),
    created_at BIGINT NOT NULL,
    -- NULL for the key's current secret; for a rotated-out secret, the end of
    -- its grace period.
    valid_until BIGINT
) WITHOUT ROWID;

CREATE INDEX key_secrets_by_key ON key_secrets (key_row_id);
