//! Prices and spend on a real store, on both backends: every event's cost
//! and every usage grouping equal a recount from the raw events and the
//! price table; a price applies from its time on; a price never changes
//! what recorded events cost.

use std::collections::BTreeMap;

use keytally::testing::{folder, store_on, TestStore};
use keytally::{
    Backend, Bucket, Error, EventFilter, KeyId, NewEvent, NewKey, Price, PriceVersion, Timestamp,
    UsageFilter,
};
use rstest::rstest;

use crate::support::binary::{json_of, keytally, path_arg, run};
use crate::support::random::Rng;
use crate::TestResult;

/// 2026-11-01T00:00:00Z.
const T0: i64 = 1_793_491_200_000;
const HOUR: i64 = 3_600_000;

fn ts(millis: i64) -> Result<Timestamp, Error> {
    Ok(Timestamp::from_millis(millis)?)
}

fn price(micros: [i64; 5]) -> Price {
    let [prompt, completion, cache_read, cache_creation, reasoning] = micros;
    Price {
        prompt: keytally::Micros(prompt),
        completion: keytally::Micros(completion),
        cache_read: keytally::Micros(cache_read),
        cache_creation: keytally::Micros(cache_creation),
        reasoning: keytally::Micros(reasoning),
    }
}

/// The price table as the test sets it: model, from, micro-units per
/// million tokens for the five counts.
fn table() -> Vec<(&'static str, i64, [i64; 5])> {
    vec![
        ("gpt-4o", T0, [2_500_000, 10_000_000, 1_250_000, 0, 0]),
        // A price change five hours in, with a price no nano-unit divides.
        (
            "gpt-4o",
            T0 + 5 * HOUR,
            [1_875_001, 7_500_000, 18_750, 3_750_000, 0],
        ),
        (
            "o3",
            T0 - HOUR,
            [2_000_000, 8_000_000, 500_000, 0, 8_000_000],
        ),
        // claude-sonnet-4 has no price: its events are unpriced.
    ]
}

/// The cost of `event` by the test's own reckoning: the price in force at
/// its time, each count at its price, in pico-units, rounded once to the
/// nearest nano-unit.
fn recount_cost(event: &NewEvent) -> Option<i64> {
    let (_, _, micros) = table()
        .into_iter()
        .filter(|(model, from, _)| *model == event.model && *from <= event.ts.as_millis())
        .max_by_key(|(_, from, _)| *from)?;
    let tokens = [
        event.prompt_tokens,
        event.completion_tokens,
        event.cache_read_tokens,
        event.cache_creation_tokens,
        event.reasoning_tokens,
    ];
    let picos: i128 = tokens
        .iter()
        .zip(micros)
        .map(|(&t, m)| i128::from(t) * i128::from(m))
        .sum();
    i64::try_from((picos + 500) / 1000).ok()
}

fn set_table(store: &TestStore) -> Result<(), Error> {
    let versions: Vec<PriceVersion> = table()
        .into_iter()
        .map(|(model, from, micros)| {
            Ok(PriceVersion {
                model: model.to_owned(),
                effective_from: ts(from)?,
                price: price(micros),
            })
        })
        .collect::<Result<_, Error>>()?;
    store.prices().set_all(&versions)
}

fn random_event(rng: &mut Rng, keys: &[KeyId]) -> Result<NewEvent, Error> {
    let models = ["gpt-4o", "o3", "claude-sonnet-4"];
    let mut event = NewEvent::new(
        ts(T0 + rng.below(10 * HOUR as u64) as i64)?,
        models[rng.below(3) as usize],
    );
    event.key_id = keys.get(rng.below(keys.len() as u64 + 1) as usize).copied();
    event.prompt_tokens = rng.below(40_000) as i64;
    event.completion_tokens = rng.below(8_000) as i64;
    event.cache_read_tokens = rng.below(20_000) as i64;
    event.cache_creation_tokens = rng.below(3) as i64 * 1_001;
    event.reasoning_tokens = rng.below(5_000) as i64;
    Ok(event)
}

