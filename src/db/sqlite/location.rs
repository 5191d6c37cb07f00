//! Where the database lives when no path is given.

use std::ffi::OsString;
use std::path::PathBuf;

/// The environment variable that overrides the database path.
pub const DB_PATH_ENV: &str = "KEYTALLY_DB";

/// The file name of the database inside its data folder.
pub const DB_FILE_NAME: &str = "keytally.db";

/// The default database path: `$KEYTALLY_DB`, else
/// `$XDG_DATA_HOME/keytally/keytally.db`, else
/// `$HOME/.local/share/keytally/keytally.db`.
///
/// Returns `None` when none of these variables is set to an absolute path
/// (`KEYTALLY_DB` may be relative).
pub fn default_database_path() -> Option<PathBuf> {
    database_path_from(
        std::env::var_os(DB_PATH_ENV),
        std::env::var_os("XDG_DATA_HOME"),
        std::env::var_os("HOME"),
    )
}

fn database_path_from(
    explicit: Option<OsString>,
    xdg_data_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    if let Some(explicit) = explicit.filter(|value| !value.is_empty()) {
        return Some(PathBuf::from(explicit));
    }
    // The XDG base directory specification says relative values are invalid
    // and must be ignored.
    let absolute = |value: OsString| Some(PathBuf::from(value)).filter(|path| path.is_absolute());
    if let Some(data_home) = xdg_data_home.and_then(absolute) {
        return Some(data_home.join("keytally").join(DB_FILE_NAME));
    }
    let home = home.and_then(absolute)?;
    Some(
        home.join(".local")
            .join("share")
            .join("keytally")
            .join(DB_FILE_NAME),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(value: &str) -> Option<OsString> {
        Some(OsString::from(value))
    }

    #[test]
    fn explicit_path_wins() {
        let path = database_path_from(os("rel/db.sqlite"), os("/xdg"), os("/home/u"));
        assert_eq!(path, Some(PathBuf::from("rel/db.sqlite")));
    }

    #[test]
    fn xdg_data_home_comes_next() {
        let path = database_path_from(None, os("/xdg"), os("/home/u"));
        assert_eq!(path, Some(PathBuf::from("/xdg/keytally/keytally.db")));
    }

    #[test]
    fn relative_xdg_data_home_is_ignored() {
        let path = database_path_from(os(""), os("xdg"), os("/home/u"));
        assert_eq!(
            path,
            Some(PathBuf::from("/home/u/.local/share/keytally/keytally.db"))
        );
    }

    #[test]
    fn nothing_set_gives_none() {
        assert_eq!(database_path_from(None, None, None), None);
    }
}
