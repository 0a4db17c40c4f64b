//! What the replicas of a fleet share with this client in bad times (CONTRACT §13): one
//! ceiling on balance calls to Bill24, and one circuit. The gateway implements [`FleetHooks`]
//! over its shared tier; without it the client acts alone.

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

/// Why no slot under the fleet's ceiling came in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoSlot;

/// What another replica's circuit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CircuitNews {
    /// Nothing yet.
    #[default]
    None,
    /// Opened (or re-opened after a failed probe) for this cool-down.
    Opened { cooldown: Duration, seq: u64 },
    /// Its probe succeeded.
    Closed { seq: u64 },
}

/// The fleet's side of the ceiling and the circuit.
pub trait FleetHooks: Send + Sync + 'static {
    /// A slot for one balance call (each attempt: retries, the retry after a 401 and
    /// refresh-ahead calls count): how long to wait before sending — a place in line, in
    /// arrival order — or [`NoSlot`] when none comes within `within`.
    fn reserve(&self, within: Duration) -> BoxFuture<'_, Result<Duration, NoSlot>>;

    /// A balance call failed in a way that counts toward opening the circuit: counted for the
    /// whole fleet (within a cool-down). True when the fleet's count reached `threshold`, so
    /// the circuit opens here (and, through [`FleetHooks::circuit_opened`], everywhere).
    fn failed(&self, threshold: u32, cooldown: Duration) -> BoxFuture<'_, bool>;

    /// A balance call succeeded: the fleet's count of failures starts again.
    fn succeeded(&self);

    /// This replica's circuit opened for `cooldown`: the fleet's opens too.
    fn circuit_opened(&self, cooldown: Duration);

    /// This replica's probe succeeded: the fleet's circuit closes too.
    fn circuit_closed(&self);

    /// Whether this replica sends the probe of a cooled-down circuit: one for the fleet. True
    /// when the fleet cannot be asked (each replica then probes for itself).
    fn claim_probe(&self, cooldown: Duration) -> BoxFuture<'_, bool>;

    /// What other replicas' circuits did, as it happens.
    fn circuit_news(&self) -> watch::Receiver<CircuitNews>;
}
