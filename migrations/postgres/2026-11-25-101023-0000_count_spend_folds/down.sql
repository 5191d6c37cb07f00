-- The code before keeps a budget's whole spend in `spend_nanos`.
UPDATE key_budgets
SET spend_nanos = keytally_kept_spend(key_row_id, spend_nanos, rollup_hour), rollup_hour = NULL
WHERE rollup_hour IS NOT NULL;
DROP FUNCTION keytally_kept_spend(BIGINT, BIGINT, BIGINT);
DELETE FROM sequences WHERE name = 'spend_folds';
