//! Printing: text for people, one JSON value for programs, errors on stderr,
//! and progress bars only on a terminal.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;

use super::Failure;

/// Where and how a command prints.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    json: bool,
}

impl Output {
    /// Text output, or JSON with `json`.
    pub fn new(json: bool) -> Output {
        Output { json }
    }

    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.json
    }

    /// Prints `value` as one line of JSON with `--json`, else `text()`.
    pub fn print<T: Serialize>(&self, value: &T, text: impl FnOnce() -> String) {
        if self.json {
            match serde_json::to_string(value) {
                Ok(line) => write_stdout(&line),
                Err(error) => eprintln!("keytally: cannot print JSON: {error}"),
            }
        } else {
            write_stdout(&text());
        }
    }

    /// Prints a failure on stderr.
    pub fn error(&self, failure: &Failure) {
        match (failure, self.json) {
            (Failure::Library(error), true) => {
                eprintln!("{}", json!({ "error": error.report() }))
            }
            (Failure::Library(error), false) => eprintln!("keytally: {}", error.report()),
            (Failure::Verdict { json, .. }, true) => eprintln!("{json}"),
            (Failure::Verdict { message, .. }, false) => eprintln!("keytally: {message}"),
        }
    }

    /// A spinner counting `unit` on stderr, with its rate, shown only when
    /// stderr is a terminal (as curl and pv do), so that it never mixes with
    /// output redirected to a file.
    pub fn progress(&self, unit: &'static str) -> ProgressBar {
        if !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new_spinner();
        let template = if unit.is_empty() {
            "{spinner} {msg} ({elapsed})".to_owned()
        } else {
            format!("{{spinner}} {{pos}} {unit} ({{rate}}, {{elapsed}}) {{msg}}")
        };
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style.with_key(
                "rate",
                |state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write| {
                    let _ = write!(out, "{:.0}/s", state.per_sec());
                },
            ));
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }

    /// A bar over `total` bytes on stderr, with the rate and the time left,
    /// and a message for what they hold; shown only when stderr is a
    /// terminal.
    pub fn progress_bytes(&self, total: u64) -> ProgressBar {
        if !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:30} {bytes}/{total_bytes} ({binary_bytes_per_sec}, {eta} left) {msg}",
        ) {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }
}

/// Writes `text` and a final newline to stdout. A reader that went away
/// (`keytally events list | head -1`) ends the output quietly, as it does
/// for other Unix tools: the command still finishes and closes the
/// database.
pub fn write_stdout(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let newline = if text.ends_with('\n') { "" } else { "\n" };
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.write_all(newline.as_bytes()))
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(error) => eprintln!("keytally: cannot write the output: {error}"),
    }
}
