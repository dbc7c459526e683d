//! Property tests of one ring, in one thread.
//!
//! 1. `ring_matches_model`: random sequences of writes (in-band, completion, GPA-direct,
//!    transfer-page and unknown-type packets, payloads of 0 to 3000 bytes in one or two parts),
//!    commits and rollbacks on both sides, reads, masks, and both sides' sleep preparation, on
//!    4 KiB and 8 KiB rings, against a model: a queue of committed-but-unreleased packets. Every
//!    packet read equals the one written, in order; `Full` comes exactly when the packet's ring
//!    length plus trailer is not strictly less than the free bytes the model computes; and each
//!    signal decision (`commit`, `prepare_sleep`) is the one the protocol prescribes. The test
//!    also checks that most cases wrap around the end of the data area.
//! 2. `hostile_ring_never_panics`: a ring whose control page and data area hold arbitrary bytes
//!    (with plausible descriptors and indices planted, since purely random bytes rarely get past
//!    the first check). Reading until `None` or an error never panics, stops within the bytes the
//!    writer index publishes, and every packet's parts lie inside it; a writer on the same ring
//!    never panics and never touches the bytes between the read and write indices.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use ringbuf::packet::{gpa_direct_header, gpa_page_count, transfer_page_header};
use ringbuf::pair::RingPair;
use ringbuf::ring::CONTROL_SIZE;
use ringbuf::signal::{self, Control, Word};
use ringbuf::{Error, IncomingRing, Mapping, OutgoingPacket, OutgoingRing, PacketKind, Ring};
use vmbus_proto::ring::{PacketType, TransferPageRange};

// ---------------------------------------------------------------------------------------------
// 1. The ring against a model.

/// The type-specific part of a packet to write.
#[derive(Debug, Clone)]
enum Kind {
    InBand,
    Completion,
    /// Ranges: byte offset, byte count, page numbers (as many as the range touches).
    Gpa(Vec<(u32, u32, Vec<u64>)>),
    Xfer {
        set_id: u16,
        ranges: Vec<TransferPageRange>,
    },
    /// An unknown packet type with an uninterpreted header.
    Other {
        packet_type: u16,
        header: Vec<u8>,
    },
}

/// A packet to write, and what the reader must see.
#[derive(Debug, Clone)]
struct Pkt {
    kind: Kind,
    flags: u16,
    transaction_id: u64,
    payload: Vec<u8>,
    /// Where the payload is split into two parts.
    split: usize,
}

impl Pkt {
    fn packet_type(&self) -> PacketType {
        match &self.kind {
            Kind::InBand => PacketType::DATA_INBAND,
            Kind::Completion => PacketType::COMP,
            Kind::Gpa(_) => PacketType::DATA_USING_GPA_DIRECT,
            Kind::Xfer { .. } => PacketType::DATA_USING_XFER_PAGES,
            Kind::Other { packet_type, .. } => PacketType(*packet_type),
        }
    }

    fn header(&self) -> Vec<u8> {
        let mut h = Vec::new();
        match &self.kind {
            Kind::InBand | Kind::Completion => {}
            Kind::Gpa(ranges) => {
                let r: Vec<(u32, u32, &[u64])> =
                    ranges.iter().map(|(o, c, p)| (*o, *c, &p[..])).collect();
                gpa_direct_header(&mut h, &r);
            }
            Kind::Xfer { set_id, ranges } => transfer_page_header(&mut h, *set_id, ranges),
            Kind::Other { header, .. } => h.clone_from(header),
        }
        h
    }

    /// Bytes the packet takes in the ring, trailer included, computed from the layout:
    /// descriptor, header, payload padded to 8, trailer.
    fn ring_bytes(&self) -> u32 {
        (16 + self.header().len() + self.payload.len().next_multiple_of(8) + 8) as u32
    }
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    // Content derived from a seed: cheap to generate and to shrink, distinct per packet.
    (0usize..=3000, any::<u8>()).prop_map(|(len, seed)| {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    })
}

