//! [`Invalid`]: a value refused by the model's own rules.

/// A value that breaks the model's rules (an empty label, a time out of
/// range, a malformed id), refused before anything touches the database.
/// It becomes [`crate::Error::InvalidInput`] with the same field and reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct Invalid {
    /// The argument or field that was refused.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

impl Invalid {
    /// A refusal of `field` for `reason`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Invalid {
        Invalid {
            field,
            reason: reason.into(),
        }
    }
}
