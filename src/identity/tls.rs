//! TLS on the main listener (CONTRACT §12): rustls, HTTP/1.1 and h2 by ALPN, the certificate
//! and key re-read when their files change (cert-manager, kubelet) and on SIGHUP, without
//! touching open connections; a broken new pair keeps the old one and says why.
//!
//! With `server.tls_client_ca_file`, a client certificate is asked for, not required. The
//! handshake takes any certificate whose holder proves its key (the signature checks are
//! rustls's own); whether it chains to the client CA is decided after the handshake, so that a
//! certificate from another CA gets the same 401 as a missing key rather than a broken
//! handshake, and never an identity.
//!
//! A failed handshake is logged by the gateway, one line per reason at most once a minute
//! (counting the failures it stands for): a client failing handshakes on purpose cannot flood
//! the log. rustls's own per-handshake warnings are filtered out (`telemetry`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use crate::config::ListenerTlsConfig;
use crate::identity::file;

/// What a connection's client certificate says about its peer, for every request on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PeerCertificate {
    /// None was presented.
    None,
    /// It chains to the client CA: its URI SANs.
    Verified(Vec<String>),
    /// It does not (another CA, expired, not for client auth): why, for the log line.
    Refused(&'static str),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate the listener presents, swapped when its files change.
#[derive(Debug)]
struct Certificate(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Asks for a client certificate while a client CA is configured; takes any whose holder
/// proves its key, leaving the chain to [`ListenerTls::peer`].
#[derive(Debug)]
struct AskForCertificate {
    roots: ArcSwapOption<Arc<dyn ClientCertVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AskForCertificate {
    fn offer_client_auth(&self) -> bool {
        self.roots.load().is_some()
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client then sends the certificate it has.
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The main listener's TLS: its rustls config and the files it follows.
pub(crate) struct ListenerTls {
    config: Arc<rustls::ServerConfig>,
    certificate: Arc<Certificate>,
    verifier: Arc<AskForCertificate>,
    files: Mutex<Files>,
    failures: FailureLog,
}

struct Files {
    config: ListenerTlsConfig,
    /// SHA-256 of the files' texts in use, and of the last set refused.
    good: Option<[u8; 32]>,
    bad: Option<[u8; 32]>,
}

/// What looking at the files did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reloaded {
    Unchanged,
    Replaced,
    Refused,
}

/// The texts of the certificate, key and client-CA files.
struct Texts {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Texts {
    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()] {
            let part = part.map(Vec::as_slice).unwrap_or(b"-");
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.finalize().into()
    }
}

type Roots = Option<Arc<dyn ClientCertVerifier>>;

/// The certificate and client verifier the texts make, or why they make none.
fn build(texts: &Texts, provider: &Arc<CryptoProvider>) -> Result<(CertifiedKey, Roots), String> {
    let chain = CertificateDer::pem_slice_iter(&texts.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate file is not readable PEM: {e}"))?;
    if chain.is_empty() {
        return Err("the certificate file holds no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&texts.key)
        .map_err(|e| format!("the key file holds no usable PEM private key: {e}"))?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            "the private key does not belong to the certificate".to_string()
        }
        other => format!("the certificate and key cannot be used: {other}"),
    })?;
    let roots = match &texts.client_ca {
        None => None,
        Some(pem) => {
            let mut store = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert =
                    cert.map_err(|e| format!("the client CA file is not readable PEM: {e}"))?;
                store
                    .add(cert)
                    .map_err(|e| format!("the client CA file holds an unusable CA: {e}"))?;
            }
            if store.is_empty() {
                return Err("the client CA file holds no PEM certificate".into());
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone())
                    .build()
                    .map_err(|e| format!("the client CA file cannot verify certificates: {e}"))?;
            Some(verifier)
        }
    };
    Ok((certified, roots))
}

/// Reads the files `config` names (blocking).
fn read_texts(config: &ListenerTlsConfig) -> Result<Texts, String> {
    let read = |path: &std::path::Path, key: &str| {
        file::read(path).map_err(|e| format!("{key} {}: {e}", path.display()))
    };
    Ok(Texts {
        cert: read(&config.cert_file, "server.tls_cert_file")?,
        key: read(&config.key_file, "server.tls_key_file")?,
        client_ca: match &config.client_ca_file {
            Some(path) => Some(read(path, "server.tls_client_ca_file")?),
            None => None,
        },
    })
}

impl ListenerTls {
    /// TLS from the files `config` names, read now.
    pub(crate) fn new(config: &ListenerTlsConfig) -> Result<Self, String> {
        let texts = read_texts(config)?;
        let provider = provider();
        let (certified, roots) = build(&texts, &provider)?;
        let certificate = Arc::new(Certificate(ArcSwap::from_pointee(certified)));
        let verifier = Arc::new(AskForCertificate {
            roots: ArcSwapOption::from(roots.map(Arc::new)),
            provider: provider.clone(),
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(certificate.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ListenerTls {
            config: Arc::new(server),
            certificate,
            verifier,
            files: Mutex::new(Files {
                config: config.clone(),
                good: Some(texts.digest()),
                bad: None,
            }),
            failures: FailureLog::default(),
        })
    }

    fn files(&self) -> std::sync::MutexGuard<'_, Files> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows new file names (a reload); the files are read by the next [`Self::reload`].
    pub(crate) fn set_files(&self, config: &ListenerTlsConfig) {
        let mut files = self.files();
        if files.config != *config {
            files.config = config.clone();
            files.bad = None;
        }
    }

    /// Reads the files again and, when they changed and make a usable pair, serves new
    /// handshakes with them. Open connections keep what they negotiated.
    pub(crate) async fn reload(&self) -> Reloaded {
        let config = self.files().config.clone();
        let texts = match file::in_time({
            let config = config.clone();
            move || read_texts(&config)
        })
        .await
        {
            Ok(texts) => texts,
            Err(why) => return self.refuse(why.as_bytes(), &why),
        };
        let digest = texts.digest();
        {
            let files = self.files();
            if files.good == Some(digest) || files.bad == Some(digest) {
                return Reloaded::Unchanged;
            }
        }
        match build(&texts, &self.verifier.provider) {
            Ok((certified, roots)) => {
                self.certificate.0.store(Arc::new(certified));
                self.verifier.roots.store(roots.map(Arc::new));
                let mut files = self.files();
                files.good = Some(digest);
                files.bad = None;
                tracing::info!(
                    cert_file = %config.cert_file.display(),
                    "listener certificate loaded; new connections use it"
                );
                Reloaded::Replaced
            }
            Err(why) => self.refuse(&digest, &why),
        }
    }

    fn refuse(&self, what: &[u8], why: &str) -> Reloaded {
        let digest: [u8; 32] = Sha256::digest(what).into();
        let mut files = self.files();
        if files.bad != Some(digest) {
            files.bad = Some(digest);
            tracing::warn!(
                error = %why,
                "listener certificate files refused; the previous ones stay in use"
            );
        }
        Reloaded::Refused
    }

    /// The TLS handshake on an accepted connection, within `deadline`; `None` (logged, at
    /// most once a minute per reason) when it fails.
    pub(crate) async fn accept(
        &self,
        stream: TcpStream,
        deadline: Duration,
    ) -> Option<(TlsStream<TcpStream>, PeerCertificate)> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.clone());
        let tls = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.failures.note(reason(&e), &e);
                return None;
            }
            Err(_) => {
                let why = format!("no TLS handshake within {deadline:?}");
                self.failures
                    .note("no handshake within server.header_read_timeout", &why);
                return None;
            }
        };
        let peer = self.peer(tls.get_ref().1.peer_certificates());
        Some((tls, peer))
    }

    /// What the peer's certificate chain is worth, checked against the client CA in force.
    fn peer(&self, chain: Option<&[CertificateDer<'static>]>) -> PeerCertificate {
        let Some((leaf, intermediates)) = chain.and_then(|c| c.split_first()) else {
            return PeerCertificate::None;
        };
        let Some(roots) = self.verifier.roots.load_full() else {
            return PeerCertificate::Refused("client certificate: no client CA configured");
        };
        if let Err(e) = roots.verify_client_cert(leaf, intermediates, UnixTime::now()) {
            return PeerCertificate::Refused(refusal(&e));
        }
        PeerCertificate::Verified(uri_sans(leaf))
    }
}

/// How often a line is logged for one reason of failed handshakes, at most.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Failed handshakes, by reason: when each reason was last logged, and how many failed since.
#[derive(Default)]
struct FailureLog(Mutex<HashMap<&'static str, (Option<Instant>, u64)>>);

impl FailureLog {
    /// Counts a failure; logs it when its reason was not logged within the last minute. The
    /// reasons are a fixed set, so the map stays small. The count logged, if it was.
    fn note(&self, reason: &'static str, error: &dyn std::fmt::Display) -> Option<u64> {
        let now = Instant::now();
        let failures = {
            let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let (logged, count) = seen.entry(reason).or_default();
            *count += 1;
            if logged.is_some_and(|at| now.duration_since(at) < FAILURE_LOG_EVERY) {
                return None;
            }
            *logged = Some(now);
            std::mem::replace(count, 0)
        };
        // `failures`: this one and those not logged since the previous line for the reason.
        tracing::warn!(reason, failures, error = %error, "TLS handshake failed");
        Some(failures)
    }
}

/// Why a handshake failed, in words, from a fixed set.
fn reason(e: &std::io::Error) -> &'static str {
    use rustls::{Error as E, InvalidMessage, PeerMisbehaved};
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) else {
        return "connection closed or failed during the handshake";
    };
    match tls {
        E::InvalidMessage(InvalidMessage::InvalidServerName)
        | E::PeerMisbehaved(
            PeerMisbehaved::ServerNameMustContainOneHostName
            | PeerMisbehaved::ServerNameDifferedOnRetry,
        ) => "illegal SNI server name",
        E::InvalidMessage(InvalidMessage::InvalidContentType) => {
            "not TLS (plain HTTP on the TLS port?)"
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => "malformed handshake",
        E::InappropriateHandshakeMessage { .. } | E::PeerMisbehaved(_) => {
            "client broke the handshake protocol"
        }
        E::PeerIncompatible(_) => "client incompatible (TLS versions, cipher suites or groups)",
        E::NoApplicationProtocol => "no common ALPN protocol (h2, http/1.1)",
        E::AlertReceived(_) => "client sent an alert (does it trust the certificate?)",
        _ => "handshake refused",
    }
}

fn refusal(e: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "client certificate: not issued by server.tls_client_ca_file"
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "client certificate: expired"
        }
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "client certificate: not yet valid"
        }
        rustls::Error::InvalidCertificate(C::Revoked) => "client certificate: revoked",
        rustls::Error::InvalidCertificate(C::InvalidPurpose | C::InvalidPurposeContext { .. }) => {
            "client certificate: not for client authentication"
        }
        _ => "client certificate: does not verify",
    }
}

/// The URI subject alternative names of a certificate (a SPIFFE ID is one).
fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One line per reason a minute; the next one counts the failures in between.
    #[tokio::test(start_paused = true)]
    async fn failed_handshakes_are_logged_once_a_minute_per_reason_with_a_count() {
        let log = FailureLog::default();
        let sni = "illegal SNI server name";
        assert_eq!(log.note(sni, &"x"), Some(1));
        assert_eq!(log.note(sni, &"x"), None);
        assert_eq!(
            log.note("not TLS", &"y"),
            Some(1),
            "another reason: its own line"
        );
        tokio::time::advance(FAILURE_LOG_EVERY - Duration::from_millis(1)).await;
        assert_eq!(log.note(sni, &"x"), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            log.note(sni, &"x"),
            Some(3),
            "the two held back, and this one"
        );
        assert_eq!(log.note(sni, &"x"), None);
    }
}
