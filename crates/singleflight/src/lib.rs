//! Single-flight: one computation in flight at a time (per key), its result shared by every
//! caller that asked meanwhile.
//!
//! - [`Flight`] is one computation's outcome as its waiters see it: set once, then every
//!   waiter is woken, the one that waited longest first.
//! - [`Guard`] finishes a flight with a fallback value when the computation ends without a
//!   result (its task was dropped or panicked), so no waiter waits forever.
//! - [`Flights`] is a sharded map of the flights in progress, keyed, behind std mutexes: the
//!   critical sections are a lookup and an insert, never an `.await`.
//!
//! Used by the balance cache (one Bill24 call per customer), the token manager (one authorize
//! at a time) and the fleet tier (one fill per key across replicas).

#![forbid(unsafe_code)]

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::Notify;

/// One computation's result, shared by everyone waiting on it.
#[derive(Debug)]
pub struct Flight<T> {
    result: OnceLock<T>,
    /// Wakes the waiters once `result` is set, the longest-waiting first: one `Notify` keeps
    /// its waiters in arrival order (a `watch` channel spreads its receivers over several
    /// lists and wakes them in no particular order, so the first request to arrive could be
    /// answered last, a whole fan-out later).
    done: Notify,
}

impl<T> Default for Flight<T> {
    fn default() -> Self {
        Flight {
            result: OnceLock::new(),
            done: Notify::new(),
        }
    }
}

impl<T: Clone> Flight<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the result and wakes every waiter. The first result set stays; returns whether
    /// this one was it.
    pub fn finish(&self, result: T) -> bool {
        let first = self.result.set(result).is_ok();
        self.done.notify_waiters();
        first
    }

    /// The result, once set.
    pub fn result(&self) -> Option<&T> {
        self.result.get()
    }

    pub fn is_finished(&self) -> bool {
        self.result.get().is_some()
    }

    /// Waits for the result.
    pub async fn wait(&self) -> T {
        loop {
            let notified = self.done.notified();
            let mut notified = std::pin::pin!(notified);
            // In the waiter list before looking, so a result set in between still wakes us.
            notified.as_mut().enable();
            if let Some(result) = self.result.get() {
                return result.clone();
            }
            notified.await;
        }
    }
}

/// Finishes its flight with `abandoned()` when dropped before the flight has a result. Make
/// it before spawning the computation and move it in, so even a task dropped before it first
/// runs finishes its flight.
pub struct Guard<T: Clone> {
    flight: Arc<Flight<T>>,
    abandoned: fn() -> T,
}

impl<T: Clone> Guard<T> {
    pub fn new(flight: Arc<Flight<T>>, abandoned: fn() -> T) -> Self {
        Guard { flight, abandoned }
    }

    pub fn flight(&self) -> &Arc<Flight<T>> {
        &self.flight
    }
}

impl<T: Clone> Drop for Guard<T> {
    fn drop(&mut self) {
        if !self.flight.is_finished() {
            self.flight.finish((self.abandoned)());
        }
    }
}

type Shard<K, V> = Mutex<HashMap<K, Arc<V>>>;

/// What [`Flights::join_or_start`] did.
#[derive(Debug)]
pub enum Joined<V, R> {
    /// A flight was in progress: this is it.
    Joined(Arc<V>),
    /// None was: this one was started and registered.
    Started(Arc<V>),
    /// None was, and `start` declined to make one.
    Declined(R),
}

/// The flights in progress, by key, in shards so that unrelated keys rarely share a lock.
/// The values are the caller's own type (a flight plus whatever it needs beside it).
pub struct Flights<K, V> {
    shards: Box<[Shard<K, V>]>,
    hasher: foldhash::fast::RandomState,
}

