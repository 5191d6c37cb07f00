//! One replica of a gateway, for keytally's multi-replica test
//! (`tests/it/replicas.rs`): several of these run at once against one
//! PostgreSQL database, each with threads that resolve, record and change
//! keys, and report what they saw on stdout.
//!
//! Usage: `replica URL REPLICA REPLICAS MILLIS`, with the shared keys on
//! stdin, one `id secret` per line. Replica `r` revokes the keys whose
//! index is `r` modulo `REPLICAS` and rotates and updates those of the next
//! replica, so changes to one key race across processes. Lines written:
//!
//! - `ack REQUEST_ID` once an event is committed,
//! - `revoked KEY NANOS` once a revoke returned (wall clock, after commit),
//! - `accepted KEY NANOS` per key: the latest start of a resolve that
//!   accepted it,
//! - `error MESSAGE` for every error the store returned,
//! - `done` last.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keytally::{Error, KeyId, KeyUpdate, NewEvent, Rejection, Store, Timestamp};

type Report = Arc<Mutex<Vec<String>>>;

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos())
}

/// A small xorshift generator: each thread its own sequence.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, replica, replicas, millis] = args.as_slice() else {
        return Err("usage: replica URL REPLICA REPLICAS MILLIS".into());
    };
    let replica: usize = replica.parse()?;
    let replicas: usize = replicas.parse()?;
    let run_for = Duration::from_millis(millis.parse()?);
    let mut keys: Vec<(KeyId, String)> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let Some((id, secret)) = line.split_once(' ') else {
            continue;
        };
        keys.push((id.parse()?, secret.to_owned()));
    }
    let keys = Arc::new(keys);
    let store = Arc::new(Store::open(url)?);
    let report: Report = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let accepted: Arc<Mutex<HashMap<KeyId, u128>>> = Arc::default();
    let mut threads = Vec::new();

    for thread in 0..2usize {
        let (store, keys, report, stop) = (
            Arc::clone(&store),
            Arc::clone(&keys),
            Arc::clone(&report),
            Arc::clone(&stop),
        );
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9 + (replica * 10 + thread) as u64);
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let size = 1 + rng.below(5);
                let batch: Vec<NewEvent> = (0..size)
                    .map(|i| {
                        let mut event = NewEvent::new(Timestamp::now(), ["m1", "m2"][i % 2]);
                        event.key_id = Some(keys[rng.below(keys.len())].0);
                        event.request_id = Some(format!("r{replica}-t{thread}-{n}-{i}"));
                        event.prompt_tokens = rng.below(1000) as i64;
                        event.latency_ms = rng.below(500) as i64;
                        event.status = if rng.below(10) == 0 { 500 } else { 200 };
                        event
                    })
                    .collect();
                let outcome = if size == 1 {
                    store.events().record(&batch[0]).map(|_| ())
                } else {
                    store.events().record_batch(&batch).map(|_| ())
                };
                let mut lines = report.lock().unwrap_or_else(|e| e.into_inner());
                match outcome {
                    Ok(()) => {
                        for event in &batch {
                            lines.push(format!(
                                "ack {}",
                                event.request_id.as_deref().unwrap_or_default()
                            ));
                        }
                    }
                    Err(error) => lines.push(format!("error {}", error.report())),
                }
                n += 1;
            }
        }));
    }

    for thread in 0..2usize {
        let (store, keys, report, stop, accepted) = (
            Arc::clone(&store),
            Arc::clone(&keys),
            Arc::clone(&report),
            Arc::clone(&stop),
            Arc::clone(&accepted),
        );
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x51_7cc1 + (replica * 10 + thread) as u64);
            while !stop.load(Ordering::Relaxed) {
                let (id, secret) = &keys[rng.below(keys.len())];
                let started = nanos();
                match store.keys().resolve(secret) {
                    Ok(Ok(active)) => {
                        let mut accepted = accepted.lock().unwrap_or_else(|e| e.into_inner());
                        let latest = accepted.entry(active.id).or_insert(0);
                        *latest = (*latest).max(started);
                    }
                    Ok(Err(Rejection::Revoked)) => {}
                    Ok(Err(other)) => report
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("error {id} resolved as {other:?}")),
                    Err(error) => report
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("error {}", error.report())),
                }
            }
        }));
    }

    {
        let (store, keys, report, stop) = (
            Arc::clone(&store),
            Arc::clone(&keys),
            Arc::clone(&report),
            Arc::clone(&stop),
        );
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0xc0ff_ee00 + replica as u64);
            while !stop.load(Ordering::Relaxed) {
                let index = rng.below(keys.len());
                let id = keys[index].0;
                // Revokes are rarer than other changes, so they spread over
                // the whole run.
                let outcome = if index % replicas == replica && rng.below(8) == 0 {
                    store.keys().revoke(id).map(|_| {
                        report
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!("revoked {id} {}", nanos()));
                    })
                } else if index % replicas != replica {
                    // A long grace: the secret the resolvers present keeps
                    // working until the key is revoked.
                    let rotated = if rng.below(2) == 0 {
                        store
                            .keys()
                            .rotate(id, Duration::from_secs(3600))
                            .map(|_| ())
                    } else {
                        let update = KeyUpdate {
                            rate_limit_override: Some(Some(rng.below(100) as u32)),
                            ..KeyUpdate::default()
                        };
                        store.keys().update(id, &update).map(|_| ())
                    };
                    match rotated {
                        Err(Error::KeyRevoked { .. }) => Ok(()),
                        other => other,
                    }
                } else {
                    Ok(())
                };
                if let Err(error) = outcome {
                    report
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("error {}", error.report()));
                }
                std::thread::sleep(Duration::from_millis(5 + rng.below(20) as u64));
            }
        }));
    }

    let started = Instant::now();
    while started.elapsed() < run_for {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        if thread.join().is_err() {
            report
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push("error a thread panicked".to_owned());
        }
    }
    let store = Arc::try_unwrap(store).map_err(|_| "the store is still shared")?;
    if let Err(error) = store.close() {
        println!("error {}", error.report());
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in report.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        writeln!(out, "{line}")?;
    }
    for (id, latest) in accepted.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        writeln!(out, "accepted {id} {latest}")?;
    }
    writeln!(out, "done")?;
    Ok(())
}
