//! The event sink under concurrent producers, back-pressure and failure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::Connection;
use keytally::testing::TestStore;
use keytally::{Backend, Error, EventFilter, EventSink, NewEvent, NewKey, SinkOptions, Timestamp};
use rstest::rstest;

use crate::TestResult;

const T0: i64 = 1_793_491_200_000;

fn event(i: u64) -> Result<NewEvent, Error> {
    let mut event = NewEvent::new(Timestamp::from_millis(T0 + i as i64)?, "gpt-4o");
    event.prompt_tokens = (i % 100) as i64;
    Ok(event)
}

fn all_event_count(store: &keytally::Store) -> Result<usize, Error> {
    Ok(store
        .events()
        .list(&EventFilter {
            limit: Some(10_000),
            ..EventFilter::default()
        })?
        .len())
}

/// A connection that holds, until it commits, the lock every writer of
/// events needs: SQLite's write lock, or PostgreSQL's lock on `events`.
fn block_writes(
    store: &keytally::Store,
    database_url: Option<&str>,
) -> Result<Box<dyn SimpleConnection>, Box<dyn std::error::Error>> {
    Ok(match store.backend() {
        Backend::Sqlite => {
            let mut blocker = crate::raw_connection(store.path())?;
            blocker.batch_execute("BEGIN IMMEDIATE")?;
            Box::new(blocker)
        }
        Backend::Postgres => {
            let url = database_url.ok_or("no database URL")?;
            let mut blocker = diesel::PgConnection::establish(url)?;
            blocker.batch_execute("BEGIN; LOCK TABLE events IN EXCLUSIVE MODE")?;
            Box::new(blocker)
        }
    })
}

#[rstest]
fn concurrent_producers_lose_nothing(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let test_store = TestStore::on(backend)?;
    let key = test_store
        .keys()
        .create(&NewKey::client("producer"))?
        .key
        .id;
    let (store, folder) = test_store.into_parts();
    let store = Arc::new(store);
    let sink = Arc::new(EventSink::new(
        Arc::clone(&store),
        SinkOptions {
            capacity: 64,
            batch_size: 50,
            max_delay: Duration::from_millis(5),
        },
    )?);
    let producers: Vec<_> = (0..4u64)
        .map(|p| {
            let sink = Arc::clone(&sink);
            std::thread::spawn(move || -> Result<Vec<keytally::Ticket>, Error> {
                (0..1_000u64)
                    .map(|i| {
                        let mut event = event(p * 1_000 + i)?;
                        event.key_id = Some(key);
                        sink.submit(&event)
                    })
                    .collect()
            })
        })
        .collect();
    let mut tickets = Vec::new();
    for producer in producers {
        tickets.extend(producer.join().map_err(|_| "producer panicked")??);
    }
    for ticket in &tickets {
        sink.wait(*ticket)?;
    }
    let sink = Arc::into_inner(sink).ok_or("sink still shared")?;
    let report = sink.close()?;
    assert_eq!(report.committed, 4_000);
    assert_eq!(report.failed, 0);
    assert!(report.batches >= 4_000 / 50);
    assert_eq!(all_event_count(&store)?, 4_000);
    let usage = store.events().usage(&keytally::UsageFilter::between(
        Timestamp::from_millis(T0)?,
        Timestamp::from_millis(T0 + 10_000)?,
    ))?;
    assert_eq!(usage.requests, 4_000);
    drop(folder);
    Ok(())
}

