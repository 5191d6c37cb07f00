CREATE OR REPLACE FUNCTION keytally_count_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'key_changes';
    RETURN NULL;
END;
$$;
