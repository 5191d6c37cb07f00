//! The child process of keytally's crash tests (`tests/it/crash.rs`): it
//! writes to the store at the path given as its first argument until it is
//! killed, and reports each write on stdout only after it was committed:
//!
//! - `key <id>` after a key was created,
//! - `batch <n>` after the 20 events with request ids `b<n>-0` .. `b<n>-19`
//!   were committed in one batch.
//!
//! Batch numbers start at the second argument, so that runs after a kill do
//! not reuse numbers a killed run may have committed without reporting.

use std::io::Write;

use keytally::{NewEvent, NewKey, Store, Timestamp};

/// Events per batch.
const BATCH: u64 = 20;

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
            let created = store
                .keys()
                .create(&NewKey::client(format!("crash {batch}")))?;
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
