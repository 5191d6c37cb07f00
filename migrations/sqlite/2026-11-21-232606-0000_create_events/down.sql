DROP INDEX events_by_ts;
DROP INDEX events_by_key_ts;
DROP TABLE events;
DROP TABLE models;
