//! Contention: 4 processes and 8 threads resolve, record, prune, back up and
//! checkpoint at once, for a few seconds. No caller sees an error (busy is
//! waited out), no acknowledged write is lost, and the rollups still equal a
//! recount of the raw events, as does every budget's spend. And a revoked key stops resolving at once for
//! every thread, whichever process revoked it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use keytally::testing::folder;
use keytally::{
    Budget, BudgetPeriod, Cost, KeyId, NewEvent, NewKey, Store, Timestamp, UsageFilter,
};
use rstest::rstest;
use tempfile::TempDir;

use crate::support::binary::BIN;
use crate::support::spend::{budgets_hold, price_model};
use crate::support::sql::Raw;
use crate::TestResult;

const RUN_FOR: Duration = Duration::from_secs(3);

#[derive(QueryableByName)]
struct Present {
    #[diesel(sql_type = Text)]
    request_id: String,
}

#[derive(QueryableByName)]
struct ModelCount {
    #[diesel(sql_type = Text)]
    model: String,
    #[diesel(sql_type = BigInt)]
    requests: i64,
    #[diesel(sql_type = BigInt)]
    prompt: i64,
}

/// Whether an operation succeeded; a failure is printed for the report.
fn report<T>(what: &str, outcome: Result<T, String>) -> bool {
    match outcome {
        Ok(_) => true,
        Err(error) => {
            eprintln!("contention: {what} failed: {error}");
            false
        }
    }
}

