//! The guest's end of an open VMBus channel: its ring GPADL, the two ring halves, the host's
//! connection id to signal, and the channel's interrupt.
//!
//! The first `ring_pages` pages of the GPADL are the guest-to-host ring (the guest writes it),
//! the rest the host-to-guest ring. The guest creates the GPADL, so it initialises both control
//! pages before opening.

use std::sync::Arc;
use std::time::Duration;

use ringbuf::guestmem::GuestMemory;
use ringbuf::ring::Ring;
use ringbuf::{Event, IncomingRing, OutgoingRing};

use crate::client::{Client, Offer};
use crate::synic::HostInterface;
use crate::Error;

/// What channels and the device clients on them need of the front end they run on, besides
/// its [`HostInterface`]: the guest's memory as this process sees it, and the guest pages free
/// for rings and buffers. The loopback front end ([`crate::loopback::Loopback`]) is one; a VMM
/// that runs the client against a VM's own memory (the hypervisor shim's tests) is another.
pub trait FrontEnd: Send + Sync {
    /// The guest's memory.
    fn memory(&self) -> &GuestMemory;
    /// Allocates `n` zeroed guest pages (not necessarily contiguous); their frame numbers.
    fn alloc_pages(&self, n: usize) -> Result<Vec<u64>, Error>;
    /// Returns pages to the allocator.
    fn free_pages(&self, pages: &[u64]);
}

impl<T: FrontEnd + ?Sized> FrontEnd for Arc<T> {
    fn memory(&self) -> &GuestMemory {
        (**self).memory()
    }
    fn alloc_pages(&self, n: usize) -> Result<Vec<u64>, Error> {
        (**self).alloc_pages(n)
    }
    fn free_pages(&self, pages: &[u64]) {
        (**self).free_pages(pages)
    }
}

/// An open channel, guest side.
pub struct GuestChannel {
    /// The channel's relid.
    pub relid: u32,
    /// The VP its interrupts target (one of the front end's own per channel, or 0).
    pub target_vp: u32,
    connection_id: u32,
    host: Arc<dyn HostInterface>,
    /// The guest-to-host ring (written by the guest).
    pub out: OutgoingRing,
    /// The host-to-guest ring (read by the guest).
    pub inc: IncomingRing,
    interrupt: Event,
    gpadl: u32,
    pages: Vec<u64>,
    stats: Arc<ChannelStats>,
    /// The host session it was opened in (see [`HostInterface::session`]).
    session: u64,
}

/// What crossed between guest and host on a channel: the wakeups the ring rules let through.
#[derive(Debug, Default)]
pub struct ChannelStats {
    /// Signals the guest sent the host (HvSignalEvent).
    pub signals: std::sync::atomic::AtomicU64,
    /// Interrupts the guest took from the host (wakeups of its interrupt line).
    pub interrupts: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for GuestChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestChannel")
            .field("relid", &self.relid)
            .field("gpadl", &self.gpadl)
            .finish()
    }
}

impl GuestChannel {
    /// Opens `offer` with rings of `ring_pages` pages each way (control page included).
    pub fn open(
        client: &mut Client,
        front: &dyn FrontEnd,
        offer: &Offer,
        ring_pages: usize,
    ) -> Result<Self, Error> {
        if ring_pages < 2 {
            return Err(Error::Protocol("a ring needs at least 2 pages".into()));
        }
        let pages = front.alloc_pages(2 * ring_pages)?;
        let result = Self::open_on(client, front, offer, ring_pages, &pages);
        if result.is_err() {
            front.free_pages(&pages);
        }
        let session = client.host().session();
        result.map(|(out, inc, interrupt, gpadl, target_vp)| Self {
            session,
            relid: offer.relid,
            target_vp,
            connection_id: offer.connection_id,
            host: client.host().clone(),
            out,
            inc,
            interrupt,
            gpadl,
            pages,
            stats: Arc::default(),
        })
    }

