//! A random history of recordings, budget and price changes, prunes and
//! reopenings, made by two stores on one database, on both backends: after
//! every step the rollups (with their cost) and every budget's spend equal
//! a recount of the raw events, a key is refused, by its row and by either
//! store's resolve, exactly when its spend has reached its budget, and
//! (every tenth step) each event's cost is what the prices say. Then the
//! same steps taken at once by three writers, checked at the end.
//!
//! The events are of now, late (up to three days back, some before their
//! key's period), from before every period (which prunes remove), from a
//! little ahead of the clock, and from an hour ahead (too far to count);
//! most are priced. No period ends within minutes of now (an event a
//! little ahead of the clock would start the next one, which is not the
//! one a status of now shows): one began 71 hours ago, so that its events
//! span the hours after which SQLite folds a key's rollups into its budget
//! row.
//!
//! 120 steps by default, per writer (`KEYTALLY_BUDGET_STEPS` for more);
//! the seed is in every failure, and `KEYTALLY_BUDGET_SEED` replays the
//! history in turn (the writers at once interleave as they will).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use keytally::testing::{store_on, TestStore};
use keytally::{
    Backend, Budget, BudgetPeriod, Cost, EventFilter, KeyId, KeyUpdate, Micros, NewEvent, NewKey,
    Price, PriceVersion, Rejection, Store, Timestamp,
};
use rstest::rstest;

use crate::support::random::Rng;
use crate::support::spend::{all_events, another_store, budgets_hold, price_model};
use crate::support::sql::{raw, Raw};
use crate::TestResult;

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

fn setting(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|n| n.parse().ok())
}

/// A limit of 0.005 to 0.1 (five to a hundred events of 1,000 tokens), a
/// soft limit at half of it half the time, and a period: a number of days
/// whose current one began 30 minutes, 71 hours or 3 days and 3 hours ago,
/// or whose first begins in an hour; or a calendar day or month, unless
/// the next one begins within 10 minutes.
fn random_budget(rng: &mut Rng, now: Timestamp) -> Budget {
    let limit = (5 + rng.below(96) as i64) * 1_000_000;
    let days = |days, from| BudgetPeriod::Days { days, from };
    let period = match rng.below(6) {
        0 => days(1, now.plus_millis(-DAY - 30 * MINUTE)),
        1 => days(3, now.plus_millis(-71 * HOUR)),
        2 => days(2, now.plus_millis(HOUR)),
        3 => days(7, now.plus_millis(-10 * DAY - 3 * HOUR)),
        4 => BudgetPeriod::Day,
        _ => BudgetPeriod::Month,
    };
    let soon = now.plus_millis(10 * MINUTE);
    let period = if period.start_of(soon) == period.start_of(now) {
        period
    } else {
        days(1, now.plus_millis(-DAY - 30 * MINUTE))
    };
    Budget {
        limit: Cost(limit),
        soft_limit: (rng.below(2) == 0).then_some(Cost(limit / 2)),
        period,
    }
}

/// A time before the current period of every budget the history sets:
/// four days ago, or the start of the month if that is earlier.
fn ancient(now: Timestamp) -> Timestamp {
    let days_ago = now.plus_millis(-4 * DAY);
    BudgetPeriod::Month
        .start_of(now)
        .map_or(days_ago, |month| month.min(days_ago))
}

/// An event of one of `keys`, of 0 to 3,000 prompt tokens.
fn random_event(rng: &mut Rng, keys: &[(KeyId, String)], now: Timestamp) -> NewEvent {
    let offset = match rng.below(20) {
        0..=9 => rng.below(2_000) as i64,
        10..=15 => -(rng.below(72 * HOUR as u64) as i64),
        16 => ancient(now).as_millis() - now.as_millis() - rng.below(2 * DAY as u64) as i64 - 1,
        17 => HOUR,
        _ => rng.below(4 * MINUTE as u64) as i64,
    };
    // `gpt-5`'s price changes as the history goes on: its events are of
    // now, so that a new price from after the last of them applies to the
    // next ones.
    let (model, offset) = match rng.below(10) {
        0 | 1 => ("free-model", offset),
        2 | 3 => ("gpt-5", rng.below(2_000) as i64),
        _ => ("gpt-4o", offset),
    };
    let mut event = NewEvent::new(now.plus_millis(offset), model);
    event.key_id = Some(keys[rng.below(keys.len() as u64) as usize].0);
    event.prompt_tokens = rng.below(3_000) as i64;
    event
}

