DROP TABLE budget_reports;
DROP TABLE key_budgets;
DROP FUNCTION keytally_report_budget();