    fn open_on(
        client: &mut Client,
        front: &dyn FrontEnd,
        offer: &Offer,
        ring_pages: usize,
        pages: &[u64],
    ) -> Result<(OutgoingRing, IncomingRing, Event, u32, u32), Error> {
        let view = Arc::new(front.memory().map_pages(pages)?);
        let half = ring_pages * 4096;
        let down = Ring::new(view.clone(), 0, half)?;
        let up = Ring::new(view, half, half)?;
        down.init()?;
        up.init()?;
        let gpadl = client.create_gpadl(offer.relid, pages)?;
        let interrupt = Event::new()?;
        let for_host = Event::from_fd(
            std::os::fd::AsFd::as_fd(&interrupt)
                .try_clone_to_owned()
                .map_err(|e| Error::Protocol(e.to_string()))?,
        );
        let target_vp = client
            .host()
            .set_channel_interrupt(offer.relid, Some(for_host));
        if let Err(e) = client.open(offer.relid, gpadl, ring_pages as u32, target_vp, &[]) {
            client.host().set_channel_interrupt(offer.relid, None);
            let _ = client.teardown_gpadl(offer.relid, gpadl);
            return Err(e);
        }
        Ok((
            OutgoingRing::new(down)?,
            IncomingRing::new(up)?,
            interrupt,
            gpadl,
            target_vp,
        ))
    }

    /// Signals the host (HvSignalEvent on the channel's connection id).
    pub fn signal_host(&self) -> Result<(), Error> {
        self.stats
            .signals
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.host.signal_event(self.connection_id)
    }

    /// Whether the host is still there, in the session the channel was opened in.
    pub fn host_alive(&self) -> bool {
        self.host.host_alive() && self.host.session() == self.session
    }

    /// The channel's counters.
    pub fn stats(&self) -> &Arc<ChannelStats> {
        &self.stats
    }

    /// Counts into `stats` from now on (a channel reopened after a host restart carries on
    /// with its predecessor's counters).
    pub fn adopt_stats(&mut self, stats: Arc<ChannelStats>) {
        self.stats = stats;
    }

    /// Drops a channel whose host session is gone (nothing to close: the host forgot it) and
    /// frees its ring pages.
    pub fn abandon(self, front: &dyn FrontEnd) {
        front.free_pages(&self.pages);
    }

    /// Consumes the line's pending interrupts, if any, without blocking, and counts them as one
    /// wakeup; whether there were some.
    pub fn take_interrupt(&self) -> Result<bool, Error> {
        let mut buf = [0u8; 8];
        loop {
            // The line is our own non-blocking eventfd (`Event::new`).
            match rustix::io::read(&self.interrupt, &mut buf) {
                Ok(_) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => return Ok(false),
                Err(e) => return Err(Error::Ring(ringbuf::Error::Event(e))),
            }
        }
        self.stats
            .interrupts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }

    /// Counts an interrupt that an edge-triggered watch of the line reported (a queue thread's
    /// event loop), without resetting the line: each signal is an edge whatever the counter
    /// holds, so the read [`take_interrupt`](Self::take_interrupt) makes would only cost a
    /// system call per wakeup. (The counter cannot saturate in practice: 2^64 - 2 signals; and
    /// a saturated one only drops the host's signals, one being pending.)
    pub fn count_interrupt(&self) {
        self.stats
            .interrupts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Commits what was written and signals the host if the rules say so.
    pub fn commit_out(&mut self) -> Result<(), Error> {
        if self.out.commit() {
            self.signal_host()?;
        }
        Ok(())
    }

    /// Releases what was read and signals the host if it waits for room.
    pub fn commit_in(&mut self) -> Result<(), Error> {
        if self.inc.commit() {
            self.signal_host()?;
        }
        Ok(())
    }

    /// The channel's interrupt line.
    pub fn interrupt(&self) -> &Event {
        &self.interrupt
    }

    /// Waits for the channel's interrupt, up to `timeout`. Returns whether it fired.
    pub fn wait_interrupt(&self, timeout: Duration) -> Result<bool, Error> {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let fired = self.interrupt.wait_timeout(ms)? > 0;
        if fired {
            self.stats
                .interrupts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(fired)
    }

    /// For a loop reading the host-to-guest ring during a handshake (no queue thread yet):
    /// arms the ring's interrupt and, if it is still empty, waits for it until `deadline` (at
    /// most 100 ms at a time). Fails with [`Error::Timeout`] past the deadline.
    pub fn await_incoming(&mut self, deadline: std::time::Instant) -> Result<(), Error> {
        let (empty, _) = self.inc.prepare_sleep();
        if empty {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout);
            }
            self.wait_interrupt(left.min(Duration::from_millis(100)))?;
        }
        Ok(())
    }

    /// Closes the channel, tears its GPADL down and frees its pages.
    pub fn close(self, client: &mut Client, front: &dyn FrontEnd) -> Result<(), Error> {
        client.close(self.relid)?;
        client.teardown_gpadl(self.relid, self.gpadl)?;
        front.free_pages(&self.pages);
        Ok(())
    }
}
