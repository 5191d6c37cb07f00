//! `keytally status | migrate | check | checkpoint | backup | restore | demo`.

use std::path::Path;
use std::sync::Arc;

use keytally::{
    Bucket, EventSink, NewEvent, NewKey, SinkOptions, Store, StoreOptions, Timestamp, UsageFilter,
};
use serde_json::json;

use super::{close, CliResult, Failure, Output};

/// Items joined by commas, or `(none)`.
fn list(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_owned()
    } else {
        items.join(", ")
    }
}

pub fn status(store: &Store, out: &Output) -> CliResult {
    if store.backend() == keytally::Backend::Postgres {
        return postgres_status(store, out);
    }
    let status = store.status()?;
    // Opening the store applied any migration this database lacked: say so.
    let migrated = store.applied_at_open();
    let mut value = json!(status);
    value["migrated_now"] = json!(migrated);
    out.print(&value, || {
        let mut text = format!(
            "path:               {}\nsqlite_version:     {}\njournal_mode:       {}\nsynchronous:        {}\nforeign_keys:       {}\napplication_id:     {:#010x}\nuser_version:       {}\nschema_version:     {}\nmigrated now:       {}\npending_migrations: {}\nfiles:\n",
            status.path.display(),
            status.sqlite_version,
            status.journal_mode,
            status.synchronous,
            status.foreign_keys,
            status.application_id,
            status.user_version,
            status.schema_version.as_deref().unwrap_or("(none)"),
            list(migrated),
            list(&status.pending_migrations),
        );
        for file in &status.files {
            text.push_str(&format!("  {}  {}  {} bytes\n", file.mode, file.name, file.bytes));
        }
        text
    });
    Ok(())
}

fn postgres_status(store: &Store, out: &Output) -> CliResult {
    let status = store.postgres_status()?;
    let migrated = store.applied_at_open();
    let mut value = json!(status);
    value["backend"] = json!("postgres");
    value["migrated_now"] = json!(migrated);
    out.print(&value, || {
        format!(
            "backend:            PostgreSQL\nurl:                {}\nserver_version:     {}\ndatabase:           {}\nuser:               {}\nschema:             {}\nschema_version:     {}\nmigrated now:       {}\npending_migrations: {}\ndatabase_bytes:     {}\ntables_bytes:       {}\n",
            status.url,
            status.server_version,
            status.database,
            status.user,
            status.schema,
            status.schema_version.as_deref().unwrap_or("(none)"),
            list(migrated),
            list(&status.pending_migrations),
            status.database_bytes,
            status.tables_bytes,
        )
    });
    Ok(())
}

pub fn migrate(store: &Store, out: &Output) -> CliResult {
    let applied = store.applied_at_open();
    out.print(&json!({ "applied": applied }), || {
        if applied.is_empty() {
            "schema is current; nothing to apply".to_owned()
        } else {
            applied
                .iter()
                .map(|name| format!("applied {name}\n"))
                .collect()
        }
    });
    Ok(())
}

pub fn migrate_dry_run(path: &Path, out: &Output) -> CliResult {
    report_pending(&keytally::pending_for(path)?, out)
}

/// Prints the migrations a `migrate` would apply.
pub fn report_pending(pending: &[String], out: &Output) -> CliResult {
    out.print(&json!({ "pending": pending, "dry_run": true }), || {
        if pending.is_empty() {
            "schema is current; nothing would be applied".to_owned()
        } else {
            pending
                .iter()
                .map(|version| format!("would apply {version}\n"))
                .collect()
        }
    });
    Ok(())
}

pub fn check(store: &Store, out: &Output) -> CliResult {
    let report = store.check()?;
    if report.healthy() {
        let postgres = store.backend() == keytally::Backend::Postgres;
        out.print(&report, || {
            if postgres {
                format!(
                    "ok: keytally mark, schema {}, counters and sequence present, every constraint validated, no orphaned secrets",
                    report.schema_version.as_deref().unwrap_or("(none)")
                )
            } else {
                format!(
                    "ok: integrity_check ok, no foreign key violations, application id {:#010x}, schema {}, file modes 0600",
                    report.application_id,
                    report.schema_version.as_deref().unwrap_or("(none)")
                )
            }
        });
        return Ok(());
    }
    if out.json() {
        super::output::write_stdout(&json!(report).to_string());
    }
    Err(Failure::Verdict {
        message: format!("check found problems:\n  {}", report.problems.join("\n  ")),
        json: json!({ "error": "check failed", "problems": report.problems }),
    })
}

pub fn checkpoint(store: &Store, out: &Output) -> CliResult {
    let report = store.checkpoint()?;
    out.print(&report, || {
        if report.complete {
            format!(
                "checkpoint complete: {} frames copied, log emptied",
                report.checkpointed_frames
            )
        } else {
            format!(
                "checkpoint incomplete: {} of {} frames copied; another connection is reading",
                report.checkpointed_frames, report.log_frames
            )
        }
    });
    if report.complete {
        Ok(())
    } else {
        Err(Failure::Verdict {
            message: "the checkpoint could not complete; try again when readers are done"
                .to_owned(),
            json: json!({ "error": "checkpoint incomplete", "report": report }),
        })
    }
}

