//! Budgets on a real store, on both backends: a key stops resolving when
//! its spend in the period reaches its budget and resolves again when the
//! period rolls over; the kept spend always equals a recount from the raw
//! events; stores recording for one key at once overshoot the budget by
//! at most the requests they have in flight.

use diesel::{Connection, RunQueryDsl};
use diesel_migrations::MigrationHarness;
use keytally::testing::{folder, postgres, store_on, TestStore};
use keytally::{
    Backend, Budget, BudgetPeriod, Cost, Error, KeyId, KeyUpdate, NewEvent, NewKey, Price,
    PriceVersion, Rejection, Store, StoreOptions, Timestamp,
};
use rstest::rstest;

use crate::support::binary::{json_of, keytally, path_arg, run};
use crate::support::crash_writer::example;
use crate::support::spend::{another_store, price_model, recount};
use crate::TestResult;

/// What one test event costs: 1,000 prompt tokens at 1.00 a million.
const EVENT_COST: i64 = 1_000_000;
const DAY: i64 = 86_400_000;
/// The spend a budget row keeps: `spend_nanos`, and on SQLite the cost in
/// the key's rollups from `rollup_hour` on (NULL on PostgreSQL).
const KEPT_SPEND: &str = "SELECT CAST(b.spend_nanos + COALESCE((\
    SELECT SUM(u.cost_nanos) FROM usage_key_hourly AS u \
    WHERE u.key_row_id = b.key_row_id AND u.hour >= b.rollup_hour), 0) AS BIGINT) AS n \
    FROM key_budgets AS b";

/// An event of `key` at `ts` costing [`EVENT_COST`].
fn event(key: KeyId, ts: Timestamp) -> NewEvent {
    let mut event = NewEvent::new(ts, "gpt-4o");
    event.key_id = Some(key);
    event.prompt_tokens = 1_000;
    event
}

fn budget(limit: i64, soft: Option<i64>, period: BudgetPeriod) -> Budget {
    Budget {
        limit: Cost(limit),
        soft_limit: soft.map(Cost),
        period,
    }
}

/// A key with `budget`, and its secret.
fn key_with(store: &Store, budget: Budget) -> Result<(KeyId, String), Error> {
    let created = store.keys().create(&NewKey {
        budget: Some(budget),
        ..NewKey::client("budgeted")
    })?;
    Ok((created.key.id, created.secret.expose().to_owned()))
}

/// A store with every event priced at [`EVENT_COST`], and a key allowed
/// `events` such events a month, with its secret.
fn monthly_budget_of(
    backend: Backend,
    events: i64,
) -> Result<(TestStore, KeyId, String), Box<dyn std::error::Error>> {
    let test = store_on(backend);
    price_model(&test, "gpt-4o")?;
    let (key, secret) = key_with(
        &test,
        budget(events * EVENT_COST, None, BudgetPeriod::Month),
    )?;
    Ok((test, key, secret))
}

/// Where the test store's database is, for another process to open.
fn location_of(test: &TestStore) -> Result<String, Box<dyn std::error::Error>> {
    Ok(match test.database_url() {
        Some(url) => url.to_owned(),
        None => path_arg(&test.folder().join("keytally.db"))?.to_owned(),
    })
}

#[rstest]
fn a_key_stops_resolving_when_its_spend_reaches_its_budget(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    price_model(&store, "gpt-4o")?;
    let (key, secret) = key_with(
        &store,
        budget(10 * EVENT_COST, Some(5 * EVENT_COST), BudgetPeriod::Day),
    )?;
    let now = Timestamp::now();
    for n in 1..=10 {
        // Resolved (and so cached) before each event, as a gateway does.
        assert!(
            store.keys().resolve(&secret)?.is_ok(),
            "refused before event {n}"
        );
        store.events().record(&event(key, now))?;
        let status = store.keys().budget(key)?.ok_or("the budget is gone")?;
        assert_eq!(status.spend, Cost(n * EVENT_COST));
        assert_eq!(status.soft_limit_reached, n >= 5, "after {n} events");
        assert_eq!(status.over_budget, n >= 10, "after {n} events");
    }
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    // Another store that never resolved the key refuses it too, and so does
    // this one from its cache.
    let other = another_store(&store)?;
    assert_eq!(other.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    let status = store.keys().budget(key)?.ok_or("the budget is gone")?;
    assert_eq!(
        status.period_start,
        BudgetPeriod::Day.start_of(now).ok_or("no day")?
    );
    assert_eq!(status.resets_at, status.period_start.plus_millis(DAY));
    assert_eq!(
        status.spend.nanos(),
        recount(&store, key, status.period_start, None)?
    );
    // A larger budget lets it in again; removing the budget too.
    store.keys().update(
        key,
        &KeyUpdate {
            budget: Some(Some(budget(11 * EVENT_COST, None, BudgetPeriod::Day))),
            ..KeyUpdate::default()
        },
    )?;
    assert!(store.keys().resolve(&secret)?.is_ok());
    store.events().record(&event(key, now))?;
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    assert_eq!(other.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    store.keys().update(
        key,
        &KeyUpdate {
            budget: Some(None),
            ..KeyUpdate::default()
        },
    )?;
    assert!(store.keys().resolve(&secret)?.is_ok());
    assert!(other.keys().resolve(&secret)?.is_ok());
    assert_eq!(store.keys().budget(key)?, None);
    Ok(())
}

#[rstest]
fn a_budget_set_on_a_key_counts_what_it_already_spent_in_the_period(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    price_model(&store, "gpt-4o")?;
    let created = store.keys().create(&NewKey::client("spender"))?;
    let (key, secret) = (created.key.id, created.secret.expose().to_owned());
    let now = Timestamp::now();
    let today = BudgetPeriod::Day.start_of(now).ok_or("no day")?;
    // Three events yesterday, four today (one in the first millisecond).
    let mut batch = vec![event(key, today.plus_millis(-1)); 3];
    batch.push(event(key, today));
    batch.extend(vec![event(key, now); 3]);
    store.events().record_batch(&batch)?;
    assert!(store.keys().resolve(&secret)?.is_ok());
    store.keys().update(
        key,
        &KeyUpdate {
            budget: Some(Some(budget(4 * EVENT_COST, None, BudgetPeriod::Day))),
            ..KeyUpdate::default()
        },
    )?;
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.spend, Cost(4 * EVENT_COST));
    assert_eq!(status.spend.nanos(), recount(&store, key, today, None)?);
    assert!(status.over_budget);
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    // A monthly budget counts the whole month so far.
    store.keys().update(
        key,
        &KeyUpdate {
            budget: Some(Some(budget(100 * EVENT_COST, None, BudgetPeriod::Month))),
            ..KeyUpdate::default()
        },
    )?;
    let month = BudgetPeriod::Month.start_of(now).ok_or("no month")?;
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.spend.nanos(), recount(&store, key, month, None)?);
    assert!(store.keys().resolve(&secret)?.is_ok());
    Ok(())
}

#[rstest]
fn a_refused_key_resolves_again_when_its_period_rolls_over(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    price_model(&store, "gpt-4o")?;
    // One-day periods whose current one ends two seconds from now.
    let now = Timestamp::now();
    let period = BudgetPeriod::Days {
        days: 1,
        from: now.plus_millis(2_000 - DAY),
    };
    let (key, secret) = key_with(&store, budget(2 * EVENT_COST, None, period))?;
    store
        .events()
        .record_batch(&[event(key, now), event(key, now)])?;
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.resets_at, now.plus_millis(2_000));
    let refused_until = |at: Timestamp| -> Result<Option<Timestamp>, Error> {
        Ok(store.keys().get(key)?.over_budget_until(at))
    };
    assert_eq!(refused_until(Timestamp::now())?, Some(status.resets_at));
    while Timestamp::now() < status.resets_at {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Nothing was written: time alone ends the refusal.
    assert!(store.keys().resolve(&secret)?.is_ok());
    assert_eq!(refused_until(Timestamp::now())?, None);
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!((status.spend, status.over_budget), (Cost(0), false));
    // In one batch: a late event of the old period, then two of the new one
    // and another late one. Only the new period's count.
    let later = Timestamp::now();
    store.events().record_batch(&[
        event(key, now),
        event(key, later),
        event(key, later),
        event(key, now),
    ])?;
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.spend, Cost(2 * EVENT_COST));
    assert_eq!(
        status.spend.nanos(),
        recount(&store, key, status.period_start, None)?
    );
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    Ok(())
}

