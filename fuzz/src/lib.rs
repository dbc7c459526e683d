//! The fuzz targets' common input library: turns fuzz input into a ring in anonymous shared
//! memory whose control page and data area hold the input's bytes, and drives a reader or a
//! writer over it. The targets in `fuzz_targets/` are thin wrappers over [`read_ring`] and
//! [`write_ring`].
//!
//! Input layout (every part optional: missing bytes read as zero):
//! - byte 0, flags: bit 0 picks the data area size (0: 4 KiB, 1: 8 KiB); bit 1 keeps the index
//!   words raw (otherwise each is reduced to a valid index, `word % data_len & !7`, so that most
//!   inputs get past the index checks and reach the packet parser).
//! - bytes 1..21: `write_index`, `read_index`, `interrupt_mask`, `pending_send_size`,
//!   `feature_bits`, little-endian u32.
//! - the rest: for [`read_ring`], the data area's contents, laid from the read index on
//!   (wrapping), so the first bytes are the first packet; for [`write_ring`], a list of writer
//!   operations.
//!
//! Both drivers check invariants and panic (a crash for the fuzzer) when one fails: a packet
//! whose parts do not fit in the bytes the writer published, more packets read than those bytes
//! can hold, or a writer that overwrites bytes the reader has not released.

pub mod hyperv;
pub use hyperv::hyperv_handlers;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use ringbuf::packet::gpa_page_count;
use ringbuf::ring::CONTROL_SIZE;
use ringbuf::signal::{self, Control, Word};
use ringbuf::{Error, IncomingRing, Mapping, OutgoingPacket, OutgoingRing, PacketKind, Ring};
use vmbus_proto::ring::{PacketType, TransferPageRange};

/// Bytes of the input before the data area or operation list.
pub const HEADER_LEN: usize = 21;

/// Packets read (or operations run) at most per input, whatever it says.
pub const MAX_STEPS: usize = 4096;

/// A ring built from fuzz input, and the input bytes after the control words.
pub struct FuzzRing<'a> {
    /// The shared memory holding the ring.
    pub mem: Arc<Mapping>,
    /// The ring: control page at 0, data area after it.
    pub ring: Ring,
    /// The data area's size.
    pub data_len: u32,
    /// The input after the header.
    pub rest: &'a [u8],
}

fn word(input: &[u8], i: usize) -> u32 {
    let mut b = [0u8; 4];
    for (k, x) in b.iter_mut().enumerate() {
        *x = input.get(1 + 4 * i + k).copied().unwrap_or(0);
    }
    u32::from_le_bytes(b)
}

/// Builds a ring from the input's header (see the crate documentation).
pub fn ring_from_input(input: &[u8]) -> FuzzRing<'_> {
    let flags = input.first().copied().unwrap_or(0);
    let data_len: u32 = if flags & 1 == 0 { 4096 } else { 8192 };
    let raw = flags & 2 != 0;
    let mem = Arc::new(Mapping::anonymous(CONTROL_SIZE + data_len as usize).expect("mmap"));
    let ring = Ring::new(mem.clone(), 0, CONTROL_SIZE + data_len as usize).expect("ring geometry");
    let words = [
        Word::WriteIndex,
        Word::ReadIndex,
        Word::InterruptMask,
        Word::PendingSendSize,
        Word::FeatureBits,
    ];
    for (i, w) in words.into_iter().enumerate() {
        let mut v = word(input, i);
        if !raw && matches!(w, Word::WriteIndex | Word::ReadIndex) {
            v = (v % data_len) & !7;
        }
        ring.store(w, v, Relaxed);
    }
    FuzzRing {
        mem,
        ring,
        data_len,
        rest: input.get(HEADER_LEN..).unwrap_or(&[]),
    }
}

/// Copies `src` into the data area at `at`, wrapping, at most one lap.
fn fill_data(mem: &Mapping, data_len: u32, at: u32, src: &[u8]) {
    let src = &src[..src.len().min(data_len as usize)];
    let at = (at % data_len) as usize;
    let first = src.len().min(data_len as usize - at);
    mem.write(CONTROL_SIZE + at, &src[..first])
        .expect("in bounds");
    mem.write(CONTROL_SIZE, &src[first..]).expect("in bounds");
}

fn valid_index(v: u32, data_len: u32) -> bool {
    v < data_len && v.is_multiple_of(8)
}

/// Reads and commits packets from a ring holding the input until `None` or an error, checking
/// each packet, iterating its ranges, and exercising the reader's signalling calls.
pub fn read_ring(input: &[u8]) {
    let f = ring_from_input(input);
    let write = f.ring.load(Word::WriteIndex, Relaxed);
    let read = f.ring.load(Word::ReadIndex, Relaxed);
    fill_data(&f.mem, f.data_len, read, f.rest);
    let Ok(mut inc) = IncomingRing::new(f.ring.clone()) else {
        assert!(!valid_index(read, f.data_len) || !valid_index(write, f.data_len));
        return;
    };
    // The input's first data byte says how often to commit (0: only at the end).
    let commit_every = f.rest.first().map_or(0, |b| b % 4) as usize;
    let published = signal::used_bytes(write, read, f.data_len) as usize;
    let mut consumed = 0usize;
    inc.mask();
    for step in 0..MAX_STEPS {
        match inc.read() {
            Ok(Some(p)) => {
                consumed += 16 + 8 + packet_parts(&p, f.data_len);
                assert!(
                    consumed <= published,
                    "packets read exceed the {published} published bytes"
                );
                if commit_every != 0 && step % commit_every == 0 {
                    inc.commit();
                }
            }
            Ok(None) | Err(_) => break,
        }
        assert!(
            step < published / 24,
            "more packets than the published bytes hold"
        );
    }
    inc.commit();
    let _ = inc.is_empty();
    let _ = inc.prepare_sleep();
}

