//! The fleet's one merchant token, for the Bill24 client's token manager: encrypted in Redis
//! ([`super::seal`]), refreshed under a lock by one replica, announced on the channel.

use std::sync::Arc;
use std::time::Duration;

use bill24::token::{SharedToken, TokenStore, Unavailable};
use futures_util::future::BoxFuture;
use redis::Script;
use tokio::sync::watch;

use super::fill::RELEASE;
use super::seal::{self, Rejected};
use super::{Fleet, millis};

/// The fleet's token store.
pub(crate) struct TokenShare(pub(crate) Arc<Fleet>);

impl TokenStore for TokenShare {
    fn load(&self) -> BoxFuture<'_, Result<Option<SharedToken>, Unavailable>> {
        Box::pin(async move {
            let fleet = &self.0;
            // A replica that has just started looks for the fleet's token before buying one.
            fleet.link.ready(Duration::from_secs(2)).await;
            let key = fleet.keys.token();
            let bytes: Option<Vec<u8>> = fleet
                .link
                .call("token_get", |c| {
                    c.query(redis::cmd("GET").arg(&key).clone())
                })
                .await
                .map_err(|_| Unavailable)?;
            let Some(bytes) = bytes else { return Ok(None) };
            match seal::open_token(&fleet.secrets, &key, &bytes) {
                Ok(token) => Ok(Some(token)),
                Err(Rejected) => {
                    fleet.metrics().redis("token_get", "rejected", None);
                    tracing::warn!("the shared access token did not decrypt; not used");
                    Ok(None)
                }
            }
        })
    }

    fn lock(&self) -> BoxFuture<'_, Result<bool, Unavailable>> {
        Box::pin(async move {
            let fleet = &self.0;
            let key = fleet.keys.token_lock();
            let set: Option<String> = fleet
                .link
                .call("token_lock", |c| {
                    c.query(
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(&fleet.lock_id)
                            .arg("NX")
                            .arg("PX")
                            .arg(millis(fleet.token_ttl))
                            .clone(),
                    )
                })
                .await
                .map_err(|_| Unavailable)?;
            Ok(set.is_some())
        })
    }

    fn store(&self, token: SharedToken) -> BoxFuture<'_, Result<(), Unavailable>> {
        Box::pin(async move {
            let fleet = &self.0;
            let key = fleet.keys.token();
            let sealed = seal::seal_token(&fleet.secrets, &key, &token);
            let mut set = redis::cmd("SET");
            set.arg(&key).arg(sealed);
            // Kept until it expires (an hour at most when Bill24 gave no expiry).
            let left = token
                .expires_at
                .map(|at| at - clock::now_utc())
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or(Duration::from_secs(3600));
            set.arg("PX").arg(millis(left).max(1));
            fleet
                .link
                .call("token_set", |c| c.query::<()>(set))
                .await
                .map_err(|_| Unavailable)?;
            fleet.publish("token".into()).await;
            Ok(())
        })
    }

    fn release(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let fleet = &self.0;
            let key = fleet.keys.token_lock();
            let script = Script::new(RELEASE);
            let _: Result<i64, _> = fleet
                .link
                .call_anyway("unlock", |c| async move {
                    c.script(&script, &[&key], &[fleet.lock_id.as_bytes()])
                        .await
                })
                .await;
        })
    }

    fn lock_ttl(&self) -> Duration {
        self.0.token_ttl
    }

    fn token_changes(&self) -> watch::Receiver<u64> {
        self.0.token_version.subscribe()
    }
}
