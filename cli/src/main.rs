//! The `keytally` command: inspect, operate, back up and restore a keytally
//! database.
//!
//! Thin by design: it parses arguments, calls the library, prints the result
//! (or one error on stderr) and maps it to an exit code: 0 success, 1
//! failure, 2 usage error.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// Inspect, operate, back up and restore a keytally database.
#[derive(Debug, Parser)]
#[command(
    name = "keytally",
    version,
    about,
    after_help = "Examples:\n  \
        keytally --db /var/lib/gateway/keytally.db status\n  \
        keytally keys create --label \"alice's laptop\" --models gpt-4o,gpt-4o-mini --expires-in 90d\n  \
        keytally events usage --since 7d --by day\n  \
        keytally --db postgres://gateway@db.internal/keytally status\n\n\
        Exit codes: 0 success, 1 failure, 2 usage error."
)]
pub struct Cli {
    /// The database: an SQLite file's path (also sqlite://PATH) or a
    /// postgres:// URL; give a password with PGPASSWORD or ~/.pgpass, not
    /// here [default: $XDG_DATA_HOME/keytally/keytally.db, else
    /// ~/.local/share/keytally/keytally.db].
    #[arg(
        long,
        global = true,
        env = keytally::DB_PATH_ENV,
        hide_env_values = true,
        value_name = "PATH|URL"
    )]
    db: Option<PathBuf>,

    /// Print one JSON object (an array for lists) on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// Open the database for reading only (status, check, backup, keys
    /// list|show|resolve, events list|usage): nothing is created, migrated
    /// or written, so it works on a read-only filesystem or a full disk.
    /// These commands fall back to it by themselves when the database
    /// cannot be written.
    #[arg(long, global = true)]
    read_only: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open (creating and migrating if needed) the database and show its settings.
    #[command(
        after_help = "Examples:\n  keytally status\n  keytally --db /var/lib/gateway/keytally.db --json status"
    )]
    Status,
    /// Apply pending migrations and list what was applied.
    #[command(
        after_help = "Examples:\n  keytally migrate --dry-run\n  keytally --db /var/lib/gateway/keytally.db migrate"
    )]
    Migrate {
        /// Only list what would be applied; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check integrity, foreign keys, application id, schema version and file modes.
    #[command(
        after_help = "Examples:\n  keytally check\n  keytally --db restored.db --json check"
    )]
    Check,
    /// Copy the write-ahead log into the database file and empty it.
    #[command(after_help = "Examples:\n  keytally checkpoint")]
    Checkpoint,
    /// Create, list, show, revoke, rotate, update and resolve keys.
    #[command(subcommand)]
    #[command(
        after_help = "Examples:\n  keytally keys create --label ci --models gpt-4o-mini\n  keytally keys list --all"
    )]
    Keys(KeysCommand),
    /// Ingest, list, total and prune usage events.
    #[command(subcommand)]
    #[command(
        after_help = "Examples:\n  keytally events usage --since 24h --by model\n  keytally events list --limit 20"
    )]
    Events(EventsCommand),
    /// Set and list what each model's tokens cost, from which time on.
    #[command(subcommand)]
    #[command(
        after_help = "Examples:\n  keytally prices set --model gpt-4o --prompt 2.50 --completion 10.00\n  keytally prices set --file prices.toml\n  keytally prices list"
    )]
    Prices(PricesCommand),
    /// Write a consistent, verified snapshot to DEST while writers keep running.
    #[command(
        after_help = "Examples:\n  keytally backup /backups/keytally-$(date +%F).db\n  keytally backup --force /backups/keytally-latest.db"
    )]
    Backup {
        /// The backup file to write.
        dest: PathBuf,
        /// Replace DEST if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Replace the database with the backup SRC (the current one is kept aside).
    #[command(
        after_help = "Examples:\n  keytally --db /var/lib/gateway/keytally.db restore /backups/keytally-2026-11-20.db"
    )]
    Restore {
        /// The backup file to restore.
        src: PathBuf,
    },
    /// Show the whole library working: a key, a resolve, events, usage.
    #[command(after_help = "Examples:\n  keytally demo\n  keytally --db scratch.db demo")]
    Demo,
    /// Print a shell completion script for bash, zsh, fish, elvish or PowerShell.
    #[command(
        after_help = "Examples:\n  keytally completions bash > ~/.local/share/bash-completion/completions/keytally\n  keytally completions zsh > ~/.zfunc/_keytally\n  keytally completions fish > ~/.config/fish/completions/keytally.fish"
    )]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key and print its secret (shown this once).
    #[command(
        after_help = "Examples:\n  keytally keys create --label \"alice's laptop\" --models gpt-4o,gpt-4o-mini --expires-in 90d\n  keytally keys create --label team-a --budget 25.00/month --soft-budget 20\n  keytally keys create --label ops --tier admin --json"
    )]
    Create(CreateKey),
    /// List active keys (all keys with --all).
    #[command(after_help = "Examples:\n  keytally keys list\n  keytally keys list --all --json")]
    List {
        /// Include revoked and expired keys.
        #[arg(long)]
        all: bool,
    },
    /// Show one key, with its budget's spend in the current period.
    #[command(after_help = "Examples:\n  keytally keys show 01a20c2d-20bd-77f1-9864-d896bc6cfb7b")]
    Show {
        /// The key's id.
        id: String,
    },
    /// Revoke a key (idempotent; the row is kept).
    #[command(
        after_help = "Examples:\n  keytally keys revoke 01a20c2d-20bd-77f1-9864-d896bc6cfb7b"
    )]
    Revoke {
        /// The key's id.
        id: String,
    },
    /// Issue a new secret; the old one keeps working for the grace period.
    #[command(
        after_help = "Examples:\n  keytally keys rotate 01a20c2d-20bd-77f1-9864-d896bc6cfb7b --grace 1h\n  keytally keys rotate 01a20c2d-20bd-77f1-9864-d896bc6cfb7b --grace 0"
    )]
    Rotate {
        /// The key's id.
        id: String,
        /// How long the old secret keeps working (0 = stops at once).
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        grace: String,
    },
    /// Change a key's label, models, expiry, rate limit or budget (never its tier).
    #[command(
        after_help = "Examples:\n  keytally keys update 01a20c2d-20bd-77f1-9864-d896bc6cfb7b --models \"*\" --no-expiry\n  keytally keys update 01a20c2d-20bd-77f1-9864-d896bc6cfb7b --rate-limit 600\n  keytally keys update 01a20c2d-20bd-77f1-9864-d896bc6cfb7b --budget 5/day --soft-budget 4"
    )]
    Update(UpdateKey),
    /// Read a secret from stdin and print the key it belongs to.
    #[command(
        after_help = "Examples:\n  keytally keys resolve < secret.txt\n  keytally keys resolve    # then paste the secret; it is not echoed"
    )]
    Resolve,
}

