//! keytally's integration tests: one crate, one module per concern.

mod architecture;
mod backup;
mod bad_conditions;
mod budget_history;
mod budgets;
mod cli;
mod contention;
mod crash;
mod events;
mod full_disk;
mod gateway;
mod hostile_files;
mod hostile_input;
mod keys;
mod litestream;
mod notified;
mod operator_cli;
mod postgres_faults;
mod postgres_schema;
mod postgres_store;
mod power_loss;
mod prices;
mod read_only;
mod replicas;
mod restore_race;
mod schema_details;
mod secrets;
mod sink;
mod store_lifecycle;
mod support;

pub use support::files::{mode_of, raw_connection, sidecar};

/// The result type of every test.
pub type TestResult = Result<(), Box<dyn std::error::Error>>;
