//! What the shared tier stores, sealed with keys only the merchant's replicas can derive (HKDF
//! from the merchant credentials every replica already has): cached answers and the access
//! token are encrypted and authenticated (XChaCha20-Poly1305, a random nonce per write), each
//! with a key of its own. An entry's associated data is its Redis key name and its customer, so
//! a genuine entry moved onto another customer's key does not open; the token's is its key
//! name. Someone who can read or write Redis but lacks the credentials can neither read a
//! balance (nor the wallet owner's name), nor use the token, nor plant either. Pure functions;
//! nothing here does I/O.

use bytes::Bytes;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use smol_str::SmolStr;
use time::OffsetDateTime;

use bill24::Secret;
use bill24::token::SharedToken;

const ENTRY_MAGIC: &[u8; 4] = b"B24E";
/// 2: the epoch is a value compared for equality, the age read from Redis's clock.
/// 3: encrypted (XChaCha20-Poly1305) instead of only authenticated (HMAC-SHA256).
const ENTRY_VERSION: u8 = 3;
/// What every entry starts with: the magic, then the version.
const ENTRY_PREFIX: [u8; 5] = [
    ENTRY_MAGIC[0],
    ENTRY_MAGIC[1],
    ENTRY_MAGIC[2],
    ENTRY_MAGIC[3],
    ENTRY_VERSION,
];
const TOKEN_VERSION: u8 = 1;
const NONCE_LEN: usize = 24;

/// The replicas' keys, derived from the merchant credentials.
#[derive(Clone)]
pub struct Keys {
    entry: [u8; 32],
    token: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys([redacted])")
    }
}

impl Keys {
    /// HKDF-SHA256 over the merchant token, client id and client secret; one key for entries,
    /// another for the token.
    pub fn derive(merchant_token: &Secret, client_id: &str, client_secret: &Secret) -> Self {
        let mut ikm = Vec::new();
        for part in [merchant_token.expose(), client_id, client_secret.expose()] {
            ikm.extend_from_slice(&(part.len() as u64).to_be_bytes());
            ikm.extend_from_slice(part.as_bytes());
        }
        let hkdf = Hkdf::<Sha256>::new(Some(b"bill24-gateway fleet v1"), &ikm);
        let mut keys = Keys {
            entry: [0; 32],
            token: [0; 32],
        };
        // 32 bytes is a valid length for HKDF-SHA256: these cannot fail.
        let _ = hkdf.expand(b"entry encryption", &mut keys.entry);
        let _ = hkdf.expand(b"token encryption", &mut keys.token);
        keys
    }
}

/// Why a stored value was not used: it does not decode, or does not verify (tampered, written
/// with other credentials, or moved from another key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a value in the shared tier was refused (undecodable or not authentic)")]
pub struct Rejected;

/// A cached Bill24 answer as the fleet stores it. Its age is read from Redis's own clock (the
/// key's remaining PTTL against its lifetime), the same on every replica whatever their
/// clocks say; the writer's wall-clock time is kept only to refuse an entry whose expiry was
/// pushed back in Redis (see `fleet::MAX_SKEW`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// When it was stored, by the writer's wall clock (Unix milliseconds).
    pub stored_at_ms: u64,
    pub fresh_for_ms: u64,
    pub stale_for_ms: u64,
    /// The fleet's purge epoch when the answer was fetched: it serves only while that epoch
    /// is in force (a `DELETE /cache` replaces it).
    pub epoch: u64,
    pub bill24_code: SmolStr,
    pub content_type: Bytes,
    pub body: Bytes,
}

