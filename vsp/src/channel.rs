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

    /// How many packets the worker handles, while the guest is awake, before it lets the
    /// device move (submit and reap I/O) and publishes the answers. Fewer: the guest gets its
    /// first answers sooner and works on them while the worker handles the next packets; more:
    /// fewer system calls and ring publications per packet. While the guest sleeps the worker
    /// takes up to 32 (`SLEEPER_BATCH`) whatever this says.
    fn packet_batch(&self) -> usize {
        HANDLE_BATCH
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

    /// Whether all the device's work is guest requests, each answered (storage): with none
    /// [`in_flight`](Self::in_flight), the next comes after the guest's turn, so the worker
    /// yields its core at every look while it polls
    /// ([`ringbuf::poller::Poller::set_serves_requests`]).
    fn serves_requests(&self) -> bool {
        false
    }

    /// A descriptor that becomes readable when [`poll`](Self::poll) has work (for example an
    /// io_uring completion eventfd).
    fn wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    /// Called before the worker sleeps on [`wake_fd`](Self::wake_fd) (with work in flight):
    /// re-arm it (a device that does not reset it while polling saves a system call per poll)
    /// and say whether nothing is ready (true: sleep; false: poll again).
    fn prepare_sleep(&mut self) -> bool {
        true
    }

    /// A descriptor the worker also waits on when nothing is in flight: a source of work the
    /// guest does not drive and that may come at any time (a TAP queue with frames for the
    /// guest, a timer). The worker polls no longer for it than for the guest's ring.
    fn idle_wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
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

/// Rate limit of the warnings guests can cause from channel threads (a channel that fails,
/// an unserved device's first packet), across the daemon: a guest that opens and breaks
/// channels in a loop cannot flood the log.
static CHANNEL_LOG: std::sync::Mutex<crate::synic::LogLimit> = std::sync::Mutex::new(
    crate::synic::LogLimit::new(10, std::time::Duration::from_secs(60)),
);

fn channel_log_allowed() -> Option<u64> {
    CHANNEL_LOG
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .allow()
}

impl Device for UnimplementedDevice {
    fn handle(&mut self, packet: &Packet<'_>, _out: &mut OutgoingRing) -> Result<(), Error> {
        if !self.logged {
            self.logged = true;
            if let Some(suppressed) = channel_log_allowed() {
                tracing::warn!(class = %self.class, packet_type = ?packet.packet_type, suppressed,
                    "this device's protocol is not served yet; discarding its packets");
            }
        }
        Ok(())
    }
}

/// How long dropping a [`ChannelWorker`] waits for its thread to end; a thread stuck longer
/// (in a device that does not return) is left behind, logged, so that a session and the
/// daemon's shutdown end in bounded time whatever the device does.
pub const WORKER_JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
    /// Signalled when the thread ends.
    exited: Arc<Event>,
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
        // Shared with the front end (CHANNEL_SIGNAL hands it a duplicate), which may clear its
        // O_NONBLOCK flag: every write and read here sets it again first.
        let wake = Arc::new(Event::new_shared()?);
        let stop = Arc::new(AtomicBool::new(false));
        let target_vp = Arc::new(AtomicU32::new(spec.target_vp));
        let exited = Arc::new(Event::new()?);
        let done = ExitSignal(exited.clone());
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
            reset_pending: false,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vmbus-chan-{}", spec.relid))
            .spawn(move || {
                let _done = done;
                ctx.run();
            })
            .map_err(Error::Thread)?;
        Ok(Self {
            wake,
            stop,
            target_vp,
            thread: Some(thread),
            exited,
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
            let ms = WORKER_JOIN_TIMEOUT.as_millis() as i32;
            if t.is_finished() || self.exited.wait_timeout(ms).unwrap_or(0) > 0 {
                let _ = t.join();
            } else if let Some(suppressed) = channel_log_allowed() {
                // A guest can cause this (I/O of its own that takes long): rate-limited.
                tracing::warn!(
                    thread = t.thread().name().unwrap_or("?"),
                    suppressed,
                    "channel worker did not stop in time; leaving it behind"
                );
            }
        }
    }
}

/// Signals its event when dropped: at the end of a worker thread, even one that panicked.
struct ExitSignal(Arc<Event>);