fn gpa_range() -> impl Strategy<Value = (u32, u32, Vec<u64>)> {
    (0u32..8192, 0u32..3 * 4096, any::<u64>()).prop_map(|(offset, count, pfn)| {
        let pages = gpa_page_count(offset, count);
        (
            offset,
            count,
            (0..pages as u64).map(|i| pfn.wrapping_add(i)).collect(),
        )
    })
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        3 => Just(Kind::InBand),
        2 => Just(Kind::Completion),
        2 => prop::collection::vec(gpa_range(), 0..4).prop_map(Kind::Gpa),
        2 => (
            any::<u16>(),
            prop::collection::vec(
                (any::<u32>(), any::<u32>()).prop_map(|(byte_count, byte_offset)| {
                    TransferPageRange { byte_count, byte_offset }
                }),
                0..8,
            ),
        )
            .prop_map(|(set_id, ranges)| Kind::Xfer { set_id, ranges }),
        1 => (
            prop::sample::select(vec![1u16, 8, 12, 0xffff]),
            prop::collection::vec(any::<u8>(), 0..4),
        )
            .prop_map(|(packet_type, words)| Kind::Other {
                packet_type,
                header: words.iter().flat_map(|&b| [b; 8]).collect(),
            }),
    ]
}

fn pkt() -> impl Strategy<Value = Pkt> {
    (
        kind(),
        any::<u16>(),
        any::<u64>(),
        payload(),
        any::<usize>(),
    )
        .prop_map(|(kind, flags, transaction_id, payload, split)| Pkt {
            kind,
            flags,
            transaction_id,
            split: split % (payload.len() + 1),
            payload,
        })
}

#[derive(Debug, Clone)]
enum Op {
    Write(Pkt),
    CommitWrite,
    RollbackWrite,
    Read(usize),
    CommitRead,
    RollbackRead,
    /// The reader masks interrupts (starts draining).
    Mask,
    /// The reader prepares to sleep: commits, unmasks, re-checks.
    ReaderSleep,
    /// The writer prepares to sleep waiting for this many bytes.
    WriterSleep(u32),
    ClearPending,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => pkt().prop_map(Op::Write),
        3 => Just(Op::CommitWrite),
        1 => Just(Op::RollbackWrite),
        4 => (1usize..=4).prop_map(Op::Read),
        3 => Just(Op::CommitRead),
        1 => Just(Op::RollbackRead),
        1 => Just(Op::Mask),
        1 => Just(Op::ReaderSleep),
        1 => (0u32..=8192).prop_map(Op::WriterSleep),
        1 => Just(Op::ClearPending),
    ]
}

/// What the ring must hold, computed independently of it.
struct Model {
    data_len: u32,
    /// Packets committed by the writer and not yet released by the reader, with their sizes.
    ring: VecDeque<(Pkt, u32)>,
    /// How many of `ring` the reader has read since its last commit.
    read: usize,
    /// Packets written since the writer's last commit.
    batch: Vec<(Pkt, u32)>,
    masked: bool,
    pending: u32,
    /// Bytes committed by the writer over the whole run.
    committed_total: u64,
}

impl Model {
    fn ring_bytes(&self) -> u32 {
        self.ring.iter().map(|(_, n)| n).sum()
    }

    fn free(&self) -> u32 {
        self.data_len - self.ring_bytes() - self.batch.iter().map(|(_, n)| n).sum::<u32>()
    }

    /// Releases the packets read since the last commit; returns whether the writer must be
    /// signalled (free space as of the writer's published index crosses the pending size).
    fn commit_read(&mut self) -> bool {
        let before = self.data_len - self.ring_bytes();
        let released = self.read;
        self.ring.drain(..released);
        self.read = 0;
        let after = self.data_len - self.ring_bytes();
        released > 0 && self.pending != 0 && before <= self.pending && after > self.pending
    }
}

