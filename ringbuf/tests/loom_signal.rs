//! Loom model of the ring's signalling protocol (`ringbuf::signal`).
//!
//! What is modelled:
//! - One ring's control page: `write_index`, `read_index`, `interrupt_mask`, `pending_send_size`
//!   and `feature_bits` as loom atomics, behind `ringbuf::signal::Control`, whose `fence` is a
//!   loom `SeqCst` fence. The writer and reader threads reach the control words only through the
//!   `ringbuf::signal` functions (`publish_write`, `publish_read`, `mask`, `prepare_read_sleep`,
//!   `prepare_write_sleep`, `clear_pending`, `used_bytes`, `writable_bytes`) and, to refresh
//!   their view of the peer's index, an acquire load through `Control::load`, exactly as
//!   `Ring::peer_index` does.
//! - The two events (eventfds in the real stack) as `loom::sync::Notify`: a wait blocks in loom's
//!   sense until notified (with a possible spurious wakeup, which the loops tolerate), so a lost
//!   wakeup leaves both threads blocked and loom reports a deadlock.
//! - The loops of a channel's queue thread (`ringbuf::traffic`): the writer writes what fits,
//!   commits the batch (signalling the reader when `publish_write` says so), and when the next
//!   packet does not fit sets `pending_send_size` with `prepare_write_sleep`, re-checks, and
//!   waits; the reader masks, drains, commits (signalling the writer when `publish_read` says
//!   so), then unmasks and re-checks with `prepare_read_sleep` before waiting.
//! - The data area as one `loom::cell::UnsafeCell` per 8-byte unit. The writer stamps each unit
//!   of a packet with the packet's sequence number and size; the reader checks them. Loom flags
//!   any access to a unit not ordered by the index release/acquire pairs (the writer reusing
//!   space the reader has not released, or the reader reading bytes not yet published), and
//!   the stamps check that every packet arrives once, whole and in order.
//!
//! What is not modelled: packet bytes and their parsing (each packet is only a "ring length"
//! of 16 or 24 bytes; descriptors, trailers and validation are the proptests' and fuzzers'
//! job), a hostile peer (both sides follow the protocol), rollback, and more than one packet
//! stream. `OutgoingRing`/`IncomingRing` themselves are not run (they sit on a `Mapping` of real
//! shared memory); the loops below mirror their index caching (the peer's index is re-read only
//! when the ring looks full or empty) and, like every user of the ring must, the writer commits
//! its batch before it prepares to sleep. An event gives only release/acquire ordering here,
//! weaker than an eventfd system call, so the model is conservative there. The data area is 64
//! bytes, so packets wrap and the ring fills after two packets. The exploration is bounded by
//! preemptions (4 and 2 below); `RINGBUF_LOOM_EXHAUSTIVE=1` lifts the bound (the first model
//! then runs about 8.4 million executions, some minutes, and passes).
//!
//! The negative tests run the same model with a deliberately broken copy of one protocol step
//! (a missing fence, a missing re-check) and expect loom to find the lost wakeup: they show that
//! the model can fail, so its passing means something.

// The data area is modelled with loom's `UnsafeCell`, reached through raw pointers: loom checks
// that those accesses never race, which is one of the properties under test.
#![allow(unsafe_code)]

use std::sync::atomic::Ordering::{self, Acquire, Relaxed, Release, SeqCst};

use loom::cell::UnsafeCell;
use loom::sync::atomic::{fence, AtomicU32};
use loom::sync::{Arc, Notify};
use loom::thread;

use ringbuf::signal::{self, Control, Word};
use vmbus_proto::ring::control::FEATURE_PENDING_SEND_SIZE;

/// Size of the modelled data area.
const DATA_LEN: u32 = 64;
/// 8-byte units in the data area.
const UNITS: usize = DATA_LEN as usize / 8;

/// The control page, as loom atomics.
struct Page {
    write_index: AtomicU32,
    read_index: AtomicU32,
    interrupt_mask: AtomicU32,
    pending_send_size: AtomicU32,
    feature_bits: AtomicU32,
}

