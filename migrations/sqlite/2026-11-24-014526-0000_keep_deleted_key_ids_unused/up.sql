-- A key's row_id is what events and the hourly rollups refer to, and the
-- rollups carry no foreign key. keys.row_id is not AUTOINCREMENT, so SQLite
-- would hand a deleted key's row_id to the next key created, and that key
-- would inherit the deleted one's usage. Keys are therefore never deleted
-- (revoking keeps the row), and a row_id never changes.
CREATE TRIGGER keys_are_never_deleted
BEFORE DELETE ON keys
BEGIN
    SELECT RAISE(ABORT, 'keys are never deleted: their ids stay in events and rollups; revoke the key instead');
END;

CREATE TRIGGER key_row_ids_never_change
BEFORE UPDATE OF row_id ON keys
WHEN NEW.row_id IS NOT OLD.row_id
BEGIN
    SELECT RAISE(ABORT, 'a key''s row_id never changes: events and rollups refer to it');
END;
