//! What the test modules share: the binary runner, the deterministic random
//! generator, the crash test's child process, tmpfs mounts, and plain access
//! to files and SQLite.

pub mod binary;
pub mod crash_writer;
pub mod files;
pub mod random;
pub mod spend;
pub mod sql;
pub mod tmpfs;