impl Page {
    /// As `Ring::init` leaves it: indices 0, unmasked, nothing pending, pending-send-size
    /// feature advertised.
    fn new() -> Self {
        Self {
            write_index: AtomicU32::new(0),
            read_index: AtomicU32::new(0),
            interrupt_mask: AtomicU32::new(0),
            pending_send_size: AtomicU32::new(0),
            feature_bits: AtomicU32::new(FEATURE_PENDING_SEND_SIZE),
        }
    }

    fn word(&self, w: Word) -> &AtomicU32 {
        match w {
            Word::WriteIndex => &self.write_index,
            Word::ReadIndex => &self.read_index,
            Word::InterruptMask => &self.interrupt_mask,
            Word::PendingSendSize => &self.pending_send_size,
            Word::FeatureBits => &self.feature_bits,
        }
    }
}

impl Control for Page {
    fn load(&self, word: Word, order: Ordering) -> u32 {
        self.word(word).load(order)
    }
    fn store(&self, word: Word, value: u32, order: Ordering) {
        self.word(word).store(value, order)
    }
    fn fence(&self) {
        fence(SeqCst)
    }
    fn data_len(&self) -> u32 {
        DATA_LEN
    }
}

/// The peer's index, as `Ring::peer_index` reads it (acquire: pairs with the peer's release
/// store in `publish_write` / `publish_read`).
fn peer_index(c: &Page, w: Word) -> u32 {
    let v = c.load(w, Acquire);
    assert!(
        v < DATA_LEN && v.is_multiple_of(8),
        "{w:?} {v} out of range"
    );
    v
}

/// The protocol steps a model run uses; the negative tests swap one for a broken copy.
#[derive(Clone, Copy)]
struct Protocol {
    publish_write: fn(&Page, u32, u32) -> bool,
    publish_read: fn(&Page, u32, u32) -> bool,
    prepare_read_sleep: fn(&Page, u32) -> bool,
    prepare_write_sleep: fn(&Page, u32, u32) -> bool,
}

const CORRECT: Protocol = Protocol {
    publish_write: signal::publish_write::<Page>,
    publish_read: signal::publish_read::<Page>,
    prepare_read_sleep: signal::prepare_read_sleep::<Page>,
    prepare_write_sleep: signal::prepare_write_sleep::<Page>,
};

/// Everything the two threads share.
struct Shared {
    page: Page,
    /// The data area, one cell per 8-byte unit: `seq << 8 | ring length` of the packet in it.
    data: [UnsafeCell<u32>; UNITS],
    /// The reader's event: the writer notifies it.
    reader_event: Notify,
    /// The writer's event: the reader notifies it.
    writer_event: Notify,
}

fn stamp(seq: usize, len: u32) -> u32 {
    (seq as u32) << 8 | len
}

/// The writer's loop; returns whether it had to sleep on `pending_send_size` at least once.
fn writer(s: &Shared, p: Protocol, sizes: &[u32]) -> bool {
    let c = &s.page;
    let mut committed = 0u32;
    let mut write = 0u32;
    let mut cached_read = 0u32;
    let mut slept = false;
    let mut seq = 0;
    while seq < sizes.len() {
        // Write what fits (as `OutgoingRing::write`: re-read the reader's index only when the
        // cached one says the packet does not fit; a packet must be strictly smaller than the
        // writable bytes).
        while seq < sizes.len() {
            let len = sizes[seq];
            if len >= signal::writable_bytes(write, cached_read, DATA_LEN) {
                cached_read = peer_index(c, Word::ReadIndex);
                if len >= signal::writable_bytes(write, cached_read, DATA_LEN) {
                    break;
                }
            }
            for i in 0..len / 8 {
                let unit = ((write / 8 + i) as usize) % UNITS;
                // SAFETY: the unit lies in the free space the reader released (the check above,
                // against an index acquired from the reader's release store); loom verifies
                // that no reader access races with this write.
                s.data[unit].with_mut(|u| unsafe { *u = stamp(seq, len) });
            }
            write = (write + len) % DATA_LEN;
            seq += 1;
        }
        // Commit the batch.
        if write != committed {
            let old = committed;
            committed = write;
            if (p.publish_write)(c, old, write) {
                s.reader_event.notify();
            }
        }
        if seq == sizes.len() {
            break;
        }
        // Full: ask to be signalled when the packet fits, re-check, sleep.
        if (p.prepare_write_sleep)(c, write, sizes[seq]) {
            slept = true;
            s.writer_event.wait();
            signal::clear_pending(c);
        }
    }
    slept
}