/// The refusal is kept on the key's row, written by the recording
/// transaction (on PostgreSQL by the trigger on the budget's report, which
/// computes the period's end itself): it ends with the calendar month,
/// across a year's end too.
#[rstest]
fn a_monthly_budget_refuses_the_key_until_the_end_of_its_month(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let (store, key, secret) = monthly_budget_of(backend, 2)?;
    let refused_until = |store: &TestStore| -> Result<i64, Box<dyn std::error::Error>> {
        Ok(crate::support::sql::raw(store)?.number(
            "SELECT over_budget_until AS n FROM keys WHERE over_budget_until IS NOT NULL",
        )?)
    };
    let now = Timestamp::now();
    store
        .events()
        .record_batch(&[event(key, now), event(key, now)])?;
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(
        status.resets_at,
        BudgetPeriod::Month.end_after(status.period_start)
    );
    assert_eq!(refused_until(&store)?, status.resets_at.as_millis());
    // Across a year's end: with the kept period moved back to December
    // 2025 and no refusal (as a key idle since then would have them), that
    // month's events refuse the key until January. (On PostgreSQL recording
    // only ever moves a refusal later.)
    let december = 1_764_547_200_000_i64; // 2025-12-01
    crate::support::sql::raw(&store)?.execute(&format!(
        "UPDATE key_budgets SET period_start = {december}, spend_nanos = 0, rollup_hour = NULL"
    ))?;
    crate::support::sql::raw(&store)?.execute("UPDATE keys SET over_budget_until = NULL")?;
    let mid_december = Timestamp::from_millis(december + 14 * DAY)?;
    for _ in 0..2 {
        store.events().record(&event(key, mid_december))?;
    }
    let january = 1_767_225_600_000_i64; // 2026-01-01
    assert_eq!(refused_until(&store)?, january);
    Ok(())
}