/// Checks a packet's parts and returns the bytes they take after the descriptor (at least the
/// validated header and the payload).
fn packet_parts(p: &ringbuf::Packet<'_>, data_len: u32) -> usize {
    let payload = p.payload.len();
    assert!(
        payload.is_multiple_of(8),
        "payload of {payload} bytes is not whole 8-byte units"
    );
    let header = match p.kind {
        PacketKind::InBand | PacketKind::Completion => 0,
        PacketKind::TransferPages { ranges, .. } => {
            let total: u64 = ranges.iter().map(|r| u64::from(r.byte_count)).sum();
            std::hint::black_box(total);
            8 + 8 * ranges.len()
        }
        PacketKind::GpaDirect(ranges) => {
            let mut n = 8;
            let mut count = 0;
            for r in ranges.iter() {
                assert_eq!(r.pfns.len(), gpa_page_count(r.byte_offset, r.byte_count));
                std::hint::black_box(r.pfns.iter().map(|x| x.get()).fold(0, u64::wrapping_add));
                n += 8 + 8 * r.pfns.len();
                count += 1;
            }
            assert_eq!(count, ranges.len());
            n
        }
        PacketKind::Other { header } => header.len(),
    };
    assert!(16 + header + payload + 8 <= data_len as usize);
    header + payload
}

/// Payload bytes for the writer's packets (the largest a descriptor can describe).
static PAYLOAD: [u8; 0xffff] = [0x5a; 0xffff];

/// A cursor over the operation bytes.
struct Ops<'a>(&'a [u8]);

impl Ops<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }
}

/// Runs writer operations from the input on a ring whose control page holds the input's (a
/// hostile reader's) words, which the operations may change between writes. Every call must
/// return, with a value or an error; a write must never touch bytes the reader has not released.
pub fn write_ring(input: &[u8]) {
    let f = ring_from_input(input);
    let data_len = f.data_len;
    let Ok(mut out) = OutgoingRing::new(f.ring.clone()) else {
        return;
    };
    let mut header = Vec::new();
    let mut ops = Ops(f.rest);
    let mut snapshot = vec![0u8; data_len as usize];
    let mut after = vec![0u8; data_len as usize];
    // Once the hostile reader moves its index, the writer may rightly act on the value it read
    // before: the no-overwrite check below then no longer applies.
    let mut read_moved = false;
    for _ in 0..MAX_STEPS {
        let Some(op) = ops.u8() else { break };
        match op % 8 {
            // Write a packet.
            0..=3 => {
                let Some(len) = ops.u16() else { break };
                let kind = ops.u8().unwrap_or(0);
                let count = usize::from(kind >> 3);
                let packet_type = match kind & 7 {
                    0 => PacketType::COMP,
                    1 => {
                        let ranges: Vec<(u32, u32, &[u64])> = (0..count)
                            .map(|i| (i as u32 * 100, 4096, &[1u64, 2][..]))
                            .collect();
                        ringbuf::packet::gpa_direct_header(&mut header, &ranges);
                        PacketType::DATA_USING_GPA_DIRECT
                    }
                    2 => {
                        let ranges = vec![TransferPageRange::default(); count];
                        ringbuf::packet::transfer_page_header(&mut header, 7, &ranges);
                        PacketType::DATA_USING_XFER_PAGES
                    }
                    3 => {
                        // A header that is not whole 8-byte units: must be refused.
                        header.clear();
                        header.resize(count | 1, 0);
                        PacketType(0x42)
                    }
                    _ => PacketType::DATA_INBAND,
                };
                if matches!(kind & 7, 0 | 4..=7) {
                    header.clear();
                }
                let len = usize::from(len);
                let (a, b) = PAYLOAD[..len].split_at(len / 3);
                let parts: [&[u8]; 2] = [a, b];
                let p = OutgoingPacket {
                    packet_type,
                    flags: 0,
                    transaction_id: u64::from(op),
                    header: &header,
                    payload: &parts,
                };
                // The bytes the reader has not released, as of now: from its index to ours.
                let read = f.ring.load(Word::ReadIndex, Relaxed);
                if !read_moved {
                    f.mem.read(CONTROL_SIZE, &mut snapshot).expect("in bounds");
                }
                match out.write(&p) {
                    Ok(())
                    | Err(Error::Full { .. })
                    | Err(Error::TooLarge)
                    | Err(Error::Unaligned)
                    | Err(Error::BadIndex { .. }) => {}
                    Err(e) => panic!("unexpected write error: {e}"),
                }
                if !read_moved && valid_index(read, data_len) {
                    let write = f.ring.load(Word::WriteIndex, Relaxed);
                    if valid_index(write, data_len) {
                        f.mem.read(CONTROL_SIZE, &mut after).expect("in bounds");
                        for k in 0..signal::used_bytes(write, read, data_len) {
                            let at = ((read + k) % data_len) as usize;
                            assert_eq!(
                                snapshot[at], after[at],
                                "unreleased byte {at:#x} overwritten"
                            );
                        }
                    }
                }
            }
            4 => {
                out.commit();
            }
            5 => out.rollback(),
            // The hostile reader changes a word.
            6 => {
                let (Some(w), Some(v)) = (ops.u8(), ops.u32()) else {
                    break;
                };
                let w = match w % 4 {
                    0 => {
                        read_moved = true;
                        Word::ReadIndex
                    }
                    1 => Word::InterruptMask,
                    2 => Word::PendingSendSize,
                    _ => Word::FeatureBits,
                };
                f.ring.store(w, v, Relaxed);
            }
            _ => {
                let Some(n) = ops.u32() else { break };
                if out.prepare_sleep(n) {
                    out.clear_pending();
                }
                let _ = out.fits(n);
            }
        }
    }
    out.commit();
}

