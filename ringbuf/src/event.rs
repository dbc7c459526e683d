//! Signals between the two sides of a ring: an eventfd each way.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::{eventfd, EventfdFlags};

use crate::Error;

/// An eventfd used as a wakeup line: `signal` from any thread or process, `wait` to sleep until
/// at least one signal arrived since the last wait.
#[derive(Debug)]
pub struct Event(OwnedFd);

impl Event {
    /// A new, unsignalled event.
    pub fn new() -> Result<Self, Error> {
        eventfd(0, EventfdFlags::CLOEXEC)
            .map(Self)
            .map_err(Error::Event)
    }

    /// Wraps an eventfd received from elsewhere (for example inherited by a child process).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self(fd)
    }

    /// Signals the event.
    pub fn signal(&self) -> Result<(), Error> {
        match rustix::io::write(&self.0, &1u64.to_ne_bytes()) {
            Ok(_) => Ok(()),
            // The counter is saturated: a signal is pending anyway.
            Err(rustix::io::Errno::AGAIN) => Ok(()),
            Err(e) => Err(Error::Event(e)),
        }
    }

    /// Sleeps until the event is signalled and resets it. Returns the number of signals.
    pub fn wait(&self) -> Result<u64, Error> {
        let mut buf = [0u8; 8];
        loop {
            match rustix::io::read(&self.0, &mut buf) {
                Ok(_) => return Ok(u64::from_ne_bytes(buf)),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::Event(e)),
            }
        }
    }

    /// Like [`wait`](Self::wait) but gives up after `timeout_ms` (returns 0 then).
    pub fn wait_timeout(&self, timeout_ms: i32) -> Result<u64, Error> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(&self.0, PollFlags::IN)];
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
        self.0.as_fd()
    }
}
