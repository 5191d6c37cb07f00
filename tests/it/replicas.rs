//! Three replicas of a gateway on one PostgreSQL database, each a process
//! (`examples/replica.rs`) with threads that resolve, record and change
//! keys at once: no error surfaces, no acknowledged event is lost, the
//! rollups and every key's budget spend equal a recount of the raw events,
//! and no resolve that started
//! after a revoke had committed accepted the key.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::process::{Command, Stdio};

use diesel::sql_types::{Nullable, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use keytally::testing::postgres;
use keytally::{Budget, BudgetPeriod, Cost, NewKey, Store};

use crate::support::crash_writer::example;
use crate::support::spend::{budgets_hold, price_model};
use crate::support::sql::Raw;
use crate::TestResult;

const REPLICAS: usize = 3;
const KEYS: usize = 30;
const MILLIS: u64 = 3_000;

#[derive(QueryableByName)]
struct RequestId {
    #[diesel(sql_type = Nullable<Text>)]
    request_id: Option<String>,
}

#[test]
fn three_replicas_lose_nothing_and_never_accept_a_revoked_key() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let store = Store::open(&url)?;
    // One of the two models is priced, and every key has a budget that its
    // events never reach, and a soft limit that they do.
    price_model(&store, "m1")?;
    let mut budget = Budget::new(Cost(i64::MAX / 2), BudgetPeriod::Day);
    budget.soft_limit = Some(Cost(1_000_000));
    let mut shared = String::new();
    for i in 0..KEYS {
        let created = store.keys().create(&NewKey {
            budget: Some(budget),
            ..NewKey::client(format!("shared {i}"))
        })?;
        shared.push_str(&format!("{} {}\n", created.key.id, created.secret.expose()));
    }
    assert!(store.close()?.checkpoint_complete);

    let program = example("replica")?;
    let children = (0..REPLICAS)
        .map(|replica| -> Result<_, Box<dyn std::error::Error>> {
            let mut child = Command::new(&program)
                .args([
                    url.as_str(),
                    &replica.to_string(),
                    &REPLICAS.to_string(),
                    &MILLIS.to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            child
                .stdin
                .take()
                .ok_or("no stdin")?
                .write_all(shared.as_bytes())?;
            Ok(child)
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut revoked: HashMap<String, u128> = HashMap::new();
    let mut accepted: Vec<(String, u128)> = Vec::new();
    for child in children {
        let output = child.wait_with_output()?;
        assert!(output.status.success(), "{output:?}");
        let text = String::from_utf8(output.stdout)?;
        assert!(text.ends_with("done\n"), "{text}");
        let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error")).collect();
        assert!(errors.is_empty(), "errors surfaced: {errors:#?}");
        let mut acked_here = 0;
        for line in text.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["ack", request] => {
                    assert!(acked.insert((*request).to_owned()), "{request} twice");
                    acked_here += 1;
                }
                ["revoked", key, at] => {
                    let at: u128 = at.parse()?;
                    let first = revoked.entry((*key).to_owned()).or_insert(at);
                    *first = (*first).min(at);
                }
                ["accepted", key, at] => accepted.push(((*key).to_owned(), at.parse()?)),
                _ => {}
            }
        }
        assert!(acked_here > 0, "a replica recorded nothing");
    }
    assert!(!revoked.is_empty(), "no key was revoked");
    eprintln!(
        "{} events acknowledged, {} keys revoked, {} keys accepted by some resolve",
        acked.len(),
        revoked.len(),
        accepted.len()
    );

    // No resolve that started after a revoke had returned accepted the key.
    for (key, started) in &accepted {
        if let Some(revoked_at) = revoked.get(key) {
            assert!(
                started < revoked_at,
                "key {key} accepted by a resolve that started {} ns after its revoke",
                started - revoked_at
            );
        }
    }

    let mut conn = PgConnection::establish(&url)?;
    // Every acknowledged event is there, and nothing else.
    let stored: BTreeSet<String> = diesel::sql_query("SELECT request_id FROM events")
        .load::<RequestId>(&mut conn)?
        .into_iter()
        .filter_map(|row| row.request_id)
        .collect();
    assert_eq!(stored.len(), acked.len());
    assert!(stored == acked, "acknowledged events lost");
    // The rollups equal a recount of the raw events.
    let mut raw = Raw::Postgres(conn);
    assert_eq!(
        raw.rollups_against_recount()?,
        0,
        "rollups differ from a recount"
    );
    // So does every key's spend, raced for by the replicas.
    let store = Store::open(&url)?;
    let checked = budgets_hold(&store, &mut raw, 0, "after the replicas")?;
    assert_eq!((checked.budgets, checked.reached), (KEYS, 0));
    let _ = store.close()?;
    Ok(())
}
