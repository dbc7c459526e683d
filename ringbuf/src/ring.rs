//! A VMBus ring over a [`Mapping`], split into its writer half ([`OutgoingRing`]) and its reader
//! half ([`IncomingRing`]).
//!
//! A ring is a 4 KiB control page followed by a data area whose size is a non-zero multiple of
//! 4 KiB. Indices are byte offsets into the data area, multiples of 8, below its size. Each half
//! keeps private copies of the indices: the one it owns (published by `commit`) and the last
//! value it read of the peer's (re-read only when the ring looks full or empty, and validated
//! every time it is read). A packet may wrap around the end of the data area; it is copied in
//! two pieces.
//!
//! Cross-core cost: the data area's lines move between the writer's and the reader's cores. The
//! writer asks for ownership of the lines it writes next ahead of its stores
//! ([`Mapping::prefetch_write`]), only inside the space the reader has released, so that it
//! never takes a line the reader may still be copying. The two halves' private state lives on
//! cache lines of their own (each half is 128-byte aligned), the shared indices are read only
//! when the private view says the ring looks full (writer) or empty (reader), and each is
//! published once per batch.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vmbus_proto::ring::{control, PacketDescriptor, PacketType};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::packet::{self, OutgoingPacket, Packet, DESCRIPTOR_SIZE};
use crate::shmem::Mapping;
use crate::signal::{self, Control, Word};
use crate::Error;

/// Size of the control page.
pub const CONTROL_SIZE: usize = control::SIZE;

/// Largest data area of a ring: 2 GiB. Indices stay below it and a packet with its trailer is
/// at most 512 KiB, so index arithmetic (`at + n`) never leaves `u32`.
pub const MAX_DATA_LEN: usize = 1 << 31;

/// The largest payload of [`OutgoingRing::write_small`].
pub const SMALL_PAYLOAD: usize = 256;

/// Bytes the reader copies in its first copy: the descriptor and the start of the body.
const FIRST_COPY: usize = 128;

/// How far ahead of its write position, in bytes, the writer asks for ownership of the lines
/// it will write next ([`Mapping::prefetch_write`]), within the space the reader has released.
///
/// Why: the ring's lines are read by the other core, so the writer's first store into each line
/// needs the line taken back from that core's cache; in a profile of the 64-byte bench (perf,
/// cpu-clock samples) about half of the writer's time sat on the first store of each packet,
/// waiting for that. Asking for the lines ahead overlaps those transfers. 1 KiB (16 lines,
/// about what one core keeps in flight) measured best among 0, 512, 1024 and 2048 in one
/// 8-round comparison under `chrt -f`, but the gain over no prefetch is small next to the
/// noise of this machine (a later 10-round comparison: +2% in the median).
const PREFETCH_AHEAD: u32 = 1024;

/// One ring (control page and data area) inside a mapping.
#[derive(Debug, Clone)]
pub struct Ring {
    mem: Arc<Mapping>,
    /// Offset of the control page in `mem`.
    base: usize,
    /// Size of the data area; a non-zero multiple of 4096 that fits in `mem` after `base`.
    data_len: u32,
}

impl Ring {
    /// A ring at `base` in `mem`, of `total_len` bytes (control page plus data area).
    pub fn new(mem: Arc<Mapping>, base: usize, total_len: usize) -> Result<Self, Error> {
        let data_len = total_len
            .checked_sub(CONTROL_SIZE)
            .ok_or(Error::RingSize(total_len))?;
        if data_len == 0
            || data_len % 4096 != 0
            || data_len > MAX_DATA_LEN
            || !base.is_multiple_of(4096)
            || base
                .checked_add(total_len)
                .is_none_or(|end| end > mem.len())
        {
            return Err(Error::RingSize(total_len));
        }
        Ok(Self {
            mem,
            base,
            data_len: data_len as u32,
        })
    }

    /// Resets the control page: both indices 0, not masked, no pending send, and the
    /// pending-send-size feature advertised. Only the ring's creator does this, before sharing.
    pub fn init(&self) -> Result<(), Error> {
        self.mem.fill(self.base, CONTROL_SIZE, 0)?;
        self.word(Word::FeatureBits)
            .store(control::FEATURE_PENDING_SEND_SIZE, Ordering::Relaxed);
        Ok(())
    }

    /// Size of the data area in bytes.
    pub fn data_len(&self) -> u32 {
        self.data_len
    }

    #[inline]
    fn word(&self, w: Word) -> &std::sync::atomic::AtomicU32 {
        self.mem
            .atomic_u32(self.base + w.offset())
            .expect("control words lie inside the ring, checked in Ring::new")
    }

