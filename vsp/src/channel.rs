//! Channel workers: one thread per open channel, serving its rings.
//!
//! The worker owns the host's halves of the channel's rings (it reads the guest-to-host ring and
//! writes the host-to-guest ring) and runs the channel's [`Device`] over them. It sleeps on the
//! eventfd the guest signals (HvSignalEvent on the channel's connection id, bound by the front
//! end), and interrupts the guest through the SynIC (event flag bit `relid`, then the VP's
//! irqfd). The drain loop follows the ring rules: mask while draining, commit once per batch,
//! unmask and re-check before sleeping.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ringbuf::guestmem::GuestMemory;
use ringbuf::poller::Poller;
use ringbuf::ring::{Ring, CONTROL_SIZE};
use ringbuf::{Event, IncomingRing, OutgoingRing, Packet};
use vmbus_proto::channel::Guid;

use crate::synic::Synic;
use crate::Error;

/// What a device does with the packets of its channel.
pub trait Device: Send + 'static {
    /// Handles one packet from the guest; writes any answer into `out` (uncommitted: the worker
    /// commits the batch) or starts work whose answer [`poll`](Self::poll) writes later. An
    /// error closes the channel's service (the guest sees no more answers) and is logged.
    fn handle(&mut self, packet: &Packet<'_>, out: &mut OutgoingRing) -> Result<(), Error>;

    /// Moves work the guest's packets do not drive: submits queued I/O, reaps completions and
    /// writes their answers. Returns whether anything moved.
    fn poll(&mut self, out: &mut OutgoingRing) -> Result<bool, Error> {
        let _ = out;
        Ok(false)
    }

    /// Whether the device must not take more packets now (its queue is full, or it holds
    /// answers the ring had no room for).
    fn busy(&self) -> bool {
        false
    }

    /// Bytes (packet plus trailer) the device waits to write into the guest's ring, if an
    /// answer did not fit: the worker then sleeps until the guest frees that much.
    fn blocked_on_ring(&self) -> Option<u32> {
        None
    }

    /// Whether the device has work in flight that will make [`poll`](Self::poll) progress
    /// without any packet from the guest (the worker then also waits on [`wake_fd`](Self::wake_fd)).
    fn in_flight(&self) -> bool {
        false
    }

    /// A descriptor that becomes readable when [`poll`](Self::poll) has work (for example an
    /// io_uring completion eventfd).
    fn wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// A device whose protocol is not implemented yet: logs the first packet and discards all,
/// so the guest's ring never fills.
#[derive(Debug)]
pub struct UnimplementedDevice {
    /// The device class, for the log.
    pub class: Guid,
    logged: bool,
}

impl UnimplementedDevice {
    /// A device of class `class`.
    pub fn new(class: Guid) -> Self {
        Self {
            class,
            logged: false,
        }
    }
}

impl Device for UnimplementedDevice {
    fn handle(&mut self, packet: &Packet<'_>, _out: &mut OutgoingRing) -> Result<(), Error> {
        if !self.logged {
            self.logged = true;
            tracing::warn!(class = %self.class, packet_type = ?packet.packet_type,
                "this device's protocol is not served yet; discarding its packets");
        }
        Ok(())
    }
}

/// Everything a worker needs to serve a channel.
pub struct ChannelSpec {
    /// The channel's relid (its event flag bit).
    pub relid: u32,
    /// The ring GPADL's pages, mapped contiguously.
    pub ring: Arc<ringbuf::Mapping>,
    /// Pages of the guest-to-host ring (the first part of `ring`).
    pub downstream_pages: u32,
    /// The VP that receives the channel's interrupts.
    pub target_vp: u32,
    /// The device.
    pub device: Box<dyn Device>,
}

/// A running channel worker; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct ChannelWorker {
    /// The eventfd the guest signals; the front end holds a duplicate.
    wake: Arc<Event>,
    stop: Arc<AtomicBool>,
    target_vp: Arc<AtomicU32>,
    thread: Option<JoinHandle<()>>,
}

