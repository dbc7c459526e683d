//! Criterion benches of the VMBus stack's I/O paths; see `benches/` beside this crate and the
//! comparison scripts. This library holds what the benches share.
//!
//! The `ring` bench (`benches/ring.rs`) moves in-band packets from a producer thread to a
//! persistent consumer thread through a VMBus ring ([`ringbuf::pair::RingPair`]) and, as the
//! baseline in the same criterion group, through crossbeam's `ArrayQueue`. What both contestants
//! share lives here, so that they do exactly the same work around the transport:
//!
//! - [`stamp`] / [`check`]: the producer stamps every payload with its sequence number, the
//!   consumer validates it (first 8 bytes and the last byte), which also proves ordering and that
//!   no packet was lost or duplicated;
//! - [`Handoff`]: the spinning two-thread skeleton (the consumer's drain loop, the count of
//!   packets consumed, the stop flag, and the producer's wait for the consumer to catch up).
//!
//! Both threads spin and never sleep: the bench measures the data path (copies, index updates,
//! cache-line traffic between the two cores), not the cost of waking a thread.
//!
//! The `storage` bench (`benches/storage.rs`) drives 4 KiB random reads and writes through a
//! real `vspd` and the loopback guest's storvsc `Disk` (`vsc::storvsc::Disk`), and
//! as its baseline raw io_uring on the same file; what both share is in [`storage`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub mod storage;

use ringbuf::packet::{DESCRIPTOR_SIZE, TRAILER};

/// Default size of the ring's data area (the `ArrayQueue` baseline gets the same capacity in
/// packets). Chosen by measuring 64 KiB, 256 KiB and 1 MiB: 1 MiB gave the ring its best
/// throughput for both payload sizes (64 KiB holds only 15 packets of 4 KiB and throttles both
/// contestants); override it with the environment variable [`DATA_LEN_ENV`] (in KiB).
pub const DEFAULT_DATA_LEN: usize = 1024 * 1024;

/// Environment variable overriding [`DEFAULT_DATA_LEN`], in KiB (a multiple of 4).
pub const DATA_LEN_ENV: &str = "VMBUS_BENCH_RING_KIB";

/// Most packets the producer writes before it publishes them (the ring commits once per batch;
/// it also commits early when the ring is full), and most packets the consumer takes per drain
/// before it publishes its progress (the ring releases the space with one commit per drain).
/// See [`batch_len`] for the limit actually used.
pub const BATCH: usize = 64;

/// Fruitless spins after which a waiting thread starts calling `sched_yield` between polls (it
/// still never sleeps). Two spinning threads on a two-core machine that also runs anything else
/// otherwise lose whole scheduler time slices spinning while their peer waits for a core.
pub const SPINS_BEFORE_YIELD: u32 = 256;

/// The ring's data area size for this run: [`DATA_LEN_ENV`] if set, else [`DEFAULT_DATA_LEN`].
///
/// # Panics
/// If the variable is set but is not a positive multiple of 4 (KiB).
pub fn data_len() -> usize {
    match std::env::var(DATA_LEN_ENV) {
        Ok(v) => {
            let kib: usize = v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{DATA_LEN_ENV}={v:?} is not a number of KiB"));
            assert!(
                kib > 0 && kib.is_multiple_of(4),
                "{DATA_LEN_ENV} must be a positive multiple of 4"
            );
            kib * 1024
        }
        Err(_) => DEFAULT_DATA_LEN,
    }
}

/// Bytes one in-band packet with a `payload`-byte payload takes in the ring: descriptor, payload
/// padded to 8 bytes, trailer.
pub fn ring_slot_len(payload: usize) -> usize {
    DESCRIPTOR_SIZE + payload.next_multiple_of(8) + TRAILER
}

/// How many such packets a ring with a `data_len`-byte data area holds at once (one slot is
/// always kept free so that a full ring never looks empty). The baseline queue gets this
/// capacity, so both contestants have the same number of packets in flight.
pub fn ring_capacity(data_len: usize, payload: usize) -> usize {
    (data_len - 1) / ring_slot_len(payload)
}

