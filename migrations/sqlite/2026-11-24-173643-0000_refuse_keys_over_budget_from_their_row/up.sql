-- Until when a key is refused for its budget: the end of the period in which
-- its spend reached the budget; NULL while it has not. It is kept on the key
-- so that a resolve reads the key's row and nothing else: it is written when
-- the spend reaches the budget (by the recording transaction) and whenever
-- the budget is set or removed, and time alone ends it.
ALTER TABLE keys ADD COLUMN over_budget_until BIGINT;

UPDATE keys SET over_budget_until = (
    SELECT CASE
        WHEN b.period_days IS NULL
            THEN CAST(strftime('%s', b.period_start / 1000, 'unixepoch', '+1 month') AS INTEGER) * 1000
        ELSE b.period_start + CAST(b.period_days AS BIGINT) * 86400000
    END
    FROM key_budgets b
    WHERE b.key_row_id = keys.row_id AND b.spend_nanos >= b.budget_nanos
);