#[rstest]
fn stores_recording_for_one_key_overshoot_by_at_most_their_requests_in_flight(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    use std::sync::atomic::{AtomicU64, Ordering};
    const STORES: usize = 4;
    const ALLOWED: i64 = 200;
    let (test, key, secret) = monthly_budget_of(backend, ALLOWED)?;
    let stores = (0..STORES)
        .map(|_| another_store(&test))
        .collect::<Result<Vec<_>, _>>()?;
    let recorded = AtomicU64::new(0);
    // Each store is a gateway replica serving one request at a time:
    // resolve, then record the request's event.
    std::thread::scope(|scope| {
        let workers: Vec<_> = stores
            .iter()
            .map(|store| {
                scope.spawn(|| -> Result<(), Error> {
                    // Bounded, so that a budget never enforced fails the
                    // test below rather than running forever.
                    while recorded.load(Ordering::SeqCst) < 2 * ALLOWED as u64 {
                        match store.keys().resolve(&secret)? {
                            Ok(_) => {}
                            Err(Rejection::OverBudget) => return Ok(()),
                            Err(other) => {
                                return Err(Error::InvalidInput {
                                    field: "secret",
                                    reason: format!("refused as {other}"),
                                })
                            }
                        }
                        store.events().record(&event(key, Timestamp::now()))?;
                        recorded.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| "a worker panicked")??;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    let recorded = i64::try_from(recorded.load(Ordering::SeqCst))?;
    check_overshoot(
        &test,
        key,
        recorded,
        ALLOWED,
        STORES,
        &format!("{backend:?}: stores"),
    )
}

/// Checks what `writers` stores or processes (`what`), each with one
/// request in flight, recorded for `key`, whose budget is `allowed` events: no
/// addition to the spend was lost to a race, and the overshoot is the event
/// that reached the budget plus at most one in flight in each other writer.
fn check_overshoot(
    test: &TestStore,
    key: KeyId,
    recorded: i64,
    allowed: i64,
    writers: usize,
    what: &str,
) -> TestResult {
    let overshoot = recorded - allowed;
    eprintln!(
        "{what}: {writers}, budget {allowed} events, {recorded} recorded, overshoot {overshoot}"
    );
    let status = test.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.spend, Cost(recorded * EVENT_COST));
    assert_eq!(
        status.spend.nanos(),
        recount(test, key, status.period_start, None)?
    );
    assert!(
        (0..i64::try_from(writers)?).contains(&overshoot),
        "overshoot {overshoot} with {writers} {what}"
    );
    Ok(())
}

#[rstest]
fn the_binary_sets_shows_and_removes_a_budget(folder: tempfile::TempDir) -> TestResult {
    let db = folder.path().join("keytally.db");
    let created = run(
        &db,
        &[
            "keys",
            "create",
            "--label",
            "team",
            "--budget",
            "25.00/month",
            "--soft-budget",
            "20",
        ],
        "",
    )?;
    assert!(created.status.success(), "{created:?}");
    let created = json_of(&created)?;
    let id = created["key"]["id"].as_str().ok_or("no id")?.to_owned();
    assert_eq!(created["budget"]["budget"]["limit"], "25.00");
    assert_eq!(created["budget"]["budget"]["soft_limit"], "20.00");
    assert_eq!(created["budget"]["budget"]["period"], "month");
    let shown = keytally(&["--db", path_arg(&db)?, "keys", "show", &id])?;
    let text = String::from_utf8(shown.stdout)?;
    assert!(text.contains("budget:         25.00 per month"), "{text}");
    assert!(text.contains("spend:          0.00 since"), "{text}");
    // A soft limit above the budget is refused, and nothing changes.
    let refused = run(&db, &["keys", "update", &id, "--soft-budget", "30"], "")?;
    assert!(!refused.status.success());
    let said = String::from_utf8(refused.stderr)?;
    assert!(
        said.contains("a soft limit of 30.00 is above the budget (25.00)"),
        "{said}"
    );
    for bad in ["25/week", "25", "0/day", "5/0d", "1.0000000001/day"] {
        let refused = run(&db, &["keys", "update", &id, "--budget", bad], "")?;
        assert_eq!(refused.status.code(), Some(1), "{bad}: {refused:?}");
        assert!(
            String::from_utf8(refused.stderr)?.contains("budget"),
            "{bad}"
        );
    }
    let shown = json_of(&run(&db, &["keys", "show", &id], "")?)?;
    assert_eq!(shown["budget"]["budget"]["limit"], "25.00");
    let updated = json_of(&run(
        &db,
        &[
            "keys",
            "update",
            &id,
            "--budget",
            "5/7d",
            "--budget-from",
            "2026-11-01T00:00:00Z",
        ],
        "",
    )?)?;
    assert_eq!(
        updated["budget"]["budget"]["period"],
        "7d from 2026-11-01T00:00:00.000Z"
    );
    // The soft limit was kept only where the budget was not given anew.
    assert_eq!(
        updated["budget"]["budget"]["soft_limit"],
        serde_json::Value::Null
    );
    let removed = json_of(&run(&db, &["keys", "update", &id, "--no-budget"], "")?)?;
    assert_eq!(removed["budget"], serde_json::Value::Null);
    Ok(())
}

#[rstest]
fn processes_recording_for_one_key_overshoot_by_at_most_their_requests_in_flight(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    use std::io::Write;
    use std::process::{Command, Stdio};
    const PROCESSES: usize = 4;
    const ALLOWED: i64 = 300;
    let (test, key, secret) = monthly_budget_of(backend, ALLOWED)?;
    let location = location_of(&test)?;
    let program = example("budget_spender")?;
    let limit = (2 * ALLOWED).to_string();
    let mut children = (0..PROCESSES)
        .map(|_| {
            let mut child = Command::new(&program)
                .args([location.as_str(), &key.to_string(), "gpt-4o", &limit])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            writeln!(child.stdin.as_mut().ok_or("no stdin")?, "{secret}")?;
            Ok(child)
        })
        .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;
    // Every process has its secret and its store open (or opening): go.
    for child in &mut children {
        writeln!(child.stdin.take().ok_or("no stdin")?, "go")?;
    }
    let mut recorded = 0i64;
    for child in children {
        let output = child.wait_with_output()?;
        let stdout = String::from_utf8(output.stdout)?;
        assert!(output.status.success(), "{stdout}");
        let mut lines = stdout.lines();
        recorded += lines
            .next()
            .and_then(|line| line.strip_prefix("recorded "))
            .ok_or("no count")?
            .parse::<i64>()?;
        assert_eq!(lines.next(), Some("refused over_budget"), "{stdout}");
    }
    check_overshoot(
        &test,
        key,
        recorded,
        ALLOWED,
        PROCESSES,
        &format!("{backend:?}: processes"),
    )
}

/// A database for the binary on `backend` (a file in `folder`, or a fresh
/// PostgreSQL database) with `gpt-4o` priced at 1.00 a million prompt
/// tokens.
fn priced_database(
    folder: &tempfile::TempDir,
    backend: Backend,
) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let db = match backend {
        Backend::Sqlite => folder.path().join("keytally.db"),
        Backend::Postgres => std::path::PathBuf::from(postgres::server()?.fresh_database()?),
    };
    let priced = run(
        &db,
        &[
            "prices",
            "set",
            "--model",
            "gpt-4o",
            "--prompt",
            "1",
            "--from",
            "2020-01-01T00:00:00Z",
        ],
        "",
    )?;
    assert!(priced.status.success(), "{priced:?}");
    Ok(db)
}

/// Creates through the binary a key with a budget of 0.003 a month and
/// the soft limit `soft`; returns its id and secret.
fn key_through_the_binary(
    db: &std::path::Path,
    soft: &str,
) -> Result<(String, String), Box<dyn std::error::Error>> {
    let created = json_of(&run(
        db,
        &[
            "keys",
            "create",
            "--label",
            "l",
            "--budget",
            "0.003/month",
            "--soft-budget",
            soft,
        ],
        "",
    )?)?;
    let key = created["key"]["id"].as_str().ok_or("no id")?.to_owned();
    let secret = created["secret"].as_str().ok_or("no secret")?.to_owned();
    Ok((key, secret))
}

/// Ingests through the binary, in one batch, an event of `key` (1,000
/// prompt tokens of `gpt-4o`) at each of `times`; returns what the process
/// logged (its store logs the queued budget reports, at the latest when it
/// closes).
fn ingest_at(
    db: &std::path::Path,
    key: &str,
    times: &[i64],
) -> Result<String, Box<dyn std::error::Error>> {
    let lines: String = times
        .iter()
        .map(|ts| {
            format!(
                "{{\"ts\":{ts},\"key_id\":\"{key}\",\"model\":\"gpt-4o\",\"status\":200,\"latency_ms\":10,\"prompt_tokens\":1000}}\n"
            )
        })
        .collect();
    let output = run(db, &["events", "ingest"], &lines)?;
    assert!(output.status.success(), "{output:?}");
    Ok(String::from_utf8(output.stderr)?)
}

#[rstest]
fn reaching_the_soft_limit_and_the_budget_is_logged_once_each(
    folder: tempfile::TempDir,
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let db = priced_database(&folder, backend)?;
    let (key, _) = key_through_the_binary(&db, "0.0015")?;
    // Each ingest is a process of its own; its store logs what recording
    // queued, at the latest when it closes.
    let ingest = |events: usize| ingest_at(&db, &key, &vec![Timestamp::now().as_millis(); events]);
    let soft = "key reached its soft budget";
    let reached = "key reached its budget";
    let logged = ingest(2)?;
    assert_eq!(logged.matches(soft).count(), 1, "{logged}");
    assert_eq!(logged.matches(reached).count(), 0, "{logged}");
    assert!(logged.contains(&key), "{logged}");
    let logged = ingest(2)?;
    assert_eq!(logged.matches(soft).count(), 0, "{logged}");
    assert_eq!(logged.matches(reached).count(), 1, "{logged}");
    let logged = ingest(1)?;
    assert!(!logged.contains("budget"), "{logged}");
    let shown = json_of(&run(&db, &["keys", "show", &key], "")?)?;
    assert_eq!(shown["budget"]["spend"], "0.005");
    assert_eq!(shown["budget"]["soft_limit_reached"], true);
    assert_eq!(shown["budget"]["over_budget"], true);
    assert_eq!(shown["over_budget_until"], shown["budget"]["resets_at"]);
    // The list shows the key refused, until its period's end.
    let listed = keytally(&["--db", path_arg(&db)?, "keys", "list"])?;
    let text = String::from_utf8(listed.stdout)?;
    assert!(
        text.lines()
            .any(|line| line.starts_with(&key) && line.contains(" over budget ")),
        "{text}"
    );
    let listed = json_of(&run(&db, &["keys", "list"], "")?)?;
    assert_eq!(
        listed[0]["over_budget_until"], shown["budget"]["resets_at"],
        "{listed}"
    );
    Ok(())
}

/// A batch holding a key's events of two periods counts them as recording
/// them one by one would: the earlier period's spend reaching the soft limit
/// and the budget is logged and refuses the key until that period's end, and
/// the later period's spend starts from its own events.
#[rstest]
fn a_batch_across_a_period_boundary_counts_each_period(
    folder: tempfile::TempDir,
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let db = priced_database(&folder, backend)?;
    let (key, secret) = key_through_the_binary(&db, "0.002")?;
    // The kept period moved back to last month, as a key last used then
    // would have it: this month's start is the boundary.
    let now = Timestamp::now();
    let this_month = BudgetPeriod::Month.start_of(now).ok_or("no month")?;
    let last_month = BudgetPeriod::Month
        .start_of(this_month.plus_millis(-1))
        .ok_or("no month")?;
    let sql = |statement: &str| -> Result<i64, Box<dyn std::error::Error>> {
        #[derive(diesel::QueryableByName)]
        struct Number {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let query = diesel::sql_query(statement);
        let location = path_arg(&db)?;
        Ok(match backend {
            Backend::Sqlite => {
                let mut conn = diesel::SqliteConnection::establish(location)?;
                query.get_result::<Number>(&mut conn)?.n
            }
            Backend::Postgres => {
                let mut conn = diesel::PgConnection::establish(location)?;
                query.get_result::<Number>(&mut conn)?.n
            }
        })
    };
    sql(&format!(
        "UPDATE key_budgets SET period_start = {}, spend_nanos = 0, rollup_hour = NULL \
         RETURNING spend_nanos AS n",
        last_month.as_millis()
    ))?;
    let boundary = this_month.as_millis();
    let ingest = |times: &[i64]| ingest_at(&db, &key, times);
    // Last month's period: 0.001 spent.
    let logged = ingest(&[boundary - 3_000])?;
    assert!(!logged.contains("budget"), "{logged}");
    // One batch: two more of last month (0.003, both limits), one of this
    // month.
    let logged = ingest(&[boundary - 2_000, boundary - 1_000, now.as_millis()])?;
    assert_eq!(
        logged.matches("key reached its soft budget").count(),
        1,
        "{logged}"
    );
    assert_eq!(
        logged.matches("key reached its budget").count(),
        1,
        "{logged}"
    );
    // Refused until last month's period ended: that is over.
    assert_eq!(
        sql("SELECT over_budget_until AS n FROM keys")?,
        boundary,
        "refused until last month's end"
    );
    let store = match backend {
        Backend::Sqlite => Store::open(&db)?,
        Backend::Postgres => StoreOptions::new(path_arg(&db)?).open()?,
    };
    assert!(store.keys().resolve(&secret)?.is_ok());
    let status = store.keys().budget(key.parse()?)?.ok_or("no budget")?;
    assert_eq!(status.period_start, this_month);
    assert_eq!(status.spend, Cost(EVENT_COST), "this month's one event");
    Ok(())
}

/// A large batch (copied, on PostgreSQL) with a key's events before its
/// budget's start and in three of its periods, among another key's: the
/// middle period reaching the budget refuses the key until that period's
/// end, and the spend kept is the last period's, as a recount finds.
#[rstest]
fn a_large_batch_over_three_periods_counts_each_in_time_order(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    price_model(&store, "gpt-4o")?;
    // One-day periods from twelve days ago; the kept period moved back
    // three days (a key idle since then), so that the batch's events of
    // three periods are all in the past.
    let today = BudgetPeriod::Day
        .start_of(Timestamp::now())
        .ok_or("no day")?;
    let from = today.plus_millis(-12 * DAY);
    let period = BudgetPeriod::Days { days: 1, from };
    let (key, secret) = key_with(&store, budget(3 * EVENT_COST, None, period))?;
    let other = store.keys().create(&NewKey::client("other"))?.key.id;
    let at = |millis: i64| today.plus_millis(millis);
    crate::support::sql::raw(&store)?.execute(&format!(
        "UPDATE key_budgets SET period_start = {}",
        at(-3 * DAY).as_millis()
    ))?;
    let mut batch = Vec::new();
    for i in 0..100 {
        batch.push(event(key, from.plus_millis(-1_000 - i)));
    }
    batch.extend([
        event(key, at(-3 * DAY + 1_000)),
        event(key, at(-3 * DAY + 2_000)),
    ]);
    batch.extend((0..3).map(|i| event(key, at(-2 * DAY + 1_000 * i))));
    batch.push(event(key, at(-DAY + 5)));
    batch.extend((0..1_000).map(|i| event(other, at(-2 * DAY + i))));
    // Not in time order: the store orders each key's events itself.
    batch.reverse();
    store.events().record_batch(&batch)?;
    let last_period = at(-DAY);
    let spend = crate::support::sql::raw(&store)?.number(KEPT_SPEND)?;
    assert_eq!(spend, EVENT_COST);
    assert_eq!(spend, recount(&store, key, last_period, None)?);
    let refused_until = crate::support::sql::raw(&store)?
        .number("SELECT over_budget_until AS n FROM keys WHERE over_budget_until IS NOT NULL")?;
    assert_eq!(
        refused_until,
        last_period.as_millis(),
        "refused until the middle period's end"
    );
    // That refusal is over.
    assert!(store.keys().resolve(&secret)?.is_ok());
    Ok(())
}

/// An event from further ahead of the clock than the allowance counts in
/// usage but spends nothing, alone or in a batch: one wrong time cannot move
/// a key's period forward and leave the current one unchecked.
#[rstest]
fn an_event_from_far_ahead_does_not_move_the_budget_period(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let (store, key, secret) = monthly_budget_of(backend, 2)?;
    let now = Timestamp::now();
    let ahead = Timestamp::from_millis(4_102_444_800_000)?; // 2100-01-01
    store.events().record(&event(key, ahead))?;
    store.events().record(&event(key, now))?;
    assert!(store.keys().resolve(&secret)?.is_ok());
    store
        .events()
        .record_batch(&[event(key, ahead), event(key, now)])?;
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.spend, Cost(2 * EVENT_COST));
    assert_eq!(
        status.spend.nanos(),
        recount(&store, key, status.period_start, None)? - 2 * EVENT_COST,
        "the two events from ahead are recorded, and spend nothing"
    );
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    Ok(())
}

/// A key recording in many hours of one period, one event at a time and
/// late ones among them, keeps the spend a recount finds; on SQLite, where
/// part of it is kept in the key's rollups, the hours behind are folded into
/// the budget row as they grow, and pruning the rollups loses none of it.
#[rstest]
fn a_budget_keeps_its_spend_over_many_hours_and_after_its_rollups_are_pruned(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    price_model(&store, "gpt-4o")?;
    let now = Timestamp::now();
    let today = BudgetPeriod::Day.start_of(now).ok_or("no day")?;
    let from = today.plus_millis(-10 * DAY);
    let period = BudgetPeriod::Days { days: 30, from };
    let (key, secret) = key_with(&store, budget(152 * EVENT_COST, None, period))?;
    const HOUR: i64 = 3_600_000;
    // 150 events, one an hour up to now; every tenth arrives after the
    // next one (late).
    for hour in (1..=150_i64).rev() {
        let at = |hour: i64| now.plus_millis(-hour * HOUR);
        match hour % 10 {
            0 => {}
            9 => {
                store.events().record(&event(key, at(hour)))?;
                store.events().record(&event(key, at(hour + 1)))?;
            }
            _ => {
                store.events().record(&event(key, at(hour)))?;
            }
        }
    }
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.period_start, from);
    assert_eq!(status.spend, Cost(150 * EVENT_COST));
    assert_eq!(status.spend.nanos(), recount(&store, key, from, None)?);
    let folded = |store: &TestStore| -> Result<i64, Box<dyn std::error::Error>> {
        // The first key's row (the idle key below comes after it).
        Ok(crate::support::sql::raw(store)?.number(
            "SELECT COALESCE(rollup_hour, -1) AS n FROM key_budgets \
             ORDER BY key_row_id LIMIT 1",
        )?)
    };
    let hour_of = |at: Timestamp| at.as_millis().div_euclid(HOUR);
    if backend == Backend::Sqlite {
        assert!(
            folded(&store)? > hour_of(now.plus_millis(-100 * HOUR)),
            "the older hours were folded into the budget row"
        );
    }
    // An idle key's budget row, with no rollups to fold, is left alone.
    key_with(&store, budget(EVENT_COST, None, period))?;
    let idle_row = |store: &TestStore| -> Result<i64, Box<dyn std::error::Error>> {
        Ok(crate::support::sql::raw(store)?.number(
            "SELECT COALESCE(rollup_hour, -1) AS n FROM key_budgets \
             ORDER BY key_row_id DESC LIMIT 1",
        )?)
    };
    let idle_before = idle_row(&store)?;
    assert_ne!(idle_before, 0);
    // The rollups of every hour before this one go; the spend does not.
    let cutoff = now;
    assert!(store.events().prune_rollups(cutoff, 7)? > 0);
    if backend == Backend::Sqlite {
        assert!(folded(&store)? >= hour_of(cutoff));
    }
    assert_eq!(idle_row(&store)?, idle_before);
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.spend, Cost(150 * EVENT_COST));
    assert_eq!(
        crate::support::sql::raw(&store)?
            .number(&format!("{KEPT_SPEND} ORDER BY b.key_row_id LIMIT 1"))?,
        150 * EVENT_COST
    );
    // A late event from before the cutoff still counts; the next reaches
    // the budget.
    store
        .events()
        .record(&event(key, now.plus_millis(-100 * HOUR)))?;
    assert!(store.keys().resolve(&secret)?.is_ok());
    store.events().record(&event(key, now))?;
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    Ok(())
}

/// Two stores recording for one key in turn, and one of them changing its
/// budget: each store's next event counts what the other recorded and
/// the budget as it now is (on SQLite, what a store keeps of the spend in
/// memory is not trusted past another's write).
#[rstest]
fn stores_recording_in_turn_count_each_others_spend_and_budget_changes(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let (store, key, secret) = monthly_budget_of(backend, 5)?;
    let other = another_store(&store)?;
    let now = Timestamp::now();
    store.events().record(&event(key, now))?;
    other
        .events()
        .record_batch(&[event(key, now), event(key, now)])?;
    other.events().record(&event(key, now))?;
    assert!(store.keys().resolve(&secret)?.is_ok());
    // The fifth event: this store's own count would be two.
    store.events().record(&event(key, now))?;
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    // The other store raises the budget to seven, then lowers it to six
    // in a transaction of its own; this store's next event reaches it.
    for limit in [7, 6] {
        other.keys().update(
            key,
            &KeyUpdate {
                budget: Some(Some(budget(limit * EVENT_COST, None, BudgetPeriod::Month))),
                ..KeyUpdate::default()
            },
        )?;
    }
    assert!(store.keys().resolve(&secret)?.is_ok());
    store.events().record(&event(key, now))?;
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.spend, Cost(6 * EVENT_COST));
    assert_eq!(
        status.spend.nanos(),
        recount(&store, key, status.period_start, None)?
    );
    Ok(())
}

/// Large batches (copied on PostgreSQL; on SQLite added to the spend its
/// store keeps in memory) with another store's events and budget change
/// between them, and a prune of the rollups: after each step every key's
/// kept spend equals a recount of its events in the period, none from far
/// ahead of the clock, and the key whose budget the other store lowered
/// resolves until its spend reaches it. Some events count for nothing: from
/// before the period's first day, or from a day ahead.
#[rstest]
fn large_batches_keep_each_keys_spend_with_another_store_recording_between(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    const HOUR: i64 = 3_600_000;
    let store = store_on(backend);
    price_model(&store, "gpt-4o")?;
    let other = another_store(&store)?;
    let now = Timestamp::now();
    let from = BudgetPeriod::Day
        .start_of(now)
        .ok_or("no day")?
        .plus_millis(-10 * DAY);
    let period = BudgetPeriod::Days { days: 30, from };
    let mut keys = (0..20)
        .map(|_| key_with(&store, budget(1_000_000 * EVENT_COST, None, period)))
        .collect::<Result<Vec<_>, Error>>()?;
    let (tight, tight_secret) = key_with(&store, budget(1_000_000 * EVENT_COST, None, period))?;
    keys.push((tight, tight_secret.clone()));
    let batch = |round: i64| -> Vec<NewEvent> {
        (0..1_200_i64)
            .map(|i| {
                let key = if i % 4 == 0 {
                    tight
                } else {
                    keys[(i % 20) as usize].0
                };
                let at = match i % 50 {
                    8 => from.plus_millis(-HOUR),
                    12 => now.plus_millis(DAY),
                    _ => now.plus_millis(-((i * 7 + round) % 100) * HOUR),
                };
                event(key, at)
            })
            .collect()
    };
    let horizon = now.plus_millis(5 * 60 * 1000);
    let check = |step: &str| -> TestResult {
        for (key, secret) in &keys {
            let status = store.keys().budget(*key)?.ok_or("no budget")?;
            let counted = recount(&store, *key, from, Some(horizon.plus_millis(1)))?;
            assert_eq!(status.spend.nanos(), counted, "{step}: key {key}");
            let refused = store.keys().resolve(secret)? == Err(Rejection::OverBudget);
            assert_eq!(refused, status.over_budget, "{step}: key {key}");
        }
        Ok(())
    };
    store.events().record_batch(&batch(0))?;
    check("first batch")?;
    other.events().record(&event(tight, now))?;
    other
        .events()
        .record_batch(&batch(1).into_iter().take(10).collect::<Vec<_>>())?;
    check("the other store's events")?;
    for round in 2..4 {
        store.events().record_batch(&batch(round))?;
        check("batches in a row")?;
    }
    // Events of the last second alone, in batches in a row.
    let recent = |round: i64| -> Vec<NewEvent> {
        batch(round)
            .into_iter()
            .enumerate()
            .map(|(i, mut event)| {
                event.ts = now.plus_millis(-(i as i64 % 1_000));
                event
            })
            .collect()
    };
    store.events().record_batch(&recent(10))?;
    check("recent events")?;
    store.events().record_batch(&recent(11))?;
    check("recent events again")?;
    // Room for about three more batches, which the memory adds up before
    // the one that reaches the budget.
    let spent = store
        .keys()
        .budget(tight)?
        .ok_or("no budget")?
        .spend
        .nanos();
    other.keys().update(
        tight,
        &KeyUpdate {
            budget: Some(Some(budget(
                spent + 1_000 * EVENT_COST,
                Some(spent + 700 * EVENT_COST),
                period,
            ))),
            ..KeyUpdate::default()
        },
    )?;
    check("the budget lowered")?;
    assert!(store.keys().resolve(&tight_secret)?.is_ok());
    let mut round = 4;
    // Up to the budget in batches of recent events.
    while store.keys().resolve(&tight_secret)?.is_ok() {
        store.events().record_batch(&recent(round))?;
        check("up to the budget")?;
        round += 1;
        assert!(round < 20, "the budget was never reached");
    }
    // Every hour's rollups before this one go: the spend does not.
    assert!(store.events().prune_rollups(now, 100_000)? > 0);
    check("pruned")?;
    store.events().record_batch(&batch(round))?;
    check("after the prune")?;
    assert_eq!(
        store.keys().resolve(&tight_secret)?,
        Err(Rejection::OverBudget)
    );
    Ok(())
}

/// An event of a later month starts its key's period on the first of the
/// calendar month (UTC) it falls in, on both backends, in a batch and
/// alone: keys whose stored period is January 1970, one for each month
/// since (leap years and 2000 among them), each record an event at the
/// month's first, a middle or its last millisecond, and each key's stored
/// period then starts on that month's first.
#[rstest]
fn an_event_of_a_later_month_starts_its_calendar_month(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    #[derive(diesel::QueryableByName)]
    struct Start {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        period_start: i64,
    }
    let store = store_on(backend);
    price_model(&store, "gpt-4o")?;
    let month = BudgetPeriod::Month;
    let now = Timestamp::now();
    let mut months = Vec::new();
    let mut start = month.end_after(Timestamp::from_millis(0)?);
    while month.end_after(start) <= now {
        months.push(start);
        start = month.end_after(start);
    }
    let keys = months
        .iter()
        .map(|_| key_with(&store, budget(1_000 * EVENT_COST, None, month)).map(|(key, _)| key))
        .collect::<Result<Vec<KeyId>, Error>>()?;
    let mut raw = crate::support::sql::raw(&store)?;
    let first = |start: Timestamp| start;
    let middle = |start: Timestamp| start.plus_millis(15 * DAY + 12_345);
    let last = |start: Timestamp| month.end_after(start).plus_millis(-1);
    let picks: [(&dyn Fn(Timestamp) -> Timestamp, bool); 3] =
        [(&first, true), (&middle, true), (&last, false)];
    for (pick, in_a_batch) in picks {
        raw.execute(
            "UPDATE key_budgets SET period_start = 0, spend_nanos = 0, \
             rollup_hour = CASE WHEN rollup_hour IS NULL THEN NULL ELSE 0 END",
        )?;
        let events: Vec<NewEvent> = keys
            .iter()
            .zip(&months)
            .map(|(&key, &start)| event(key, pick(start)))
            .collect();
        if in_a_batch {
            store.events().record_batch(&events)?;
        } else {
            for event in &events {
                store.events().record(event)?;
            }
        }
        let stored: Vec<i64> = raw
            .load::<Start>("SELECT period_start FROM key_budgets ORDER BY key_row_id")?
            .into_iter()
            .map(|row| row.period_start)
            .collect();
        let expected: Vec<i64> = months.iter().map(|start| start.as_millis()).collect();
        assert_eq!(stored, expected);
    }
    Ok(())
}

/// Events on either side of where PostgreSQL's recording stops telling a
/// key's period from its budget row alone (28 days into a month, a fixed
/// period's last millisecond), in batches and alone: each counts in the
/// period it falls in, in a month of 31 days as in a February.
#[rstest]
fn events_at_the_edges_of_a_period_count_in_it(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    price_model(&store, "gpt-4o")?;
    // The last months of 31 and of 28 days whose next month ended before
    // now.
    let month = BudgetPeriod::Month;
    let now = Timestamp::now();
    let last_month = |longest: bool| -> Result<Timestamp, &'static str> {
        let mut start = month.start_of(now).ok_or("no month")?;
        loop {
            start = month.start_of(start.plus_millis(-1)).ok_or("no month")?;
            let end = month.end_after(start);
            let days = (end.as_millis() - start.as_millis()) / DAY;
            if days == if longest { 31 } else { 28 } && month.end_after(end) <= now {
                return Ok(start);
            }
        }
    };
    let (long, short) = (last_month(true)?, last_month(false)?);
    let (long_next, short_next) = (month.end_after(long), month.end_after(short));
    let days = BudgetPeriod::Days {
        days: 3,
        from: long,
    };
    let limit = 1_000 * EVENT_COST;
    let mut keys = Vec::new();
    for (period, start) in [(month, long), (days, long), (month, short)] {
        keys.push(key_with(&store, budget(limit, None, period))?.0);
        // The period kept from `start`, as for a key recording since.
        crate::support::sql::raw(&store)?.execute(&format!(
            "UPDATE key_budgets SET period_start = {}, spend_nanos = 0, \
             rollup_hour = CASE WHEN rollup_hour IS NULL THEN NULL ELSE {} END \
             WHERE key_row_id = (SELECT max(key_row_id) FROM key_budgets)",
            start.as_millis(),
            start.as_millis() / 3_600_000
        ))?;
    }
    let [long_month, fixed, february] = keys[..] else {
        return Err("three keys".into());
    };
    let at = |start: Timestamp, ms: i64| start.plus_millis(ms);
    let steps: [(&[(KeyId, Timestamp)], bool); 4] = [
        // Told from the row: the last millisecond before 28 days, and
        // before 3 days.
        (
            &[
                (long_month, at(long, 28 * DAY - 1)),
                (long_month, at(long, 1)),
                (fixed, at(long, 3 * DAY - 1)),
                (fixed, at(long, 1)),
                (february, at(short, 28 * DAY - 1)),
            ],
            true,
        ),
        // Each event's period computed: still the month; the next 3 days;
        // March.
        (
            &[
                (long_month, at(long, 28 * DAY)),
                (long_month, at(long_next, -1)),
                (fixed, at(long, 3 * DAY)),
                (february, short_next),
            ],
            true,
        ),
        // The next month; the last millisecond of the second 3 days; told
        // from the moved row.
        (
            &[
                (long_month, long_next),
                (fixed, at(long, 6 * DAY - 1)),
                (february, at(short_next, 1)),
            ],
            false,
        ),
        // Told from the moved rows.
        (
            &[
                (long_month, at(long_next, 28 * DAY - 1)),
                (fixed, at(long, 3 * DAY + 1)),
                (february, at(short_next, 28 * DAY - 1)),
            ],
            true,
        ),
    ];
    // Each key's period and how many events it counts, after each step.
    let expected = [
        [(long, 2), (long, 2), (short, 1)],
        [(long, 4), (at(long, 3 * DAY), 1), (short_next, 1)],
        [(long_next, 1), (at(long, 3 * DAY), 2), (short_next, 2)],
        [(long_next, 2), (at(long, 3 * DAY), 3), (short_next, 3)],
    ];
    let mut raw = crate::support::sql::raw(&store)?;
    for ((events, in_a_batch), expected) in steps.into_iter().zip(expected) {
        let events: Vec<NewEvent> = events.iter().map(|&(key, ts)| event(key, ts)).collect();
        if in_a_batch {
            store.events().record_batch(&events)?;
        } else {
            for event in &events {
                store.events().record(event)?;
            }
        }
        for (nth, (key, (period, events))) in keys.iter().zip(expected).enumerate() {
            let row = format!("ORDER BY b.key_row_id LIMIT 1 OFFSET {nth}");
            let kept_period = raw.number(&format!(
                "SELECT b.period_start AS n FROM key_budgets AS b {row}"
            ))?;
            let kept_spend = raw.number(&format!("{KEPT_SPEND} {row}"))?;
            assert_eq!(kept_period, period.as_millis(), "key {nth}");
            assert_eq!(kept_spend, events * EVENT_COST, "key {nth}");
            assert_eq!(
                kept_spend,
                recount(&store, *key, period, None)?,
                "key {nth}"
            );
        }
    }
    Ok(())
}