#[rstest]
fn everything_at_once_surfaces_no_error_and_loses_nothing(folder: TempDir) -> TestResult {
    let db = folder.path().join("busy.db");
    let store = Arc::new(Store::open(&db)?);
    let secrets: Arc<Vec<String>> = Arc::new(
        (0..20)
            .map(|i| {
                Ok(store
                    .keys()
                    .create(&NewKey::client(format!("k{i}")))?
                    .secret
                    .expose()
                    .to_owned())
            })
            .collect::<Result<_, keytally::Error>>()?,
    );
    // Every model is priced, and each ingest shares a key with a recording
    // thread: the first key's budget is reached on the way, the second's
    // only its soft limit. The crash writer's keys reach theirs.
    for model in [
        "ingest-0",
        "ingest-1",
        "thread-3",
        "thread-4",
        "crash-model",
    ] {
        price_model(&store, model)?;
    }
    let budgeted: Vec<KeyId> = [(9_500_000, 1_000_000), (i64::MAX / 2, 1_000_000)]
        .into_iter()
        .map(|(limit, soft)| {
            let mut budget = Budget::new(Cost(limit), BudgetPeriod::Day);
            budget.soft_limit = Some(Cost(soft));
            Ok(store
                .keys()
                .create(&NewKey {
                    budget: Some(budget),
                    ..NewKey::client("shared")
                })?
                .key
                .id)
        })
        .collect::<Result<_, keytally::Error>>()?;
    let budgeted = Arc::new(budgeted);
    let started = Instant::now();
    let now = Timestamp::now().as_millis();

    // Processes 1 and 2: two ingests of 3,000 events each.
    let mut ingests = Vec::new();
    for p in 0..2 {
        let mut child = Command::new(BIN)
            .arg("--db")
            .arg(&db)
            .args(["--json", "events", "ingest", "--batch", "50"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        let lines: String = (0..3000)
            .map(|i| {
                format!(
                    "{{\"ts\":{},\"model\":\"ingest-{p}\",\"status\":200,\"prompt_tokens\":3,\"request_id\":\"p{p}-{i}\",\"key_id\":\"{}\"}}\n",
                    now - 60_000 + i,
                    budgeted[p]
                )
            })
            .collect();
        let feeder = std::thread::spawn(move || stdin.write_all(lines.as_bytes()));
        ingests.push((child, feeder));
    }
    // Process 3: the crash-test writer, killed at the end; what it
    // acknowledged must be there.
    let mut writer = Command::new(crate::support::crash_writer::crash_writer()?)
        .arg(&db)
        .arg("0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let writer_out = writer.stdout.take().ok_or("no stdout")?;
    let writer_acks = std::thread::spawn(move || {
        BufReader::new(writer_out)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| line.strip_prefix("batch ").map(str::to_owned))
            .collect::<Vec<String>>()
    });
    // Process 4: backups and prunes from the command line, in a loop.
    let backup = folder.path().join("cli-backup.db");
    let looper = Command::new("sh")
        .arg("-c")
        .arg(
            "end=$(( $(date +%s) + 3 )); while [ $(date +%s) -lt $end ]; do \
             \"$0\" --db \"$1\" backup --force \"$2\" >/dev/null || exit 1; \
             \"$0\" --db \"$1\" events prune --older-than 7d >/dev/null || exit 1; done",
        )
        .arg(BIN)
        .arg(&db)
        .arg(&backup)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;

    // Eight threads in this process.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..8u64 {
        let (store, stop, errors, secrets, budgeted) = (
            Arc::clone(&store),
            Arc::clone(&stop),
            Arc::clone(&errors),
            Arc::clone(&secrets),
            Arc::clone(&budgeted),
        );
        let folder_path = folder.path().to_path_buf();
        threads.push(std::thread::spawn(move || -> Vec<String> {
            let mut acked = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let ok = match t {
                    0..=2 => report(
                        "resolve",
                        store
                            .keys()
                            .resolve(&secrets[(i as usize * 7 + t as usize) % secrets.len()])
                            .map_err(|e| e.to_string())
                            .and_then(|r| r.map_err(|r| r.to_string())),
                    ),
                    3 | 4 => {
                        let request_id = format!("t{t}-{i}");
                        let mut event = NewEvent::new(Timestamp::now(), format!("thread-{t}"));
                        event.prompt_tokens = 5;
                        event.request_id = Some(request_id.clone());
                        event.key_id = Some(budgeted[t as usize - 3]);
                        let ok = report(
                            "record",
                            store.events().record(&event).map_err(|e| e.to_string()),
                        );
                        if ok {
                            acked.push(request_id);
                        }
                        ok
                    }
                    5 => {
                        std::thread::sleep(Duration::from_millis(20));
                        report(
                            "prune",
                            store
                                .events()
                                .prune(Timestamp::now().plus_millis(-7 * 86_400_000), 1000)
                                .map_err(|e| e.to_string()),
                        )
                    }
                    6 => {
                        std::thread::sleep(Duration::from_millis(50));
                        report("checkpoint", store.checkpoint().map_err(|e| e.to_string()))
                    }
                    _ => {
                        std::thread::sleep(Duration::from_millis(100));
                        report(
                            "backup",
                            store
                                .backup_to(
                                    &folder_path.join(format!("thread-backup-{}.db", i % 3)),
                                    true,
                                )
                                .map_err(|e| e.to_string()),
                        )
                    }
                };
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            acked
        }));
    }
    std::thread::sleep(RUN_FOR.saturating_sub(started.elapsed()));
    stop.store(true, Ordering::Relaxed);
    let mut acked: Vec<String> = Vec::new();
    for thread in threads {
        acked.extend(thread.join().map_err(|_| "thread panicked")?);
    }
    writer.kill()?;
    writer.wait()?;
    let writer_batches = writer_acks.join().map_err(|_| "reader panicked")?;
    for (child, feeder) in ingests {
        feeder.join().map_err(|_| "feeder panicked")??;
        let output = child.wait_with_output()?;
        assert!(output.status.success(), "{output:?}");
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        assert_eq!(report["ingested"], 3000);
    }
    let looped = looper.wait_with_output()?;
    assert!(looped.status.success(), "{looped:?}");
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "errors surfaced to callers"
    );

    // Nothing acknowledged is missing.
    let mut conn = store.sqlite_connection()?;
    let present: std::collections::HashSet<String> =
        diesel::sql_query("SELECT request_id FROM events WHERE request_id IS NOT NULL")
            .load::<Present>(&mut *conn)?
            .into_iter()
            .map(|row| row.request_id)
            .collect();
    for id in &acked {
        assert!(present.contains(id), "acknowledged {id} is lost");
    }
    for p in 0..2 {
        for i in 0..3000 {
            assert!(
                present.contains(&format!("p{p}-{i}")),
                "ingested p{p}-{i} is lost"
            );
        }
    }
    for batch in &writer_batches {
        for i in 0..20 {
            assert!(
                present.contains(&format!("b{batch}-{i}")),
                "batch {batch} is lost"
            );
        }
    }
    // Rollups equal a recount of the raw events, per model.
    let recount: BTreeMap<String, (i64, i64)> = diesel::sql_query(
        "SELECT models.name AS model, count(*) AS requests, sum(prompt_tokens) AS prompt \
         FROM events JOIN models ON models.id = events.model_id GROUP BY models.name",
    )
    .load::<ModelCount>(&mut *conn)?
    .into_iter()
    .map(|row| (row.model, (row.requests, row.prompt)))
    .collect();
    drop(conn);
    let window = UsageFilter::between(
        Timestamp::from_millis(now - 3_600_000)?,
        Timestamp::now().plus_millis(3_600_000),
    );
    let rollups: BTreeMap<String, (i64, i64)> = store
        .events()
        .usage_by_model(&window)?
        .into_iter()
        .map(|group| {
            (
                group.group,
                (group.totals.requests, group.totals.prompt_tokens),
            )
        })
        .collect();
    assert_eq!(rollups, recount);
    // Every budget's spend equals a recount of its key's events, and
    // exactly the keys whose spend reached their budget are refused.
    let mut raw = Raw::Sqlite(store.sqlite_connection()?);
    let checked = budgets_hold(&store, &mut raw, 0, "after contention")?;
    drop(raw);
    let shared: Vec<bool> = budgeted
        .iter()
        .map(|key| -> Result<bool, Box<dyn std::error::Error>> {
            Ok(store.keys().budget(*key)?.ok_or("no budget")?.over_budget)
        })
        .collect::<Result<_, _>>()?;
    assert_eq!(shared, [true, false], "{checked:?}");
    eprintln!(
        "contention: {} thread-recorded, 6000 ingested, {} writer batches acknowledged, 0 errors",
        acked.len(),
        writer_batches.len()
    );
    let store = Arc::into_inner(store).ok_or("store still shared")?;
    let _ = store.close()?;
    Ok(())
}

