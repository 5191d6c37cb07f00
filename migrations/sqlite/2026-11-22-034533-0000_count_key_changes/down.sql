DROP TRIGGER key_secrets_delete_counts_as_a_key_change;
DROP TRIGGER key_secrets_update_counts_as_a_key_change;
DROP TRIGGER keys_delete_counts_as_a_key_change;
DROP TRIGGER keys_update_counts_as_a_key_change;
DELETE FROM sequences WHERE name = 'key_changes';
