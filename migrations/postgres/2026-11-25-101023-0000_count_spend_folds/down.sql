DROP FUNCTION keytally_kept_spend(BIGINT, BIGINT, BIGINT);
DELETE FROM sequences WHERE name = 'spend_folds';