/// The later of `last` and the last of `events` of gpt-5.
fn last_of_gpt5(last: Option<Timestamp>, events: &[NewEvent]) -> Option<Timestamp> {
    events
        .iter()
        .filter(|event| event.model == "gpt-5")
        .map(|event| event.ts)
        .chain(last)
        .max()
}

/// Each store's resolve refuses a key for its budget exactly when the
/// key's spend in the period has reached it.
fn resolves_agree(stores: &[Store], keys: &[(KeyId, String)], what: &str) -> TestResult {
    for (key, secret) in keys {
        let over = stores[0]
            .keys()
            .budget(*key)?
            .is_some_and(|status| status.over_budget);
        for (n, store) in stores.iter().enumerate() {
            let resolved = store.keys().resolve(secret)?;
            assert!(
                matches!(resolved, Ok(_) | Err(Rejection::OverBudget)),
                "{what}: {resolved:?}"
            );
            assert_eq!(
                resolved.is_err(),
                over,
                "{what}: store {n} resolves key {key} as {resolved:?}"
            );
        }
    }
    Ok(())
}

/// Every event's cost is what its model's prompt price in force at its
/// time (the last of its `versions` from at or before it) makes of its
/// tokens; the unpriced model's events have none.
fn costs_follow_the_prices(
    store: &Store,
    versions: &HashMap<&str, Vec<(Timestamp, Micros)>>,
    what: &str,
) -> TestResult {
    for event in all_events(store, &EventFilter::default())? {
        let expected = versions.get(event.event.model.as_str()).map(|versions| {
            let prompt = versions
                .iter()
                .rev()
                .find(|(from, _)| *from <= event.event.ts)
                .map_or(Micros(0), |(_, prompt)| *prompt);
            Price {
                prompt,
                ..Price::default()
            }
            .cost_of(event.event.token_counts())
        });
        assert_eq!(event.cost, expected, "{what}: event {:?}", event.id);
    }
    Ok(())
}

/// What a history made so far, shared by its writers.
struct Made {
    /// The prompt price versions of each priced model, in time order.
    versions: HashMap<&'static str, Vec<(Timestamp, Micros)>>,
    /// The time of gpt-5's last event recorded.
    last_gpt5: Option<Timestamp>,
    /// The first hour whose raw events no prune has touched.
    whole_from: i64,
    events: usize,
    prices: usize,
}

/// One step of a history: what it did, or that the store is to be
/// reopened.
enum Step {
    Did(String),
    Reopen,
}

type StepResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A random step by `store`. Only with `may_price` does it set prices;
/// with `alone` (no other writer) a price from after gpt-5's last event
/// must be taken.
fn step(
    rng: &mut Rng,
    store: &Store,
    keys: &[(KeyId, String)],
    made: &Mutex<Made>,
    may_price: bool,
    alone: bool,
) -> StepResult<Step> {
    let made = || made.lock().unwrap_or_else(PoisonError::into_inner);
    let now = Timestamp::now();
    let done = match rng.below(20) {
        0..=6 => {
            let event = random_event(rng, keys, now);
            store.events().record(&event)?;
            let mut made = made();
            made.last_gpt5 = last_of_gpt5(made.last_gpt5, std::slice::from_ref(&event));
            made.events += 1;
            "recorded an event".to_owned()
        }
        7..=13 => {
            let batch: Vec<NewEvent> = (0..1 + rng.below(40))
                .map(|_| random_event(rng, keys, now))
                .collect();
            store.events().record_batch(&batch)?;
            let mut made = made();
            made.last_gpt5 = last_of_gpt5(made.last_gpt5, &batch);
            made.events += batch.len();
            format!("recorded a batch of {}", batch.len())
        }
        14 | 15 => {
            let (key, _) = keys[rng.below(keys.len() as u64) as usize];
            let budget = (rng.below(5) > 0).then(|| random_budget(rng, now));
            store.keys().update(
                key,
                &KeyUpdate {
                    budget: Some(budget),
                    ..KeyUpdate::default()
                },
            )?;
            format!("set key {key}'s budget to {budget:?}")
        }
        16 | 17 if may_price => {
            // A new price of gpt-5, from after its last event, or from at
            // or before it: refused, since that event's cost would no
            // longer match the table.
            let last_gpt5 = made().last_gpt5;
            let last = last_gpt5.unwrap_or(now);
            let refused = last_gpt5.is_some() && rng.below(3) == 0;
            let from = if refused {
                last.plus_millis(-(rng.below(1_000) as i64))
            } else {
                last.max(now).plus_millis(1 + rng.below(300) as i64)
            };
            let prompt = Micros(500_000 * (1 + rng.below(6) as i64));
            let set = store.prices().set(&PriceVersion {
                model: "gpt-5".to_owned(),
                effective_from: from,
                price: Price {
                    prompt,
                    ..Price::default()
                },
            });
            match set {
                Ok(()) => {
                    assert!(!refused, "a price from {from}, before an event at {last}");
                    let mut made = made();
                    made.prices += 1;
                    // A version from the same time is replaced.
                    let versions = made.versions.entry("gpt-5").or_default();
                    versions.retain(|(at, _)| *at != from);
                    versions.push((from, prompt));
                    versions.sort_by_key(|(at, _)| *at);
                    format!("priced gpt-5 at {prompt:?} from {from}")
                }
                // Another writer may have recorded a later event since.
                Err(keytally::Error::InvalidInput { .. }) if refused || !alone => {
                    format!("was refused a price of gpt-5 from {from}")
                }
                Err(error) => return Err(error.into()),
            }
        }
        16 | 17 => "nothing".to_owned(),
        18 => {
            let before = ancient(now);
            let pruned = store.events().prune(before, 1_000)?;
            let mut made = made();
            made.whole_from = made.whole_from.max(before.as_millis() / HOUR + 1);
            format!("pruned {pruned:?}")
        }
        _ => return Ok(Step::Reopen),
    };
    Ok(Step::Did(done))
}

/// A history's database, its keys (with their secrets), and what it made.
type Setup = (TestStore, Vec<(KeyId, String)>, Mutex<Made>);

/// A database with gpt-4o at 1.00 and gpt-5 at 2.00 a million prompt
/// tokens, and six keys, five of them with a random budget.
fn history_store(backend: Backend, rng: &mut Rng) -> Result<Setup, Box<dyn std::error::Error>> {
    let test = store_on(backend);
    price_model(&test, "gpt-4o")?;
    test.prices().set(&PriceVersion {
        model: "gpt-5".to_owned(),
        effective_from: Timestamp::from_millis(0)?,
        price: Price {
            prompt: Micros(2_000_000),
            ..Price::default()
        },
    })?;
    let now = Timestamp::now();
    let keys: Vec<(KeyId, String)> = (0..6)
        .map(|n| {
            // The last key starts without a budget.
            let budget = (n < 5).then(|| random_budget(rng, now));
            let created = test.keys().create(&NewKey {
                budget,
                ..NewKey::client(format!("history {n}"))
            })?;
            Ok((created.key.id, created.secret.expose().to_owned()))
        })
        .collect::<Result<_, keytally::Error>>()?;
    let epoch = Timestamp::from_millis(0)?;
    let made = Mutex::new(Made {
        versions: HashMap::from([
            ("gpt-4o", vec![(epoch, Micros(1_000_000))]),
            ("gpt-5", vec![(epoch, Micros(2_000_000))]),
        ]),
        last_gpt5: None,
        whole_from: 0,
        events: 0,
        prices: 0,
    });
    Ok((test, keys, made))
}

