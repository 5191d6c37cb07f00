//! `keytally events …`.

use std::io::{BufRead, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
/// What the reader thread hands over: one line of stdin, or why there is
/// none.
enum Line {
    /// A line, without its newline.
    Text(String),
    /// A line longer than keytally reads: refused as soon as the limit is
    /// passed, without reading the rest.
    TooLong,
    /// A line that is not UTF-8.
    NotUtf8,
    /// Reading failed.
    Failed(std::io::Error),
}

/// Reads stdin line by line, at most `MAX_JSON_LINE_LEN` bytes a line,
/// until its end or the first line that cannot be read.
fn read_lines(sender: &mpsc::SyncSender<Line>, read: &AtomicU64) {
    let mut stdin = std::io::stdin().lock();
    let limit = keytally::MAX_JSON_LINE_LEN as u64 + 1;
    loop {
        let mut bytes = Vec::new();
        let line = match (&mut stdin).take(limit).read_until(b'\n', &mut bytes) {
            Ok(0) => return,
            Ok(n) => {
                read.fetch_add(n as u64, Ordering::Relaxed);
                if bytes.last() == Some(&b'\n') {
                    bytes.pop();
                    if bytes.last() == Some(&b'\r') {
                        bytes.pop();
                    }
                    String::from_utf8(bytes).map_or(Line::NotUtf8, Line::Text)
                } else if bytes.len() as u64 >= limit {
                    Line::TooLong
                } else {
                    String::from_utf8(bytes).map_or(Line::NotUtf8, Line::Text)
                }
            }
            Err(error) => Line::Failed(error),
        };
        let last = !matches!(line, Line::Text(_));
        if sender.send(line).is_err() || last {
            return;
        }
    }
}

/// What is left to read on stdin when it is a regular file (`< FILE`), so
/// that progress can show a total; `None` for a pipe or a terminal.
fn stdin_bytes_left() -> Option<u64> {
    use std::io::Seek;
    use std::os::fd::AsFd;
    let mut file = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned().ok()?);
    let metadata = file.metadata().ok()?;
    if !metadata.is_file() {
        return None;
    }
    let at = file.stream_position().ok()?;
    Some(metadata.len().saturating_sub(at))
}

/// A failed ingest: what went wrong at which line, how many events were
/// committed, and the line to resume from (`tail -n +LINE`) once it is
/// fixed, without duplicating what was committed.
fn ingest_failure(line: usize, resume_from: usize, committed: u64, reason: &str) -> Failure {
    Failure::Verdict {
        message: format!(
            "line {line}: {reason}; {} committed before it; once it is fixed, resume with \
             `tail -n +{resume_from} FILE | keytally events ingest`",
            parse::counted(committed, "event")
        ),
        json: json!({
            "error": reason,
            "line": line,
            "ingested": committed,
            "resume_from_line": resume_from,
        }),
    }
}

