-- A large batch on PostgreSQL may leave part of a key's spend in its
-- rollups (`key_budgets.rollup_hour`), as SQLite does; pruning those
-- rollups folds it into `spend_nanos`. This counts the prunes that folded
-- any: a store trusts the spend it keeps in memory only while this count,
-- `key_changes` and the next event id are the ones its last recording left.
INSERT INTO sequences (name, next) VALUES ('spend_folds', 1);

-- The whole spend of a budget row that keeps part of it in the key's
-- rollups from `rollup_hour` on: `spend_nanos` and their cost, saturating
-- at the largest integer. A function, called only for such a row, so that
-- a recording statement whose rows keep their whole spend in `spend_nanos`
-- prepares no read of the rollups.
CREATE FUNCTION keytally_kept_spend(key_row_id BIGINT, spend_nanos BIGINT, rollup_hour BIGINT)
RETURNS BIGINT LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN CAST(LEAST(spend_nanos + coalesce((SELECT sum(u.cost_nanos)
        FROM usage_key_hourly AS u
        WHERE u.key_row_id = keytally_kept_spend.key_row_id
            AND u.hour >= keytally_kept_spend.rollup_hour), 0),
        9223372036854775807) AS BIGINT);
END;
$$;
