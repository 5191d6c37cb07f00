//! What a budget's kept spend must equal: the test's own recount of the
//! key's raw events. Shared by the budget tests, the random budget
//! histories, and the fault, backup, contention and replica tests, which
//! check it on whatever a fault or a race left.

use diesel::sql_types::{BigInt, Binary, Nullable};
use diesel::QueryableByName;
use keytally::testing::TestStore;
use keytally::{
    Cost, Event, EventFilter, KeyId, Micros, Price, PriceVersion, Store, StoreOptions, Timestamp,
};

use crate::support::sql::Raw;

/// A second store on the same database: another gateway process or
/// replica, as far as the database can tell.
pub fn another_store(test: &TestStore) -> keytally::Result<Store> {
    match test.database_url() {
        Some(url) => StoreOptions::new(url).open(),
        None => Store::open(test.folder().join("keytally.db")),
    }
}

/// Prices `model` at 1.00 a million prompt tokens from the epoch on: an
/// event of 1,000 prompt tokens costs 0.001 (1,000,000 nanos).
pub fn price_model(store: &Store, model: &str) -> keytally::Result<()> {
    store.prices().set(&PriceVersion {
        model: model.to_owned(),
        effective_from: Timestamp::from_millis(0)?,
        price: Price {
            prompt: Micros(1_000_000),
            ..Price::default()
        },
    })
}

/// Every event `filter` matches, newest first, read a page of 10,000 at a
/// time (`filter`'s page size and cursor are ignored).
pub fn all_events(store: &Store, filter: &EventFilter) -> keytally::Result<Vec<Event>> {
    let mut filter = EventFilter {
        limit: Some(10_000),
        before: None,
        ..filter.clone()
    };
    let mut events = Vec::new();
    loop {
        let page = store.events().list(&filter)?;
        let Some(last) = page.last() else {
            return Ok(events);
        };
        filter.before = Some(last.cursor());
        events.extend(page);
    }
}

/// What the key's events from `since` on, and before `until` if given,
/// cost, by the test's own count over the raw events.
pub fn recount(
    store: &Store,
    key: KeyId,
    since: Timestamp,
    until: Option<Timestamp>,
) -> keytally::Result<i64> {
    let filter = EventFilter {
        key: Some(key),
        since: Some(since),
        until,
        ..EventFilter::default()
    };
    Ok(all_events(store, &filter)?
        .iter()
        .filter_map(|event| event.cost.map(Cost::nanos))
        .sum())
}

#[derive(QueryableByName)]
struct Budgeted {
    #[diesel(sql_type = BigInt)]
    row_id: i64,
    #[diesel(sql_type = Binary)]
    id: KeyId,
    #[diesel(sql_type = Nullable<BigInt>)]
    over_budget_until: Option<i64>,
}

/// What [`budgets_hold`] checked.
#[derive(Debug, Default)]
pub struct Checked {
    /// Budgets checked.
    pub budgets: usize,
    /// Those of them reached.
    pub reached: usize,
    /// The greatest row id of a key checked (`after` if none was).
    pub last_row_id: i64,
}

/// Checks the budgets of `store`'s keys whose row id is greater than
/// `after`: each one's spend in the current period equals a recount of the
/// key's events in that period (but those over five minutes ahead of the
/// clock, which spend nothing when recorded), and the key is refused (its
/// `over_budget_until` ahead) exactly when that spend has reached the
/// budget.
pub fn budgets_hold(
    store: &Store,
    raw: &mut Raw,
    after: i64,
    what: &str,
) -> Result<Checked, Box<dyn std::error::Error>> {
    let budgeted: Vec<Budgeted> = raw.load(&format!(
        "SELECT k.row_id, k.id, k.over_budget_until FROM keys AS k \
         JOIN key_budgets AS b ON b.key_row_id = k.row_id WHERE k.row_id > {after}"
    ))?;
    let now = Timestamp::now().as_millis();
    let mut checked = Checked {
        last_row_id: after,
        ..Checked::default()
    };
    for key in &budgeted {
        let status = store
            .keys()
            .budget(key.id)?
            .ok_or_else(|| format!("{what}: key {} lost its budget", key.id))?;
        // An event more than five minutes ahead of the clock when it was
        // recorded spends nothing: none is counted that is that far ahead
        // now.
        let horizon = Timestamp::from_millis(now + 5 * 60 * 1000 + 1)?;
        let until = status.resets_at.min(horizon);
        let counted = recount(store, key.id, status.period_start, Some(until))?;
        assert_eq!(
            status.spend,
            Cost(counted),
            "{what}: key {}'s spend differs from a recount of its events",
            key.id
        );
        let refused = key.over_budget_until.is_some_and(|until| until > now);
        assert_eq!(
            refused, status.over_budget,
            "{what}: key {} spent {} of {} and is refused: {refused}",
            key.id, status.spend, status.budget.limit
        );
        checked.budgets += 1;
        checked.reached += usize::from(status.over_budget);
        checked.last_row_id = checked.last_row_id.max(key.row_id);
    }
    Ok(checked)
}
