-- The whole spend back in `spend_nanos`, and the table's check on it; no
-- count of budget changes (dropping the table drops its triggers).
DELETE FROM sequences WHERE name = 'budget_changes';

CREATE TABLE key_budgets_whole (
    key_row_id INTEGER PRIMARY KEY NOT NULL REFERENCES keys (row_id),
    budget_nanos BIGINT NOT NULL CHECK (budget_nanos > 0),
    soft_nanos BIGINT CHECK (soft_nanos > 0 AND soft_nanos <= budget_nanos),
    period_days INTEGER CHECK (period_days BETWEEN 1 AND 36500),
    anchor BIGINT NOT NULL CHECK (anchor >= 0),
    period_start BIGINT NOT NULL,
    spend_nanos BIGINT NOT NULL CHECK (spend_nanos >= 0)
);

INSERT INTO key_budgets_whole
SELECT b.key_row_id, b.budget_nanos, b.soft_nanos, b.period_days, b.anchor, b.period_start,
    max(0, b.spend_nanos + COALESCE((
        SELECT SUM(u.cost_nanos) FROM usage_key_hourly AS u
        WHERE u.key_row_id = b.key_row_id AND u.hour >= b.rollup_hour), 0))
FROM key_budgets AS b;

DROP TABLE key_budgets;
ALTER TABLE key_budgets_whole RENAME TO key_budgets;

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