fn check_packet(p: &ringbuf::Packet<'_>, want: &Pkt) -> Result<(), TestCaseError> {
    prop_assert_eq!(p.packet_type, want.packet_type());
    prop_assert_eq!(p.transaction_id, want.transaction_id);
    prop_assert_eq!(p.flags, want.flags);
    let n = want.payload.len();
    prop_assert_eq!(p.payload.len(), n.next_multiple_of(8));
    prop_assert_eq!(&p.payload[..n], &want.payload[..]);
    prop_assert!(p.payload[n..].iter().all(|&b| b == 0), "padding not zero");
    match (&p.kind, &want.kind) {
        (PacketKind::InBand, Kind::InBand) | (PacketKind::Completion, Kind::Completion) => {}
        (PacketKind::GpaDirect(got), Kind::Gpa(ranges)) => {
            prop_assert_eq!(got.len(), ranges.len());
            let got: Vec<(u32, u32, Vec<u64>)> = got
                .iter()
                .map(|r| {
                    let pfns = r.pfns.iter().map(|x| x.get()).collect();
                    (r.byte_offset, r.byte_count, pfns)
                })
                .collect();
            prop_assert_eq!(&got, ranges);
        }
        (
            PacketKind::TransferPages { set_id, ranges },
            Kind::Xfer {
                set_id: s,
                ranges: r,
            },
        ) => {
            prop_assert_eq!(set_id, s);
            prop_assert_eq!(*ranges, &r[..]);
        }
        (PacketKind::Other { header }, Kind::Other { header: h, .. }) => {
            prop_assert_eq!(*header, &h[..]);
        }
        (got, want) => prop_assert!(false, "kind {:?}, wrote {:?}", got, want),
    }
    Ok(())
}

fn run_ops(data_len: u32, ops: &[Op]) -> Result<bool, TestCaseError> {
    let pair = RingPair::anonymous(data_len as usize).unwrap();
    let (mut out, _) = pair.side_a().unwrap();
    let (_, mut inc) = pair.side_b().unwrap();
    let ring = pair.ring(0).unwrap();
    let mut m = Model {
        data_len,
        ring: VecDeque::new(),
        read: 0,
        batch: Vec::new(),
        masked: false,
        pending: 0,
        committed_total: 0,
    };
    for op in ops {
        match op {
            Op::Write(p) => {
                let header = p.header();
                let (a, b) = p.payload.split_at(p.split);
                let parts: [&[u8]; 2] = [a, b];
                let res = out.write(&OutgoingPacket {
                    packet_type: p.packet_type(),
                    flags: p.flags,
                    transaction_id: p.transaction_id,
                    header: &header,
                    payload: &parts,
                });
                let total = p.ring_bytes();
                let free = m.free();
                match res {
                    Ok(()) => {
                        prop_assert!(total < free, "{} bytes written with {} free", total, free);
                        m.batch.push((p.clone(), total));
                    }
                    Err(Error::Full { needed, writable }) => {
                        prop_assert!(total < data_len);
                        prop_assert!(total >= free, "Full with {} < {} free", total, free);
                        prop_assert_eq!((needed, writable), (total, free));
                    }
                    Err(Error::TooLarge) => prop_assert!(total >= data_len),
                    Err(e) => prop_assert!(false, "write failed: {}", e),
                }
            }
            Op::CommitWrite => {
                let was_empty = m.ring.is_empty();
                let nonempty = !m.batch.is_empty();
                let bytes: u32 = m.batch.iter().map(|(_, n)| n).sum();
                m.committed_total += u64::from(bytes);
                m.ring.extend(m.batch.drain(..));
                prop_assert_eq!(out.commit(), nonempty && was_empty && !m.masked);
            }
            Op::RollbackWrite => {
                out.rollback();
                m.batch.clear();
            }
            Op::Read(n) => {
                for _ in 0..*n {
                    let got = inc.read().map_err(|e| TestCaseError::fail(e.to_string()))?;
                    match (got, m.ring.get(m.read)) {
                        (None, None) => {}
                        (Some(p), Some((want, _))) => {
                            check_packet(&p, want)?;
                            m.read += 1;
                        }
                        (got, want) => {
                            prop_assert!(false, "read {:?}, model has {:?}", got, want)
                        }
                    }
                }
            }
            Op::CommitRead => {
                let signal = m.commit_read();
                prop_assert_eq!(inc.commit(), signal);
            }
            Op::RollbackRead => {
                inc.rollback();
                m.read = 0;
            }
            Op::Mask => {
                inc.mask();
                m.masked = true;
            }
            Op::ReaderSleep => {
                let signal = m.commit_read();
                m.masked = false;
                prop_assert_eq!(inc.prepare_sleep(), (m.ring.is_empty(), signal));
            }
            Op::WriterSleep(needed) => {
                let sleep = m.free() <= *needed;
                m.pending = if sleep { *needed } else { 0 };
                prop_assert_eq!(out.prepare_sleep(*needed), sleep);
            }
            Op::ClearPending => {
                out.clear_pending();
                m.pending = 0;
            }
        }
        // The control page agrees with the model.
        prop_assert_eq!(ring.load(Word::InterruptMask, Relaxed), u32::from(m.masked));
        prop_assert_eq!(ring.load(Word::PendingSendSize, Relaxed), m.pending);
        let used = signal::used_bytes(
            ring.load(Word::WriteIndex, Relaxed),
            ring.load(Word::ReadIndex, Relaxed),
            data_len,
        );
        prop_assert_eq!(used, m.ring_bytes());
    }
    Ok(m.committed_total > u64::from(data_len))
}