/// Feeds the VMBus server (`vsp::server`) a connected guest's worth of hostile channel
/// messages: the input is a list of `(selector byte, length byte, message bytes)` records; the
/// selector's low two bits pick the connection id (1, 4, the channel's, or a random one from
/// the next bytes). A valid InitiateContact and RequestOffers come first so that most inputs
/// reach the stateful parts (GPADLs, opens). Invariants: no panic, every message the server
/// emits fits a SynIC slot (240 bytes), opens only name rings inside guest memory.
pub fn vmbus_server(data: &[u8]) {
    use vmbus_proto::channel::{InitiateContact, MessageHeader, MessageType, VmbusVersion};
    use vsp::server::{OfferSpec, Output, Server, ServerConfig};
    use zerocopy::{FromZeros, IntoBytes};

    thread_local! {
        static MEM: ringbuf::guestmem::GuestMemory = {
            let mut m = ringbuf::guestmem::GuestMemory::new();
            let fd = ringbuf::shmem::create_memfd("fuzz-guest", 1 << 20).expect("memfd");
            m.add_region(0, 1 << 20, fd, 0).expect("region");
            m
        };
    }
    MEM.with(|mem| {
        let config = ServerConfig {
            max_gpadl_bytes: 256 << 10,
            ..ServerConfig::default()
        };
        let mut server = Server::new(config);
        let mut out = Vec::new();
        for i in 0..3u8 {
            let spec = OfferSpec {
                interface_type: vmbus_proto::channel::Guid::SCSI,
                interface_instance: vmbus_proto::channel::Guid([i; 16]),
                subchannel_index: 0,
                mmio_megabytes: 0,
                flags: 0,
                user_defined: [0; 120],
            };
            let _ = server.add_offer(spec, &mut out);
        }
        let mut ic = InitiateContact::new_zeroed();
        ic.header = MessageHeader::new(MessageType::INITIATE_CONTACT);
        ic.vmbus_version_requested = VmbusVersion::IRON.0;
        server.handle_message(mem, 4, ic.as_bytes(), &mut out);
        server.handle_message(
            mem,
            1,
            MessageHeader::new(MessageType::REQUEST_OFFERS).as_bytes(),
            &mut out,
        );
        let mut rest = data;
        let mut steps = 0;
        while rest.len() >= 2 && steps < MAX_STEPS {
            let (sel, len) = (rest[0], usize::from(rest[1]));
            rest = &rest[2..];
            let len = len.min(rest.len());
            let (msg, tail) = rest.split_at(len);
            rest = tail;
            let conn = match sel & 3 {
                0 => 1,
                1 => 4,
                2 => 0x100 + u32::from(sel >> 2),
                _ => u32::from(sel),
            };
            server.handle_message(mem, conn, msg, &mut out);
            for o in out.drain(..) {
                match o {
                    Output::Message { bytes, .. } => {
                        assert!(bytes.len() <= 240, "message of {} bytes", bytes.len())
                    }
                    Output::Open { relid, ring, .. } => {
                        assert!(ring.len() <= 1 << 20, "ring larger than guest memory");
                        let mut more = Vec::new();
                        server.open_complete(relid, sel & 4 == 0, &mut more);
                        assert!(more.iter().all(|m| !matches!(m, Output::Open { .. })));
                    }
                    Output::Close { .. } | Output::Retarget { .. } => {}
                }
            }
            steps += 1;
        }
        server.reset(&mut out);
    });
}

