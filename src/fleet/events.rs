//! The fleet's channel and what travels on it: fill outcomes (which end other replicas'
//! waits), purges (which drop L1 copies), token changes; and the purge epoch that a
//! `DELETE /cache` replaces.
//!
//! The epoch is a random value in Redis (`P:C:epoch`, absent = 0); an entry serves only when
//! it was stored under the epoch in force. A `purge-all` message only says "look again": each
//! replica re-reads the epoch from Redis (one read per 20 ms at most, however many messages
//! came meanwhile), so
//! neither a forged message nor a Redis that restarted empty can set it to something Redis
//! does not hold.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use singleflight::{Flight, Flights};
use tokio::sync::Notify;

use bill24::fleet::CircuitNews;

use super::Fleet;
use super::conn::{CallError, FIRST_BACKOFF, MAX_BACKOFF};
use crate::tier::{Invalidation, WaitOutcome};

/// The epoch of a replica that has not read it yet.
const UNKNOWN: u64 = u64::MAX;
/// How often the epoch is read even without a message (a missed one costs at most this).
const EPOCH_RECHECK: Duration = Duration::from_secs(1);
/// The least time between two reads of the epoch: a storm of `purge-all` messages (anyone
/// who may publish on the channel can send them) costs one read per gap, not one per message;
/// a purge is seen at most this much later than otherwise.
const EPOCH_READ_GAP: Duration = Duration::from_millis(20);

/// Waits for other replicas' fills, by hex code: a message finishes (and removes) the key's
/// flight, so a wait registered before the lock was looked at cannot miss it.
pub(super) type Waits = Flights<String, Flight<WaitOutcome>>;

/// The purge epoch as this replica knows it.
pub(super) struct Epoch {
    value: AtomicU64,
    /// A `purge-all` message came: read it again.
    recheck: Notify,
}

impl Default for Epoch {
    fn default() -> Self {
        Epoch {
            value: AtomicU64::new(UNKNOWN),
            recheck: Notify::new(),
        }
    }
}

impl Fleet {
    /// The epoch in force, read from Redis first if this replica does not know it yet;
    /// `None` when it cannot be known now (entries must then be neither used nor stored).
    pub(super) async fn epoch(&self) -> Option<u64> {
        match self.epoch.value.load(Ordering::Acquire) {
            UNKNOWN => self.read_epoch().await,
            known => Some(known),
        }
    }

    /// Reads the epoch from Redis; when it differs from the one this replica knew, a purge
    /// was missed (or Redis lost its data): every L1 copy goes.
    pub(super) async fn read_epoch(&self) -> Option<u64> {
        let key = self.keys.epoch();
        let read = self
            .link
            .call("epoch", |c| {
                c.query::<Option<u64>>(redis::cmd("GET").arg(&key).clone())
            })
            .await;
        let now = match read {
            Ok(value) => value.unwrap_or(0).min(UNKNOWN - 1),
            Err(_) => return None,
        };
        let before = self.epoch.value.swap(now, Ordering::AcqRel);
        if before != now && before != UNKNOWN {
            (self.invalidate)(Invalidation::All);
        }
        Some(now)
    }

    /// A new epoch for `DELETE /cache`: set in Redis, then announced.
    pub(super) async fn new_epoch(&self) -> bool {
        let key = self.keys.epoch();
        let epoch = rand::random_range(1..UNKNOWN - 1);
        let set = self
            .link
            .call("purge", |c| {
                c.query::<()>(redis::cmd("SET").arg(&key).arg(epoch).clone())
            })
            .await;
        if set.is_err() {
            return false;
        }
        self.epoch.value.store(epoch, Ordering::Release);
        self.publish("purge-all".into()).await
    }

    pub(super) async fn publish(&self, message: String) -> bool {
        let channel = self.keys.channel();
        self.link
            .call("publish", |c| {
                c.query::<i64>(redis::cmd("PUBLISH").arg(channel).arg(message).clone())
            })
            .await
            .is_ok()
    }

    /// Like [`Self::publish`], tried even while the tier is marked down (after a fill).
    pub(super) async fn publish_anyway(&self, message: String) -> Result<i64, CallError> {
        let channel = self.keys.channel();
        self.link
            .call_anyway("publish", |c| {
                c.query::<i64>(redis::cmd("PUBLISH").arg(channel).arg(message).clone())
            })
            .await
    }