/// The reader's loop: receives `sizes.len()` packets and checks each.
fn reader(s: &Shared, p: Protocol, sizes: &[u32]) {
    let c = &s.page;
    let mut committed = 0u32;
    let mut read = 0u32;
    let mut cached_write = 0u32;
    let mut next = 0;
    loop {
        signal::mask(c);
        // Drain.
        loop {
            let mut available = signal::used_bytes(cached_write, read, DATA_LEN);
            if available == 0 {
                cached_write = peer_index(c, Word::WriteIndex);
                available = signal::used_bytes(cached_write, read, DATA_LEN);
                if available == 0 {
                    break;
                }
            }
            assert!(next < sizes.len(), "more data published than was sent");
            // SAFETY: the unit lies in the published data (`available` was computed from an
            // index acquired from the writer's release store); loom verifies that no writer
            // access races with this read.
            let first = s.data[(read / 8) as usize].with(|u| unsafe { *u });
            let len = first & 0xff;
            assert_eq!(
                first,
                stamp(next, sizes[next]),
                "packet {next} out of order"
            );
            assert!(len <= available, "packet {next} only partly published");
            for i in 1..len / 8 {
                let unit = ((read / 8 + i) as usize) % UNITS;
                // SAFETY: as above.
                let v = s.data[unit].with(|u| unsafe { *u });
                assert_eq!(v, first, "packet {next} torn");
            }
            read = (read + len) % DATA_LEN;
            next += 1;
        }
        // Commit what was read.
        if read != committed {
            let old = committed;
            committed = read;
            if (p.publish_read)(c, old, read) {
                s.writer_event.notify();
            }
        }
        if next == sizes.len() {
            return;
        }
        // Unmask, re-check, sleep.
        if (p.prepare_read_sleep)(c, read) {
            s.reader_event.wait();
        }
    }
}

/// Runs the model of a writer sending packets of `sizes` bytes (ring length, trailer included)
/// to a reader, under protocol `p`, exploring interleavings with at most `preemption_bound`
/// preemptions (`LOOM_MAX_PREEMPTIONS` overrides it; `RINGBUF_LOOM_EXHAUSTIVE=1` removes the
/// bound: the first model below then takes about 8.4 million executions, minutes). Returns how
/// many explored executions had the writer sleep on `pending_send_size`.
fn check(p: Protocol, sizes: &'static [u32], preemption_bound: usize) -> usize {
    let writer_slept = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() && std::env::var_os("RINGBUF_LOOM_EXHAUSTIVE").is_none() {
        builder.preemption_bound = Some(preemption_bound);
    }
    let (slept_count, execution_count) = (writer_slept.clone(), executions.clone());
    builder.check(move || {
        execution_count.fetch_add(1, Relaxed);
        let s = Arc::new(Shared {
            page: Page::new(),
            data: std::array::from_fn(|_| UnsafeCell::new(u32::MAX)),
            reader_event: Notify::new(),
            writer_event: Notify::new(),
        });
        let r = {
            let s = s.clone();
            thread::spawn(move || reader(&s, p, sizes))
        };
        let slept = writer(&s, p, sizes);
        r.join().unwrap();
        if slept {
            slept_count.fetch_add(1, Relaxed);
        }
        // Nobody is left waiting: nothing pending, every byte released.
        assert_eq!(s.page.load(Word::PendingSendSize, Relaxed), 0);
        assert_eq!(
            s.page.load(Word::ReadIndex, Relaxed),
            s.page.load(Word::WriteIndex, Relaxed)
        );
    });
    let (executions, slept) = (executions.load(Relaxed), writer_slept.load(Relaxed));
    eprintln!("{sizes:?}: {executions} executions, the writer slept in {slept}");
    slept
}