    /// Reads a peer-owned index and validates it.
    #[inline]
    fn peer_index(&self, w: Word) -> Result<u32, Error> {
        // Acquire: pairs with the peer's release store of this index, so the bytes it covers (or
        // frees) are visible before we touch them.
        let v = self.word(w).load(Ordering::Acquire);
        if v >= self.data_len || !v.is_multiple_of(8) {
            return Err(Error::BadIndex { which: w, value: v });
        }
        Ok(v)
    }

    /// Offset in the mapping of data-area offset `at`.
    #[inline]
    fn data_offset(&self, at: u32) -> usize {
        self.base + CONTROL_SIZE + at as usize
    }

    /// Copies `dst.len()` bytes out of the data area at `at`, wrapping at the end.
    /// `at < data_len` and `dst.len() <= data_len` hold for every caller.
    #[inline]
    fn copy_out(&self, at: u32, dst: &mut [u8]) -> Result<(), Error> {
        let start = self.base + CONTROL_SIZE;
        let first = ((self.data_len - at) as usize).min(dst.len());
        let (a, b) = dst.split_at_mut(first);
        self.mem.read(start + at as usize, a)?;
        if !b.is_empty() {
            self.mem.read(start, b)?;
        }
        Ok(())
    }

    /// Copies `src` into the data area at `at`, wrapping; returns the index after it.
    #[inline]
    fn copy_in(&self, at: u32, src: &[u8]) -> Result<u32, Error> {
        let start = self.base + CONTROL_SIZE;
        let first = ((self.data_len - at) as usize).min(src.len());
        let (a, b) = src.split_at(first);
        self.mem.write(start + at as usize, a)?;
        if !b.is_empty() {
            self.mem.write(start, b)?;
        }
        Ok(self.advance(at, src.len() as u32))
    }

    /// `at + n`, wrapped. Callers guarantee `at < data_len` and `n <= data_len`, so one
    /// conditional subtraction wraps (and the sum cannot overflow: data_len <= 2^31).
    #[inline]
    fn advance(&self, at: u32, n: u32) -> u32 {
        let next = at + n;
        if next >= self.data_len {
            next - self.data_len
        } else {
            next
        }
    }
}

impl Control for Ring {
    #[inline]
    fn load(&self, word: Word, order: Ordering) -> u32 {
        self.word(word).load(order)
    }
    #[inline]
    fn store(&self, word: Word, value: u32, order: Ordering) {
        self.word(word).store(value, order)
    }
    #[inline]
    fn fence(&self) {
        std::sync::atomic::fence(Ordering::SeqCst)
    }
    #[inline]
    fn data_len(&self) -> u32 {
        self.data_len
    }
}

/// The writer's half of a ring. Aligned to 128 bytes (two lines: adjacent-line prefetch pairs
/// them) so that the writer's private state never shares a cache line with the reader's half
/// or with anything else the other core writes.
#[derive(Debug)]
#[repr(align(128))]
pub struct OutgoingRing {
    ring: Ring,
    /// The published write index (we own `write_index`). Range `0..data_len`, multiple of 8.
    committed: u32,
    /// Where the next packet goes; `committed` plus the uncommitted batch.
    write: u32,
    /// The reader's index as last read and validated.
    cached_read: u32,
    /// Bytes past `write` whose lines were already prefetched for writing.
    prefetched: u32,
}

impl OutgoingRing {
    /// The writer's half of `ring`, continuing from the indices in its control page.
    pub fn new(ring: Ring) -> Result<Self, Error> {
        let write = ring.word(Word::WriteIndex).load(Ordering::Relaxed);
        if write >= ring.data_len || !write.is_multiple_of(8) {
            return Err(Error::BadIndex {
                which: Word::WriteIndex,
                value: write,
            });
        }
        let cached_read = ring.peer_index(Word::ReadIndex)?;
        Ok(Self {
            ring,
            committed: write,
            write,
            cached_read,
            prefetched: 0,
        })
    }

    /// The ring.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Bytes a packet may take, counting the uncommitted batch as used, as of the last time the
    /// reader's index was read.
    fn writable(&self) -> u32 {
        signal::writable_bytes(self.write, self.cached_read, self.ring.data_len)
    }

    /// The largest payload an in-band packet can ever carry in this ring.
    pub fn max_payload(&self) -> usize {
        (self.ring.data_len as usize - 8 - DESCRIPTOR_SIZE - packet::TRAILER).min(0xFFFF * 8 - 16)
            & !7
    }

