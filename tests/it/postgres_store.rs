//! What is particular to PostgreSQL: the commands only SQLite has refuse
//! clearly, no password is shown, a database that is not keytall's (or is
//! a newer keytally's) is refused untouched, and replicas that start at
//! once apply each migration once.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel::{Connection, PgConnection};
use keytally::testing::postgres;
use keytally::{Error, Store};

use crate::support::binary::{json_of, keytally, run, stderr_json, BIN};
use crate::TestResult;

/// A fresh database's URL with a password in it, which the test server
/// (trust authentication) does not ask for.
fn url_with_password() -> Result<String, Box<dyn std::error::Error>> {
    let url = postgres::server()?.fresh_database()?;
    Ok(url.replacen("postgres://postgres@", "postgres://postgres:hunter2@", 1))
}

#[test]
fn sqlite_only_commands_refuse_with_exit_1_and_say_what_to_use() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let db = PathBuf::from(&url);
    assert!(run(&db, &["migrate"], "")?.status.success());
    let folder = tempfile::tempdir()?;
    let file = folder.path().join("copy.db");
    let file = file.to_str().ok_or("not UTF-8")?;
    for args in [
        vec!["backup", file],
        vec!["restore", file],
        vec!["checkpoint"],
    ] {
        let output = run(&db, &args, "")?;
        assert_eq!(output.status.code(), Some(1), "{args:?}: {output:?}");
        let error = stderr_json(&output)?["error"]
            .as_str()
            .ok_or("no error")?
            .to_owned();
        assert!(error.contains("only on an SQLite store"), "{error}");
        assert!(error.contains("pg_dump"), "{error}");
    }
    assert!(!std::path::Path::new(file).exists());
    Ok(())
}

#[test]
fn no_password_is_shown_in_status_errors_or_logs() -> TestResult {
    let url = url_with_password()?;
    let db = PathBuf::from(&url);
    let migrated = Command::new(BIN)
        .args(["--db", &url, "migrate"])
        .env("KEYTALLY_LOG", "debug")
        .output()?;
    assert!(migrated.status.success(), "{migrated:?}");
    let status = run(&db, &["status"], "")?;
    assert!(status.status.success(), "{status:?}");
    let status = json_of(&status)?;
    assert_eq!(status["backend"], "postgres");
    assert!(status["url"]
        .as_str()
        .ok_or("no url")?
        .contains("postgres:***@"));
    // Not even in --help, when the URL comes from the environment.
    let help = Command::new(BIN)
        .arg("--help")
        .env("KEYTALLY_DB", &url)
        .output()?;
    // A server that is not there: the error names the database, not the
    // password.
    let unreachable = url_with_password()?.replace("host=/", "host=/nonexistent/");
    let refused = keytally(&["--db", &unreachable, "keys", "list"])?;
    assert_eq!(refused.status.code(), Some(1));
    for output in [&migrated, &help, &refused] {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!text.contains("hunter2"), "{text}");
    }
    let debug = format!("{:?}", keytally::StoreOptions::new(&url));
    assert!(!debug.contains("hunter2"), "{debug}");
    Ok(())
}

#[test]
fn reading_commands_refuse_a_database_without_keytally_schema() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let output = keytally(&["--db", &url, "keys", "list"])?;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8(output.stderr)?.contains("no keytally schema"));
    // Nothing was created.
    let mut conn = PgConnection::establish(&url)?;
    let tables = crate::support::sql::count_tables(&mut conn)?;
    assert_eq!(tables, 0);
    Ok(())
}

#[test]
fn another_applications_database_and_a_newer_schema_are_refused_untouched() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let mut conn = PgConnection::establish(&url)?;
    conn.batch_execute("CREATE TABLE invoices (id BIGINT PRIMARY KEY)")?;
    let refused = Store::open(&url);
    assert!(
        matches!(&refused, Err(Error::Foreign { detail, .. }) if detail.contains("invoices")),
        "{refused:?}"
    );
    assert_eq!(crate::support::sql::count_tables(&mut conn)?, 1);

    let url = postgres::server()?.fresh_database()?;
    let store = Store::open(&url)?;
    assert!(store.close()?.checkpoint_complete);
    let mut conn = PgConnection::establish(&url)?;
    conn.batch_execute(
        "INSERT INTO __diesel_schema_migrations (version) VALUES ('29991231000000')",
    )?;
    let before = crate::support::sql::count_tables(&mut conn)?;
    let refused = Store::open(&url);
    assert!(
        matches!(&refused, Err(Error::SchemaTooNew { unknown, .. }) if unknown == &["29991231000000"]),
        "{refused:?}"
    );
    assert_eq!(crate::support::sql::count_tables(&mut conn)?, before);
    Ok(())
}

#[test]
fn an_extension_in_the_schema_does_not_make_it_anothers() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let mut conn = PgConnection::establish(&url)?;
    // Its views land in the schema; it needs no preloading to be created.
    conn.batch_execute("CREATE EXTENSION pg_stat_statements")?;
    let store = Store::open(&url)?;
    store
        .keys()
        .create(&keytally::NewKey::client("beside an extension"))?;
    assert!(store.close()?.checkpoint_complete);
    // A view of the application's own is another matter.
    let url = postgres::server()?.fresh_database()?;
    let mut conn = PgConnection::establish(&url)?;
    conn.batch_execute("CREATE VIEW invoices AS SELECT 1 AS id")?;
    let refused = Store::open(&url);
    assert!(
        matches!(&refused, Err(Error::Foreign { detail, .. }) if detail.contains("invoices")),
        "{refused:?}"
    );
    Ok(())
}

#[test]
fn four_processes_opening_a_fresh_database_at_once_apply_each_migration_once() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let children = (0..4)
        .map(|_| {
            Command::new(BIN)
                .args(["--db", &url, "--json", "migrate"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut applied = 0;
    for child in children {
        let output = child.wait_with_output()?;
        assert!(output.status.success(), "{output:?}");
        applied += json_of(&output)?["applied"]
            .as_array()
            .ok_or("no applied list")?
            .len();
    }
    let known = MigrationSource::<Pg>::migrations(&keytally::POSTGRES_MIGRATIONS)
        .map_err(|e| e.to_string())?
        .len();
    assert_eq!(applied, known, "each migration applied exactly once");
    let mut conn = PgConnection::establish(&url)?;
    let rows = crate::support::sql::count(&mut conn, "__diesel_schema_migrations")?;
    assert_eq!(rows, known as i64);
    Ok(())
}
