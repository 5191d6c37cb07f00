//! One gateway process spending a key's budget, for keytally's budget test
//! across processes (`tests/it/budgets.rs`): several of these run at once
//! on one database (an SQLite file or a PostgreSQL URL).
//!
//! Usage: `budget_spender LOCATION KEY_ID MODEL MAX`, with the key's secret
//! on stdin. It waits for a line `go` on stdin, then serves one request at
//! a time: resolve the secret, and while it is accepted record an event of
//! 1,000 prompt tokens of MODEL for the key, at most MAX times. It writes
//! `recorded N` (the events it committed) and then `refused REJECTION` or
//! `stopped` (MAX reached).

use std::io::BufRead;

use keytally::{NewEvent, StoreOptions, Timestamp};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [location, key, model, max] = args.as_slice() else {
        return Err("usage: budget_spender LOCATION KEY_ID MODEL MAX".into());
    };
    let key = key.parse()?;
    let max: u64 = max.parse()?;
    let store = StoreOptions::new(location.as_str()).open()?;
    let mut lines = std::io::stdin().lock().lines();
    let secret = lines.next().ok_or("no secret on stdin")??;
    if lines.next().transpose()?.as_deref() != Some("go") {
        return Err("expected `go` on stdin".into());
    }
    let mut recorded = 0;
    let verdict = loop {
        if recorded == max {
            break "stopped".to_owned();
        }
        if let Err(rejection) = store.keys().resolve(&secret)? {
            break format!("refused {rejection}");
        }
        let mut event = NewEvent::new(Timestamp::now(), model.as_str());
        event.key_id = Some(key);
        event.prompt_tokens = 1_000;
        store.events().record(&event)?;
        recorded += 1;
    };
    println!("recorded {recorded}");
    println!("{verdict}");
    let _closed = store.close()?;
    Ok(())
}