    /// Writes a packet after the uncommitted batch. Nothing is visible to the reader until
    /// [`commit`](Self::commit). Fails with [`Error::Full`] (nothing written) when it does not
    /// fit now.
    #[inline]
    pub fn write(&mut self, p: &OutgoingPacket<'_>) -> Result<(), Error> {
        let len = p.ring_len()?;
        let total = len + packet::TRAILER as u32;
        self.reserve(total)?;
        let start = self.write;
        self.prefetch(total);
        let trailer = (u64::from(start) << 32).to_le_bytes();
        let desc = p.descriptor(len);
        if start + total <= self.ring.data_len {
            // No wrap: straight into the data area, through one bounds check. The descriptor
            // and trailer copies have constant sizes, so they compile to plain moves.
            let mut c = self
                .ring
                .mem
                .cursor(self.ring.data_offset(start), total as usize)?;
            c.put(desc.as_bytes())?;
            if !p.header.is_empty() {
                c.put(p.header)?;
            }
            let mut written = DESCRIPTOR_SIZE + p.header.len();
            for part in p.payload {
                c.put(part)?;
                written += part.len();
            }
            let pad = len as usize - written;
            if pad > 0 {
                c.put(&[0u8; 8][..pad])?;
            }
            c.put(&trailer)?;
            self.write = self.ring.advance(start, total);
            return Ok(());
        }
        let mut at = self.ring.copy_in(start, desc.as_bytes())?;
        if !p.header.is_empty() {
            at = self.ring.copy_in(at, p.header)?;
        }
        let mut written = (DESCRIPTOR_SIZE + p.header.len()) as u32;
        for part in p.payload {
            if !part.is_empty() {
                at = self.ring.copy_in(at, part)?;
                written += part.len() as u32;
            }
        }
        let pad = (len - written) as usize;
        if pad > 0 {
            at = self.ring.copy_in(at, &[0u8; 8][..pad])?;
        }
        self.write = self.ring.copy_in(at, &trailer)?;
        Ok(())
    }

    /// Checks that a packet of `total` bytes (ring length plus trailer) fits after the
    /// uncommitted batch, re-reading the reader's index when the ring looks full.
    #[inline]
    fn reserve(&mut self, total: u32) -> Result<(), Error> {
        if total >= self.ring.data_len {
            return Err(Error::TooLarge);
        }
        if total >= self.writable() {
            self.cached_read = self.ring.peer_index(Word::ReadIndex)?;
            let writable = self.writable();
            if total >= writable {
                return Err(Error::Full {
                    needed: total,
                    writable,
                });
            }
        }
        Ok(())
    }

    /// Writes a packet of `packet_type` with no header and `payload`, a value whose size is
    /// known at compile time (at most [`SMALL_PAYLOAD`] bytes), as [`write`](Self::write)
    /// would (the same bytes, the same errors), but with constant-size copies: no loop over
    /// payload parts and no `memcpy` call. For the answer a device sends per request (a
    /// storvsp completion carries 64 bytes): about a hundred instructions fewer per packet
    /// (`benches/storage-icount.sh`). A packet that would wrap around the end of the data
    /// area takes the general path.
    #[inline]
    pub fn write_small<T: IntoBytes + Immutable>(
        &mut self,
        packet_type: PacketType,
        flags: u16,
        transaction_id: u64,
        payload: &T,
    ) -> Result<(), Error> {
        const { assert!(size_of::<T>() <= SMALL_PAYLOAD) };
        let n = size_of::<T>();
        let len = (DESCRIPTOR_SIZE + n).next_multiple_of(8);
        let total = (len + packet::TRAILER) as u32;
        let packet = OutgoingPacket {
            packet_type,
            flags,
            transaction_id,
            header: &[],
            payload: &[payload.as_bytes()],
        };
        let start = self.write;
        // `start < data_len <= 2^31` and `total` is small: no overflow.
        if start + total > self.ring.data_len {
            return self.write(&packet);
        }
        self.reserve(total)?;
        self.prefetch(total);
        let desc = packet.descriptor(len as u32);
        let trailer = (u64::from(start) << 32).to_le_bytes();
        let mut c = self
            .ring
            .mem
            .cursor(self.ring.data_offset(start), total as usize)?;
        c.put(desc.as_bytes())?;
        c.put(payload.as_bytes())?;
        c.put(&[0u8; 8][..len - DESCRIPTOR_SIZE - n])?;
        c.put(&trailer)?;
        self.write = self.ring.advance(start, total);
        Ok(())
    }