/// Cost and unpriced requests, by the test's reckoning, per group.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Spend {
    cost_nanos: i64,
    unpriced: i64,
}

fn spend_of<'a>(events: impl Iterator<Item = &'a NewEvent>) -> Spend {
    let mut spend = Spend::default();
    for event in events {
        match recount_cost(event) {
            Some(cost) => spend.cost_nanos += cost,
            None => spend.unpriced += 1,
        }
    }
    spend
}

fn spend(totals: &keytally::Totals) -> Spend {
    Spend {
        cost_nanos: totals.cost_nanos,
        unpriced: totals.unpriced_requests,
    }
}

#[rstest]
fn costs_equal_a_recount_from_the_events_and_the_price_table(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    set_table(&store)?;
    let keys: Vec<KeyId> = (0..4)
        .map(|i| {
            Ok(store
                .keys()
                .create(&NewKey::client(format!("k{i}")))?
                .key
                .id)
        })
        .collect::<Result<_, Error>>()?;
    let mut rng = Rng::new(17);
    let events: Vec<NewEvent> = (0..1_500)
        .map(|_| random_event(&mut rng, &keys))
        .collect::<Result<_, Error>>()?;
    // Singles, small batches (arrays on PostgreSQL) and one large batch
    // (copied on PostgreSQL), so that every way of recording is costed.
    for event in &events[..100] {
        store.events().record(event)?;
    }
    for chunk in events[100..400].chunks(30) {
        store.events().record_batch(chunk)?;
    }
    store.events().record_batch(&events[400..])?;

    // Each event's own cost.
    let listed = store.events().list(&EventFilter {
        limit: Some(10_000),
        ..EventFilter::default()
    })?;
    assert_eq!(listed.len(), events.len());
    for event in &listed {
        assert_eq!(
            event.cost.map(|cost| cost.nanos()),
            recount_cost(event),
            "{event:?}"
        );
    }
    assert!(listed.iter().any(|event| event.cost.is_none()));
    assert!(listed
        .iter()
        .any(|event| event.cost.is_some_and(|c| c.nanos() > 0)));

    // Windows of whole hours, and with partial hours at both edges.
    for (since, until) in [
        (T0, T0 + 10 * HOUR),
        (T0 + HOUR / 2 + 7, T0 + 7 * HOUR + 1_234_567),
        (T0 + 4 * HOUR + 100, T0 + 5 * HOUR + 100),
    ] {
        let in_window = |e: &&NewEvent| e.ts.as_millis() >= since && e.ts.as_millis() < until;
        let filter = UsageFilter::between(ts(since)?, ts(until)?);
        assert_eq!(
            spend(&store.events().usage(&filter)?),
            spend_of(events.iter().filter(in_window)),
            "total over [{since}, {until})"
        );
        for group in store.events().usage_by_model(&filter)? {
            assert_eq!(
                spend(&group.totals),
                spend_of(
                    events
                        .iter()
                        .filter(in_window)
                        .filter(|e| e.model == group.group)
                ),
                "model {}",
                group.group
            );
        }
        for group in store.events().usage_by_key(&filter)? {
            assert_eq!(
                spend(&group.totals),
                spend_of(
                    events
                        .iter()
                        .filter(in_window)
                        .filter(|e| e.key_id == group.group)
                ),
                "key {:?}",
                group.group
            );
        }
        for key in &keys {
            let one_key = UsageFilter {
                key: Some(*key),
                ..filter.clone()
            };
            assert_eq!(
                spend(&store.events().usage(&one_key)?),
                spend_of(
                    events
                        .iter()
                        .filter(in_window)
                        .filter(|e| e.key_id == Some(*key))
                ),
                "key {key}"
            );
        }
        let mut by_hour: BTreeMap<i64, Vec<&NewEvent>> = BTreeMap::new();
        for event in events.iter().filter(in_window) {
            by_hour
                .entry(event.ts.as_millis() / HOUR * HOUR)
                .or_default()
                .push(event);
        }
        let series = store.events().usage_series(&filter, Bucket::Hour)?;
        assert_eq!(series.len(), by_hour.len());
        for group in series {
            let hour = by_hour
                .get(&group.group.as_millis())
                .ok_or("an hour without events")?;
            assert_eq!(spend(&group.totals), spend_of(hour.iter().copied()));
        }
    }
    Ok(())
}

