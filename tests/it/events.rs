//! The events repository on a real store: record, batches, bad input,
//! listing, pruning, and rollups that always agree with the raw events.

use std::collections::BTreeMap;

use diesel::sql_types::BigInt;
use diesel::QueryableByName;
use keytally::testing::{store_on, TestStore};
use keytally::Backend;
use keytally::{
    Bucket, Error, EventFilter, KeyId, NewEvent, NewKey, Timestamp, Totals, UsageFilter,
};
use rstest::rstest;

use crate::support::random::Rng;
use crate::support::sql::{raw, Raw};
use crate::TestResult;

/// 2026-11-01T00:00:00Z.
const T0: i64 = 1_793_491_200_000;
const HOUR: i64 = 3_600_000;

fn ts(millis: i64) -> Result<Timestamp, Error> {
    Ok(Timestamp::from_millis(millis)?)
}

fn random_event(rng: &mut Rng, keys: &[KeyId], span_ms: i64) -> Result<NewEvent, Error> {
    let models = ["gpt-4o", "o3", "claude-sonnet-4"];
    let mut event = NewEvent::new(
        ts(T0 + rng.below(span_ms as u64) as i64)?,
        models[rng.below(3) as usize],
    );
    let pick = rng.below(keys.len() as u64 + 1) as usize;
    event.key_id = keys.get(pick).copied();
    event.prompt_tokens = rng.below(4000) as i64;
    event.completion_tokens = rng.below(2000) as i64;
    event.cache_read_tokens = rng.below(3) as i64;
    event.reasoning_tokens = rng.below(50) as i64;
    event.latency_ms = 50 + rng.below(5000) as i64;
    event.status = if rng.below(10) == 0 { 429 } else { 200 };
    if event.status == 429 {
        event.error = Some("rate_limited".to_owned());
    }
    Ok(event)
}

fn add(totals: &mut Totals, event: &NewEvent) {
    totals.requests += 1;
    totals.errors += i64::from(event.is_error());
    totals.prompt_tokens += event.prompt_tokens;
    totals.completion_tokens += event.completion_tokens;
    totals.cache_read_tokens += event.cache_read_tokens;
    totals.cache_creation_tokens += event.cache_creation_tokens;
    totals.reasoning_tokens += event.reasoning_tokens;
    totals.latency_ms_sum += event.latency_ms;
    totals.latency_ms_max = totals.latency_ms_max.max(event.latency_ms);
    // These tests set no prices: every request is unpriced.
    totals.unpriced_requests += 1;
}

fn recount<'a>(events: impl Iterator<Item = &'a NewEvent>) -> Totals {
    let mut totals = Totals::default();
    for event in events {
        add(&mut totals, event);
    }
    totals
}

fn make_keys(store: &TestStore, n: usize) -> Result<Vec<KeyId>, Error> {
    (0..n)
        .map(|i| {
            Ok(store
                .keys()
                .create(&NewKey::client(format!("key {i}")))?
                .key
                .id)
        })
        .collect()
}

#[rstest]
fn recorded_event_reads_back_whole(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let key = make_keys(&store, 1)?[0];
    let mut event = NewEvent::new(ts(T0)?, "gpt-4o");
    event.key_id = Some(key);
    event.upstream_model = Some("gpt-4o-2024-08-06".to_owned());
    event.request_id = Some("req_123".to_owned());
    event.prompt_tokens = 11;
    event.completion_tokens = 22;
    event.cache_read_tokens = 3;
    event.cache_creation_tokens = 4;
    event.reasoning_tokens = 5;
    event.status = 502;
    event.latency_ms = 1234;
    event.error = Some("upstream_error".to_owned());
    event.usage_unknown = true;
    event.thinking_level = Some("high".to_owned());
    let id = store.events().record(&event)?;
    let listed = store.events().list(&EventFilter::default())?;
    assert_eq!(listed.len(), 1);
    let got = &listed[0];
    assert_eq!(got.id, id);
    assert_eq!(got.ts, event.ts);
    assert_eq!(got.key_id, Some(key));
    assert_eq!(got.model, event.model);
    assert_eq!(got.upstream_model, event.upstream_model);
    assert_eq!(got.request_id, event.request_id);
    assert_eq!(
        (
            got.prompt_tokens,
            got.completion_tokens,
            got.cache_read_tokens
        ),
        (11, 22, 3)
    );
    assert_eq!((got.cache_creation_tokens, got.reasoning_tokens), (4, 5));
    assert_eq!((got.status, got.latency_ms), (502, 1234));
    assert_eq!(got.error, event.error);
    assert!(got.usage_unknown);
    assert_eq!(got.thinking_level, event.thinking_level);
    Ok(())
}

