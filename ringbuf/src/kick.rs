//! A bound on how long a thread can stay blocked writing into an eventfd a peer shares.
//!
//! An eventfd write blocks while the counter would pass `u64::MAX - 1` and the file is not
//! `O_NONBLOCK`. A peer holding a duplicate shares the open file description, so it can clear
//! `O_NONBLOCK` at any moment and keep the counter saturated; no flag we set before the write
//! closes that window (a peer looping on `fcntl` wins it within a few signals), `RWF_NOWAIT` is
//! refused for eventfd writes, and such a file cannot be reopened as a description of our own.
//!
//! So the write is left to block, and bounded instead: [`guarded`] marks the calling thread as
//! inside a peer write; a watchdog thread ticks every [`TICK`] and interrupts, with a signal whose
//! handler does nothing (installed without `SA_RESTART`, so the write fails with `EINTR`), any
//! thread that has been inside one for two ticks or more. The caller then treats the eventfd as
//! hostile.
//!
//! The cost on the normal path is an uncontended lock, a store and an unlock on each side of the
//! write; the watchdog starts with the first guarded write, or with [`start`].

// Signals need `sigaction` and `pthread_kill`, which only libc offers. Every `unsafe` block
// below says which invariant makes it sound.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::Duration;

/// The watchdog's period. A hostile peer can hold a write for at most about two of these.
pub const TICK: Duration = Duration::from_millis(20);

/// Watchdog ticks so far (starts at 1: 0 means "not in a write").
static EPOCH: AtomicU64 = AtomicU64::new(1);

/// Every thread that has made a guarded write, while it lives.
static THREADS: Mutex<Vec<Weak<Slot>>> = Mutex::new(Vec::new());

static START: Once = Once::new();

/// One thread's state.
struct Slot {
    thread: libc::pthread_t,
    /// The tick at which the current write began, 0 when none. The thread holds this lock to
    /// enter and to leave a write, and the watchdog holds it while it signals the thread: so the
    /// thread cannot leave the write (let alone exit) between the check and the signal.
    since: Mutex<u64>,
    /// Times the thread was interrupted.
    kicks: AtomicU64,
}

thread_local! {
    static SLOT: Arc<Slot> = {
        let slot = Arc::new(Slot {
            // SAFETY: pthread_self has no preconditions; it returns the calling thread's id.
            thread: unsafe { libc::pthread_self() },
            since: Mutex::new(0),
            kicks: AtomicU64::new(0),
        });
        THREADS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&slot));
        slot
    };
}

/// The signal that interrupts a blocked write: a real-time one, away from those the VMM's vCPU
/// threads use (`SIGRTMIN`).
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Starts the watchdog now rather than with the first guarded write (a daemon does it at
/// startup, so that its thread count does not change later). Idempotent.
pub fn start() {
    START.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid value (empty mask, no flags); the handler is
        // an extern "C" function that does nothing (async-signal-safe), and no SA_RESTART, so
        // the interrupted system call returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
                tracing::warn!(
                    "cannot install the eventfd-write watchdog's signal handler: {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
        }
        let spawned = std::thread::Builder::new()
            .name("eventfd-watch".into())
            .spawn(watch);
        if let Err(e) = spawned {
            tracing::warn!("cannot start the eventfd-write watchdog: {e}");
        }
    });
}

fn watch() {
    loop {
        std::thread::sleep(TICK);
        // Relaxed: the tick only orders with itself; each slot's lock orders its stamp.
        let now = EPOCH.fetch_add(1, Ordering::Relaxed) + 1;
        let mut threads = THREADS.lock().unwrap_or_else(|e| e.into_inner());
        threads.retain(|w| {
            let Some(slot) = w.upgrade() else {
                return false;
            };
            let since = slot.since.lock().unwrap_or_else(|e| e.into_inner());
            if *since != 0 && now >= *since + 2 {
                slot.kicks.fetch_add(1, Ordering::Relaxed);
                // SAFETY: `slot.thread` is alive: it is inside a guarded write (`since` is not
                // 0) and cannot leave it without this lock, which we hold; a thread that has not
                // left its write has not exited. The signal's handler is installed (`start`
                // ran before any write was stamped).
                unsafe {
                    libc::pthread_kill(slot.thread, kick_signal());
                }
            }
            true
        });
    }
}

/// Runs `write` (a write into an eventfd a peer shares) with the calling thread marked as inside
/// it: if it blocks for two watchdog ticks or more, the thread is signalled and the write
/// returns `EINTR`.
pub fn guarded<T>(write: impl FnOnce() -> T) -> T {
    start();
    SLOT.with(|slot| {
        *slot.since.lock().unwrap_or_else(|e| e.into_inner()) = EPOCH.load(Ordering::Relaxed);
        let r = write();
        *slot.since.lock().unwrap_or_else(|e| e.into_inner()) = 0;
        r
    })
}

/// Times the calling thread's guarded writes were interrupted.
pub fn kicks() -> u64 {
    SLOT.with(|slot| slot.kicks.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{eventfd, EventfdFlags};

    #[test]
    fn a_write_that_blocks_is_interrupted() {
        // Blocking and one below the maximum: a write of 1 waits for a read that never comes.
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        rustix::io::write(&fd, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).unwrap();
        let before = kicks();
        let r = guarded(|| rustix::io::write(&fd, &1u64.to_ne_bytes()));
        assert_eq!(r, Err(rustix::io::Errno::INTR));
        assert!(kicks() > before);
        // A write that does not block is left alone.
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        assert_eq!(
            guarded(|| rustix::io::write(&fd, &1u64.to_ne_bytes())),
            Ok(8)
        );
    }
}