/// Everything a history must leave: the rollups and every budget equal to
/// a recount, refusals as the spends say, and every event's cost as the
/// prices say (only every tenth step, with `costs`). Returns the budgets
/// found reached.
fn history_holds(
    stores: &[Store],
    raw: &mut Raw,
    keys: &[(KeyId, String)],
    made: &Mutex<Made>,
    costs: bool,
    what: &str,
) -> Result<usize, Box<dyn std::error::Error>> {
    let made = made.lock().unwrap_or_else(PoisonError::into_inner);
    assert_eq!(
        raw.rollups_against_recount_from(made.whole_from)?,
        0,
        "{what}: the rollups"
    );
    let checked = budgets_hold(&stores[0], raw, 0, what)?;
    resolves_agree(stores, keys, what)?;
    if costs {
        costs_follow_the_prices(&stores[0], &made.versions, what)?;
    }
    Ok(checked.reached)
}

fn seed() -> Result<u64, Box<dyn std::error::Error>> {
    Ok(setting("KEYTALLY_BUDGET_SEED").unwrap_or(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    ))
}

#[rstest]
fn a_random_history_keeps_every_budget_equal_to_a_recount(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let seed = seed()?;
    let steps = setting("KEYTALLY_BUDGET_STEPS").unwrap_or(120);
    let mut rng = Rng::new(seed);
    let (test, keys, made) = history_store(backend, &mut rng)?;
    let mut stores = [another_store(&test)?, another_store(&test)?];
    let mut raw = raw(&test)?;
    let mut reached = 0;
    for step_number in 0..steps {
        let n = rng.below(2) as usize;
        let done = match step(&mut rng, &stores[n], &keys, &made, true, true)
            .map_err(|error| format!("seed {seed}, step {step_number}: {error}"))?
        {
            Step::Did(done) => done,
            Step::Reopen => {
                stores[n] = another_store(&test)?;
                "reopened".to_owned()
            }
        };
        let what = format!("seed {seed}, step {step_number}, store {n} {done}");
        let costs = step_number % 10 == 9 || step_number + 1 == steps;
        reached += history_holds(&stores, &mut raw, &keys, &made, costs, &what)?;
    }
    let made = made.lock().unwrap_or_else(PoisonError::into_inner);
    assert!(
        made.events > 0 && reached > 0,
        "{} events, {reached}",
        made.events
    );
    eprintln!(
        "budget history on {backend:?}, seed {seed}: {steps} steps, {} events, \
         {reached} budgets found reached, {} prices set",
        made.events, made.prices
    );
    Ok(())
}

/// Three writers, each a store of its own, take their random steps at
/// once (only the first sets prices); then everything holds as after a
/// history in turn.
#[rstest]
fn random_histories_at_once_keep_every_budget_equal_to_a_recount(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let seed = seed()?;
    let steps = setting("KEYTALLY_BUDGET_STEPS").unwrap_or(120);
    let mut rng = Rng::new(seed);
    let (test, keys, made) = history_store(backend, &mut rng)?;
    let test = &test;
    let (keys, made) = (&keys, &made);
    std::thread::scope(|scope| -> TestResult {
        let writers: Vec<_> = (0..3u64)
            .map(|writer| {
                scope.spawn(move || -> Result<(), String> {
                    let mut rng = Rng::new(seed ^ (writer + 1).wrapping_mul(0x9E37_79B9));
                    let mut store = another_store(test).map_err(|e| e.report())?;
                    for step_number in 0..steps {
                        let stepped = step(&mut rng, &store, keys, made, writer == 0, false)
                            .map_err(|error| {
                                format!("seed {seed}, writer {writer}, step {step_number}: {error}")
                            })?;
                        if let Step::Reopen = stepped {
                            store = another_store(test).map_err(|e| e.report())?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for writer in writers {
            writer.join().map_err(|_| "a writer panicked")??;
        }
        Ok(())
    })?;
    let stores = [another_store(test)?, another_store(test)?];
    let mut raw = raw(test)?;
    let what = format!("seed {seed}, after {steps} steps of three writers");
    let reached = history_holds(&stores, &mut raw, keys, made, true, &what)?;
    let made = made.lock().unwrap_or_else(PoisonError::into_inner);
    eprintln!(
        "budget histories at once on {backend:?}, seed {seed}: {} events, \
         {reached} budgets reached, {} prices set",
        made.events, made.prices
    );
    Ok(())
}
