//! Files and plain SQLite connections, outside keytally.

use std::path::Path;

use diesel::connection::SimpleConnection;
use diesel::{Connection, SqliteConnection};

/// Opens a plain SQLite connection, bypassing keytally, to build fixtures
/// keytally would refuse to build.
pub fn raw_connection(path: &Path) -> Result<SqliteConnection, Box<dyn std::error::Error>> {
    let path = path.to_str().ok_or("path is not UTF-8")?;
    let mut conn = SqliteConnection::establish(path)?;
    conn.batch_execute("PRAGMA busy_timeout = 5000")?;
    Ok(conn)
}

/// The permission bits of a file.
pub fn mode_of(path: &Path) -> std::io::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o7777)
}

/// The path of a sidecar file of `database`.
pub fn sidecar(database: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}
