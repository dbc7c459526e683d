//! storvsp: the host side of VMBus synthetic SCSI, as Linux's hv_storvsc expects it.
//!
//! One [`Storvsp`] serves one controller channel: the initialisation handshake (begin, protocol
//! version WIN8 / WIN8.1 / WIN10, properties, end; in that order), resets, and EXECUTE_SRB. Each
//! packet is parsed once into a typed request and served according to the protocol state. An
//! SRB's CDB goes to the [`ScsiDisk`] emulation (whose unit state the controller's queues
//! share); block I/O goes to the channel's own engine per LUN (an io_uring [`DiskQueue`], behind
//! the [`IoQueue`] trait),
//! zero copy from the GPA-direct ranges of the packet; the answer is a completion packet with
//! the same transaction id carrying the updated SRB (statuses, sense, bytes transferred).
//!
//! Everything in a packet is hostile: a short packet, a bad CDB, a range outside guest memory or
//! a transfer longer than its buffer fails that request alone, with an SRB status or CHECK
//! CONDITION; nothing panics and nothing stops the channel.

use std::collections::VecDeque;
use std::sync::Arc;

use ringbuf::guestmem::GuestMemory;
use ringbuf::latency::{self, Hop};
use ringbuf::packet::{GpaRanges, PacketKind};
use ringbuf::{OutgoingRing, Packet};
use vmbus_proto::ring::PacketType;
use vmbus_proto::storvsp::scsi::{status as scsi_status, SenseData};
use vmbus_proto::storvsp::{
    srb_status, status as vstor_status, ChannelProperties, ProtocolVersion, ScsiRequest,
    StorageVersion, SubchannelCount, VstorOperation, VstorPacket, CDB_SENSE_AREA_SIZE,
    CHANNEL_SUPPORTS_MULTI_CHANNEL, MAX_CDB_LEN,
};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::channel::Device;
use crate::disk::{Completion, DiskFile, DiskQueue, IoOp, IoQueue, Segment};
use crate::scsi::{Action, DiskInfo, Fill, IoKind, LunState, Response, ScsiDisk, UnmapRange};
use crate::Error;

/// Largest transfer the host accepts, reported in QUERY_PROPERTIES and VPD page 0xB0.
pub const MAX_TRANSFER_BYTES: u32 = 2 << 20;

/// Requests in flight per channel.
pub const QUEUE_DEPTH: u32 = 256;

/// Guest pages one SRB's buffer may name at most (the largest transfer, misaligned).
const MAX_BUFFER_PAGES: u64 = (MAX_TRANSFER_BYTES as u64 / 4096) + 1;

/// Protocol state of the channel: the handshake's order (begin, version, properties, end) is
/// enforced; a request out of order is answered INVALID_DEVICE_STATE (an SRB, INVALID_REQUEST)
/// and changes nothing.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Protocol {
    /// Before BEGIN_INITIALIZATION.
    Start,
    /// After BEGIN_INITIALIZATION: the version, once one was accepted.
    Initializing { version: Option<StorageVersion> },
    /// After END_INITIALIZATION (a subchannel starts here): serving SRBs.
    Ready { version: StorageVersion },
}

/// A guest packet, parsed once: what `handle` serves, with nothing left to check twice.
#[derive(Debug, Clone, Copy)]
enum Request<'a> {
    BeginInitialization,
    QueryProtocolVersion(ProtocolVersion),
    QueryProperties,
    EndInitialization,
    CreateSubchannels(u16),
    /// RESET_LUN, RESET_ADAPTER, RESET_BUS.
    Reset,
    ExecuteSrb {
        srb: ScsiRequest,
        /// The data buffer: the packet's GPA-direct ranges, if it has any.
        buffer: Option<GpaRanges<'a>>,
    },
    /// Any other operation (answered INVALID_PARAMETER).
    Unsupported(VstorOperation),
}

/// Why a guest packet is not a request (it is dropped, with a debug line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer bytes than a VSTOR packet header (operation, flags, status).
    #[error("a packet of {0} bytes is shorter than a VSTOR header")]
    TooShort(usize),
    /// A completion (the host sends the guest no requests to complete).
    #[error("an unexpected completion packet")]
    Completion,
}

/// Bytes of a VSTOR packet's header: operation, flags, status.
const VSTOR_HEADER_LEN: usize = 12;

/// Parses a guest packet once (a short payload reads as zeros past its end, as a shorter
/// packet of an older protocol version would).
fn parse_packet<'a>(packet: &Packet<'a>) -> Result<Request<'a>, ParseError> {
    if matches!(packet.kind, PacketKind::Completion) {
        return Err(ParseError::Completion);
    }
    let p = match VstorPacket::read_from_prefix(packet.payload) {
        // A whole packet (every SRB from WIN8 on): one copy of constant size.
        Ok((p, _)) => p,
        Err(_) => {
            let n = packet.payload.len();
            if n < VSTOR_HEADER_LEN {
                return Err(ParseError::TooShort(n));
            }
            let mut p = VstorPacket::new_zeroed();
            p.as_mut_bytes()[..n].copy_from_slice(packet.payload);
            p
        }
    };
    Ok(match p.operation {
        VstorOperation::BEGIN_INITIALIZATION => Request::BeginInitialization,
        VstorOperation::QUERY_PROTOCOL_VERSION => Request::QueryProtocolVersion(p.body()),
        VstorOperation::QUERY_PROPERTIES => Request::QueryProperties,
        VstorOperation::END_INITIALIZATION => Request::EndInitialization,
        VstorOperation::CREATE_SUB_CHANNELS => {
            Request::CreateSubchannels(p.body::<SubchannelCount>().count)
        }
        VstorOperation::RESET_LUN | VstorOperation::RESET_ADAPTER | VstorOperation::RESET_BUS => {
            Request::Reset
        }
        VstorOperation::EXECUTE_SRB => Request::ExecuteSrb {
            srb: p.body(),
            buffer: match packet.kind {
                PacketKind::GpaDirect(ranges) => Some(ranges),
                _ => None,
            },
        },
        other => Request::Unsupported(other),
    })
}

/// One request being served.
#[derive(Debug)]
struct Slot {
    transaction_id: u64,
    srb: ScsiRequest,
    kind: IoKind,
    /// Operations still in flight (UNMAP may issue several).
    remaining: u32,
    /// Bytes the read or write moves; a short transfer is an error.
    expected: u32,
    /// The first error.
    error: Option<i32>,
    /// When its packet was read, and when its I/O was submitted (with the latency breakdown).
    received: Option<std::time::Instant>,
    submitted: Option<std::time::Instant>,
}

/// The storvsp hops of the latency breakdown (`vspd --latency-breakdown`).
pub static HOP_SUBMIT: Hop = Hop::new("vspd storvsp: SRB read -> I/O submitted");
/// See [`HOP_SUBMIT`].
pub static HOP_IO: Hop = Hop::new("vspd storvsp: I/O submitted -> completion reaped");
/// See [`HOP_SUBMIT`].
pub static HOP_ANSWER: Hop = Hop::new("vspd storvsp: completion reaped -> answer in the ring");

/// One disk on a controller: its LUN, path (for its identity), open file, and the unit state
/// that every channel (queue) of the controller serving it shares.
#[derive(Debug, Clone)]
pub struct LunSpec {
    /// The LUN (target 0).
    pub lun: u8,
    /// The image's path.
    pub path: std::path::PathBuf,
    /// The open disk.
    pub file: Arc<DiskFile>,
    /// Write cache and write protection, shared by the primary channel and its subchannels.
    pub state: Arc<LunState>,
}

