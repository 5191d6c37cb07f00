-- A key's budget: at most `budget_nanos` of spend (nano-units, as events'
-- cost_nanos) per period, and an optional soft limit that is only reported.
-- A period is a calendar month in UTC (`period_days` NULL), or a fixed
-- number of days from `anchor` (Unix milliseconds; a day is one day from
-- midnight UTC, anchor 0). The spend of the period that began at
-- `period_start` is kept as events are recorded, in their transaction: an
-- event of a later period starts the spend again from its cost, an event of
-- an earlier period (or before `anchor`) leaves it alone. Resolving a key
-- reads these two columns, never the events.
CREATE TABLE key_budgets (
    key_row_id INTEGER PRIMARY KEY NOT NULL REFERENCES keys (row_id),
    budget_nanos BIGINT NOT NULL CHECK (budget_nanos > 0),
    soft_nanos BIGINT CHECK (soft_nanos > 0 AND soft_nanos <= budget_nanos),
    period_days INTEGER CHECK (period_days BETWEEN 1 AND 36500),
    anchor BIGINT NOT NULL CHECK (anchor >= 0),
    period_start BIGINT NOT NULL,
    spend_nanos BIGINT NOT NULL CHECK (spend_nanos >= 0)
);

-- Setting, changing or removing a budget can change what resolving the key
-- answers: it counts as a key change.
CREATE TRIGGER key_budgets_insert_counts_as_a_key_change AFTER INSERT ON key_budgets
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'key_changes';
END;

CREATE TRIGGER key_budgets_update_counts_as_a_key_change
AFTER UPDATE OF key_row_id, budget_nanos, period_days, anchor ON key_budgets
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'key_changes';
END;

CREATE TRIGGER key_budgets_delete_counts_as_a_key_change AFTER DELETE ON key_budgets
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'key_changes';
END;

-- So does the spend reaching the budget: keytally's recording transaction
-- moves `key_changes` itself when an event's cost makes the spend reach the
-- budget, so every process's cached answer for the key is read again then,
-- and only then (spend below the budget changes no answer; a new period
-- ends an earlier refusal by time alone). It does not use a trigger here:
-- an AFTER UPDATE trigger on the spend, even one whose WHEN is false, made
-- every event's update twice as slow.

-- The spend reaching the soft limit or the budget, once each a period, to be
-- logged: the recording transaction queues a row, and a store's maintenance
-- thread takes the rows out and logs them.
CREATE TABLE budget_reports (
    id INTEGER PRIMARY KEY NOT NULL,
    key_row_id BIGINT NOT NULL,
    period_start BIGINT NOT NULL,
    spend_nanos BIGINT NOT NULL,
    budget_nanos BIGINT NOT NULL,
    soft_nanos BIGINT
);