/// The batch limit, in packets, for `payload`-byte packets in a `data_len`-byte ring: [`BATCH`],
/// but at most a quarter of the ring's capacity, so that the consumer can start on a batch while
/// the producer fills the next one (and frees space the producer can use while it drains).
/// Used by both contestants.
pub fn batch_len(data_len: usize, payload: usize) -> usize {
    BATCH.min(ring_capacity(data_len, payload) / 4).max(1)
}

/// Environment variable: `P,C` pins the producer (the bench thread) to CPU `P` and each
/// consumer thread to CPU `C` (with `taskset`), e.g. `0,1` to force every packet across the
/// two cores, or `0,0` to keep both on one core. Unset: the scheduler places them.
pub const PIN_ENV: &str = "VMBUS_BENCH_PIN";

/// Which side of a two-thread bench the calling thread is.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// The bench thread, which sends.
    Producer,
    /// The thread that receives.
    Consumer,
}

/// Pins the calling thread as [`PIN_ENV`] says for `side` (nothing if it is unset).
///
/// # Panics
/// If the variable is malformed or `taskset` fails.
pub fn pin(side: Side) {
    let Ok(v) = std::env::var(PIN_ENV) else {
        return;
    };
    let cpus: Vec<&str> = v.split(',').map(str::trim).collect();
    let [p, c] = cpus[..] else {
        panic!("{PIN_ENV}={v:?}: expected PRODUCER_CPU,CONSUMER_CPU")
    };
    let cpu = match side {
        Side::Producer => p,
        Side::Consumer => c,
    };
    // "/proc/thread-self" links to "<pid>/task/<tid>": the calling thread's id.
    let link = std::fs::read_link("/proc/thread-self").expect("reading /proc/thread-self");
    let tid = link
        .file_name()
        .and_then(|t| t.to_str())
        .expect("a thread id")
        .to_owned();
    let ok = std::process::Command::new("taskset")
        .args(["-p", "-c", cpu, &tid])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset -p -c {cpu} {tid} failed");
}

/// The value of the last byte of packet `seq`'s payload.
#[inline]
fn tail_byte(seq: u64) -> u8 {
    (seq as u8) ^ 0xa5
}

/// Stamps payload `buf` (at least 8 bytes) as packet `seq`: its first 8 bytes hold `seq`
/// (little endian), its last byte a value derived from `seq`. The rest is left as it is.
#[inline]
pub fn stamp(buf: &mut [u8], seq: u64) {
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    let last = buf.len() - 1;
    buf[last] = tail_byte(seq);
}

/// Whether `buf` is the payload [`stamp`] made for packet `seq` and is `len` bytes long.
#[inline]
pub fn check(buf: &[u8], seq: u64, len: usize) -> bool {
    buf.len() == len
        && buf[..8] == seq.to_le_bytes()
        && buf.last().is_some_and(|&b| b == tail_byte(seq))
}

/// Busy waiting: [`spin`](Self::spin) on every fruitless poll, [`reset`](Self::reset) after
/// progress. Spins with the CPU's pause hint; after [`SPINS_BEFORE_YIELD`] fruitless polls in a
/// row, also yields the core to any other runnable thread (never sleeps).
#[derive(Debug, Default)]
pub struct Spinner(u32);

impl Spinner {
    /// One fruitless poll.
    #[inline]
    pub fn spin(&mut self) {
        if self.0 < SPINS_BEFORE_YIELD {
            self.0 += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }

    /// Progress was made.
    #[inline]
    pub fn reset(&mut self) {
        self.0 = 0;
    }
}

/// A value alone on its cache lines (128 bytes: adjacent-line prefetch pairs lines on x86), so
/// that the consumer's progress counter does not share a line with anything else.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct CachePadded<T>(pub T);

/// The state a producer and its persistent consumer thread share: how many packets the consumer
/// has taken and validated, and the flag that tells it to stop.
///
/// Protocol, identical for every contestant: the consumer runs [`Handoff::consume`] for the
/// whole benchmark function; each measured run of the producer writes its packets, then calls
/// [`Handoff::wait_consumed`] so that the clock stops only once every packet has been consumed;
/// at the end the producer calls [`Handoff::stop`].
#[derive(Debug, Default)]
pub struct Handoff {
    consumed: CachePadded<AtomicU64>,
    stop: AtomicBool,
}

impl Handoff {
    /// A fresh handoff: nothing consumed, not stopped.
    pub fn new() -> Self {
        Self::default()
    }

