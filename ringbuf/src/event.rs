//! Signals between the two sides of a ring: an eventfd each way.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::event::{eventfd, EventfdFlags};

use crate::Error;

/// An eventfd used as a wakeup line: `signal` from any thread or process, `wait` to sleep until
/// at least one signal arrived since the last wait.
///
/// Signalling never blocks. An eventfd's write blocks when its counter would pass
/// `u64::MAX - 1`, and a peer that shares the eventfd can put it there; so events are
/// non-blocking (`EFD_NONBLOCK`), and a saturated counter (`EAGAIN`) means a signal is pending
/// anyway: the signal is dropped, which loses nothing. An eventfd received from a peer
/// ([`from_untrusted_fd`](Self::from_untrusted_fd)) or handed to one
/// ([`new_shared`](Self::new_shared)) shares its file status flags with that peer, which can
/// clear `O_NONBLOCK` at any time and saturate the counter: no flag set before a write closes
/// that window. Reads ask not to wait (`RWF_NOWAIT`) whatever the flag says; writes, which
/// cannot ask that of an eventfd, run under [`crate::kick::guarded`]: one the peer made block
/// is interrupted after at most about two watchdog ticks (40 ms), and the event is then
/// disabled: later signals are dropped at once (the peer's own wakeups stop, nobody else's).
#[derive(Debug)]
pub struct Event {
    fd: OwnedFd,
    /// The peer shares the open file description (and its `O_NONBLOCK`).
    untrusted: bool,
    /// A write blocked and was interrupted: the peer is hostile, signals are dropped.
    stalled: AtomicBool,
}

impl Event {
    /// A new, unsignalled event.
    pub fn new() -> Result<Self, Error> {
        eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map(|fd| Self {
                fd,
                untrusted: false,
                stalled: AtomicBool::new(false),
            })
            .map_err(Error::Event)
    }

    /// A new eventfd that will be handed to a peer (a channel's signal, which the front end
    /// writes): the peer's duplicate shares the file's `O_NONBLOCK` flag and may clear it, so,
    /// as for [`Event::from_untrusted_fd`], every read asks not to wait (`RWF_NOWAIT`) and every
    /// write is bounded (see [`Event`]). A read then never blocks on a counter the peer drained
    /// first, and a signal blocks at most briefly, once, on one the peer saturated.
    pub fn new_shared() -> Result<Self, Error> {
        // The watchdog that bounds its writes, running before the first one (starting it costs
        // a thread spawn: not something to add to a signal's latency).
        crate::kick::start();
        let mut e = Self::new()?;
        e.untrusted = true;
        Ok(e)
    }

