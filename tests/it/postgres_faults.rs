//! PostgreSQL faults, on real servers of the harness: the server killed with
//! SIGKILL and started again under a running ingest and resolve loop (on a
//! server of the test's own, [`OwnServer`]); connections terminated by the
//! server in the middle of a transaction; and, in notified mode, the
//! listener's connection dropped.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::sql_types::{Nullable, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use keytally::testing::postgres::{self, OwnServer};
use keytally::{
    Budget, BudgetPeriod, Cost, CreatedKey, Error, EventSink, NewEvent, NewKey, ResolveMode,
    SinkOptions, Store, StoreOptions, Timestamp,
};

use crate::support::random::Rng;
use crate::support::spend::{budgets_hold, price_model, Checked};
use crate::support::sql::Raw;
use crate::TestResult;

#[derive(QueryableByName)]
struct RequestId {
    #[diesel(sql_type = Nullable<Text>)]
    request_id: Option<String>,
}

/// The request ids of every stored event.
fn stored(url: &str) -> Result<BTreeSet<String>, Box<dyn std::error::Error>> {
    let mut conn = PgConnection::establish(url)?;
    Ok(diesel::sql_query("SELECT request_id FROM events")
        .load::<RequestId>(&mut conn)?
        .into_iter()
        .filter_map(|row| row.request_id)
        .collect())
}

/// The rollups of `url`'s database equal a recount of its events.
fn rollups_hold(url: &str) -> TestResult {
    let mut raw = Raw::Postgres(PgConnection::establish(url)?);
    assert_eq!(
        raw.rollups_against_recount()?,
        0,
        "rollups differ from a recount"
    );
    Ok(())
}

/// A client key with a daily budget of `limit` nanos.
fn budgeted_key(store: &Store, label: &str, limit: i64, soft: i64) -> Result<CreatedKey, Error> {
    store.keys().create(&NewKey {
        budget: Some(Budget {
            limit: Cost(limit),
            soft_limit: Some(Cost(soft)),
            period: BudgetPeriod::Day,
        }),
        ..NewKey::client(label)
    })
}

/// The budgets of `url`'s database (`store`'s) equal a recount of their
/// keys' events, and refuse exactly the keys that reached them.
fn budgets_of(store: &Store, url: &str) -> Result<Checked, Box<dyn std::error::Error>> {
    let mut raw = Raw::Postgres(PgConnection::establish(url)?);
    budgets_hold(store, &mut raw, 0, "after the faults")
}

/// One resolve of the loop: when it began, and its outcome.
struct Resolve {
    began: Instant,
    outcome: Result<(), String>,
    unavailable: bool,
}

