//! Time-adaptive polling before a ring's consumer sleeps.
//!
//! A thread that finds nothing to do can sleep at once (and pay a wakeup, 30-40 us here, when
//! the peer next signals) or keep polling for a while in case work arrives. [`Poller`] decides
//! how long, in time rather than iterations (an iteration's cost varies with what the loop
//! checks), and adapts the window the way KVM's halt polling does:
//!
//! - a sleep that ended within the largest window was a wakeup that longer polling would have
//!   saved: the window doubles (up to [`Poller::max`]);
//! - a sleep that lasted longer than the largest window means polling burned its whole window
//!   for nothing: the window halves (down to [`Poller::min`]).
//!
//! While the thread's own requests are in flight their completions are due soon, so the window
//! is then at least [`Poller::in_flight_floor`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The longest window of [`Poller::default`], in nanoseconds (see [`set_default_limit`]).
static DEFAULT_LIMIT_NS: AtomicU64 = AtomicU64::new(1_000_000);

/// Sets, for this process, how long a [`Poller::default`] polls at most (its largest window and
/// its in-flight floor; its smallest is 10 us or this, whichever is less). Zero: a thread sleeps
/// as soon as it finds nothing to do (after a few dozen spins), which suits hosts whose cores
/// are shared: no core is kept busy waiting, at the cost of a wakeup per burst of work. Only
/// pollers created afterwards follow it.
pub fn set_default_limit(limit: Duration) {
    let ns = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX);
    // Relaxed: a plain setting, read when pollers are created (threads started after it).
    DEFAULT_LIMIT_NS.store(ns, Ordering::Relaxed);
}

/// The current [`set_default_limit`].
pub fn default_limit() -> Duration {
    Duration::from_nanos(DEFAULT_LIMIT_NS.load(Ordering::Relaxed))
}

/// With polling off (a zero [`default_limit`]), pins the calling thread to the CPU that both
/// halves of channel `relid` pick: the `relid`-th (modulo their number) of the CPUs the thread
/// may run on. For the two threads of a storage channel, the host's worker and the guest's
/// queue thread, which then hand requests and completions over on one CPU. Neither polls, so
/// each sleeps as soon as it has handed work over, and the other runs in its place: a local
/// wake-up. On two CPUs each hand-over woke a sleeping CPU (an inter-processor interrupt, and
/// on a virtual machine an exit), and the caches moved between them: at QD32 on the page
/// cache with `--poll-us 0`, the storage bench's stack took 1.9-2.5 us of CPU per request
/// (2.1x raw io_uring's) at 330-410k IOPS; on one CPU, 1.27-1.35 us at 720-760k (3
/// alternated runs pinned by `taskset`). Both processes usually may run on the same CPUs, so
/// both pick the same one. Returns the CPU, or `None` when polling is on, only one CPU is
/// allowed, or the kernel refused.
pub fn share_cpu_when_sleeping(relid: u32) -> Option<usize> {
    use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
    if !default_limit().is_zero() {
        return None;
    }
    let cpu = pair_cpu(&sched_getaffinity(None).ok()?, relid)?;
    let mut one = CpuSet::new();
    one.set(cpu);
    sched_setaffinity(None, &one).ok()?;
    Some(cpu)
}