#[test]
fn ring_matches_model() {
    let cases = 1024;
    let wrapped = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::with_cases(cases)
    });
    let strategy = (
        prop::sample::select(vec![4096u32, 8192]),
        prop::collection::vec(op(), 1..160),
    );
    runner
        .run(&strategy, |(data_len, ops)| {
            if run_ops(data_len, &ops)? {
                wrapped.fetch_add(1, Relaxed);
            }
            Ok(())
        })
        .unwrap();
    let wrapped = wrapped.load(Relaxed);
    eprintln!("WRAPPED {wrapped}");
    assert!(
        wrapped >= cases as usize / 4,
        "only {wrapped} of {cases} cases wrapped around the data area"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A hostile writer's ring.

/// A packet planted in the data area: its descriptor, the range count of its type header, and
/// the byte its body is filled with. Planted packets follow each other from the read index.
#[derive(Debug, Clone)]
struct Planted {
    packet_type: u16,
    /// `None`: just past the type header the range count implies.
    data_offset8: Option<u16>,
    /// `None`: the data offset plus `payload8`.
    length8: Option<u16>,
    payload8: u16,
    flags: u16,
    range_count: u32,
    fill: u8,
}

impl Planted {
    fn data_offset8(&self) -> u16 {
        self.data_offset8.unwrap_or(match self.packet_type {
            7 | 9 => 3 + self.range_count.min(1000) as u16,
            _ => 2,
        })
    }

    fn length8(&self) -> u16 {
        self.length8
            .unwrap_or(self.data_offset8().saturating_add(self.payload8))
    }
}

#[derive(Debug, Clone)]
struct Hostile {
    data_len: u32,
    /// write_index, read_index, interrupt_mask, pending_send_size, feature_bits.
    words: [u32; 5],
    /// Whether `write_index` is replaced by the end of the planted packets (mostly) or kept.
    write_after_planted: bool,
    planted: Vec<Planted>,
    /// Raw bytes at byte offsets (wrapping), laid over the planted packets.
    patches: Vec<(u32, Vec<u8>)>,
    /// The reader commits after every `commit_every` packets (0: never).
    commit_every: u8,
    /// Payload sizes the writer then tries.
    writes: Vec<u16>,
}

fn index(data_len: u32) -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => (0..data_len / 8).prop_map(|x| x * 8),
        1 => any::<u32>(),
        1 => 0..data_len + 64,
    ]
}