impl<K: Eq + Hash, V> Flights<K, V> {
    /// `shards` locks (at least one).
    pub fn new(shards: usize) -> Self {
        Flights {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn shard<Q>(&self, key: &Q) -> MutexGuard<'_, HashMap<K, Arc<V>>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let index = (self.hasher.hash_one(key) as usize) % self.shards.len();
        // A map of plain values updated in one step: a poisoned lock still holds a
        // consistent one.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Joins the flight in progress for `key` (`join` sees it, under the shard's lock), or,
    /// when there is none, lets `start` make one and registers it — in one step, so two
    /// callers never both start. `start` may decline (for instance, because what the flight
    /// would compute is there after all); nothing is registered then.
    pub fn join_or_start<R>(
        &self,
        key: K,
        join: impl FnOnce(&V),
        start: impl FnOnce() -> Result<V, R>,
    ) -> Joined<V, R> {
        let mut shard = self.shard(&key);
        if let Some(existing) = shard.get(&key) {
            join(existing);
            return Joined::Joined(existing.clone());
        }
        match start() {
            Ok(value) => {
                let value = Arc::new(value);
                shard.insert(key, value.clone());
                Joined::Started(value)
            }
            Err(declined) => Joined::Declined(declined),
        }
    }

    /// Starts a flight for `key` only if none is in progress.
    pub fn start_if_absent(&self, key: K, start: impl FnOnce() -> V) -> Option<Arc<V>> {
        match self.join_or_start(key, |_| {}, || Ok::<V, ()>(start())) {
            Joined::Started(value) => Some(value),
            Joined::Joined(_) | Joined::Declined(()) => None,
        }
    }

    /// Takes `key`'s flight out of the map (to finish it): later callers start a new one.
    pub fn take<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shard(key).remove(key)
    }

    /// Takes every flight out of the map.
    pub fn drain(&self) -> Vec<Arc<V>> {
        self.shards
            .iter()
            .flat_map(|shard| {
                shard
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .drain()
                    .map(|(_, v)| v)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Removes `key`'s flight if it is still `flight` and nobody but the map and the caller
    /// holds it (the last waiter leaving a flight nobody will finish).
    pub fn remove_if_unshared<Q>(&self, key: &Q, flight: &Arc<V>)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut shard = self.shard(key);
        if shard
            .get(key)
            .is_some_and(|f| Arc::ptr_eq(f, flight) && Arc::strong_count(f) <= 2)
        {
            shard.remove(key);
        }
    }

    /// Removes `key`'s flight if it is still `flight` (a later one for the key stays).
    pub fn remove<Q>(&self, key: &Q, flight: &Arc<V>)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut shard = self.shard(key);
        if shard.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            shard.remove(key);
        }
    }

    /// Whether a flight for `key` is in progress.
    pub fn contains<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shard(key).contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waiters that arrived one after another, woken by one finish: the order they resume in.
    async fn wake_order(waiters: usize) -> Vec<usize> {
        let flight = Arc::new(Flight::<u32>::new());
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..waiters {
            let (flight, order) = (flight.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                assert_eq!(flight.wait().await, 7);
                order.lock().expect("order").push(i);
            }));
            // Let it run up to its wait before the next one arrives.
            tokio::task::yield_now().await;
        }
        flight.finish(7);
        for task in tasks {
            task.await.expect("waiter");
        }
        order.lock().map(|o| o.clone()).expect("order")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn waiters_resume_in_the_order_they_came() {
        // More than one batch of tokio's wake-ups (32).
        assert_eq!(wake_order(200).await, (0..200).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_waiter_gets_the_result_at_once_and_the_first_result_stays() {
        let flight = Flight::new();
        assert!(flight.finish("first"));
        assert!(!flight.finish("second"));
        let result = tokio::time::timeout(Duration::from_secs(1), flight.wait())
            .await
            .expect("no wait");
        assert_eq!(result, "first");
    }

    #[tokio::test(start_paused = true)]
    async fn a_computation_dropped_unfinished_fails_its_waiters() {
        let flight = Arc::new(Flight::<Result<u8, &str>>::new());
        let waiter = tokio::spawn({
            let flight = flight.clone();
            async move { flight.wait().await }
        });
        tokio::task::yield_now().await;
        let guard = Guard::new(flight, || Err("abandoned"));
        let work = async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        };
        drop(work);
        let result = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("waiter");
        assert_eq!(result, Err("abandoned"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_guard_leaves_a_finished_flight_alone() {
        let flight = Arc::new(Flight::<u8>::new());
        let guard = Guard::new(flight.clone(), || 0);
        flight.finish(5);
        drop(guard);
        assert_eq!(flight.result(), Some(&5));
    }

    #[test]
    fn flights_join_by_key_and_remove_only_their_own() {
        let flights: Flights<String, Flight<u8>> = Flights::new(4);
        let Joined::Started(first) =
            flights.join_or_start("k".into(), |_| {}, || Ok::<_, ()>(Flight::new()))
        else {
            panic!("nothing was in progress");
        };
        let mut seen = false;
        let joined = flights.join_or_start("k".into(), |_| seen = true, || Err("not called"));
        assert!(seen && matches!(joined, Joined::Joined(j) if Arc::ptr_eq(&j, &first)));
        assert!(flights.start_if_absent("k".into(), Flight::new).is_none());
        let declined = flights.join_or_start("other".into(), |_| {}, || Err::<Flight<u8>, _>(7));
        assert!(matches!(declined, Joined::Declined(7)) && !flights.contains("other"));
        // A newer flight for the key is not removed by the older one finishing.
        let taken = flights.take("k");
        assert!(taken.is_some_and(|t| Arc::ptr_eq(&t, &first)));
        let newer = flights
            .start_if_absent("k".into(), Flight::new)
            .expect("started");
        flights.remove("k", &first);
        assert!(flights.contains("k"));
        flights.remove_if_unshared("k", &newer);
        assert!(!flights.contains("k"));
        flights.start_if_absent("a".into(), Flight::new);
        flights.start_if_absent("b".into(), Flight::new);
        assert_eq!(flights.drain().len(), 2);
        assert!(!flights.contains("a") && !flights.contains("b"));
    }
}