impl ChannelWorker {
    /// Builds the rings and starts the worker thread. Fails (and starts nothing) if the rings
    /// are malformed, for example indices out of range in their control pages.
    pub fn start(
        spec: ChannelSpec,
        mem: Arc<GuestMemory>,
        synic: Arc<Synic>,
    ) -> Result<Self, Error> {
        let down = spec.downstream_pages as usize * 4096;
        let total = spec.ring.len();
        if down < CONTROL_SIZE + 4096 || total < down + CONTROL_SIZE + 4096 {
            return Err(Error::RingTooSmall);
        }
        let incoming = IncomingRing::new(Ring::new(spec.ring.clone(), 0, down)?)?;
        let outgoing = OutgoingRing::new(Ring::new(spec.ring.clone(), down, total - down)?)?;
        let wake = Arc::new(Event::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let target_vp = Arc::new(AtomicU32::new(spec.target_vp));
        let ctx = Worker {
            relid: spec.relid,
            incoming,
            outgoing,
            device: spec.device,
            wake: wake.clone(),
            stop: stop.clone(),
            target_vp: target_vp.clone(),
            mem,
            synic,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vmbus-chan-{}", spec.relid))
            .spawn(move || ctx.run())
            .map_err(Error::Thread)?;
        Ok(Self {
            wake,
            stop,
            target_vp,
            thread: Some(thread),
        })
    }

    /// The eventfd the guest signals this channel with.
    pub fn wake_event(&self) -> &Event {
        &self.wake
    }

    /// Sends the channel's interrupts to another VP from now on.
    pub fn retarget(&self, vp: u32) {
        self.target_vp.store(vp, Ordering::Relaxed);
    }
}

impl Drop for ChannelWorker {
    fn drop(&mut self) {
        // Release: pairs with the worker's acquire load after its wake.
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    relid: u32,
    incoming: IncomingRing,
    outgoing: OutgoingRing,
    device: Box<dyn Device>,
    wake: Arc<Event>,
    stop: Arc<AtomicBool>,
    target_vp: Arc<AtomicU32>,
    mem: Arc<GuestMemory>,
    synic: Arc<Synic>,
}

/// Packets a worker handles before it lets the device move (submit and reap I/O) and
/// publishes the answers: small enough that the guest works on the first answers while the
/// worker handles the next packets, large enough to batch syscalls and signals.
const HANDLE_BATCH: usize = 8;

impl Worker {
    fn run(mut self) {
        if let Err(e) = self.serve() {
            tracing::warn!(relid = self.relid, error = %e, "channel service stopped");
            // Wait for the close so the thread's lifetime stays tied to the channel's.
            while !self.stop.load(Ordering::Acquire) {
                let _ = self.wake.wait();
            }
        }
    }

    fn interrupt_guest(&self) {
        let vp = self.target_vp.load(Ordering::Relaxed);
        self.synic.signal_channel(&self.mem, vp, self.relid);
    }

    fn serve(&mut self) -> Result<(), Error> {
        let mut poller = Poller::default();
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            self.incoming.mask();
            let mut moved = false;
            let mut handled = 0;
            while handled < HANDLE_BATCH && !self.device.busy() {
                let Some(p) = self.incoming.read()? else {
                    break;
                };
                moved = true;
                handled += 1;
                self.device.handle(&p, &mut self.outgoing)?;
            }
            moved |= self.device.poll(&mut self.outgoing)?;
            if self.outgoing.commit() {
                self.interrupt_guest();
            }
            if self.incoming.commit() {
                self.interrupt_guest();
            }
            if moved {
                poller.busy();
                continue;
            }
            // Poll before sleeping (longer with I/O in flight: its completion is due soon).
            if poller.idle(self.device.in_flight()) {
                continue;
            }
            // Prepare to sleep: unmask and re-check the incoming ring; ask for a signal when
            // the guest frees the room a blocked answer needs.
            let (empty, signal) = self.incoming.prepare_sleep();
            if signal {
                self.interrupt_guest();
            }
            let ring_blocked = match self.device.blocked_on_ring() {
                Some(needed) => self.outgoing.prepare_sleep(needed),
                None => false,
            };
            let can_read = !empty && !self.device.busy();
            if can_read || (self.device.blocked_on_ring().is_some() && !ring_blocked) {
                self.outgoing.clear_pending();
                continue;
            }
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            poller.sleeping();
            self.sleep()?;
            poller.woke();
            self.outgoing.clear_pending();
        }
    }

    /// Waits for the guest's signal or the device's own wakeup, whichever comes first.
    fn sleep(&mut self) -> Result<(), Error> {
        use rustix::event::{poll, PollFd, PollFlags};
        let device_fd = if self.device.in_flight() {
            self.device.wake_fd()
        } else {
            None
        };
        let Some(dev) = device_fd else {
            self.wake.wait()?;
            return Ok(());
        };
        let mut fds = [
            PollFd::new(self.wake.as_ref(), PollFlags::IN),
            PollFd::new(&dev, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Error::Socket(e)),
        }
        if !fds[0].revents().is_empty() {
            self.wake.wait()?;
        }
        Ok(())
    }
}
