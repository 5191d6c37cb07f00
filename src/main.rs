//! The `keytally` command: inspect and operate a keytally database.
//!
//! Thin by design: it parses arguments, calls the library, prints the result
//! (or one error on stderr) and maps it to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keytally::{Store, StoreOptions};
use serde_json::json;

/// Inspect and operate a keytally database.
#[derive(Debug, Parser)]
#[command(name = "keytally", version, about)]
struct Cli {
    /// The database file [default: $XDG_DATA_HOME/keytally/keytally.db,
    /// else ~/.local/share/keytally/keytally.db].
    #[arg(long, global = true, env = keytally::DB_PATH_ENV, value_name = "PATH")]
    db: Option<PathBuf>,

    /// Print one JSON object on stdout instead of text.
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
    Migrate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if cli.json {
                eprintln!("{}", json!({ "error": error.to_string() }));
            } else {
                eprintln!("keytally: {error}");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
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
        .ok_or_else(|| keytally::Error::Open {
            path: PathBuf::new(),
            message: "no database path: pass --db PATH, or set KEYTALLY_DB, XDG_DATA_HOME or HOME"
                .to_owned(),
        })
}

fn run(cli: &Cli) -> keytally::Result<()> {
    let store = StoreOptions::new(database_path(cli)?).open()?;
    let outcome = match cli.command {
        Command::Status => status(cli, &store),
        Command::Migrate => migrate(cli, &store),
    };
    let report = store.close();
    outcome?;
    let report = report?;
    if !report.checkpoint_complete {
        eprintln!(
            "keytally: warning: the final checkpoint did not complete; another process is using the database, and the write-ahead log will be checkpointed by the last one to close it"
        );
    }
    Ok(())
}

fn status(cli: &Cli, store: &Store) -> keytally::Result<()> {
    let status = store.status()?;
    if cli.json {
        println!("{}", json!(status));
        return Ok(());
    }
    println!("path:               {}", status.path.display());
    println!("sqlite_version:     {}", status.sqlite_version);
    println!("journal_mode:       {}", status.journal_mode);
    println!("synchronous:        {}", status.synchronous);
    println!("foreign_keys:       {}", status.foreign_keys);
    println!("application_id:     {:#010x}", status.application_id);
    println!("user_version:       {}", status.user_version);
    println!(
        "schema_version:     {}",
        status.schema_version.as_deref().unwrap_or("(none)")
    );
    println!(
        "pending_migrations: {}",
        if status.pending_migrations.is_empty() {
            "(none)".to_owned()
        } else {
            status.pending_migrations.join(", ")
        }
    );
    println!("files:");
    for file in &status.files {
        println!("  {}  {}  {} bytes", file.mode, file.name, file.bytes);
    }
    Ok(())
}

fn migrate(cli: &Cli, store: &Store) -> keytally::Result<()> {
    let applied = store.applied_at_open();
    if cli.json {
        println!("{}", json!({ "applied": applied }));
    } else if applied.is_empty() {
        println!("schema is current; nothing to apply");
    } else {
        for name in applied {
            println!("applied {name}");
        }
    }
    Ok(())
}
