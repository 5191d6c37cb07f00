//! Measures how long a revoke committed by one replica takes to be refused
//! by another in notified mode: `notify_latency URL|PATH [TRIALS]`, on an
//! empty (or keytally) PostgreSQL database or an SQLite file. Each trial creates a key on one store,
//! resolves it on a notified store until it is answered from memory,
//! revokes it on the first, and times the notified store's resolves from
//! the revoke's return to the first refusal. Prints one JSON line, in
//! microseconds.

use std::time::Instant;

use keytally::{NewKey, Rejection, ResolveMode, Store, StoreOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or("usage: notify_latency URL|PATH [TRIALS]")?;
    let trials: usize = args.next().map_or(Ok(200), |n| n.parse())?;
    let replica = StoreOptions::new(&url)
        .resolve_mode(ResolveMode::Notified)
        .open()?;
    let other = Store::open(&url)?;
    let mut latencies = Vec::with_capacity(trials);
    for i in 0..trials {
        let created = other
            .keys()
            .create(&NewKey::client(format!("latency {i}")))?;
        let secret = created.secret.expose().to_owned();
        for _ in 0..3 {
            if replica.keys().resolve(&secret)?.is_err() {
                return Err("a fresh key was refused".into());
            }
        }
        other.keys().revoke(created.key.id)?;
        let revoked = Instant::now();
        loop {
            match replica.keys().resolve(&secret)? {
                Err(Rejection::Revoked) => break,
                Ok(_) => std::hint::spin_loop(),
                Err(other) => return Err(format!("{other:?}").into()),
            }
        }
        latencies.push(revoked.elapsed().as_micros() as u64);
    }
    latencies.sort_unstable();
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!(
        "{{\"trials\":{trials},\"p50_us\":{},\"p99_us\":{},\"max_us\":{}}}",
        at(0.5),
        at(0.99),
        latencies[latencies.len() - 1]
    );
    let _ = replica.close()?;
    let _ = other.close()?;
    Ok(())
}
