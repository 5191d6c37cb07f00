-- The walk as it was: it queued an earlier period's report from the row
-- its statement began with, even when another replica's update of the row
-- made it compute again.

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
        spend := CASE WHEN spend > 9223372036854775807 - events[3][i]
            THEN 9223372036854775807 ELSE spend + events[3][i] END;
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