/// The CPU of channel `relid`'s threads among `allowed` ([`share_cpu_when_sleeping`]);
/// `None` with fewer than two.
fn pair_cpu(allowed: &rustix::thread::CpuSet, relid: u32) -> Option<usize> {
    let n = allowed.count() as usize;
    if n < 2 {
        return None;
    }
    (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .nth(relid as usize % n)
}

/// Iterations between two reads of the clock (a clock read costs about as much as a few
/// dozen spin iterations).
const CLOCK_EVERY: u32 = 32;

/// The most clock reads between two yields of the core (see [`next_yield_every`]): about
/// 4-6 us of polling here. 16 (15-25 us) cut more system calls but cost a fifth of the
/// throughput of 4 TCP streams through netvsc, where ten threads share two cores.
const MAX_YIELD_EVERY: u32 = 4;

/// The same for a thread that serves requests while its own are in flight (a storage queue
/// waiting for the disk's completions, at high queue depth), unless its clients may wait for
/// its core ([`Poller::set_clients_nearby`]): about 20-25 us. Its work comes from a peer on
/// another core, so its yields found nobody waiting: with 4, at QD32 on the page cache with
/// both sides polling, the guest's storvsc queue thread made 0.08-0.14 system calls (nearly all
/// yields) per request; with 16, 0.02-0.05 at the same IOPS (4 alternated rounds).
const MAX_YIELD_EVERY_IN_FLIGHT: u32 = 16;

/// A yield that took at least this long let another thread run.
const YIELD_RAN_ANOTHER: Duration = Duration::from_micros(3);

/// How many clock reads to wait before the next yield of the core, after one that took
/// `took` with `every` between them. A poller yields so that a thread waiting for its core
/// (maybe the one it waits for) gets it. A yield that comes back at once found no such
/// thread: it was a system call for nothing (at QD32 with both sides polling on their own
/// cores they came to 0.15-0.5 per request on the guest side), so the next comes twice as
/// late, up to `max`. One that let another thread run starts over from every clock read.
fn next_yield_every(every: u32, took: Duration, max: u32) -> u32 {
    if took >= YIELD_RAN_ANOTHER {
        1
    } else {
        (every * 2).min(max)
    }
}

/// The polling state of one consumer thread.
#[derive(Debug, Clone)]
pub struct Poller {
    min: Duration,
    max: Duration,
    floor: Duration,
    window: Duration,
    /// When the current idle stretch began (`None` while work moves).
    idle_since: Option<Instant>,
    spins: u32,
    /// Clock reads between two yields ([`next_yield_every`]), and since the last one.
    yield_every: u32,
    reads_since_yield: u32,
    /// The thread serves requests ([`Poller::set_serves_requests`]).
    serves_requests: bool,
    /// When the thread went to sleep (between [`Poller::sleeping`] and [`Poller::woke`]).
    slept_at: Option<Instant>,
    /// With a zero limit, sleep at the first idle pass ([`Poller::set_sleep_at_once`]).
    sleep_at_once: bool,
    /// Clients of this thread may wait for its core ([`Poller::set_clients_nearby`]).
    clients_nearby: bool,
}

/// 10 us to 1 ms, and 1 ms while requests are in flight: a disk's completions come in bursts
/// hundreds of microseconds apart at QD32, and a wakeup costs 30-40 us here; since the poller
/// yields the core, polling costs little when nothing else wants it. Measured (O_DIRECT random
/// writes at QD32): a 100 us floor let both sides fall asleep between bursts, 0.76-0.91 of raw
/// io_uring; 1 ms, 1.03-1.29. [`set_default_limit`] changes the 1 ms.
impl Default for Poller {
    fn default() -> Self {
        Self::with_limit(default_limit())
    }
}

impl Poller {
    /// A poller that polls at most `limit` (its largest window and in-flight floor), from a
    /// smallest window of 10 us (or `limit`, if less).
    pub fn with_limit(limit: Duration) -> Self {
        Self::new(Duration::from_micros(10).min(limit), limit, limit)
    }

    /// A poller whose window adapts between `min` and `max`, and is at least `in_flight_floor`
    /// (capped at `max`) while requests are in flight.
    pub fn new(min: Duration, max: Duration, in_flight_floor: Duration) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            floor: in_flight_floor.min(max),
            window: min,
            idle_since: None,
            spins: 0,
            yield_every: 1,
            reads_since_yield: 0,
            serves_requests: false,
            slept_at: None,
            sleep_at_once: false,
            clients_nearby: false,
        }
    }

    /// Says whether the thread serves requests (a disk's: all its work is requests, each
    /// answered). With none in flight, its next work is a peer's next request, and the peer
    /// may be the thread waiting for this core (at queue depth 1, the client that its last
    /// answer woke): [`idle`](Self::idle) then yields at every clock read, without the
    /// backoff. Measured at QD1 with fio pinned to the vspd worker's core (the slower
    /// placement): fio's p50 17.2 -> 15.2 us (medians of 12 alternated rounds). Not for
    /// threads whose work may come from anywhere (a NIC's): there the yields cost throughput
    /// (4 TCP streams host to guest lost about 15% in two paired runs).
    pub fn set_serves_requests(&mut self, on: bool) {
        self.serves_requests = on;
    }

    /// Says whether the threads this one answers may be waiting for its core (a queue thread
    /// that reads an NBD client's socket: the client is a process of this machine, and at
    /// high queue depth three busy threads share two cores). With requests in flight, a
    /// thread that serves requests then keeps the yield backoff of other threads (at most
    /// every 4th clock read) instead of the longer one (every 16th) it has otherwise.
    pub fn set_clients_nearby(&mut self, on: bool) {
        self.clients_nearby = on;
    }

    /// With a zero limit, makes [`idle`](Self::idle) say "sleep" at the first idle pass
    /// instead of after a few dozen spins. For a thread whose peer is the slower side:
    /// its spins rarely find work, and it pays for each. Measured with the storage bench at
    /// QD32 on the page cache with `--poll-us 0` (6 alternated rounds): the guest's storvsc
    /// queue thread, whose host worker is the bottleneck, went from 0.73-0.98 to 0.51-0.69
    /// us of CPU per request at the same IOPS. Not for the host's channel worker: its spins
    /// catch the guest's next requests; without them it slept several times as often and
    /// IOPS fell by a third.
    pub fn set_sleep_at_once(&mut self, on: bool) {
        self.sleep_at_once = on;
    }

    /// The smallest window.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The largest window.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The window while requests are in flight.
    pub fn in_flight_floor(&self) -> Duration {
        self.floor
    }

    /// The current window (without the in-flight floor).
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Work moved: the next idle stretch starts from zero.
    #[inline]
    pub fn busy(&mut self) {
        self.idle_since = None;
        self.spins = 0;
    }

    /// Nothing moved in this iteration. Returns `true` to poll again (after a spin hint), or
    /// `false` when the window is spent and the thread should prepare to sleep.
    #[inline]
    pub fn idle(&mut self, in_flight: bool) -> bool {
        if self.sleep_at_once && self.max.is_zero() {
            return false;
        }
        self.spins += 1;
        if self.spins < CLOCK_EVERY {
            std::hint::spin_loop();
            return true;
        }
        self.spins = 0;
        let now = Instant::now();
        let since = *self.idle_since.get_or_insert(now);
        let window = if in_flight {
            self.window.max(self.floor)
        } else {
            self.window
        };
        if now.duration_since(since) < window {
            // Let a runnable thread have the core: on a machine with fewer cores than busy
            // threads, the work this thread waits for may be queued behind it.
            // A thread that serves requests and has none in flight yields at every clock read
            // (see `set_serves_requests`).
            let eager = self.serves_requests && !in_flight;
            self.reads_since_yield += 1;
            let every = if eager { 1 } else { self.yield_every };
            if self.reads_since_yield >= every {
                self.reads_since_yield = 0;
                std::thread::yield_now();
                if !eager {
                    let max = self.backoff_max(in_flight);
                    self.yield_every = next_yield_every(self.yield_every, now.elapsed(), max);
                }
            }
            return true;
        }
        self.idle_since = None;
        false
    }

    /// The most clock reads between two yields, for the backoff of [`next_yield_every`].
    fn backoff_max(&self, in_flight: bool) -> u32 {
        if self.serves_requests && in_flight && !self.clients_nearby {
            MAX_YIELD_EVERY_IN_FLIGHT
        } else {
            MAX_YIELD_EVERY
        }
    }

    /// The thread is about to block.
    pub fn sleeping(&mut self) {
        self.slept_at = Some(Instant::now());
    }

    /// The sleep ended by a timeout the thread chose (a retry), not by work arriving: not a
    /// wakeup longer polling would have saved, so the window stays as it is.
    pub fn retried(&mut self) {
        self.slept_at = None;
        self.busy();
    }

    /// The thread woke up: adapts the window to how long it slept.
    pub fn woke(&mut self) {
        let Some(at) = self.slept_at.take() else {
            return;
        };
        let slept = at.elapsed();
        if slept <= self.max {
            self.window = (self.window * 2).clamp(self.min, self.max);
        } else {
            self.window = (self.window / 2).max(self.min);
        }
        self.busy();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin_until_sleep(p: &mut Poller, in_flight: bool) -> Duration {
        let start = Instant::now();
        while p.idle(in_flight) {}
        start.elapsed()
    }

    #[test]
    fn polls_at_least_the_window_then_gives_up() {
        let mut p = Poller::new(
            Duration::from_millis(2),
            Duration::from_millis(8),
            Duration::from_millis(4),
        );
        assert!(spin_until_sleep(&mut p, false) >= Duration::from_millis(2));
        // In flight: at least the floor.
        assert!(spin_until_sleep(&mut p, true) >= Duration::from_millis(4));
    }

    #[test]
    fn told_to_sleep_at_once_a_zero_limit_does_not_spin() {
        // (Without the flag it spins a few dozen times: see
        // `a_zero_limit_gives_up_after_one_look_at_the_clock`.)
        let mut p = Poller::with_limit(Duration::ZERO);
        p.set_sleep_at_once(true);
        assert!(!p.idle(true), "sleeps at the first idle pass");
        assert!(!p.idle(false));
        // Only a zero limit sleeps at once.
        let mut q = Poller::with_limit(Duration::from_millis(1));
        q.set_sleep_at_once(true);
        assert!(q.idle(true));
    }

    #[test]
    fn busy_restarts_the_idle_stretch() {
        let mut p = Poller::new(
            Duration::from_millis(3),
            Duration::from_millis(3),
            Duration::from_millis(3),
        );
        let start = Instant::now();
        // Idle for a while, then work arrives: the window starts over.
        while start.elapsed() < Duration::from_millis(2) {
            assert!(p.idle(false));
        }
        p.busy();
        let again = Instant::now();
        while p.idle(false) {}
        assert!(again.elapsed() >= Duration::from_millis(3));
    }

    #[test]
    fn short_sleeps_grow_the_window_long_sleeps_shrink_it() {
        let mut p = Poller::new(
            Duration::from_micros(10),
            Duration::from_millis(5),
            Duration::ZERO,
        );
        assert_eq!(p.window(), Duration::from_micros(10));
        // A sleep that ends at once: polling longer would have caught the wakeup.
        for _ in 0..3 {
            p.sleeping();
            p.woke();
        }
        assert_eq!(p.window(), Duration::from_micros(80));
        for _ in 0..20 {
            p.sleeping();
            p.woke();
        }
        assert_eq!(p.window(), Duration::from_millis(5), "capped at max");
        // Sleeps longer than the largest window: polling was wasted.
        p.sleeping();
        std::thread::sleep(Duration::from_millis(6));
        p.woke();
        assert_eq!(p.window(), Duration::from_micros(2500));
        for _ in 0..20 {
            p.sleeping();
            std::thread::sleep(Duration::from_millis(6));
            p.woke();
            if p.window() == Duration::from_micros(10) {
                break;
            }
        }
        assert_eq!(p.window(), Duration::from_micros(10), "floored at min");
    }

    #[test]
    fn a_zero_limit_gives_up_after_one_look_at_the_clock() {
        let mut p = Poller::with_limit(Duration::ZERO);
        let mut looks = 0;
        while p.idle(true) {
            looks += 1;
            assert!(looks < 10 * CLOCK_EVERY, "still polling");
        }
        assert!(looks < CLOCK_EVERY);
        assert_eq!(looks, CLOCK_EVERY - 1, "a few dozen spins, then sleep");
        // A sleep does not grow it.
        p.sleeping();
        p.woke();
        assert_eq!(p.window(), Duration::ZERO);
        assert_eq!(
            Poller::with_limit(Duration::from_micros(500)).max(),
            Duration::from_micros(500)
        );
        assert_eq!(
            Poller::with_limit(Duration::from_micros(5)).min(),
            Duration::from_micros(5)
        );
    }

    #[test]
    fn a_retry_timeout_leaves_the_window_alone() {
        let mut p = Poller::new(
            Duration::from_micros(10),
            Duration::from_millis(5),
            Duration::ZERO,
        );
        for _ in 0..3 {
            p.sleeping();
            std::thread::sleep(Duration::from_millis(1));
            p.retried();
        }
        assert_eq!(p.window(), Duration::from_micros(10));
    }

    #[test]
    fn a_poller_waiting_for_its_peer_yields_at_every_clock_read() {
        let long = Duration::from_secs(100);
        let mut p = Poller::new(long, long, long);
        p.set_serves_requests(true);
        // As if backed off by quick yields with requests in flight.
        p.yield_every = MAX_YIELD_EVERY;
        for read in 1..=8 {
            for _ in 0..CLOCK_EVERY {
                assert!(p.idle(false));
            }
            // This clock read yielded: nothing is counted towards the next.
            assert_eq!(p.reads_since_yield, 0, "clock read {read}");
        }
        // The in-flight backoff is left as it was.
        assert_eq!(p.yield_every, MAX_YIELD_EVERY);
        for _ in 0..CLOCK_EVERY {
            assert!(p.idle(true));
        }
        assert_eq!(
            p.reads_since_yield, 1,
            "backed off: this read did not yield"
        );
    }

    #[test]
    fn yields_back_off_while_nobody_else_runs_and_start_over_when_someone_does() {
        let quick = Duration::from_nanos(300);
        let mut every = 1;
        let mut seen = vec![every];
        for _ in 0..6 {
            every = next_yield_every(every, quick, MAX_YIELD_EVERY);
            seen.push(every);
        }
        assert_eq!(seen, [1, 2, 4, 4, 4, 4, 4]);
        assert_eq!(
            next_yield_every(MAX_YIELD_EVERY, YIELD_RAN_ANOTHER, MAX_YIELD_EVERY),
            1
        );
        assert_eq!(
            next_yield_every(4, Duration::from_millis(1), MAX_YIELD_EVERY),
            1
        );
        let mut every = 1;
        for _ in 0..6 {
            every = next_yield_every(every, quick, MAX_YIELD_EVERY_IN_FLIGHT);
        }
        assert_eq!(every, MAX_YIELD_EVERY_IN_FLIGHT);
        assert_eq!(
            next_yield_every(every, YIELD_RAN_ANOTHER, MAX_YIELD_EVERY_IN_FLIGHT),
            1
        );
    }

    #[test]
    fn in_flight_backoff_is_longer_unless_clients_are_nearby() {
        let mut p = Poller::default();
        assert_eq!(
            p.backoff_max(true),
            MAX_YIELD_EVERY,
            "a thread that serves no requests"
        );
        p.set_serves_requests(true);
        assert_eq!(p.backoff_max(true), MAX_YIELD_EVERY_IN_FLIGHT);
        assert_eq!(p.backoff_max(false), MAX_YIELD_EVERY);
        p.set_clients_nearby(true);
        assert_eq!(p.backoff_max(true), MAX_YIELD_EVERY);
    }

    #[test]
    fn a_channels_two_threads_pick_the_same_allowed_cpu() {
        use rustix::thread::CpuSet;
        let mut allowed = CpuSet::new();
        for cpu in [1, 3, 4] {
            allowed.set(cpu);
        }
        let picks: Vec<_> = (0..6).map(|relid| pair_cpu(&allowed, relid)).collect();
        assert_eq!(
            picks,
            [Some(1), Some(3), Some(4), Some(1), Some(3), Some(4)],
            "the relid-th allowed CPU, modulo their number"
        );
        let mut one = CpuSet::new();
        one.set(2);
        assert_eq!(pair_cpu(&one, 5), None, "one CPU: nothing to share");
    }

    #[test]
    fn woke_without_sleeping_changes_nothing() {
        let mut p = Poller::default();
        let w = p.window();
        p.woke();
        assert_eq!(p.window(), w);
    }
}
