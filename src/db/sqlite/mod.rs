//! What only SQLite has: the database file and its sidecars, the header and
//! `-wal` checks (with the log and journal readers), the per-connection pragmas, the migration runner,
//! checkpoints, backups, restores and the integrity check.

pub(crate) mod backup;
pub(crate) mod check;
pub(crate) mod checkpoint;
pub(crate) mod connection;
pub(crate) mod files;
pub(crate) mod location;
pub(crate) mod logs;
pub(crate) mod migrations;
pub(crate) mod online_backup;
pub(crate) mod pages;
pub(crate) mod restore;
pub(crate) mod watcher;