/// Makes the I/O engine of a LUN for [`Storvsp::with_engine`].
pub type MakeEngine<'a> = dyn FnMut(&LunSpec) -> Result<Box<dyn IoQueue>, Error> + 'a;

/// A logical unit being served: its SCSI state and its io_uring.
struct Lun {
    scsi: ScsiDisk,
    queue: Box<dyn IoQueue>,
    block_size: u32,
    /// Operations queued since the last submit.
    unsubmitted: bool,
}

/// A storvsp controller channel: disks as LUNs of target 0.
pub struct Storvsp {
    mem: Arc<GuestMemory>,
    /// Indexed by LUN.
    luns: Vec<Option<Lun>>,
    /// The LUNs present, for REPORT LUNS.
    lun_ids: Vec<u8>,
    /// Readable when any LUN's io_uring has completions (an epoll set of their eventfds).
    wake: std::os::fd::OwnedFd,
    protocol: Protocol,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Answers that did not fit in the ring yet.
    answers: VecDeque<(u64, VstorPacket)>,
    /// Ring bytes the first waiting answer needs.
    stalled: Option<u32>,
    /// Scratch for the completions of one `poll` (reused, never shrunk).
    completions: Vec<Completion>,
    /// Scratch for the buffer segments of the SRB being executed (reused, never shrunk): the
    /// disk queue copies them into its own iovecs, so nothing is allocated per request.
    segments: Vec<Segment>,
    /// Queues the controller may have (primary channel plus subchannels).
    queues: u16,
    /// Asks the session to offer subchannels (primary channel only).
    request_subchannels: Option<crate::session::SubchannelRequest>,
    /// The disks this channel was opened with, shared with the other channels of its
    /// controller (held so that subchannels find the same ones while any channel lives).
    _disks: Arc<[LunSpec]>,
}

impl std::fmt::Debug for Storvsp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storvsp")
            .field("protocol", &self.protocol)
            .field("luns", &self.lun_ids)
            .finish()
    }
}

/// A stable 60-bit identifier for a disk path (its VPD NAA designator and serial).
fn disk_id(path: &std::path::Path) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    h & ((1 << 60) - 1)
}

impl Storvsp {
    /// A controller channel serving `luns`, with buffers in `mem`. The primary channel
    /// (`subchannel` false) goes through the initialisation handshake and may create up to
    /// `queues - 1` subchannels through `request_subchannels`; a subchannel serves SRBs at once.
    pub fn new(
        luns: Arc<[LunSpec]>,
        mem: Arc<GuestMemory>,
        queues: u16,
        subchannel: bool,
        request_subchannels: Option<crate::session::SubchannelRequest>,
    ) -> Result<Self, Error> {
        let engine_mem = mem.clone();
        let mut io_uring = |l: &LunSpec| -> Result<Box<dyn IoQueue>, Error> {
            let q = DiskQueue::new(l.file.clone(), engine_mem.clone(), QUEUE_DEPTH)?;
            Ok(Box::new(q))
        };
        Self::with_engine(
            luns,
            mem,
            queues,
            subchannel,
            request_subchannels,
            &mut io_uring,
        )
    }

    /// As [`Storvsp::new`], with each LUN's I/O engine made by `engine` (of [`QUEUE_DEPTH`]
    /// requests at least) rather than an io_uring [`DiskQueue`].
    pub fn with_engine(
        luns: Arc<[LunSpec]>,
        mem: Arc<GuestMemory>,
        queues: u16,
        subchannel: bool,
        request_subchannels: Option<crate::session::SubchannelRequest>,
        engine: &mut MakeEngine<'_>,
    ) -> Result<Self, Error> {
        use rustix::event::epoll;
        let wake = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(Error::Socket)?;
        let mut table: Vec<Option<Lun>> = (0..crate::config::MAX_LUNS).map(|_| None).collect();
        let mut lun_ids = Vec::new();
        for l in luns.iter() {
            let disk = &l.file;
            let block_size = disk.block_size();
            let id = disk_id(&l.path);
            let info = DiskInfo {
                blocks: disk.size() / u64::from(block_size),
                block_size,
                readonly: disk.readonly(),
                discard: disk.supports_discard(),
                serial: format!("{id:015x}"),
                naa: id,
                max_transfer_blocks: MAX_TRANSFER_BYTES / block_size,
                optimal_io_blocks: 0,
                rotational: false,
            };
            let queue = engine(l)?;
            epoll::add(
                &wake,
                queue.completion_event(),
                epoll::EventData::new_u64(u64::from(l.lun)),
                epoll::EventFlags::IN,
            )
            .map_err(Error::Socket)?;
            let slot = table
                .get_mut(usize::from(l.lun))
                .ok_or(Error::Config(format!("LUN {} out of range", l.lun)))?;
            *slot = Some(Lun {
                scsi: ScsiDisk::with_state(info, l.state.clone()),
                queue,
                block_size,
                unsubmitted: false,
            });
            lun_ids.push(l.lun);
        }
        lun_ids.sort_unstable();
        Ok(Self {
            mem,
            luns: table,
            lun_ids,
            wake,
            // A subchannel serves at once; the version is its primary's (it changes nothing
            // here: from WIN8 on every SRB has the same size).
            protocol: if subchannel {
                Protocol::Ready {
                    version: StorageVersion::WIN8,
                }
            } else {
                Protocol::Start
            },
            slots: (0..QUEUE_DEPTH).map(|_| None).collect(),
            free: (0..QUEUE_DEPTH as usize).rev().collect(),
            answers: VecDeque::new(),
            stalled: None,
            completions: Vec::with_capacity(QUEUE_DEPTH as usize),
            segments: Vec::with_capacity(MAX_BUFFER_PAGES as usize),
            queues: queues.max(1),
            request_subchannels: if subchannel {
                None
            } else {
                request_subchannels
            },
            _disks: luns,
        })
    }

    /// Sends (or queues, when the ring is full) a completion packet.
    #[inline]
    fn answer(
        &mut self,
        out: &mut OutgoingRing,
        transaction_id: u64,
        p: VstorPacket,
    ) -> Result<(), Error> {
        if self.answers.is_empty() {
            match out.write_small(PacketType::COMP, 0, transaction_id, &p) {
                Ok(()) => return Ok(()),
                Err(ringbuf::Error::Full { needed, .. }) => self.stalled = Some(needed),
                Err(e) => return Err(e.into()),
            }
        }
        self.answers.push_back((transaction_id, p));
        Ok(())
    }

