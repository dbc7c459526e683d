//! A verified packet exchange over a ring pair, under the real signalling rules: the engine of
//! the ring demo and of the cross-process test.
//!
//! Each side sends a stream of packets of mixed types (in-band, completion, GPA direct, transfer
//! pages) and sizes. Packet `n` of a stream is derived from `(seed, n)`: the receiver re-derives
//! its type, ranges and length, and checks the payload's checksum, which the sender stored in
//! the payload's first bytes. Each side runs one loop, as a VMBus channel's queue thread does:
//! write what fits and commit the batch; mask, drain and commit; when there is nothing to do,
//! poll briefly, then prepare to sleep (unmask and re-check; set the pending send size and
//! re-check) and wait on its event. A wait that times out while work was waiting is a lost
//! wakeup and is counted.

use std::time::{Duration, Instant};

use vmbus_proto::ring::{PacketType, TransferPageRange};

use crate::packet::{gpa_direct_header, transfer_page_header, OutgoingPacket, PacketKind};
use crate::{Error, Event, IncomingRing, OutgoingRing, Packet};

/// Parameters of one side's run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Packets each side sends (and so receives).
    pub packets: u64,
    /// This side's stream seed; the peer uses [`Config::peer_seed`].
    pub seed: u64,
    /// The peer's stream seed.
    pub peer_seed: u64,
    /// Largest payload.
    pub max_payload: usize,
    /// Packets written per commit at most.
    pub batch: u32,
    /// Polling iterations before sleeping.
    pub spin: u32,
    /// Give up after this long without progress (the peer died).
    pub stall_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            packets: 1_000_000,
            seed: 1,
            peer_seed: 2,
            max_payload: 4096,
            batch: 64,
            spin: 2000,
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// What one side did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets sent.
    pub sent: u64,
    /// Packets received and verified.
    pub received: u64,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Signals sent to the peer.
    pub signals: u64,
    /// Times this side slept on its event.
    pub sleeps: u64,
    /// Sleeps that timed out while work was waiting: lost wakeups. Must be 0.
    pub lost_wakeups: u64,
}

/// A failure of the exchange.
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    /// The ring reported an error.
    #[error("ring error")]
    Ring(#[from] Error),
    /// A packet arrived that is not the one expected.
    #[error("packet {seq} is corrupt: {what}")]
    Corrupt {
        /// The expected sequence number.
        seq: u64,
        /// What differed.
        what: String,
    },
    /// Nothing moved for the stall timeout.
    #[error("no progress for {0:?}: the peer is gone or a wakeup was lost")]
    Stalled(Duration),
}

/// The deterministic description of packet `seq` of the stream `seed`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    kind: u8,
    payload_len: usize,
    ranges: Vec<(u32, u32, Vec<u64>)>,
    set_id: u16,
    xfer: Vec<TransferPageRange>,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Size of the sequence number and checksum at the start of every payload.
const STAMP: usize = 16;

