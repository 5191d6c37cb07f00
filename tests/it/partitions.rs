//! Raw events on PostgreSQL in daily partitions: made ahead of the clock
//! when a store opens, filled by recording, dropped whole by retention; a
//! day whose events wait in the default partition gets them back when its
//! partition is made.

use diesel::sql_types::Text;
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use keytally::testing::postgres;
use keytally::{EventFilter, NewEvent, Store, Timestamp};

use crate::TestResult;

const DAY: i64 = 86_400_000;

#[derive(QueryableByName)]
struct Where {
    #[diesel(sql_type = Text)]
    partition: String,
}

/// The partition each event is in, by request id order.
fn partitions_of_events(conn: &mut PgConnection) -> diesel::QueryResult<Vec<String>> {
    Ok(diesel::sql_query(
        "SELECT tableoid::regclass::text AS partition FROM events ORDER BY request_id",
    )
    .load::<Where>(conn)?
    .into_iter()
    .map(|row| row.partition)
    .collect())
}

fn day_name(millis: i64) -> Result<String, Box<dyn std::error::Error>> {
    let date = chrono::DateTime::from_timestamp_millis(millis).ok_or("out of range")?;
    Ok(format!("events_d{}", date.format("%Y%m%d")))
}

fn event(ts: i64, request: &str) -> Result<NewEvent, keytally::Error> {
    let mut event = NewEvent::new(Timestamp::from_millis(ts)?, "gpt-4o");
    event.request_id = Some(request.to_owned());
    event.prompt_tokens = 10;
    Ok(event)
}

#[test]
fn events_land_in_their_days_partition_and_retention_drops_whole_days() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let store = Store::open(&url)?;
    let now = Timestamp::now().as_millis();
    let today = now - now.rem_euclid(DAY);
    store.events().record_batch(&[
        event(today - 30 * DAY, "a-old")?,
        event(today - DAY + 1, "b-yesterday")?,
        event(now, "c-now")?,
        event(today + 3 * DAY, "d-ahead")?,
    ])?;
    let mut conn = PgConnection::establish(&url)?;
    assert_eq!(
        partitions_of_events(&mut conn)?,
        [
            "events_default".to_owned(),
            day_name(today - DAY)?,
            day_name(today)?,
            day_name(today + 3 * DAY)?,
        ]
    );
    // Retention up to the start of today: yesterday's partition is dropped
    // whole, the old event deleted from the default partition.
    let report = store.events().prune(Timestamp::from_millis(today)?, 10)?;
    assert_eq!(report.events_deleted, 2);
    assert_eq!(
        partitions_of_events(&mut conn)?,
        [day_name(today)?, day_name(today + 3 * DAY)?]
    );
    let left = store.events().list(&EventFilter::default())?;
    assert_eq!(left.len(), 2);
    // The rollups keep what was pruned.
    let totals = store.events().usage(&keytally::UsageFilter::between(
        Timestamp::from_millis(today - 31 * DAY)?,
        Timestamp::from_millis(today + 4 * DAY)?,
    ))?;
    assert_eq!(totals.requests, 4);
    assert!(store.close()?.checkpoint_complete);
    Ok(())
}

#[test]
fn a_days_events_in_the_default_partition_move_to_its_partition_when_it_is_made() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let now = Timestamp::now().as_millis();
    let tomorrow = now - now.rem_euclid(DAY) + DAY;
    let writer = Store::open(&url)?;
    // Tomorrow's partition is gone (as if it could not be made): its
    // events wait in the default partition, and recording goes on.
    let mut conn = PgConnection::establish(&url)?;
    diesel::sql_query(format!("DROP TABLE {}", day_name(tomorrow)?)).execute(&mut conn)?;
    writer.events().record(&event(tomorrow + 5, "early")?)?;
    assert_eq!(partitions_of_events(&mut conn)?, ["events_default"]);
    // The next open makes the partition and moves the event into it.
    let store = Store::open(&url)?;
    assert_eq!(partitions_of_events(&mut conn)?, [day_name(tomorrow)?]);
    assert_eq!(store.events().list(&EventFilter::default())?.len(), 1);
    assert!(store.close()?.checkpoint_complete);
    assert!(writer.close()?.checkpoint_complete);
    Ok(())
}
