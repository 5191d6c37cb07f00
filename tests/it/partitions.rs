//! Raw events on PostgreSQL in monthly partitions: made ahead of the clock
//! when a store opens, filled by recording, dropped whole by pruning; a
//! month whose events wait in the default partition gets them back when
//! its partition is made.

use chrono::{DateTime, Datelike, Months, NaiveDate};
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

/// The first day of the month `millis` falls in, `later` months on.
fn month_start(millis: i64, later: u32) -> Result<NaiveDate, Box<dyn std::error::Error>> {
    let date = DateTime::from_timestamp_millis(millis)
        .ok_or("out of range")?
        .date_naive();
    Ok(date
        .with_day(1)
        .ok_or("no first day")?
        .checked_add_months(Months::new(later))
        .ok_or("out of range")?)
}

fn millis_of(date: NaiveDate) -> Result<i64, Box<dyn std::error::Error>> {
    Ok(date
        .and_hms_opt(0, 0, 0)
        .ok_or("no midnight")?
        .and_utc()
        .timestamp_millis())
}

/// The partition an event at `millis` belongs in, when the store made
/// those of the month of `now` and the next.
fn partition_for(millis: i64, now: i64) -> Result<String, Box<dyn std::error::Error>> {
    let month = month_start(millis, 0)?;
    if month == month_start(now, 0)? || month == month_start(now, 1)? {
        Ok(format!("events_m{}", month.format("%Y%m")))
    } else {
        Ok("events_default".to_owned())
    }
}

fn event(ts: i64, request: &str) -> Result<NewEvent, keytally::Error> {
    let mut event = NewEvent::new(Timestamp::from_millis(ts)?, "gpt-4o");
    event.request_id = Some(request.to_owned());
    event.prompt_tokens = 10;
    Ok(event)
}

#[test]
fn events_land_in_their_months_partition_and_pruning_drops_whole_months() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let store = Store::open(&url)?;
    let now = Timestamp::now().as_millis();
    let times = [
        (now - 70 * DAY, "a-old"),
        (now - DAY, "b-yesterday"),
        (now, "c-now"),
        (millis_of(month_start(now, 1)?)? + DAY, "d-next-month"),
        (millis_of(month_start(now, 3)?)?, "e-far-ahead"),
    ];
    let batch = times
        .iter()
        .map(|(ts, request)| event(*ts, request))
        .collect::<Result<Vec<_>, _>>()?;
    store.events().record_batch(&batch)?;
    let mut conn = PgConnection::establish(&url)?;
    let expected = times
        .iter()
        .map(|(ts, _)| partition_for(*ts, now))
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(partitions_of_events(&mut conn)?, expected);
    assert!(expected.contains(&"events_default".to_owned()));
    // Pruning everything before the month after next: both partitions are
    // dropped whole, and the default partition's old events deleted.
    let cutoff = millis_of(month_start(now, 2)?)?;
    let report = store.events().prune(Timestamp::from_millis(cutoff)?, 10)?;
    assert_eq!(report.events_deleted, 4);
    assert_eq!(partitions_of_events(&mut conn)?, ["events_default"]);
    assert_eq!(store.events().list(&EventFilter::default())?.len(), 1);
    // The rollups keep what was pruned.
    let totals = store.events().usage(&keytally::UsageFilter::between(
        Timestamp::from_millis(now - 71 * DAY)?,
        Timestamp::from_millis(millis_of(month_start(now, 4)?)?)?,
    ))?;
    assert_eq!(totals.requests, 5);
    assert!(store.close()?.checkpoint_complete);
    // The next open makes this month's and next month's partitions again.
    let store = Store::open(&url)?;
    store.events().record(&event(now, "f-again")?)?;
    assert_eq!(
        partitions_of_events(&mut conn)?,
        ["events_default".to_owned(), partition_for(now, now)?]
    );
    assert!(store.close()?.checkpoint_complete);
    Ok(())
}

#[test]
fn a_months_events_in_the_default_partition_move_to_its_partition_when_it_is_made() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let now = Timestamp::now().as_millis();
    let next_month = millis_of(month_start(now, 1)?)?;
    let next_name = partition_for(next_month, now)?;
    let writer = Store::open(&url)?;
    // Next month's partition is gone (as if it could not be made): its
    // events wait in the default partition, and recording goes on.
    let mut conn = PgConnection::establish(&url)?;
    diesel::sql_query(format!("DROP TABLE {next_name}")).execute(&mut conn)?;
    writer.events().record(&event(next_month + 5, "early")?)?;
    assert_eq!(partitions_of_events(&mut conn)?, ["events_default"]);
    // The next open makes the partition and moves the event into it.
    let store = Store::open(&url)?;
    assert_eq!(partitions_of_events(&mut conn)?, [next_name]);
    assert_eq!(store.events().list(&EventFilter::default())?.len(), 1);
    assert!(store.close()?.checkpoint_complete);
    assert!(writer.close()?.checkpoint_complete);
    Ok(())
}
