//! The one error every validated constructor returns: which field, and what is wrong with it.

/// A value from outside did not pass validation. `field` names the input field (as the HTTP
/// API spells it) so clients can point at it; `message` is safe to show to a user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: &'static str,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}