/// Feeds the SCSI emulation (`vsp::scsi`) arbitrary commands: `(data_len: u32, cdb_len: u8,
/// cdb, data_out_len: u8, data_out)` records against a small disk. Invariants: no panic, data-in
/// never longer than the buffer, block I/O inside the capacity and the buffer.
pub fn scsi_commands(data: &[u8]) {
    use vsp::scsi::{Action, DiskInfo, ScsiDisk};
    let info = DiskInfo {
        blocks: 2048,
        block_size: 512,
        readonly: data.first().is_some_and(|b| b & 1 != 0),
        discard: data.first().is_some_and(|b| b & 2 != 0),
        serial: "fuzz".into(),
        naa: 0x123,
        max_transfer_blocks: 256,
        optimal_io_blocks: 0,
        rotational: false,
    };
    let mut disk = ScsiDisk::new(info);
    let mut rest = data.get(1..).unwrap_or_default();
    let mut steps = 0;
    while rest.len() >= 5 && steps < MAX_STEPS {
        let data_len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) % (1 << 20);
        let cdb_len = usize::from(rest[4]).min(rest.len() - 5).min(32);
        let cdb = &rest[5..5 + cdb_len];
        rest = &rest[5 + cdb_len..];
        let out_len =
            usize::from(rest.first().copied().unwrap_or(0)).min(rest.len().saturating_sub(1));
        let data_out = rest.get(1..1 + out_len).unwrap_or_default();
        rest = rest.get(1 + out_len..).unwrap_or_default();
        match disk.execute(0, cdb, data_len, data_out) {
            Action::Done(r) => assert!(r.data.len() <= data_len as usize),
            Action::Read { lba, blocks, .. } | Action::Write { lba, blocks, .. } => {
                assert!(lba + u64::from(blocks) <= 2048);
                assert!(u64::from(blocks) * 512 <= u64::from(data_len));
            }
            Action::Unmap(ranges) => {
                assert!(ranges.iter().all(|r| r.lba + u64::from(r.blocks) <= 2048))
            }
            Action::WriteSame { lba, blocks, .. } => assert!(lba + u64::from(blocks) <= 2048),
            Action::Flush => {}
        }
        steps += 1;
    }
}

/// An in-memory disk for [`nbd_session`], with an event loop when `event` is set (a thread per
/// source, polling it and running the batch hooks, as a storvsc queue thread does).
struct FuzzDisk {
    data: std::sync::Mutex<Vec<u8>>,
    event: bool,
    hooks: Arc<std::sync::Mutex<Vec<vsc::nbd::BatchFlush>>>,
    /// The event-loop threads, joined at the end of the input.
    loops: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// Unregisters a [`FuzzDisk`]'s batch hooks on drop.
struct HooksGuard(Arc<std::sync::Mutex<Vec<vsc::nbd::BatchFlush>>>);

impl Drop for HooksGuard {
    fn drop(&mut self) {
        self.0.lock().unwrap().clear();
    }
}

impl vsc::nbd::BlockDevice for FuzzDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), vsc::nbd::IoError> {
        let d = self.data.lock().unwrap();
        let end = offset as usize + buf.len();
        assert!(
            end <= d.len(),
            "a read beyond the checked size reached the device"
        );
        buf.copy_from_slice(&d[offset as usize..end]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), vsc::nbd::IoError> {
        let mut d = self.data.lock().unwrap();
        let end = offset as usize + data.len();
        assert!(
            end <= d.len(),
            "a write beyond the checked size reached the device"
        );
        d[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), vsc::nbd::IoError> {
        Ok(())
    }
    fn async_limit(&self) -> u32 {
        if self.event {
            1 << 20
        } else {
            0
        }
    }
    fn batch_hook(&self, flush: vsc::nbd::BatchFlush) -> Option<Box<dyn std::any::Any + Send>> {
        if !self.event {
            return None;
        }
        self.hooks.lock().unwrap().push(flush);
        // One connection per disk: its guard unregisters every hook (which hold its socket).
        Some(Box::new(HooksGuard(self.hooks.clone())))
    }
    fn attach_source(
        &self,
        mut source: Box<dyn vsc::queue::QueueSource>,
    ) -> Result<vsc::queue::SourceWaker, Box<dyn vsc::queue::QueueSource>> {
        use vsc::queue::SourcePoll;
        if !self.event {
            return Err(source);
        }
        let hooks = self.hooks.clone();
        let looping = std::thread::spawn(move || loop {
            let state = source.poll();
            let list: Vec<_> = hooks.lock().unwrap().clone();
            for h in list {
                h();
            }
            match state {
                SourcePoll::Done => return,
                SourcePoll::Progress => {}
                _ => std::thread::sleep(std::time::Duration::from_micros(200)),
            }
        });
        self.loops.lock().unwrap().push(looping);
        Ok(Arc::new(|| {}))
    }
    fn supports_trim(&self) -> bool {
        true
    }
    fn trim(&self, _offset: u64, _len: u64) -> Result<(), vsc::nbd::IoError> {
        Ok(())
    }
}

/// The client's bytes for [`nbd_session`]: with `handshake`, a valid fixed-newstyle handshake
/// to export `a` (OPT_GO) comes first; with `records`, the rest is read as request records
/// `(kind u8, flags u8, offset u16, len u16)` (offset and len in 256-byte units, plus 1 byte
/// for an odd kind) made into requests with the right magic, a write's payload taken from the
/// input after its record; otherwise the rest is sent as it is.
fn nbd_client_bytes(rest: &[u8], handshake: bool, records: bool) -> Vec<u8> {
    use vsc::nbd::proto::*;
    let mut out = Vec::new();
    if handshake {
        out.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&OPT_GO.to_be_bytes());
        out.extend_from_slice(&7u32.to_be_bytes()); // name length + name + info count
        out.extend_from_slice(&1u32.to_be_bytes());
        out.push(b'a');
        out.extend_from_slice(&0u16.to_be_bytes());
    }
    if !records {
        out.extend_from_slice(rest);
        return out;
    }
    let mut rest = rest;
    let mut cookie = 0u64;
    while rest.len() >= 6 {
        let kind = u16::from(rest[0] % 8);
        let flags = u16::from(rest[1]);
        let odd = u64::from(rest[0] >> 7);
        let offset = u64::from(u16::from_le_bytes([rest[2], rest[3]])) * 256 + odd;
        let len = u32::from(u16::from_le_bytes([rest[4], rest[5]])) * 256 + odd as u32;
        rest = &rest[6..];
        let req = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        cookie += 1;
        out.extend_from_slice(&req.encode());
        if kind == CMD_WRITE {
            let n = (len as usize).min(rest.len());
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }
    out
}

/// Feeds an NBD server connection (handshake, then transmission) a client's bytes, then
/// shuts the client's sending side. Byte 0: bit 0 picks the event-loop path (the one `vscd`
/// uses) or the threaded one; bits 1 and 2 make the bytes from the rest (see
/// [`nbd_client_bytes`]). Invariants: no panic, the device is only asked for checked ranges,
/// and the server ends the connection.
pub fn nbd_session(data: &[u8]) {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    ignore_sigpipe();
    let threads_before = thread_count();
    let mode = data.first().copied().unwrap_or(0);
    let event = mode & 1 != 0;
    let input = nbd_client_bytes(
        data.get(1..).unwrap_or_default(),
        mode & 2 != 0,
        mode & 4 != 0,
    );
    let disk = Arc::new(FuzzDisk {
        data: std::sync::Mutex::new(vec![0u8; 1 << 20]),
        event,
        hooks: Arc::default(),
        loops: std::sync::Mutex::default(),
    });
    let exports = vec![vsc::nbd::Export {
        name: "a".into(),
        description: String::new(),
        device: disk.clone(),
    }];
    let (mut client, server) = UnixStream::pair().expect("socketpair");
    let limits = vsc::nbd::Limits {
        handshake_timeout: std::time::Duration::from_secs(5),
        reply_timeout: std::time::Duration::from_secs(5),
        workers_per_connection: 2,
        ..vsc::nbd::Limits::default()
    };
    let served = std::thread::spawn(move || {
        let _ = vsc::nbd::serve_stream(&server, &exports, &limits);
    });
    let mut reader = client.try_clone().expect("clone");
    let drained = std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        while matches!(reader.read(&mut b), Ok(n) if n > 0) {}
    });
    // The server may close early: a failed write is fine.
    let _ = client.write_all(&input);
    let _ = client.shutdown(std::net::Shutdown::Write);
    served.join().expect("the connection's thread panicked");
    drop(client);
    drained.join().expect("reader");
    // The event loop ends with its source (done before the connection's thread ends).
    for t in std::mem::take(&mut *disk.loops.lock().unwrap()) {
        t.join().expect("the event loop panicked");
    }
    // A joined scoped thread (the connection's workers) may still be running its thread-local
    // destructors; LeakSanitizer, which checks right after this returns, would report what
    // they are about to free. Wait until the threads are really gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while thread_count() > threads_before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// Threads of this process.
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// A descriptor a hostile front end may attach to a partition message.
fn hostile_fd(sel: u8) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    match sel % 8 {
        1 => ringbuf::shmem::create_memfd("fuzz-mem", 1 << 20).ok(),
        2 => {
            // Right size, but no seal: the daemon must refuse it.
            let fd =
                rustix::fs::memfd_create("fuzz-loose", rustix::fs::MemfdFlags::CLOEXEC).ok()?;
            rustix::fs::ftruncate(&fd, 1 << 20).ok()?;
            Some(fd)
        }
        3 => ringbuf::shmem::create_memfd("fuzz-empty", 0).ok(),
        4 => ringbuf::Event::new()
            .ok()
            .and_then(|e| e.as_fd().try_clone_to_owned().ok()),
        5 => {
            // An eventfd one below its maximum count: a blocking write would hang.
            let e = ringbuf::Event::new().ok()?;
            let fd = e.as_fd().try_clone_to_owned().ok()?;
            let _ = rustix::io::write(&fd, &0xffff_ffff_ffff_fffeu64.to_ne_bytes());
            Some(fd)
        }
        6 => std::fs::File::open("/dev/null").ok().map(Into::into),
        _ => None,
    }
}

