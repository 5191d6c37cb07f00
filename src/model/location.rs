//! [`Location`]: where a store's database is, an SQLite file or a
//! PostgreSQL URL, and how a URL is shown without its password.

use std::path::{Path, PathBuf};

/// Where a store's database is: what `Store::open`, `--db` and
/// `KEYTALLY_DB` take.
///
/// A `postgres://` or `postgresql://` URL names a PostgreSQL database;
/// `sqlite://PATH`, or anything else, the path of an SQLite file. A URL is
/// never shown with its password: `Display` and `Debug` leave it out.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// An SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL database, by its connection URL.
    Postgres(String),
}

impl Location {
    /// Reads a location as `--db` takes it.
    pub fn parse(text: impl AsRef<Path>) -> Location {
        let path = text.as_ref();
        let Some(text) = path.to_str() else {
            return Location::Sqlite(path.to_path_buf());
        };
        if let Some(rest) = text.strip_prefix("sqlite://") {
            return Location::Sqlite(PathBuf::from(rest));
        }
        let lower = text.get(..13).unwrap_or(text).to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            return Location::Postgres(text.to_owned());
        }
        Location::Sqlite(path.to_path_buf())
    }

    /// The SQLite file's path, or `None` for PostgreSQL.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Location::Sqlite(path) => Some(path),
            Location::Postgres(_) => None,
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(path) => write!(f, "{}", path.display()),
            Location::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Location::Postgres(url) => f.debug_tuple("Postgres").field(&redact_url(url)).finish(),
        }
    }
}

/// `url` with the password of its user part and of any `password=`
/// parameter replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let (before_query, query) = match url.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (url, None),
    };
    let mut redacted = match before_query.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            let authority = match authority.rsplit_once('@') {
                Some((user_info, host)) => match user_info.split_once(':') {
                    Some((user, _password)) => format!("{user}:***@{host}"),
                    None => authority.to_owned(),
                },
                None => authority.to_owned(),
            };
            format!("{scheme}://{authority}{path}")
        }
        None => before_query.to_owned(),
    };
    if let Some(query) = query {
        let parameters: Vec<String> = query
            .split('&')
            .map(|parameter| match parameter.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
                _ => parameter.to_owned(),
            })
            .collect();
        redacted.push('?');
        redacted.push_str(&parameters.join("&"));
    }
    redacted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_shown_without_its_passwords() {
        assert_eq!(
            redact_url("postgres://kt:s3cret@db.internal:5432/keys?sslmode=require&password=x"),
            "postgres://kt:***@db.internal:5432/keys?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("postgresql://kt@db/keys"),
            "postgresql://kt@db/keys"
        );
        assert_eq!(
            format!("{:?}", Location::parse("postgres://a:b@h/d")),
            "Postgres(\"postgres://a:***@h/d\")"
        );
    }

    #[test]
    fn a_location_is_a_path_unless_it_is_a_postgres_url() {
        assert_eq!(
            Location::parse("sqlite:///var/lib/k.db"),
            Location::Sqlite("/var/lib/k.db".into())
        );
        assert_eq!(
            Location::parse("keytally.db"),
            Location::Sqlite("keytally.db".into())
        );
        assert_eq!(
            Location::parse("PostgreSQL://h/d"),
            Location::Postgres("PostgreSQL://h/d".into())
        );
    }
}
