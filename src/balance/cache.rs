//! The balance cache: Bill24 answers per `customer_sync_code`, kept as bytes plus their body
//! code, and freshness as pure functions of `now` (moka only evicts, on the entry's own clock).
//! Bounded twice: at most `cache.max_entries` entries, weighing at most `cache.max_bytes`
//! together, and no answer over [`MAX_CACHED_ANSWER_BYTES`] is kept at all.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use moka::Expiry;
use smol_str::SmolStr;
use tokio::time::Instant;

use super::code::SyncCode;
use crate::config::CacheConfig;

/// What `X-Cache` says, and the `cache` label/log field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    /// A fresh entry answered.
    Hit,
    /// No usable entry: fetched, or joined another request's fetch.
    Miss,
    /// An expired entry served because Bill24 failed (`stale_if_error`).
    Stale,
    /// The caller's `Cache-Control` skipped a usable entry.
    Bypass,
}

impl CacheStatus {
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Stale => "STALE",
            CacheStatus::Bypass => "BYPASS",
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Stale => "stale",
            CacheStatus::Bypass => "bypass",
        }
    }
}

/// Where a cached answer came from: this replica's cache, or the fleet's shared tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    L1,
    L2,
}

impl Tier {
    pub fn label(self) -> &'static str {
        match self {
            Tier::L1 => "l1",
            Tier::L2 => "l2",
        }
    }
}

/// One cached Bill24 answer (always an HTTP 200 with a JSON object body).
#[derive(Debug)]
pub struct Entry {
    pub body: Bytes,
    pub content_type: HeaderValue,
    /// Inline (codes are short): copying it into the log notes touches no shared counter.
    pub bill24_code: SmolStr,
    pub stored_at: Instant,
    /// Served as a HIT while younger than this.
    pub fresh_for: Duration,
    /// After `fresh_for`, kept this much longer for `stale_if_error`.
    pub stale_for: Duration,
    /// Set once a refresh-ahead fetch was started for this entry.
    pub refreshing: AtomicBool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Past its TTL, still within `stale_if_error`.
    Stale,
    Expired,
}

impl Entry {
    /// Exact age at `now` (zero if `now` is before the entry was stored).
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stored_at)
    }

    pub fn freshness(&self, now: Instant) -> Freshness {
        let age = self.age(now);
        if age < self.fresh_for {
            Freshness::Fresh
        } else if age < self.fresh_for + self.stale_for {
            Freshness::Stale
        } else {
            Freshness::Expired
        }
    }

    /// Whether a hit at `now` should start a background refresh: the entry is within
    /// `refresh_ahead` of expiry and no refresh has been started for it.
    pub fn claim_refresh(&self, now: Instant, refresh_ahead: Duration) -> bool {
        !refresh_ahead.is_zero()
            && self.fresh_for.saturating_sub(self.age(now)) <= refresh_ahead
            && !self.refreshing.swap(true, Ordering::AcqRel)
    }

    /// Whole seconds, rounded down, for the `Age` header.
    pub fn age_header(&self, now: Instant) -> HeaderValue {
        /// The digits of the first five minutes, written once.
        static DIGITS: LazyLock<(String, Vec<usize>)> = LazyLock::new(|| {
            let mut text = String::new();
            let mut ends = Vec::with_capacity(300);
            for secs in 0..300u32 {
                text.push_str(&secs.to_string());
                ends.push(text.len());
            }
            (text, ends)
        });
        /// Header values over those digits: static bytes, so a copy touches no reference
        /// count shared between threads.
        static AGES: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
            let (text, ends) = &*DIGITS;
            let mut start = 0;
            ends.iter()
                .map(|&end| {
                    let value = HeaderValue::from_static(&text[start..end]);
                    start = end;
                    value
                })
                .collect()
        });
        let secs = self.age(now).as_secs();
        usize::try_from(secs)
            .ok()
            .and_then(|i| AGES.get(i))
            .cloned()
            .unwrap_or_else(|| HeaderValue::from(secs))
    }
}

