//! The real `keytally` binary, run as a child process.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// The binary under test, built by `cargo test`.
pub const BIN: &str = env!("CARGO_BIN_EXE_keytally");

/// Runs the binary under `sh` with the given umask, so the test also proves
/// that keytally does not rely on the caller's umask.
pub fn keytally_with_umask(umask: &str, args: &[&str]) -> std::io::Result<Output> {
    Command::new("sh")
        .arg("-c")
        .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
        .arg(BIN)
        .args(args)
        .env_remove("KEYTALLY_DB")
        .env_remove("KEYTALLY_LOG")
        .output()
}

pub fn keytally(args: &[&str]) -> std::io::Result<Output> {
    keytally_with_umask("077", args)
}

pub fn path_arg(path: &Path) -> Result<&str, Box<dyn std::error::Error>> {
    Ok(path.to_str().ok_or("path is not UTF-8")?)
}

pub fn json_of(output: &Output) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// Runs `keytally --db DB --json ARGS` with `input` on stdin.
pub fn run(db: &Path, args: &[&str], input: &str) -> Result<Output, Box<dyn std::error::Error>> {
    let mut child = Command::new(BIN)
        .arg("--db")
        .arg(db)
        .arg("--json")
        .args(args)
        .env_remove("KEYTALLY_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let written = child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(input.as_bytes());
    match written {
        // A command that ends without reading its input (a refusal) closes
        // the pipe first.
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other?,
    }
    Ok(child.wait_with_output()?)
}

/// The JSON error object: the last line on stderr (log lines may precede it).
pub fn stderr_json(output: &Output) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let text = String::from_utf8(output.stderr.clone())?;
    let last = text
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("");
    Ok(serde_json::from_str(last)?)
}
