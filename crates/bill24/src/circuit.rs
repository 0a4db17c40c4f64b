//! The circuit breaker on Bill24: after `upstream.circuit_failures` consecutive failed
//! requests it opens, and requests fail at once without touching Bill24; after
//! `upstream.circuit_cooldown` one probe request is let through, and its outcome closes the
//! circuit or opens it for another cool-down.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// What the breaker lets a request do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The circuit is closed.
    Normal,
    /// The one request that decides whether a cooled-down circuit closes.
    Probe,
}

/// The breaker's state, as the `gateway_circuit_state` gauge shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

#[derive(Debug)]
enum State {
    Closed {
        consecutive_failures: u32,
    },
    Open {
        until: Instant,
    },
    /// The probe is in flight; everyone else still waits.
    HalfOpen,
}

#[derive(Debug)]
pub struct Circuit {
    /// 0 = never open.
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

/// A state change worth logging and counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
    HalfOpened,
}

impl Circuit {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Circuit {
            threshold,
            cooldown,
            state: Mutex::new(State::Closed {
                consecutive_failures: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a request through, or says how long until one may try.
    pub fn admit(&self, now: Instant) -> Result<(Admission, Option<Transition>), Duration> {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Ok((Admission::Normal, None)),
            State::Open { until } if now < until => Err(until - now),
            State::Open { .. } => {
                *state = State::HalfOpen;
                Ok((Admission::Probe, Some(Transition::HalfOpened)))
            }
            State::HalfOpen => Err(self.cooldown),
        }
    }

    /// Records how an admitted request went (`failed`: Bill24 failed it).
    pub fn record(&self, admission: Admission, failed: bool, now: Instant) -> Option<Transition> {
        let mut state = self.lock();
        match (admission, &mut *state) {
            (Admission::Probe, _) if failed => {
                *state = State::Open {
                    until: now + self.cooldown,
                };
                Some(Transition::Opened)
            }
            (Admission::Probe, _) => {
                *state = State::Closed {
                    consecutive_failures: 0,
                };
                Some(Transition::Closed)
            }
            (
                Admission::Normal,
                State::Closed {
                    consecutive_failures,
                },
            ) => {
                if !failed {
                    *consecutive_failures = 0;
                    return None;
                }
                *consecutive_failures = consecutive_failures.saturating_add(1);
                if self.threshold > 0 && *consecutive_failures >= self.threshold {
                    *state = State::Open {
                        until: now + self.cooldown,
                    };
                    return Some(Transition::Opened);
                }
                None
            }
            // Requests admitted before the circuit opened do not move it.
            (Admission::Normal, _) => None,
        }
    }

    /// Another replica's circuit opened for `cooldown` (one circuit for the fleet): open here
    /// for as long, unless already open longer. A probe in flight here still decides.
    pub fn open_for(&self, cooldown: Duration, now: Instant) -> Option<Transition> {
        let mut state = self.lock();
        match *state {
            State::Open { until } if until >= now + cooldown => None,
            State::Open { .. } => {
                *state = State::Open {
                    until: now + cooldown,
                };
                None
            }
            State::HalfOpen => None,
            State::Closed { .. } => {
                *state = State::Open {
                    until: now + cooldown,
                };
                Some(Transition::Opened)
            }
        }
    }

    /// Another replica's probe succeeded: closed here too.
    pub fn close(&self) -> Option<Transition> {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => None,
            _ => {
                *state = State::Closed {
                    consecutive_failures: 0,
                };
                Some(Transition::Closed)
            }
        }
    }

    /// The probe this replica was admitted for is another replica's to send: open again for a
    /// cool-down (that replica's outcome will close or re-open it sooner).
    pub fn probe_elsewhere(&self, now: Instant) {
        *self.lock() = State::Open {
            until: now + self.cooldown,
        };
    }

    pub fn cooldown(&self) -> Duration {
        self.cooldown
    }

    pub fn state(&self) -> CircuitState {
        match *self.lock() {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen => CircuitState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(5);

    #[test]
    fn another_replicas_circuit_opens_and_closes_this_one() {
        let c = Circuit::new(3, COOL);
        let t0 = Instant::now();
        assert_eq!(c.open_for(COOL, t0), Some(Transition::Opened));
        assert_eq!(
            c.admit(t0 + Duration::from_secs(2)),
            Err(Duration::from_secs(3))
        );
        assert_eq!(
            c.open_for(Duration::from_secs(1), t0),
            None,
            "already open longer"
        );
        assert_eq!(
            c.admit(t0 + Duration::from_secs(4)),
            Err(Duration::from_secs(1))
        );
        assert_eq!(c.close(), Some(Transition::Closed));
        assert_eq!(c.close(), None);
        assert_eq!(c.admit(t0), Ok((Admission::Normal, None)));
        // Admitted as the probe, but another replica sends it.
        c.open_for(COOL, t0);
        assert_eq!(
            c.admit(t0 + COOL),
            Ok((Admission::Probe, Some(Transition::HalfOpened)))
        );
        c.probe_elsewhere(t0 + COOL);
        assert_eq!(c.state(), CircuitState::Open);
        assert_eq!(c.admit(t0 + COOL), Err(COOL));
    }

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_cooldown() {
        let c = Circuit::new(3, COOL);
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(c.admit(t0), Ok((Admission::Normal, None)));
            assert_eq!(c.record(Admission::Normal, true, t0), None);
        }
        // A success resets the count.
        assert_eq!(c.record(Admission::Normal, false, t0), None);
        for _ in 0..2 {
            c.record(Admission::Normal, true, t0);
        }
        assert_eq!(
            c.record(Admission::Normal, true, t0),
            Some(Transition::Opened)
        );
        assert_eq!(c.state(), CircuitState::Open);
        assert_eq!(
            c.admit(t0 + Duration::from_secs(1)),
            Err(Duration::from_secs(4))
        );

        let later = t0 + COOL;
        assert_eq!(
            c.admit(later),
            Ok((Admission::Probe, Some(Transition::HalfOpened)))
        );
        assert_eq!(c.admit(later), Err(COOL), "one probe at a time");
        assert_eq!(
            c.record(Admission::Probe, true, later),
            Some(Transition::Opened)
        );
        assert!(c.admit(later + Duration::from_secs(1)).is_err());

        let again = later + COOL;
        assert_eq!(c.admit(again).map(|a| a.0), Ok(Admission::Probe));
        assert_eq!(
            c.record(Admission::Probe, false, again),
            Some(Transition::Closed)
        );
        assert_eq!(c.state(), CircuitState::Closed);
        assert_eq!(c.admit(again).map(|a| a.0), Ok(Admission::Normal));
    }

    #[test]
    fn late_results_do_not_move_an_open_circuit() {
        let c = Circuit::new(1, COOL);
        let t0 = Instant::now();
        c.record(Admission::Normal, true, t0);
        assert_eq!(c.record(Admission::Normal, false, t0), None);
        assert_eq!(c.state(), CircuitState::Open);
    }

    #[test]
    fn threshold_zero_never_opens() {
        let c = Circuit::new(0, COOL);
        let t0 = Instant::now();
        for _ in 0..1000 {
            c.record(Admission::Normal, true, t0);
        }
        assert_eq!(c.state(), CircuitState::Closed);
    }
}
