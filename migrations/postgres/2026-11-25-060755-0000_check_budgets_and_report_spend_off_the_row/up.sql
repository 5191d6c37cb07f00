-- A recording statement updates the budget row of each key it records for.
-- Two things made that update cost more than the row: the table's checks,
-- which run on every update of a row however few of its columns change, and
-- the two triggers on `spend_nanos`, whose conditions were prepared for
-- every statement. Both move off the update of the spend.

-- The budget's own columns are checked when they are written (a budget set
-- or changed), by a trigger on those columns; an update of the spend and the
-- period alone runs none. The spend is only ever added to from events'
-- costs, which are never negative.
ALTER TABLE key_budgets
    DROP CONSTRAINT key_budgets_anchor_check,
    DROP CONSTRAINT key_budgets_budget_nanos_check,
    DROP CONSTRAINT key_budgets_check,
    DROP CONSTRAINT key_budgets_period_days_check,
    DROP CONSTRAINT key_budgets_spend_nanos_check;

CREATE FUNCTION keytally_check_budget() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- As the checks were: a NULL soft limit or period passes.
    IF NOT (NEW.budget_nanos > 0 AND NEW.anchor >= 0
            AND NEW.soft_nanos > 0 AND NEW.soft_nanos <= NEW.budget_nanos
            AND NEW.period_days BETWEEN 1 AND 36500) THEN
        RAISE EXCEPTION 'budget of key row % out of range', NEW.key_row_id
            USING ERRCODE = 'check_violation', TABLE = 'key_budgets';
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER key_budgets_are_checked
AFTER INSERT OR UPDATE OF budget_nanos, soft_nanos, period_days, anchor ON key_budgets
FOR EACH ROW EXECUTE FUNCTION keytally_check_budget();

-- The recording statement finds the keys whose spend it carried to a limit
-- from the spend it writes (`budgets::spend_cte`) and queues their reports.
-- A report of the budget refuses the key until its period's end (a refusal
-- only ever moves later) and counts as a key change, which notifies, by
-- this trigger, each write a command of its own. For a report the
-- statement queued it runs after the statement, as the triggers on the
-- spend did, so that the `keys` row and then the `key_changes` row are
-- locked last; for one `keytally_spend_across_periods` queued, when the
-- function's insert ends, within the statement, as the function's own
-- writes did. A key whose budget is gone (removed by a transaction that
-- committed meanwhile) is not refused.
CREATE FUNCTION keytally_refuse_reported() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changes BIGINT;
BEGIN
    UPDATE keys SET over_budget_until = GREATEST(keys.over_budget_until,
        keytally_period_end(NEW.period_start, b.period_days))
    FROM key_budgets AS b
    WHERE keys.row_id = NEW.key_row_id AND b.key_row_id = NEW.key_row_id;
    IF FOUND THEN
        UPDATE sequences SET next = next + 1 WHERE name = 'key_changes'
        RETURNING next INTO changes;
        PERFORM pg_notify('keytally_key_changes', changes::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER budget_reports_of_the_budget_refuse_the_key AFTER INSERT ON budget_reports
FOR EACH ROW WHEN (NEW.spend_nanos >= NEW.budget_nanos)
EXECUTE FUNCTION keytally_refuse_reported();

DROP TRIGGER key_budgets_reached_is_reported ON key_budgets;
DROP TRIGGER key_budgets_reached_refuses_the_key ON key_budgets;
DROP FUNCTION keytally_report_budget();
DROP FUNCTION keytally_refuse_over_budget();

-- The position in `events` (as `keytally_spend_across_periods` takes them:
-- sorted by key) of the first event of the key with this row id, found by
-- binary search: the first position whose key is not below it (one past the
-- end if none is).
CREATE FUNCTION keytally_first_event_of(key_row_id BIGINT, events BIGINT[])
RETURNS INTEGER LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    first INTEGER := 1;
    last INTEGER := coalesce(array_length(events, 2), 0) + 1;
    middle INTEGER;
BEGIN
    WHILE first < last LOOP
        middle := (first + last) / 2;
        IF events[1][middle] < key_row_id THEN
            first := middle + 1;
        ELSE
            last := middle;
        END IF;
    END LOOP;
    RETURN first;
END;
$$;

-- What the events in `events` (as `keytally_spend_across_periods` takes
-- them) of the key with this row id cost in the period starting at
-- `period_start` of a budget of `period_days` days from `anchor`: for the
-- recording statement, the spend before a batch's last period is the spend
-- written less this.
CREATE FUNCTION keytally_spend_in_period(
    key_row_id BIGINT,
    period_start BIGINT,
    period_days INTEGER,
    anchor BIGINT,
    events BIGINT[]
) RETURNS BIGINT LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    n INTEGER := coalesce(array_length(events, 2), 0);
    first INTEGER := keytally_first_event_of(key_row_id, events);
    spent BIGINT := 0;
BEGIN
    WHILE first <= n AND events[1][first] = key_row_id LOOP
        IF events[2][first] >= anchor
            AND keytally_period_start(events[2][first], period_days, anchor) = period_start THEN
            spent := spent + events[3][first];
        END IF;
        first := first + 1;
    END LOOP;
    RETURN spent;
END;
$$;

-- The spend of a budget row after a batch's events of its key, when they
-- are not all of one period. `events` holds the whole batch's priced events
-- of keys, sorted by key, time and position: their keys, times and costs
-- as its three rows; the key's events are found by binary search, so that
-- the batch is sorted once for all its keys. Walked in time order, an event
-- before `anchor` or of an earlier period than the running one counts for
-- nothing, one of a later period starts the spend again. Recorded one by
-- one, every period but the last ends in an update of its own: here each
-- of those periods' events reaching the soft limit or the budget is
-- reported (a report of the budget refuses the key until the period's end
-- and counts as a key change, by the trigger on `budget_reports`), as the
-- recording statement does for the last period from the spend it writes.
--
-- It runs inside the recording statement's UPDATE, whose new values
-- PostgreSQL computes before it locks the row, and computes again from the
-- row's latest version when another transaction updated it meanwhile. So
-- what it writes must hold however often it runs, and from an older version
-- of the row too: a refusal only ever moves later (the other transaction's
-- may end later than this one's), and a limit of the period already
-- reported in a queued row it can see (by the run before, or by another
-- transaction that committed it, whose report refused the key as well) is
-- not reported again. A run on an older version, while another
-- transaction that reported the same limit had not committed, reports it
-- a second time. Two replicas whose batches carry one key over the
-- same boundary at once may still each report the earlier period's limit
-- when the first report was logged before the second was queued. Its
-- reports' writes to `keys` and `sequences` come before the statement's
-- later row locks, so such a batch and another recording for the same keys
-- can deadlock: PostgreSQL ends one, which the store retries (as every
-- write that meets a deadlock).
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
    first INTEGER := keytally_first_event_of(key_row_id, events);
    last INTEGER;
    last_start BIGINT;
    period BIGINT := period_start;
    spend BIGINT := spend_nanos;
    started BIGINT;
    before BIGINT;
    budget_reached BOOLEAN;
BEGIN
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