pub fn backup(store: &Store, dest: &Path, force: bool, out: &Output) -> CliResult {
    let total = std::fs::metadata(store.path()).map_or(0, |metadata| metadata.len());
    let bar = out.progress_bytes(total);
    bar.set_message(format!("backing up to {}", dest.display()));
    let report = store.backup_with_progress(dest, force, |written, _| bar.set_position(written));
    bar.finish_and_clear();
    let report = report?;
    out.print(&report, || {
        format!(
            "backup written to {} ({} bytes, schema {}), verified with integrity_check",
            report.path.display(),
            report.bytes,
            report.schema_version.as_deref().unwrap_or("(none)")
        )
    });
    Ok(())
}

pub fn restore(path: &Path, src: &Path, out: &Output) -> CliResult {
    let bar = out.progress("");
    bar.set_message(format!("restoring {}", src.display()));
    let report = keytally::restore(path, src, &StoreOptions::new(path));
    bar.finish_and_clear();
    let report = report?;
    out.print(&report, || {
        format!(
            "restored {} from {}{}",
            report.path.display(),
            src.display(),
            report
                .previous
                .as_ref()
                .map_or_else(String::new, |p| format!(
                    "; the previous database is kept as {}",
                    p.display()
                ))
        )
    });
    Ok(())
}

/// Creates a key, resolves it, records a few thousand events through the
/// batching sink, and prints usage by model and by hour.
/// Runs the demo on a new database in a temporary folder, removed after.
pub fn demo_on_a_temporary_database(out: &Output) -> CliResult {
    let folder = tempfile::Builder::new()
        .prefix("keytally-demo-")
        .tempdir()
        .map_err(|source| keytally::Error::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let store = Store::open(folder.path().join(keytally::DB_FILE_NAME))?;
    let outcome = demo(store, Some("a temporary database, removed afterwards"), out);
    drop(folder);
    outcome
}

/// Shows the library working on `store`: a key, a resolve, 5,000 events
/// through the sink, usage, a revoke. `temporary` says why the database is
/// not the operator's, if it is not.
pub fn demo(store: Store, temporary: Option<&str>, out: &Output) -> CliResult {
    let store = Arc::new(store);
    let outcome = run_demo(&store, temporary, out);
    let store = Arc::into_inner(store).ok_or_else(|| Failure::Verdict {
        message: "the demo still held the store".to_owned(),
        json: json!({ "error": "internal" }),
    })?;
    close(store, outcome)
}

fn run_demo(store: &Arc<Store>, temporary: Option<&str>, out: &Output) -> CliResult {
    const MODELS: [&str; 4] = ["gpt-4o", "o3", "claude-sonnet-4", "gemini-2.5-pro"];
    const EVENTS: u64 = 5_000;
    let database = store.path().display().to_string();
    let mut log = vec![match temporary {
        Some(why) => format!("demo database: {database} ({why}; pass --db to keep one)"),
        None => format!("demo database: {database}"),
    }];
    let created = store.keys().create(&NewKey::client("keytally demo"))?;
    log.push(format!(
        "created key {} ({}…)",
        created.key.id, created.key.display_prefix
    ));
    let resolved = store
        .keys()
        .resolve(created.secret.expose())?
        .map_err(|rejection| Failure::Verdict {
            message: format!("the demo key was rejected: {rejection}"),
            json: json!({ "error": rejection.as_str() }),
        })?;
    log.push(format!(
        "resolved its secret to key {} ({})",
        resolved.id, resolved.tier
    ));
    let sink = EventSink::new(Arc::clone(store), SinkOptions::default())?;
    let now = Timestamp::now().as_millis();
    let start = now - 6 * 3_600_000;
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    for i in 0..EVENTS {
        let ts = start + (i as i64) * (6 * 3_600_000 / EVENTS as i64);
        let mut event = NewEvent::new(Timestamp::from_millis(ts)?, MODELS[next(4) as usize]);
        event.key_id = Some(resolved.id);
        event.prompt_tokens = 50 + next(3000) as i64;
        event.completion_tokens = 10 + next(800) as i64;
        event.latency_ms = 200 + next(4000) as i64;
        if next(50) == 0 {
            event.status = 429;
            event.error = Some("rate_limited".to_owned());
        }
        sink.submit(&event)?;
    }
    let report = sink.close()?;
    log.push(format!(
        "recorded {} events through the batching sink in {} transactions",
        report.committed, report.batches
    ));
    let window = UsageFilter {
        key: Some(resolved.id),
        ..UsageFilter::between(
            Timestamp::from_millis(start)?,
            Timestamp::now().plus_millis(1),
        )
    };
    let by_model = store.events().usage_by_model(&window)?;
    let by_hour = store.events().usage_series(&window, Bucket::Hour)?;
    store.keys().revoke(resolved.id)?;
    log.push("revoked the demo key".to_owned());
    out.print(
        &json!({
            "database": database,
            "temporary": temporary.is_some(),
            "key": created.key.id,
            "events": report.committed,
            "by_model": by_model,
            "by_hour": by_hour,
        }),
        || {
            let mut text: String = log.iter().map(|line| format!("{line}\n")).collect();
            text.push_str("\nusage by model:\n");
            for group in &by_model {
                text.push_str(&format!(
                    "  {:<16} {:>5} requests {:>9} prompt {:>8} completion {:>3} errors\n",
                    group.group,
                    group.totals.requests,
                    group.totals.prompt_tokens,
                    group.totals.completion_tokens,
                    group.totals.errors
                ));
            }
            text.push_str("\nusage by hour:\n");
            for point in &by_hour {
                text.push_str(&format!(
                    "  {}  {:>5} requests  mean latency {:>5.0} ms\n",
                    point.group,
                    point.totals.requests,
                    point.totals.latency_ms_mean().unwrap_or(0.0)
                ));
            }
            text
        },
    );
    Ok(())
}
