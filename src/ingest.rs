//! The JSON Lines format of `keytally events ingest`: one [`NewEvent`] per
//! line, as an object of its fields.

use crate::error::{Error, Result};
use crate::model::event::NewEvent;

/// The longest JSON line [`parse_json_line`] reads, in bytes.
pub const MAX_JSON_LINE_LEN: usize = 16 * 1024;

/// Parses one JSON Lines event: an object whose fields are the event's
/// (`ts`, `model` and `status` required; `ts` as RFC 3339 or Unix
/// milliseconds; `key_id` a UUID or null; no other fields). Field values are
/// checked fully when the event is recorded.
///
/// # Errors
///
/// [`Error::InvalidInput`] (field `line`) naming what is wrong.
pub fn parse_json_line(line: &str) -> Result<NewEvent> {
    if line.len() > MAX_JSON_LINE_LEN {
        return Err(Error::InvalidInput {
            field: "line",
            reason: format!("{} bytes, at most {MAX_JSON_LINE_LEN}", line.len()),
        });
    }
    serde_json::from_str(line).map_err(|e| Error::InvalidInput {
        field: "line",
        reason: e.to_string(),
    })
}
