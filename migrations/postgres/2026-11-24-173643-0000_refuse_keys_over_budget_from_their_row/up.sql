-- Until when a key is refused for its budget: the end of the period in which
-- its spend reached the budget; NULL while it has not. It is kept on the key
-- so that a resolve reads the key's row and nothing else: it is written when
-- the spend reaches the budget (by the trigger below, in the recording
-- statement) and whenever the budget is set or removed, and time alone ends
-- it.
ALTER TABLE keys ADD COLUMN over_budget_until BIGINT;

-- The end of the period of a budget row.
CREATE FUNCTION keytally_period_end(period_start BIGINT, period_days INTEGER)
RETURNS BIGINT LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN period_days IS NULL
            THEN CAST(extract(epoch FROM (to_timestamp(period_start / 1000) AT TIME ZONE 'UTC')
                + interval '1 month') AS BIGINT) * 1000
        ELSE period_start + CAST(period_days AS BIGINT) * 86400000
    END
$$;

UPDATE keys SET over_budget_until = keytally_period_end(b.period_start, b.period_days)
FROM key_budgets b
WHERE b.key_row_id = keys.row_id AND b.spend_nanos >= b.budget_nanos;

-- The spend reaching the budget refuses the key until the period's end, and
-- counts as a key change (which notifies the stores that cache the key).
CREATE FUNCTION keytally_refuse_over_budget() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changes BIGINT;
BEGIN
    UPDATE keys SET over_budget_until = keytally_period_end(NEW.period_start, NEW.period_days)
    WHERE row_id = NEW.key_row_id;
    UPDATE sequences SET next = next + 1 WHERE name = 'key_changes' RETURNING next INTO changes;
    PERFORM pg_notify('keytally_key_changes', changes::text);
    RETURN NULL;
END;
$$;

DROP TRIGGER key_budgets_reached_counts_as_a_key_change ON key_budgets;
CREATE TRIGGER key_budgets_reached_refuses_the_key
AFTER UPDATE OF spend_nanos ON key_budgets
FOR EACH ROW
WHEN (NEW.spend_nanos >= NEW.budget_nanos
    AND (OLD.spend_nanos < OLD.budget_nanos OR NEW.period_start <> OLD.period_start))
EXECUTE FUNCTION keytally_refuse_over_budget();
