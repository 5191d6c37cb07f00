-- A number drawn at random for this database, kept as a row of `sequences`,
-- whose page every recorded event and every key change rewrites. Before
-- SQLite replays a -wal into the database, keytally reads this number from
-- the database file and from each copy of that page in the log, and refuses
-- a log that carries another database's number (docs/reliability.md). A
-- backup is given a number of its own. The number is at least 2^32, which no
-- row id of the index of model names (rows of a name and a number too) reaches.
INSERT INTO sequences (name, next)
VALUES ('identity', (random() & 4611686018427387903) | 4294967296);