#[rstest]
#[case::negative_tokens(|e: &mut NewEvent| e.prompt_tokens = -1, "prompt_tokens")]
#[case::huge_tokens(|e: &mut NewEvent| e.completion_tokens = i64::from(i32::MAX) + 1, "completion_tokens")]
#[case::bad_status(|e: &mut NewEvent| e.status = 1000, "status")]
#[case::negative_latency(|e: &mut NewEvent| e.latency_ms = -5, "latency_ms")]
#[case::empty_model(|e: &mut NewEvent| e.model = String::new(), "model")]
#[case::long_model(|e: &mut NewEvent| e.model = "m".repeat(201), "model")]
#[case::body_as_error(|e: &mut NewEvent| e.error = Some("upstream said: no".to_owned()), "error")]
#[case::long_request_id(|e: &mut NewEvent| e.request_id = Some("r".repeat(129)), "request_id")]
#[case::unknown_key(|e: &mut NewEvent| e.key_id = "0190f0f0-0000-7000-8000-000000000000".parse().ok(), "key_id")]
fn a_bad_event_spoils_its_whole_batch_and_is_named(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
    #[case] spoil: fn(&mut NewEvent),
    #[case] field: &str,
) -> TestResult {
    let store = store_on(backend);
    let mut batch: Vec<NewEvent> = (0..6)
        .map(|i| Ok(NewEvent::new(ts(T0 + i)?, "fine-model")))
        .collect::<Result<_, Error>>()?;
    batch[4].model = "a-model-only-this-batch-uses".to_owned();
    spoil(&mut batch[3]);
    let error = match store.events().record_batch(&batch) {
        Ok(_) => return Err("a bad batch was recorded".into()),
        Err(error) => error,
    };
    let Error::InvalidEvent { index, reason } = &error else {
        return Err(format!("unexpected error {error:?}").into());
    };
    assert_eq!(*index, 3);
    assert!(reason.starts_with(field), "{reason}");
    assert!(error
        .to_string()
        .contains("nothing of the batch was written"));
    // Nothing at all was written: no event, no rollup, no model name.
    let mut conn = raw(&store)?;
    for table in ["events", "usage_key_hourly", "usage_model_hourly", "models"] {
        let count = conn.number(&format!("SELECT count(*) AS n FROM {table}"))?;
        assert_eq!(count, 0, "{table} has {count} rows");
    }
    drop(conn);
    // The same event alone is refused too, as event 0.
    assert!(matches!(
        store.events().record(&batch[3]),
        Err(Error::InvalidEvent { index: 0, .. })
    ));
    Ok(())
}

#[rstest]
fn out_of_range_timestamps_cannot_even_be_built() {
    assert!(matches!(
        Timestamp::from_millis(-1),
        Err(keytally::Invalid {
            field: "timestamp",
            ..
        })
    ));
    assert!(Timestamp::from_millis(i64::MAX).is_err());
}

#[rstest]
fn batch_ids_are_consecutive_and_in_order(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
    // Small batches and large ones (PostgreSQL copies those).
    #[values(50, 1_500)] size: i64,
) -> TestResult {
    let store = store_on(backend);
    // Out of time order, so that the ids follow the batch, not the times.
    let batch: Vec<NewEvent> = (0..size)
        .map(|i| {
            let mut event = NewEvent::new(ts(T0 + (i * 7919) % size * 1000)?, "o3");
            event.request_id = Some(format!("r{i}"));
            Ok(event)
        })
        .collect::<Result<_, Error>>()?;
    let ids = store.events().record_batch(&batch)?;
    assert_eq!(ids.len(), size as usize);
    for pair in ids.windows(2) {
        assert_eq!(pair[1].get(), pair[0].get() + 1);
    }
    // Each id names its own event.
    let listed = store.events().list(&EventFilter {
        limit: Some(10_000),
        ..EventFilter::default()
    })?;
    assert_eq!(listed.len(), size as usize);
    for event in listed {
        let position = ids
            .iter()
            .position(|id| *id == event.id)
            .ok_or("an id not returned")?;
        assert_eq!(
            event.request_id.as_deref(),
            Some(format!("r{position}").as_str())
        );
    }
    Ok(())
}

