ALTER TABLE key_budgets DROP COLUMN rollup_hour;
