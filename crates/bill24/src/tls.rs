//! TLS toward Bill24: rustls with the webpki roots, plus the roots of `upstream.ca_file` (a
//! private CA, or a corporate proxy's that re-signs TLS), plus a client certificate where the
//! merchant account requires one; and the words for a handshake that failed.
//!
//! A certificate that does not verify is never accepted: there is no switch to turn
//! verification off.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, SignatureScheme};
use tokio::time::Instant;

/// What a refused handshake means when Bill24 asked for a client certificate and none is
/// configured.
pub(crate) const NO_CLIENT_CERTIFICATE: &str = "handshake refused by Bill24: it requires a \
     client certificate and none is configured (upstream.client_cert_file, \
     upstream.client_key_file)";

/// What TLS to Bill24 trusts and presents besides the defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tls {
    /// Trusted besides the webpki roots (`upstream.ca_file`).
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Presented when Bill24 asks for a client certificate.
    pub client_identity: Option<ClientIdentity>,
}

/// A client certificate chain and its private key, checked to belong together.
#[derive(Clone)]
pub struct ClientIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl ClientIdentity {
    /// From PEM: `cert_pem` holds the chain (leaf first), `key_pem` one private key (PKCS#8,
    /// PKCS#1 or SEC1). Fails, saying why, when either holds none or they do not match.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, IdentityError> {
        let chain = certificates(cert_pem).map_err(IdentityError::Certificate)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
            IdentityError::Key(match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    "holds no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)"
                        .to_string()
                }
                other => format!("is not a readable PEM private key: {other}"),
            })
        })?;
        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider()).map_err(
            |e| match e {
                rustls::Error::InconsistentKeys(_) => IdentityError::Mismatch,
                other => IdentityError::Key(format!("cannot be used: {other}")),
            },
        )?;
        Ok(ClientIdentity {
            chain,
            key: Arc::new(key),
        })
    }
}

/// Why a client certificate and key cannot be used; each names the file it is about.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate file {0}")]
    Certificate(String),
    #[error("the key file {0}")]
    Key(String),
    #[error("the private key does not belong to the certificate")]
    Mismatch,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field(
                "chain",
                &format_args!("{} certificate(s)", self.chain.len()),
            )
            .field("key", &crate::REDACTED)
            .finish()
    }
}

impl PartialEq for ClientIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.chain == other.chain && self.key.secret_der() == other.key.secret_der()
    }
}

/// The certificates in a PEM bundle: at least one, each one parseable as X.509.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("is not readable PEM: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(certs)
}

/// Checks that each of `certs` can serve as a trust anchor.
pub fn check_roots(certs: &[CertificateDer<'static>]) -> Result<(), String> {
    let mut store = RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        store
            .add(cert.clone())
            .map_err(|e| format!("certificate {} cannot be trusted: {e}", i + 1))?;
    }
    Ok(())
}

pub(crate) fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// When Bill24 last asked for a client certificate while none is configured.
#[derive(Debug, Default)]
pub(crate) struct CertificateRequests(Mutex<Option<Instant>>);

impl CertificateRequests {
    /// Bill24 asked within the last `window`.
    pub(crate) fn within(&self, window: Duration) -> bool {
        self.0
            .lock()
            .map(|at| at.is_some_and(|at| at.elapsed() <= window))
            .unwrap_or(false)
    }
}

/// The client-certificate resolver without a certificate: presents none, and remembers that
/// one was asked for.
#[derive(Debug)]
struct NoCertificate(Arc<CertificateRequests>);

impl ResolvesClientCert for NoCertificate {
    fn resolve(
        &self,
        _acceptable_issuers: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        if let Ok(mut at) = self.0.0.lock() {
            *at = Some(Instant::now());
        }
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// The client config: webpki roots plus `tls.extra_roots`, the client certificate if any;
/// and where a request for a certificate that is not configured is remembered. (ALPN is set
/// by the connector.)
pub(crate) fn client_config(tls: &Tls) -> Result<(ClientConfig, Arc<CertificateRequests>), String> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in &tls.extra_roots {
        roots
            .add(cert.clone())
            .map_err(|e| format!("upstream.ca_file: {e}"))?;
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots);
    let requests = Arc::new(CertificateRequests::default());
    let config = match &tls.client_identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(|e| format!("upstream.client_cert_file: {e}"))?,
        None => builder.with_client_cert_resolver(Arc::new(NoCertificate(requests.clone()))),
    };
    Ok((config, requests))
}

