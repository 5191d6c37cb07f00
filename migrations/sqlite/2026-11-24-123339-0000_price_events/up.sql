-- What tokens cost: a price per model, versioned by the time it takes effect
-- (Unix milliseconds), each of the five token counts at its own price in
-- micro-units of the operator's currency per million tokens (2.50 a million
-- is 2500000). A price applies to the events of its model from its time until
-- the model's next price. Prices are never rewritten under recorded events:
-- keytally refuses a price that takes effect before an event of its model that
-- is already recorded.
CREATE TABLE prices (
    model_id BIGINT NOT NULL REFERENCES models (id),
    effective_from BIGINT NOT NULL CHECK (effective_from >= 0),
    prompt_micros BIGINT NOT NULL CHECK (prompt_micros BETWEEN 0 AND 10000000000),
    completion_micros BIGINT NOT NULL CHECK (completion_micros BETWEEN 0 AND 10000000000),
    cache_read_micros BIGINT NOT NULL CHECK (cache_read_micros BETWEEN 0 AND 10000000000),
    cache_creation_micros BIGINT NOT NULL CHECK (cache_creation_micros BETWEEN 0 AND 10000000000),
    reasoning_micros BIGINT NOT NULL CHECK (reasoning_micros BETWEEN 0 AND 10000000000),
    PRIMARY KEY (model_id, effective_from)
) WITHOUT ROWID;

-- Every change to the prices moves this count, which a recording transaction
-- reads to know whether the prices it holds in memory are current.
INSERT INTO sequences (name, next) VALUES ('price_changes', 1);

CREATE TRIGGER prices_count_inserts AFTER INSERT ON prices
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'price_changes';
END;

CREATE TRIGGER prices_count_updates AFTER UPDATE ON prices
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'price_changes';
END;

CREATE TRIGGER prices_count_deletes AFTER DELETE ON prices
BEGIN
    UPDATE sequences SET next = next + 1 WHERE name = 'price_changes';
END;

-- An event's cost in nano-units, computed when it is recorded with the price
-- in force at its time (rounded to the nearest nano-unit); NULL when its model
-- had no price then.
ALTER TABLE events ADD COLUMN cost_nanos BIGINT CHECK (cost_nanos >= 0);

-- The rollups keep the cost, and how many requests had no price. Events
-- recorded before prices existed had none.
ALTER TABLE usage_key_hourly ADD COLUMN cost_nanos BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_key_hourly ADD COLUMN unpriced_requests BIGINT NOT NULL DEFAULT 0;
UPDATE usage_key_hourly SET unpriced_requests = requests;
ALTER TABLE usage_model_hourly ADD COLUMN cost_nanos BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_model_hourly ADD COLUMN unpriced_requests BIGINT NOT NULL DEFAULT 0;
UPDATE usage_model_hourly SET unpriced_requests = requests;
