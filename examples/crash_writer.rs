//! The child process of keytally's crash tests (`tests/it/crash.rs`): it
//! writes to the store at the path given as its first argument until it is
//! killed, and reports each write on stdout only after it was committed:
//!
//! - `key <id>` after a key was created (with a budget),
//! - `batch <n>` after the 20 events with request ids `b<n>-0` .. `b<n>-19`
//!   were committed in one batch.
//!
//! Batch numbers start at the second argument, so that runs after a kill do
//! not reuse numbers a killed run may have committed without reporting.

use std::io::Write;

use keytally::{Budget, BudgetPeriod, Cost, NewEvent, NewKey, Store, Timestamp};

/// Events per batch.
const BATCH: u64 = 20;

/// Each key's budget: 0.0005 a day, soft 0.0002. At the 1.00 a million
/// prompt tokens the test prices `crash-model` at, a batch costs 0.00019,
/// so a key reaches its soft limit in its second batch and its budget in
/// its third, of up to seven.
fn budget() -> Budget {
    Budget {
        limit: Cost(500_000),
        soft_limit: Some(Cost(200_000)),
        period: BudgetPeriod::Day,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: crash_writer DB FIRST_BATCH")?;
    let mut batch: u64 = args
        .next()
        .ok_or("usage: crash_writer DB FIRST_BATCH")?
        .parse()?;
    let store = Store::open(&path)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut key_id = None;
    loop {
        if batch % 7 == 0 || key_id.is_none() {
            let created = store.keys().create(&NewKey {
                budget: Some(budget()),
                ..NewKey::client(format!("crash {batch}"))
            })?;
            key_id = Some(created.key.id);
            writeln!(out, "key {}", created.key.id)?;
            out.flush()?;
        }
        let events: Vec<NewEvent> = (0..BATCH)
            .map(|i| -> Result<NewEvent, keytally::Error> {
                let mut event = NewEvent::new(Timestamp::now(), "crash-model");
                event.key_id = key_id;
                event.request_id = Some(format!("b{batch}-{i}"));
                event.prompt_tokens = i as i64;
                Ok(event)
            })
            .collect::<Result<_, _>>()?;
        store.events().record_batch(&events)?;
        writeln!(out, "batch {batch}")?;
        out.flush()?;
        batch += 1;
    }
}