/// Prices `gpt-4o` at the highest price for every kind of token.
fn price_at_most(store: &Store) -> Result<(), Error> {
    let most = keytally::Micros(keytally::MAX_PRICE_MICROS);
    store.prices().set(&PriceVersion {
        model: "gpt-4o".to_owned(),
        effective_from: Timestamp::from_millis(0)?,
        price: Price {
            prompt: most,
            completion: most,
            cache_read: most,
            cache_creation: most,
            reasoning: most,
        },
    })
}

/// An event of `key` at `ts` with the most tokens of every kind: at the
/// highest price, about 1.1e17 nano-units, so that 86 of them pass the
/// largest integer.
fn largest(key: KeyId, ts: Timestamp) -> NewEvent {
    let mut event = event(key, ts);
    let most = i64::from(i32::MAX);
    event.prompt_tokens = most;
    event.completion_tokens = most;
    event.cache_read_tokens = most;
    event.cache_creation_tokens = most;
    event.reasoning_tokens = most;
    event
}

/// Events at the highest price and token counts, whose rollup rows each
/// fit in an integer but together do not: recording goes on (the spend
/// saturates), in the store that recorded them and in another, whose
/// first event of the key reads those rows.
#[rstest]
fn a_spend_past_the_largest_integer_saturates_and_recording_goes_on(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    price_at_most(&store)?;
    let now = Timestamp::now();
    let period = BudgetPeriod::Days {
        days: 30,
        from: now.plus_millis(-10 * DAY),
    };
    let (key, secret) = key_with(&store, budget(EVENT_COST, None, period))?;
    // Fifty in each of two hours of the period: about 5.4e18 nano-units
    // a rollup row.
    let hours = [now.plus_millis(-2 * 3_600_000), now.plus_millis(-3_600_000)];
    let batch: Vec<NewEvent> = hours
        .iter()
        .flat_map(|&hour| (0..50).map(move |i| hour.plus_millis(i)))
        .map(|ts| largest(key, ts))
        .collect();
    store.events().record_batch(&batch)?;
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    another_store(&store)?.events().record(&largest(key, now))?;
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.spend, Cost(i64::MAX));
    assert!(status.over_budget);
    if backend == Backend::Postgres {
        return Ok(());
    }
    // On SQLite, with the whole spend in the rollups (as before any fold),
    // pruning the two hours' rollups folds both into the budget row: the
    // spend stays saturated, and the prune goes through.
    crate::support::sql::raw(&store)?.execute(&format!(
        "UPDATE key_budgets SET spend_nanos = 0, rollup_hour = {}",
        hours[0].as_millis() / 3_600_000
    ))?;
    assert_eq!(
        store.keys().budget(key)?.ok_or("no budget")?.spend,
        Cost(i64::MAX)
    );
    assert!(store.events().prune_rollups(now.plus_millis(-1), 1_000)? > 0);
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.spend, Cost(i64::MAX));
    assert!(status.over_budget);
    Ok(())
}