/// Fuzz target `partition_session`: a hostile front end's partition-socket messages, with
/// descriptors, to a real session (`vsp::session::Session`, run on its own thread over a
/// socketpair, with channels that open onto discarding devices).
///
/// Input: byte 0 bit 0 asks for a valid prologue (HELLO, a sealed 1 MiB ADD_MEMORY, SET_VP with
/// an eventfd) so most inputs reach the running partition; then records of
/// `(kind selector, fd selector, length, body)`. The kind selector's values 0-5 are HELLO,
/// ADD_MEMORY, SET_VP, POST_MESSAGE (body bytes become the VMBus message, with a valid message
/// type, on connection id 1, 4 or one from the body), EOM, SIGNAL_EVENT; others are taken as a
/// raw kind. The fd selector attaches nothing, a sealed memfd, an unsealed one, an empty one, an
/// eventfd, a saturated eventfd, /dev/null, or two descriptors. Invariants: no panic, and the
/// session ends (its thread is joined) once the front end closes, whatever came before.
pub fn partition_session(data: &[u8]) {
    use std::os::fd::AsFd;
    use vmbus_proto::partition::{self as wire, Kind};
    use vmbus_proto::synic::MESSAGE_PAYLOAD_SIZE;

    ignore_sigpipe();
    let Ok((ours, theirs)) = ringbuf::socket::SeqPacket::pair() else {
        return;
    };
    let Ok(stop) = ringbuf::Event::new() else {
        return;
    };
    let stop = Arc::new(stop);
    let offers: Vec<vsp::server::OfferSpec> = [
        vmbus_proto::channel::Guid::SCSI,
        vmbus_proto::channel::Guid::NETWORK,
    ]
    .into_iter()
    .enumerate()
    .map(|(i, t)| vsp::server::OfferSpec {
        interface_type: t,
        interface_instance: vmbus_proto::channel::Guid([i as u8 + 1; 16]),
        subchannel_index: 0,
        mmio_megabytes: 0,
        flags: 0,
        user_defined: [0; 120],
    })
    .collect();
    let mut config = vsp::session::SessionConfig::default();
    config.limits.reply_timeout = std::time::Duration::from_millis(200);
    let Ok((session, _handle)) = vsp::session::Session::new(
        theirs,
        stop,
        config,
        &offers,
        vsp::session::unimplemented_devices(),
    ) else {
        return;
    };
    let served = std::thread::spawn(move || session.run());

    let send = |kind: Kind, body: &[u8], fds: &[std::os::fd::OwnedFd]| {
        // The header: kind and body length, little-endian u32s.
        let mut bytes = kind.0.to_le_bytes().to_vec();
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(body);
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        // Drain replies as we go, so the session never waits for room.
        let _ = ours.try_send(&bytes, &borrowed);
    };
    if data.first().is_some_and(|b| b & 1 != 0) {
        use zerocopy::IntoBytes;
        let hello = wire::Hello {
            version: wire::VERSION,
            vp_count: 2,
        };
        send(Kind::HELLO, hello.as_bytes(), &[]);
        let add = wire::AddMemory {
            gpa: 0,
            len: 1 << 20,
            fd_offset: 0,
        };
        send(
            Kind::ADD_MEMORY,
            add.as_bytes(),
            &hostile_fd(1).into_iter().collect::<Vec<_>>(),
        );
        let vp = wire::SetVp {
            vp: 0,
            flags: wire::vp_flags::SIMP_ENABLED | wire::vp_flags::SIEFP_ENABLED,
            simp_gpa: 0,
            siefp_gpa: 4096,
        };
        send(
            Kind::SET_VP,
            vp.as_bytes(),
            &hostile_fd(4).into_iter().collect::<Vec<_>>(),
        );
    }
    let mut rest = data.get(1..).unwrap_or_default();
    let mut steps = 0;
    while rest.len() >= 3 && steps < 64 {
        steps += 1;
        let (kind_sel, fd_sel, len) = (rest[0], rest[1], usize::from(rest[2]));
        rest = &rest[3..];
        let len = len.min(rest.len());
        let (body, tail) = rest.split_at(len);
        rest = tail;
        let mut fds: Vec<_> = hostile_fd(fd_sel).into_iter().collect();
        if fd_sel % 8 == 7 {
            fds.extend(hostile_fd(1));
            fds.extend(hostile_fd(4));
        }
        let kind = match kind_sel {
            0 => Kind::HELLO,
            1 => Kind::ADD_MEMORY,
            2 => Kind::SET_VP,
            3 => {
                use zerocopy::IntoBytes;
                let payload = body.get(1..).unwrap_or_default();
                let payload = &payload[..payload.len().min(MESSAGE_PAYLOAD_SIZE)];
                let connection_id = match body.first().copied().unwrap_or(0) % 3 {
                    0 => 1,
                    1 => 4,
                    _ => u32::from(body.first().copied().unwrap_or(0)),
                };
                let m = wire::PostMessage::vmbus(u32::from(fd_sel >> 6), connection_id, payload)
                    .expect("the payload was cut to a slot's size");
                send(Kind::POST_MESSAGE, m.as_bytes(), &fds);
                continue;
            }
            4 => Kind::EOM,
            5 => Kind::SIGNAL_EVENT,
            k => Kind(u32::from(k)),
        };
        send(kind, body, &fds);
        // Take whatever the session answered, so its replies never wait for room.
        let mut buf = [0u8; wire::MAX_MESSAGE_SIZE];
        while let Ok(true) = rustix::event::poll(
            &mut [rustix::event::PollFd::new(
                &ours,
                rustix::event::PollFlags::IN,
            )],
            Some(&rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            }),
        )
        .map(|n| n > 0)
        {
            if !matches!(ours.recv(&mut buf), Ok(Some(_))) {
                break;
            }
        }
    }
    drop(ours);
    served.join().expect("the session's thread panicked");
}

