//! The keytally workload (see the project's benchmark spec): the same logical
//! work as the raw-SQLite reference, through keytally's public API and its
//! real store (pragmas, permissions, migrations, pool). Prints one JSON line.
//!
//! `cargo bench --bench workload -- --keys 100000 --events 1000000`
//!
//! `--db postgres://…` runs it on PostgreSQL instead, in that (empty)
//! database; `benches/postgres-pair.sh` starts a throwaway cluster and runs
//! it beside the hand-written PostgreSQL reference.
//!
//! `--prices` prices every model before the load, so events carry a cost;
//! `--budgets` does that too and gives every key a budget (one period from
//! the first event on, never reached), so every event with a key adds to
//! its key's spend and every resolve reads a budget.
//!
//! `--phases` prints a line on stderr at the start and end of each timed
//! phase: `phase NAME start|end SECONDS WRITTEN`, SECONDS since the Unix
//! epoch (the clock `perf record -k realtime` stamps samples with) and
//! WRITTEN the bytes the machine's disks have written so far
//! (`/sys/block/*/stat`; 0 where unreadable). `benches/profile` uses them.
//!
//! The load goes through `record_batch`, 10,000 events per call (`--batch`
//! to change it): a transaction that large dirties each page of the random
//! indexes once for many events instead of once or twice per event.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keytally::{
    Backend, Budget, BudgetPeriod, Cost, KeyId, Micros, NewEvent, NewKey, Price, PriceVersion,
    ResolveMode, StoreOptions, Timestamp, UsageFilter, MAX_PERIOD_DAYS,
};

const MODELS: [&str; 8] = [
    "gpt-4o",
    "gpt-4o-mini",
    "o3",
    "o4-mini",
    "claude-sonnet-4",
    "claude-opus-4",
    "gemini-2.5-pro",
    "gpt-4.1",
];
/// The reference's first event time, in ms.
const T0: i64 = 1_790_000_000_000;
/// Events per `record_batch` call in the load, unless `--batch` says.
const DEFAULT_BATCH: u64 = 10_000;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }

    fn range(&mut self, low: i64, high: i64) -> i64 {
        low + self.below((high - low) as u64) as i64
    }
}

fn event(rng: &mut Rng, keys: &[KeyId], ts: i64) -> BenchResult<NewEvent> {
    let model = MODELS[rng.below(MODELS.len() as u64) as usize];
    let mut event = NewEvent::new(Timestamp::from_millis(ts)?, model);
    event.key_id = Some(keys[rng.below(keys.len() as u64) as usize]);
    event.upstream_model = Some(model.to_owned());
    event.prompt_tokens = rng.range(10, 4000);
    event.completion_tokens = rng.range(1, 2000);
    event.status = 200;
    event.latency_ms = rng.range(50, 5000);
    Ok(event)
}

fn arg(args: &[String], name: &str, default: u64) -> BenchResult<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args
            .get(i + 1)
            .ok_or(format!("{name} needs a value"))?
            .parse()?),
        None => Ok(default),
    }
}

/// Marks the edges of the timed phases on stderr, if asked (`--phases`).
struct Phases(bool);