#[derive(Debug, Args)]
struct CreateKey {
    /// Free text that says whose key this is.
    #[arg(long)]
    label: String,
    /// What the key may do.
    #[arg(long, value_enum, default_value_t = TierArg::Client)]
    tier: TierArg,
    /// Comma-separated model names, or * for any.
    #[arg(long, default_value = "*")]
    models: String,
    /// Expire after this long (such as 30d or 12h).
    #[arg(long, value_name = "DURATION")]
    expires_in: Option<String>,
    /// Requests per minute for this key (default: the gateway's).
    #[arg(long, value_name = "N")]
    rate_limit: Option<u32>,
    /// What the key may spend per period: AMOUNT/PERIOD, the period day, month or N days (30d).
    #[arg(long, value_name = "AMOUNT/PERIOD")]
    budget: Option<String>,
    /// Report (once a period) when the spend reaches this amount.
    #[arg(long, value_name = "AMOUNT")]
    soft_budget: Option<String>,
    /// When the first period of an N-days budget starts (default: today, 00:00 UTC).
    #[arg(long, value_name = "TIME")]
    budget_from: Option<String>,
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
    /// A new budget (replacing the old one, soft limit included): AMOUNT/PERIOD, the period day, month or N days (30d).
    #[arg(long, value_name = "AMOUNT/PERIOD", conflicts_with = "no_budget")]
    budget: Option<String>,
    /// Report (once a period) when the spend reaches this amount; alone, it changes only the soft limit.
    #[arg(long, value_name = "AMOUNT")]
    soft_budget: Option<String>,
    /// When the first period of an N-days budget starts (default: today, 00:00 UTC).
    #[arg(long, value_name = "TIME")]
    budget_from: Option<String>,
    /// Remove the budget.
    #[arg(long, conflicts_with_all = ["soft_budget", "budget_from"])]
    no_budget: bool,
}

