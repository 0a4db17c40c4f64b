//! What a new config does to the callers, against the one in force: who is added, who is
//! removed, whose limits are loosened and what else changed. A reload logs it, and
//! `--check-config --against` prints it, so that a half-written file that still parses (cut
//! before a caller's `rate_limit_rps`, or before a `[[callers]]`) is seen for what it does.
//!
//! Key hashes are never shown: a changed key list reads "key changed".

use std::collections::BTreeMap;

use crate::config::{CallerConfig, LimitScope};

/// The callers' changes between two configs, each entry naming its caller.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CallerChanges {
    /// Callers only the new config has.
    pub added: Vec<String>,
    /// Callers only the old config has: their requests are now refused.
    pub removed: Vec<String>,
    /// A limit raised or lifted, e.g. `orders: rate_limit_rps 50 -> 0 (unlimited)`.
    pub loosened: Vec<String>,
    /// Everything else that changed: limits lowered, keys, SPIFFE IDs, JWT subjects.
    pub changed: Vec<String>,
}

impl CallerChanges {
    /// Compares the callers of `old` with those of `new` (matched by name).
    pub fn between(old: &[CallerConfig], new: &[CallerConfig]) -> Self {
        let old: BTreeMap<&str, &CallerConfig> = old.iter().map(|c| (&*c.name, c)).collect();
        let new: BTreeMap<&str, &CallerConfig> = new.iter().map(|c| (&*c.name, c)).collect();
        let mut changes = CallerChanges::default();
        for (name, was) in &old {
            match new.get(name) {
                None => changes.removed.push(name.to_string()),
                Some(now) => changes.compare(name, was, now),
            }
        }
        changes.added = new
            .keys()
            .filter(|name| !old.contains_key(*name))
            .map(|name| name.to_string())
            .collect();
        changes
    }

    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.loosened.is_empty()
            && self.changed.is_empty()
    }

    /// A caller was removed or a limit loosened: what a cut-off file does.
    pub fn weakens(&self) -> bool {
        !self.removed.is_empty() || !self.loosened.is_empty()
    }

    fn compare(&mut self, name: &str, was: &CallerConfig, now: &CallerConfig) {
        let mut note = |loosened: bool, what: String| {
            let entry = format!("{name}: {what}");
            if loosened {
                self.loosened.push(entry);
            } else {
                self.changed.push(entry);
            }
        };
        if was.rate_limit_rps != now.rate_limit_rps {
            note(
                looser(was.rate_limit_rps, now.rate_limit_rps),
                format!(
                    "rate_limit_rps {} -> {}",
                    limit(was.rate_limit_rps),
                    limit(now.rate_limit_rps)
                ),
            );
        }
        if was.burst != now.burst {
            // Compared as the buckets they make; without a rate there is no bucket.
            let effective = |c: &CallerConfig| match c.rate_limit_rps {
                rps if rps <= 0.0 => 0.0,
                rps => f64::from(crate::config::burst_at(rps, c.burst)),
            };
            note(
                looser(effective(was), effective(now)),
                format!("burst {} -> {}", was.burst, now.burst),
            );
        }
        if was.max_concurrent != now.max_concurrent {
            note(
                looser(f64::from(was.max_concurrent), f64::from(now.max_concurrent)),
                format!(
                    "max_concurrent {} -> {}",
                    limit(f64::from(was.max_concurrent)),
                    limit(f64::from(now.max_concurrent))
                ),
            );
        }
        if was.limit_scope != now.limit_scope {
            // A per-replica limit is the fleet one times the replicas a caller reaches.
            note(
                now.limit_scope == LimitScope::Replica,
                format!(
                    "limit_scope {} -> {}",
                    scope(was.limit_scope),
                    scope(now.limit_scope)
                ),
            );
        }
        if was.key_sha256 != now.key_sha256 {
            note(
                false,
                format!(
                    "key changed ({} -> {} keys)",
                    was.key_sha256.len(),
                    now.key_sha256.len()
                ),
            );
        }
        if was.spiffe_id != now.spiffe_id {
            note(false, "spiffe_id changed".to_string());
        }
        if was.jwt_subject != now.jwt_subject {
            note(false, "jwt_subject changed".to_string());
        }
    }
}

/// Whether a limit where 0 means "none" went up or away.
fn looser(was: f64, now: f64) -> bool {
    was > 0.0 && (now <= 0.0 || now > was)
}

fn limit(value: f64) -> String {
    if value <= 0.0 {
        "0 (unlimited)".to_string()
    } else {
        value.to_string()
    }
}

fn scope(scope: LimitScope) -> &'static str {
    match scope {
        LimitScope::Replica => "replica",
        LimitScope::Fleet => "fleet",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(name: &str, rps: f64, burst: u32, max_concurrent: u32) -> CallerConfig {
        CallerConfig {
            name: name.into(),
            key_sha256: vec![[1; 32]],
            spiffe_id: None,
            jwt_subject: None,
            rate_limit_rps: rps,
            burst,
            max_concurrent,
            limit_scope: LimitScope::Replica,
        }
    }

    #[test]
    fn a_cut_off_file_reads_as_removed_and_loosened() {
        let old = [caller("orders", 50.0, 0, 8), caller("billing", 5.0, 0, 0)];
        let new = [caller("orders", 0.0, 0, 8)];
        let changes = CallerChanges::between(&old, &new);
        assert_eq!(changes.removed, ["billing"]);
        assert_eq!(
            changes.loosened,
            ["orders: rate_limit_rps 50 -> 0 (unlimited)"]
        );
        assert!(changes.added.is_empty() && changes.changed.is_empty());
        assert!(changes.weakens());
    }

    #[test]
    fn tightened_limits_and_new_keys_are_changes_not_loosening() {
        let mut rotated = caller("orders", 20.0, 40, 4);
        rotated.key_sha256.push([2; 32]);
        rotated.limit_scope = LimitScope::Fleet;
        let changes = CallerChanges::between(
            &[caller("orders", 50.0, 10, 0)],
            &[rotated, caller("new", 1.0, 0, 0)],
        );
        assert_eq!(changes.added, ["new"]);
        assert_eq!(
            changes.changed,
            [
                "orders: rate_limit_rps 50 -> 20",
                "orders: max_concurrent 0 (unlimited) -> 4",
                "orders: limit_scope replica -> fleet",
                "orders: key changed (1 -> 2 keys)",
            ]
        );
        // The bucket grew from 10 to 40.
        assert_eq!(changes.loosened, ["orders: burst 10 -> 40"]);
        let text = format!("{changes:?}");
        assert!(!text.contains("0101"), "no key hash: {text}");
    }

    #[test]
    fn the_same_callers_are_no_change() {
        let callers = [caller("orders", 50.0, 0, 8)];
        assert!(CallerChanges::between(&callers, &callers).is_empty());
        // Burst 0 with rps 50 is a bucket of 50: 0 -> 100 raises it.
        let changes =
            CallerChanges::between(&[caller("a", 50.0, 0, 0)], &[caller("a", 50.0, 100, 0)]);
        assert_eq!(changes.loosened, ["a: burst 0 -> 100"]);
    }
}