fn shape(seed: u64, seq: u64, max_payload: usize) -> Shape {
    let mut r = splitmix(seed ^ seq.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let mut next = || {
        r = splitmix(r);
        r
    };
    let pick = next() % 100;
    let payload_len = match next() % 100 {
        0..=49 => STAMP + (next() % 48) as usize,
        50..=84 => STAMP + (next() % 496) as usize,
        _ => STAMP + (next() as usize % (max_payload - STAMP + 1)),
    }
    .min(max_payload);
    let mut s = Shape {
        kind: 0,
        payload_len,
        ranges: vec![],
        set_id: 0,
        xfer: vec![],
    };
    match pick {
        0..=49 => s.kind = 0,
        50..=59 => s.kind = 1,
        60..=79 => {
            s.kind = 2;
            for _ in 0..=(next() % 3) {
                let byte_offset = (next() % 4096) as u32;
                let byte_count = (next() % 20000) as u32;
                let pages = crate::packet::gpa_page_count(byte_offset, byte_count);
                s.ranges.push((
                    byte_offset,
                    byte_count,
                    (0..pages).map(|_| next() >> 12).collect(),
                ));
            }
        }
        _ => {
            s.kind = 3;
            s.set_id = next() as u16;
            for _ in 0..=(next() % 5) {
                s.xfer.push(TransferPageRange {
                    byte_count: next() as u32,
                    byte_offset: next() as u32,
                });
            }
        }
    }
    s
}

fn fill_payload(seed: u64, seq: u64, buf: &mut Vec<u8>, len: usize) {
    buf.clear();
    buf.resize(len, 0);
    let mut r = splitmix(seed.rotate_left(17) ^ seq);
    for chunk in buf[STAMP..].chunks_mut(8) {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        chunk.copy_from_slice(&r.to_le_bytes()[..chunk.len()]);
    }
    let sum = checksum(&buf[STAMP..]);
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    buf[8..16].copy_from_slice(&sum.to_le_bytes());
}

/// A fast 64-bit checksum of `data` (word-wise multiply-rotate).
pub fn checksum(data: &[u8]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3u64 ^ data.len() as u64;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
    }
    h
}

struct Sender {
    payload: Vec<u8>,
    header: Vec<u8>,
}

impl Sender {
    /// Writes packet `seq`; returns the bytes it needs if it does not fit.
    fn write(
        &mut self,
        out: &mut OutgoingRing,
        cfg: &Config,
        seq: u64,
    ) -> Result<Option<u32>, Error> {
        let s = shape(cfg.seed, seq, cfg.max_payload);
        fill_payload(cfg.seed, seq, &mut self.payload, s.payload_len);
        let parts = [&self.payload[..]];
        let p = match s.kind {
            0 => OutgoingPacket::in_band(seq, seq.is_multiple_of(2), &parts),
            1 => OutgoingPacket::completion(seq, &parts),
            2 => {
                let r: Vec<(u32, u32, &[u64])> =
                    s.ranges.iter().map(|(o, c, p)| (*o, *c, &p[..])).collect();
                gpa_direct_header(&mut self.header, &r);
                OutgoingPacket {
                    packet_type: PacketType::DATA_USING_GPA_DIRECT,
                    flags: 1,
                    transaction_id: seq,
                    header: &self.header,
                    payload: &parts,
                }
            }
            _ => {
                transfer_page_header(&mut self.header, s.set_id, &s.xfer);
                OutgoingPacket {
                    packet_type: PacketType::DATA_USING_XFER_PAGES,
                    flags: 0,
                    transaction_id: seq,
                    header: &self.header,
                    payload: &parts,
                }
            }
        };
        match out.write(&p) {
            Ok(()) => Ok(None),
            Err(Error::Full { needed, .. }) => Ok(Some(needed)),
            Err(e) => Err(e),
        }
    }
}

fn verify(p: &Packet<'_>, cfg: &Config, seq: u64) -> Result<usize, TrafficError> {
    let bad = |what: String| TrafficError::Corrupt { seq, what };
    let s = shape(cfg.peer_seed, seq, cfg.max_payload);
    if p.transaction_id != seq {
        return Err(bad(format!("transaction id {}", p.transaction_id)));
    }
    let padded = s.payload_len.next_multiple_of(8);
    if p.payload.len() != padded {
        return Err(bad(format!(
            "payload of {} bytes, expected {padded}",
            p.payload.len()
        )));
    }
    let payload = &p.payload[..s.payload_len];
    let got_seq = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
    let got_sum = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
    if got_seq != seq || got_sum != checksum(&payload[STAMP..]) {
        return Err(bad("payload checksum mismatch".into()));
    }
    match (s.kind, &p.kind) {
        (0, PacketKind::InBand) if p.completion_requested() == seq.is_multiple_of(2) => {}
        (1, PacketKind::Completion) => {}
        (2, PacketKind::GpaDirect(r)) => {
            let got: Vec<(u32, u32, Vec<u64>)> = r
                .iter()
                .map(|g| {
                    (
                        g.byte_offset,
                        g.byte_count,
                        g.pfns.iter().map(|p| p.get()).collect(),
                    )
                })
                .collect();
            if got != s.ranges {
                return Err(bad("GPA ranges differ".into()));
            }
        }
        (3, PacketKind::TransferPages { set_id, ranges }) => {
            if *set_id != s.set_id || *ranges != &s.xfer[..] {
                return Err(bad("transfer-page ranges differ".into()));
            }
        }
        _ => return Err(bad(format!("unexpected kind {:?}", p.kind))),
    }
    Ok(s.payload_len)
}