#[rstest]
fn a_full_queue_blocks_the_producer_and_memory_stays_bounded(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let test_store = TestStore::on(backend)?;
    let database_url = test_store.database_url().map(str::to_owned);
    let (store, _folder) = test_store.into_parts();
    let store = Arc::new(store);
    let options = SinkOptions {
        capacity: 10,
        batch_size: 5,
        max_delay: Duration::from_millis(1),
    };
    let sink = Arc::new(EventSink::new(Arc::clone(&store), options)?);
    // Another connection holds the write lock, so the writer is stuck.
    let mut blocker = block_writes(&store, database_url.as_deref())?;
    let submitted = Arc::new(AtomicU64::new(0));
    let total = 100u64;
    let producer = {
        let sink = Arc::clone(&sink);
        let submitted = Arc::clone(&submitted);
        std::thread::spawn(move || -> Result<(), Error> {
            for i in 0..total {
                sink.submit(&event(i)?)?;
                submitted.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        })
    };
    // Give the producer time to fill everything it can.
    std::thread::sleep(Duration::from_millis(300));
    let bound = (options.capacity + options.batch_size) as u64;
    assert!(sink.in_flight() <= bound, "{} in flight", sink.in_flight());
    assert!(
        submitted.load(Ordering::SeqCst) <= bound,
        "the producer was not held back"
    );
    assert!(!producer.is_finished());
    blocker.batch_execute("COMMIT")?;
    producer.join().map_err(|_| "producer panicked")??;
    sink.flush()?;
    assert_eq!(all_event_count(&store)?, total as usize);
    Ok(())
}

#[rstest]
fn a_failed_batch_is_reported_and_the_sink_recovers(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let test_store =
        TestStore::with_options_on(backend, |o| o.busy_timeout(Duration::from_millis(100)))?;
    let database_url = test_store.database_url().map(str::to_owned);
    let (store, _folder) = test_store.into_parts();
    let store = Arc::new(store);
    let sink = EventSink::new(
        Arc::clone(&store),
        SinkOptions {
            capacity: 100,
            batch_size: 10,
            max_delay: Duration::from_millis(1),
        },
    )?;
    // The model name is registered first: that is a write of its own.
    let first = sink.submit(&event(0)?)?;
    sink.wait(first)?;
    // Another connection holds what the batch must write to.
    let mut blocker = block_writes(&store, database_url.as_deref())?;
    let lost = sink.submit(&event(1)?)?;
    // Longer than the busy timeout: the batch must fail, and say so.
    let outcome = sink.wait(lost);
    assert!(
        matches!(outcome, Err(Error::BatchFailed { .. })),
        "{outcome:?}"
    );
    blocker.batch_execute("COMMIT")?;
    let kept = sink.submit(&event(2)?)?;
    sink.wait(kept)?;
    assert_eq!(all_event_count(&store)?, 2);
    let closed = sink.close();
    let Err(Error::BatchFailed { message }) = closed else {
        return Err(format!("close hid the failure: {closed:?}").into());
    };
    assert!(
        message.contains("2 events committed, 1 not committed"),
        "{message}"
    );
    Ok(())
}

#[rstest]
fn close_commits_what_was_queued_and_bad_events_are_refused_at_submit(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let (store, _folder) = TestStore::on(backend)?.into_parts();
    let store = Arc::new(store);
    let sink = EventSink::new(
        Arc::clone(&store),
        SinkOptions {
            max_delay: Duration::from_secs(60),
            ..SinkOptions::default()
        },
    )?;
    for i in 0..123 {
        sink.submit(&event(i)?)?;
    }
    let mut bad = event(0)?;
    bad.latency_ms = -1;
    assert!(matches!(sink.submit(&bad), Err(Error::InvalidEvent { .. })));
    let report = sink.close()?;
    assert_eq!(report.committed, 123);
    assert_eq!(all_event_count(&store)?, 123);
    Ok(())
}

#[rstest]
fn try_submit_never_waits_a_full_queue_refuses_and_a_flush_can_time_out(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let test_store = TestStore::on(backend)?;
    let database_url = test_store.database_url().map(str::to_owned);
    let (store, _folder) = test_store.into_parts();
    let store = Arc::new(store);
    let options = SinkOptions {
        capacity: 4,
        batch_size: 2,
        max_delay: Duration::from_millis(1),
    };
    let sink = EventSink::new(Arc::clone(&store), options)?;
    // The model is known to the store before the writer is blocked.
    sink.wait(sink.submit(&event(0)?)?)?;
    let mut blocker = block_writes(&store, database_url.as_deref())?;
    // Every submission returns at once: the writer holds one batch and is
    // stuck on the lock, the queue fills, and the rest are refused.
    let started = std::time::Instant::now();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 1..=20 {
        match sink.try_submit(&event(i)?) {
            Ok(ticket) => accepted.push(ticket),
            Err(Error::SinkFull { capacity: 4 }) => refused += 1,
            Err(other) => return Err(other.into()),
        }
        // Let the writer take its batch before the queue is measured.
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "try_submit waited"
    );
    let bound = options.capacity + options.batch_size;
    assert!(
        accepted.len() >= options.capacity && accepted.len() <= bound,
        "{} accepted",
        accepted.len()
    );
    assert_eq!(accepted.len() + refused, 20);
    let outcome = sink.flush_within(Duration::from_millis(100));
    assert!(
        matches!(outcome, Err(Error::FlushTimedOut { unsettled, .. }) if unsettled == accepted.len() as u64),
        "{outcome:?}"
    );
    blocker.batch_execute("COMMIT")?;
    sink.flush_within(Duration::from_secs(30))?;
    let report = sink.close()?;
    assert_eq!(report.committed, accepted.len() as u64 + 1);
    assert_eq!(report.refused_full, refused as u64);
    assert_eq!(all_event_count(&store)?, accepted.len() + 1);
    Ok(())
}

#[rstest]
fn try_submit_leaves_unseen_keys_to_the_writer_and_an_unknown_key_fails_alone(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let (store, _folder) = TestStore::on(backend)?.into_parts();
    let store = Arc::new(store);
    let other = Arc::new(TestStore::on(backend)?);
    // A key this store has never seen (created by another store on the
    // same database would do too), and a key of another database.
    let key = store.keys().create(&NewKey::client("unseen"))?.key;
    let stranger = other.keys().create(&NewKey::client("elsewhere"))?.key;
    let sink = EventSink::new(Arc::clone(&store), SinkOptions::default())?;
    let mut mine = event(1)?;
    mine.key_id = Some(key.id);
    mine.model = "a-model-not-seen-before".to_owned();
    let mut theirs = event(2)?;
    theirs.key_id = Some(stranger.id);
    let kept = sink.try_submit(&mine)?;
    let lost = sink.try_submit(&theirs)?;
    let anonymous = sink.try_submit(&event(3)?)?;
    sink.wait(kept)?;
    sink.wait(anonymous)?;
    let outcome = sink.wait(lost);
    assert!(
        matches!(&outcome, Err(Error::BatchFailed { message }) if message.contains("no key with id")),
        "{outcome:?}"
    );
    let recorded = store.events().list(&EventFilter::default())?;
    assert_eq!(recorded.len(), 2);
    assert!(recorded
        .iter()
        .any(|e| e.key_id == Some(key.id) && e.model == "a-model-not-seen-before"));
    let closed = sink.close();
    assert!(
        matches!(&closed, Err(Error::BatchFailed { message }) if message.contains("2 events committed, 1 not committed")),
        "{closed:?}"
    );
    Ok(())
}
