//! A random history of recordings, budget and price changes, prunes and
//! reopenings, made by two stores on one database, on both backends: after
//! every step the rollups (with their cost) and every budget's spend equal
//! a recount of the raw events, and a key is refused, by its row and by
//! either store's resolve, exactly when its spend has reached its budget.
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
//! 120 steps by default (`KEYTALLY_BUDGET_STEPS` for more); the seed is
//! in every failure, and `KEYTALLY_BUDGET_SEED` replays it.

use std::collections::HashMap;

use keytally::testing::store_on;
use keytally::{
    Backend, Budget, BudgetPeriod, Cost, EventFilter, KeyId, KeyUpdate, Micros, NewEvent, NewKey,
    Price, PriceVersion, Rejection, Store, Timestamp,
};
use rstest::rstest;

use crate::support::random::Rng;
use crate::support::spend::{all_events, another_store, budgets_hold, price_model};
use crate::support::sql::raw;
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

#[rstest]
fn a_random_history_keeps_every_budget_equal_to_a_recount(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let seed = setting("KEYTALLY_BUDGET_SEED").unwrap_or(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    );
    let steps = setting("KEYTALLY_BUDGET_STEPS").unwrap_or(120);
    let mut rng = Rng::new(seed);
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
            let budget = (n < 5).then(|| random_budget(&mut rng, now));
            let created = test.keys().create(&NewKey {
                budget,
                ..NewKey::client(format!("history {n}"))
            })?;
            Ok((created.key.id, created.secret.expose().to_owned()))
        })
        .collect::<Result<_, keytally::Error>>()?;
    let mut stores = [another_store(&test)?, another_store(&test)?];
    let mut raw = raw(&test)?;
    let (mut events, mut reached) = (0, 0);
    // The prompt price versions of each priced model, in time order, how
    // many were set as the history went, and gpt-5's last event.
    let epoch = Timestamp::from_millis(0)?;
    let mut versions: HashMap<&str, Vec<(Timestamp, Micros)>> = HashMap::from([
        ("gpt-4o", vec![(epoch, Micros(1_000_000))]),
        ("gpt-5", vec![(epoch, Micros(2_000_000))]),
    ]);
    let mut prices = 0;
    let mut last_gpt5: Option<Timestamp> = None;
    // The first hour whose raw events no prune has touched.
    let mut whole_from = 0;
    for step in 0..steps {
        let now = Timestamp::now();
        let n = rng.below(2) as usize;
        let store = &stores[n];
        let done = match rng.below(20) {
            0..=6 => {
                let event = random_event(&mut rng, &keys, now);
                store.events().record(&event)?;
                last_gpt5 = last_of_gpt5(last_gpt5, std::slice::from_ref(&event));
                events += 1;
                "recorded an event".to_owned()
            }
            7..=13 => {
                let batch: Vec<NewEvent> = (0..1 + rng.below(40))
                    .map(|_| random_event(&mut rng, &keys, now))
                    .collect();
                store.events().record_batch(&batch)?;
                last_gpt5 = last_of_gpt5(last_gpt5, &batch);
                events += batch.len();
                format!("recorded a batch of {}", batch.len())
            }
            14 | 15 => {
                let (key, _) = keys[rng.below(keys.len() as u64) as usize];
                let budget = (rng.below(5) > 0).then(|| random_budget(&mut rng, now));
                store.keys().update(
                    key,
                    &KeyUpdate {
                        budget: Some(budget),
                        ..KeyUpdate::default()
                    },
                )?;
                format!("set key {key}'s budget to {budget:?}")
            }
            16 | 17 => {
                // A new price of gpt-5, from after its last event, or from
                // at or before it: refused, since that event's cost would
                // no longer match the table.
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
                if refused {
                    assert!(
                        matches!(set, Err(keytally::Error::InvalidInput { .. })),
                        "seed {seed}, step {step}: a price from {from}, at or before an event \
                         at {last}: {set:?}"
                    );
                    format!("was refused a price of gpt-5 from {from}")
                } else {
                    set?;
                    prices += 1;
                    // A version from the same time is replaced.
                    let versions = versions.entry("gpt-5").or_default();
                    versions.retain(|(at, _)| *at != from);
                    versions.push((from, prompt));
                    versions.sort_by_key(|(at, _)| *at);
                    format!("priced gpt-5 at {prompt:?} from {from}")
                }
            }
            18 => {
                let before = ancient(now);
                let pruned = store.events().prune(before, 1_000)?;
                whole_from = before.as_millis() / HOUR + 1;
                format!("pruned {pruned:?}")
            }
            _ => {
                stores[n] = another_store(&test)?;
                "reopened".to_owned()
            }
        };
        let what = format!("seed {seed}, step {step}, store {n} {done}");
        assert_eq!(
            raw.rollups_against_recount_from(whole_from)?,
            0,
            "{what}: the rollups"
        );
        let checked = budgets_hold(&stores[0], &mut raw, 0, &what)?;
        reached += checked.reached;
        resolves_agree(&stores, &keys, &what)?;
        if step % 10 == 9 || step + 1 == steps {
            costs_follow_the_prices(&stores[0], &versions, &what)?;
        }
    }
    assert!(events > 0 && reached > 0, "{events} events, {reached}");
    eprintln!(
        "budget history on {backend:?}, seed {seed}: {steps} steps, {events} events, \
         {reached} budgets found reached, {prices} prices set"
    );
    Ok(())
}