    fn flush_answers(&mut self, out: &mut OutgoingRing) -> Result<bool, Error> {
        let mut moved = false;
        while let Some((tx, p)) = self.answers.front() {
            match out.write_small(PacketType::COMP, 0, *tx, p) {
                Ok(()) => {
                    self.answers.pop_front();
                    moved = true;
                }
                Err(ringbuf::Error::Full { needed, .. }) => {
                    self.stalled = Some(needed);
                    return Ok(moved);
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.stalled = None;
        Ok(moved)
    }

    /// Serves one request: the handshake and control operations here, in the order the
    /// protocol state allows; SRBs by [`Storvsp::execute`].
    fn serve(&mut self, out: &mut OutgoingRing, tx: u64, req: Request<'_>) -> Result<(), Error> {
        let mut reply = VstorPacket::new(VstorOperation::COMPLETE_IO, 0, vstor_status::SUCCESS);
        let state = self.protocol;
        let out_of_order = || {
            tracing::debug!(?req, ?state, "storvsc request out of order");
            vstor_status::INVALID_DEVICE_STATE
        };
        match (req, state) {
            (Request::ExecuteSrb { srb, buffer }, Protocol::Ready { .. }) => {
                return self.execute(out, tx, srb, buffer.as_ref());
            }
            (Request::ExecuteSrb { mut srb, .. }, _) => {
                tracing::debug!(?state, "SRB before the end of initialisation");
                srb.srb_status = srb_status::INVALID_REQUEST;
                srb.scsi_status = 0;
                srb.data_transfer_length = 0;
                return self.complete(out, tx, srb);
            }
            // A guest may begin again before it ends (a retry); not once it is serving.
            (Request::BeginInitialization, Protocol::Start | Protocol::Initializing { .. }) => {
                self.protocol = Protocol::Initializing { version: None };
            }
            (Request::QueryProtocolVersion(v), Protocol::Initializing { .. }) => {
                match v.major_minor {
                    StorageVersion::WIN8 | StorageVersion::WIN8_1 | StorageVersion::WIN10 => {
                        self.protocol = Protocol::Initializing {
                            version: Some(v.major_minor),
                        };
                        reply.set_body(&v);
                    }
                    other => {
                        tracing::debug!(version = ?other, "storage protocol version refused");
                        reply.status = vstor_status::REVISION_MISMATCH;
                    }
                }
            }
            (
                Request::QueryProperties,
                Protocol::Initializing { version: Some(_) } | Protocol::Ready { .. },
            ) => {
                let mut p = ChannelProperties::new_zeroed();
                p.max_transfer_bytes = MAX_TRANSFER_BYTES;
                if self.queues > 1 && self.request_subchannels.is_some() {
                    p.flags = CHANNEL_SUPPORTS_MULTI_CHANNEL;
                    p.max_channel_count = self.queues - 1;
                }
                reply.set_body(&p);
            }
            (Request::EndInitialization, Protocol::Initializing { version: Some(v) }) => {
                self.protocol = Protocol::Ready { version: v };
            }
            (Request::CreateSubchannels(count), Protocol::Ready { .. }) => {
                let ok = count >= 1
                    && count < self.queues
                    && self.request_subchannels.as_ref().is_some_and(|r| r(count));
                if !ok {
                    tracing::debug!(count, queues = self.queues, "subchannel request refused");
                    reply.status = vstor_status::INVALID_PARAMETER;
                }
            }
            // In-flight I/O completes normally; nothing is queued elsewhere to abort.
            (Request::Reset, _) => {}
            (Request::Unsupported(operation), _) => {
                tracing::debug!(?operation, "unsupported storvsc operation");
                reply.status = vstor_status::INVALID_PARAMETER;
            }
            (
                Request::BeginInitialization
                | Request::QueryProtocolVersion(_)
                | Request::QueryProperties
                | Request::EndInitialization
                | Request::CreateSubchannels(_),
                _,
            ) => reply.status = out_of_order(),
        }
        self.answer(out, tx, reply)
    }

    /// Serves one EXECUTE_SRB, with the segment scratch lent to [`Storvsp::execute_with`].
    fn execute(
        &mut self,
        out: &mut OutgoingRing,
        tx: u64,
        srb: ScsiRequest,
        buffer: Option<&GpaRanges<'_>>,
    ) -> Result<(), Error> {
        let mut segments = std::mem::take(&mut self.segments);
        let result = self.execute_with(out, tx, srb, buffer, &mut segments);
        self.segments = segments;
        result
    }

    /// Serves one EXECUTE_SRB; `segments` is scratch for its buffer's segments.
    fn execute_with(
        &mut self,
        out: &mut OutgoingRing,
        tx: u64,
        srb: ScsiRequest,
        buffer: Option<&GpaRanges<'_>>,
        segments: &mut Vec<Segment>,
    ) -> Result<(), Error> {
        let fail = |mut srb: ScsiRequest, status: u8| {
            srb.srb_status = status;
            srb.scsi_status = 0;
            srb.data_transfer_length = 0;
            srb
        };
        if usize::from(srb.cdb_length) > MAX_CDB_LEN || srb.cdb_length == 0 {
            let s = fail(srb, srb_status::INVALID_REQUEST);
            return self.complete(out, tx, s);
        }
        let buffer = match buffer {
            Some(ranges) => buffer_segments(ranges, segments),
            None => {
                segments.clear();
                Ok(0)
            }
        };
        let buffer_len = match buffer {
            Ok(n) => n,
            Err(why) => {
                tracing::debug!(why, "SRB buffer refused");
                let s = fail(srb, srb_status::INVALID_REQUEST);
                return self.complete(out, tx, s);
            }
        };
        let data_len = srb.data_transfer_length;
        if u64::from(data_len) > buffer_len {
            tracing::debug!(data_len, buffer_len, "transfer longer than its buffer");
            let s = fail(srb, srb_status::INVALID_REQUEST);
            return self.complete(out, tx, s);
        }
        // A copy, since the SRB is changed and moved while the CDB is still in use (the whole
        // area: a copy of constant size, then the CDB's part of it).
        let cdb_bytes = srb.cdb_or_sense;
        let cdb = &cdb_bytes[..srb.cdb().len()];
        let lun_no = srb.lun;
        let present = srb.path_id == 0
            && srb.target_id == 0
            && self
                .luns
                .get(usize::from(lun_no))
                .is_some_and(|l| l.is_some());
        // REPORT LUNS is answered for the target, whatever LUN it is sent to.
        if srb.path_id == 0 && srb.target_id == 0 && cdb.first() == Some(&0xA0) {
            let resp = crate::scsi::report_luns(cdb, data_len, &self.lun_ids);
            return self.respond_now(out, tx, srb, segments, &resp, data_len);
        }
        if !present {
            let s = fail(srb, srb_status::INVALID_LUN);
            return self.complete(out, tx, s);
        }
        let lun = self.luns[usize::from(lun_no)].as_mut().expect("present");
        let want = lun.scsi.data_out_len(cdb).min(data_len as usize);
        // Only parameter lists and WRITE SAME's block: empty (no allocation) for reads and
        // writes, whose data stays in guest memory.
        let mut data_out = if want == 0 {
            Vec::new()
        } else {
            vec![0u8; want]
        };
        if want > 0 && copy_from_guest(&self.mem, segments, &mut data_out).is_err() {
            let s = fail(srb, srb_status::INVALID_REQUEST);
            return self.complete(out, tx, s);
        }
        let action = lun.scsi.execute(lun_no, cdb, data_len, &data_out);
        let bs = u64::from(lun.block_size);
        // What to queue: one operation, or one discard per UNMAP range.
        let (op, unmap): (Option<IoOp<'_>>, &[UnmapRange]) = match &action {
            Action::Done(resp) => return self.respond_now(out, tx, srb, segments, resp, data_len),
            Action::Read { lba, blocks, .. } => {
                truncate_segments(segments, u64::from(*blocks) * bs);
                let read = IoOp::Read {
                    offset: lba * bs,
                    segments,
                };
                (Some(read), &[])
            }
            Action::Write { lba, blocks, fua } => {
                truncate_segments(segments, u64::from(*blocks) * bs);
                let write = IoOp::Write {
                    offset: lba * bs,
                    segments,
                    fua: *fua,
                };
                (Some(write), &[])
            }
            Action::Flush => (Some(IoOp::Flush), &[]),
            Action::Unmap(ranges) => (None, ranges),
            Action::WriteSame {
                lba,
                blocks,
                fill,
                fua,
            } => {
                let zeros = match fill {
                    Fill::Zeros { may_unmap } => Some(*may_unmap),
                    Fill::Data
                        if data_out.iter().all(|&b| b == 0) && data_out.len() as u64 >= bs =>
                    {
                        Some(false)
                    }
                    Fill::Data => None,
                };
                match zeros {
                    Some(unmap) => {
                        let zeroes = IoOp::WriteZeroes {
                            offset: lba * bs,
                            len: u64::from(*blocks) * bs,
                            unmap,
                            sync: *fua,
                        };
                        (Some(zeroes), &[])
                    }
                    // A pattern: the block (copied from the guest with the parameter data),
                    // written over the whole range by the engine, up to the block limits
                    // page's MAXIMUM WRITE SAME LENGTH as for zeros.
                    None => {
                        let block = data_out.get(..bs as usize).unwrap_or_default();
                        let write = IoOp::WriteSame {
                            offset: lba * bs,
                            len: u64::from(*blocks) * bs,
                            block,
                            sync: *fua,
                        };
                        (Some(write), &[])
                    }
                }
            }
        };
        let kind = action.io_kind().expect("block I/O");
        let expected = match &action {
            Action::Read { blocks, .. } | Action::Write { blocks, .. } => {
                (u64::from(*blocks) * bs) as u32
            }
            _ => 0,
        };
        let Some(slot) = self.free.pop() else {
            let s = fail(srb, srb_status::BUSY);
            return self.complete(out, tx, s);
        };
        let mut queued = 0u32;
        let mut error = None;
        let lun = self.luns[usize::from(lun_no)].as_mut().expect("present");
        // All of the request's operations or none: an UNMAP of many ranges takes an entry of
        // the LUN's queue per range, and a queue that cannot take them all now is a transient
        // shortage the guest retries (BUSY), not an invalid request.
        if lun.queue.room() < usize::from(op.is_some()) + unmap.len() {
            self.free.push(slot);
            let s = fail(srb, srb_status::BUSY);
            return self.complete(out, tx, s);
        }
        let discards = unmap.iter().map(|r| IoOp::Discard {
            offset: r.lba * bs,
            len: u64::from(r.blocks) * bs,
        });
        for op in op.into_iter().chain(discards) {
            match lun.queue.queue(slot as u64, op) {
                Ok(()) => queued += 1,
                Err(e) => {
                    tracing::debug!(error = %e, "I/O refused");
                    error = Some(rustix::io::Errno::INVAL.raw_os_error());
                    break;
                }
            }
        }
        if queued == 0 {
            self.free.push(slot);
            let s = fail(srb, srb_status::INVALID_REQUEST);
            return self.complete(out, tx, s);
        }
        lun.unsubmitted = true;
        self.slots[slot] = Some(Slot {
            transaction_id: tx,
            srb,
            kind,
            remaining: queued,
            expected,
            error,
            received: latency::now(),
            submitted: None,
        });
        Ok(())
    }

    /// Completes an SRB whose command finished without block I/O: data-in to the guest's
    /// buffer, statuses and sense into the SRB.
    fn respond_now(
        &mut self,
        out: &mut OutgoingRing,
        tx: u64,
        mut srb: ScsiRequest,
        segments: &[Segment],
        resp: &Response,
        data_len: u32,
    ) -> Result<(), Error> {
        let n = resp.data.len().min(data_len as usize);
        if n > 0 && copy_to_guest(&self.mem, segments, &resp.data[..n]).is_err() {
            srb.srb_status = srb_status::INVALID_REQUEST;
            srb.scsi_status = 0;
            srb.data_transfer_length = 0;
            return self.complete(out, tx, srb);
        }
        apply_response(&mut srb, resp, n as u32);
        self.complete(out, tx, srb)
    }

    #[inline]
    fn complete(&mut self, out: &mut OutgoingRing, tx: u64, srb: ScsiRequest) -> Result<(), Error> {
        let mut p = VstorPacket::new(VstorOperation::COMPLETE_IO, 0, vstor_status::SUCCESS);
        p.set_body(&srb);
        self.answer(out, tx, p)
    }

    #[inline]
    fn finish(&mut self, out: &mut OutgoingRing, c: Completion) -> Result<(), Error> {
        let idx = c.tag as usize;
        let Some(Some(slot)) = self.slots.get_mut(idx) else {
            return Ok(());
        };
        slot.remaining -= 1;
        match c.result {
            Ok(n) if slot.expected != 0 && n != slot.expected => {
                slot.error
                    .get_or_insert(rustix::io::Errno::IO.raw_os_error());
            }
            Ok(_) => {}
            Err(e) => {
                slot.error.get_or_insert(e);
            }
        }
        if slot.remaining > 0 {
            return Ok(());
        }
        let slot = self.slots[idx].take().expect("present");
        self.free.push(idx);
        let reaped = latency::now();
        HOP_IO.between(slot.submitted, reaped);
        let mut srb = slot.srb;
        match slot.error {
            // GOOD, all of it moved: what `apply_response` writes for `Response::good()`,
            // without building one (the path of nearly every request).
            None => {
                srb.scsi_status = scsi_status::GOOD;
                srb.data_transfer_length = slot.expected;
                srb.srb_status = srb_status::SUCCESS;
            }
            Some(e) => apply_response(&mut srb, &ScsiDisk::io_done(slot.kind, Err(e)), 0),
        }
        let r = self.complete(out, slot.transaction_id, srb);
        HOP_ANSWER.since(reaped);
        r
    }
}

/// Writes a finished command's statuses, sense and transfer length into the SRB.
fn apply_response(srb: &mut ScsiRequest, resp: &Response, transferred: u32) {
    srb.scsi_status = resp.status;
    srb.data_transfer_length = transferred;
    match &resp.sense {
        None => srb.srb_status = srb_status::SUCCESS,
        Some(sense) => {
            srb.srb_status = srb_status::ERROR | srb_status::AUTOSENSE_VALID;
            let bytes = SenseData::as_bytes(sense);
            let n = bytes
                .len()
                .min(CDB_SENSE_AREA_SIZE)
                .min(usize::from(srb.sense_info_length.max(18)));
            srb.cdb_or_sense = [0; CDB_SENSE_AREA_SIZE];
            srb.cdb_or_sense[..n].copy_from_slice(&bytes[..n]);
            srb.sense_info_length = n as u8;
        }
    }
}

/// The GPA-direct ranges of a packet as page-bounded segments (adjacent pages merged), in
/// `segs` (cleared first; it needs no more than [`MAX_BUFFER_PAGES`] places); returns the total
/// length. Every page number is checked for overflow; guest memory bounds are checked when the
/// segments are used.
fn buffer_segments(ranges: &GpaRanges<'_>, segs: &mut Vec<Segment>) -> Result<u64, &'static str> {
    segs.clear();
    let mut total = 0u64;
    let mut pages = 0u64;
    for r in ranges.iter() {
        if r.byte_offset >= 4096 {
            return Err("range offset beyond its first page");
        }
        pages += r.pfns.len() as u64;
        if pages > MAX_BUFFER_PAGES {
            return Err("buffer larger than the largest transfer");
        }
        let mut left = u64::from(r.byte_count);
        let mut off = u64::from(r.byte_offset);
        for pfn in r.pfns {
            if left == 0 {
                break;
            }
            let gpa = pfn
                .get()
                .checked_mul(4096)
                .and_then(|g| g.checked_add(off))
                .ok_or("page number overflows")?;
            let len = left.min(4096 - off) as u32;
            // A page at the top of the address space ends at 2^64: not adjacent to anything.
            match segs.last_mut() {
                Some(last) if last.gpa.checked_add(u64::from(last.len)) == Some(gpa) => {
                    last.len += len
                }
                _ => segs.push(Segment { gpa, len }),
            }
            left -= u64::from(len);
            total += u64::from(len);
            off = 0;
        }
    }
    Ok(total)
}

/// Cuts `segs` to its first `len` bytes (all of it if shorter), in place.
fn truncate_segments(segs: &mut Vec<Segment>, len: u64) {
    let mut left = len;
    let mut keep = 0;
    for s in segs.iter_mut() {
        if left == 0 {
            break;
        }
        let n = u64::from(s.len).min(left);
        s.len = n as u32;
        left -= n;
        keep += 1;
    }
    segs.truncate(keep);
}

fn copy_from_guest(
    mem: &GuestMemory,
    segs: &[Segment],
    dst: &mut [u8],
) -> Result<(), ringbuf::Error> {
    let mut at = 0;
    for s in segs {
        if at == dst.len() {
            break;
        }
        let n = (s.len as usize).min(dst.len() - at);
        mem.read(s.gpa, &mut dst[at..at + n])?;
        at += n;
    }
    Ok(())
}

fn copy_to_guest(mem: &GuestMemory, segs: &[Segment], src: &[u8]) -> Result<(), ringbuf::Error> {
    let mut at = 0;
    for s in segs {
        if at == src.len() {
            break;
        }
        let n = (s.len as usize).min(src.len() - at);
        mem.write(s.gpa, &src[at..at + n])?;
        at += n;
    }
    Ok(())
}

impl Device for Storvsp {
    fn handle(&mut self, packet: &Packet<'_>, out: &mut OutgoingRing) -> Result<(), Error> {
        match parse_packet(packet) {
            Ok(req) => self.serve(out, packet.transaction_id, req),
            Err(e) => {
                tracing::debug!(error = %e, "storvsc packet ignored");
                Ok(())
            }
        }
    }

    fn poll(&mut self, out: &mut OutgoingRing) -> Result<bool, Error> {
        let mut moved = self.flush_answers(out)?;
        let mut done = std::mem::take(&mut self.completions);
        // The LUNs present (not the whole table: this runs on every polling iteration).
        for &id in &self.lun_ids {
            let Some(lun) = self.luns.get_mut(usize::from(id)).and_then(Option::as_mut) else {
                continue;
            };
            if lun.unsubmitted {
                lun.queue.submit()?;
                lun.unsubmitted = false;
                if latency::enabled() {
                    let t = latency::now();
                    for s in self.slots.iter_mut().flatten() {
                        if s.submitted.is_none() {
                            s.submitted = t;
                            HOP_SUBMIT.between(s.received, t);
                        }
                    }
                }
            }
            // Unconditionally: some requests complete when queued (inline buffered writes).
            lun.queue.reap(&mut done);
        }
        for c in done.drain(..) {
            moved = true;
            self.finish(out, c)?;
        }
        self.completions = done;
        Ok(moved)
    }

    /// Twice the worker's default: each batch costs an `io_uring_enter` and a ring
    /// publication, and at QD32 the worker is the busier side (at 4 KiB page-cache reads it
    /// copies every byte). 16 halves its system calls per request against 8 (QD32 page-cache
    /// reads: 0.125 -> 0.063 polling, 0.17 -> 0.125 with `--poll-us 0`), with no change in
    /// IOPS this machine's noise shows over 6 interleaved rounds. 32 cost a fifth of the IOPS
    /// with `--poll-us 0` (the guest, asleep while it waits, gets its answers in fewer, later
    /// bursts) and saved no more system calls.
    fn packet_batch(&self) -> usize {
        16
    }

    fn busy(&self) -> bool {
        self.free.is_empty() || !self.answers.is_empty()
    }

    fn blocked_on_ring(&self) -> Option<u32> {
        self.stalled
    }

    fn in_flight(&self) -> bool {
        // An SRB holds a slot from its I/O's start to its answer.
        self.free.len() < self.slots.len()
    }

    fn serves_requests(&self) -> bool {
        true
    }

    fn wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        Some(self.wake.as_fd())
    }

    fn prepare_sleep(&mut self) -> bool {
        let mut idle = true;
        for &id in &self.lun_ids {
            if let Some(lun) = self.luns.get_mut(usize::from(id)).and_then(Option::as_mut) {
                // Every LUN's event is re-armed, even after one found work.
                idle &= lun.queue.prepare_sleep();
            }
        }
        idle
    }
}

impl Drop for Storvsp {
    fn drop(&mut self) {
        // Each queue waits for its in-flight I/O; answers for it are dropped with the channel,
        // so long requests stop at their next step.
        for lun in self.luns.iter_mut().flatten() {
            lun.queue.abandon();
            let _ = lun.queue.wait(lun.queue.in_flight());
        }
    }
}

pub mod harness {
    //! A storvsp channel without a daemon: one [`Storvsp`] serving one disk as LUN 0, guest
    //! memory in a memfd at guest-physical 0, and both rings of the channel in one process. The
    //! caller plays the guest: it writes packets (in-band or GPA-direct, as hostile as it likes)
    //! and reads the answers. For unit tests and fuzz targets.

    use std::sync::Arc;

    use ringbuf::guestmem::GuestMemory;
    use ringbuf::packet::{gpa_direct_header, OutgoingPacket, PacketKind};
    use ringbuf::pair::RingPair;
    use ringbuf::{IncomingRing, OutgoingRing};
    use vmbus_proto::ring::PacketType;
    use vmbus_proto::storvsp::VstorPacket;
    use zerocopy::FromBytes;

    use super::{LunSpec, MakeEngine, Storvsp};
    use crate::channel::Device;
    use crate::disk::DiskFile;
    use crate::scsi::LunState;
    use crate::Error;

    /// Bytes of each ring's data area.
    const RING_BYTES: usize = 256 << 10;

    /// One channel's device, its guest memory and rings.
    pub struct Harness {
        /// The device under test.
        pub device: Storvsp,
        /// The guest's memory (`len` bytes at guest-physical 0).
        pub mem: Arc<GuestMemory>,
        guest_out: OutgoingRing,
        guest_in: IncomingRing,
        host_out: OutgoingRing,
        host_in: IncomingRing,
        _pair: RingPair,
        header: Vec<u8>,
        /// Answers read from the host-to-guest ring: transaction id and packet.
        pub answers: Vec<(u64, VstorPacket)>,
    }

    impl std::fmt::Debug for Harness {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Harness")
                .field("device", &self.device)
                .finish_non_exhaustive()
        }
    }

    impl Harness {
        /// A channel serving `disk` as LUN 0 with `mem_bytes` (a multiple of 4096) of guest
        /// memory; a subchannel (`subchannel`) serves SRBs without the handshake.
        pub fn new(disk: Arc<DiskFile>, mem_bytes: u64, subchannel: bool) -> Result<Self, Error> {
            Self::build(disk, mem_bytes, subchannel, None)
        }

        /// As [`Harness::new`], with the LUN's I/O engine made by `engine` (a stand-in for
        /// io_uring: see [`crate::disk::IoQueue`]); `disk` still gives the geometry.
        pub fn with_engine(
            disk: Arc<DiskFile>,
            mem_bytes: u64,
            subchannel: bool,
            engine: &mut MakeEngine<'_>,
        ) -> Result<Self, Error> {
            Self::build(disk, mem_bytes, subchannel, Some(engine))
        }

        fn build(
            disk: Arc<DiskFile>,
            mem_bytes: u64,
            subchannel: bool,
            engine: Option<&mut MakeEngine<'_>>,
        ) -> Result<Self, Error> {
            let fd = ringbuf::shmem::create_memfd("storvsp-harness", mem_bytes)?;
            let mut mem = GuestMemory::new();
            mem.add_region(0, mem_bytes, fd, 0)?;
            let mem = Arc::new(mem);
            let luns: Arc<[LunSpec]> = Arc::new([LunSpec {
                lun: 0,
                path: "harness".into(),
                file: disk,
                state: LunState::new(),
            }]);
            let device = match engine {
                Some(e) => Storvsp::with_engine(luns, mem.clone(), 1, subchannel, None, e)?,
                None => Storvsp::new(luns, mem.clone(), 1, subchannel, None)?,
            };
            let pair = RingPair::anonymous(RING_BYTES)?;
            let (guest_out, guest_in) = pair.side_a()?;
            let (host_out, host_in) = pair.side_b()?;
            Ok(Self {
                device,
                mem,
                guest_out,
                guest_in,
                host_out,
                host_in,
                _pair: pair,
                header: Vec::new(),
                answers: Vec::new(),
            })
        }

        /// Sends one packet carrying `payload` (a VSTOR packet, or anything): in-band, or
        /// GPA-direct with `ranges` (byte offset, byte count, page numbers). The device handles
        /// it at once; then its I/O runs to completion ([`Harness::settle`]). A packet the ring
        /// cannot carry (a malformed range list) is not sent: `Ok(false)`.
        pub fn send(
            &mut self,
            tx: u64,
            payload: &[u8],
            ranges: Option<&[(u32, u32, &[u64])]>,
        ) -> Result<bool, Error> {
            let parts = [payload];
            let written = match ranges {
                Some(r) => {
                    gpa_direct_header(&mut self.header, r);
                    self.guest_out.write(&OutgoingPacket {
                        packet_type: PacketType::DATA_USING_GPA_DIRECT,
                        flags: 1,
                        transaction_id: tx,
                        header: &self.header,
                        payload: &parts,
                    })
                }
                None => self
                    .guest_out
                    .write(&OutgoingPacket::in_band(tx, true, &parts)),
            };
            if written.is_err() {
                self.guest_out.rollback();
                return Ok(false);
            }
            self.guest_out.commit();
            loop {
                match self.host_in.read() {
                    Ok(Some(p)) => self.device.handle(&p, &mut self.host_out)?,
                    Ok(None) => break,
                    // A packet the reader refuses ends the channel in vspd; here, the test.
                    Err(_) => {
                        self.host_in.rollback();
                        return Ok(false);
                    }
                }
            }
            self.host_in.commit();
            self.settle()?;
            Ok(true)
        }

        /// Polls the device until it has no I/O in flight and every answer is in the ring, then
        /// reads the answers into [`Harness::answers`].
        pub fn settle(&mut self) -> Result<(), Error> {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                self.device.poll(&mut self.host_out)?;
                self.host_out.commit();
                self.drain();
                if !self.device.in_flight() && !self.device.busy() {
                    return Ok(());
                }
                if std::time::Instant::now() > deadline {
                    return Err(Error::DiskRequest("the device did not settle"));
                }
                std::thread::yield_now();
            }
        }

        fn drain(&mut self) {
            while let Ok(Some(p)) = self.guest_in.read() {
                if let (PacketKind::Completion, Ok((v, _))) =
                    (p.kind, VstorPacket::read_from_prefix(p.payload))
                {
                    self.answers.push((p.transaction_id, v));
                }
            }
            self.guest_in.commit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::harness::Harness;
    use super::*;
    use vmbus_proto::storvsp::REQUEST_COMPLETION_FLAG;

    /// A scratch image of `len` bytes, removed on drop.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str, len: u64) -> Self {
            let path =
                std::env::temp_dir().join(format!("vsp-storvsp-{name}-{}.img", std::process::id()));
            std::fs::File::create(&path).unwrap().set_len(len).unwrap();
            Self(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// An EXECUTE_SRB packet for `cdb` with a data buffer of `transfer` bytes.
    fn srb(cdb: &[u8], transfer: u32, read: bool) -> VstorPacket {
        let mut r = ScsiRequest::new_zeroed();
        r.length = 52;
        r.cdb_length = cdb.len() as u8;
        r.cdb_or_sense[..cdb.len()].copy_from_slice(cdb);
        r.sense_info_length = 20;
        r.data_in = if read {
            vmbus_proto::storvsp::DataDirection::READ
        } else {
            vmbus_proto::storvsp::DataDirection::WRITE
        };
        r.data_transfer_length = transfer;
        let mut p = VstorPacket::new(VstorOperation::EXECUTE_SRB, REQUEST_COMPLETION_FLAG, 0);
        p.set_body(&r);
        p
    }

    fn srb_status_of(h: &Harness, tx: u64) -> u8 {
        let (_, p) = h
            .answers
            .iter()
            .find(|(t, _)| *t == tx)
            .unwrap_or_else(|| panic!("no answer for {tx}"));
        let r: ScsiRequest = p.body();
        r.srb_status & 0x3f
    }

    fn control(op: VstorOperation) -> VstorPacket {
        VstorPacket::new(op, REQUEST_COMPLETION_FLAG, 0)
    }

    fn status_of(h: &Harness, tx: u64) -> u32 {
        let (_, p) = h
            .answers
            .iter()
            .find(|(t, _)| *t == tx)
            .unwrap_or_else(|| panic!("no answer for {tx}"));
        p.status
    }

    /// The handshake in order (begin, version, properties, end) and nothing out of it: each
    /// request out of order is refused and changes nothing; SRBs only once it ended.
    #[test]
    fn the_handshake_order_is_enforced() {
        use vmbus_proto::storvsp::{status as st, ChannelProperties, ProtocolVersion};
        let img = Scratch::new("handshake", 1 << 20);
        let disk = DiskFile::open(&img.0, false, false).unwrap();
        let mut h = Harness::new(disk, 1 << 20, false).unwrap();
        let inquiry = srb(&[0x12, 0, 0, 0, 36, 0], 36, true);
        let buf: &[(u32, u32, &[u64])] = &[(0, 36, &[3])];
        let version = |v: StorageVersion| {
            let mut p = control(VstorOperation::QUERY_PROTOCOL_VERSION);
            p.set_body(&ProtocolVersion {
                major_minor: v,
                revision: 0,
            });
            p
        };
        let mut tx = 0;
        let mut send = |h: &mut Harness, p: &VstorPacket, ranges| {
            tx += 1;
            assert!(h.send(tx, p.as_bytes(), ranges).unwrap());
            tx
        };
        // Before BEGIN: nothing but BEGIN (and resets).
        let t = send(&mut h, &inquiry, Some(buf));
        assert_eq!(srb_status_of(&h, t), srb_status::INVALID_REQUEST);
        for op in [
            VstorOperation::QUERY_PROPERTIES,
            VstorOperation::END_INITIALIZATION,
            VstorOperation::CREATE_SUB_CHANNELS,
        ] {
            let t = send(&mut h, &control(op), None);
            assert_eq!(status_of(&h, t), st::INVALID_DEVICE_STATE, "{op:?}");
        }
        let t = send(&mut h, &version(StorageVersion::WIN10), None);
        assert_eq!(status_of(&h, t), st::INVALID_DEVICE_STATE);
        let t = send(&mut h, &control(VstorOperation::BEGIN_INITIALIZATION), None);
        assert_eq!(status_of(&h, t), st::SUCCESS);
        // No version yet: no properties, no end.
        for op in [
            VstorOperation::QUERY_PROPERTIES,
            VstorOperation::END_INITIALIZATION,
        ] {
            let t = send(&mut h, &control(op), None);
            assert_eq!(status_of(&h, t), st::INVALID_DEVICE_STATE, "{op:?}");
        }
        let t = send(&mut h, &version(StorageVersion(0x0999)), None);
        assert_eq!(status_of(&h, t), st::REVISION_MISMATCH);
        let t = send(&mut h, &version(StorageVersion::WIN10), None);
        assert_eq!(status_of(&h, t), st::SUCCESS);
        let t = send(&mut h, &control(VstorOperation::QUERY_PROPERTIES), None);
        assert_eq!(status_of(&h, t), st::SUCCESS);
        let props: ChannelProperties = h.answers.last().unwrap().1.body();
        assert_eq!({ props.max_transfer_bytes }, MAX_TRANSFER_BYTES);
        // Still initialising: no SRB, no subchannels.
        let t = send(&mut h, &inquiry, Some(buf));
        assert_eq!(srb_status_of(&h, t), srb_status::INVALID_REQUEST);
        let t = send(&mut h, &control(VstorOperation::END_INITIALIZATION), None);
        assert_eq!(status_of(&h, t), st::SUCCESS);
        let t = send(&mut h, &inquiry, Some(buf));
        assert_eq!(srb_status_of(&h, t), srb_status::SUCCESS);
        let mut data = [0u8; 36];
        h.mem.read(3 * 4096, &mut data).unwrap();
        assert_eq!(&data[8..16], crate::scsi::VENDOR_ID);
        // Serving: no second handshake; one queue, so no subchannels; unknown operations.
        for op in [
            VstorOperation::BEGIN_INITIALIZATION,
            VstorOperation::END_INITIALIZATION,
        ] {
            let t = send(&mut h, &control(op), None);
            assert_eq!(status_of(&h, t), st::INVALID_DEVICE_STATE, "{op:?}");
        }
        let t = send(&mut h, &version(StorageVersion::WIN8), None);
        assert_eq!(status_of(&h, t), st::INVALID_DEVICE_STATE);
        let mut sub = control(VstorOperation::CREATE_SUB_CHANNELS);
        sub.set_body(&SubchannelCount { count: 1 });
        let t = send(&mut h, &sub, None);
        assert_eq!(status_of(&h, t), st::INVALID_PARAMETER);
        let t = send(&mut h, &control(VstorOperation(0x77)), None);
        assert_eq!(status_of(&h, t), st::INVALID_PARAMETER);
        // A packet shorter than a VSTOR header gets no answer; the channel goes on.
        let before = h.answers.len();
        assert!(h.send(1000, &[1, 0, 0, 0], None).unwrap());
        assert_eq!(h.answers.len(), before);
        let t = send(&mut h, &inquiry, Some(buf));
        assert_eq!(srb_status_of(&h, t), srb_status::SUCCESS);
    }

    /// An I/O engine that completes every operation at once with what `script` says, and
    /// records what it was asked: storvsp's handling of I/O results without the kernel's I/O.
    struct Scripted {
        event: std::os::fd::OwnedFd,
        /// What `room` says.
        room: usize,
        done: Vec<Completion>,
        script: fn(&IoOp<'_>) -> Result<u32, i32>,
        asked: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl IoQueue for Scripted {
        fn queue(&mut self, tag: u64, op: IoOp<'_>) -> Result<(), Error> {
            self.asked.lock().unwrap().push(format!("{op:?}"));
            let result = (self.script)(&op);
            self.done.push(Completion { tag, result });
            Ok(())
        }
        fn submit(&mut self) -> Result<usize, Error> {
            Ok(0)
        }
        fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
            let n = self.done.len();
            out.append(&mut self.done);
            n
        }
        fn wait(&mut self, _min: usize) -> Result<(), Error> {
            Ok(())
        }
        fn in_flight(&self) -> usize {
            self.done.len()
        }
        fn room(&self) -> usize {
            self.room
        }
        fn completion_event(&self) -> std::os::fd::BorrowedFd<'_> {
            use std::os::fd::AsFd;
            self.event.as_fd()
        }
    }

    fn scripted(
        img: &Scratch,
        script: fn(&IoOp<'_>) -> Result<u32, i32>,
    ) -> (Harness, Arc<std::sync::Mutex<Vec<String>>>) {
        scripted_with_room(img, script, usize::MAX)
    }

    fn scripted_with_room(
        img: &Scratch,
        script: fn(&IoOp<'_>) -> Result<u32, i32>,
        room: usize,
    ) -> (Harness, Arc<std::sync::Mutex<Vec<String>>>) {
        let disk = DiskFile::open(&img.0, false, false).unwrap();
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = asked.clone();
        let mut engine = move |_: &LunSpec| -> Result<Box<dyn IoQueue>, Error> {
            let event = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
            Ok(Box::new(Scripted {
                event,
                room,
                done: Vec::new(),
                script,
                asked: log.clone(),
            }))
        };
        let h = Harness::with_engine(disk, 1 << 20, true, &mut engine).unwrap();
        (h, asked)
    }

    /// The sense key and additional sense code of an answered SRB.
    fn sense_of(h: &Harness, tx: u64) -> (u8, u8) {
        let (_, p) = h.answers.iter().find(|(t, _)| *t == tx).unwrap();
        let r: ScsiRequest = p.body();
        assert_eq!(r.srb_status & 0x3f, srb_status::ERROR, "{r:?}");
        (r.cdb_or_sense[2] & 0x0f, r.cdb_or_sense[12])
    }

    /// I/O results become the right SCSI answers (through the engine trait, no kernel I/O):
    /// a failed flush a WRITE ERROR, a short read an UNRECOVERED READ ERROR, a full file
    /// system SPACE ALLOCATION FAILED, an UNMAP the backend cannot do GOOD (it is advisory),
    /// with one discard per descriptor.
    #[test]
    fn io_results_become_scsi_answers() {
        let img = Scratch::new("scripted", 1 << 20);
        let (mut h, asked) = scripted(&img, |op| match op {
            IoOp::Flush => Err(rustix::io::Errno::IO.raw_os_error()),
            IoOp::Read { segments, .. } => Ok(segments.iter().map(|s| s.len).sum::<u32>() / 2),
            IoOp::Write { .. } => Err(rustix::io::Errno::NOSPC.raw_os_error()),
            IoOp::Discard { offset, .. } if *offset == 0 => {
                Err(rustix::io::Errno::OPNOTSUPP.raw_os_error())
            }
            _ => Ok(0),
        });
        let buf: &[(u32, u32, &[u64])] = &[(0, 4096, &[5])];
        let sync = srb(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, false);
        assert!(h.send(1, sync.as_bytes(), None).unwrap());
        assert_eq!(sense_of(&h, 1), (0x03, 0x0c));
        let read = srb(&[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], 4096, true);
        assert!(h.send(2, read.as_bytes(), Some(buf)).unwrap());
        assert_eq!(sense_of(&h, 2), (0x03, 0x11));
        let write = srb(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 8, 0], 4096, false);
        assert!(h.send(3, write.as_bytes(), Some(buf)).unwrap());
        assert_eq!(sense_of(&h, 3), (0x07, 0x27));
        // UNMAP of three ranges; the first cannot be done.
        let unmap = unmap_of_three_ranges(&h);
        assert!(h.send(4, unmap.as_bytes(), Some(&[(0, 56, &[6])])).unwrap());
        let (_, p) = h.answers.iter().find(|(t, _)| *t == 4).unwrap();
        let r: ScsiRequest = p.body();
        assert_eq!(r.srb_status & 0x3f, srb_status::SUCCESS, "{r:?}");
        let asked = asked.lock().unwrap();
        let discards = asked.iter().filter(|a| a.starts_with("Discard")).count();
        assert_eq!(discards, 3, "{asked:?}");
    }

    /// An UNMAP of 8 blocks at LBAs 0, 64 and 128, its parameter list written to guest page 6.
    fn unmap_of_three_ranges(h: &Harness) -> VstorPacket {
        let mut list = vec![0u8; 8 + 3 * 16];
        list[1] = 6 + 48;
        list[3] = 48;
        for (i, lba) in [0u64, 64, 128].iter().enumerate() {
            list[8 + 16 * i..][..8].copy_from_slice(&lba.to_be_bytes());
            list[8 + 16 * i + 8..][..4].copy_from_slice(&8u32.to_be_bytes());
        }
        h.mem.write(6 * 4096, &list).unwrap();
        srb(&[0x42, 0, 0, 0, 0, 0, 0, 0, list.len() as u8, 0], 56, false)
    }

    /// An UNMAP whose ranges do not all fit the LUN's queue now is answered BUSY (the guest
    /// retries) with nothing queued, not INVALID_REQUEST with some of its ranges done.
    #[test]
    fn a_request_the_queue_cannot_take_whole_is_busy() {
        let img = Scratch::new("room", 1 << 20);
        let (mut h, asked) = scripted_with_room(&img, |_| Ok(0), 2);
        let unmap = unmap_of_three_ranges(&h);
        assert!(h.send(1, unmap.as_bytes(), Some(&[(0, 56, &[6])])).unwrap());
        assert_eq!(srb_status_of(&h, 1), srb_status::BUSY);
        assert!(asked.lock().unwrap().is_empty(), "nothing queued");
        // A flush (one entry) fits.
        let sync = srb(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, false);
        assert!(h.send(2, sync.as_bytes(), None).unwrap());
        assert_eq!(srb_status_of(&h, 2), srb_status::SUCCESS);
    }

    /// Issue 9, item 5, at the engine: once MODE SELECT turned the write cache off, every
    /// write reaches the engine as FUA and WRITE SAME's zeroing as synchronous.
    #[test]
    fn with_the_write_cache_off_writes_reach_the_engine_durable() {
        let img = Scratch::new("wce-engine", 1 << 20);
        let (mut h, asked) = scripted(&img, |op| match op {
            IoOp::Write { segments, .. } => Ok(segments.iter().map(|s| s.len).sum()),
            _ => Ok(0),
        });
        let page = |h: &mut Harness, tx, p: VstorPacket, gpa_page: u64, len: u32| {
            assert!(h
                .send(tx, p.as_bytes(), Some(&[(0, len, &[gpa_page])]))
                .unwrap());
            assert_eq!(srb_status_of(h, tx), srb_status::SUCCESS);
        };
        let write10 = srb(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], 512, false);
        page(&mut h, 1, write10, 5, 512);
        // MODE SENSE (6), DBD, caching page, into page 7; then MODE SELECT with WCE off.
        page(
            &mut h,
            2,
            srb(&[0x1a, 0x08, 0x08, 0, 64, 0], 64, true),
            7,
            64,
        );
        let mut sense = [0u8; 24];
        h.mem.read(7 * 4096, &mut sense).unwrap();
        let mut list = vec![0, 0, 0, 0];
        list.extend_from_slice(&sense[4..24]);
        list[4] &= 0x7f;
        list[6] &= !0x04;
        h.mem.write(8 * 4096, &list).unwrap();
        let n = list.len() as u8;
        page(
            &mut h,
            3,
            srb(&[0x15, 0x10, 0, 0, n, 0], n.into(), false),
            8,
            n.into(),
        );
        page(&mut h, 4, write10, 5, 512);
        // WRITE SAME (10) of a zero block: zeroing, then a flush.
        h.mem.fill(9 * 4096, 512, 0).unwrap();
        let ws = srb(&[0x41, 0, 0, 0, 0, 16, 0, 0, 4, 0], 512, false);
        page(&mut h, 5, ws, 9, 512);
        let asked = asked.lock().unwrap();
        let writes: Vec<&String> = asked.iter().filter(|a| a.starts_with("Write")).collect();
        assert_eq!(writes.len(), 3, "{asked:?}");
        assert!(writes[0].contains("fua: false"), "{asked:?}");
        assert!(writes[1].contains("fua: true"), "{asked:?}");
        assert!(writes[2].contains("sync: true"), "{asked:?}");
    }

    /// WRITE SAME of a pattern is served up to the MAXIMUM WRITE SAME LENGTH the block limits
    /// page reports (it was refused beyond 1024 blocks), as the engine's repeated block.
    #[test]
    fn write_same_of_a_pattern_covers_the_whole_range() {
        let img = Scratch::new("write-same", 8 << 20);
        let disk = DiskFile::open(&img.0, false, false).unwrap();
        let mut h = Harness::new(disk, 1 << 20, true).unwrap();
        let block: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
        h.mem.write(4 * 4096, &block).unwrap();
        // WRITE SAME (16): LBA 100, 10000 blocks (about 5 MiB: several SQEs).
        let mut cdb = [0u8; 16];
        cdb[0] = 0x93;
        cdb[2..10].copy_from_slice(&100u64.to_be_bytes());
        cdb[10..14].copy_from_slice(&10_000u32.to_be_bytes());
        let p = srb(&cdb, 512, false);
        assert!(h.send(1, p.as_bytes(), Some(&[(0, 512, &[4])])).unwrap());
        assert_eq!(srb_status_of(&h, 1), srb_status::SUCCESS);
        let data = std::fs::read(&img.0).unwrap();
        assert!(data[..100 * 512].iter().all(|&b| b == 0));
        for (i, chunk) in data[100 * 512..10_100 * 512].chunks(512).enumerate() {
            assert_eq!(chunk, &block[..], "block {i}");
        }
        assert!(data[10_100 * 512..].iter().all(|&b| b == 0));
    }

    /// Issue 9, item 10: GPA-direct page numbers [2^52-1, 0] made `last.gpa + len` overflow
    /// (a panic with overflow checks on, as in tests). Now the buffer is refused as outside
    /// guest memory, and the channel serves on.
    #[test]
    fn page_numbers_at_the_top_of_the_address_space_do_not_overflow() {
        let img = Scratch::new("overflow", 1 << 20);
        let disk = DiskFile::open(&img.0, false, false).unwrap();
        let mut h = Harness::new(disk, 1 << 20, true).unwrap();
        let read10 = [0x28, 0, 0, 0, 0, 0, 0, 0, 16, 0];
        let top = (1u64 << 52) - 1;
        let p = srb(&read10, 8192, true);
        for (tx, pfns) in [
            (1, [top, 0]),
            (2, [top, top]),
            (3, [0, top]),
            (4, [u64::MAX >> 12, 0]),
        ] {
            assert!(h.send(tx, p.as_bytes(), Some(&[(0, 8192, &pfns)])).unwrap());
            assert_eq!(srb_status_of(&h, tx), srb_status::INVALID_REQUEST);
        }
        assert!(h
            .send(5, p.as_bytes(), Some(&[(0, 8192, &[1, 2])]))
            .unwrap());
        assert_eq!(srb_status_of(&h, 5), srb_status::SUCCESS);
    }

    #[test]
    fn truncate_segments_keeps_a_prefix_in_place() {
        let segs = [
            Segment {
                gpa: 0x1000,
                len: 4096,
            },
            Segment {
                gpa: 0x8000,
                len: 512,
            },
            Segment {
                gpa: 0x9000,
                len: 100,
            },
        ];
        let cut = |len| {
            let mut v = segs.to_vec();
            let capacity = v.capacity();
            truncate_segments(&mut v, len);
            assert_eq!(v.capacity(), capacity, "cut in place");
            v
        };
        assert_eq!(cut(0), []);
        assert_eq!(
            cut(1),
            [Segment {
                gpa: 0x1000,
                len: 1
            }]
        );
        assert_eq!(cut(4096), segs[..1]);
        assert_eq!(
            cut(4096 + 300),
            [
                segs[0],
                Segment {
                    gpa: 0x8000,
                    len: 300
                }
            ]
        );
        assert_eq!(cut(4096 + 512 + 100), segs);
        assert_eq!(cut(u64::MAX), segs, "shorter than asked: all of it");
    }
}
