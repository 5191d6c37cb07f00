-- `key_changes` grows with every change to an existing key or secret that
-- could change what resolving a secret returns: any update of a key (but its
-- last_used_at), any update of a secret, any deletion. Adding a key or a
-- secret does not count: it cannot change the answer for a secret that
-- already resolved. A process may keep what it resolved and trust it for as
-- long as it reads the same count, in any connection, from any process.
INSERT INTO sequences (name, next) VALUES ('key_changes', 1);

CREATE TRIGGER keys_update_counts_as_a_key_change
AFTER UPDATE OF row_id, id, display_prefix, tier, label, allowed_models, rate_limit_override,
    created_at, expires_at, revoked_at ON keys
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'key_changes';
END;

CREATE TRIGGER keys_delete_counts_as_a_key_change
AFTER DELETE ON keys
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'key_changes';
END;

CREATE TRIGGER key_secrets_update_counts_as_a_key_change
AFTER UPDATE ON key_secrets
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'key_changes';
END;

CREATE TRIGGER key_secrets_delete_counts_as_a_key_change
AFTER DELETE ON key_secrets
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'key_changes';
END;