    /// Before writing a packet of `total` bytes at `write`: keeps ownership requested for the
    /// lines up to [`PREFETCH_AHEAD`] bytes past it, inside the space the reader has released
    /// (as of `cached_read`: prefetching a line it may still read would take the line from
    /// under it). Requests go out in bursts, when less than half the distance is left, so that
    /// most packets pay one comparison. A packet larger than the distance is left to the copy
    /// itself (a long `rep movsb` streams its own requests for ownership).
    #[inline]
    fn prefetch(&mut self, total: u32) {
        if total > PREFETCH_AHEAD {
            self.prefetched = 0;
            return;
        }
        if self.prefetched < total + PREFETCH_AHEAD / 2 {
            let want = (total + PREFETCH_AHEAD).min(self.writable() - 1);
            if self.prefetched < want {
                let from = self.ring.advance(self.write, self.prefetched);
                let len = want - self.prefetched;
                let first = len.min(self.ring.data_len - from);
                let mem = &self.ring.mem;
                mem.prefetch_write(self.ring.data_offset(from), first as usize);
                if first < len {
                    mem.prefetch_write(self.ring.data_offset(0), (len - first) as usize);
                }
                self.prefetched = want;
            }
        }
        // `prefetched >= total`: either it was, or it is now `want >= total` (a packet that
        // fits has `total < writable`).
        self.prefetched = self.prefetched.saturating_sub(total);
    }

    /// Whether `bytes` (a packet's ring length plus trailer) would fit now, re-reading the
    /// reader's index if needed.
    pub fn fits(&mut self, bytes: u32) -> Result<bool, Error> {
        if bytes < self.writable() {
            return Ok(true);
        }
        self.cached_read = self.ring.peer_index(Word::ReadIndex)?;
        Ok(bytes < self.writable())
    }

    /// Publishes every packet written since the last commit with one index update. Returns
    /// whether the reader must be signalled.
    #[inline]
    pub fn commit(&mut self) -> bool {
        if self.write == self.committed {
            return false;
        }
        let old = self.committed;
        self.committed = self.write;
        signal::publish_write(&self.ring, old, self.write)
    }

    /// Whether the reader looks asleep: it has unmasked its interrupt and consumed everything
    /// published, so the next [`commit`](Self::commit) will have to signal it. A hint for
    /// batching (a writer whose reader sleeps gains by publishing a larger batch with one
    /// signal rather than streaming small ones that each cost a wakeup), read without a
    /// fence: it may be stale, and [`commit`](Self::commit) still decides the signal.
    #[inline]
    pub fn reader_waiting(&self) -> bool {
        // Relaxed: a hint only (see above); nothing is read on the strength of it.
        self.ring.load(Word::InterruptMask, Ordering::Relaxed) == 0
            && self.ring.load(Word::ReadIndex, Ordering::Relaxed) == self.committed
    }

    /// Drops every packet written since the last commit.
    pub fn rollback(&mut self) {
        self.write = self.committed;
        self.prefetched = 0;
    }

    /// Before sleeping because a packet of `needed` bytes (ring length plus trailer) did not
    /// fit: asks the reader to signal when it does. Returns false if it fits already (no sleep).
    ///
    /// Commit first: the reader only sees, and only frees space against, the published index.
    /// A writer that slept on an uncommitted batch could wait for a signal that never comes.
    pub fn prepare_sleep(&mut self, needed: u32) -> bool {
        signal::prepare_write_sleep(&self.ring, self.write, needed)
    }

    /// After waking from a sleep that [`prepare_sleep`](Self::prepare_sleep) prepared.
    pub fn clear_pending(&mut self) {
        signal::clear_pending(&self.ring)
    }
}

/// The reader's half of a ring; aligned for the same reason as [`OutgoingRing`].
#[derive(Debug)]
#[repr(align(128))]
pub struct IncomingRing {
    ring: Ring,
    /// The published read index (we own `read_index`). Range `0..data_len`, multiple of 8.
    committed: u32,
    /// Where the next packet starts; `committed` plus what was read since.
    read: u32,
    /// The writer's index as last read and validated.
    cached_write: u32,
    /// The local copy of the current packet (u64s, so the copy is 8-byte aligned), at least
    /// [`FIRST_COPY`] bytes long.
    buf: Vec<u64>,
}

impl IncomingRing {
    /// The reader's half of `ring`, continuing from the indices in its control page.
    pub fn new(ring: Ring) -> Result<Self, Error> {
        let read = ring.word(Word::ReadIndex).load(Ordering::Relaxed);
        if read >= ring.data_len || !read.is_multiple_of(8) {
            return Err(Error::BadIndex {
                which: Word::ReadIndex,
                value: read,
            });
        }
        let cached_write = ring.peer_index(Word::WriteIndex)?;
        Ok(Self {
            ring,
            committed: read,
            read,
            cached_write,
            // Never shorter than the first copy; grown as larger packets arrive.
            buf: vec![0; FIRST_COPY / 8],
        })
    }