#[rstest]
fn event_ids_keep_growing_after_every_event_is_pruned(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let batch: Vec<NewEvent> = (0..5)
        .map(|i| Ok(NewEvent::new(ts(T0 + i * 1000)?, "o3")))
        .collect::<Result<_, Error>>()?;
    let first = store.events().record_batch(&batch)?;
    let last = first.last().copied().ok_or("no ids")?;
    let report = store.events().prune(ts(T0 + HOUR)?, 100)?;
    assert_eq!(report.events_deleted, 5);
    // Recorded after the pruned ones, but at an earlier time: the id still
    // grows.
    let again = store
        .events()
        .record(&NewEvent::new(ts(T0 - HOUR)?, "o3"))?;
    assert_eq!(again.get(), last.get() + 1);
    Ok(())
}

#[rstest]
fn pages_return_every_event_once_newest_first(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let keys = make_keys(&store, 3)?;
    let mut rng = Rng::new(11);
    let mut batch = Vec::new();
    for i in 0..257 {
        // Coarse timestamps so that many events share one: the cursor must
        // break ties by id.
        let mut event = NewEvent::new(ts(T0 + (i / 4) * 1000)?, "gpt-4o");
        event.key_id = Some(keys[rng.below(3) as usize]);
        batch.push(event);
    }
    let ids = store.events().record_batch(&batch)?;
    let mut seen = Vec::new();
    let mut filter = EventFilter {
        limit: Some(30),
        ..EventFilter::default()
    };
    loop {
        let page = store.events().list(&filter)?;
        let Some(last) = page.last() else { break };
        filter.before = Some(last.cursor());
        seen.extend(page.iter().map(|event| (event.ts, event.id)));
    }
    let mut expected: Vec<_> = batch
        .iter()
        .map(|e| e.ts)
        .zip(ids.iter().copied())
        .collect();
    expected.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, expected);

    let for_key = store.events().list(&EventFilter {
        key: Some(keys[1]),
        limit: Some(10_000),
        ..EventFilter::default()
    })?;
    let expected_for_key = batch.iter().filter(|e| e.key_id == Some(keys[1])).count();
    assert_eq!(for_key.len(), expected_for_key);
    assert!(for_key.iter().all(|e| e.key_id == Some(keys[1])));

    let windowed = store.events().list(&EventFilter {
        since: Some(ts(T0 + 10_000)?),
        until: Some(ts(T0 + 20_000)?),
        limit: Some(10_000),
        ..EventFilter::default()
    })?;
    assert_eq!(windowed.len(), 40);
    assert!(store
        .events()
        .list(&EventFilter {
            model: Some("never-seen".to_owned()),
            ..EventFilter::default()
        })?
        .is_empty());
    Ok(())
}

#[rstest]
fn prune_removes_exactly_the_old_events_in_batches(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let batch: Vec<NewEvent> = (0..100)
        .map(|i| Ok(NewEvent::new(ts(T0 + i * 60_000)?, "o3")))
        .collect::<Result<_, Error>>()?;
    store.events().record_batch(&batch)?;
    let before = store
        .events()
        .usage(&UsageFilter::between(ts(T0)?, ts(T0 + 10 * HOUR)?))?;
    let cutoff = ts(T0 + 37 * 60_000)?;
    let report = store.events().prune(cutoff, 7)?;
    assert_eq!(report.events_deleted, 37);
    assert_eq!(report.batches, 6, "five full batches of 7, one of 2");
    let left = store.events().list(&EventFilter {
        limit: Some(1000),
        ..EventFilter::default()
    })?;
    assert_eq!(left.len(), 63);
    assert!(left.iter().all(|event| event.ts >= cutoff));
    assert!(left.iter().any(|event| event.ts == cutoff));
    // Whole-hour rollups are untouched by pruning raw events.
    let rollup_requests = raw(&store)?
        .number("SELECT CAST(coalesce(sum(requests), 0) AS BIGINT) AS n FROM usage_model_hourly")?;
    assert_eq!(rollup_requests, 100);
    assert_eq!(before.requests, 100);
    assert!(matches!(
        store.events().prune(cutoff, 0),
        Err(Error::InvalidInput { .. })
    ));
    // Rollup retention is separate.
    let removed = store.events().prune_rollups(ts(T0 + HOUR)?, 1)?;
    assert_eq!(removed, 2, "hour 0 in both rollup tables");
    Ok(())
}

/// Per (hour, model name): requests, errors, prompt tokens, largest latency.
type RollupTable = BTreeMap<(i64, String), (i64, i64, i64, i64)>;