fn ingest(store: &Store, batch_size: usize, out: &Output) -> CliResult {
    if batch_size == 0 || batch_size > keytally::MAX_BATCH_LEN {
        return Err(keytally::Error::InvalidInput {
            field: "--batch",
            reason: format!("must be 1 to {}", keytally::MAX_BATCH_LEN),
        }
        .into());
    }
    // A bulk write into a damaged database would spread the damage: every
    // page is read first (about 0.7 s a million events).
    store.quick_check()?;
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
    let read = Arc::new(AtomicU64::new(0));
    let reader_count = Arc::clone(&read);
    std::thread::spawn(move || read_lines(&sender, &reader_count));
    // From a file, the size is known: a bar over its bytes; from a pipe, a
    // count of events and their rate.
    let bytes_total = stdin_bytes_left();
    let bar = match bytes_total {
        Some(total) => out.progress_bytes(total),
        None => out.progress("events"),
    };
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
                if bytes_total.is_some() {
                    bar.set_position(read.load(Ordering::Relaxed));
                    bar.set_message(parse::counted(committed, "event"));
                } else {
                    bar.set_position(committed);
                }
                pending.clear();
                Ok(())
            }
            // Nothing of the batch was written: resume at its first line.
            Err(keytally::Error::InvalidEvent { index, reason }) => Err(ingest_failure(
                first_line + index,
                first_line,
                committed,
                &reason,
            )),
            Err(error) => Err(ingest_failure(
                first_line,
                first_line,
                committed,
                &format!(
                    "the batch from this line was not committed: {}",
                    error.report()
                ),
            )),
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
        let line = match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        line_number += 1;
        let parsed = match line {
            Line::Text(text) if text.trim().is_empty() => continue,
            Line::Text(text) => keytally::parse_json_line(&text).map_err(|error| error.to_string()),
            Line::TooLong => Err(format!(
                "the line is longer than {} bytes",
                keytally::MAX_JSON_LINE_LEN
            )),
            Line::NotUtf8 => Err("the line is not valid UTF-8".to_owned()),
            Line::Failed(error) => Err(format!("stdin could not be read: {error}")),
        };
        match parsed {
            Ok(event) => {
                if pending.is_empty() {
                    first_pending_line = line_number;
                }
                pending.push(event);
                if pending.len() >= batch_size {
                    commit(&mut pending, first_pending_line)?;
                }
            }
            Err(reason) => {
                // What came before the bad line is committed, so the run
                // resumes at the bad line itself.
                commit(&mut pending, first_pending_line)?;
                bar.finish_and_clear();
                return Err(ingest_failure(line_number, line_number, committed, &reason));
            }
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
    let mut filter = EventFilter {
        key: key.as_deref().map(parse::key_id).transpose()?,
        model: model.clone(),
        since: since.as_deref().map(parse::time).transpose()?,
        until: until.as_deref().map(parse::time).transpose()?,
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
    // The library hands out at most MAX_PAGE_SIZE events a call; larger
    // listings go on from the last event of each page.
    let wanted = limit as usize;
    let mut events: Vec<Event> = Vec::new();
    while events.len() < wanted {
        let page_size = (wanted - events.len()).min(keytally::MAX_PAGE_SIZE as usize);
        filter.limit = Some(page_size as u32);
        filter.before = events.last().map(Event::cursor);
        let page = store.events().list(&filter)?;
        let done = page.len() < page_size;
        events.extend(page);
        if done {
            break;
        }
    }
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
        "{}  {}  {:<36}  {:<18} {:>3}  in {:>6} out {:>6}  {:>6} ms  {:>12}{}\n",
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
            .cost
            .map_or_else(|| "unpriced".to_owned(), |cost| cost.to_string()),
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
                "cost": totals.cost().to_string(),
                "unpriced_requests": totals.unpriced_requests,
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
        // The group column as wide as the longest group.
        let width = rows
            .iter()
            .map(|(group, _)| group.chars().count())
            .max()
            .unwrap_or(0)
            .max(36);
        let mut text = format!(
            "{:<width$} {:>9} {:>7} {:>13} {:>13} {:>10} {:>10} {:>14} {:>9}\n",
            "group",
            "requests",
            "errors",
            "prompt",
            "completion",
            "mean ms",
            "max ms",
            "cost",
            "unpriced"
        );
        for (group, t) in &rows {
            // A group of unpriced events alone has no cost to show, not 0.
            let cost = if t.requests > 0 && t.unpriced_requests == t.requests {
                "unpriced".to_owned()
            } else {
                t.cost().to_string()
            };
            text.push_str(&format!(
                "{:<width$} {:>9} {:>7} {:>13} {:>13} {:>10.0} {:>10} {:>14} {:>9}\n",
                group,
                t.requests,
                t.errors,
                t.prompt_tokens,
                t.completion_tokens,
                t.latency_ms_mean().unwrap_or(0.0),
                t.latency_ms_max,
                cost,
                t.unpriced_requests
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
