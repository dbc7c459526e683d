//! Where a request's time goes: per-hop latency histograms, off unless a daemon is asked for
//! them (`--latency-breakdown` on vspd and vscd).
//!
//! A hop is a `static` [`Hop`] (a name and fixed buckets: no allocation, nothing to register);
//! code stamps a request with [`now`] where it enters a stage (`None` while the breakdown is
//! off, so a disabled build of the path costs one relaxed load) and records the time since
//! the stamp where it leaves it. Each process reports its own hops when it stops
//! ([`report`]); both sides read the same monotonic clock, so a request's hops from vscd and
//! vspd add up to what a client sees, and the difference between a side's "sent -> answer
//! back" and the other side's hops is the transport (ring, wakeups).
//!
//! Buckets are 250 ns wide up to 256 us, then one bucket for the rest: percentiles are exact
//! to a quarter microsecond where latencies live, and each record is one relaxed atomic add
//! per counter (threads of one process may share a hop).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// Width of a bucket, in nanoseconds.
const BUCKET_NS: u64 = 250;
/// Buckets below the overflow one.
const BUCKETS: usize = 1024;

/// Whether stamps are taken.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns the breakdown on for this process (before requests flow: requests stamped while it
/// was off are not counted).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether the breakdown is on.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A stamp: the time now while the breakdown is on, else `None`.
#[inline]
pub fn now() -> Option<Instant> {
    enabled().then(Instant::now)
}

/// One stage of a request's path and its latency histogram.
pub struct Hop {
    name: &'static str,
    buckets: [AtomicU64; BUCKETS + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl std::fmt::Debug for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hop")
            .field("name", &self.name)
            .field("count", &self.count())
            .finish()
    }
}

impl Hop {
    /// A hop with no samples.
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            buckets: [const { AtomicU64::new(0) }; BUCKETS + 1],
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records the time since `stamp` (nothing for `None`: the request was not stamped).
    #[inline]
    pub fn since(&self, stamp: Option<Instant>) {
        if let Some(t) = stamp {
            self.record_ns(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }

    /// Records `from` -> `to` where both stamps exist.
    #[inline]
    pub fn between(&self, from: Option<Instant>, to: Option<Instant>) {
        if let (Some(a), Some(b)) = (from, to) {
            let ns = b.saturating_duration_since(a).as_nanos();
            self.record_ns(u64::try_from(ns).unwrap_or(u64::MAX));
        }
    }

    /// Records one sample of `ns` nanoseconds.
    pub fn record_ns(&self, ns: u64) {
        let i = usize::try_from(ns / BUCKET_NS).map_or(BUCKETS, |i| i.min(BUCKETS));
        // Relaxed: counters only; a report reads them after the requests are done.
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Its name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The `p`-th percentile (0 to 100) in nanoseconds, at the upper edge of its bucket
    /// (`None` without samples; `u64::MAX` when it falls in the overflow bucket).
    pub fn percentile_ns(&self, p: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((p / 100.0) * n as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(if i == BUCKETS {
                    u64::MAX
                } else {
                    (i as u64 + 1) * BUCKET_NS
                });
            }
        }
        Some(u64::MAX)
    }

    /// Mean in nanoseconds.
    pub fn mean_ns(&self) -> Option<u64> {
        let n = self.count();
        (n > 0).then(|| self.sum_ns.load(Ordering::Relaxed) / n)
    }
}

/// One line per hop with samples: `name: p50 X us, p99 Y us, mean Z us (N samples)`.
pub fn report(hops: &[&Hop]) -> String {
    let us = |ns: Option<u64>| match ns {
        Some(u64::MAX) => ">256".to_string(),
        Some(ns) => format!("{:.2}", ns as f64 / 1000.0),
        None => "-".to_string(),
    };
    let mut out = String::new();
    for h in hops.iter().filter(|h| h.count() > 0) {
        out.push_str(&format!(
            "{}: p50 {} us, p99 {} us, mean {} us ({} samples)\n",
            h.name,
            us(h.percentile_ns(50.0)),
            us(h.percentile_ns(99.0)),
            us(h.mean_ns()),
            h.count()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_buckets() {
        let h = Hop::new("test");
        assert_eq!(h.percentile_ns(50.0), None);
        for ns in [100, 300, 900, 1_100, 5_000] {
            h.record_ns(ns);
        }
        // 100 -> bucket 0 (<= 250), 300 -> 1, 900 -> 3, 1100 -> 4, 5000 -> 20.
        assert_eq!(h.percentile_ns(0.0), Some(250));
        assert_eq!(h.percentile_ns(50.0), Some(1_000));
        assert_eq!(h.percentile_ns(60.0), Some(1_000));
        assert_eq!(h.percentile_ns(80.0), Some(1_250));
        assert_eq!(h.percentile_ns(100.0), Some(5_250));
        assert_eq!(h.mean_ns(), Some(7_400 / 5));
        h.record_ns(10_000_000);
        assert_eq!(h.percentile_ns(100.0), Some(u64::MAX));
        let r = report(&[&h, &Hop::new("empty")]);
        assert!(r.starts_with("test: p50 1.00 us, p99 >256 us"), "{r}");
        assert!(!r.contains("empty"));
    }

    #[test]
    fn stamps_are_none_while_off_and_unstamped_requests_are_not_counted() {
        // The flag is process-wide: this test only checks the off state's contract through a
        // stamp it makes itself.
        let h = Hop::new("off");
        h.since(None);
        h.between(Some(Instant::now()), None);
        assert_eq!(h.count(), 0);
        h.between(Some(Instant::now()), Some(Instant::now()));
        assert_eq!(h.count(), 1);
    }
}