#[rstest]
fn a_price_applies_from_its_time_on(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    set_table(&store)?;
    let change = T0 + 5 * HOUR;
    let mut before = NewEvent::new(ts(change - 1)?, "gpt-4o");
    before.prompt_tokens = 1_000_000;
    let mut at = before.clone();
    at.ts = ts(change)?;
    let first = store.events().record(&before)?;
    let second = store.events().record(&at)?;
    let listed = store.events().list(&EventFilter::default())?;
    let cost_of = |id| {
        listed
            .iter()
            .find(|event| event.id == id)
            .and_then(|event| event.cost)
            .map(|cost| cost.nanos())
    };
    // A million prompt tokens at 2.50, then at 1.875001.
    assert_eq!(cost_of(first), Some(2_500_000_000));
    assert_eq!(cost_of(second), Some(1_875_001_000));
    Ok(())
}

/// Events whose products of counts and prices do not fit a 64-bit integer
/// (the highest price, every count at its highest), and the two sides of
/// where PostgreSQL stops summing them as such, with the highest price on
/// every count and on the last alone: each costs exactly its recount,
/// alone and in a batch.
#[rstest]
fn the_largest_costs_are_exact(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let most = keytally::MAX_PRICE_MICROS;
    let prices = [("gpt-4o", [most; 5]), ("o3", [1, 2, 3, 4, most])];
    for (model, micros) in prices {
        store.prices().set(&PriceVersion {
            model: model.to_owned(),
            effective_from: ts(0)?,
            price: price(micros),
        })?;
    }
    let highest = i64::from(i32::MAX);
    // The largest count whose product with the highest price fits in
    // `i64::MAX - 500`.
    let fits = (i64::MAX - 500) / most;
    let cases = [
        ("gpt-4o", [highest; 5]),
        ("gpt-4o", [fits, 0, 0, 0, 0]),
        ("gpt-4o", [fits + 1, 0, 0, 0, 0]),
        ("gpt-4o", [fits / 2, fits - fits / 2, 0, 0, 0]),
        ("gpt-4o", [fits / 2, fits - fits / 2 + 1, 0, 0, 0]),
        ("o3", [highest; 5]),
        ("o3", [0, 0, 0, 0, fits]),
        ("o3", [0, 0, 0, 0, fits + 1]),
        ("o3", [fits + 1, 0, 0, 0, 0]),
    ];
    let mut events = Vec::new();
    for (model, counts) in cases {
        let mut event = NewEvent::new(ts(T0)?, model);
        [
            event.prompt_tokens,
            event.completion_tokens,
            event.cache_read_tokens,
            event.cache_creation_tokens,
            event.reasoning_tokens,
        ] = counts;
        events.push(event);
    }
    let mut ids = Vec::new();
    for event in &events {
        ids.push(store.events().record(event)?);
    }
    ids.extend(store.events().record_batch(&events)?);
    let listed = store.events().list(&EventFilter::default())?;
    for (id, (model, counts)) in ids.iter().zip(cases.iter().chain(&cases)) {
        let micros = prices
            .iter()
            .find(|(priced, _)| priced == model)
            .map(|(_, micros)| *micros)
            .ok_or("no price")?;
        let picos: i128 = counts
            .iter()
            .zip(micros)
            .map(|(&t, m)| i128::from(t) * i128::from(m))
            .sum();
        let expected = i64::try_from((picos + 500) / 1000)?;
        let cost = listed
            .iter()
            .find(|listed| listed.id == *id)
            .and_then(|listed| listed.cost)
            .map(|cost| cost.nanos());
        assert_eq!(cost, Some(expected), "{model} {counts:?}");
    }
    Ok(())
}

