DROP TRIGGER key_budgets_reached_refuses_the_key ON key_budgets;
CREATE TRIGGER key_budgets_reached_counts_as_a_key_change
AFTER UPDATE OF spend_nanos ON key_budgets
FOR EACH ROW
WHEN (NEW.spend_nanos >= NEW.budget_nanos
    AND (OLD.spend_nanos < OLD.budget_nanos OR NEW.period_start <> OLD.period_start))
EXECUTE FUNCTION keytally_count_key_change();
DROP FUNCTION keytally_refuse_over_budget();
DROP FUNCTION keytally_period_end(BIGINT, INTEGER);
ALTER TABLE keys DROP COLUMN over_budget_until;