impl Drop for ExitSignal {
    fn drop(&mut self) {
        let _ = self.0.signal();
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
    /// The wake event fired during the last sleep and is reset after the next pass.
    reset_pending: bool,
}

/// Packets a worker handles before it lets the device move (submit and reap I/O) and
/// publishes the answers, while the guest polls its ring, unless the device says otherwise
/// ([`Device::packet_batch`]): small enough that the guest works on the first answers while
/// the worker handles the next packets, large enough to batch syscalls.
const HANDLE_BATCH: usize = 8;

/// The same while the guest sleeps (its interrupt unmasked, everything published read): every
/// publication would then cost an interrupt and a wakeup (system calls on both sides), so the
/// worker handles what the ring holds, up to this, submits the I/O with one system call and
/// publishes the answers with one interrupt. Bounded so that slow I/O done inline (buffered
/// writes) still reaches the guest in batches: a deeper queue gets an interrupt per 32.
const SLEEPER_BATCH: usize = 32;

impl Worker {
    fn run(mut self) {
        if let Err(e) = self.serve() {
            if let Some(suppressed) = channel_log_allowed() {
                tracing::warn!(relid = self.relid, error = %e, suppressed, "channel service stopped");
            }
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
        let serves_requests = self.device.serves_requests();
        if serves_requests {
            if let Some(cpu) = ringbuf::poller::share_cpu_when_sleeping(self.relid) {
                tracing::debug!(
                    relid = self.relid,
                    cpu,
                    "polling off: the channel's worker runs on one CPU"
                );
            }
        }
        let mut poller = Poller::default();
        poller.set_serves_requests(serves_requests);
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            self.incoming.mask();
            let mut moved = false;
            let mut handled = 0;
            let batch = if self.outgoing.reader_waiting() {
                SLEEPER_BATCH
            } else {
                self.device.packet_batch()
            };
            while handled < batch && !self.device.busy() {
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
            // The wake event fired for the sleep that just ended: reset it only now, after this
            // pass's work and answers (one system call less between a woken request and its
            // answer). A signal the reset swallows announced packets the ring still holds: the
            // next pass reads them, or the re-check after unmasking before any sleep, both
            // after this point.
            if std::mem::take(&mut self.reset_pending) {
                self.wake.reset()?;
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
            // Likewise re-arm the device's wakeup, then re-check it.
            let device_ready = self.device.in_flight() && !self.device.prepare_sleep();
            if can_read
                || device_ready
                || (self.device.blocked_on_ring().is_some() && !ring_blocked)
            {
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
            self.device.idle_wake_fd()
        };
        // Poll first, then reset the event only if it fired (after the pass that follows, see
        // `serve`): two system calls per sleep (a read first would find nothing and cost a
        // third).
        let wake = PollFd::new(self.wake.as_ref(), PollFlags::IN);
        let mut both;
        let mut one;
        let fds: &mut [PollFd<'_>] = match &device_fd {
            Some(dev) => {
                both = [wake, PollFd::new(dev, PollFlags::IN)];
                &mut both
            }
            None => {
                one = [wake];
                &mut one
            }
        };
        match poll(fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Error::Socket(e)),
        }
        self.reset_pending = !fds[0].revents().is_empty();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A device that does not return (from `busy`, the first thing the worker asks) until its
    /// sender is dropped.
    struct Stuck(std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>);

    impl Device for Stuck {
        fn handle(&mut self, _: &Packet<'_>, _: &mut OutgoingRing) -> Result<(), Error> {
            Ok(())
        }
        fn busy(&self) -> bool {
            let _ = self.1.send(());
            let _ = self.0.recv();
            false
        }
    }

    #[test]
    fn a_stuck_device_does_not_hold_the_close_forever() {
        let fd = ringbuf::shmem::create_memfd("rings", 4 * 4096).unwrap();
        let ring = Arc::new(ringbuf::Mapping::from_fd(fd.as_fd(), 0, 4 * 4096).unwrap());
        let (release, rx) = std::sync::mpsc::channel();
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let spec = ChannelSpec {
            relid: 1,
            ring,
            downstream_pages: 2,
            target_vp: 0,
            device: Box::new(Stuck(rx, entered_tx)),
        };
        let w = ChannelWorker::start(spec, Arc::new(GuestMemory::new()), Arc::new(Synic::new(1)))
            .unwrap();
        entered.recv().unwrap();
        let start = std::time::Instant::now();
        drop(w);
        let waited = start.elapsed();
        assert!(waited >= WORKER_JOIN_TIMEOUT, "{waited:?}");
        assert!(waited < WORKER_JOIN_TIMEOUT * 4, "{waited:?}");
        // The thread left behind ends once its device returns.
        drop(release);
    }
}