#[rstest]
fn a_price_never_changes_what_recorded_events_cost(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let mut event = NewEvent::new(ts(T0 + 2 * HOUR + 5)?, "mistral-large");
    event.prompt_tokens = 1_000;
    store.events().record(&event)?;
    let early = PriceVersion {
        model: "mistral-large".to_owned(),
        effective_from: ts(T0 + HOUR)?,
        price: price([2_000_000, 6_000_000, 0, 0, 0]),
    };
    // Before the event, in an earlier hour and in the event's own hour.
    for from in [T0 + HOUR, T0 + 2 * HOUR + 5] {
        let refused = store.prices().set(&PriceVersion {
            effective_from: ts(from)?,
            ..early.clone()
        });
        assert!(
            matches!(
                refused,
                Err(Error::InvalidInput {
                    field: "effective_from",
                    ..
                })
            ),
            "{refused:?}"
        );
    }
    assert!(
        store.prices().list()?.is_empty(),
        "a refused price was kept"
    );
    let window = UsageFilter::between(ts(T0)?, ts(T0 + 10 * HOUR)?);
    let totals = store.events().usage(&window)?;
    assert_eq!((totals.cost_nanos, totals.unpriced_requests), (0, 1));
    // Just after it is accepted, and applies to what comes next.
    let later = PriceVersion {
        effective_from: ts(T0 + 2 * HOUR + 6)?,
        ..early
    };
    store.prices().set(&later)?;
    assert_eq!(store.prices().list()?, vec![later]);
    let mut next = event.clone();
    next.ts = ts(T0 + 3 * HOUR)?;
    store.events().record(&next)?;
    let totals = store.events().usage(&window)?;
    assert_eq!(
        (totals.cost_nanos, totals.unpriced_requests),
        (2_000_000, 1)
    );
    // A whole file of prices is all or nothing.
    let mixed = [
        PriceVersion {
            model: "fresh-model".to_owned(),
            effective_from: ts(T0)?,
            price: price([1, 1, 1, 1, 1]),
        },
        PriceVersion {
            model: "mistral-large".to_owned(),
            effective_from: ts(T0)?,
            price: price([1, 1, 1, 1, 1]),
        },
    ];
    assert!(store.prices().set_all(&mixed).is_err());
    assert_eq!(store.prices().list()?.len(), 1);
    Ok(())
}

#[rstest]
fn out_of_range_prices_are_refused(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    for micros in [-1, keytally::MAX_PRICE_MICROS + 1] {
        let refused = store.prices().set(&PriceVersion {
            model: "gpt-4o".to_owned(),
            effective_from: ts(T0)?,
            price: price([0, micros, 0, 0, 0]),
        });
        assert!(
            matches!(refused, Err(Error::InvalidInput { field: "price", .. })),
            "{refused:?}"
        );
    }
    assert!(store.prices().list()?.is_empty());
    Ok(())
}