/// Runs one side of the exchange to completion. `progress` is called about every 100 ms.
pub fn run(
    out: &mut OutgoingRing,
    inc: &mut IncomingRing,
    my_event: &Event,
    peer_event: &Event,
    cfg: &Config,
    mut progress: impl FnMut(&Stats),
) -> Result<Stats, TrafficError> {
    let mut st = Stats::default();
    let mut tx = Sender {
        payload: Vec::new(),
        header: Vec::new(),
    };
    let mut idle_spins = 0u32;
    let mut last_progress = Instant::now();
    let mut last_report = Instant::now();
    let mut tick = 0u32;
    while st.sent < cfg.packets || st.received < cfg.packets {
        let mut moved = false;
        // Send a batch.
        let mut blocked = None;
        let mut n = 0;
        while st.sent < cfg.packets && n < cfg.batch {
            match tx.write(out, cfg, st.sent)? {
                None => {
                    st.bytes_sent += shape(cfg.seed, st.sent, cfg.max_payload).payload_len as u64;
                    st.sent += 1;
                    n += 1;
                    moved = true;
                }
                Some(needed) => {
                    blocked = Some(needed);
                    break;
                }
            }
        }
        if out.commit() {
            peer_event.signal()?;
            st.signals += 1;
        }
        // Drain, masked.
        inc.mask();
        let mut n = 0;
        while n < cfg.batch {
            let Some(p) = inc.read()? else { break };
            st.bytes_received += verify(&p, cfg, st.received)? as u64;
            st.received += 1;
            n += 1;
            moved = true;
        }
        if inc.commit() {
            peer_event.signal()?;
            st.signals += 1;
        }
        tick = tick.wrapping_add(1);
        if tick.is_multiple_of(64) && last_report.elapsed() >= Duration::from_millis(100) {
            progress(&st);
            last_report = Instant::now();
        }
        if moved {
            idle_spins = 0;
            last_progress = Instant::now();
            continue;
        }
        // Nothing moved: poll a little, then sleep.
        if idle_spins < cfg.spin {
            idle_spins += 1;
            std::hint::spin_loop();
            continue;
        }
        let (empty, signal_writer) = inc.prepare_sleep();
        if signal_writer {
            peer_event.signal()?;
            st.signals += 1;
        }
        let need_recv = st.received < cfg.packets;
        let can_send = match blocked {
            Some(needed) => !out.prepare_sleep(needed),
            None => st.sent < cfg.packets,
        };
        if (need_recv && !empty) || can_send {
            out.clear_pending();
            continue;
        }
        st.sleeps += 1;
        let got = my_event.wait_timeout(1000)?;
        out.clear_pending();
        idle_spins = 0;
        if got == 0 {
            // Timed out. Had the peer left work for us, it should have signalled.
            let work = (need_recv && !inc.is_empty()?)
                || blocked
                    .map(|needed| out.fits(needed))
                    .transpose()?
                    .unwrap_or(false);
            // A signal sent just as the wait timed out is late, not lost: give it a moment.
            if work && my_event.wait_timeout(1000)? == 0 {
                st.lost_wakeups += 1;
            } else if last_progress.elapsed() > cfg.stall_timeout {
                return Err(TrafficError::Stalled(cfg.stall_timeout));
            }
        }
    }
    progress(&st);
    Ok(st)
}
