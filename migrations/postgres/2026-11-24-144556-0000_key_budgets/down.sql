DROP TABLE key_budgets;