/// A write to a closed socket must fail with EPIPE, not kill the process (a Rust main ignores
/// SIGPIPE; libFuzzer's C main does not): any handler replaces the default action.
fn ignore_sigpipe() {
    static SIGPIPE: std::sync::Once = std::sync::Once::new();
    SIGPIPE.call_once(|| {
        signal_hook::flag::register(
            signal_hook::consts::SIGPIPE,
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        )
        .expect("SIGPIPE handler");
    });
}

/// Guest memory of the [`storvsp_packets`] target: 1 MiB at guest-physical 0 (256 pages).
const STORVSP_MEMORY: u64 = 1 << 20;

/// The disk the [`storvsp_packets`] target serves: a 1 MiB file opened once per process (its
/// name removed at once; the descriptor keeps it).
fn storvsp_disk() -> Arc<vsp::disk::DiskFile> {
    static DISK: std::sync::OnceLock<Arc<vsp::disk::DiskFile>> = std::sync::OnceLock::new();
    DISK.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("vmbus-fuzz-storvsp-{}.img", std::process::id()));
        std::fs::File::create(&path)
            .expect("image")
            .set_len(1 << 20)
            .expect("size");
        let disk = vsp::disk::DiskFile::open(&path, false, false).expect("open the image");
        let _ = std::fs::remove_file(&path);
        disk
    })
    .clone()
}