impl Phases {
    fn mark(&self, name: &str, edge: &str) {
        if !self.0 {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        eprintln!("phase {name} {edge} {now:.6} {}", disk_bytes_written());
    }
}

/// Bytes written by the machine's disks since boot: sectors written
/// (`/sys/block/DEV/stat`, seventh field, 512 bytes each) summed over the
/// block devices that are not loop or RAM devices.
fn disk_bytes_written() -> u64 {
    let Ok(devices) = std::fs::read_dir("/sys/block") else {
        return 0;
    };
    devices
        .flatten()
        .filter(|device| {
            let name = device.file_name();
            let name = name.to_string_lossy();
            !name.starts_with("loop") && !name.starts_with("ram")
        })
        .filter_map(|device| std::fs::read_to_string(device.path().join("stat")).ok())
        .filter_map(|stat| stat.split_whitespace().nth(6)?.parse::<u64>().ok())
        .sum::<u64>()
        * 512
}

/// The `p` quantile of the samples (0 when there are none).
fn percentile(samples: &mut [u64], p: f64) -> u64 {
    samples.sort_unstable();
    let last = samples.len().saturating_sub(1);
    samples
        .get((last as f64 * p) as usize)
        .copied()
        .unwrap_or(0)
}

fn main() -> BenchResult<()> {
    let args: Vec<String> = std::env::args().collect();
    let n_keys = arg(&args, "--keys", 100_000)?.max(100);
    let batch_len = arg(&args, "--batch", DEFAULT_BATCH)?.clamp(1, 100_000) as usize;
    let n_events = arg(&args, "--events", 1_000_000)?.max(batch_len as u64);
    let n_resolve = arg(&args, "--resolves", 200_000)?;
    let n_single = arg(&args, "--singles", 20_000)?;
    let n_usage = arg(&args, "--usage-queries", 20_000)?;
    // At least one second: the figures are per second of the mixed run.
    let mixed_seconds = arg(&args, "--mixed-seconds", 5)?.max(1);
    let phases = Phases(args.iter().any(|a| a == "--phases"));

    let folder = tempfile::tempdir()?;
    let path = folder.path().join("keytally.db");
    let url = args
        .iter()
        .position(|a| a == "--db")
        .and_then(|i| args.get(i + 1))
        .cloned();
    // `--notified`: resolves answered from memory are confirmed by the
    // key-change listener (PostgreSQL) instead of a read per resolve.
    let mode = if args.iter().any(|a| a == "--notified") {
        ResolveMode::Notified
    } else {
        ResolveMode::Strict
    };
    let options =
        StoreOptions::new(url.as_deref().map_or(path.as_path(), Path::new)).resolve_mode(mode);
    let store = Arc::new(options.open()?);
    let postgres = store.backend() == Backend::Postgres;
    let mut rng = Rng(7);
    let budgets = args.iter().any(|a| a == "--budgets");
    let prices = budgets || args.iter().any(|a| a == "--prices");
    if prices {
        let versions: Vec<PriceVersion> = MODELS
            .iter()
            .map(|model| -> BenchResult<PriceVersion> {
                Ok(PriceVersion {
                    model: (*model).to_owned(),
                    effective_from: Timestamp::from_millis(0)?,
                    price: Price {
                        prompt: Micros(2_500_000),
                        completion: Micros(10_000_000),
                        ..Price::default()
                    },
                })
            })
            .collect::<BenchResult<_>>()?;
        store.prices().set_all(&versions)?;
    }
    // One period from the first event on, as long as a period can be, and
    // a limit no key reaches.
    let budget = budgets
        .then(|| -> BenchResult<Budget> {
            Ok(Budget::new(
                Cost(i64::MAX / 4),
                BudgetPeriod::Days {
                    days: MAX_PERIOD_DAYS,
                    from: Timestamp::from_millis(T0)?,
                },
            ))
        })
        .transpose()?;

    // Keys: real secrets, 1 % revoked (not timed).
    let mut keys = Vec::with_capacity(n_keys as usize);
    let mut secrets = Vec::with_capacity(n_keys as usize);
    for i in 0..n_keys {
        let created = store.keys().create(&NewKey {
            budget,
            ..NewKey::client(format!("key {i}"))
        })?;
        if i % 100 == 99 {
            store.keys().revoke(created.key.id)?;
        }
        keys.push(created.key.id);
        secrets.push(created.secret.expose().to_owned());
    }

    // record_batch: the event load, 1,000 events per committed batch.
    phases.mark("record_batch", "start");
    let started = Instant::now();
    let mut ts = T0;
    let mut batch = Vec::with_capacity(batch_len);
    for _ in 0..n_events / batch_len as u64 {
        batch.clear();
        for _ in 0..batch_len {
            ts += 50;
            batch.push(event(&mut rng, &keys, ts)?);
        }
        store.events().record_batch(&batch)?;
    }
    let loaded = (n_events / batch_len as u64) * batch_len as u64;
    let record_batch_per_s = loaded as f64 / started.elapsed().as_secs_f64();
    phases.mark("record_batch", "end");
    let bytes = if postgres {
        store.postgres_status()?.tables_bytes as f64
    } else {
        store.checkpoint()?;
        std::fs::metadata(&path)?.len() as f64
    };
    let bytes_per_event = bytes / loaded as f64;

    // resolve: from the presented secret to the key, one at a time.
    let mut latencies = Vec::with_capacity(n_resolve as usize);
    phases.mark("resolve", "start");
    let started = Instant::now();
    for _ in 0..n_resolve {
        let mut i = rng.below(n_keys) as usize;
        if i % 100 == 99 {
            i -= 1;
        }
        let one = Instant::now();
        let key = store.keys().resolve(&secrets[i])?;
        latencies.push(one.elapsed().as_nanos() as u64);
        if key.map(|k| k.id) != Ok(keys[i]) {
            return Err("resolve returned the wrong key".into());
        }
    }
    let resolve_per_s = n_resolve as f64 / started.elapsed().as_secs_f64();
    phases.mark("resolve", "end");
    let resolve_p99_us = percentile(&mut latencies, 0.99) as f64 / 1000.0;

    // record_single: each event committed on its own.
    phases.mark("record_single", "start");
    let started = Instant::now();
    for _ in 0..n_single {
        ts += 50;
        store.events().record(&event(&mut rng, &keys, ts)?)?;
    }
    let record_single_per_s = n_single as f64 / started.elapsed().as_secs_f64();
    phases.mark("record_single", "end");

    // usage_key_window: one key's totals over a random 24-hour window.
    let span = loaded as i64 * 50;
    phases.mark("usage", "start");
    let started = Instant::now();
    let mut checksum = 0i64;
    for _ in 0..n_usage {
        let key = keys[rng.below(n_keys) as usize];
        let since = T0 + rng.range(0, span);
        let totals = store.events().usage(&UsageFilter {
            key: Some(key),
            ..UsageFilter::between(
                Timestamp::from_millis(since)?,
                Timestamp::from_millis(since + 86_400_000)?,
            )
        })?;
        checksum = checksum.wrapping_add(totals.requests + totals.prompt_tokens);
    }
    let usage_key_window_per_s = n_usage as f64 / started.elapsed().as_secs_f64();
    phases.mark("usage", "end");

    // mixed: 2 resolving threads and 1 recording thread for a few seconds.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let secrets = Arc::new(secrets);
    let keys = Arc::new(keys);
    let mut threads = Vec::new();
    phases.mark("mixed", "start");
    for thread in 0..3u64 {
        let (store, stop, errors) = (Arc::clone(&store), Arc::clone(&stop), Arc::clone(&errors));
        let (secrets, keys) = (Arc::clone(&secrets), Arc::clone(&keys));
        threads.push(std::thread::spawn(move || -> u64 {
            let mut rng = Rng(100 + thread);
            let mut done = 0u64;
            let mut ts = T0 + span + 1_000_000 * thread as i64;
            while !stop.load(Ordering::Relaxed) {
                let ok = if thread < 2 {
                    let i = (rng.below(secrets.len() as u64 / 100) * 100) as usize;
                    matches!(store.keys().resolve(&secrets[i]), Ok(Ok(_)))
                } else {
                    ts += 1;
                    event(&mut rng, &keys, ts)
                        .ok()
                        .is_some_and(|e| store.events().record(&e).is_ok())
                };
                if ok {
                    done += 1;
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            done
        }));
    }
    std::thread::sleep(Duration::from_secs(mixed_seconds));
    stop.store(true, Ordering::Relaxed);
    phases.mark("mixed", "end");
    let counts: Vec<u64> = threads
        .into_iter()
        .map(|t| t.join().map_err(|_| "mixed thread panicked"))
        .collect::<Result<_, _>>()?;
    let mixed_resolve_per_s = (counts[0] + counts[1]) as f64 / mixed_seconds as f64;
    let mixed_record_per_s = counts[2] as f64 / mixed_seconds as f64;
    let engine = if postgres {
        format!(
            "\"postgres\":\"{}\"",
            store.postgres_status()?.server_version
        )
    } else {
        format!("\"sqlite\":\"{}\"", store.status()?.sqlite_version)
    };
    let store = Arc::into_inner(store).ok_or("store still shared")?;
    let _ = store.close()?;

    println!(
        "{{\"impl\":\"keytally{}\",{engine},\"keys\":{n_keys},\"events\":{loaded},\
         \"resolve_per_s\":{resolve_per_s:.0},\"resolve_p99_us\":{resolve_p99_us:.1},\
         \"record_single_per_s\":{record_single_per_s:.0},\"record_batch_per_s\":{record_batch_per_s:.0},\
         \"usage_key_window_per_s\":{usage_key_window_per_s:.0},\
         \"mixed_resolve_per_s\":{mixed_resolve_per_s:.0},\"mixed_record_per_s\":{mixed_record_per_s:.0},\
         \"mixed_errors\":{},\"bytes_per_event\":{bytes_per_event:.1}}}",
        match (mode == ResolveMode::Notified, budgets, prices) {
            (true, _, _) => " (notified)",
            (false, true, _) => " (budgets)",
            (false, false, true) => " (prices)",
            (false, false, false) => "",
        },
        errors.load(Ordering::Relaxed)
    );
    eprintln!("usage checksum {checksum}");
    Ok(())
}
