//! Host-side SynIC delivery: VMBus channel messages into a VP's message page (SIMP) and channel
//! interrupts into its event flags page (SIEFP), each followed by a write to the VP's irqfd.
//!
//! Message slot protocol (Linux `vmbus_on_msg_dpc` / `vmbus_signal_eom`): the host writes the
//! payload and size, then the type last (release); the guest copies the message out, stores type
//! 0, issues a full barrier, and writes the EOM MSR if `message_pending` is set. When the slot is
//! busy, the host sets `message_pending`, issues a full barrier and re-checks the type: either the
//! guest sees the flag (and sends EOM) or the host sees the slot free (and delivers now).

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ringbuf::guestmem::GuestMemory;
use ringbuf::Event;
use vmbus_proto::synic::{
    MESSAGE_FLAG_PENDING, MESSAGE_PAYLOAD_SIZE, MESSAGE_SLOT_SIZE, VMBUS_POST_MESSAGE_TYPE,
    VMBUS_SINT,
};

/// Messages queued for one VP beyond which the oldest are dropped (the guest is not reading):
/// the default of [`Synic::new`]'s bound (about 250 KiB per VP at most).
pub const MAX_QUEUED_MESSAGES: usize = 1024;

/// A rate limit for log lines a peer can trigger: at most `burst` lines per `window`; the
/// lines suppressed are counted and reported with the next line let through. Keeps a guest or
/// front end from flooding the log while the first occurrences stay visible.
#[derive(Debug)]
pub struct LogLimit {
    burst: u32,
    window: Duration,
    start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogLimit {
    /// At most `burst` lines per `window`.
    pub const fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged now; if so, `Some(n)` with the number of lines suppressed
    /// since the last one let through.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .start
            .is_none_or(|s| now.duration_since(s) >= self.window)
        {
            self.start = Some(now);
            self.used = 0;
        }
        if self.used >= self.burst {
            self.suppressed += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl Default for LogLimit {
    /// 10 lines a minute.
    fn default() -> Self {
        Self::new(10, Duration::from_secs(60))
    }
}

/// Rate limit of the warnings a front end or its guest causes in sessions (a refused memory
/// region, a channel that fails to start, dropped messages), across the daemon: a limit per
/// session would start afresh with each connection, so a front end that reconnects in a loop
/// could flood the log.
static PEER_LOG: Mutex<LogLimit> = Mutex::new(LogLimit::new(10, Duration::from_secs(60)));

/// Whether a warning caused by a front end or guest may be logged now (see [`LogLimit::allow`]).
pub(crate) fn peer_log_allowed() -> Option<u64> {
    PEER_LOG.lock().unwrap_or_else(|e| e.into_inner()).allow()
}

/// One VP's SynIC state as the front end reported it.
#[derive(Debug, Default)]
struct Vp {
    simp: Option<u64>,
    siefp: Option<u64>,
    masked: bool,
    irqfd: Option<Event>,
    queue: VecDeque<Vec<u8>>,
}

/// The SynIC of a partition, host side.
///
/// Every irqfd write is bounded (see [`Event`]): a front end that leaves its irqfd's counter
/// saturated gets no more interrupts (one is pending anyway); one that also clears the shared
/// `O_NONBLOCK` makes one write block until the watchdog interrupts it (about 40 ms, the per-VP
/// lock held meanwhile), after which its irqfd is disabled.
#[derive(Debug)]
pub struct Synic {
    vps: Vec<Mutex<Vp>>,
    max_queued: usize,
    /// Interrupts dropped because the irqfd's counter was saturated.
    dropped_interrupts: AtomicU64,
    /// Messages dropped (queue full, or no such VP).
    dropped_messages: AtomicU64,
}

/// Offset of the VMBus SINT's slot (or event bitmap) in its page.
const SINT_OFFSET: u64 = VMBUS_SINT as u64 * MESSAGE_SLOT_SIZE as u64;

impl Synic {
    /// A SynIC for `vp_count` VPs, all pages disabled, queueing at most
    /// [`MAX_QUEUED_MESSAGES`] messages per VP.
    pub fn new(vp_count: u32) -> Self {
        Self::with_queue_limit(vp_count, MAX_QUEUED_MESSAGES)
    }

    /// A SynIC whose VPs each queue at most `max_queued` (at least 1) messages the guest has
    /// not taken yet; beyond that the oldest are dropped.
    pub fn with_queue_limit(vp_count: u32, max_queued: usize) -> Self {
        Self {
            vps: (0..vp_count).map(|_| Mutex::new(Vp::default())).collect(),
            max_queued: max_queued.max(1),
            dropped_interrupts: AtomicU64::new(0),
            dropped_messages: AtomicU64::new(0),
        }
    }

    /// Interrupts dropped because the VP's irqfd was saturated (an interrupt was pending).
    pub fn dropped_interrupts(&self) -> u64 {
        self.dropped_interrupts.load(Ordering::Relaxed)
    }

    /// Messages dropped: the guest was not taking them, or named a VP that does not exist.
    pub fn dropped_messages(&self) -> u64 {
        self.dropped_messages.load(Ordering::Relaxed)
    }

    /// Logs a guest-caused drop, rate-limited.
    fn log_drop(&self, vp: u32, what: &'static str) {
        self.dropped_messages.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = peer_log_allowed() {
            tracing::warn!(vp, suppressed, "{what}");
        }
    }

    /// Number of VPs.
    pub fn vp_count(&self) -> u32 {
        self.vps.len() as u32
    }

    fn vp(&self, vp: u32) -> Option<std::sync::MutexGuard<'_, Vp>> {
        // A poisoned lock only means another thread panicked mid-update; the state is plain data.
        self.vps
            .get(vp as usize)
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Updates a VP's pages and, if given, its irqfd; then delivers anything queued. Pages must
    /// lie in guest memory (checked by the caller against `mem`). Returns false for a bad VP.
    pub fn set_vp(
        &self,
        mem: &GuestMemory,
        vp: u32,
        simp: Option<u64>,
        siefp: Option<u64>,
        masked: bool,
        irqfd: Option<Event>,
    ) -> bool {
        let Some(mut v) = self.vp(vp) else {
            return false;
        };
        v.simp = simp;
        v.siefp = siefp;
        v.masked = masked;
        if irqfd.is_some() {
            v.irqfd = irqfd;
        }
        self.deliver(mem, &mut v);
        true
    }

    /// Queues a channel message (at most 240 bytes) for `vp` and delivers it if the slot is free.
    /// Messages to a VP that does not exist are dropped.
    pub fn post(&self, mem: &GuestMemory, vp: u32, bytes: &[u8]) {
        debug_assert!(bytes.len() <= MESSAGE_PAYLOAD_SIZE);
        let Some(mut v) = self.vp(vp) else {
            self.log_drop(vp, "message for a VP that does not exist dropped");
            return;
        };
        if v.queue.len() >= self.max_queued {
            v.queue.pop_front();
            self.log_drop(vp, "guest is not reading its messages; dropping the oldest");
        }
        v.queue
            .push_back(bytes[..bytes.len().min(MESSAGE_PAYLOAD_SIZE)].to_vec());
        self.deliver(mem, &mut v);
    }

    /// The guest wrote EOM on `vp`: deliver the next queued message if the slot is free.
    pub fn eom(&self, mem: &GuestMemory, vp: u32) {
        if let Some(mut v) = self.vp(vp) {
            self.deliver(mem, &mut v);
        }
    }

    /// Messages waiting for `vp` (for tests and diagnostics).
    pub fn queued(&self, vp: u32) -> usize {
        self.vp(vp).map_or(0, |v| v.queue.len())
    }

    fn deliver(&self, mem: &GuestMemory, v: &mut Vp) {
        let (Some(simp), false) = (v.simp, v.masked) else {
            return;
        };
        let slot = simp + SINT_OFFSET;
        let Ok(type_word) = mem.atomic_u32(slot) else {
            return;
        };
        let Ok(flags_word) = mem.atomic_u32(slot + 4) else {
            return;
        };
        let mut delivered = false;
        while let Some(msg) = v.queue.front() {
            // Acquire: pairs with the guest's clearing of the type after it copied the message out.
            if type_word.load(Ordering::Acquire) != 0 {
                // Busy: ask for an EOM, then re-check (see the module docs).
                flags_word.fetch_or(u32::from(MESSAGE_FLAG_PENDING) << 8, Ordering::Relaxed);
                // Pairs with the guest's barrier between clearing the type and reading the flag.
                fence(Ordering::SeqCst);
                if type_word.load(Ordering::Acquire) != 0 {
                    break;
                }
            }
            // The slot is ours: payload, then size and flags (pending clear), then the type.
            if mem.write(slot + 16, msg).is_err() {
                break;
            }
            flags_word.store(msg.len() as u32, Ordering::Relaxed);
            // Release: the payload and size are visible before the guest sees the type.
            type_word.store(VMBUS_POST_MESSAGE_TYPE, Ordering::Release);
            v.queue.pop_front();
            delivered = true;
            // One message per slot: the next waits for the guest to free it.
        }
        if delivered {
            self.interrupt(v);
        }
    }

    /// Raises channel `relid`'s interrupt on `vp`: sets its bit in the VMBus SINT's event flags
    /// and signals the irqfd. Returns false if the VP has no event page or the bit is outside it.
    pub fn signal_channel(&self, mem: &GuestMemory, vp: u32, relid: u32) -> bool {
        let Some(v) = self.vp(vp) else { return false };
        let Some(siefp) = v.siefp else { return false };
        if relid as usize >= vmbus_proto::synic::EVENT_FLAGS_COUNT {
            return false;
        }
        let word = siefp + SINT_OFFSET + u64::from(relid / 32) * 4;
        let Ok(w) = mem.atomic_u32(word) else {
            return false;
        };
        // Release: ring writes made before this signal are visible to the guest's handler,
        // which swaps the word with acquire semantics.
        w.fetch_or(1 << (relid % 32), Ordering::Release);
        self.interrupt(&v);
        true
    }

    /// Writes the VP's irqfd; never blocks (a saturated counter drops the interrupt, one is
    /// pending).
    fn interrupt(&self, v: &Vp) {
        if let Some(irq) = &v.irqfd {
            if !irq.try_signal().unwrap_or(true) {
                self.dropped_interrupts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringbuf::shmem::create_memfd;

    /// 1 MiB of guest memory.
    fn memory() -> GuestMemory {
        let mut mem = GuestMemory::new();
        mem.add_region(0, 1 << 20, create_memfd("g", 1 << 20).unwrap(), 0)
            .unwrap();
        mem
    }

    fn setup() -> (GuestMemory, Synic, Event) {
        let mem = memory();
        let syn = Synic::new(2);
        let irq = Event::new().unwrap();
        let dup = Event::from_fd(std::os::fd::AsFd::as_fd(&irq).try_clone_to_owned().unwrap());
        assert!(syn.set_vp(&mem, 1, Some(0x1000), Some(0x2000), false, Some(dup)));
        (mem, syn, irq)
    }

    fn slot_type(mem: &GuestMemory) -> u32 {
        mem.atomic_u32(0x1000 + SINT_OFFSET)
            .unwrap()
            .load(Ordering::Acquire)
    }

    #[test]
    fn messages_are_delivered_one_slot_at_a_time_with_eom() {
        let (mem, syn, irq) = setup();
        syn.post(&mem, 1, b"first message");
        assert_eq!(irq.wait_timeout(0).unwrap(), 1);
        assert_eq!(slot_type(&mem), 1);
        let mut hdr = [0u8; 16 + 13];
        mem.read(0x1000 + SINT_OFFSET, &mut hdr).unwrap();
        assert_eq!(hdr[4], 13, "payload size");
        assert_eq!(&hdr[16..], b"first message");
        // Slot busy: the second waits, with message_pending set.
        syn.post(&mem, 1, b"second");
        assert_eq!(syn.queued(1), 1);
        mem.read(0x1000 + SINT_OFFSET, &mut hdr[..8]).unwrap();
        assert_eq!(hdr[5] & MESSAGE_FLAG_PENDING, MESSAGE_FLAG_PENDING);
        // The guest frees the slot and writes EOM.
        mem.atomic_u32(0x1000 + SINT_OFFSET)
            .unwrap()
            .store(0, Ordering::Release);
        syn.eom(&mem, 1);
        assert_eq!(syn.queued(1), 0);
        mem.read(0x1000 + SINT_OFFSET, &mut hdr[..22]).unwrap();
        assert_eq!((hdr[4], hdr[5], &hdr[16..22]), (6, 0, &b"second"[..]));
    }

    #[test]
    fn masked_or_disabled_vps_queue() {
        let (mem, syn, _irq) = setup();
        assert!(syn.set_vp(&mem, 0, None, None, false, None));
        syn.post(&mem, 0, b"x");
        assert_eq!(syn.queued(0), 1);
        syn.set_vp(&mem, 0, Some(0x3000), None, true, None);
        assert_eq!(syn.queued(0), 1, "masked");
        syn.set_vp(&mem, 0, Some(0x3000), None, false, None);
        assert_eq!(syn.queued(0), 0);
        assert!(!syn.set_vp(&mem, 2, None, None, false, None), "no VP 2");
        syn.post(&mem, 9, b"dropped");
        assert_eq!(syn.dropped_messages(), 1);
    }

    #[test]
    fn a_guest_that_never_eoms_queues_a_bounded_number() {
        let mem = memory();
        let syn = Synic::with_queue_limit(1, 8);
        assert!(syn.set_vp(&mem, 0, Some(0x1000), None, false, None));
        for i in 0..1000u32 {
            syn.post(&mem, 0, &i.to_le_bytes());
        }
        // One in the slot, eight queued, the rest dropped (oldest first).
        assert_eq!(syn.queued(0), 8);
        assert_eq!(syn.dropped_messages(), 1000 - 1 - 8);
    }

    #[test]
    fn a_saturated_irqfd_drops_interrupts_without_blocking() {
        let mem = memory();
        let syn = Synic::new(1);
        // A blocking eventfd one below its maximum count: a blocking write of 1 would hang.
        let fd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        rustix::io::write(&fd, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).unwrap();
        let irq = Event::from_untrusted_fd(fd).unwrap();
        assert!(syn.set_vp(&mem, 0, Some(0x1000), Some(0x2000), false, Some(irq)));
        syn.post(&mem, 0, b"hello");
        assert!(syn.signal_channel(&mem, 0, 3));
        assert_eq!(syn.dropped_interrupts(), 2);
    }

    #[test]
    fn an_irqfd_its_peer_makes_blocking_and_saturates_stalls_a_signal_once() {
        let mem = memory();
        let syn = Synic::new(1);
        let fd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        let peer = fd.try_clone().unwrap();
        let irq = Event::from_untrusted_fd(fd).unwrap();
        assert!(syn.set_vp(&mem, 0, Some(0x1000), Some(0x2000), false, Some(irq)));
        // After the handshake the front end clears O_NONBLOCK on the description it shares
        // and saturates the counter: the next interrupt's write blocks, and is interrupted.
        rustix::fs::fcntl_setfl(&peer, rustix::fs::OFlags::empty()).unwrap();
        rustix::io::write(&peer, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).unwrap();
        assert!(syn.signal_channel(&mem, 0, 3));
        syn.post(&mem, 0, b"hello");
        for relid in 0..100 {
            assert!(syn.signal_channel(&mem, 0, relid));
        }
        assert_eq!(syn.dropped_interrupts(), 102);
        assert_eq!(syn.queued(0), 0, "the message was delivered");
    }

    #[test]
    fn log_limit_lets_a_burst_through_then_counts() {
        let mut l = LogLimit::new(2, Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        let mut l = LogLimit::new(1, Duration::ZERO);
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0), "a new window");
    }

    #[test]
    fn channel_interrupts_set_the_relid_bit() {
        let (mem, syn, irq) = setup();
        assert!(syn.signal_channel(&mem, 1, 37));
        assert_eq!(irq.wait_timeout(0).unwrap(), 1);
        let w = mem
            .atomic_u32(0x2000 + SINT_OFFSET + 4)
            .unwrap()
            .load(Ordering::Acquire);
        assert_eq!(w, 1 << 5);
        assert!(!syn.signal_channel(&mem, 0, 1), "VP 0 has no event page");
        assert!(!syn.signal_channel(&mem, 1, 5000));
    }
}