#[rstest]
fn no_resolve_that_starts_after_a_revoke_returns_accepts_the_key(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    let store = Arc::new(Store::open(&path)?);
    let mut ids = Vec::new();
    let mut secrets = Vec::new();
    for i in 0..24 {
        let created = store.keys().create(&NewKey::client(format!("key {i}")))?;
        ids.push(created.key.id);
        secrets.push(created.secret.expose().to_owned());
    }
    let secrets = Arc::new(secrets);
    let revoked: Arc<Vec<AtomicBool>> = Arc::new((0..24).map(|_| AtomicBool::new(false)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut resolvers = Vec::new();
    for thread in 0..3usize {
        let (store, secrets, revoked, stop) = (
            Arc::clone(&store),
            Arc::clone(&secrets),
            Arc::clone(&revoked),
            Arc::clone(&stop),
        );
        resolvers.push(std::thread::spawn(move || -> Result<(u64, u64), String> {
            let (mut resolved, mut accepted_after_revoke) = (0u64, 0u64);
            let mut i = thread;
            while !stop.load(Ordering::SeqCst) {
                i = (i + 7) % secrets.len();
                let was_revoked = revoked[i].load(Ordering::SeqCst);
                let verdict = store
                    .keys()
                    .resolve(&secrets[i])
                    .map_err(|e| e.to_string())?;
                resolved += 1;
                if was_revoked && verdict.is_ok() {
                    accepted_after_revoke += 1;
                }
            }
            Ok((resolved, accepted_after_revoke))
        }));
    }
    // Every key is resolved, and so remembered, before it is revoked: by
    // this store for the even ones, by another process for the odd ones.
    std::thread::sleep(Duration::from_millis(100));
    for (i, id) in ids.iter().enumerate() {
        if i % 2 == 0 {
            store.keys().revoke(*id)?;
        } else {
            let output = Command::new(BIN)
                .arg("--db")
                .arg(&path)
                .args(["keys", "revoke", &id.to_string()])
                .env_remove("KEYTALLY_LOG")
                .output()?;
            assert!(output.status.success(), "{output:?}");
        }
        revoked[i].store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for resolver in resolvers {
        let (resolved, accepted_after_revoke) =
            resolver.join().map_err(|_| "resolver panicked")??;
        assert_eq!(accepted_after_revoke, 0);
        total += resolved;
    }
    assert!(total > 1000, "only {total} resolves ran");
    let store = Arc::into_inner(store).ok_or("store still shared")?;
    assert!(store.close()?.checkpoint_complete);
    Ok(())
}
