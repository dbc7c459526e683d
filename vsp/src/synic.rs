//! Host-side SynIC delivery: VMBus channel messages into a VP's message page (SIMP) and channel
//! interrupts into its event flags page (SIEFP), each followed by a write to the VP's irqfd.
//!
//! Message slot protocol (Linux `vmbus_on_msg_dpc` / `vmbus_signal_eom`): the host writes the
//! payload and size, then the type last (release); the guest copies the message out, stores type
//! 0, issues a full barrier, and writes the EOM MSR if `message_pending` is set. When the slot is
//! busy, the host sets `message_pending`, issues a full barrier and re-checks the type: either the
//! guest sees the flag (and sends EOM) or the host sees the slot free (and delivers now).

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use std::sync::Mutex;

use ringbuf::guestmem::GuestMemory;
use ringbuf::Event;
use vmbus_proto::synic::{
    MESSAGE_FLAG_PENDING, MESSAGE_PAYLOAD_SIZE, MESSAGE_SLOT_SIZE, VMBUS_POST_MESSAGE_TYPE,
    VMBUS_SINT,
};

/// Messages queued for one VP beyond which the oldest are dropped (the guest is not reading).
pub const MAX_QUEUED_MESSAGES: usize = 1024;

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
#[derive(Debug)]
pub struct Synic {
    vps: Vec<Mutex<Vp>>,
}

/// Offset of the VMBus SINT's slot (or event bitmap) in its page.
const SINT_OFFSET: u64 = VMBUS_SINT as u64 * MESSAGE_SLOT_SIZE as u64;

impl Synic {
    /// A SynIC for `vp_count` VPs, all pages disabled.
    pub fn new(vp_count: u32) -> Self {
        Self {
            vps: (0..vp_count).map(|_| Mutex::new(Vp::default())).collect(),
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
        Self::deliver(mem, &mut v);
        true
    }

    /// Queues a channel message (at most 240 bytes) for `vp` and delivers it if the slot is free.
    /// Messages to a VP that does not exist are dropped.
    pub fn post(&self, mem: &GuestMemory, vp: u32, bytes: &[u8]) {
        debug_assert!(bytes.len() <= MESSAGE_PAYLOAD_SIZE);
        let Some(mut v) = self.vp(vp) else {
            tracing::warn!(vp, "message for a VP that does not exist dropped");
            return;
        };
        if v.queue.len() >= MAX_QUEUED_MESSAGES {
            tracing::warn!(vp, "guest is not reading its messages; dropping the oldest");
            v.queue.pop_front();
        }
        v.queue
            .push_back(bytes[..bytes.len().min(MESSAGE_PAYLOAD_SIZE)].to_vec());
        Self::deliver(mem, &mut v);
    }

    /// The guest wrote EOM on `vp`: deliver the next queued message if the slot is free.
    pub fn eom(&self, mem: &GuestMemory, vp: u32) {
        if let Some(mut v) = self.vp(vp) {
            Self::deliver(mem, &mut v);
        }
    }

    /// Messages waiting for `vp` (for tests and diagnostics).
    pub fn queued(&self, vp: u32) -> usize {
        self.vp(vp).map_or(0, |v| v.queue.len())
    }

    fn deliver(mem: &GuestMemory, v: &mut Vp) {
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
            if let Some(irq) = &v.irqfd {
                let _ = irq.signal();
            }
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
        if let Some(irq) = &v.irqfd {
            let _ = irq.signal();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringbuf::shmem::create_memfd;

    fn setup() -> (GuestMemory, Synic, Event) {
        let mut mem = GuestMemory::new();
        mem.add_region(0, 1 << 20, create_memfd("g", 1 << 20).unwrap(), 0)
            .unwrap();
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