/// The model rollups as stored, from SQL.
fn rollups(conn: &mut Raw) -> diesel::QueryResult<RollupTable> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        hour: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        model: String,
        #[diesel(sql_type = BigInt)]
        requests: i64,
        #[diesel(sql_type = BigInt)]
        errors: i64,
        #[diesel(sql_type = BigInt)]
        prompt: i64,
        #[diesel(sql_type = BigInt)]
        latency_max: i64,
    }
    let rows: Vec<Row> = conn.load(
        "SELECT hour, name AS model, requests, errors, prompt_tokens AS prompt, \
         latency_ms_max AS latency_max FROM usage_model_hourly JOIN models ON models.id = model_id",
    )?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                (r.hour, r.model),
                (r.requests, r.errors, r.prompt, r.latency_max),
            )
        })
        .collect())
}

#[rstest]
#[case::seed_1(1)]
#[case::seed_2(2)]
#[case::seed_3(3)]
fn rollups_equal_a_recount_after_records_and_prunes(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
    #[case] seed: u64,
) -> TestResult {
    let store = store_on(backend);
    let keys = make_keys(&store, 4)?;
    let mut rng = Rng::new(seed);
    let span = 30 * HOUR;
    let mut recorded: Vec<NewEvent> = Vec::new();
    // Whether each recorded event is still there as a raw event.
    let mut kept: Vec<bool> = Vec::new();
    let mut cutoff = T0;
    for _ in 0..60 {
        match rng.below(5) {
            0 => {
                let event = random_event(&mut rng, &keys, span)?;
                store.events().record(&event)?;
                recorded.push(event);
                kept.push(true);
            }
            1 => {
                cutoff = cutoff.max(T0 + rng.below(span as u64 / 2) as i64);
                let report = store
                    .events()
                    .prune(ts(cutoff)?, 1 + rng.below(20) as u32)?;
                let mut removed = 0;
                for (event, present) in recorded.iter().zip(kept.iter_mut()) {
                    if *present && event.ts.as_millis() < cutoff {
                        *present = false;
                        removed += 1;
                    }
                }
                assert_eq!(report.events_deleted, removed);
            }
            _ => {
                // Mostly small batches; a quarter large enough that
                // PostgreSQL copies them.
                let size = if rng.below(8) == 0 {
                    1_000 + rng.below(200)
                } else {
                    rng.below(40) + 1
                };
                let batch: Vec<NewEvent> = (0..size)
                    .map(|_| random_event(&mut rng, &keys, span))
                    .collect::<Result<_, Error>>()?;
                store.events().record_batch(&batch)?;
                kept.extend(batch.iter().map(|_| true));
                recorded.extend(batch);
            }
        }
    }
    // The raw events left are exactly those no prune removed.
    let left = store.events().list(&EventFilter {
        limit: Some(10_000),
        ..EventFilter::default()
    })?;
    assert_eq!(left.len(), kept.iter().filter(|present| **present).count());
    // The model rollups hold every event ever recorded, pruned or not.
    let stored = rollups(&mut raw(&store)?)?;
    let mut expected: BTreeMap<(i64, String), Totals> = BTreeMap::new();
    for event in &recorded {
        let hour = event.ts.as_millis() / HOUR;
        add(
            expected.entry((hour, event.model.clone())).or_default(),
            event,
        );
    }
    let expected: RollupTable = expected
        .into_iter()
        .map(|(group, t)| {
            (
                group,
                (t.requests, t.errors, t.prompt_tokens, t.latency_ms_max),
            )
        })
        .collect();
    assert_eq!(stored, expected);
    // Usage over windows in the unpruned range (from rollups plus raw edges)
    // equals a recount, overall, per key and per model, for windows that do
    // and do not fall on hour boundaries.
    let unpruned_from = (cutoff / HOUR + 1) * HOUR;
    for (since, until) in [
        (unpruned_from, T0 + span),
        (unpruned_from + 1_234, T0 + span - 56_789),
        (unpruned_from + 600_000, unpruned_from + 1_800_000),
    ] {
        let in_window = |e: &&NewEvent| {
            let t = e.ts.as_millis();
            t >= since && t < until
        };
        let window = UsageFilter::between(ts(since)?, ts(until)?);
        assert_eq!(
            store.events().usage(&window)?,
            recount(recorded.iter().filter(in_window))
        );
        let per_key = UsageFilter {
            key: Some(keys[2]),
            ..window.clone()
        };
        assert_eq!(
            store.events().usage(&per_key)?,
            recount(
                recorded
                    .iter()
                    .filter(in_window)
                    .filter(|e| e.key_id == Some(keys[2]))
            )
        );
        let per_model = UsageFilter {
            model: Some("o3".to_owned()),
            ..window.clone()
        };
        assert_eq!(
            store.events().usage(&per_model)?,
            recount(
                recorded
                    .iter()
                    .filter(in_window)
                    .filter(|e| e.model == "o3")
            )
        );
        let by_model = store.events().usage_by_model(&window)?;
        for group in &by_model {
            assert_eq!(
                group.totals,
                recount(
                    recorded
                        .iter()
                        .filter(in_window)
                        .filter(|e| e.model == group.group)
                )
            );
        }
        let by_key = store.events().usage_by_key(&window)?;
        let by_key_sum: i64 = by_key.iter().map(|g| g.totals.requests).sum();
        assert_eq!(by_key_sum, recorded.iter().filter(in_window).count() as i64);
        for group in &by_key {
            assert_eq!(
                group.totals,
                recount(
                    recorded
                        .iter()
                        .filter(in_window)
                        .filter(|e| e.key_id == group.group)
                )
            );
        }
        for bucket in [Bucket::Hour, Bucket::Day] {
            let size = if bucket == Bucket::Hour {
                HOUR
            } else {
                24 * HOUR
            };
            let series = store.events().usage_series(&window, bucket)?;
            let series_sum: i64 = series.iter().map(|g| g.totals.requests).sum();
            assert_eq!(series_sum, recorded.iter().filter(in_window).count() as i64);
            for point in &series {
                let start = point.group.as_millis();
                assert_eq!(start % size, 0);
                assert_eq!(
                    point.totals,
                    recount(
                        recorded
                            .iter()
                            .filter(in_window)
                            .filter(|e| e.ts.as_millis() / size * size == start)
                    )
                );
            }
        }
    }
    Ok(())
}

