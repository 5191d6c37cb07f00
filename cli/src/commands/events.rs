//! `keytally events …`.

use std::io::BufRead;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use keytally::{Bucket, Event, EventFilter, NewEvent, Store, Timestamp, Totals, UsageFilter};
use serde_json::json;

use super::{close, parse, CliResult, Failure, Output};
use crate::{EventsCommand, Grouping};

pub fn run(store: Store, command: &EventsCommand, out: &Output) -> CliResult {
    let outcome = match command {
        EventsCommand::Ingest { batch } => ingest(&store, *batch, out),
        EventsCommand::List {
            key,
            model,
            since,
            until,
            limit,
        } => list(&store, key, model, since, until, *limit, out),
        EventsCommand::Usage {
            key,
            model,
            since,
            until,
            by,
        } => usage(&store, key, model, since, until.as_deref(), *by, out),
        EventsCommand::Prune { older_than, batch } => prune(&store, older_than, *batch, out),
    };
    close(store, outcome)
}

/// One line read from stdin, or the read error.
type Line = std::io::Result<String>;

fn ingest(store: &Store, batch_size: usize, out: &Output) -> CliResult {
    if batch_size == 0 || batch_size > keytally::MAX_BATCH_LEN {
        return Err(keytally::Error::InvalidInput {
            field: "--batch",
            reason: format!("must be 1 to {}", keytally::MAX_BATCH_LEN),
        }
        .into());
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted)).map_err(|source| {
            keytally::Error::Io {
                path: "(signal handler)".into(),
                source,
            }
        })?;
    }
    // Lines are read on their own thread so that a signal is noticed even
    // while stdin has nothing to say.
    let (sender, lines) = mpsc::sync_channel::<Line>(4 * batch_size);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let bar = out.progress("events");
    let mut committed: u64 = 0;
    let mut pending: Vec<NewEvent> = Vec::with_capacity(batch_size);
    let mut first_pending_line = 1;
    let mut line_number = 0;
    let mut commit = |pending: &mut Vec<NewEvent>, first_line: usize| -> CliResult {
        if pending.is_empty() {
            return Ok(());
        }
        match store.events().record_batch(pending) {
            Ok(_) => {
                committed += pending.len() as u64;
                bar.set_position(committed);
                pending.clear();
                Ok(())
            }
            Err(keytally::Error::InvalidEvent { index, reason }) => Err(Failure::Verdict {
                message: format!(
                    "line {}: {reason}; {} committed before it",
                    first_line + index,
                    parse::counted(committed, "event")
                ),
                json: json!({
                    "error": reason,
                    "line": first_line + index,
                    "ingested": committed,
                }),
            }),
            Err(error) => Err(error.into()),
        }
    };
    loop {
        if interrupted.load(Ordering::Relaxed) {
            commit(&mut pending, first_pending_line)?;
            bar.finish_and_clear();
            return Err(Failure::Verdict {
                message: format!(
                    "interrupted: {} committed, the store closed cleanly",
                    parse::counted(committed, "event")
                ),
                json: json!({ "error": "interrupted", "ingested": committed }),
            });
        }
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(line)) => {
                line_number += 1;
                if line.trim().is_empty() {
                    continue;
                }
                match keytally::parse_json_line(&line) {
                    Ok(event) => {
                        if pending.is_empty() {
                            first_pending_line = line_number;
                        }
                        pending.push(event);
                        if pending.len() >= batch_size {
                            commit(&mut pending, first_pending_line)?;
                        }
                    }
                    Err(error) => {
                        commit(&mut pending, first_pending_line)?;
                        bar.finish_and_clear();
                        return Err(Failure::Verdict {
                            message: format!(
                                "line {line_number}: {error}; {} committed before it",
                                parse::counted(committed, "event")
                            ),
                            json: json!({
                                "error": error.to_string(),
                                "line": line_number,
                                "ingested": committed,
                            }),
                        });
                    }
                }
            }
            Ok(Err(error)) => {
                commit(&mut pending, first_pending_line)?;
                return Err(keytally::Error::Io {
                    path: "(stdin)".into(),
                    source: error,
                }
                .into());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    commit(&mut pending, first_pending_line)?;
    bar.finish_and_clear();
    out.print(&json!({ "ingested": committed }), || {
        format!("ingested {}", parse::counted(committed, "event"))
    });
    Ok(())
}