fn planted() -> impl Strategy<Value = Planted> {
    (
        prop::sample::select(vec![6u16, 7, 9, 11, 0, 0xffff]),
        prop_oneof![6 => Just(None), 1 => (0u16..8).prop_map(Some), 1 => any::<u16>().prop_map(Some)],
        prop_oneof![6 => Just(None), 1 => (0u16..1100).prop_map(Some), 1 => any::<u16>().prop_map(Some)],
        0u16..40,
        any::<u16>(),
        prop_oneof![6 => 0u32..8, 1 => any::<u32>()],
        prop_oneof![4 => Just(0u8), 1 => any::<u8>()],
    )
        .prop_map(
            |(packet_type, data_offset8, length8, payload8, flags, range_count, fill)| Planted {
                packet_type,
                data_offset8,
                length8,
                payload8,
                flags,
                range_count,
                fill,
            },
        )
}

fn hostile() -> impl Strategy<Value = Hostile> {
    prop::sample::select(vec![4096u32, 8192])
        .prop_flat_map(|data_len| {
            (
                Just(data_len),
                (
                    index(data_len),
                    index(data_len),
                    prop_oneof![Just(0u32), any::<u32>()],
                    prop_oneof![Just(0u32), 0..data_len + 16, any::<u32>()],
                    prop_oneof![Just(1u32), any::<u32>()],
                )
                    .prop_map(|(w, r, m, p, f)| [w, r, m, p, f]),
                prop::bool::weighted(0.8),
                prop::collection::vec(planted(), 0..12),
                prop::collection::vec(
                    (any::<u32>(), prop::collection::vec(any::<u8>(), 0..64)),
                    0..6,
                ),
                any::<u8>(),
                prop::collection::vec(0u16..5000, 0..8),
            )
        })
        .prop_map(
            |(data_len, words, write_after_planted, planted, patches, commit_every, writes)| {
                Hostile {
                    data_len,
                    words,
                    write_after_planted,
                    planted,
                    patches,
                    commit_every: commit_every % 4,
                    writes,
                }
            },
        )
}

/// Copies `src` into `data` at `at`, wrapping.
fn put(data: &mut [u8], at: u32, src: &[u8]) {
    let n = data.len();
    for (i, &b) in src.iter().enumerate() {
        data[(at as usize + i) % n] = b;
    }
}

fn read_words(ring: &Ring) -> (u32, u32) {
    (
        ring.load(Word::WriteIndex, Relaxed),
        ring.load(Word::ReadIndex, Relaxed),
    )
}

fn valid_index(v: u32, data_len: u32) -> bool {
    v < data_len && v.is_multiple_of(8)
}

