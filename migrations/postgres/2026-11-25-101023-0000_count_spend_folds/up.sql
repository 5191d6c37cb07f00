-- A large batch on PostgreSQL may leave part of a key's spend in its
-- rollups (`key_budgets.rollup_hour`), as SQLite does; pruning those
-- rollups folds it into `spend_nanos`. This counts the prunes that folded
-- any: a store trusts the spend it keeps in memory only while this count,
-- `key_changes` and the next event id are the ones its last recording left.
INSERT INTO sequences (name, next) VALUES ('spend_folds', 1);