/// Three packets of 24 bytes in a 64-byte ring: after two (48 bytes, 16 writable) the third
/// does not fit, so unless the reader is quick the writer sleeps on `pending_send_size`; the
/// third packet wraps around the end.
const SIZES: &[u32] = &[24, 24, 24];

#[test]
fn no_lost_wakeup_and_in_order_delivery() {
    let slept = check(CORRECT, SIZES, 4);
    assert!(slept > 0, "the writer never had to wait for space");
}

/// Five packets: the writer may have to sleep twice, and a 16-byte packet ends exactly at the
/// end of the data area.
#[test]
fn no_lost_wakeup_two_sleeps() {
    let slept = check(CORRECT, &[24, 24, 16, 24, 24], 2);
    assert!(slept > 0, "the writer never had to wait for space");
}

// ---- Negative checks: broken copies of one step each. Loom must report the lost wakeup. ----

/// Set in the child process that runs a broken model.
const CHILD_ENV: &str = "RINGBUF_LOOM_BROKEN_MODEL";

/// Checks that loom finds a lost wakeup (a deadlock) in the model under the broken protocol
/// `p`. Loom aborts the process while cleaning up after it reports one (a second panic in a
/// destructor), so the model runs in a child process: this test's own binary, running only
/// `test_name`.
fn expect_deadlock(test_name: &str, p: Protocol) {
    if std::env::var_os(CHILD_ENV).is_some() {
        check(p, SIZES, 3);
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("deadlock;"),
        "loom did not report a lost wakeup ({}):\n{stderr}",
        out.status
    );
}

/// `publish_write` without its fence: the writer may miss the reader's unmask while the reader
/// misses the new write index.
fn publish_write_no_fence(c: &Page, old_write: u32, new_write: u32) -> bool {
    c.store(Word::WriteIndex, new_write, Release);
    if c.load(Word::InterruptMask, Relaxed) != 0 {
        return false;
    }
    c.load(Word::ReadIndex, Relaxed) == old_write
}

/// `prepare_read_sleep` that unmasks but does not re-check for data.
fn prepare_read_sleep_no_recheck(c: &Page, _read: u32) -> bool {
    c.store(Word::InterruptMask, 0, Relaxed);
    true
}

/// `prepare_write_sleep` that sets the pending size but does not re-check for space.
fn prepare_write_sleep_no_recheck(c: &Page, _write: u32, needed: u32) -> bool {
    c.store(Word::PendingSendSize, needed, Relaxed);
    true
}

/// `publish_read` without its fence: the reader may miss the writer's pending size while the
/// writer misses the new read index.
fn publish_read_no_fence(c: &Page, old_read: u32, new_read: u32) -> bool {
    c.store(Word::ReadIndex, new_read, Release);
    let pending = c.load(Word::PendingSendSize, Relaxed);
    if pending == 0 {
        return false;
    }
    let write = c.load(Word::WriteIndex, Relaxed);
    signal::writable_bytes(write, old_read, DATA_LEN) <= pending
        && signal::writable_bytes(write, new_read, DATA_LEN) > pending
}

#[test]
fn detects_missing_fence_in_publish_write() {
    expect_deadlock(
        "detects_missing_fence_in_publish_write",
        Protocol {
            publish_write: publish_write_no_fence,
            ..CORRECT
        },
    );
}

#[test]
fn detects_missing_recheck_before_reader_sleeps() {
    expect_deadlock(
        "detects_missing_recheck_before_reader_sleeps",
        Protocol {
            prepare_read_sleep: prepare_read_sleep_no_recheck,
            ..CORRECT
        },
    );
}

#[test]
fn detects_missing_recheck_before_writer_sleeps() {
    expect_deadlock(
        "detects_missing_recheck_before_writer_sleeps",
        Protocol {
            prepare_write_sleep: prepare_write_sleep_no_recheck,
            ..CORRECT
        },
    );
}

#[test]
fn detects_missing_fence_in_publish_read() {
    expect_deadlock(
        "detects_missing_fence_in_publish_read",
        Protocol {
            publish_read: publish_read_no_fence,
            ..CORRECT
        },
    );
}