fn check_hostile(h: &Hostile) -> Result<(), TestCaseError> {
    let data_len = h.data_len;
    let mut words = h.words;
    let mut data = vec![0u8; data_len as usize];
    // Planted packets, back to back from the read index (taken modulo the data area if invalid).
    let mut at = (words[1] % data_len) & !7;
    let mut planted_len = 0;
    for p in &h.planted {
        let len = (u32::from(p.length8()) * 8).clamp(16, data_len - 8);
        planted_len += len + 8;
        if planted_len >= data_len {
            break;
        }
        let mut bytes = vec![p.fill; len as usize];
        bytes[0..2].copy_from_slice(&p.packet_type.to_le_bytes());
        bytes[2..4].copy_from_slice(&p.data_offset8().to_le_bytes());
        bytes[4..6].copy_from_slice(&p.length8().to_le_bytes());
        bytes[6..8].copy_from_slice(&p.flags.to_le_bytes());
        bytes[8..16].fill(0);
        if len >= 24 {
            bytes[16..20].fill(0);
            bytes[20..24].copy_from_slice(&p.range_count.to_le_bytes());
        }
        put(&mut data, at, &bytes);
        at = (at + len + 8) % data_len;
    }
    if h.write_after_planted {
        words[0] = at;
    }
    for (at, bytes) in &h.patches {
        put(&mut data, *at % data_len, bytes);
    }
    let mem = Arc::new(Mapping::anonymous(CONTROL_SIZE + data_len as usize).unwrap());
    mem.write(CONTROL_SIZE, &data).unwrap();
    let ring = Ring::new(mem.clone(), 0, CONTROL_SIZE + data_len as usize).unwrap();
    for (w, v) in [
        Word::WriteIndex,
        Word::ReadIndex,
        Word::InterruptMask,
        Word::PendingSendSize,
        Word::FeatureBits,
    ]
    .into_iter()
    .zip(words)
    {
        ring.store(w, v, Relaxed);
    }

    // The reader.
    let (write, read) = read_words(&ring);
    if let Ok(mut inc) = IncomingRing::new(ring.clone()) {
        // Each packet takes at least a descriptor and a trailer.
        let published = signal::used_bytes(write, read, data_len);
        let max_packets = published / 24;
        let mut packets = 0;
        let mut since_commit = 0;
        loop {
            prop_assert!(
                packets <= max_packets,
                "more packets than {} published bytes hold",
                published
            );
            match inc.read() {
                Ok(Some(p)) => {
                    packets += 1;
                    let payload = p.payload.len();
                    prop_assert!(payload % 8 == 0 && 16 + payload + 8 <= data_len as usize);
                    let header = match p.kind {
                        PacketKind::InBand | PacketKind::Completion => 0,
                        PacketKind::TransferPages { ranges, .. } => 8 + 8 * ranges.len(),
                        PacketKind::GpaDirect(r) => {
                            let mut n = 8;
                            let mut count = 0;
                            for g in r.iter() {
                                prop_assert_eq!(
                                    g.pfns.len(),
                                    gpa_page_count(g.byte_offset, g.byte_count)
                                );
                                n += 8 + 8 * g.pfns.len();
                                count += 1;
                            }
                            prop_assert_eq!(count, r.len());
                            n
                        }
                        PacketKind::Other { header } => header.len(),
                    };
                    prop_assert!(
                        16 + header + payload + 8 <= published as usize,
                        "packet parts outside the published bytes"
                    );
                    since_commit += 1;
                    if h.commit_every != 0 && since_commit == h.commit_every {
                        inc.commit();
                        since_commit = 0;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        inc.commit();
    } else {
        prop_assert!(!valid_index(read, data_len) || !valid_index(write, data_len));
    }

    // A writer on the same ring: never panics, never writes between the read and write indices.
    let (write, read) = read_words(&ring);
    let mut before = vec![0u8; data_len as usize];
    mem.read(CONTROL_SIZE, &mut before).unwrap();
    if let Ok(mut out) = OutgoingRing::new(ring.clone()) {
        for (i, &n) in h.writes.iter().enumerate() {
            let payload = vec![0xa5u8; n as usize];
            match out.write(&OutgoingPacket::in_band(i as u64, false, &[&payload])) {
                Ok(()) | Err(Error::Full { .. }) | Err(Error::TooLarge) => {}
                Err(e) => prop_assert!(false, "write failed: {}", e),
            }
            if i % 2 == 1 {
                out.commit();
            }
        }
        out.commit();
        let mut after = vec![0u8; data_len as usize];
        mem.read(CONTROL_SIZE, &mut after).unwrap();
        let used = signal::used_bytes(write, read, data_len);
        for k in 0..used {
            let at = ((read + k) % data_len) as usize;
            prop_assert_eq!(
                before[at],
                after[at],
                "unreleased byte {:#x} overwritten",
                at
            );
        }
        let (new_write, _) = read_words(&ring);
        prop_assert!(valid_index(new_write, data_len));
    } else {
        prop_assert!(!valid_index(read, data_len) || !valid_index(write, data_len));
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config { cases: 2048, failure_persistence: None, ..Config::default() })]

    #[test]
    fn hostile_ring_never_panics(h in hostile()) {
        check_hostile(&h)?;
    }
}