/// How long an answer with this body code may be served fresh, or `None` when it must not be
/// cached: `"000"` for `cache.ttl` (shortened by up to `ttl_jitter`), `"311"` for
/// `cache.negative_ttl`, nothing else ever. `jitter_draw` is uniform in `[0, 1)`.
pub(crate) fn fresh_for(
    cfg: &CacheConfig,
    bill24_code: &str,
    jitter_draw: f64,
) -> Option<Duration> {
    let ttl = match bill24_code {
        "000" => cfg.ttl,
        "311" => cfg.negative_ttl,
        _ => return None,
    };
    let ttl = ttl.mul_f64(1.0 - cfg.ttl_jitter * jitter_draw.clamp(0.0, 1.0));
    (!ttl.is_zero()).then_some(ttl)
}

/// Evicts each entry once it is neither fresh nor servable as stale. A replaced entry lives
/// by the new entry's lifetime (moka's default would keep the old one's expiry).
///
/// moka evicts on its own clock (the std one, which paused test time does not move); whether
/// an entry answers is decided by [`Entry::freshness`] on tokio's, so eviction only frees
/// memory.
struct EntryLifetime;

#[allow(clippy::disallowed_types)] // moka's trait takes std's `Instant`.
impl Expiry<SyncCode, Arc<Entry>> for EntryLifetime {
    fn expire_after_create(
        &self,
        _key: &SyncCode,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.fresh_for + value.stale_for)
    }

    fn expire_after_update(
        &self,
        _key: &SyncCode,
        value: &Arc<Entry>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.fresh_for + value.stale_for)
    }
}

/// How long a purge of one code is remembered: longer than any fill lasts.
const PURGE_MEMORY: Duration = Duration::from_secs(600);
/// How many purged codes are remembered at once. Past it the oldest are forgotten, and a fill
/// that began before a forgotten purge does not store its answer (as after `DELETE /cache`).
const PURGED_CODES: u64 = 100_000;

/// An answer longer than this is passed on but not cached, in either tier. A balance is a few
/// hundred bytes (two wallets at most); an answer hundreds of times that is a broken or hostile
/// Bill24, whose answers must not crowd out every ordinary customer's.
pub(crate) const MAX_CACHED_ANSWER_BYTES: usize = 64 << 10;

/// What an entry is taken to cost besides its body and key: the entry, moka's bookkeeping for
/// it and the allocator's rounding (about 800 bytes of RSS per entry were measured with answers
/// of about 200 bytes).
const ENTRY_OVERHEAD: usize = 512;

/// Bounds by entries and by bytes at once, with moka's one weighted capacity: each entry
/// weighs its cost in bytes, but never less than a least weight of `max_bytes / max_entries`,
/// and the capacity is `max_entries` least weights (never more than `max_bytes`). Weights
/// within the capacity then keep both the entry count within `max_entries` and the bytes
/// within `max_bytes`, and `max_entries` small entries fit exactly. `(least weight, capacity)`.
fn weights(max_entries: u64, max_bytes: u64) -> (u32, u64) {
    if max_entries == 0 {
        return (u32::MAX, 0);
    }
    let least = u32::try_from(max_bytes / max_entries)
        .unwrap_or(u32::MAX)
        .max(1);
    (least, max_bytes.min(u64::from(least) * max_entries))
}

/// One entry's weight: its bytes (answer, key, content type, [`ENTRY_OVERHEAD`]), at least
/// `least`.
fn weigh(code: &str, entry: &Entry, least: u32) -> u32 {
    let bytes = entry.body.len() + code.len() + entry.content_type.len() + ENTRY_OVERHEAD;
    u32::try_from(bytes).unwrap_or(u32::MAX).max(least)
}

/// What a fill read before it began, checked before its answer is stored: the count of
/// `DELETE /cache`s and the count of one-code purges then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generation {
    all: u64,
    seq: u64,
}

/// The moka cache plus what was purged: a fetch that began before a purge of its key (or of
/// everything) does not store its (possibly pre-purge) answer; a purge of another key does
/// not stop it.
///
/// moka's synchronous cache: a lookup is a plain function call, so a hit is answered without
/// an `await` (moka's maintenance runs inline, a few entries at a time).
pub struct BalanceCache {
    entries: moka::sync::Cache<SyncCode, Arc<Entry>, foldhash::fast::RandomState>,
    all: AtomicU64,
    /// One-code purges so far; each is remembered by its number.
    seq: AtomicU64,
    /// The number of the latest purge of each code purged within [`PURGE_MEMORY`].
    purged: moka::sync::Cache<SyncCode, u64, foldhash::fast::RandomState>,
    /// The highest number of a purge forgotten early or expired.
    forgotten: Arc<AtomicU64>,
}

