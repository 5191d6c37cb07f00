-- A key's budget: at most `budget_nanos` of spend (nano-units, as events'
-- cost_nanos) per period, and an optional soft limit that is only reported.
-- A period is a calendar month in UTC (`period_days` NULL), or a fixed
-- number of days from `anchor` (Unix milliseconds; a day is one day from
-- midnight UTC, anchor 0). The spend of the period that began at
-- `period_start` is kept by the recording statement: an event of a later
-- period starts the spend again from its cost, an event of an earlier period
-- (or before `anchor`) leaves it alone. The row's lock orders the replicas
-- recording for one key. Resolving a key reads these columns, never the
-- events. Rows are updated in place on every event: room is left on each
-- page for those updates.
CREATE TABLE key_budgets (
    key_row_id BIGINT PRIMARY KEY REFERENCES keys (row_id),
    budget_nanos BIGINT NOT NULL CHECK (budget_nanos > 0),
    soft_nanos BIGINT CHECK (soft_nanos > 0 AND soft_nanos <= budget_nanos),
    period_days INTEGER CHECK (period_days BETWEEN 1 AND 36500),
    anchor BIGINT NOT NULL CHECK (anchor >= 0),
    period_start BIGINT NOT NULL,
    spend_nanos BIGINT NOT NULL CHECK (spend_nanos >= 0)
) WITH (fillfactor = 70);

-- Setting, changing or removing a budget can change what resolving the key
-- answers: it counts as a key change (and notifies, as every key change).
CREATE TRIGGER key_budgets_insert_counts_as_a_key_change AFTER INSERT ON key_budgets
FOR EACH ROW EXECUTE FUNCTION keytally_count_key_change();

CREATE TRIGGER key_budgets_update_counts_as_a_key_change
AFTER UPDATE OF key_row_id, budget_nanos, period_days, anchor ON key_budgets
FOR EACH ROW EXECUTE FUNCTION keytally_count_key_change();

CREATE TRIGGER key_budgets_delete_counts_as_a_key_change AFTER DELETE ON key_budgets
FOR EACH ROW EXECUTE FUNCTION keytally_count_key_change();

-- So does the spend reaching the budget: every replica's cached answer for
-- the key is read again then, and only then (spend below the budget changes
-- no answer; a new period ends an earlier refusal by time alone).
CREATE TRIGGER key_budgets_reached_counts_as_a_key_change
AFTER UPDATE OF spend_nanos ON key_budgets
FOR EACH ROW
WHEN (NEW.spend_nanos >= NEW.budget_nanos
    AND (OLD.spend_nanos < OLD.budget_nanos OR NEW.period_start <> OLD.period_start))
EXECUTE FUNCTION keytally_count_key_change();

-- The spend reaching the soft limit or the budget, once each a period, to be
-- logged: a store's maintenance thread takes the rows out and logs them, so
-- the recording statement never returns the spend.
CREATE TABLE budget_reports (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_row_id BIGINT NOT NULL,
    period_start BIGINT NOT NULL,
    spend_nanos BIGINT NOT NULL,
    budget_nanos BIGINT NOT NULL,
    soft_nanos BIGINT
);

CREATE FUNCTION keytally_report_budget() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO budget_reports (key_row_id, period_start, spend_nanos, budget_nanos, soft_nanos)
    VALUES (NEW.key_row_id, NEW.period_start, NEW.spend_nanos, NEW.budget_nanos, NEW.soft_nanos);
    RETURN NULL;
END;
$$;

CREATE TRIGGER key_budgets_reached_is_reported
AFTER UPDATE OF spend_nanos ON key_budgets
FOR EACH ROW
WHEN ((NEW.spend_nanos >= NEW.budget_nanos
        AND (OLD.spend_nanos < OLD.budget_nanos OR NEW.period_start <> OLD.period_start))
    OR (NEW.spend_nanos >= NEW.soft_nanos
        AND (OLD.spend_nanos < OLD.soft_nanos OR NEW.period_start <> OLD.period_start)))
EXECUTE FUNCTION keytally_report_budget();
