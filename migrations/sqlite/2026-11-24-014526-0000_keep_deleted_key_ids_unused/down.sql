DROP TRIGGER key_row_ids_never_change;
DROP TRIGGER keys_are_never_deleted;
