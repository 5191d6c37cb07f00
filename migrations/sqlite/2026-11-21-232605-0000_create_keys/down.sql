DROP INDEX key_secrets_by_key;
DROP TABLE key_secrets;
DROP TRIGGER keys_tier_is_immutable;
DROP TABLE keys;