fn list(
    store: &Store,
    key: &Option<String>,
    model: &Option<String>,
    since: &Option<String>,
    until: &Option<String>,
    limit: u32,
    out: &Output,
) -> CliResult {
    let filter = EventFilter {
        key: key.as_deref().map(parse::key_id).transpose()?,
        model: model.clone(),
        since: since.as_deref().map(parse::time).transpose()?,
        until: until.as_deref().map(parse::time).transpose()?,
        limit: Some(limit),
        ..EventFilter::default()
    };
    if let (Some(since), Some(until)) = (filter.since, filter.until) {
        if until < since {
            return Err(keytally::Error::InvalidInput {
                field: "until",
                reason: format!("{until} is before since ({since})"),
            }
            .into());
        }
    }
    let events = store.events().list(&filter)?;
    out.print(&events, || {
        if events.is_empty() {
            return "no events".to_owned();
        }
        events.iter().map(event_line).collect()
    });
    Ok(())
}

fn event_line(event: &Event) -> String {
    format!(
        "{}  {}  {:<36}  {:<18} {:>3}  in {:>6} out {:>6}  {:>6} ms{}\n",
        event.id,
        event.ts,
        event
            .key_id
            .map_or_else(|| "(no key)".to_owned(), |id| id.to_string()),
        event.model,
        event.status,
        event.prompt_tokens,
        event.completion_tokens,
        event.latency_ms,
        event
            .error
            .as_deref()
            .map_or_else(String::new, |e| format!("  {e}")),
    )
}

fn usage(
    store: &Store,
    key: &Option<String>,
    model: &Option<String>,
    since: &str,
    until: Option<&str>,
    by: Option<Grouping>,
    out: &Output,
) -> CliResult {
    let filter = UsageFilter {
        key: key.as_deref().map(parse::key_id).transpose()?,
        model: model.clone(),
        since: parse::time(since)?,
        until: until
            .map(parse::time)
            .transpose()?
            .unwrap_or_else(Timestamp::now),
    };
    let rows: Vec<(String, Totals)> = match by {
        None => vec![("total".to_owned(), store.events().usage(&filter)?)],
        Some(Grouping::Model) => store
            .events()
            .usage_by_model(&filter)?
            .into_iter()
            .map(|g| (g.group, g.totals))
            .collect(),
        Some(Grouping::Key) => store
            .events()
            .usage_by_key(&filter)?
            .into_iter()
            .map(|g| {
                (
                    g.group
                        .map_or_else(|| "(no key)".to_owned(), |id| id.to_string()),
                    g.totals,
                )
            })
            .collect(),
        Some(grouping @ (Grouping::Hour | Grouping::Day)) => {
            let bucket = if grouping == Grouping::Day {
                Bucket::Day
            } else {
                Bucket::Hour
            };
            store
                .events()
                .usage_series(&filter, bucket)?
                .into_iter()
                .map(|g| (g.group.to_string(), g.totals))
                .collect()
        }
    };
    let json_rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|(group, totals)| {
            json!({
                "group": group,
                "requests": totals.requests,
                "errors": totals.errors,
                "prompt_tokens": totals.prompt_tokens,
                "completion_tokens": totals.completion_tokens,
                "cache_read_tokens": totals.cache_read_tokens,
                "cache_creation_tokens": totals.cache_creation_tokens,
                "reasoning_tokens": totals.reasoning_tokens,
                "latency_ms_mean": totals.latency_ms_mean(),
                "latency_ms_max": totals.latency_ms_max,
            })
        })
        .collect();
    let value = json!({
        "since": filter.since,
        "until": filter.until,
        "by": by.map_or("total", Grouping::name),
        "rows": json_rows,
    });
    out.print(&value, || {
        let mut text = format!(
            "{:<36} {:>9} {:>7} {:>13} {:>13} {:>10} {:>10}\n",
            "group", "requests", "errors", "prompt", "completion", "mean ms", "max ms"
        );
        for (group, t) in &rows {
            text.push_str(&format!(
                "{:<36} {:>9} {:>7} {:>13} {:>13} {:>10.0} {:>10}\n",
                group,
                t.requests,
                t.errors,
                t.prompt_tokens,
                t.completion_tokens,
                t.latency_ms_mean().unwrap_or(0.0),
                t.latency_ms_max
            ));
        }
        text
    });
    Ok(())
}

fn prune(store: &Store, older_than: &str, batch: u32, out: &Output) -> CliResult {
    let age = parse::duration(older_than)?;
    if age.is_zero() {
        out.print(&json!({ "deleted": 0, "kept": "forever" }), || {
            "retention 0 keeps every event; nothing pruned".to_owned()
        });
        return Ok(());
    }
    let cutoff = parse::ago_from_now(age);
    let bar = out.progress("events deleted");
    let report = store
        .events()
        .prune_with_progress(cutoff, batch, |deleted| bar.set_position(deleted))?;
    bar.finish_and_clear();
    out.print(
        &json!({ "deleted": report.events_deleted, "batches": report.batches, "cutoff": cutoff }),
        || {
            format!(
                "deleted {} older than {cutoff}",
                parse::counted(report.events_deleted, "event")
            )
        },
    );
    Ok(())
}