#[rstest]
fn usage_rejects_an_inverted_window_and_an_unknown_key(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    assert!(matches!(
        store
            .events()
            .usage(&UsageFilter::between(ts(T0 + 1)?, ts(T0)?)),
        Err(Error::InvalidInput { field: "until", .. })
    ));
    let unknown: KeyId = "0190f0f0-0000-7000-8000-000000000000".parse()?;
    assert!(matches!(
        store.events().usage(&UsageFilter {
            key: Some(unknown),
            ..UsageFilter::between(ts(T0)?, ts(T0 + HOUR)?)
        }),
        Err(Error::KeyNotFound { .. })
    ));
    assert_eq!(
        store
            .events()
            .usage(&UsageFilter::between(ts(T0)?, ts(T0 + HOUR)?))?,
        Totals::default()
    );
    Ok(())
}

#[rstest]
fn the_maintenance_thread_enforces_retention() -> TestResult {
    let store = TestStore::with_options(|options| {
        options.retention(keytally::Retention {
            raw_events: Some(std::time::Duration::from_secs(3600)),
            rollups: Some(std::time::Duration::from_secs(10 * 24 * 3600)),
            sweep_interval: std::time::Duration::from_millis(20),
        })
    })?;
    let now = Timestamp::now().as_millis();
    let batch: Vec<NewEvent> = [now - 20 * 24 * HOUR, now - 2 * HOUR, now - 1000, now - 2000]
        .iter()
        .map(|t| Ok(NewEvent::new(ts(*t)?, "o3")))
        .collect::<Result<_, Error>>()?;
    store.events().record_batch(&batch)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = store.events().list(&EventFilter::default())?;
        if left.len() == 2 {
            assert!(left.iter().all(|e| e.ts.as_millis() >= now - 2000));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} events left",
            left.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Rollups of the last ten days stay; the 20-day-old hour goes.
    let window = UsageFilter::between(ts(now - 30 * 24 * HOUR)?, ts(now + HOUR)?);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.events().usage(&window)?.requests != 3 {
        assert!(std::time::Instant::now() < deadline, "rollups not swept");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(())
}

#[rstest]
fn a_key_filter_reports_a_failed_look_up_as_it_is(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let unknown: KeyId = "0190f0f0-0000-7000-8000-000000000000".parse()?;
    let listed = store.events().list(&EventFilter {
        key: Some(unknown),
        ..EventFilter::default()
    });
    assert!(
        matches!(listed, Err(Error::KeyNotFound { .. })),
        "{listed:?}"
    );
    // A key never looked up by this store, then a database that cannot
    // answer: the error says so, not "no key with id".
    let created = store.keys().create(&NewKey::client("looked up later"))?;
    raw(&store)?.execute("ALTER TABLE keys RENAME TO keys_elsewhere")?;
    let listed = store.events().list(&EventFilter {
        key: Some(created.key.id),
        ..EventFilter::default()
    });
    assert!(matches!(listed, Err(Error::Database(_))), "{listed:?}");
    Ok(())
}