/// Drives a storvsp channel (`vsp::storvsp::Storvsp`, through `Device::handle` and `poll`, with
/// its io_uring on a real file and 1 MiB of real guest memory) with hostile packets. Byte 0:
/// bit 0 starts it as a subchannel (serving SRBs at once; otherwise the handshake comes first).
/// Then records, each: `kind: u8` (bit 0: GPA-direct, else in-band; bit 1: the payload is an
/// EXECUTE_SRB whose SRB is the record's bytes, else the bytes are the whole VSTOR packet),
/// `len: u8`, `len` payload bytes, and for GPA-direct `ranges: u8` (at most 4) ranges of
/// `offset: u16, count: u32, pages: u8` (at most 8) and the pages, each a selector byte
/// (below 0xF0: that page of guest memory; else a raw little-endian u64 follows, so that
/// numbers at the top of the address space come easily). Invariants: no panic (overflow
/// checks are on), the device settles (its I/O completes), and every answer names a
/// transaction that was sent.
pub fn storvsp_packets(data: &[u8]) {
    use vmbus_proto::storvsp::{VstorOperation, VstorPacket, REQUEST_COMPLETION_FLAG};
    use zerocopy::IntoBytes;
    let flags = data.first().copied().unwrap_or(0);
    let mut h = vsp::storvsp::harness::Harness::new(storvsp_disk(), STORVSP_MEMORY, flags & 1 != 0)
        .expect("a storvsp channel");
    let mut rest = data.get(1..).unwrap_or_default();
    let mut take = |n: usize| -> Option<&[u8]> {
        let (a, b) = (rest.get(..n)?, rest.get(n..)?);
        rest = b;
        Some(a)
    };
    let mut sent = 0u64;
    for tx in 1..=64u64 {
        let Some(&[kind, len]) = take(2) else { break };
        let Some(body) = take(usize::from(len)) else {
            break;
        };
        let payload = if kind & 2 != 0 {
            let mut p = VstorPacket::new(VstorOperation::EXECUTE_SRB, REQUEST_COMPLETION_FLAG, 0);
            let n = body.len().min(p.body.len());
            p.body[..n].copy_from_slice(&body[..n]);
            p.as_bytes().to_vec()
        } else {
            body.to_vec()
        };
        let mut ranges: Vec<(u32, u32, Vec<u64>)> = Vec::new();
        if kind & 1 != 0 {
            let Some(&[count]) = take(1) else { break };
            for _ in 0..count.min(4) {
                let Some(h) = take(7) else { break };
                let offset = u32::from(u16::from_le_bytes([h[0], h[1]]));
                let byte_count = u32::from_le_bytes([h[2], h[3], h[4], h[5]]);
                let mut pfns = Vec::new();
                for _ in 0..h[6].min(8) {
                    let Some(&[sel]) = take(1) else { break };
                    if sel < 0xF0 {
                        pfns.push(u64::from(sel));
                    } else if let Some(raw) = take(8) {
                        pfns.push(u64::from_le_bytes(raw.try_into().expect("8 bytes")));
                    }
                }
                ranges.push((offset, byte_count, pfns));
            }
        }
        let borrowed: Vec<(u32, u32, &[u64])> =
            ranges.iter().map(|(o, c, p)| (*o, *c, &p[..])).collect();
        let ranges = (kind & 1 != 0).then_some(&borrowed[..]);
        h.send(tx, &payload, ranges).expect("the device failed");
        sent = tx;
    }
    h.settle().expect("the device did not settle");
    assert!(
        h.answers.iter().all(|(tx, _)| (1..=sent).contains(tx)),
        "an answer to no request"
    );
}

/// Fuzz target `storvsc_completions`: what a hostile host answers the guest's storvsc client:
/// completion packets (`vsc::storvsc::completion_outcome`) for a request that expected some
/// bytes back, and the INQUIRY, READ CAPACITY(16) and MODE SENSE answers a disk's geometry is
/// read from (`vsc::storvsc::geometry_from`).
///
/// Input: byte 0 and 1, the bytes the request expected (in 512-byte units); byte 2, 3, 4 the
/// lengths of the INQUIRY, capacity and mode answers; then those answers; the rest is the
/// completion packet. Invariants: no panic; a completion never reports more data than the
/// request expected; a geometry accepted has a power-of-two block size of 512 to 65536 and a
/// size in bytes that fits 64 bits.
pub fn storvsc_completions(data: &[u8]) {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let data_in = u32::from(u16::from_le_bytes([byte(0), byte(1)])) * 512;
    let mut rest = data.get(5..).unwrap_or_default();
    let mut take = |n: u8| {
        let n = usize::from(n).min(rest.len());
        let (a, b) = rest.split_at(n);
        rest = b;
        a
    };
    let (inquiry, capacity, mode) = (take(byte(2)), take(byte(3)), take(byte(4)));
    if let Ok(g) = vsc::storvsc::geometry_from(0, inquiry, capacity, mode) {
        assert!(g.block_size.is_power_of_two() && (512..=65536).contains(&g.block_size));
        assert!(g.blocks.checked_mul(u64::from(g.block_size)).is_some());
        assert_eq!(g.size(), g.blocks * u64::from(g.block_size));
    }
    if let Ok(Ok(n)) = vsc::storvsc::completion_outcome(rest, data_in) {
        assert!(
            n <= data_in as usize,
            "{n} bytes for a request of {data_in}"
        );
    }
}

