//! The child processes of the crash, contention and multi-replica tests.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::ChildStdout;
use std::thread::JoinHandle;

/// The crash test's child program, built by `cargo test` from
/// `examples/crash_writer.rs`.
pub fn crash_writer() -> Result<PathBuf, Box<dyn std::error::Error>> {
    example("crash_writer")
}

/// The program `cargo test` built from `examples/<name>.rs`.
pub fn example(name: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or("test binary has no profile folder")?;
    let path = profile.join("examples").join(name);
    if !path.exists() {
        return Err(format!(
            "{} is missing: run the tests with `cargo test`",
            path.display()
        )
        .into());
    }
    Ok(path)
}

/// Reads a child's reports on a thread of its own until the child ends:
/// only whole lines count, since a line cut by a kill was never
/// acknowledged.
pub fn whole_lines(stdout: ChildStdout) -> JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        BufReader::new(stdout)
            .split(b'\n')
            .map_while(Result::ok)
            .filter_map(|line| String::from_utf8(line).ok())
            .collect()
    })
}
