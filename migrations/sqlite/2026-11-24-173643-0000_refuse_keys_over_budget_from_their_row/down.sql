ALTER TABLE keys DROP COLUMN over_budget_until;