/// Fuzz target `netvsp`: a netvsp channel (`vsp::netvsp::Netvsp`, through `Device::handle`
/// and `poll`, over real rings and 8 MiB of real guest memory) against a TAP stand-in, fed
/// hostile NVSP messages, RNDIS messages in send sections and GPA-direct pages, completions
/// and host frames.
///
/// Input: byte 0, flags: bit 0 runs Linux 6.1's handshake first (so most inputs reach the
/// data path), bits 1-3 pick its NVSP version. Then records, each `op: u8`, `len: u16`
/// (little-endian), `len` bytes, by `op % 6`: 0, an in-band NVSP message (the bytes);
/// 1, RNDIS messages sent GPA-direct from the bytes; 2, RNDIS messages in send section
/// `bytes[0]` (the rest); 3, a completion whose transaction id is `bytes[0..8]` and whose
/// payload is the rest; 4, a frame from the host: a virtio-net header (`bytes[0..12]`) and the
/// frame; 5, a SEND_RNDIS_PACKET naming section `bytes[0..4]` of size `bytes[4..8]`.
/// Invariants: no panic (overflow checks are on), every completion answers a transaction the
/// guest sent, and no control answers pile up beyond the device's bound.
pub fn netvsp(data: &[u8]) {
    use vsp::netvsp::harness::{guest, Harness, Received, Sent, StandIn};
    use vsp::netvsp::{NetQueue, Nic, NicSettings};
    let flags = data.first().copied().unwrap_or(0);
    let queue = StandIn::default();
    let nic = Nic::with_queues(
        &NicSettings {
            tap: "fuzz".into(),
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            vlan: (flags & 0x10 != 0).then_some(5),
            queues: 2,
        },
        vec![
            Box::new(queue.clone()) as Box<dyn NetQueue>,
            Box::new(StandIn::default()),
        ],
        None,
    );
    let mut h = Harness::new(nic, guest::MEM_BYTES, Some(Arc::new(|_| true))).expect("a channel");
    let mut sent: Vec<u64> = Vec::new();
    if flags & 1 != 0 {
        let versions = vmbus_proto::netvsp::LINUX_6_1_VERSIONS;
        let v = versions[usize::from(flags >> 1 & 7) % versions.len()];
        let hs = guest::handshake(&mut h, v, 1).expect("the device failed");
        assert!(hs.is_some(), "the handshake failed at {v:?}");
        sent.extend(1..=20);
    }
    h.received.clear();
    let mut rest = data.get(1..).unwrap_or_default();
    let mut take = |n: usize| -> Option<&[u8]> {
        let (a, b) = (rest.get(..n)?, rest.get(n..)?);
        rest = b;
        Some(a)
    };
    for tx in 1000..1064u64 {
        let Some(&[op, l0, l1]) = take(3) else { break };
        let Some(body) = take(usize::from(u16::from_le_bytes([l0, l1]))) else {
            break;
        };
        let result = match op % 6 {
            0 => h.send(tx, body, Sent::InBand),
            1 => guest::send_direct(&mut h, tx, body, guest::DATA_GPA),
            2 if !body.is_empty() => guest::send_section(
                &mut h,
                tx,
                u32::from(body[0]),
                vsp::netvsp::SEND_SECTION_SIZE,
                &body[1..body.len().min(vsp::netvsp::SEND_SECTION_SIZE as usize)],
            ),
            3 if body.len() >= 8 => {
                let id = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
                h.send(id, &body[8..], Sent::Completion)
            }
            4 if body.len() >= 12 => {
                let hdr = <netdev_hdr::Hdr as zerocopy::FromBytes>::read_from_bytes(&body[..12])
                    .expect("12 bytes");
                queue.push_to_guest(hdr, body[12..].to_vec());
                h.run().map(|_| true)
            }
            5 if body.len() >= 8 => {
                let m = vsp::netvsp::protocol::send_rndis_message(
                    false,
                    Some((
                        u32::from_le_bytes(body[..4].try_into().expect("4 bytes")),
                        u32::from_le_bytes(body[4..8].try_into().expect("4 bytes")),
                    )),
                );
                h.send(tx, zerocopy::IntoBytes::as_bytes(&m), Sent::InBand)
            }
            _ => Ok(false),
        };
        if result.expect("the device failed") {
            sent.push(tx);
        }
    }
    h.run().expect("the device failed");
    for r in &h.received {
        if let Received::Completion(tx, _) = r {
            assert!(
                sent.contains(tx),
                "a completion of transaction {tx}, never sent"
            );
        }
    }
}

/// The virtio-net header type, named for the fuzz library.
mod netdev_hdr {
    pub use vsp::netvsp::harness::VnetHdr as Hdr;
}