    /// The ring.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    fn available(&self) -> u32 {
        signal::used_bytes(self.cached_write, self.read, self.ring.data_len)
    }

    /// Reads the next packet into the local copy and returns it, or `None` if the ring is
    /// empty. The packet's space is released to the writer by [`commit`](Self::commit).
    ///
    /// A malformed packet or index is an error; the read position does not move past it.
    #[inline]
    pub fn read(&mut self) -> Result<Option<Packet<'_>>, Error> {
        let mut available = self.available();
        if available == 0 {
            self.cached_write = self.ring.peer_index(Word::WriteIndex)?;
            available = self.available();
            if available == 0 {
                return Ok(None);
            }
        }
        let at = self.read;
        if (available as usize) < DESCRIPTOR_SIZE + packet::TRAILER {
            return Err(Error::BadPacket {
                offset: at,
                reason: "partial packet published",
            });
        }
        // Copy the descriptor together with the start of the body (one copy for a small packet),
        // then validate the descriptor from the private copy.
        let first = (available as usize - packet::TRAILER).min(FIRST_COPY);
        let bytes = self.buf.as_mut_bytes();
        if first == FIRST_COPY && at as usize + FIRST_COPY <= self.ring.data_len as usize {
            // The common case, with a constant size: plain moves rather than a memcpy call.
            let dst: &mut [u8; FIRST_COPY] = (&mut bytes[..FIRST_COPY]).try_into().expect("sized");
            self.ring.mem.read(self.ring.data_offset(at), dst)?;
        } else {
            self.ring.copy_out(at, &mut bytes[..first])?;
        }
        let desc = PacketDescriptor::read_from_prefix(self.buf.as_bytes())
            .expect("16 bytes")
            .0;
        let len = packet::check_descriptor(&desc, available)
            .map_err(|reason| Error::BadPacket { offset: at, reason })? as usize;
        if len > first {
            // Grow the local copy as needed; bounded by the ring size (check_descriptor).
            let words = len / 8;
            if self.buf.len() < words {
                self.buf.resize(words, 0);
            }
            let rest_at = self.ring.advance(at, first as u32);
            self.ring
                .copy_out(rest_at, &mut self.buf.as_mut_bytes()[first..len])?;
        }
        let next = self.ring.advance(at, len as u32 + packet::TRAILER as u32);
        let bytes = &self.buf.as_bytes()[..len];
        let p = packet::parse(&desc, bytes)
            .map_err(|reason| Error::BadPacket { offset: at, reason })?;
        self.read = next;
        Ok(Some(p))
    }

    /// Releases the space of every packet read since the last commit with one index update.
    /// Returns whether the writer, waiting for space, must be signalled.
    #[inline]
    pub fn commit(&mut self) -> bool {
        if self.read == self.committed {
            return false;
        }
        let old = self.committed;
        self.committed = self.read;
        signal::publish_read(&self.ring, old, self.read)
    }

    /// Re-reads the packets read since the last commit (they stay in the ring).
    pub fn rollback(&mut self) {
        self.read = self.committed;
    }

    /// Asks the writer not to signal: call before draining.
    pub fn mask(&mut self) {
        signal::mask(&self.ring)
    }

    /// Before sleeping on an empty ring: commits, unmasks, and re-checks. Returns true when the
    /// ring is still empty (sleep: the writer will signal), false when data arrived meanwhile.
    /// The second value says whether the writer must be signalled (from the commit).
    pub fn prepare_sleep(&mut self) -> (bool, bool) {
        let signal_writer = self.commit();
        (
            signal::prepare_read_sleep(&self.ring, self.read),
            signal_writer,
        )
    }

    /// Whether no packet is waiting, re-reading the writer's index.
    pub fn is_empty(&mut self) -> Result<bool, Error> {
        if self.available() != 0 {
            return Ok(false);
        }
        self.cached_write = self.ring.peer_index(Word::WriteIndex)?;
        Ok(self.available() == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{gpa_direct_header, transfer_page_header, PacketKind};
    use crate::pair::RingPair;
    use vmbus_proto::ring::{PacketType, TransferPageRange};

    fn halves(data_len: usize) -> (OutgoingRing, IncomingRing, Ring) {
        let pair = RingPair::anonymous(data_len).unwrap();
        let (out, _) = pair.side_a().unwrap();
        let (_, inc) = pair.side_b().unwrap();
        (out, inc, pair.ring(0).unwrap())
    }

    #[test]
    fn in_band_round_trip_and_layout() {
        let (mut out, mut inc, ring) = halves(4096);
        out.write(&OutgoingPacket::in_band(7, true, &[b"hello", b" world"]))
            .unwrap();
        assert!(
            inc.read().unwrap().is_none(),
            "nothing visible before commit"
        );
        assert!(
            out.commit(),
            "first packet into an empty, unmasked ring signals"
        );
        // Byte layout as Linux writes it: descriptor, payload padded to 8, trailer.
        let mut raw = [0u8; 48];
        ring.copy_out(0, &mut raw).unwrap();
        assert_eq!(&raw[0..8], &[6, 0, 2, 0, 4, 0, 1, 0]);
        assert_eq!(&raw[8..16], &7u64.to_le_bytes());
        assert_eq!(&raw[16..27], b"hello world");
        assert_eq!(&raw[27..32], &[0; 5]);
        assert_eq!(
            &raw[32..40],
            &0u64.to_le_bytes(),
            "trailer: start offset 0 << 32"
        );
        assert_eq!(ring.load(Word::WriteIndex, Ordering::Relaxed), 40);
        let p = inc.read().unwrap().unwrap();
        assert_eq!(p.packet_type, PacketType::DATA_INBAND);
        assert_eq!(p.transaction_id, 7);
        assert!(p.completion_requested());
        assert_eq!(&p.payload[..11], b"hello world");
        assert_eq!(p.payload.len(), 16);
        assert!(inc.read().unwrap().is_none());
        assert!(!inc.commit(), "no writer waits");
        assert_eq!(ring.load(Word::ReadIndex, Ordering::Relaxed), 40);
    }

    #[test]
    fn completion_gpa_direct_and_transfer_pages() {
        let (mut out, mut inc, _) = halves(8192);
        out.write(&OutgoingPacket::completion(1, &[&[1, 2, 3]]))
            .unwrap();
        let mut h = Vec::new();
        gpa_direct_header(
            &mut h,
            &[(100, 5000, &[10, 11]), (0, 0, &[]), (4095, 1, &[99])],
        );
        out.write(&OutgoingPacket {
            packet_type: PacketType::DATA_USING_GPA_DIRECT,
            flags: 1,
            transaction_id: 2,
            header: &h,
            payload: &[b"srb"],
        })
        .unwrap();
        let mut t = Vec::new();
        let xr = [TransferPageRange {
            byte_count: 60,
            byte_offset: 4096,
        }];
        transfer_page_header(&mut t, 0xcafe, &xr);
        out.write(&OutgoingPacket {
            packet_type: PacketType::DATA_USING_XFER_PAGES,
            flags: 0,
            transaction_id: 3,
            header: &t,
            payload: &[],
        })
        .unwrap();
        out.commit();
        let p = inc.read().unwrap().unwrap();
        assert!(matches!(p.kind, PacketKind::Completion));
        assert_eq!(&p.payload[..3], &[1, 2, 3]);
        let p = inc.read().unwrap().unwrap();
        let PacketKind::GpaDirect(r) = p.kind else {
            panic!("{:?}", p.kind)
        };
        let got: Vec<_> = r
            .iter()
            .map(|g| {
                (
                    g.byte_offset,
                    g.byte_count,
                    g.pfns.iter().map(|x| x.get()).collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (100, 5000, vec![10, 11]),
                (0, 0, vec![]),
                (4095, 1, vec![99])
            ]
        );
        assert_eq!(&p.payload[..3], b"srb");
        let p = inc.read().unwrap().unwrap();
        let PacketKind::TransferPages { set_id, ranges } = p.kind else {
            panic!()
        };
        assert_eq!((set_id, ranges), (0xcafe, &xr[..]));
        assert!(p.payload.is_empty());
    }

    #[test]
    fn write_small_writes_what_write_writes() {
        // The same packets through `write` on one ring and `write_small` on another, read
        // back as they go, across many wraps; then both filled until full: the data areas,
        // the indices and the errors must be identical.
        fn check<T: IntoBytes + Immutable + Copy>(payload: T) {
            let (mut a, mut ra, ring_a) = halves(4096);
            let (mut b, mut rb, ring_b) = halves(4096);
            let area = |r: &Ring| {
                let mut v = vec![0u8; r.data_len() as usize];
                r.copy_out(0, &mut v).unwrap();
                v
            };
            for round in 0..300u64 {
                let kind = if round % 2 == 0 {
                    PacketType::COMP
                } else {
                    PacketType::DATA_INBAND
                };
                let flags = (round % 3 == 0) as u16;
                let general = OutgoingPacket {
                    packet_type: kind,
                    flags,
                    transaction_id: round,
                    header: &[],
                    payload: &[payload.as_bytes()],
                };
                a.write(&general).unwrap();
                b.write_small(kind, flags, round, &payload).unwrap();
                assert_eq!(a.commit(), b.commit());
                let (pa, pb) = (ra.read().unwrap().unwrap(), rb.read().unwrap().unwrap());
                assert_eq!(pa.transaction_id, pb.transaction_id);
                assert_eq!(pa.payload, pb.payload);
                ra.commit();
                rb.commit();
                assert_eq!(area(&ring_a), area(&ring_b), "round {round}");
            }
            loop {
                let ea = a.write(&OutgoingPacket::completion(7, &[payload.as_bytes()]));
                let eb = b.write_small(PacketType::COMP, 0, 7, &payload);
                assert_eq!(format!("{ea:?}"), format!("{eb:?}"));
                if ea.is_err() {
                    break;
                }
            }
            a.commit();
            b.commit();
            assert_eq!(area(&ring_a), area(&ring_b));
            for w in [Word::WriteIndex, Word::ReadIndex] {
                assert_eq!(
                    ring_a.load(w, Ordering::Relaxed),
                    ring_b.load(w, Ordering::Relaxed)
                );
            }
        }
        check([0xA5u8; 64]);
        check([1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        check(0x0102_0304_0506_0708u64);
    }

    #[test]
    fn packets_wrap_around_the_end() {
        let (mut out, mut inc, ring) = halves(4096);
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        for round in 0..50u64 {
            out.write(&OutgoingPacket::in_band(round, false, &[&payload]))
                .unwrap();
            out.commit();
            let p = inc.read().unwrap().unwrap();
            assert_eq!(p.transaction_id, round);
            assert_eq!(&p.payload[..1000], &payload[..]);
            inc.commit();
        }
        // 50 packets of 1024 bytes went through a 4096-byte ring: it wrapped many times.
        assert_eq!(
            ring.load(Word::WriteIndex, Ordering::Relaxed),
            (50 * 1024) % 4096
        );
    }

    #[test]
    fn full_ring_is_reported_and_never_filled_completely() {
        let (mut out, mut inc, _) = halves(4096);
        let p = [0u8; 1000];
        for _ in 0..3 {
            out.write(&OutgoingPacket::in_band(0, false, &[&p]))
                .unwrap();
        }
        // 3 * 1024 used, 1024 left: a 1024-byte packet would fill the ring exactly.
        assert!(matches!(
            out.write(&OutgoingPacket::in_band(0, false, &[&p])),
            Err(Error::Full {
                needed: 1024,
                writable: 1024
            })
        ));
        out.write(&OutgoingPacket::in_band(0, false, &[&p[..992]]))
            .unwrap();
        assert!(matches!(
            out.write(&OutgoingPacket::in_band(0, false, &[&p[..992]])),
            Err(Error::Full { .. })
        ));
        out.commit();
        let mut n = 0;
        while inc.read().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 4);
        assert!(matches!(
            out.write(&OutgoingPacket::in_band(0, false, &[&[0u8; 8192]])),
            Err(Error::TooLarge)
        ));
    }

    #[test]
    fn rollback_discards_the_uncommitted_batch() {
        let (mut out, mut inc, _) = halves(4096);
        out.write(&OutgoingPacket::in_band(1, false, &[b"a"]))
            .unwrap();
        out.commit();
        out.write(&OutgoingPacket::in_band(2, false, &[b"b"]))
            .unwrap();
        out.rollback();
        out.write(&OutgoingPacket::in_band(3, false, &[b"c"]))
            .unwrap();
        out.commit();
        assert_eq!(inc.read().unwrap().unwrap().transaction_id, 1);
        inc.rollback();
        assert_eq!(inc.read().unwrap().unwrap().transaction_id, 1);
        assert_eq!(inc.read().unwrap().unwrap().transaction_id, 3);
        assert!(inc.read().unwrap().is_none());
    }

    #[test]
    fn signalling_rules() {
        let (mut out, mut inc, ring) = halves(4096);
        // Masked reader: no signal.
        inc.mask();
        out.write(&OutgoingPacket::in_band(1, false, &[b"x"]))
            .unwrap();
        assert!(!out.commit());
        // Ring not empty before the batch: no signal even when unmasked.
        let (empty, _) = inc.prepare_sleep();
        assert!(!empty, "data is waiting: do not sleep");
        out.write(&OutgoingPacket::in_band(2, false, &[b"y"]))
            .unwrap();
        assert!(!out.commit());
        while inc.read().unwrap().is_some() {}
        let (empty, signal_writer) = inc.prepare_sleep();
        assert!(empty && !signal_writer);
        out.write(&OutgoingPacket::in_band(3, false, &[b"z"]))
            .unwrap();
        assert!(out.commit(), "empty before the batch and unmasked: signal");
        while inc.read().unwrap().is_some() {}
        inc.commit();
        // Writer waiting for space: the reader signals when free space crosses the pending size.
        let big = [0u8; 1500];
        out.write(&OutgoingPacket::in_band(4, false, &[&big]))
            .unwrap();
        out.write(&OutgoingPacket::in_band(5, false, &[&big]))
            .unwrap();
        out.commit();
        let Err(Error::Full { needed, .. }) =
            out.write(&OutgoingPacket::in_band(6, false, &[&big]))
        else {
            panic!("expected full")
        };
        assert!(out.prepare_sleep(needed), "still full: sleep");
        assert_eq!(ring.load(Word::PendingSendSize, Ordering::Relaxed), needed);
        inc.read().unwrap().unwrap();
        assert!(inc.commit(), "crossing the pending size signals the writer");
        inc.read().unwrap().unwrap();
        assert!(
            !inc.commit(),
            "already above the pending size: no second signal"
        );
        out.clear_pending();
        out.write(&OutgoingPacket::in_band(6, false, &[&big]))
            .unwrap();
    }

    #[test]
    fn corrupt_peer_indices_and_descriptors_are_errors() {
        let (mut out, mut inc, ring) = halves(4096);
        ring.store(Word::WriteIndex, 4096, Ordering::Relaxed);
        assert!(matches!(inc.read(), Err(Error::BadIndex { .. })));
        ring.store(Word::WriteIndex, 12, Ordering::Relaxed);
        assert!(matches!(inc.read(), Err(Error::BadIndex { .. })));
        // A published descriptor claiming more than was published.
        ring.store(Word::WriteIndex, 0, Ordering::Relaxed);
        out.write(&OutgoingPacket::in_band(1, false, &[&[0u8; 64]]))
            .unwrap();
        out.commit();
        ring.mem.write(CONTROL_SIZE + 4, &[0xff, 0xff]).unwrap(); // length8 = 0xffff
        assert!(matches!(inc.read(), Err(Error::BadPacket { .. })));
        ring.mem.write(CONTROL_SIZE + 4, &[1, 0]).unwrap(); // shorter than a descriptor
        assert!(matches!(inc.read(), Err(Error::BadPacket { .. })));
        ring.mem.write(CONTROL_SIZE + 2, &[0xff, 0]).unwrap(); // offset past length
        ring.mem.write(CONTROL_SIZE + 4, &[10, 0]).unwrap();
        assert!(matches!(inc.read(), Err(Error::BadPacket { .. })));
        // The writer finds a corrupt read index when it needs to re-read it.
        ring.store(Word::ReadIndex, 5, Ordering::Relaxed);
        let big = [0u8; 4000];
        assert!(matches!(
            out.write(&OutgoingPacket::in_band(1, false, &[&big])),
            Err(Error::BadIndex { .. })
        ));
    }

    #[test]
    fn ring_geometry_is_checked() {
        let mem = Arc::new(Mapping::anonymous(3 * 4096).unwrap());
        assert!(Ring::new(mem.clone(), 0, 4096).is_err());
        assert!(Ring::new(mem.clone(), 0, 4096 + 100).is_err());
        assert!(Ring::new(mem.clone(), 4096, 3 * 4096).is_err());
        assert!(Ring::new(mem.clone(), 100, 2 * 4096).is_err());
        assert!(Ring::new(mem, 4096, 2 * 4096).is_ok());
    }

    /// A data area of almost 4 GiB (a guest's ring GPADL may be that large if `max_gpadl_bytes`
    /// allows) used to be accepted, and a packet written or read across its end computed
    /// `at + n` past `u32::MAX`: a panic with overflow checks, a wrong index without.
    #[test]
    fn rings_are_small_enough_for_u32_indices() {
        use crate::signal::{Control, Word};
        let total = 4096 + 0xFFFF_F000usize;
        let fd = crate::shmem::create_memfd("big-ring", total as u64).unwrap();
        let mem = Arc::new(Mapping::from_fd(std::os::fd::AsFd::as_fd(&fd), 0, total).unwrap());
        assert!(matches!(
            Ring::new(mem.clone(), 0, total),
            Err(Error::RingSize(_))
        ));
        // The largest ring: a packet across the end of its data area.
        let ring = Ring::new(mem, 0, 4096 + MAX_DATA_LEN).unwrap();
        ring.init().unwrap();
        let end = ring.data_len() - 8;
        ring.store(Word::WriteIndex, end, Ordering::Relaxed);
        ring.store(Word::ReadIndex, end, Ordering::Relaxed);
        let mut out = OutgoingRing::new(ring.clone()).unwrap();
        let mut inc = IncomingRing::new(ring).unwrap();
        let big: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        out.write(&OutgoingPacket::in_band(7, false, &[&big]))
            .unwrap();
        out.commit();
        let p = inc.read().unwrap().unwrap();
        assert_eq!((p.transaction_id, p.payload), (7, &big[..]));
    }
}