#[derive(Debug, Subcommand)]
enum PricesCommand {
    /// Set one model's price (per million tokens) from a time on, or every price in a file.
    #[command(
        after_help = "Prices are decimals per million tokens, in one currency of your choice; a count\nwithout a price costs 0. A price may not take effect before an event of its model\nthat is already recorded.\n\nA file (JSON, or TOML if its name ends in .toml) holds a list `prices` of\n{ model, from, prompt, completion, cache_read, cache_creation (or cache_write),\nreasoning }, all set in one transaction.\n\nExamples:\n  keytally prices set --model gpt-4o --prompt 2.50 --completion 10.00 --cache-read 1.25\n  keytally prices set --model o3 --from 2026-12-01T00:00:00Z --prompt 2 --completion 8\n  keytally prices set --file prices.toml"
    )]
    Set {
        /// The model, as events name it.
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        model: Option<String>,
        /// When the price takes effect (RFC 3339, Unix ms, or a duration ago); now if omitted.
        #[arg(long)]
        from: Option<String>,
        /// Per million prompt tokens.
        #[arg(long, default_value = "0")]
        prompt: String,
        /// Per million completion tokens.
        #[arg(long, default_value = "0")]
        completion: String,
        /// Per million prompt tokens read from cache.
        #[arg(long, default_value = "0")]
        cache_read: String,
        /// Per million prompt tokens written to cache.
        #[arg(long, default_value = "0")]
        cache_write: String,
        /// Per million reasoning tokens.
        #[arg(long, default_value = "0")]
        reasoning: String,
        /// Set every price in this file instead (JSON, or TOML by its .toml name).
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// List every price version, by model and time.
    #[command(after_help = "Examples:\n  keytally prices list\n  keytally prices list --json")]
    List,
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Read JSON Lines events on stdin (at most 16 KiB a line) and commit them in batches.
    #[command(
        after_help = "Examples:\n  keytally events ingest < events.jsonl\n  tail -n +1500 events.jsonl | keytally events ingest --batch 10000"
    )]
    Ingest {
        /// Events per committed batch (1 to 100,000).
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// List events, newest first.
    #[command(
        after_help = "Examples:\n  keytally events list --since 1h\n  keytally events list --key 01a20c2d-20bd-77f1-9864-d896bc6cfb7b --limit 1000 --json"
    )]
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
        /// At most this many events, newest first (read 10,000 at a time).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Usage totals over a window, optionally grouped.
    #[command(
        after_help = "Examples:\n  keytally events usage --since 7d --by day\n  keytally events usage --since 2026-11-01T00:00:00Z --until 2026-12-01T00:00:00Z --by key --json"
    )]
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
        #[arg(long, value_enum)]
        by: Option<Grouping>,
    },
    /// Delete raw events older than a duration, in small batches (rollups stay).
    #[command(after_help = "Examples:\n  keytally events prune --older-than 60d")]
    Prune {
        /// Such as 60d; 0 keeps everything.
        #[arg(long, value_name = "DURATION")]
        older_than: String,
        /// Events deleted per transaction.
        #[arg(long, default_value_t = keytally::DEFAULT_PRUNE_BATCH)]
        batch: u32,
    },
}

/// `--tier`: [`keytally::Tier`]'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TierArg {
    /// May administer the gateway.
    Admin,
    /// May call models.
    Client,
}

impl From<TierArg> for keytally::Tier {
    fn from(tier: TierArg) -> keytally::Tier {
        match tier {
            TierArg::Admin => keytally::Tier::Admin,
            TierArg::Client => keytally::Tier::Client,
        }
    }
}

/// `events usage --by`: a time bucket ([`keytally::Bucket`]), a model or a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Grouping {
    /// One row per hour.
    Hour,
    /// One row per day (UTC).
    Day,
    /// One row per model.
    Model,
    /// One row per key.
    Key,
}

impl Grouping {
    fn name(self) -> &'static str {
        match self {
            Grouping::Hour => "hour",
            Grouping::Day => "day",
            Grouping::Model => "model",
            Grouping::Key => "key",
        }
    }
}

fn main() -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches).map(|cli| (cli, matches)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => return usage_error(&error),
    };
    if cli.read_only && !commands::only_reads(&cli.command) {
        let message = "--read-only is for the commands that only read: status, check, backup, \
                       keys list|show|resolve, events list|usage";
        if cli.json {
            eprintln!("{}", serde_json::json!({ "error": message, "usage": true }));
        } else {
            eprintln!("error: {message}");
        }
        return ExitCode::from(2);
    }
    // Only a path typed on the command line sends `demo` to a real database.
    let db_on_command_line = matches.value_source("db") == Some(ValueSource::CommandLine);
    commands::init_logging();
    let out = commands::Output::new(cli.json);
    match commands::run(&cli, db_on_command_line, &out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            out.error(&error);
            ExitCode::FAILURE
        }
    }
}

/// Reports a usage error (or prints `--help`/`--version`): as clap renders
/// it, but with anything that looks like a secret replaced, since a secret
/// typed as an argument by mistake must not be echoed to the terminal or a
/// log; as `{"error": …}` on stderr with `--json`. Exits 2 for an error.
fn usage_error(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let informational = matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    );
    if informational {
        let _ = error.print();
        return ExitCode::SUCCESS;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut text = error.render().to_string();
    for arg in &args {
        if looks_like_a_secret(arg) {
            text = text.replace(arg.as_str(), "<secret not shown>");
        }
    }
    if args.iter().any(|arg| looks_like_a_secret(arg)) {
        text.push_str(
            "\nkeytally never takes a secret as an argument (the shell history and the process \
             list would keep it): pipe it on stdin, as in `keytally keys resolve < secret.txt`\n",
        );
    }
    if args.iter().any(|arg| arg == "--json") {
        let message = text.trim().trim_start_matches("error: ").to_owned();
        eprintln!("{}", serde_json::json!({ "error": message, "usage": true }));
    } else {
        eprint!("{text}");
    }
    ExitCode::from(2)
}

/// Whether an argument has the shape of a keytally secret: the default
/// prefix and a long run of letters and digits.
fn looks_like_a_secret(arg: &str) -> bool {
    let candidate = arg.split_once('=').map_or(arg, |(_, value)| value);
    candidate
        .strip_prefix(keytally::DEFAULT_SECRET_PREFIX)
        .is_some_and(|body| {
            body.len() >= 20 && body.bytes().all(|byte| byte.is_ascii_alphanumeric())
        })
}
