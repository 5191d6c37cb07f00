-- The spend of a key's period was rewritten in `key_budgets` by every event
-- with a cost: one more page written by each commit than without a budget.
-- It is now kept in two parts: `spend_nanos`, and the cost in the key's
-- `usage_key_hourly` rows from `rollup_hour` (Unix hours) on, which every
-- event writes anyway and which sit together in the key's order. An event
-- of the period in those rows leaves `key_budgets` alone; the row is written
-- when a period starts, for an event of the period before `rollup_hour` (late),
-- for an event in those rows that does not count (of an earlier period, or
-- from too far ahead of the clock), and when the rows to read grow (their
-- older hours are folded into `spend_nanos`, as they are before rollups are
-- deleted). `spend_nanos` may then be below zero. The table is rebuilt to
-- drop its check on the spend; its triggers are as before, and three more
-- count every write to it in `budget_changes`: a recording transaction keeps
-- the rows and spends it last left in memory while that count and the
-- `events` counter are the ones it left (nothing else wrote in between).
CREATE TABLE key_budgets_split (
    key_row_id INTEGER PRIMARY KEY NOT NULL REFERENCES keys (row_id),
    budget_nanos BIGINT NOT NULL CHECK (budget_nanos > 0),
    soft_nanos BIGINT CHECK (soft_nanos > 0 AND soft_nanos <= budget_nanos),
    period_days INTEGER CHECK (period_days BETWEEN 1 AND 36500),
    anchor BIGINT NOT NULL CHECK (anchor >= 0),
    period_start BIGINT NOT NULL,
    spend_nanos BIGINT NOT NULL,
    rollup_hour BIGINT
);

INSERT INTO key_budgets_split
SELECT b.key_row_id, b.budget_nanos, b.soft_nanos, b.period_days, b.anchor, b.period_start,
    b.spend_nanos - COALESCE((
        SELECT SUM(u.cost_nanos) FROM usage_key_hourly AS u
        WHERE u.key_row_id = b.key_row_id AND u.hour >= b.period_start / 3600000), 0),
    b.period_start / 3600000
FROM key_budgets AS b;

DROP TABLE key_budgets;
ALTER TABLE key_budgets_split RENAME TO key_budgets;

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

INSERT INTO sequences (name, next) VALUES ('budget_changes', 1);

CREATE TRIGGER key_budgets_insert_counts_as_a_budget_change AFTER INSERT ON key_budgets
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'budget_changes';
END;

CREATE TRIGGER key_budgets_update_counts_as_a_budget_change AFTER UPDATE ON key_budgets
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'budget_changes';
END;

CREATE TRIGGER key_budgets_delete_counts_as_a_budget_change AFTER DELETE ON key_budgets
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'budget_changes';
END;
