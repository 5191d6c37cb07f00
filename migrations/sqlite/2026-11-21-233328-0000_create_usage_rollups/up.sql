-- Hourly usage rollups, kept in the same transaction as the events they
-- count, so they never disagree with what was recorded. They outlive the raw
-- events (pruning events leaves them alone) and have their own retention.
-- `hour` is Unix time in whole hours (ms / 3,600,000).

-- Per key (key_row_id 0 for unauthenticated requests) and model.
CREATE TABLE usage_key_hourly (
    key_row_id BIGINT NOT NULL,
    hour BIGINT NOT NULL,
    model_id BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cache_creation_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    latency_ms_sum BIGINT NOT NULL,
    latency_ms_max BIGINT NOT NULL,
    PRIMARY KEY (key_row_id, hour, model_id)
) WITHOUT ROWID;

-- Per model, all keys together: overall and per-model usage read only this.
CREATE TABLE usage_model_hourly (
    hour BIGINT NOT NULL,
    model_id BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cache_creation_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    latency_ms_sum BIGINT NOT NULL,
    latency_ms_max BIGINT NOT NULL,
    PRIMARY KEY (hour, model_id)
) WITHOUT ROWID;
