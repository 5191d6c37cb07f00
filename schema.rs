// @generated automatically by Diesel CLI.

diesel::table! {
    budget_reports (id) {
        id -> BigInt,
        key_row_id -> BigInt,
        period_start -> BigInt,
        spend_nanos -> BigInt,
        budget_nanos -> BigInt,
        soft_nanos -> Nullable<BigInt>,
    }
}

diesel::table! {
    events (id, ts) {
        id -> BigInt,
        ts -> BigInt,
        key_row_id -> Nullable<BigInt>,
        model_id -> BigInt,
        upstream_model_id -> Nullable<BigInt>,
        request_id -> Nullable<Text>,
        prompt_tokens -> Integer,
        completion_tokens -> Integer,
        cache_read_tokens -> Integer,
        cache_creation_tokens -> Integer,
        reasoning_tokens -> Integer,
        status -> Integer,
        latency_ms -> Integer,
        error -> Nullable<Text>,
        usage_unknown -> Bool,
        thinking_level -> Nullable<Text>,
        cost_nanos -> Nullable<BigInt>,
    }
}

diesel::table! {
    key_budgets (key_row_id) {
        key_row_id -> BigInt,
        budget_nanos -> BigInt,
        soft_nanos -> Nullable<BigInt>,
        period_days -> Nullable<Integer>,
        anchor -> BigInt,
        period_start -> BigInt,
        spend_nanos -> BigInt,
        rollup_hour -> Nullable<BigInt>,
    }
}

diesel::table! {
    key_secrets (secret_hash) {
        secret_hash -> Binary,
        key_row_id -> BigInt,
        created_at -> BigInt,
        valid_until -> Nullable<BigInt>,
    }
}

diesel::table! {
    keys (row_id) {
        row_id -> BigInt,
        id -> Binary,
        display_prefix -> Text,
        tier -> Text,
        label -> Text,
        allowed_models -> Text,
        rate_limit_override -> Nullable<BigInt>,
        created_at -> BigInt,
        expires_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
        last_used_at -> Nullable<BigInt>,
        over_budget_until -> Nullable<BigInt>,
    }
}

diesel::table! {
    models (id) {
        id -> BigInt,
        name -> Text,
    }
}

diesel::table! {
    prices (model_id, effective_from) {
        model_id -> BigInt,
        effective_from -> BigInt,
        prompt_micros -> BigInt,
        completion_micros -> BigInt,
        cache_read_micros -> BigInt,
        cache_creation_micros -> BigInt,
        reasoning_micros -> BigInt,
    }
}

diesel::table! {
    sequences (name) {
        name -> Text,
        next -> BigInt,
    }
}

diesel::table! {
    usage_key_hourly (key_row_id, hour, model_id) {
        key_row_id -> BigInt,
        hour -> BigInt,
        model_id -> BigInt,
        requests -> BigInt,
        errors -> BigInt,
        prompt_tokens -> BigInt,
        completion_tokens -> BigInt,
        cache_read_tokens -> BigInt,
        cache_creation_tokens -> BigInt,
        reasoning_tokens -> BigInt,
        latency_ms_sum -> BigInt,
        latency_ms_max -> BigInt,
        cost_nanos -> BigInt,
        unpriced_requests -> BigInt,
    }
}

diesel::table! {
    usage_model_hourly (hour, model_id) {
        hour -> BigInt,
        model_id -> BigInt,
        requests -> BigInt,
        errors -> BigInt,
        prompt_tokens -> BigInt,
        completion_tokens -> BigInt,
        cache_read_tokens -> BigInt,
        cache_creation_tokens -> BigInt,
        reasoning_tokens -> BigInt,
        latency_ms_sum -> BigInt,
        latency_ms_max -> BigInt,
        cost_nanos -> BigInt,
        unpriced_requests -> BigInt,
    }
}

diesel::joinable!(key_budgets -> keys (key_row_id));
diesel::joinable!(key_secrets -> keys (key_row_id));
diesel::joinable!(prices -> models (model_id));

diesel::allow_tables_to_appear_in_same_query!(
    budget_reports,
    events,
    key_budgets,
    key_secrets,
    keys,
    models,
    prices,
    sequences,
    usage_key_hourly,
    usage_model_hourly,
);
