//! Bill24's JSON shapes (BILL24.md): the authorize request and answer, the balance request, and
//! the `code` of a balance answer.

use serde::{Deserialize, Serialize};
use smol_str::SmolStr;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::secret::Secret;

#[derive(Serialize)]
pub struct AuthorizeRequest<'a> {
    pub token: &'a str,
    #[serde(rename = "clientId")]
    pub client_id: &'a str,
    pub secret: &'a str,
    #[serde(rename = "refreshToken", skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<&'a str>,
}

#[derive(Serialize)]
pub struct BalanceRequest<'a> {
    pub customer_sync_code: &'a str,
}

/// An access token as Bill24 issued it.
#[derive(Debug)]
pub struct IssuedToken {
    pub token: Secret,
    pub refresh_token: Option<Secret>,
    /// `tokenExpireTime`, when present and readable.
    pub expires_at: Option<OffsetDateTime>,
    /// The raw `tokenExpireTime` when it could not be read (for the warning; not a secret).
    pub unreadable_expiry: Option<String>,
}

/// Why an authorize answer is not a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorizeRefused {
    #[error("the answer is not JSON")]
    NotJson,
    #[error("Bill24 answered code {code}: {message}")]
    Refused { code: String, message: String },
    #[error("the answer has no token")]
    NoToken,
}

#[derive(Deserialize)]
struct AuthorizeAnswer {
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<serde_json::Value>,
    #[serde(default)]
    data: Option<AuthorizeData>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthorizeData {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    token_expire_time: Option<serde_json::Value>,
}

/// Reads an HTTP 200 authorize answer. Success is body `code` 200 (a number; `"200"` is taken
/// too) with a non-empty `data.token`.
pub fn parse_authorize(body: &[u8]) -> Result<IssuedToken, AuthorizeRefused> {
    let answer: AuthorizeAnswer =
        serde_json::from_slice(body).map_err(|_| AuthorizeRefused::NotJson)?;
    let code = answer.code.as_ref().map(code_text).unwrap_or_default();
    if code != "200" {
        let message = match answer.message {
            Some(serde_json::Value::String(m)) => m.chars().take(200).collect(),
            _ => String::new(),
        };
        return Err(AuthorizeRefused::Refused {
            code: if code.is_empty() { "none".into() } else { code },
            message,
        });
    }
    let data = answer.data.ok_or(AuthorizeRefused::NoToken)?;
    let token = data
        .token
        .filter(|t| !t.is_empty())
        .ok_or(AuthorizeRefused::NoToken)?;
    let (expires_at, unreadable_expiry) = match &data.token_expire_time {
        Some(serde_json::Value::String(s)) => match parse_expire_time(s) {
            Some(t) => (Some(t), None),
            None => (None, Some(s.chars().take(64).collect())),
        },
        Some(other) => (None, Some(other.to_string().chars().take(64).collect())),
        None => (None, None),
    };
    Ok(IssuedToken {
        token: Secret::new(token),
        refresh_token: data
            .refresh_token
            .filter(|t| !t.is_empty())
            .map(Secret::new),
        expires_at,
        unreadable_expiry,
    })
}

/// `tokenExpireTime`: RFC 3339 with an offset and any number of fractional digits
/// (.NET writes 7: `2025-03-03T16:58:46.9386571+07:00`). No offset means unreadable.
pub fn parse_expire_time(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text.trim(), &Rfc3339).ok()
}

/// The `code` of a JSON body as text (`"000"`, `"311"`, or a number's digits).
fn code_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

/// Other fields are skipped (serde_json still checks their syntax) and passed on untouched.
#[derive(Deserialize)]
struct BalanceHead {
    #[serde(default)]
    code: Option<serde_json::Value>,
}

/// The body is not a JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the answer is not a JSON object")]
pub struct NotJson;

/// Checks a balance answer is a JSON object and returns its `code` (None when absent).
pub fn balance_code(body: &[u8]) -> Result<Option<SmolStr>, NotJson> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(NotJson);
    }
    let head: BalanceHead = serde_json::from_slice(body).map_err(|_| NotJson)?;
    Ok(head
        .code
        .as_ref()
        .map(code_text)
        .filter(|c| !c.is_empty())
        .map(SmolStr::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expire_time_forms() {
        let t = parse_expire_time("2025-03-03T16:58:46.9386571+07:00").expect("7 digits");
        assert_eq!(t.unix_timestamp(), 1_740_995_926);
        assert_eq!(t.nanosecond(), 938_657_100);
        let z = parse_expire_time("2025-03-03T09:58:46.9386571Z").expect("Z");
        assert_eq!(z, t);
        assert!(
            parse_expire_time("2025-03-03T16:58:46+07:00").is_some(),
            "no fraction"
        );
        assert!(parse_expire_time("2025-03-03T16:58:46.1-05:30").is_some());
        assert!(parse_expire_time("2025-03-03T16:58:46.123456789123+07:00").is_some());
        for bad in [
            "",
            "tomorrow",
            "2025-03-03T16:58:46.9386571",
            "2025-03-03",
            "1741024726",
        ] {
            assert!(parse_expire_time(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn authorize_answers() {
        let ok = br#"{"code":200,"message":"","data":{"issuer":"http://x","token":"eyJ.a.b","refreshToken":"d1f6","tokenExpireTime":"2025-03-03T16:58:46.9386571+07:00"}}"#;
        let t = parse_authorize(ok).expect("token");
        assert_eq!(t.token.expose(), "eyJ.a.b");
        assert_eq!(t.refresh_token.as_ref().map(Secret::expose), Some("d1f6"));
        assert!(t.expires_at.is_some());

        let string_code = br#"{"code":"200","data":{"token":"t"}}"#;
        let t = parse_authorize(string_code).expect("string 200 accepted");
        assert!(t.expires_at.is_none() && t.unreadable_expiry.is_none());

        let odd_expiry = br#"{"code":200,"data":{"token":"t","tokenExpireTime":"soon"}}"#;
        let t = parse_authorize(odd_expiry).expect("token");
        assert_eq!(t.unreadable_expiry.as_deref(), Some("soon"));

        assert_eq!(
            parse_authorize(br#"{"code":401,"message":"Invalid credentials","data":null}"#)
                .map(|_| ()),
            Err(AuthorizeRefused::Refused {
                code: "401".into(),
                message: "Invalid credentials".into()
            })
        );
        assert_eq!(
            parse_authorize(b"<html>").map(|_| ()),
            Err(AuthorizeRefused::NotJson)
        );
        assert_eq!(
            parse_authorize(br#"{"code":200,"data":{"token":""}}"#).map(|_| ()),
            Err(AuthorizeRefused::NoToken)
        );
        assert!(
            parse_authorize(br#"{"data":{"token":"t"}}"#).is_err(),
            "no code"
        );
    }

    #[test]
    fn balance_codes() {
        assert_eq!(
            balance_code(br#"{"code":"000","data":[{"balance":1e400}]}"#)
                .ok()
                .flatten()
                .as_deref(),
            Some("000")
        );
        assert_eq!(
            balance_code(br#"{"code":311}"#).ok().flatten().as_deref(),
            Some("311")
        );
        assert_eq!(balance_code(br#"{"data":[]}"#), Ok(None));
        for bad in [&b"<html></html>"[..], b"", b"[1]", b"{\"code\":", b"null"] {
            assert_eq!(
                balance_code(bad),
                Err(NotJson),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
