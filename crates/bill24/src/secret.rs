//! `Secret`: a string that never shows itself in `Debug`, `Display` or serialized output.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

/// What a secret prints as, everywhere.
pub const REDACTED: &str = "[redacted]";

/// A credential (merchant token, client secret, access or refresh token).
///
/// `Debug`, `Display` and `Serialize` print `[redacted]` (an unset, empty secret serializes as
/// `""` so an operator can tell it is missing); only [`Secret::expose`] reveals the value.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself: for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0.is_empty() {
            serializer.serialize_str("")
        } else {
            serializer.serialize_str(REDACTED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(format!("{:?}", Some(&s)), "Some([redacted])");
        assert_eq!(
            serde_json::to_string(&s).expect("serializes"),
            "\"[redacted]\""
        );
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn empty_secret_serializes_empty() {
        assert_eq!(
            serde_json::to_string(&Secret::default()).expect("serializes"),
            "\"\""
        );
    }
}