#[test]
fn a_killed_server_loses_no_acknowledged_event_and_the_store_reconnects() -> TestResult {
    let server = OwnServer::start()?;
    let url = server.fresh_database()?;
    // Calls wait for a connection up to the busy timeout (at least 1 s),
    // then fail: the server stays down for 2 s.
    let store = Arc::new(Store::open_with(
        &StoreOptions::new(&url).busy_timeout(Duration::from_millis(250)),
    )?);
    // Every event is priced; the key's budget is never reached (the
    // resolves must succeed once the server is back), its soft limit is.
    price_model(&store, "fault-model")?;
    let created = budgeted_key(&store, "faults", i64::MAX / 2, 1_000_000)?;
    let key_id = created.key.id;
    let secret = created.secret.expose().to_owned();
    let sink = Arc::new(EventSink::new(
        Arc::clone(&store),
        SinkOptions {
            capacity: 5_000,
            batch_size: 200,
            max_delay: Duration::from_millis(10),
        },
    )?);
    let stop = Arc::new(AtomicBool::new(false));

    let ingest = {
        let (sink, stop) = (Arc::clone(&sink), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut tickets = Vec::new();
            let mut refused = 0u64;
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let mut event = NewEvent::new(Timestamp::now(), "fault-model");
                event.key_id = Some(key_id);
                event.request_id = Some(format!("e{i}"));
                event.prompt_tokens = (i % 100) as i64;
                match sink.submit(&event) {
                    Ok(ticket) => tickets.push((format!("e{i}"), ticket, Instant::now())),
                    Err(_) => refused += 1,
                }
                i += 1;
                if i % 20 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            (tickets, refused)
        })
    };
    // Single events recorded directly (one statement each), with their
    // outcomes: (request id, began, outcome).
    let recorder = {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut outcomes = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let mut event = NewEvent::new(Timestamp::now(), "fault-model");
                event.request_id = Some(format!("d{i}"));
                let began = Instant::now();
                let outcome = store.events().record(&event).map(|_| ());
                outcomes.push((format!("d{i}"), began, outcome));
                i += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
            outcomes
        })
    };
    let resolves = Arc::new(Mutex::new(Vec::<Resolve>::new()));
    let resolver = {
        let (store, stop, resolves) =
            (Arc::clone(&store), Arc::clone(&stop), Arc::clone(&resolves));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let began = Instant::now();
                let result = store.keys().resolve(&secret);
                let (outcome, unavailable) = match result {
                    Ok(Ok(_)) => (Ok(()), false),
                    Ok(Err(rejection)) => (Err(format!("rejected: {rejection:?}")), false),
                    Err(error) => (Err(error.report()), error.is_unavailable()),
                };
                resolves
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(Resolve {
                        began,
                        outcome,
                        unavailable,
                    });
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    std::thread::sleep(Duration::from_millis(600));
    let killed_at = Instant::now();
    server.kill()?;
    std::thread::sleep(Duration::from_millis(2_000));
    let restarting_at = Instant::now();
    server.restart()?;
    let restarted_at = Instant::now();
    // The same store, with no restart of its own, resolves again.
    let deadline = Instant::now() + Duration::from_secs(20);
    let back_at = loop {
        let first_success = resolves
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|r| r.began > restarted_at && r.outcome.is_ok())
            .map(|r| r.began);
        if let Some(at) = first_success {
            break at;
        }
        if Instant::now() > deadline {
            return Err("no resolve succeeded within 20 s of the restart".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(600));
    stop.store(true, Ordering::Release);
    let (tickets, refused) = ingest.join().map_err(|_| "ingest panicked")?;
    resolver.join().map_err(|_| "resolver panicked")?;
    let direct = recorder.join().map_err(|_| "recorder panicked")?;
    // Batches failed while the server was down: the tickets say which.
    match sink.flush_within(Duration::from_secs(60)) {
        Ok(()) | Err(Error::BatchFailed { .. }) => {}
        Err(other) => return Err(other.into()),
    }

    // Each ticket says whether its event was stored.
    let present = stored(&url)?;
    let (mut acknowledged_before, mut acknowledged_after, mut failed) = (0, 0, 0);
    for (request_id, ticket, submitted) in &tickets {
        match sink.wait(*ticket) {
            Ok(()) => {
                assert!(
                    present.contains(request_id),
                    "event {request_id} was acknowledged and is lost"
                );
                if *submitted < killed_at {
                    acknowledged_before += 1;
                } else if *submitted > restarted_at {
                    acknowledged_after += 1;
                }
            }
            Err(error) => {
                assert!(
                    !present.contains(request_id),
                    "event {request_id} was reported failed ({}) but is stored",
                    error.report()
                );
                assert!(
                    !matches!(error, Error::CommitUnknown { .. }),
                    "the sink left an event's fate unknown: {}",
                    error.report()
                );
                failed += 1;
            }
        }
    }
    assert!(
        acknowledged_before > 0 && acknowledged_after > 0,
        "before {acknowledged_before}, after {acknowledged_after}"
    );
    // A direct record says whether it was stored, or that it cannot know;
    // once the store resolves again, none fails.
    let mut direct_unknown = 0;
    for (request_id, began, outcome) in &direct {
        match outcome {
            Ok(()) => assert!(
                present.contains(request_id),
                "{request_id} recorded and lost"
            ),
            Err(Error::CommitUnknown { .. }) => direct_unknown += 1,
            Err(error) => assert!(
                !present.contains(request_id),
                "{request_id} failed ({}) and is stored",
                error.report()
            ),
        }
        if *began >= back_at {
            assert!(
                outcome.is_ok(),
                "a record failed after the store was back: {outcome:?}"
            );
        }
    }
    rollups_hold(&url)?;
    let checked = budgets_of(&store, &url)?;
    assert_eq!((checked.budgets, checked.reached), (1, 0), "{checked:?}");
    assert!(
        store
            .keys()
            .budget(key_id)?
            .is_some_and(|status| status.soft_limit_reached),
        "the soft limit was not reached"
    );

    // While it was down, resolves failed with a typed error; after it was
    // back, none failed.
    let resolves = resolves
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let down: Vec<&Resolve> = resolves
        .iter()
        .filter(|r| r.began > killed_at && r.began < restarting_at)
        .collect();
    assert!(!down.is_empty(), "no resolve ran while the server was down");
    for resolve in &down {
        if let Err(message) = &resolve.outcome {
            assert!(
                resolve.unavailable,
                "an untyped error while down: {message}"
            );
        }
    }
    assert!(
        down.iter().any(|r| r.outcome.is_err()),
        "every resolve succeeded while the server was down"
    );
    let after: Vec<&Resolve> = resolves.iter().filter(|r| r.began >= back_at).collect();
    for resolve in &after {
        assert!(
            resolve.outcome.is_ok(),
            "a resolve failed after the store was back: {:?}",
            resolve.outcome
        );
    }
    eprintln!(
        "server kill: {} events acknowledged ({acknowledged_before} before the kill, {acknowledged_after} after the restart), \
         {failed} reported failed, {refused} refused; {} direct records, {direct_unknown} of unknown fate; \
         {} resolves while down; resolving again {} ms after the restart",
        tickets.len() - failed,
        direct.len(),
        down.len(),
        back_at.saturating_duration_since(restarted_at).as_millis()
    );
    drop(resolves);
    if let Ok(sink) = Arc::try_unwrap(sink) {
        // Its report counts the batches that failed while the server was
        // down, as an error.
        match sink.close() {
            Ok(_) | Err(Error::BatchFailed { .. }) => {}
            Err(other) => return Err(other.into()),
        }
    }
    Ok(())
}

#[derive(QueryableByName)]
struct Terminated {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    all: i64,
    /// Those that were running a statement or inside a transaction.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    busy: i64,
}

/// Terminates every backend of the admin connection's database but its own
/// and the notified-mode listener's.
fn terminate_backends(admin: &mut PgConnection) -> diesel::QueryResult<Terminated> {
    diesel::sql_query(
        "SELECT count(*) AS all, count(*) FILTER (WHERE state <> 'idle') AS busy FROM \
         (SELECT pg_terminate_backend(pid), state FROM pg_stat_activity \
          WHERE datname = current_database() AND pid <> pg_backend_pid() \
          AND application_name <> 'keytally-listener') AS t",
    )
    .get_result(admin)
}

#[test]
fn a_connection_terminated_mid_transaction_applies_all_or_nothing() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let store = Arc::new(Store::open(&url)?);
    // Half the events are of a key whose budget (10.00 a day) the rounds
    // reach (a large batch of them costs 2.25) unless most roll back.
    price_model(&store, "terminated-model")?;
    let key = budgeted_key(&store, "terminated", 10_000_000_000, 2_500_000_000)?
        .key
        .id;
    let mut admin = PgConnection::establish(&url)?;
    let mut rng = Rng::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    );
    let (mut committed, mut rolled_back, mut unknown) = (0, 0, 0);
    let mut busy_terminated = 0;
    for round in 0..24u64 {
        // Large batches are copied in a transaction, small ones are one
        // statement; the sink's batches settle their fate.
        let size = [3_000, 400][round as usize % 2];
        let through_sink = round % 4 >= 2;
        let batch: Vec<NewEvent> = (0..size)
            .map(|j| {
                let mut event = NewEvent::new(Timestamp::now(), "terminated-model");
                event.request_id = Some(format!("r{round}-{j}"));
                event.prompt_tokens = j as i64;
                event.key_id = (j % 2 == 0).then_some(key);
                event
            })
            .collect();
        let writer = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || -> Result<Vec<Result<(), Error>>, Error> {
                if through_sink {
                    let sink = EventSink::new(
                        store,
                        SinkOptions {
                            capacity: 10_000,
                            batch_size: 10_000,
                            max_delay: Duration::from_millis(1),
                        },
                    )?;
                    // An event the sink could not queue (its model looked up
                    // on a connection just terminated) is not stored either.
                    let tickets: Vec<Result<_, Error>> =
                        batch.iter().map(|event| sink.submit(event)).collect();
                    let _ = sink.flush();
                    let outcomes = tickets
                        .into_iter()
                        .map(|ticket| ticket.and_then(|t| sink.wait(t)))
                        .collect();
                    let _ = sink.close();
                    Ok(outcomes)
                } else {
                    Ok(vec![store.events().record_batch(&batch).map(|_| ())])
                }
            })
        };
        std::thread::sleep(Duration::from_micros(rng.below(40_000)));
        busy_terminated += terminate_backends(&mut admin)?.busy;
        let outcomes = writer.join().map_err(|_| "writer panicked")??;
        let present: BTreeSet<String> = stored(&url)?
            .into_iter()
            .filter(|id| id.starts_with(&format!("r{round}-")))
            .collect();
        if through_sink {
            // Each ticket says whether its event was stored.
            for (j, outcome) in outcomes.iter().enumerate() {
                let there = present.contains(&format!("r{round}-{j}"));
                match outcome {
                    Ok(()) => assert!(there, "round {round}: event {j} acknowledged, not there"),
                    Err(error) => {
                        assert!(
                            !there,
                            "round {round}: event {j} failed ({}), stored",
                            error.report()
                        );
                        assert!(
                            !matches!(error, Error::CommitUnknown { .. }),
                            "round {round}: the sink left a fate unknown"
                        );
                    }
                }
            }
            if outcomes.iter().all(Result::is_ok) {
                committed += 1;
            } else {
                rolled_back += 1;
            }
            continue;
        }
        // A direct batch is one transaction: all of it or none.
        let count = present.len();
        assert!(
            count == 0 || count == size,
            "round {round}: {count} of {size} events stored"
        );
        match outcomes.into_iter().next().ok_or("no outcome")? {
            Ok(()) => {
                assert_eq!(count, size, "round {round}: reported stored, not there");
                committed += 1;
            }
            Err(Error::CommitUnknown { .. }) => unknown += 1,
            Err(error) => {
                assert_eq!(
                    count,
                    0,
                    "round {round}: reported failed ({}), stored",
                    error.report()
                );
                rolled_back += 1;
            }
        }
    }
    rollups_hold(&url)?;
    let checked = budgets_of(&store, &url)?;
    assert_eq!((checked.budgets, checked.reached), (1, 1), "{checked:?}");
    // The store still works.
    store
        .events()
        .record(&NewEvent::new(Timestamp::now(), "after"))?;
    eprintln!(
        "terminated: {busy_terminated} connections in the middle of a statement or a transaction; \
         {committed} rounds committed, {rolled_back} rolled back, {unknown} unknown"
    );
    assert!(
        busy_terminated > 0,
        "no termination hit a statement or a transaction"
    );
    Ok(())
}

