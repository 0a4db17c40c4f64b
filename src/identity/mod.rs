//! Who a caller is, beyond keys (CONTRACT §12): TLS on the main listener with optional client
//! certificates ([`tls`]), and JWTs verified against a JWKS ([`jwt`]). Both follow their
//! files: looked at every second, and at once on SIGHUP ([`Identity::reload`]); a broken new
//! file keeps the old one and logs why.

mod file;
pub(crate) mod jwt;
pub(crate) mod tls;

use std::sync::Arc;
use std::time::Duration;

use crate::config::{JwtConfig, ListenerTlsConfig};
use jwt::{JwksClient, Jwt, Verifier};
use tls::ListenerTls;

/// How often certificate and JWKS files are looked at for changes.
pub(crate) const FILE_POLL: Duration = Duration::from_secs(1);

/// How a request's caller was identified: the access log's `auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Key,
    Jwt,
    Mtls,
}

impl Method {
    pub fn label(self) -> &'static str {
        match self {
            Method::Key => "key",
            Method::Jwt => "jwt",
            Method::Mtls => "mtls",
        }
    }
}

/// The listener's TLS and the JWT verifier, with what keeps them current.
pub struct Identity {
    pub(crate) tls: Option<Arc<ListenerTls>>,
    pub(crate) jwt: Arc<Jwt>,
    pub(crate) jwks_client: Arc<JwksClient>,
    /// Wakes [`Identity::follow`] when a reload brings a `[jwt]` to follow.
    wake: tokio::sync::Notify,
}

impl Identity {
    /// Keys only: no TLS on the listener, no `[jwt]`.
    pub fn keys_only() -> Self {
        Identity {
            tls: None,
            jwt: Arc::new(Jwt::default()),
            jwks_client: Arc::new(JwksClient::new()),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// From the config: certificate and JWKS files are read now (an unusable one is an error).
    pub(crate) fn new(
        tls: Option<&ListenerTlsConfig>,
        jwt: Option<&JwtConfig>,
    ) -> Result<Self, String> {
        let tls = tls.map(ListenerTls::new).transpose()?.map(Arc::new);
        let current = Jwt::default();
        if let Some(cfg) = jwt {
            current
                .current
                .store(Some(Arc::new(Verifier::new(cfg.clone())?)));
        }
        Ok(Identity {
            tls,
            jwt: Arc::new(current),
            jwks_client: Arc::new(JwksClient::new()),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// A new `[jwt]` (a reload): a new verifier, with no remembered tokens. A JWKS file that
    /// cannot be used refuses the change.
    pub(crate) fn set_jwt(&self, jwt: Option<&JwtConfig>) -> Result<(), String> {
        let next = jwt
            .map(|cfg| Verifier::new(cfg.clone()))
            .transpose()?
            .map(Arc::new);
        self.jwt.current.store(next);
        self.wake.notify_one();
        Ok(())
    }

    /// New certificate file names (a reload).
    pub(crate) fn set_tls_files(&self, files: Option<&ListenerTlsConfig>) {
        if let (Some(tls), Some(files)) = (&self.tls, files) {
            tls.set_files(files);
        }
    }

    /// Looks at every file now (SIGHUP), and at a JWKS URL when it is due.
    pub(crate) async fn reload(&self) {
        if let Some(tls) = &self.tls {
            tls.reload().await;
        }
        if let Some(verifier) = self.jwt.current.load_full() {
            verifier.upkeep(&self.jwks_client, false).await;
        }
    }

    /// Whether there is a certificate or a JWKS to keep current.
    fn follows_anything(&self) -> bool {
        self.tls.is_some() || self.jwt.current.load().is_some()
    }

    /// Keeps files and the JWKS URL current until the task is dropped. With neither TLS nor
    /// `[jwt]` it sleeps, without polling, until a reload brings a `[jwt]`.
    pub(crate) async fn follow(self: Arc<Self>) {
        let mut tick = tokio::time::interval(FILE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !self.follows_anything() {
                self.wake.notified().await;
                continue;
            }
            tick.tick().await;
            self.reload().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::JwksSource;

    const EC_KEY: &str = r#"{"kty":"EC","crv":"P-256","kid":"KID",
        "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#;

    fn jwks(kids: &[&str]) -> String {
        let keys: Vec<String> = kids.iter().map(|k| EC_KEY.replace("KID", k)).collect();
        format!(r#"{{"keys":[{}]}}"#, keys.join(","))
    }

    /// With nothing to follow the task waits without polling; a `[jwt]` brought by a reload
    /// wakes it, and its JWKS file is followed from then on.
    #[tokio::test]
    async fn a_jwt_section_added_by_a_reload_is_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, jwks(&["a"])).expect("write");
        let identity = Arc::new(Identity::keys_only());
        assert!(!identity.follows_anything());
        let follow = tokio::spawn(identity.clone().follow());
        // The task runs, and finds nothing to follow, before the reload.
        tokio::time::sleep(Duration::from_millis(50)).await;
        identity
            .set_jwt(Some(&JwtConfig {
                issuer: "https://issuer".into(),
                audience: "bill24-gateway".into(),
                jwks: JwksSource::File(path.clone()),
                leeway: Duration::from_secs(30),
            }))
            .expect("usable JWKS");
        assert!(identity.follows_anything());
        std::fs::write(&path, jwks(&["a", "b"])).expect("write");
        let keys = || identity.jwt.current.load_full().map(|v| v.key_count());
        for _ in 0..100 {
            if keys() == Some(2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(keys(), Some(2), "the new JWKS file was read");
        follow.abort();
    }
}
