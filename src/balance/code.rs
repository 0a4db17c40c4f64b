//! `customer_sync_code`, the cache key: what a valid one is. Shared by the request parser, the
//! cache, the admin purge and the log notes; imports nothing of the gateway.

/// `customer_sync_code` is at most this many characters (Bill24's own limit).
pub(crate) const MAX_SYNC_CODE_CHARS: usize = 50;

/// A validated `customer_sync_code`. Codes of up to 23 bytes (all the usual ones) are stored
/// inline, so reading one from a request allocates nothing and a cache lookup compares it
/// without following another pointer.
pub(crate) type SyncCode = smol_str::SmolStr;

/// Why a text is not a valid `customer_sync_code`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, thiserror::Error, strum::EnumIter)]
pub enum InvalidSyncCode {
    #[default]
    #[error("customer_sync_code must not be empty")]
    Empty,
    #[error("customer_sync_code is longer than 50 characters")]
    TooLong,
    #[error("customer_sync_code must not contain control characters")]
    ControlChar,
}

/// 1 to 50 Unicode scalar values, none of them a control character (category Cc).
pub fn validate_sync_code(code: &str) -> Result<(), InvalidSyncCode> {
    if code.is_empty() {
        return Err(InvalidSyncCode::Empty);
    }
    if code.is_ascii() {
        // One byte per character; the control characters are below 0x20 and DEL.
        if code.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(InvalidSyncCode::ControlChar);
        }
        return if code.len() > MAX_SYNC_CODE_CHARS {
            Err(InvalidSyncCode::TooLong)
        } else {
            Ok(())
        };
    }
    if code.chars().any(char::is_control) {
        return Err(InvalidSyncCode::ControlChar);
    }
    if code.chars().count() > MAX_SYNC_CODE_CHARS {
        return Err(InvalidSyncCode::TooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_not_bytes_and_no_control_characters() {
        assert_eq!(validate_sync_code(""), Err(InvalidSyncCode::Empty));
        assert!(validate_sync_code(&"x".repeat(50)).is_ok());
        assert_eq!(
            validate_sync_code(&"x".repeat(51)),
            Err(InvalidSyncCode::TooLong)
        );
        // 50 characters pass however they are encoded.
        assert!(validate_sync_code(&"ក".repeat(50)).is_ok());
        assert!(validate_sync_code(&format!("{}é", "x".repeat(49))).is_ok());
        assert_eq!(
            validate_sync_code(&format!("{}é", "x".repeat(50))),
            Err(InvalidSyncCode::TooLong)
        );
        for control in ["x\u{1f}", "x\u{7f}y", "\u{0}", "é\u{1f}", "é\u{85}", "a\nb"] {
            assert_eq!(
                validate_sync_code(control),
                Err(InvalidSyncCode::ControlChar),
                "{control:?}"
            );
        }
    }
}
