//! Who a caller is, beyond keys (CONTRACT §12): TLS on the main listener with optional client
//! certificates ([`tls`]), and JWTs verified against a JWKS ([`jwt`]). Both follow their
//! files: looked at every second, and at once on SIGHUP ([`Identity::reload`]); a broken new
//! file keeps the old one and logs why.

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
}

impl Identity {
    /// Keys only: no TLS on the listener, no `[jwt]`.
    pub fn keys_only() -> Self {
        Identity {
            tls: None,
            jwt: Arc::new(Jwt::default()),
            jwks_client: Arc::new(JwksClient::new()),
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

    /// Keeps files and the JWKS URL current until the task is dropped.
    pub(crate) async fn follow(self: Arc<Self>) {
        let mut tick = tokio::time::interval(FILE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.reload().await;
        }
    }
}
