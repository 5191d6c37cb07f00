//! Comparing the migrations a database has applied with those this binary
//! carries, the same way on every backend.

use std::collections::BTreeSet;
use std::path::Path;

use crate::error::{Error, Result};

/// The versions of `known` (oldest first) not in `applied`.
///
/// # Errors
///
/// [`Error::SchemaTooNew`], naming `shown_as`, when `applied` holds a
/// version this binary does not know: a newer keytally migrated it.
pub(crate) fn pending(
    applied: &[String],
    known: Vec<String>,
    shown_as: &Path,
) -> Result<Vec<String>> {
    let applied: BTreeSet<&str> = applied.iter().map(String::as_str).collect();
    let known_set: BTreeSet<&str> = known.iter().map(String::as_str).collect();
    let unknown: Vec<String> = applied
        .difference(&known_set)
        .map(|version| (*version).to_owned())
        .collect();
    if !unknown.is_empty() {
        return Err(Error::SchemaTooNew {
            path: shown_as.to_path_buf(),
            unknown,
        });
    }
    Ok(known
        .into_iter()
        .filter(|version| !applied.contains(version.as_str()))
        .collect())
}