    /// Wraps an eventfd received from a trusted party (for example inherited by a child process
    /// from its parent). [`wait`](Self::wait) works whether or not it is non-blocking;
    /// [`signal`](Self::signal) blocks if it is blocking and saturated.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self {
            fd,
            untrusted: false,
            stalled: AtomicBool::new(false),
        }
    }

    /// Wraps a descriptor a peer sent as an eventfd: refuses anything that is not an eventfd
    /// (a pipe, socket or file could block a write, or be something else entirely), sets
    /// `O_NONBLOCK`, and bounds every [`signal`](Self::signal) whatever the peer does to the
    /// descriptor's flags (see [`Event`]). Fails with `Error::Event(EINVAL)` if `fd` is not an
    /// eventfd.
    pub fn from_untrusted_fd(fd: OwnedFd) -> Result<Self, Error> {
        if !is_eventfd(&fd) {
            return Err(Error::Event(rustix::io::Errno::INVAL));
        }
        set_nonblocking(&fd)?;
        // As in `new_shared`: the watchdog runs before the first write.
        crate::kick::start();
        Ok(Self {
            fd,
            untrusted: true,
            stalled: AtomicBool::new(false),
        })
    }

    /// Signals the event. Never blocks: on a saturated counter the signal is dropped (one is
    /// pending anyway).
    pub fn signal(&self) -> Result<(), Error> {
        self.try_signal().map(|_| ())
    }

    /// Like [`signal`](Self::signal), and tells whether the counter was incremented (`false`:
    /// saturated, the signal dropped).
    pub fn try_signal(&self) -> Result<bool, Error> {
        if self.untrusted {
            return self.try_signal_shared();
        }
        loop {
            match rustix::io::write(&self.fd, &1u64.to_ne_bytes()) {
                Ok(_) => return Ok(true),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => return Ok(false),
                Err(e) => return Err(Error::Event(e)),
            }
        }
    }

    /// [`try_signal`](Self::try_signal) on a description a peer shares: the write may block
    /// (the peer cleared `O_NONBLOCK` and saturated the counter); if it is interrupted for
    /// that, the event is disabled.
    fn try_signal_shared(&self) -> Result<bool, Error> {
        // Relaxed: a plain flag; a signal racing with the stall is dropped either way.
        if self.stalled.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match crate::kick::guarded(|| rustix::io::write(&self.fd, &1u64.to_ne_bytes())) {
            Ok(_) => Ok(true),
            Err(rustix::io::Errno::AGAIN) => Ok(false),
            Err(rustix::io::Errno::INTR) => {
                self.stalled.store(true, Ordering::Relaxed);
                tracing::warn!(
                    "a peer made its eventfd block a signal (cleared O_NONBLOCK and saturated \
                     it): no more signals to it"
                );
                Ok(false)
            }
            Err(e) => Err(Error::Event(e)),
        }
    }

    /// Whether a signal was made to block and the event is disabled (see [`Event`]).
    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// Sleeps until the event is signalled and resets it. Returns the number of signals.
    pub fn wait(&self) -> Result<u64, Error> {
        use rustix::event::{poll, PollFd, PollFlags};
        loop {
            // 0: not signalled (a successful read of an eventfd is never 0): sleep until it is.
            let n = self.reset()?;
            if n != 0 {
                return Ok(n);
            }
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            match poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(Error::Event(e)),
            }
        }
    }

    /// Whether the event is signalled now (it is not reset: every waiter still sees it).
    pub fn is_signalled(&self) -> bool {
        let mut fds = [rustix::event::PollFd::new(
            &self.fd,
            rustix::event::PollFlags::IN,
        )];
        rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default()))
            .is_ok_and(|n| n > 0)
    }

    /// Resets the event without sleeping; returns the number of signals (0 if none).
    pub fn try_wait(&self) -> Result<u64, Error> {
        let mut fds = [rustix::event::PollFd::new(
            &self.fd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())) {
            Ok(0) | Err(rustix::io::Errno::INTR) => Ok(0),
            Ok(_) => {
                let mut buf = [0u8; 8];
                match self.read_nowait(&mut buf) {
                    Ok(_) => Ok(u64::from_ne_bytes(buf)),
                    Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => Ok(0),
                    Err(e) => Err(Error::Event(e)),
                }
            }
            Err(e) => Err(Error::Event(e)),
        }
    }

    /// Resets the event without sleeping (one system call; call it after a poll said the
    /// event is readable): the number of signals, 0 if none (another reader took them first).
    /// An event made with [`from_fd`](Self::from_fd) that is blocking waits for a signal.
    pub fn reset(&self) -> Result<u64, Error> {
        let mut buf = [0u8; 8];
        loop {
            match self.read_nowait(&mut buf) {
                Ok(_) => return Ok(u64::from_ne_bytes(buf)),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => return Ok(0),
                Err(e) => return Err(Error::Event(e)),
            }
        }
    }

    /// Reads (resets) the counter without ever blocking, whatever a peer did to the shared
    /// `O_NONBLOCK`: with `RWF_NOWAIT` (`preadv2`, which an eventfd honours since Linux 5.12:
    /// one system call instead of an `fcntl` and a read), else after setting the flag again.
    fn read_nowait(&self, buf: &mut [u8; 8]) -> Result<usize, rustix::io::Errno> {
        use rustix::io::{Errno, ReadWriteFlags};
        if !self.untrusted {
            return rustix::io::read(&self.fd, buf);
        }
        // u64::MAX: the current position (an eventfd has none; any other offset is ESPIPE).
        match rustix::io::preadv2(
            &self.fd,
            &mut [std::io::IoSliceMut::new(buf)],
            u64::MAX,
            ReadWriteFlags::NOWAIT,
        ) {
            Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {
                rustix::fs::fcntl_setfl(&self.fd, rustix::fs::OFlags::NONBLOCK)?;
                rustix::io::read(&self.fd, buf)
            }
            r => r,
        }
    }

    /// Like [`wait`](Self::wait) but gives up after `timeout_ms` (returns 0 then).
    pub fn wait_timeout(&self, timeout_ms: i32) -> Result<u64, Error> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        let ts = Timespec {
            tv_sec: i64::from(timeout_ms / 1000),
            tv_nsec: i64::from(timeout_ms % 1000) * 1_000_000,
        };
        match poll(&mut fds, Some(&ts)) {
            Ok(0) => Ok(0),
            Ok(_) => self.wait(),
            Err(rustix::io::Errno::INTR) => Ok(0),
            Err(e) => Err(Error::Event(e)),
        }
    }
}