#[rstest]
fn the_binary_sets_prices_from_a_file_and_reports_spend(
    folder: tempfile::TempDir,
    #[values("toml", "json")] format: &str,
) -> TestResult {
    let db = folder.path().join("keytally.db");
    let file = folder.path().join(format!("prices.{format}"));
    let text = match format {
        // The cache's writes under either name.
        "toml" => "[[prices]]\nmodel = \"gpt-4o\"\nfrom = \"2026-11-01T00:00:00Z\"\nprompt = 2.50\ncompletion = \"10.00\"\ncache_write = 3.75\n\n[[prices]]\nmodel = \"o3\"\nfrom = \"1793491200000\"\nprompt = 2\n",
        _ => r#"{"prices": [{"model": "gpt-4o", "from": "2026-11-01T00:00:00Z", "prompt": 2.50, "completion": "10.00", "cache_creation": "3.75"}, {"model": "o3", "from": "1793491200000", "prompt": 2}]}"#,
    };
    std::fs::write(&file, text)?;
    let set = run(&db, &["prices", "set", "--file", path_arg(&file)?], "")?;
    assert!(set.status.success(), "{set:?}");
    let listed = json_of(&run(&db, &["prices", "list"], "")?)?;
    let listed = listed.as_array().ok_or("no list")?;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["model"], "gpt-4o");
    assert_eq!(listed[0]["prompt"], "2.50");
    assert_eq!(listed[0]["completion"], "10.00");
    assert_eq!(listed[0]["cache_creation"], "3.75");
    // As text, a table: each row as wide as the header, the prices under
    // theirs.
    let table = keytally(&["--db", path_arg(&db)?, "prices", "list"])?;
    assert!(table.status.success(), "{table:?}");
    let table = String::from_utf8(table.stdout)?;
    let widths: Vec<usize> = table.lines().map(str::len).collect();
    assert_eq!(widths.len(), 3, "{table}");
    assert!(widths.iter().all(|&width| width == widths[0]), "{table}");
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|row| row.ends_with("10.00        0.00        3.75        0.00")),
        "{table}"
    );
    let lines = "{\"ts\": \"2026-11-01T01:00:00Z\", \"model\": \"gpt-4o\", \"status\": 200, \"prompt_tokens\": 1000, \"completion_tokens\": 100}\n\
                 {\"ts\": \"2026-11-01T01:00:01Z\", \"model\": \"o3\", \"status\": 200, \"prompt_tokens\": 500}\n\
                 {\"ts\": \"2026-11-01T01:00:02Z\", \"model\": \"unpriced-model\", \"status\": 200, \"prompt_tokens\": 7}\n";
    let ingest = run(&db, &["events", "ingest"], lines)?;
    assert!(ingest.status.success(), "{ingest:?}");
    // Each event listed with its cost, or as unpriced.
    let listed = keytally(&["--db", path_arg(&db)?, "events", "list"])?;
    assert!(listed.status.success(), "{listed:?}");
    let listed = String::from_utf8(listed.stdout)?;
    let costs: Vec<&str> = listed
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .skip_while(|&word| word != "ms")
                .nth(1)
        })
        .collect();
    assert_eq!(costs, ["unpriced", "0.001", "0.0035"], "{listed}");
    let usage_args = [
        "events",
        "usage",
        "--since",
        "2026-11-01T00:00:00Z",
        "--until",
        "2026-11-02T00:00:00Z",
        "--by",
        "model",
    ];
    let usage = json_of(&run(&db, &usage_args, "")?)?;
    let rows = usage["rows"].as_array().ok_or("no rows")?;
    let row = |model: &str| rows.iter().find(|row| row["group"] == model).cloned();
    // 1,000 × 2.50 + 100 × 10.00 a million: 0.0035; 500 × 2.00: 0.001.
    assert_eq!(row("gpt-4o").ok_or("no gpt-4o")?["cost"], "0.0035");
    assert_eq!(row("o3").ok_or("no o3")?["cost"], "0.001");
    let unpriced = row("unpriced-model").ok_or("no unpriced-model")?;
    assert_eq!(unpriced["cost"], "0.00");
    assert_eq!(unpriced["unpriced_requests"], 1);
    // As text, the unpriced model's cost is not shown as 0.
    let table = keytally(&[&["--db", path_arg(&db)?][..], &usage_args].concat())?;
    assert!(table.status.success(), "{table:?}");
    let table = String::from_utf8(table.stdout)?;
    let cost_of = |model: &str| {
        table
            .lines()
            .find(|line| line.starts_with(&format!("{model} ")))
            .and_then(|line| line.split_whitespace().rev().nth(1))
            .map(str::to_owned)
    };
    assert_eq!(
        cost_of("unpriced-model").as_deref(),
        Some("unpriced"),
        "{table}"
    );
    assert_eq!(cost_of("o3").as_deref(), Some("0.001"), "{table}");
    // A price before those events is refused, and changes nothing.
    let refused = run(
        &db,
        &[
            "prices",
            "set",
            "--model",
            "o3",
            "--from",
            "2026-11-01T00:30:00Z",
            "--prompt",
            "9",
        ],
        "",
    )?;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let still = json_of(&run(&db, &["prices", "list"], "")?)?;
    assert_eq!(still.as_array().map(Vec::len), Some(2));
    Ok(())
}