    /// A message on the fleet's channel.
    fn on_event(&self, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        let (kind, arg) = text.split_once(' ').unwrap_or((&text, ""));
        match kind {
            "fill" => self.end_wait(arg, WaitOutcome::Filled),
            "failed" => self.end_wait(arg, WaitOutcome::Failed),
            "purge" => {
                if let Some(code) = hex::decode(arg)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                {
                    (self.invalidate)(Invalidation::Code(code));
                }
            }
            "purge-all" => self.epoch.recheck.notify_one(),
            "token" => {
                self.token_version.send_modify(|v| *v += 1);
            }
            "circuit-open" => {
                if let Ok(ms) = arg.parse::<u64>() {
                    // A cool-down longer than a day is not one this code sends.
                    let cooldown = Duration::from_millis(ms.min(86_400_000));
                    self.circuit_news.send_modify(|news| {
                        *news = CircuitNews::Opened {
                            cooldown,
                            seq: news_seq(news) + 1,
                        }
                    });
                }
            }
            "circuit-closed" => self.circuit_news.send_modify(|news| {
                *news = CircuitNews::Closed {
                    seq: news_seq(news) + 1,
                }
            }),
            _ => {}
        }
    }

    fn end_wait(&self, hex: &str, outcome: WaitOutcome) {
        if let Some(flight) = self.waits.take(hex) {
            flight.finish(outcome);
        }
    }

    /// Every wait ends: the tier went down, or messages may have been missed.
    pub(super) fn end_all_waits(&self, outcome: WaitOutcome) {
        for flight in self.waits.drain() {
            flight.finish(outcome);
        }
    }

    /// Back after a lost subscription: messages may have been missed, so L1 copies are
    /// dropped, the epoch read again and the token looked at again.
    async fn resubscribed(&self) {
        (self.invalidate)(Invalidation::All);
        self.read_epoch().await;
        self.token_version.send_modify(|v| *v += 1);
        tracing::info!("shared tier subscription restored; local cache copies dropped");
    }
}

fn news_seq(news: &CircuitNews) -> u64 {
    match news {
        CircuitNews::None => 0,
        CircuitNews::Opened { seq, .. } | CircuitNews::Closed { seq } => *seq,
    }
}

/// Reads the epoch again after `purge-all` messages (however many came, one read per
/// [`EPOCH_READ_GAP`] at most) and every [`EPOCH_RECHECK`].
pub(super) async fn watch_epoch(fleet: Arc<Fleet>) {
    loop {
        tokio::select! {
            _ = fleet.epoch.recheck.notified() => {}
            _ = tokio::time::sleep(EPOCH_RECHECK) => {}
        }
        if fleet.link.is_up() {
            fleet.read_epoch().await;
        }
        tokio::time::sleep(EPOCH_READ_GAP).await;
    }
}

/// Keeps a subscription to the fleet's channel, on one node, reconnecting with backoff.
pub(super) async fn subscribe(fleet: Arc<Fleet>) {
    let mut lost = false;
    let mut pause = FIRST_BACKOFF;
    let mut node = 0usize;
    let link = fleet.link.clone();
    loop {
        let client = &link.clients[node % link.clients.len()];
        node = node.wrapping_add(1);
        let within = link.timeout.max(Duration::from_millis(500));
        let connect = tokio::time::timeout(within, client.get_async_pubsub());
        if let Ok(Ok(mut pubsub)) = connect.await
            && tokio::time::timeout(within, pubsub.subscribe(fleet.keys.channel()))
                .await
                .is_ok_and(|r| r.is_ok())
        {
            link.metrics.redis("subscribe", "ok", None);
            if lost {
                fleet.resubscribed().await;
            } else {
                fleet.read_epoch().await;
            }
            pause = FIRST_BACKOFF;
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                fleet.on_event(message.get_payload_bytes());
            }
            lost = true;
            // Messages cannot reach this replica now: nobody may wait for one.
            fleet.end_all_waits(WaitOutcome::TierDown);
            tracing::warn!("shared tier subscription lost; reconnecting");
        } else {
            link.metrics.redis("subscribe", "error", None);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_BACKOFF);
    }
}