impl AsFd for Event {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Whether `fd` is an eventfd (its `/proc/self/fd` link names the eventfd anonymous inode).
fn is_eventfd(fd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|l| l.as_os_str() == "anon_inode:[eventfd]")
}

/// Sets `O_NONBLOCK` (an eventfd has no other status flag that matters).
fn set_nonblocking(fd: &OwnedFd) -> Result<(), Error> {
    rustix::fs::fcntl_setfl(fd, rustix::fs::OFlags::NONBLOCK).map_err(Error::Event)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blocking eventfd whose counter is one below its maximum: any write of 1 would block.
    fn saturated_blocking() -> OwnedFd {
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        rustix::io::write(&fd, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).unwrap();
        fd
    }

    #[test]
    fn a_peer_that_makes_a_signal_block_gets_it_interrupted_and_no_more() {
        let ev = Event::new_shared().unwrap();
        let peer = ev.as_fd().try_clone_to_owned().unwrap();
        rustix::io::write(&peer, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).unwrap();
        rustix::fs::fcntl_setfl(&peer, rustix::fs::OFlags::empty()).unwrap();
        // The write blocks; the watchdog interrupts it.
        assert!(!ev.try_signal().unwrap(), "interrupted: dropped");
        assert!(ev.is_stalled());
        // Disabled: no write at all now, even once the counter has room.
        assert_eq!(ev.wait().unwrap(), 0xffff_ffff_ffff_fffe);
        assert!(!ev.try_signal().unwrap());
        assert!(!ev.is_signalled());
    }

    #[test]
    fn a_shared_event_reads_never_block_on_a_peer_that_cleared_o_nonblock() {
        let ev = Event::new_shared().unwrap();
        let peer = ev.as_fd().try_clone_to_owned().unwrap();
        rustix::fs::fcntl_setfl(&peer, rustix::fs::OFlags::empty()).unwrap();
        // A read of nothing waits for a signal instead of blocking in read(2) past it.
        assert_eq!(ev.try_wait().unwrap(), 0);
        let ev = std::sync::Arc::new(ev);
        let e2 = ev.clone();
        let t = std::thread::spawn(move || e2.wait().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        // A blocking but unsaturated eventfd takes the write at once.
        assert!(ev.try_signal().unwrap());
        assert_eq!(t.join().unwrap(), 1);
        assert!(!ev.is_stalled());
    }

    #[test]
    fn a_saturated_peer_eventfd_never_blocks_a_signal() {
        let fd = saturated_blocking();
        let peer = fd.try_clone().unwrap();
        let ev = Event::from_untrusted_fd(fd).unwrap();
        // Made non-blocking when taken: saturated means dropped (an interrupt is pending).
        assert!(
            !ev.try_signal().unwrap(),
            "dropped: an interrupt is pending"
        );
        assert!(!ev.is_stalled());
        assert_eq!(ev.wait().unwrap(), 0xffff_ffff_ffff_fffe);
        assert!(ev.try_signal().unwrap());
        assert!(ev.is_signalled() && ev.is_signalled());
        assert_eq!(ev.try_wait().unwrap(), 1);
        assert!(!ev.is_signalled());
        assert_eq!(ev.try_wait().unwrap(), 0);
        // The peer clears O_NONBLOCK on the shared description and saturates it: the write
        // that blocks is interrupted, and the event is disabled.
        rustix::fs::fcntl_setfl(&peer, rustix::fs::OFlags::empty()).unwrap();
        rustix::io::write(&peer, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).unwrap();
        assert!(!ev.try_signal().unwrap());
        assert!(ev.is_stalled());
    }

    #[test]
    fn only_eventfds_are_taken_from_a_peer() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(Event::from_untrusted_fd(a.into()).is_err());
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(Event::from_untrusted_fd(file.into()).is_err());
    }

    #[test]
    fn own_events_never_block_and_wait_sleeps() {
        let ev = std::sync::Arc::new(Event::new().unwrap());
        rustix::io::write(&ev.fd, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).unwrap();
        assert!(!ev.try_signal().unwrap());
        assert_eq!(ev.wait().unwrap(), 0xffff_ffff_ffff_fffe);
        let e2 = ev.clone();
        let t = std::thread::spawn(move || e2.wait().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        ev.signal().unwrap();
        assert_eq!(t.join().unwrap(), 1);
    }
}