#[rstest]
fn a_price_set_by_another_store_applies_to_the_next_event(folder: tempfile::TempDir) -> TestResult {
    // Two stores (two processes, as far as SQLite can tell) on one file:
    // the recording one holds the prices in memory from its first event.
    let path = folder.path().join("keytally.db");
    let recorder = keytally::Store::open(&path)?;
    let operator = keytally::Store::open(&path)?;
    let mut event = NewEvent::new(ts(T0)?, "gpt-4o");
    event.prompt_tokens = 1_000_000;
    recorder.events().record(&event)?;
    operator.prices().set(&PriceVersion {
        model: "gpt-4o".to_owned(),
        effective_from: ts(T0 + 1)?,
        price: price([3_000_000, 0, 0, 0, 0]),
    })?;
    event.ts = ts(T0 + 2)?;
    recorder.events().record(&event)?;
    let totals = recorder
        .events()
        .usage(&UsageFilter::between(ts(T0)?, ts(T0 + HOUR)?))?;
    assert_eq!(
        (totals.cost_nanos, totals.unpriced_requests),
        (3_000_000_000, 1)
    );
    Ok(())
}

#[rstest]
fn prices_set_while_events_are_recorded_always_match_their_costs(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    let store = store_on(backend);
    let model = "racing-model";
    // Every event gets the next millisecond; each price is set to take
    // effect a few events ahead of the newest, so recorders cross it while
    // the price is being set.
    let clock = AtomicI64::new(T0);
    let done = AtomicBool::new(false);
    let (accepted, refused) = std::thread::scope(|scope| {
        let recorders: Vec<_> = (0..3)
            .map(|_| {
                scope.spawn(|| -> Result<usize, Error> {
                    let mut recorded = 0;
                    while !done.load(Ordering::Acquire) {
                        let mut event =
                            NewEvent::new(ts(clock.fetch_add(1, Ordering::AcqRel))?, model);
                        event.prompt_tokens = 1_000;
                        store.events().record(&event)?;
                        recorded += 1;
                    }
                    Ok(recorded)
                })
            })
            .collect();
        let mut outcome = (0, 0);
        for round in 1..=60i64 {
            let ahead = clock.load(Ordering::Acquire) + round % 4;
            let version = PriceVersion {
                model: model.to_owned(),
                effective_from: ts(ahead)?,
                price: price([round * 1_000, 0, 0, 0, 0]),
            };
            match store.prices().set(&version) {
                Ok(()) => outcome.0 += 1,
                Err(Error::InvalidInput {
                    field: "effective_from",
                    ..
                }) => outcome.1 += 1,
                Err(error) => return Err(error.into()),
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        done.store(true, Ordering::Release);
        for recorder in recorders {
            recorder.join().map_err(|_| "a recorder panicked")??;
        }
        Ok::<_, Box<dyn std::error::Error>>(outcome)
    })?;
    eprintln!("{backend:?}: {accepted} prices set, {refused} refused as too late");
    assert!(accepted > 0, "no price was ever set");
    // Every event's cost is the one the final price table gives it.
    let versions = store.prices().list()?;
    let mut events = Vec::new();
    loop {
        let page = store.events().list(&EventFilter {
            limit: Some(10_000),
            before: events.last().map(keytally::Event::cursor),
            ..EventFilter::default()
        })?;
        if page.is_empty() {
            break;
        }
        events.extend(page);
    }
    assert!(events.len() > 100, "{} events", events.len());
    let mut mismatched = Vec::new();
    for event in &events {
        let in_force = versions
            .iter()
            .filter(|version| version.effective_from <= event.ts)
            .max_by_key(|version| version.effective_from)
            .map(|version| version.price.cost_of(event.token_counts()).nanos());
        if event.cost.map(|cost| cost.nanos()) != in_force {
            mismatched.push((event.ts, event.cost, in_force));
        }
    }
    assert!(
        mismatched.is_empty(),
        "{} events: {mismatched:?}",
        mismatched.len()
    );
    Ok(())
}
