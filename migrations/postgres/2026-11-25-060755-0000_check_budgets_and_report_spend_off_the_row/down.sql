DROP FUNCTION keytally_spend_in_period(BIGINT, BIGINT, INTEGER, BIGINT, BIGINT[]);
DROP FUNCTION keytally_first_event_of(BIGINT, BIGINT[]);
DROP TRIGGER budget_reports_of_the_budget_refuse_the_key ON budget_reports;
DROP FUNCTION keytally_refuse_reported();
DROP TRIGGER key_budgets_are_checked ON key_budgets;
DROP FUNCTION keytally_check_budget();

ALTER TABLE key_budgets
    ADD CONSTRAINT key_budgets_anchor_check CHECK (anchor >= 0),
    ADD CONSTRAINT key_budgets_budget_nanos_check CHECK (budget_nanos > 0),
    ADD CONSTRAINT key_budgets_check CHECK (soft_nanos > 0 AND soft_nanos <= budget_nanos),
    ADD CONSTRAINT key_budgets_period_days_check CHECK (period_days BETWEEN 1 AND 36500),
    ADD CONSTRAINT key_budgets_spend_nanos_check CHECK (spend_nanos >= 0);

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

CREATE TRIGGER key_budgets_reached_refuses_the_key
AFTER UPDATE OF spend_nanos ON key_budgets
FOR EACH ROW
WHEN (NEW.spend_nanos >= NEW.budget_nanos
    AND (OLD.spend_nanos < OLD.budget_nanos OR NEW.period_start <> OLD.period_start))
EXECUTE FUNCTION keytally_refuse_over_budget();

-- The spend of a budget row after a batch's events of its key, when they
-- are not all of one period. `events` holds the whole batch's priced events
-- of keys, sorted by key, time and position: their keys, times and costs
-- as its three rows; the key's events are found by binary search, so that
-- the batch is sorted once for all its keys. Walked in time order, an event
-- before `anchor` or of an earlier period than the running one counts for
-- nothing, one of a later period starts the spend again. Recorded one by
-- one, every period but the last ends in an update of its own: here each
-- of those periods' events reaching the soft limit or the budget is
-- reported, and reaching the budget refuses the key until the period's end
-- and counts as a key change, as the row's triggers do for the last period
-- when the recording statement writes the returned spend.
--
-- It runs inside the recording statement's UPDATE, whose new values
-- PostgreSQL computes before it locks the row, and computes again from the
-- row's latest version when another transaction updated it meanwhile. So
-- what it writes must hold however often it runs, and from an older version
-- of the row too: a refusal only ever moves later (the other transaction's
-- may end later than this one's), and a limit of the period already
-- reported in a queued row (by the run before, or by another transaction)
-- is not reported again. Two replicas whose batches carry one key over the
-- same boundary at once may still each report the earlier period's limit
-- when the first report was logged before the second was queued. Its
-- writes to `keys` and `sequences` come before the statement's later row
-- locks, so two such batches can deadlock: PostgreSQL ends one, which the
-- store retries (as every write that meets a deadlock).
CREATE OR REPLACE FUNCTION keytally_spend_across_periods(
    key_row_id BIGINT,
    budget_nanos BIGINT,
    soft_nanos BIGINT,
    period_days INTEGER,
    anchor BIGINT,
    period_start BIGINT,
    spend_nanos BIGINT,
    events BIGINT[]
) RETURNS BIGINT LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n INTEGER := coalesce(array_length(events, 2), 0);
    first INTEGER := 1;
    last INTEGER := n + 1;
    middle INTEGER;
    last_start BIGINT;
    period BIGINT := period_start;
    spend BIGINT := spend_nanos;
    started BIGINT;
    before BIGINT;
    budget_reached BOOLEAN;
    changes BIGINT;
BEGIN
    -- The key's first event: the first position whose key is not below it.
    WHILE first < last LOOP
        middle := (first + last) / 2;
        IF events[1][middle] < key_row_id THEN
            first := middle + 1;
        ELSE
            last := middle;
        END IF;
    END LOOP;
    last := first;
    WHILE last <= n AND events[1][last] = key_row_id LOOP
        last := last + 1;
    END LOOP;
    last := last - 1;
    IF last < first THEN
        RETURN spend;
    END IF;
    last_start := keytally_period_start(events[2][last], period_days, anchor);
    FOR i IN first .. last LOOP
        CONTINUE WHEN events[2][i] < anchor;
        started := keytally_period_start(events[2][i], period_days, anchor);
        CONTINUE WHEN started < period;
        IF started > period THEN
            period := started;
            spend := 0;
        END IF;
        before := spend;
        spend := spend + events[3][i];
        CONTINUE WHEN period >= last_start;
        budget_reached := before < budget_nanos AND spend >= budget_nanos;
        IF budget_reached THEN
            UPDATE keys
            SET over_budget_until = GREATEST(over_budget_until,
                keytally_period_end(period, period_days))
            WHERE row_id = key_row_id;
            UPDATE sequences SET next = next + 1 WHERE name = 'key_changes'
            RETURNING next INTO changes;
            PERFORM pg_notify('keytally_key_changes', changes::text);
        END IF;
        IF (budget_reached OR (before < soft_nanos AND spend >= soft_nanos))
            AND NOT EXISTS (SELECT 1 FROM budget_reports AS r
                WHERE r.key_row_id = keytally_spend_across_periods.key_row_id
                    AND r.period_start = period
                    AND r.spend_nanos >= CASE WHEN budget_reached
                        THEN keytally_spend_across_periods.budget_nanos
                        ELSE keytally_spend_across_periods.soft_nanos END) THEN
            INSERT INTO budget_reports (key_row_id, period_start, spend_nanos, budget_nanos,
                soft_nanos)
            VALUES (key_row_id, period, spend, budget_nanos, soft_nanos);
        END IF;
    END LOOP;
    RETURN spend;
END;
$$;
