//! What the layers of the stack know and learn about one request, in one shared allocation
//! carried in the request's extensions: its id and trace (from the correlation layer), its
//! caller (from authentication) and, for the access log line, what the balance path found.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::Request;
use smol_str::SmolStr;
use tokio::time::Instant;

use crate::balance::cache::{CacheStatus, Tier};
use crate::balance::code::SyncCode;
use crate::caller::Caller;
use crate::correlation::context::{RequestId, TraceContext};
use crate::identity::Method;

#[derive(Clone)]
pub struct RequestState(Arc<Inner>);

/// The deadline of a request that went through no deadline layer (`server.request_timeout`'s
/// default).
const UNSET_DEADLINE: Duration = Duration::from_secs(10);

struct Inner {
    /// When the request came in: its latency and its deadline count from here.
    start: Instant,
    /// When the gateway gives up on it (504), as the deadline layer set it; Bill24 retries
    /// keep to it too.
    deadline: OnceLock<Instant>,
    id: RequestId,
    /// The caller's trace when it sent a valid `traceparent`; otherwise started on first use
    /// (a cache hit with the access log off never needs one).
    trace: OnceLock<TraceContext>,
    caller: OnceLock<(Caller, Method)>,
    notes: Mutex<Notes>,
}

/// What the balance path found, for the access log line.
#[derive(Default)]
pub struct Notes {
    pub customer_sync_code: Option<SyncCode>,
    pub cache: Option<CacheStatus>,
    /// Which cache tier answered (`None` for an answer straight from Bill24).
    pub cache_tier: Option<Tier>,
    pub bill24_code: Option<SmolStr>,
    pub upstream_status: Option<u16>,
    pub upstream_ms: Option<f64>,
    /// Why the credentials presented identified no caller (a JWT or client-certificate check).
    pub auth_error: Option<&'static str>,
}

impl RequestState {
    pub fn new(id: RequestId, trace: Option<TraceContext>) -> Self {
        let cell = OnceLock::new();
        if let Some(trace) = trace {
            let _ = cell.set(trace);
        }
        RequestState(Arc::new(Inner {
            start: Instant::now(),
            deadline: OnceLock::new(),
            id,
            trace: cell,
            caller: OnceLock::new(),
            notes: Mutex::default(),
        }))
    }

    /// The request's state, as the correlation layer put it into the request's extensions; a
    /// layer used without that one above it starts the state itself.
    pub fn of<B>(req: &mut Request<B>) -> Self {
        if let Some(state) = req.extensions().get::<RequestState>() {
            return state.clone();
        }
        let state = RequestState::new(RequestId::from_headers(req.headers()), None);
        req.extensions_mut().insert(state.clone());
        state
    }

    /// A state for work done on this request's behalf after it was answered (a background
    /// refresh): the same id and trace, its own notes, so it does not write into the
    /// request's log line.
    pub fn detached(&self) -> Self {
        let state = RequestState::new(self.0.id.clone(), Some(self.trace()));
        if let Some(caller) = self.0.caller.get() {
            let _ = state.0.caller.set(caller.clone());
        }
        state
    }

    pub fn start(&self) -> Instant {
        self.0.start
    }

    /// Sets the deadline, `timeout` from the start (once; a later call is ignored), and
    /// returns the one in force.
    pub fn set_deadline(&self, timeout: Duration) -> Instant {
        *self.0.deadline.get_or_init(|| self.0.start + timeout)
    }

    pub fn deadline(&self) -> Instant {
        *self
            .0
            .deadline
            .get_or_init(|| self.0.start + UNSET_DEADLINE)
    }

    pub fn id(&self) -> &RequestId {
        &self.0.id
    }

    pub fn trace(&self) -> TraceContext {
        *self.0.trace.get_or_init(TraceContext::generate)
    }

    /// Records the authenticated caller and how it was identified (once; a later call is
    /// ignored).
    pub fn set_caller(&self, caller: Caller, method: Method) {
        let _ = self.0.caller.set((caller, method));
    }

    pub fn caller(&self) -> Option<&Caller> {
        self.0.caller.get().map(|(caller, _)| caller)
    }

    /// How the caller was identified.
    pub fn auth_method(&self) -> Option<Method> {
        self.0.caller.get().map(|(_, method)| *method)
    }

    /// Why presented credentials identified no caller, for the log line.
    pub fn auth_error(&self, why: &'static str) {
        self.note(|n| n.auth_error = Some(why));
    }

    fn note(&self, f: impl FnOnce(&mut Notes)) {
        if let Ok(mut notes) = self.0.notes.lock() {
            f(&mut notes);
        }
    }

    pub fn customer_sync_code(&self, code: &SyncCode) {
        self.note(|n| n.customer_sync_code = Some(code.clone()));
    }

    pub fn cache(&self, status: CacheStatus) {
        self.note(|n| n.cache = Some(status));
    }

    pub fn bill24_code(&self, code: Option<&SmolStr>) {
        self.note(|n| n.bill24_code = code.cloned());
    }

    /// All at once, for a cached answer.
    pub fn cached(&self, status: CacheStatus, tier: Tier, code: &SmolStr) {
        self.note(|n| {
            n.cache = Some(status);
            n.cache_tier = Some(tier);
            n.bill24_code = Some(code.clone());
        });
    }

    pub fn upstream(&self, status: Option<u16>, elapsed: Option<Duration>) {
        self.note(|n| {
            n.upstream_status = status;
            n.upstream_ms = elapsed.map(millis);
        });
    }

    /// The notes so far, leaving none behind.
    pub fn take_notes(&self) -> Notes {
        self.0
            .notes
            .lock()
            .map(|mut n| std::mem::take(&mut *n))
            .unwrap_or_default()
    }
}

/// Milliseconds with microsecond precision, as the access log writes durations.
pub(crate) fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_trace_stays_and_a_detached_state_shares_id_and_trace_only() {
        let state = RequestState::new(RequestId::generate(), None);
        let trace = state.trace();
        assert_eq!(state.trace(), trace, "started once");
        state.customer_sync_code(&SyncCode::new("M005T"));
        state.cache(CacheStatus::Hit);

        let detached = state.detached();
        assert_eq!(detached.id().as_str(), state.id().as_str());
        assert_eq!(detached.trace(), trace);
        detached.cache(CacheStatus::Miss);
        assert!(detached.take_notes().customer_sync_code.is_none());

        let notes = state.take_notes();
        assert_eq!(
            notes.cache,
            Some(CacheStatus::Hit),
            "untouched by the detached state"
        );
        assert_eq!(notes.customer_sync_code.as_deref(), Some("M005T"));
        assert!(state.take_notes().cache.is_none(), "taken");
    }

    #[test]
    fn a_received_trace_is_kept() {
        let received =
            TraceContext::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let state = RequestState::new(RequestId::generate(), received);
        assert_eq!(Some(state.trace()), received);
    }
}
