//! The `keytally` command: inspect, operate, back up and restore a keytally
//! database.
//!
//! Thin by design: it parses arguments, calls the library, prints the result
//! (or one error on stderr) and maps it to an exit code: 0 success, 1
//! failure, 2 usage error.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Inspect, operate, back up and restore a keytally database.
#[derive(Debug, Parser)]
#[command(name = "keytally", version, about)]
pub struct Cli {
    /// The database file [default: $XDG_DATA_HOME/keytally/keytally.db,
    /// else ~/.local/share/keytally/keytally.db].
    #[arg(long, global = true, env = keytally::DB_PATH_ENV, value_name = "PATH")]
    db: Option<PathBuf>,

    /// Print one JSON object (an array for lists) on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open (creating and migrating if needed) the database and show its settings.
    Status,
    /// Apply pending migrations and list what was applied.
    Migrate {
        /// Only list what would be applied; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check integrity, foreign keys, application id, schema version and file modes.
    Check,
    /// Copy the write-ahead log into the database file and empty it.
    Checkpoint,
    /// Create, list, show, revoke, rotate, update and resolve keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Ingest, list, total and prune usage events.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Write a consistent, verified snapshot to DEST while writers keep running.
    Backup {
        /// The backup file to write.
        dest: PathBuf,
        /// Replace DEST if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Replace the database with the backup SRC (the current one is kept aside).
    Restore {
        /// The backup file to restore.
        src: PathBuf,
    },
    /// Show the whole library working: a key, a resolve, events, usage.
    Demo,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key and print its secret (shown this once).
    Create(CreateKey),
    /// List active keys (all keys with --all).
    List {
        /// Include revoked and expired keys.
        #[arg(long)]
        all: bool,
    },
    /// Show one key.
    Show {
        /// The key's id.
        id: String,
    },
    /// Revoke a key (idempotent; the row is kept).
    Revoke {
        /// The key's id.
        id: String,
    },
    /// Issue a new secret; the old one keeps working for the grace period.
    Rotate {
        /// The key's id.
        id: String,
        /// How long the old secret keeps working (0 = stops at once).
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        grace: String,
    },
    /// Change a key's label, models, expiry or rate limit (never its tier).
    Update(UpdateKey),
    /// Read a secret from stdin and print the key it belongs to.
    Resolve,
}

#[derive(Debug, Args)]
struct CreateKey {
    /// Free text that says whose key this is.
    #[arg(long)]
    label: String,
    /// admin or client.
    #[arg(long, default_value = "client")]
    tier: String,
    /// Comma-separated model names, or * for any.
    #[arg(long, default_value = "*")]
    models: String,
    /// Expire after this long (such as 30d or 12h).
    #[arg(long, value_name = "DURATION")]
    expires_in: Option<String>,
    /// Requests per minute for this key (default: the gateway's).
    #[arg(long, value_name = "N")]
    rate_limit: Option<u32>,
}

#[derive(Debug, Args)]
struct UpdateKey {
    /// The key's id.
    id: String,
    /// A new label.
    #[arg(long)]
    label: Option<String>,
    /// New comma-separated model names, or * for any.
    #[arg(long)]
    models: Option<String>,
    /// Expire this long from now.
    #[arg(long, value_name = "DURATION", conflicts_with = "no_expiry")]
    expires_in: Option<String>,
    /// Remove the expiry.
    #[arg(long)]
    no_expiry: bool,
    /// A new rate limit (requests per minute).
    #[arg(long, value_name = "N", conflicts_with = "default_rate_limit")]
    rate_limit: Option<u32>,
    /// Go back to the gateway's default rate limit.
    #[arg(long)]
    default_rate_limit: bool,
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Read JSON Lines events on stdin and commit them in batches.
    Ingest {
        /// Events per committed batch.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// List events, newest first.
    List {
        /// Only this key's events.
        #[arg(long)]
        key: Option<String>,
        /// Only this model's events.
        #[arg(long)]
        model: Option<String>,
        /// From this time (RFC 3339, Unix ms, or a duration ago such as 2h).
        #[arg(long)]
        since: Option<String>,
        /// Before this time (RFC 3339, Unix ms, or a duration ago).
        #[arg(long)]
        until: Option<String>,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Usage totals over a window, optionally grouped.
    Usage {
        /// Only this key's usage.
        #[arg(long)]
        key: Option<String>,
        /// Only this model's usage.
        #[arg(long)]
        model: Option<String>,
        /// From this time (RFC 3339, Unix ms, or a duration ago such as 7d).
        #[arg(long)]
        since: String,
        /// Before this time (as --since) [default: now].
        #[arg(long)]
        until: Option<String>,
        /// Group by hour, day, model or key.
        #[arg(long, value_parser = ["hour", "day", "model", "key"])]
        by: Option<String>,
    },
    /// Delete raw events older than a duration, in small batches (rollups stay).
    Prune {
        /// Such as 60d; 0 keeps everything.
        #[arg(long, value_name = "DURATION")]
        older_than: String,
        /// Events deleted per transaction.
        #[arg(long, default_value_t = keytally::events::DEFAULT_PRUNE_BATCH)]
        batch: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging();
    let out = cli::Output::new(cli.json);
    match cli::run(&cli, &out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            out.error(&error);
            ExitCode::FAILURE
        }
    }
}
