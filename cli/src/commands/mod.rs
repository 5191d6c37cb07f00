//! The commands of the `keytally` binary. No SQL here: everything goes
//! through the library.

mod events;
mod keys;
mod ops;
mod output;
mod parse;
mod prices;

use std::path::{Path, PathBuf};

pub use output::Output;

use crate::{Cli, Command, EventsCommand, KeysCommand, PricesCommand};

/// Why a command failed: a library error, or a verdict the command reports
/// (a rejected secret, a failed check).
#[derive(Debug)]
pub enum Failure {
    /// The library returned an error.
    Library(keytally::Error),
    /// The command ran and its answer is a failure.
    Verdict {
        /// The message for stderr.
        message: String,
        /// The JSON object printed on stderr with `--json`.
        json: serde_json::Value,
    },
}

impl From<keytally::Error> for Failure {
    fn from(error: keytally::Error) -> Self {
        Failure::Library(error)
    }
}

impl From<keytally::Invalid> for Failure {
    fn from(invalid: keytally::Invalid) -> Self {
        Failure::Library(invalid.into())
    }
}

/// The result of a command.
pub type CliResult<T = ()> = Result<T, Failure>;

/// Sends the library's log lines (warnings by default, `KEYTALLY_LOG` to
/// change) to stderr.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYTALLY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn database_path(cli: &Cli) -> Result<PathBuf, keytally::Error> {
    cli.db
        .clone()
        .or_else(keytally::default_database_path)
        .ok_or_else(|| keytally::Error::InvalidInput {
            field: "--db",
            reason: "no database path: pass --db PATH, or set KEYTALLY_DB, XDG_DATA_HOME or HOME"
                .to_owned(),
        })
}

/// Runs the command `cli` names. `db_on_command_line` says whether the
/// database was named with `--db` (not only by the environment).
pub fn run(cli: &Cli, db_on_command_line: bool, out: &Output) -> CliResult {
    if let Command::Completions { shell } = cli.command {
        // No database: the script comes from the argument definitions.
        let mut script = Vec::new();
        clap_complete::generate(
            shell,
            &mut <crate::Cli as clap::CommandFactory>::command(),
            "keytally",
            &mut script,
        );
        output::write_stdout(&String::from_utf8_lossy(&script));
        return Ok(());
    }
    if matches!(cli.command, Command::Demo) && !db_on_command_line {
        return ops::demo_on_a_temporary_database(out);
    }
    let path = database_path(cli)?;
    let location = keytally::Location::parse(&path);
    match &location {
        keytally::Location::Sqlite(path) => {
            match &cli.command {
                Command::Migrate { dry_run: true } => return ops::migrate_dry_run(path, out),
                Command::Restore { src } => return ops::restore(path, src, out),
                _ => {}
            }
            if only_reads(&cli.command) {
                refuse_missing(path)?;
            }
        }
        keytally::Location::Postgres(url) => {
            if let Some(operation) = sqlite_only(&cli.command) {
                return Err(keytally::Error::SqliteOnly { operation }.into());
            }
            let schema = keytally::postgres_schema(url)?;
            if matches!(cli.command, Command::Migrate { dry_run: true }) {
                return ops::report_pending(&schema.pending, out);
            }
            if only_reads(&cli.command) && schema.applied.is_empty() {
                return Err(Failure::Verdict {
                    message: format!(
                        "no keytally schema in {location}; check --db or KEYTALLY_DB \
                         (keytally migrate creates one)"
                    ),
                    json: serde_json::json!({
                        "error": "no database",
                        "path": location.to_string(),
                    }),
                });
            }
        }
    }
    let reads_only = only_reads(&cli.command);
    let store = open_store(&path, &location, cli.read_only, reads_only)?;
    let outcome = match &cli.command {
        Command::Status => ops::status(&store, out),
        Command::Migrate { .. } => ops::migrate(&store, out),
        Command::Check => ops::check(&store, out),
        Command::Checkpoint => ops::checkpoint(&store, out),
        Command::Keys(command) => keys::run(&store, command, out),
        Command::Prices(command) => prices::run(&store, command, out),
        Command::Backup { dest, force } => ops::backup(&store, dest, *force, out),
        Command::Events(command) => return events::run(store, command, out),
        Command::Demo => return ops::demo(store, None, out),
        Command::Restore { .. } | Command::Completions { .. } => Ok(()),
    };
    close(store, outcome)
}