/// An entry's associated data: the format, its key name and its customer.
fn entry_aad(key_name: &str, customer: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(5 + 16 + key_name.len() + customer.len());
    aad.extend_from_slice(&ENTRY_PREFIX);
    for part in [key_name.as_bytes(), customer.as_bytes()] {
        aad.extend_from_slice(&(part.len() as u64).to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad
}

/// `prefix`, a random nonce and `msg` encrypted under `key` with `aad`.
fn encrypt(key: &[u8; 32], prefix: &[u8], msg: &[u8], aad: &[u8]) -> Vec<u8> {
    let nonce_bytes: [u8; NONCE_LEN] = rand::random();
    let cipher = XChaCha20Poly1305::new(key.into());
    // XChaCha20-Poly1305 refuses only messages over 256 GiB.
    let Ok(ciphertext) = cipher.encrypt(&XNonce::from(nonce_bytes), Payload { msg, aad }) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(prefix.len() + NONCE_LEN + ciphertext.len());
    out.extend_from_slice(prefix);
    out.extend_from_slice(&nonce_bytes);
    out.extend_from_slice(&ciphertext);
    out
}

/// The plaintext of `bytes` (after `prefix`, which it must start with), if it authenticates.
fn decrypt(key: &[u8; 32], prefix: &[u8], bytes: &[u8], aad: &[u8]) -> Result<Vec<u8>, Rejected> {
    let mut r = Reader(bytes);
    if r.take(prefix.len())? != prefix {
        return Err(Rejected);
    }
    let mut nonce_bytes = [0u8; NONCE_LEN];
    nonce_bytes.copy_from_slice(r.take(NONCE_LEN)?);
    let cipher = XChaCha20Poly1305::new(key.into());
    cipher
        .decrypt(&XNonce::from(nonce_bytes), Payload { msg: r.0, aad })
        .map_err(|_| Rejected)
}

/// The entry's bytes, encrypted for `key_name` and `customer`.
pub fn seal_entry(keys: &Keys, key_name: &str, customer: &str, entry: &StoredEntry) -> Vec<u8> {
    let code = entry.bill24_code.as_bytes();
    let mut plain = Vec::with_capacity(
        32 + 1 + code.len() + 2 + entry.content_type.len() + 4 + entry.body.len(),
    );
    for n in [
        entry.stored_at_ms,
        entry.fresh_for_ms,
        entry.stale_for_ms,
        entry.epoch,
    ] {
        plain.extend_from_slice(&n.to_be_bytes());
    }
    // Body codes are short and Content-Types small; longer ones are cut, and the entry does
    // not open (never written that way by this code).
    plain.push(code.len().min(255) as u8);
    plain.extend_from_slice(&code[..code.len().min(255)]);
    let ct = &entry.content_type[..entry.content_type.len().min(u16::MAX as usize)];
    plain.extend_from_slice(&(ct.len() as u16).to_be_bytes());
    plain.extend_from_slice(ct);
    let body = &entry.body[..entry.body.len().min(u32::MAX as usize)];
    plain.extend_from_slice(&(body.len() as u32).to_be_bytes());
    plain.extend_from_slice(body);
    encrypt(
        &keys.entry,
        &ENTRY_PREFIX,
        &plain,
        &entry_aad(key_name, customer),
    )
}

/// Reads bytes in order, refusing anything short.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Rejected> {
        if self.0.len() < n {
            return Err(Rejected);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, Rejected> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
}

/// The entry stored under `key_name` for `customer`, if it is authentic.
pub fn open_entry(
    keys: &Keys,
    key_name: &str,
    customer: &str,
    bytes: &[u8],
) -> Result<StoredEntry, Rejected> {
    let plain = decrypt(
        &keys.entry,
        &ENTRY_PREFIX,
        bytes,
        &entry_aad(key_name, customer),
    )?;
    let mut r = Reader(&plain);
    let stored_at_ms = r.u64()?;
    let fresh_for_ms = r.u64()?;
    let stale_for_ms = r.u64()?;
    let epoch = r.u64()?;
    let code_len = r.take(1)?[0] as usize;
    let code = std::str::from_utf8(r.take(code_len)?).map_err(|_| Rejected)?;
    let ct_len = u16::from_be_bytes([r.take(1)?[0], r.take(1)?[0]]) as usize;
    let content_type = Bytes::copy_from_slice(r.take(ct_len)?);
    let mut len = [0u8; 4];
    len.copy_from_slice(r.take(4)?);
    let body = Bytes::copy_from_slice(r.take(u32::from_be_bytes(len) as usize)?);
    if !r.0.is_empty() {
        return Err(Rejected);
    }
    Ok(StoredEntry {
        stored_at_ms,
        fresh_for_ms,
        stale_for_ms,
        epoch,
        bill24_code: SmolStr::new(code),
        content_type,
        body,
    })
}

/// The token's fields, in the clear only inside the ciphertext.
#[derive(Serialize, Deserialize)]
struct TokenPlain<'a> {
    token: &'a str,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<&'a str>,
    issued_at_ms: i128,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<i128>,
}

fn token_aad(key_name: &str) -> Vec<u8> {
    let mut aad = b"bill24-gateway token v1\0".to_vec();
    aad.extend_from_slice(key_name.as_bytes());
    aad
}

fn unix_ms(t: OffsetDateTime) -> i128 {
    t.unix_timestamp_nanos() / 1_000_000
}

fn from_unix_ms(ms: i128) -> Result<OffsetDateTime, Rejected> {
    OffsetDateTime::from_unix_timestamp_nanos(ms.saturating_mul(1_000_000)).map_err(|_| Rejected)
}

/// The token, encrypted for `key_name`: version, nonce, ciphertext.
pub(crate) fn seal_token(keys: &Keys, key_name: &str, token: &SharedToken) -> Vec<u8> {
    let plain = TokenPlain {
        token: token.token.expose(),
        refresh_token: token.refresh_token.as_ref().map(Secret::expose),
        issued_at_ms: unix_ms(token.issued_at),
        expires_at_ms: token.expires_at.map(unix_ms),
    };
    // Serializing strings and numbers cannot fail.
    let msg = serde_json::to_vec(&plain).unwrap_or_default();
    encrypt(&keys.token, &[TOKEN_VERSION], &msg, &token_aad(key_name))
}

/// The token stored under `key_name`, if it decrypts and authenticates.
pub(crate) fn open_token(
    keys: &Keys,
    key_name: &str,
    bytes: &[u8],
) -> Result<SharedToken, Rejected> {
    let plain = decrypt(&keys.token, &[TOKEN_VERSION], bytes, &token_aad(key_name))?;
    let token: TokenPlain<'_> = serde_json::from_slice(&plain).map_err(|_| Rejected)?;
    if token.token.is_empty() {
        return Err(Rejected);
    }
    Ok(SharedToken {
        token: Secret::new(token.token),
        refresh_token: token.refresh_token.map(Secret::new),
        issued_at: from_unix_ms(token.issued_at_ms)?,
        expires_at: token.expires_at_ms.map(from_unix_ms).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::derive(&Secret::new("merchant"), "client", &Secret::new("secret"))
    }

    fn entry() -> StoredEntry {
        StoredEntry {
            stored_at_ms: 1_764_000_000_123,
            fresh_for_ms: 10_000,
            stale_for_ms: 30_000,
            epoch: 3,
            bill24_code: SmolStr::new("000"),
            content_type: Bytes::from_static(b"application/json; charset=utf-8"),
            body: Bytes::from_static(br#"{"code":"000","data":[{"balance":5}]}"#),
        }
    }

    #[test]
    fn an_entry_round_trips_for_its_key_and_customer_only() {
        let k = keys();
        let sealed = seal_entry(&k, "p:c:{4d}:entry", "M", &entry());
        assert_eq!(open_entry(&k, "p:c:{4d}:entry", "M", &sealed), Ok(entry()));
        // Moved onto another customer's key.
        assert_eq!(
            open_entry(&k, "p:c:{4e}:entry", "N", &sealed),
            Err(Rejected)
        );
        assert_eq!(
            open_entry(&k, "p:c:{4d}:entry", "N", &sealed),
            Err(Rejected)
        );
        // Written with other credentials.
        let other = Keys::derive(&Secret::new("merchant"), "client", &Secret::new("other"));
        assert_eq!(
            open_entry(&other, "p:c:{4d}:entry", "M", &sealed),
            Err(Rejected)
        );
    }

    #[test]
    fn an_entry_is_not_readable_in_redis() {
        let k = keys();
        let mut e = entry();
        e.body = Bytes::from_static(br#"{"data":[{"name":"SOK DARA","balance":123456}]}"#);
        let sealed = seal_entry(&k, "key", "M", &e);
        for clear in [&b"SOK DARA"[..], b"123456", b"application/json", b"balance"] {
            assert!(
                !sealed.windows(clear.len()).any(|w| w == clear),
                "{} in the clear",
                String::from_utf8_lossy(clear)
            );
        }
        // A fresh nonce each time.
        assert_ne!(seal_entry(&k, "key", "M", &e), sealed);
        assert_eq!(open_entry(&k, "key", "M", &sealed), Ok(e));
    }

    #[test]
    fn any_changed_byte_or_truncation_is_refused() {
        let k = keys();
        let sealed = seal_entry(&k, "key", "M", &entry());
        for i in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[i] ^= 0x01;
            assert_eq!(
                open_entry(&k, "key", "M", &tampered),
                Err(Rejected),
                "byte {i}"
            );
        }
        for len in 0..sealed.len() {
            assert_eq!(open_entry(&k, "key", "M", &sealed[..len]), Err(Rejected));
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert_eq!(open_entry(&k, "key", "M", &longer), Err(Rejected));
        assert_eq!(open_entry(&k, "key", "M", b"garbage"), Err(Rejected));
    }

    #[test]
    fn a_token_round_trips_encrypted_and_only_for_its_key() {
        let k = keys();
        let token = SharedToken {
            token: Secret::new("eyJ.access.token"),
            refresh_token: Some(Secret::new("refresh-1")),
            issued_at: OffsetDateTime::from_unix_timestamp(1_764_000_000).expect("time"),
            expires_at: Some(OffsetDateTime::from_unix_timestamp(1_764_021_600).expect("time")),
        };
        let sealed = seal_token(&k, "p:c:token", &token);
        let text = String::from_utf8_lossy(&sealed);
        assert!(!text.contains("eyJ.access.token") && !text.contains("refresh-1"));
        let opened = open_token(&k, "p:c:token", &sealed).expect("opens");
        assert_eq!(opened.token.expose(), "eyJ.access.token");
        assert_eq!(
            opened.refresh_token.as_ref().map(Secret::expose),
            Some("refresh-1")
        );
        assert_eq!(opened.issued_at, token.issued_at);
        assert_eq!(opened.expires_at, token.expires_at);
        assert!(
            open_token(&k, "p:c2:token", &sealed).is_err(),
            "another key"
        );
        let other = Keys::derive(&Secret::new("x"), "client", &Secret::new("secret"));
        assert!(open_token(&other, "p:c:token", &sealed).is_err());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(open_token(&k, "p:c:token", &tampered).is_err());
        assert!(open_token(&k, "p:c:token", b"").is_err());
        // A fresh nonce each time.
        assert_ne!(seal_token(&k, "p:c:token", &token), sealed);
        assert_eq!(format!("{k:?}"), "Keys([redacted])");
    }
}