/// More such events in one hour than a rollup row's cost can hold, in a
/// batch (copied, on PostgreSQL) beside another key's events, then one in
/// the next hour:
/// every event is recorded, the rows' cost stops at the largest integer,
/// and the other key's usage is exact. A budget set again counts the
/// period's spend as saturated, and a batch of them across a budget period
/// boundary (walked event by event) saturates each period's spend.
#[rstest]
fn a_rollup_row_past_the_largest_integer_saturates_and_recording_goes_on(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    price_at_most(&store)?;
    let now = Timestamp::now();
    // Its periods start two hours before each day's time of now.
    let day = BudgetPeriod::Days {
        days: 1,
        from: now.plus_millis(-10 * DAY - 2 * 3_600_000),
    };
    let (key, secret) = key_with(&store, budget(EVENT_COST, None, day))?;
    let (other, _) = key_with(&store, budget(i64::MAX, None, day))?;
    // The start of the hour before this one: a thousand milliseconds of it
    // are one rollup row.
    let hour = Timestamp::from_millis((now.as_millis() / 3_600_000 - 1) * 3_600_000)?;
    let mut batch: Vec<NewEvent> = (0..1_000)
        .map(|i| event(other, hour.plus_millis(i)))
        .collect();
    batch.extend((0..100).map(|i| largest(key, hour.plus_millis(i))));
    store.events().record_batch(&batch)?;
    // And one of this hour.
    store.events().record(&largest(key, now))?;
    let mut raw = crate::support::sql::raw(&store)?;
    // The key was created first: its row id is the lower.
    let row_of = |which: &str| {
        format!(
            "SELECT cost_nanos AS n FROM usage_key_hourly \
             WHERE key_row_id = (SELECT {which}(row_id) FROM keys) AND hour = {}",
            hour.as_millis() / 3_600_000
        )
    };
    assert_eq!(raw.number(&row_of("min"))?, i64::MAX);
    // A thousand prompt tokens at the highest price a million.
    assert_eq!(
        raw.number(&row_of("max"))?,
        1_000 * keytally::MAX_PRICE_MICROS
    );
    assert_eq!(
        raw.number(&format!(
            "SELECT cost_nanos AS n FROM usage_model_hourly WHERE hour = {}",
            hour.as_millis() / 3_600_000
        ))?,
        i64::MAX
    );
    assert_eq!(raw.number("SELECT count(*) AS n FROM events")?, 1_101);
    if backend == Backend::Sqlite {
        // Stored as integers: SQLite's `+` past the largest one gives a
        // floating-point value, which an integer column would keep.
        assert_eq!(
            raw.number(
                "SELECT count(*) AS n FROM usage_key_hourly WHERE typeof(cost_nanos) <> 'integer'"
            )?,
            0
        );
    }
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.spend, Cost(i64::MAX));
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    // Set again, the budget counts the period's rollups and events: more
    // than an integer holds.
    store.keys().update(
        key,
        &KeyUpdate {
            budget: Some(Some(budget(2 * EVENT_COST, None, day))),
            ..KeyUpdate::default()
        },
    )?;
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.spend, Cost(i64::MAX));
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    // The kept period moved back a day: a batch of a hundred events of
    // that period and a hundred of this one is walked across the boundary.
    let today = day.start_of(now).ok_or("no period")?;
    let yesterday = today.plus_millis(-DAY);
    raw.execute(&format!(
        "UPDATE key_budgets SET period_start = {}, spend_nanos = 0, \
         rollup_hour = CASE WHEN rollup_hour IS NULL THEN NULL ELSE {} END",
        yesterday.as_millis(),
        now.as_millis() / 3_600_000 + 1
    ))?;
    let across: Vec<NewEvent> = [today.plus_millis(-1_000), now]
        .iter()
        .flat_map(|&at| (0..100).map(move |i| largest(key, at.plus_millis(-i))))
        .collect();
    store.events().record_batch(&across)?;
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.period_start, today);
    assert_eq!(status.spend, Cost(i64::MAX));
    assert!(status.over_budget);
    Ok(())
}

