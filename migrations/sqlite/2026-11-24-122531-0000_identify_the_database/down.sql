DELETE FROM sequences WHERE name = 'identity';