impl BalanceCache {
    pub fn new(max_entries: u64, max_bytes: u64) -> Self {
        Self::remembering(max_entries, max_bytes, PURGED_CODES)
    }

    fn remembering(max_entries: u64, max_bytes: u64, purged_codes: u64) -> Self {
        let (least, capacity) = weights(max_entries, max_bytes);
        let entries = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .weigher(move |code: &SyncCode, entry: &Arc<Entry>| weigh(code, entry, least))
            .expire_after(EntryLifetime)
            // Seeded per process; faster than SipHash on short keys.
            .build_with_hasher(foldhash::fast::RandomState::default());
        let forgotten = Arc::new(AtomicU64::new(0));
        let floor = forgotten.clone();
        let purged = moka::sync::Cache::builder()
            .max_capacity(purged_codes)
            .time_to_live(PURGE_MEMORY)
            .eviction_listener(move |_, seq: u64, cause| {
                if matches!(
                    cause,
                    moka::notification::RemovalCause::Size
                        | moka::notification::RemovalCause::Expired
                ) {
                    floor.fetch_max(seq, Ordering::AcqRel);
                }
            })
            .build_with_hasher(foldhash::fast::RandomState::default());
        BalanceCache {
            entries,
            all: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            purged,
            forgotten,
        }
    }

    pub fn get(&self, code: &str) -> Option<Arc<Entry>> {
        self.entries.get(code)
    }

    /// What purges stand at now; pass it back to [`BalanceCache::insert_if_current`].
    pub fn generation(&self) -> Generation {
        Generation {
            all: self.all.load(Ordering::Acquire),
            seq: self.seq.load(Ordering::Acquire),
        }
    }

    /// Whether neither `code` nor everything was purged since `generation` was read.
    pub fn is_current(&self, code: &str, generation: Generation) -> bool {
        self.all.load(Ordering::Acquire) == generation.all
            && self.forgotten.load(Ordering::Acquire) <= generation.seq
            && self
                .purged
                .get(code)
                .is_none_or(|purge| purge <= generation.seq)
    }

    /// Stores `entry` unless `code` (or everything) was purged since `generation` was read. A
    /// purge that lands while the entry goes in removes it again.
    pub fn insert_if_current(&self, code: SyncCode, entry: Arc<Entry>, generation: Generation) {
        if !self.is_current(&code, generation) {
            return;
        }
        self.entries.insert(code.clone(), entry);
        if !self.is_current(&code, generation) {
            self.entries.invalidate(&code);
        }
    }

    /// Stores `entry` whatever was purged meanwhile (filling a cache by hand).
    pub fn insert(&self, code: SyncCode, entry: Arc<Entry>) {
        self.entries.insert(code, entry);
    }

    pub fn purge(&self, code: &str) {
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        self.purged.insert(SyncCode::from(code), seq);
        self.entries.invalidate(code);
    }

    pub fn purge_all(&self) {
        self.all.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
    }