/// The migration that keeps part of SQLite's spend in the rollups moves a
/// budget row's spend there and back: reverted, `spend_nanos` holds the
/// whole spend; migrated again, the store goes on from it.
#[rstest]
fn the_spend_survives_its_migration_both_ways(folder: tempfile::TempDir) -> TestResult {
    let db = folder.path().join("keytally.db");
    let store = Store::open(&db)?;
    price_model(&store, "gpt-4o")?;
    let (key, secret) = key_with(&store, budget(4 * EVENT_COST, None, BudgetPeriod::Month))?;
    let now = Timestamp::now();
    store
        .events()
        .record_batch(&[event(key, now), event(key, now)])?;
    let _ = store.close()?;
    #[derive(diesel::QueryableByName)]
    struct Number {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let kept = |sql: &str| -> Result<i64, Box<dyn std::error::Error>> {
        let mut conn = diesel::SqliteConnection::establish(path_arg(&db)?)?;
        Ok(diesel::sql_query(sql).get_result::<Number>(&mut conn)?.n)
    };
    {
        let mut conn = diesel::SqliteConnection::establish(path_arg(&db)?)?;
        let reverted = conn
            .revert_last_migration(keytally::MIGRATIONS)
            .map_err(|e| e.to_string())?;
        assert!(
            reverted.to_string().starts_with("20261125031432"),
            "{reverted}"
        );
    }
    assert_eq!(
        kept("SELECT spend_nanos AS n FROM key_budgets")?,
        2 * EVENT_COST
    );
    let store = Store::open(&db)?;
    let status = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(status.spend, Cost(2 * EVENT_COST));
    store.events().record(&event(key, now))?;
    assert!(store.keys().resolve(&secret)?.is_ok());
    store.events().record(&event(key, now))?;
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    let _ = store.close()?;
    assert_eq!(kept(KEPT_SPEND)?, 4 * EVENT_COST);
    Ok(())
}

/// PostgreSQL computes the recording statement's new spend before it locks
/// the budget row, and again from the row's latest version when another
/// replica updated it meanwhile: what the batch's earlier period wrote from
/// the older version must not undo the other replica's refusal, nor queue
/// a report of a limit that the spend kept never reached.
#[rstest]
fn a_batch_across_a_period_boundary_behind_another_replica_keeps_its_refusal() -> TestResult {
    let (store, key, secret) = monthly_budget_of(Backend::Postgres, 3)?;
    // Last month's period kept, with one event spent (a key last used
    // then); the other replica carries it into this month.
    let now = Timestamp::now();
    let this_month = BudgetPeriod::Month.start_of(now).ok_or("no month")?;
    let last_month = BudgetPeriod::Month
        .start_of(this_month.plus_millis(-1))
        .ok_or("no month")?;
    let next_month = BudgetPeriod::Month.end_after(this_month).as_millis();
    crate::support::sql::raw(&store)?.execute(&format!(
        "UPDATE key_budgets SET period_start = {}, spend_nanos = {EVENT_COST}",
        last_month.as_millis()
    ))?;
    let (earlier, later) = (this_month.plus_millis(-1_000), now);
    // Every report queued, kept here: a store's maintenance thread logs
    // and deletes them within a second.
    let mut raw = crate::support::sql::raw(&store)?;
    for sql in [
        "CREATE TABLE queued_reports AS SELECT * FROM budget_reports WITH NO DATA",
        "CREATE FUNCTION keep_report() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN INSERT INTO queued_reports SELECT NEW.*; RETURN NULL; END; $$",
        "CREATE TRIGGER keep_report AFTER INSERT ON budget_reports \
         FOR EACH ROW EXECUTE FUNCTION keep_report()",
    ] {
        raw.execute(sql)?;
    }
    drop(raw);
    let url = store.database_url().ok_or("no database url")?;
    let mut other = diesel::PgConnection::establish(url)?;
    let mut watcher = diesel::PgConnection::establish(url)?;
    // The other replica: this month's spend at the budget, in a transaction
    // that holds the budget row and refuses the key until next month, as
    // its recording statement's report of the budget does.
    diesel::sql_query("BEGIN").execute(&mut other)?;
    diesel::sql_query(format!(
        "UPDATE key_budgets SET period_start = {}, spend_nanos = {}",
        this_month.as_millis(),
        3 * EVENT_COST
    ))
    .execute(&mut other)?;
    diesel::sql_query(format!("UPDATE keys SET over_budget_until = {next_month}"))
        .execute(&mut other)?;
    std::thread::scope(|scope| -> TestResult {
        // This store's batch: two more of last month (its budget reached,
        // by the row as it was), one of this month; it waits for the row.
        let recording = scope.spawn(|| {
            store.events().record_batch(&[
                event(key, earlier),
                event(key, earlier),
                event(key, later),
            ])
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        #[derive(diesel::QueryableByName)]
        struct Waiting {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        // A wait of a backend of this test's database (the server is
        // shared with other tests).
        while diesel::sql_query(
            "SELECT count(*) AS n FROM pg_locks AS l JOIN pg_stat_activity AS a \
             ON a.pid = l.pid WHERE NOT l.granted AND a.datname = current_database()",
        )
        .get_result::<Waiting>(&mut watcher)?
        .n == 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the batch never waited"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        diesel::sql_query("COMMIT").execute(&mut other)?;
        recording
            .join()
            .map_err(|_| "the recording thread panicked")??;
        Ok(())
    })?;
    let refused_until =
        crate::support::sql::raw(&store)?.number("SELECT over_budget_until AS n FROM keys")?;
    assert_eq!(refused_until, next_month, "the refusal was shortened");
    assert_eq!(store.keys().resolve(&secret)?, Err(Rejection::OverBudget));
    let spend =
        crate::support::sql::raw(&store)?.number("SELECT spend_nanos AS n FROM key_budgets")?;
    assert_eq!(
        spend,
        4 * EVENT_COST,
        "this month's spend and the batch's event of this month"
    );
    // Last month's spend never reached its budget: the batch's events of it
    // came after the other replica had moved the row on, and count for
    // nothing. No report of it was queued, not even by the computation
    // from the row as it was before.
    let reported = crate::support::sql::raw(&store)?.number(&format!(
        "SELECT count(*) AS n FROM queued_reports WHERE period_start = {}",
        last_month.as_millis()
    ))?;
    assert_eq!(reported, 0, "a report of last month was queued");
    Ok(())
}

#[rstest]
fn a_budget_reached_in_another_store_reaches_a_notified_store(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let test = store_on(backend);
    price_model(&test, "gpt-4o")?;
    let (key, secret) = key_with(&test, budget(3 * EVENT_COST, None, BudgetPeriod::Day))?;
    let location = location_of(&test)?;
    let replica = StoreOptions::new(location.as_str())
        .resolve_mode(keytally::ResolveMode::Notified)
        .open()?;
    // Read once, then answered from memory while the watched count stands.
    assert!(replica.keys().resolve(&secret)?.is_ok());
    assert!(replica.keys().resolve(&secret)?.is_ok());
    let now = Timestamp::now();
    test.events()
        .record_batch(&[event(key, now), event(key, now), event(key, now)])?;
    let reached = std::time::Instant::now();
    loop {
        match replica.keys().resolve(&secret)? {
            Err(Rejection::OverBudget) => break,
            Ok(_) => assert!(
                reached.elapsed() < std::time::Duration::from_secs(2),
                "still accepted 2 s after the budget was reached"
            ),
            Err(other) => return Err(format!("{other:?}").into()),
        }
    }
    eprintln!(
        "{backend:?}: refused {:?} after the budget was reached",
        reached.elapsed()
    );
    Ok(())
}

/// A budget's own columns written out of range by SQL are refused, on
/// PostgreSQL by a trigger on those columns (table checks would run on every
/// update of the spend), and the row is left as it was; the spend alone
/// updates as before.
#[rstest]
fn a_budget_written_out_of_range_by_sql_is_refused(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    use diesel::result::{DatabaseErrorKind, Error as DieselError};
    let (store, key, _) = monthly_budget_of(backend, 3)?;
    let before = store.keys().budget(key)?.ok_or("no budget")?;
    let mut raw = crate::support::sql::raw(&store)?;
    for change in [
        "budget_nanos = 0",
        "soft_nanos = budget_nanos + 1",
        "soft_nanos = 0",
        "period_days = 0",
        "period_days = 36501",
        "anchor = -1",
    ] {
        match raw.execute(&format!("UPDATE key_budgets SET {change}")) {
            Err(DieselError::DatabaseError(DatabaseErrorKind::CheckViolation, _)) => {}
            other => return Err(format!("{change}: {other:?}").into()),
        }
    }
    assert_eq!(store.keys().budget(key)?.ok_or("no budget")?, before);
    assert_eq!(
        raw.execute("UPDATE key_budgets SET spend_nanos = spend_nanos + 1")?,
        1
    );
    let after = store.keys().budget(key)?.ok_or("no budget")?;
    assert_eq!(after.spend, Cost(before.spend.nanos() + 1));
    Ok(())
}

/// One batch in which a key reaches its budget in an earlier period and in
/// its last (on PostgreSQL the earlier period is walked by
/// `keytally_spend_across_periods`, the last by the statement) and another
/// key reaches its budget in one period: the batch is recorded, and each key
/// is refused until this month's end with this month's spend.
#[rstest]
fn one_batch_carries_keys_over_their_budgets_in_several_periods_and_in_one(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    price_model(&store, "gpt-4o")?;
    let monthly = budget(2 * EVENT_COST, None, BudgetPeriod::Month);
    let (late, late_secret) = key_with(&store, monthly)?;
    let (other, other_secret) = key_with(&store, monthly)?;
    let now = Timestamp::now();
    let this_month = BudgetPeriod::Month.start_of(now).ok_or("no month")?;
    let last_month = BudgetPeriod::Month
        .start_of(this_month.plus_millis(-1))
        .ok_or("no month")?;
    let mut raw = crate::support::sql::raw(&store)?;
    // The first key's kept period moved back to last month (a key last
    // used then).
    raw.execute(&format!(
        "UPDATE key_budgets SET period_start = {}, spend_nanos = 0, rollup_hour = NULL \
         WHERE key_row_id = (SELECT min(key_row_id) FROM key_budgets)",
        last_month.as_millis()
    ))?;
    store.events().record_batch(&[
        event(late, this_month.plus_millis(-2_000)),
        event(late, this_month.plus_millis(-1_000)),
        event(other, now),
        event(late, now),
        event(other, now),
        event(late, now),
    ])?;
    let next_month = BudgetPeriod::Month.end_after(this_month);
    for (key, secret) in [(late, &late_secret), (other, &other_secret)] {
        assert_eq!(store.keys().resolve(secret)?, Err(Rejection::OverBudget));
        let status = store.keys().budget(key)?.ok_or("no budget")?;
        assert_eq!(status.period_start, this_month);
        assert_eq!(status.spend, Cost(2 * EVENT_COST));
    }
    for which in ["min", "max"] {
        let until = raw.number(&format!(
            "SELECT over_budget_until AS n FROM keys \
             WHERE row_id = (SELECT {which}(key_row_id) FROM key_budgets)"
        ))?;
        assert_eq!(until, next_month.as_millis(), "{which}");
    }
    Ok(())
}