/// What the command does that only an SQLite store can, if anything.
fn sqlite_only(command: &Command) -> Option<&'static str> {
    match command {
        Command::Backup { .. } => Some("backup"),
        Command::Restore { .. } => Some("restore"),
        Command::Checkpoint => Some("checkpoint"),
        _ => None,
    }
}

/// Whether the command only reads or copies the database: such a command on
/// a path with no database is a typo, never a request to create one.
pub fn only_reads(command: &Command) -> bool {
    match command {
        Command::Status | Command::Check | Command::Backup { .. } => true,
        Command::Keys(keys) => matches!(
            keys,
            KeysCommand::List { .. } | KeysCommand::Show { .. } | KeysCommand::Resolve
        ),
        Command::Events(events) => matches!(
            events,
            EventsCommand::List { .. } | EventsCommand::Usage { .. }
        ),
        Command::Prices(prices) => matches!(prices, PricesCommand::List),
        _ => false,
    }
}

/// Opens the store: read-only with `--read-only`; otherwise as usual, and,
/// for a command that only reads, read-only again if the usual open failed
/// because the database's files cannot be written (a read-only filesystem,
/// a full disk).
fn open_store(
    path: &Path,
    location: &keytally::Location,
    read_only: bool,
    reads_only: bool,
) -> CliResult<keytally::Store> {
    let options = keytally::StoreOptions::new(path);
    if read_only {
        return Ok(options.read_only(true).open()?);
    }
    match options.clone().open() {
        Ok(store) => Ok(store),
        Err(error)
            if reads_only
                && matches!(location, keytally::Location::Sqlite(_))
                && cannot_write(&error) =>
        {
            match options.read_only(true).open() {
                Ok(store) => {
                    eprintln!(
                        "keytally: note: opened read-only, as the database cannot be written ({})",
                        error.report()
                    );
                    Ok(store)
                }
                Err(_) => Err(error.into()),
            }
        }
        Err(error) => Err(error.into()),
    }
}

/// Whether an open failed because the database's files cannot be written.
fn cannot_write(error: &keytally::Error) -> bool {
    use keytally::Error;
    match error {
        Error::DiskFull { .. } | Error::Permission { .. } | Error::Io { .. } => true,
        other => {
            let text = other.report();
            [
                "disk I/O error",
                "readonly",
                "read-only",
                "unable to open database file",
            ]
            .iter()
            .any(|sign| text.contains(sign))
        }
    }
}

/// Refuses a database path where nothing is: a command that only reads
/// would otherwise create an empty database there and report it empty.
fn refuse_missing(path: &Path) -> CliResult {
    match std::fs::symlink_metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(Failure::Verdict {
            message: format!(
                "no database at {}; check --db or KEYTALLY_DB (keytally migrate creates one)",
                path.display()
            ),
            json: serde_json::json!({
                "error": "no database",
                "path": path.display().to_string(),
            }),
        }),
        _ => Ok(()),
    }
}

/// Closes the store with its final checkpoint, keeping the command's
/// outcome first.
fn close(store: keytally::Store, outcome: CliResult) -> CliResult {
    let report = store.close();
    outcome?;
    let report = match report {
        Ok(report) => report,
        // The command's work is committed; only emptying the log failed
        // (a full disk, say), and the log keeps every committed write.
        Err(error) => {
            eprintln!(
                "keytally: note: the database's write-ahead log could not be emptied at close \
                 ({}); every committed write is in it and nothing is lost: the next process to \
                 close the database empties it",
                error.report()
            );
            return Ok(());
        }
    };
    if report.replicated_by_litestream && !report.checkpoint_complete {
        eprintln!(
            "keytally: note: Litestream replicates this database and keeps it open, so its \
             write-ahead log (-wal, -shm) stays for Litestream to checkpoint; every committed \
             write is in it and nothing is lost"
        );
    } else if !report.checkpoint_complete {
        eprintln!(
            "keytally: note: another process has the database open, so its write-ahead log \
             (-wal, -shm) was not emptied at close; every committed write is in it and nothing is \
             lost: the last process to close the database empties it"
        );
    }
    Ok(())
}