    /// Entry count after pending maintenance (for the gauge).
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// What the entries weigh together after pending maintenance: at most `cache.max_bytes`.
    #[cfg(test)]
    fn weight(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CacheConfig {
        CacheConfig {
            ttl: Duration::from_secs(10),
            max_entries: 10,
            max_bytes: 1 << 20,
            negative_ttl: Duration::ZERO,
            stale_if_error: Duration::from_secs(30),
            refresh_ahead: Duration::ZERO,
            ttl_jitter: 0.0,
        }
    }

    fn entry(stored_at: Instant) -> Entry {
        Entry {
            body: Bytes::from_static(b"{}"),
            content_type: HeaderValue::from_static("application/json"),
            bill24_code: SmolStr::new_static("000"),
            stored_at,
            fresh_for: Duration::from_secs(10),
            stale_for: Duration::from_secs(30),
            refreshing: AtomicBool::new(false),
        }
    }

    #[test]
    fn refresh_ahead_is_claimed_once_near_expiry() {
        let t0 = Instant::now();
        let e = entry(t0);
        let window = Duration::from_secs(2);
        assert!(
            !e.claim_refresh(t0 + Duration::from_secs(7), window),
            "too early"
        );
        assert!(
            !e.claim_refresh(t0 + Duration::from_secs(9), Duration::ZERO),
            "disabled"
        );
        assert!(e.claim_refresh(t0 + Duration::from_secs(8), window));
        assert!(
            !e.claim_refresh(t0 + Duration::from_secs(9), window),
            "only once"
        );
    }

    #[test]
    fn freshness_is_a_function_of_now() {
        let t0 = Instant::now();
        let e = entry(t0);
        assert_eq!(e.freshness(t0), Freshness::Fresh);
        assert_eq!(
            e.freshness(t0 + Duration::from_millis(9_999)),
            Freshness::Fresh
        );
        assert_eq!(e.freshness(t0 + Duration::from_secs(10)), Freshness::Stale);
        assert_eq!(
            e.freshness(t0 + Duration::from_millis(39_999)),
            Freshness::Stale
        );
        assert_eq!(
            e.freshness(t0 + Duration::from_secs(40)),
            Freshness::Expired
        );
        assert_eq!(e.age_header(t0 + Duration::from_millis(2_999)), "2");
        assert_eq!(e.age_header(t0 + Duration::from_secs(299)), "299");
        assert_eq!(e.age_header(t0 + Duration::from_secs(300)), "300");
        for secs in 0..400 {
            let age = e.age_header(t0 + Duration::from_secs(secs));
            assert_eq!(age.to_str().ok(), Some(secs.to_string().as_str()));
        }
        let later = entry(t0 + Duration::from_secs(1));
        assert_eq!(later.age(t0), Duration::ZERO, "clock never runs backwards");
    }

    #[test]
    fn only_success_and_opted_in_not_found_are_cached() {
        let mut c = cfg();
        assert_eq!(fresh_for(&c, "000", 0.0), Some(Duration::from_secs(10)));
        assert_eq!(fresh_for(&c, "311", 0.0), None, "negative_ttl 0 = never");
        c.negative_ttl = Duration::from_secs(3);
        assert_eq!(fresh_for(&c, "311", 0.5), Some(Duration::from_secs(3)));
        for code in ["ERR_MISSED_FIELD", "401", "", "00", "0000", "000 "] {
            assert_eq!(fresh_for(&c, code, 0.0), None, "{code:?}");
        }
        c.ttl = Duration::ZERO;
        assert_eq!(fresh_for(&c, "000", 0.0), None, "ttl 0 disables caching");
    }

    #[test]
    fn ttl_jitter_only_shortens() {
        let mut c = cfg();
        c.ttl_jitter = 0.2;
        assert_eq!(fresh_for(&c, "000", 0.0), Some(Duration::from_secs(10)));
        assert_eq!(fresh_for(&c, "000", 1.0), Some(Duration::from_secs(8)));
        assert_eq!(fresh_for(&c, "000", 0.5), Some(Duration::from_secs(9)));
    }

    #[tokio::test]
    async fn a_replaced_entry_lives_by_its_own_lifetime() {
        let cache = BalanceCache::new(10, 1 << 20);
        let short = Entry {
            fresh_for: Duration::from_millis(100),
            stale_for: Duration::ZERO,
            ..entry(Instant::now())
        };
        cache.insert_if_current("k".into(), Arc::new(short), cache.generation());
        let long = Entry {
            fresh_for: Duration::from_secs(30),
            ..entry(Instant::now())
        };
        cache.insert_if_current("k".into(), Arc::new(long), cache.generation());
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            cache.get("k").is_some(),
            "not evicted at the old entry's expiry"
        );
    }

