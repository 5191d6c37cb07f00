DELETE FROM sequences WHERE name = 'spend_folds';