    /// The consumer's loop. `drain(next)` takes the packets available now (at most
    /// [`batch_len`]), validating each against the sequence number `*next` and incrementing it,
    /// publishes them as consumed on its side (the ring commits its read index) and returns how
    /// many it took. After every non-empty drain the count is published for the producer; on an
    /// empty ring or queue the loop spins ([`Spinner`], no sleeping) until [`stop`](Self::stop).
    pub fn consume(&self, mut drain: impl FnMut(&mut u64) -> usize) {
        pin(Side::Consumer);
        let mut next = 0u64;
        let mut spinner = Spinner::default();
        loop {
            if drain(&mut next) > 0 {
                self.consumed.0.store(next, Ordering::Release);
                spinner.reset();
            } else if self.stop.load(Ordering::Relaxed) {
                return;
            } else {
                spinner.spin();
            }
        }
    }

    /// The producer's wait, spinning, until the consumer has consumed `total` packets since the
    /// start. `consumer_died` is polled while waiting, so that a consumer that panicked (on a
    /// corrupt payload) fails the bench instead of hanging it.
    ///
    /// # Panics
    /// If `consumer_died()` returns true before the count is reached.
    pub fn wait_consumed(&self, total: u64, consumer_died: impl Fn() -> bool) {
        let mut spinner = Spinner::default();
        let mut polls = 0u32;
        while self.consumed.0.load(Ordering::Acquire) < total {
            spinner.spin();
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(1 << 12) && consumer_died() {
                panic!("the consumer thread stopped before consuming every packet");
            }
        }
    }

    /// How many packets the consumer has taken and validated so far (acquire: the space of
    /// those packets may be reused).
    pub fn consumed(&self) -> u64 {
        self.consumed.0.load(Ordering::Acquire)
    }

    /// Tells the consumer to return once the ring or queue is empty.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_and_check() {
        let mut buf = vec![0u8; 64];
        stamp(&mut buf, 0x1234_5678_9abc);
        assert!(check(&buf, 0x1234_5678_9abc, 64));
        assert!(!check(&buf, 0x1234_5678_9abd, 64));
        assert!(!check(&buf, 0x1234_5678_9abc, 72));
        buf[63] ^= 1;
        assert!(!check(&buf, 0x1234_5678_9abc, 64));
    }

    #[test]
    fn capacity_matches_the_ring() {
        assert_eq!(ring_slot_len(64), 88);
        assert_eq!(ring_slot_len(4096), 4120);
        assert_eq!(ring_capacity(256 * 1024, 4096), 63);
        assert_eq!(ring_capacity(4096, 4096 - 24), 0);
        assert_eq!(batch_len(256 * 1024, 64), BATCH);
        assert_eq!(batch_len(256 * 1024, 4096), 15);
        assert_eq!(batch_len(8192, 4096), 1);
        // The ring itself agrees: exactly `ring_capacity` packets fit in an empty ring.
        for (data_len, payload) in [(64 * 1024, 64), (64 * 1024, 4096)] {
            let pair = ringbuf::pair::RingPair::anonymous(data_len).unwrap();
            let (mut out, _) = pair.side_a().unwrap();
            let buf = vec![0u8; payload];
            let parts: [&[u8]; 1] = [&buf];
            let packet = ringbuf::OutgoingPacket::in_band(0, false, &parts);
            for _ in 0..ring_capacity(data_len, payload) {
                out.write(&packet).unwrap();
            }
            assert!(matches!(
                out.write(&packet),
                Err(ringbuf::Error::Full { .. })
            ));
        }
    }
}