    #[test]
    fn purge_discards_inserts_from_before_it_for_that_code_only() {
        let cache = BalanceCache::new(10, 1 << 20);
        let before = cache.generation();
        cache.purge("a");
        cache.insert_if_current("a".into(), Arc::new(entry(Instant::now())), before);
        assert!(cache.get("a").is_none(), "fetched before its purge");
        cache.insert_if_current("b".into(), Arc::new(entry(Instant::now())), before);
        assert!(cache.get("b").is_some(), "another code's fill stores");
        let now = cache.generation();
        cache.insert_if_current("a".into(), Arc::new(entry(Instant::now())), now);
        assert!(cache.get("a").is_some(), "fetched after its purge");
        let before_all = cache.generation();
        cache.purge_all();
        assert!(cache.get("a").is_none());
        cache.insert_if_current("c".into(), Arc::new(entry(Instant::now())), before_all);
        assert!(cache.get("c").is_none(), "fetched before DELETE /cache");
    }

    fn sized(body_len: usize) -> Arc<Entry> {
        Arc::new(Entry {
            body: Bytes::from(vec![b' '; body_len]),
            ..entry(Instant::now())
        })
    }

    #[test]
    fn both_bounds_hold_whichever_binds_first() {
        // Small entries: the count binds (each weighs the least weight, 1 MiB / 100).
        assert_eq!(weights(100, 1 << 20), (10_485, 1_048_500));
        let cache = BalanceCache::new(100, 1 << 20);
        for i in 0..300 {
            cache.insert(format!("S{i}").as_str().into(), sized(100));
        }
        assert!(cache.len() <= 100, "{} entries", cache.len());
        assert!(
            cache.len() >= 90,
            "the count binds, not the bytes: {}",
            cache.len()
        );
        // Large entries: the bytes bind, long before the count.
        let cache = BalanceCache::new(100, 1 << 20);
        for i in 0..300 {
            cache.insert(format!("L{i}").as_str().into(), sized(60_000));
        }
        assert!(cache.weight() <= 1 << 20, "{} bytes", cache.weight());
        assert!(
            cache.len() <= 17,
            "{} entries of 60 kB in 1 MiB",
            cache.len()
        );
        // An entry's weight is what it holds, never less than the least weight.
        let e = sized(60_000);
        assert_eq!(
            weigh("L1", &e, 10_485) as usize,
            60_000 + 2 + e.content_type.len() + ENTRY_OVERHEAD
        );
        assert_eq!(weigh("S1", &sized(100), 10_485), 10_485);
        // No entries at all, and a least weight beyond u32: both bounds still hold.
        assert_eq!(weights(0, 1 << 20), (u32::MAX, 0));
        assert_eq!(weights(1, 1 << 40), (u32::MAX, u64::from(u32::MAX)));
        assert_eq!(weights(1 << 30, 1 << 20), (1, 1 << 20));
        assert_eq!(weights(100_000, 128 << 20), (1_342, 134_200_000));
    }

    #[test]
    fn purging_other_codes_leaves_every_fill_alone() {
        let cache = BalanceCache::new(10_000, 128 << 20);
        let codes: Vec<String> = (0..2_000).map(|i| format!("C{i}")).collect();
        let before = cache.generation();
        for i in 0..5_000 {
            cache.purge(&format!("someone-else-{i}"));
        }
        let discarded = codes
            .iter()
            .filter(|c| !cache.is_current(c, before))
            .count();
        assert_eq!(discarded, 0, "fills discarded by unrelated purges");
        cache.purge("C7");
        assert!(!cache.is_current("C7", before));
        assert!(cache.is_current("C8", before));
    }

    #[test]
    fn a_forgotten_purge_stops_every_fill_from_before_it() {
        let cache = BalanceCache::remembering(10, 1 << 20, 100);
        let before = cache.generation();
        for i in 0..1_000 {
            cache.purge(&format!("P{i}"));
        }
        cache.purged.run_pending_tasks();
        assert!(cache.purged.entry_count() <= 100);
        for i in (0..1_000).step_by(37) {
            assert!(!cache.is_current(&format!("P{i}"), before), "P{i}");
        }
        assert!(
            !cache.is_current("other", before),
            "older than a purge it no longer remembers"
        );
        let after = cache.generation();
        assert!(cache.is_current("other", after));
        assert!(cache.is_current("P3", after));
    }
}
