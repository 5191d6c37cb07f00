-- A batch that carries a key into its next period queues a report for
-- each earlier period whose spend it takes to a limit, from inside the walk
-- that computes the row's new spend. PostgreSQL computes that before it
-- locks the row, and again from the row's latest version if another
-- replica updated it meanwhile: the first walk's report, from a version
-- that no longer stands, was queued all the same (a limit logged that the
-- spend kept never reached, or logged twice). The walk now locks the row
-- before its first report, and queues reports only when the row it was
-- given is still the row.

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
    row_is_current BOOLEAN;
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
        spend := CASE WHEN spend > 9223372036854775807 - events[3][i]
            THEN 9223372036854775807 ELSE spend + events[3][i] END;
        CONTINUE WHEN period >= last_start;
        budget_reached := before < budget_nanos AND spend >= budget_nanos;
        CONTINUE WHEN NOT coalesce(budget_reached OR (before < soft_nanos AND spend >= soft_nanos),
            false);
        IF row_is_current IS NULL THEN
            -- Waits for a replica updating the row; if it did, this walk is
            -- of an older version, and the update computes again from the
            -- new one (EvalPlanQual): only that walk may queue reports.
            SELECT b.period_start = keytally_spend_across_periods.period_start
                    AND b.spend_nanos = keytally_spend_across_periods.spend_nanos
                INTO row_is_current
                FROM key_budgets AS b
                WHERE b.key_row_id = keytally_spend_across_periods.key_row_id
                FOR UPDATE;
        END IF;
        IF row_is_current
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
