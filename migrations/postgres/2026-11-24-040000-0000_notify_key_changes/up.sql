-- Every change to a key or secret that moves `key_changes` also notifies
-- channel `keytally_key_changes` with the new count, on commit, so that
-- replicas in notified mode learn of it without asking.
CREATE OR REPLACE FUNCTION keytally_count_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changes BIGINT;
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'key_changes' RETURNING next INTO changes;
    PERFORM pg_notify('keytally_key_changes', changes::text);
    RETURN NULL;
END;
$$;