/// When `err` (or one of its sources) is a TLS failure: what went wrong, in words an operator
/// can act on (`certificate verify failed: unknown issuer`).
pub(crate) fn failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(tls) = as_rustls(e) {
            return Some(describe(tls));
        }
        next = e.source();
    }
    None
}

/// The rustls error in `e`, also when `io::Error`s carry it, one in another as the TLS
/// connector wraps it, or an HTTP/2 connection error does (`io::Error::source` skips the
/// error it wraps).
fn as_rustls<'a>(mut e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    loop {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let io = match e.downcast_ref::<h2::Error>() {
            Some(h2) => h2.get_io()?,
            None => e.downcast_ref::<std::io::Error>()?,
        };
        e = io.get_ref()?;
    }
}

fn describe(err: &rustls::Error) -> String {
    match err {
        rustls::Error::InvalidCertificate(cert) => {
            format!("certificate verify failed: {}", describe_certificate(cert))
        }
        rustls::Error::AlertReceived(alert) => describe_alert(*alert),
        rustls::Error::NoCertificatesPresented => {
            "certificate verify failed: Bill24 presented no certificate".into()
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

fn describe_certificate(err: &CertificateError) -> String {
    match err {
        CertificateError::UnknownIssuer => {
            "unknown issuer (not signed by a trusted CA; a private or proxy CA goes in \
             upstream.ca_file)"
                .into()
        }
        CertificateError::NotValidForName => "wrong host name".into(),
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => format!(
            "wrong host name (the certificate is for {}, not {})",
            presented.join(", "),
            expected.to_str()
        ),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired".into(),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "not yet valid".into()
        }
        CertificateError::Revoked => "revoked".into(),
        CertificateError::BadSignature => "bad signature".into(),
        other => other.to_string(),
    }
}

fn describe_alert(alert: AlertDescription) -> String {
    match alert {
        AlertDescription::CertificateRequired => NO_CLIENT_CERTIFICATE.into(),
        AlertDescription::BadCertificate
        | AlertDescription::UnknownCA
        | AlertDescription::CertificateUnknown
        | AlertDescription::UnsupportedCertificate
        | AlertDescription::CertificateExpired
        | AlertDescription::CertificateRevoked
        | AlertDescription::AccessDenied => format!(
            "handshake refused by Bill24: it did not accept the client certificate \
             (alert {alert:?})"
        ),
        other => format!("handshake refused by Bill24 (alert {other:?})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_without_certificates_is_refused_in_words() {
        assert!(
            certificates(b"")
                .unwrap_err()
                .contains("holds no PEM certificate")
        );
        assert!(
            certificates(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .unwrap_err()
                .contains("holds no PEM certificate")
        );
    }

    #[test]
    fn failures_are_found_inside_io_errors() {
        let inner = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        assert_eq!(
            failure(&io).as_deref(),
            Some(
                "certificate verify failed: unknown issuer (not signed by a trusted CA; a \
                 private or proxy CA goes in upstream.ca_file)"
            )
        );
        let wrapped = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::Expired),
        ));
        assert_eq!(
            failure(&wrapped).as_deref(),
            Some("certificate verify failed: expired")
        );
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(failure(&plain), None);
        let alert = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        assert!(
            failure(&alert)
                .unwrap_or_default()
                .contains("requires a client certificate")
        );
    }

    #[test]
    fn identity_debug_hides_the_key() {
        let id = ClientIdentity {
            chain: vec![CertificateDer::from(vec![1, 2, 3])],
            key: Arc::new(PrivateKeyDer::Pkcs8(vec![9u8; 40].into())),
        };
        let text = format!("{id:?}");
        assert!(text.contains("[redacted]") && !text.contains('9'), "{text}");
    }
}