#[test]
fn a_dropped_listener_falls_back_to_strict_at_once_and_comes_back() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let notified = Store::open_with(&StoreOptions::new(&url).resolve_mode(ResolveMode::Notified))?;
    let other = Store::open(&url)?;
    let created = other.keys().create(&NewKey::client("listened"))?;
    let secret = created.secret.expose().to_owned();
    assert!(notified.keys().resolve(&secret)?.is_ok());
    let wait_until = |what: &str, want: bool| -> Result<Duration, Box<dyn std::error::Error>> {
        let began = Instant::now();
        while notified.resolves_from_notifications() != want {
            if began.elapsed() > Duration::from_secs(10) {
                return Err(format!("{what} did not happen within 10 s").into());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(began.elapsed())
    };
    wait_until("the listener's first read", true)?;

    let mut admin = PgConnection::establish(&url)?;
    let mut listeners = 0;
    for round in 0..5 {
        let terminated = diesel::sql_query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'keytally-listener'",
        )
        .execute(&mut admin)?;
        listeners += terminated;
        let noticed = wait_until("falling back to strict", false)?;
        // Within the listener's poll, well before its count would have gone
        // stale by age (100 ms).
        assert!(
            noticed < Duration::from_millis(100),
            "round {round}: the lost listener was trusted for {noticed:?}"
        );
        // A revoke by another store while the listener is away is seen by
        // the very next resolve.
        if round == 2 {
            other.keys().revoke(created.key.id)?;
            assert!(
                notified.keys().resolve(&secret)?.is_err(),
                "a revoked key was accepted while the listener was away"
            );
        }
        wait_until("the listener's return", true)?;
        let accepted = notified.keys().resolve(&secret)?.is_ok();
        assert_eq!(
            accepted,
            round < 2,
            "round {round}: after the listener came back"
        );
    }
    assert_eq!(listeners, 5, "each round terminated the one listener");
    let _ = notified.close()?;
    let _ = other.close()?;
    Ok(())
}

#[test]
fn a_connection_the_server_terminated_is_replaced_not_reused() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    // One connection, so a dead one handed out again would fail every call.
    let store = Store::open_with(&StoreOptions::new(&url).pool_size(1))?;
    store
        .events()
        .record(&NewEvent::new(Timestamp::now(), "before"))?;
    let mut admin = PgConnection::establish(&url)?;
    assert_eq!(terminate_backends(&mut admin)?.all, 1);
    // The first call on the dead connection finds it dead; a single
    // statement cannot know whether the server ran it before it went.
    // (The same model: a new one would be written in a transaction first.)
    let first = store
        .events()
        .record(&NewEvent::new(Timestamp::now(), "before"));
    assert!(
        matches!(first, Err(Error::CommitUnknown { .. })),
        "{first:?}"
    );
    for i in 0..5 {
        let mut event = NewEvent::new(Timestamp::now(), "before");
        event.request_id = Some(format!("after-{i}"));
        store.events().record(&event)?;
    }
    let created = store.keys().create(&NewKey::client("after"))?;
    assert!(store.keys().resolve(created.secret.expose())?.is_ok());
    Ok(())
}
