//! The storvsc client: the guest side of VMBus synthetic SCSI, as Linux's hv_storvsc drives it,
//! and a block-device API over it with many requests in flight.
//!
//! [`Storvsc::init`] runs the initialisation handshake (begin, protocol version WIN10 then 8.1
//! then 8, properties, end). [`Disk`] then owns the channel on a queue thread: callers submit
//! reads, writes, flushes and discards from any thread ([`Disk::submit`], with a completion
//! callback, or the blocking helpers); the queue thread copies data through bounce pages in guest
//! memory, writes each request as an EXECUTE_SRB packet (GPA-direct ranges for the data), commits
//! batches with one signal, and completes requests from the host's completion packets.
//!
//! When the host goes away (its daemon restarted or killed), a queue thread keeps its requests:
//! those in flight stay in their slots with their data in bounce pages, new ones wait. Once the
//! channel is reopened on a new host session ([`Controller::replace_channels`]) the requests in
//! flight are written again, in their order, and service carries on: a caller sees a pause.
//! Only a request the host completed was ever answered, so writing the others again is safe.
//! After the hold time ([`Controller::set_hold`]) with no new channel, the held requests fail
//! with [`IoError::Disconnected`], and so do new ones until a channel comes back.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use ringbuf::guestmem::{GuestMemory, PAGE_SIZE};
use ringbuf::latency::{self, Hop};
use ringbuf::packet::{gpa_direct_header, OutgoingPacket, PacketKind};
use vmbus_proto::ring::PacketType;
use vmbus_proto::storvsp::scsi::{self as scsi_proto, Opcode};
use vmbus_proto::storvsp::{
    srb_flags, srb_status, ChannelProperties, DataDirection, ProtocolVersion, ScsiRequest,
    StorageVersion, VstorOperation, VstorPacket, CDB_SENSE_AREA_SIZE, REQUEST_COMPLETION_FLAG,
    SCSI_REQUEST_SIZE, SENSE_BUFFER_SIZE,
};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::channel::{FrontEnd, GuestChannel};
use crate::queue::{
    BatchHook, BatchHookGuard, Doorbell, EventLoop, Handed, QueueSource, QueueWork, SourceWaker,
    Woke, MAX_SLEEP,
};
use crate::Error;

/// Versions proposed, newest first (Linux 6.1's list).
pub const VERSIONS: [StorageVersion; 3] = [
    StorageVersion::WIN10,
    StorageVersion::WIN8_1,
    StorageVersion::WIN8,
];

/// The largest transfer the client issues when the host allows more.
pub const MAX_TRANSFER: u32 = 1 << 20;

/// Bounce memory (guest pages) the queue thread uses for data in flight.
pub const BOUNCE_BYTES: usize = 8 << 20;

/// Requests in flight at most (per queue).
pub const MAX_IN_FLIGHT: usize = 256;
// A transaction id carries the slot index in its low 8 bits.
const _: () = assert!(MAX_IN_FLIGHT <= 256);

/// Completions the queue thread handles before it issues the requests their callbacks
/// submitted: the host then works on those while the rest complete.
const COMPLETE_BATCH: usize = 8;

/// Transaction ids of control requests (high bit set; an SRB's is its slot index in the low 8
/// bits and a sequence number above, so a stale or forged completion matches no request).
const CONTROL_TX: u64 = 1 << 63;

/// A negotiated storvsc channel.
#[derive(Debug)]
pub struct Storvsc {
    ch: GuestChannel,
    version: StorageVersion,
    max_transfer: u32,
    properties: ChannelProperties,
}

fn vstor(op: VstorOperation) -> VstorPacket {
    VstorPacket::new(op, REQUEST_COMPLETION_FLAG, 0)
}

impl Storvsc {
    /// Runs the initialisation handshake on an open storage channel.
    pub fn init(ch: GuestChannel) -> Result<Self, Error> {
        Self::try_init(ch).map_err(|b| b.1)
    }

    /// As [`init`](Self::init), giving the channel back on failure (to close or abandon it).
    pub fn try_init(mut ch: GuestChannel) -> Result<Self, Box<(GuestChannel, Error)>> {
        match Self::handshake(&mut ch) {
            Ok((version, max_transfer, properties)) => Ok(Self {
                ch,
                version,
                max_transfer,
                properties,
            }),
            Err(e) => Err(Box::new((ch, e))),
        }
    }

    fn handshake(ch: &mut GuestChannel) -> Result<(StorageVersion, u32, ChannelProperties), Error> {
        let timeout = Duration::from_secs(10);
        let ok = |p: VstorPacket, what: &'static str| -> Result<VstorPacket, Error> {
            if { p.operation } != VstorOperation::COMPLETE_IO || { p.status } != 0 {
                return Err(Error::Status {
                    what,
                    status: { p.status },
                });
            }
            Ok(p)
        };
        ok(
            control(ch, vstor(VstorOperation::BEGIN_INITIALIZATION), timeout)?,
            "begin initialization",
        )?;
        let mut version = None;
        for v in VERSIONS {
            let mut q = vstor(VstorOperation::QUERY_PROTOCOL_VERSION);
            q.set_body(&ProtocolVersion {
                major_minor: v,
                revision: 0,
            });
            let a = control(ch, q, timeout)?;
            if { a.operation } == VstorOperation::COMPLETE_IO && { a.status } == 0 {
                version = Some(v);
                break;
            }
        }
        let version =
            version.ok_or_else(|| Error::Refused("no storage protocol version accepted".into()))?;
        let props = ok(
            control(ch, vstor(VstorOperation::QUERY_PROPERTIES), timeout)?,
            "query properties",
        )?;
        let properties: ChannelProperties = props.body();
        ok(
            control(ch, vstor(VstorOperation::END_INITIALIZATION), timeout)?,
            "end initialization",
        )?;
        let max_transfer = match properties.max_transfer_bytes {
            0 => MAX_TRANSFER,
            n => n.min(MAX_TRANSFER),
        } & !4095;
        tracing::info!(?version, max_transfer, "storvsc initialised");
        Ok((version, max_transfer.max(4096), properties))
    }

    /// Asks the host for `count` subchannels (multi-queue); their offers then arrive as client
    /// events, to be opened and wrapped with [`Storvsc::subchannel`].
    pub fn create_subchannels(&mut self, count: u16) -> Result<(), Error> {
        let mut p = vstor(VstorOperation::CREATE_SUB_CHANNELS);
        p.set_body(&vmbus_proto::storvsp::SubchannelCount { count });
        let a = control(&mut self.ch, p, Duration::from_secs(10))?;
        if { a.operation } != VstorOperation::COMPLETE_IO || { a.status } != 0 {
            return Err(Error::Status {
                what: "create subchannels",
                status: { a.status },
            });
        }
        Ok(())
    }

    /// A subchannel of this (initialised) channel: it needs no handshake of its own.
    pub fn subchannel(&self, ch: GuestChannel) -> Self {
        Self {
            ch,
            version: self.version,
            max_transfer: self.max_transfer,
            properties: self.properties,
        }
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> StorageVersion {
        self.version
    }

    /// The host's channel properties.
    pub fn properties(&self) -> ChannelProperties {
        self.properties
    }

    /// Gives the channel back (to close it).
    pub fn into_channel(self) -> GuestChannel {
        self.ch
    }
}

/// Sends a control packet and waits for its completion.
fn control(ch: &mut GuestChannel, p: VstorPacket, timeout: Duration) -> Result<VstorPacket, Error> {
    let tx = CONTROL_TX | u64::from(p.operation.0);
    ch.out
        .write(&OutgoingPacket::in_band(tx, true, &[p.as_bytes()]))?;
    ch.commit_out()?;
    let deadline = Instant::now() + timeout;
    loop {
        ch.inc.mask();
        let got = match ch.inc.read()? {
            Some(pkt) if pkt.transaction_id == tx => Some(
                VstorPacket::read_from_prefix(pkt.payload)
                    .map(|(v, _)| v)
                    .map_err(|_| Error::Protocol("short storvsc packet".into()))?,
            ),
            Some(pkt) => {
                tracing::debug!(
                    tx = pkt.transaction_id,
                    "unexpected packet during initialisation"
                );
                None
            }
            None => None,
        };
        ch.commit_in()?;
        if let Some(v) = got {
            return Ok(v);
        }
        ch.await_incoming(deadline)?;
    }
}

/// What a [`Disk`] request does.
#[derive(Debug)]
pub enum DiskOp {
    /// Read `len` bytes at byte `offset`.
    Read {
        /// Byte offset (a multiple of the block size).
        offset: u64,
        /// Bytes (a multiple of the block size).
        len: u32,
    },
    /// Write `data` at byte `offset`; `fua` makes it durable before completion.
    Write {
        /// Byte offset.
        offset: u64,
        /// The data.
        data: Vec<u8>,
        /// Force unit access.
        fua: bool,
    },
    /// Make completed writes durable.
    Flush,
    /// Unmap a range.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Zero a range (WRITE SAME(16) of a zero block; `unmap` lets the disk deallocate).
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// May deallocate.
        unmap: bool,
    },
    /// A raw SCSI command: CDB, data-out bytes or the data-in length.
    Scsi {
        /// The CDB.
        cdb: Vec<u8>,
        /// Data to send (data-out), if any.
        data_out: Vec<u8>,
        /// Bytes to receive (data-in).
        data_in: u32,
    },
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoError {
    /// CHECK CONDITION with this sense key, ASC and ASCQ.
    Sense {
        /// Sense key.
        key: u8,
        /// Additional sense code.
        asc: u8,
        /// Qualifier.
        ascq: u8,
    },
    /// Another SCSI status (BUSY, RESERVATION CONFLICT...).
    Status(u8),
    /// The SRB failed at the transport (no such LUN, aborted...).
    Srb(u8),
    /// The request is malformed (unaligned, too large, beyond the disk).
    Invalid,
    /// The channel is gone.
    Disconnected,
    /// The host moved fewer bytes than the request asked for.
    Short,
}

impl IoError {
    /// Whether the disk refused a write because it is write-protected.
    pub fn is_write_protected(&self) -> bool {
        matches!(self, IoError::Sense { key: 0x07, .. })
    }
}

/// The outcome of a request: data-in bytes (reads, raw commands), a write's own data buffer
/// given back (to be reused), or nothing.
pub type IoResult = Result<Vec<u8>, IoError>;

/// A completion callback.
pub type Callback = Box<dyn FnOnce(IoResult) + Send>;

/// The completion callback of a read submitted with [`Disk::submit_read`]: it sees the data in
/// place, in the queue's bounce pages, for as long as it runs.
pub type ReadCallback = Box<dyn for<'a> FnOnce(Result<ReadView<'a>, IoError>) + Send>;

/// The data a read brought back, still in the queue's bounce pages (guest memory the host
/// filled): valid only while the completion callback that was handed it runs; the request's
/// slot and pages are freed once it returns. Nothing is copied unless asked for, and then only
/// the bytes asked for, through guest memory's checked accessors (never a `&[u8]` over memory
/// the host shares).
///
/// Its length is the bytes the host transferred: at most the length asked, less if the host
/// says it moved less (a short read).
pub struct ReadView<'a> {
    mem: &'a GuestMemory,
    /// Bounce page frame numbers, in order; each checked to be guest memory.
    pages: &'a [u64],
    len: usize,
}

impl std::fmt::Debug for ReadView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadView").field("len", &self.len).finish()
    }
}

impl<'a> ReadView<'a> {
    /// The first `len` bytes of `pages` (consecutive `PAGE_SIZE` pieces). Every page the view
    /// covers must be guest memory: the error names the first that is not. The copies below
    /// then cannot fail (regions are never removed while `mem` is borrowed), but they keep the
    /// checked accessors and answer [`IoError::Disconnected`] rather than trust that.
    fn new(mem: &'a GuestMemory, pages: &'a [u64], len: usize) -> Result<Self, ringbuf::Error> {
        let used = len.div_ceil(PAGE_SIZE as usize);
        let Some(pages) = pages.get(..used) else {
            return Err(ringbuf::Error::OutOfBounds { offset: 0, len });
        };
        if let Some(&bad) = pages.iter().find(|&&p| !mem.contains_page(p)) {
            return Err(ringbuf::Error::GuestAddress {
                gpa: bad.saturating_mul(PAGE_SIZE),
                len: PAGE_SIZE,
            });
        }
        Ok(Self { mem, pages, len })
    }

    /// Bytes of data.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no data (a read of nothing, or the host transferred nothing).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces (guest-physical address, bytes) of `offset .. offset + len`, which must lie
    /// in the view.
    fn pieces(
        &self,
        offset: usize,
        len: usize,
    ) -> Result<impl Iterator<Item = (u64, usize)> + '_, IoError> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(IoError::Invalid);
        }
        let page = PAGE_SIZE as usize;
        let mut at = offset;
        let end = offset + len;
        Ok(std::iter::from_fn(move || {
            (at < end).then(|| {
                let in_page = at % page;
                let n = (page - in_page).min(end - at);
                let gpa = self.pages[at / page] * PAGE_SIZE + in_page as u64;
                at += n;
                (gpa, n)
            })
        }))
    }

    /// Copies `dst.len()` bytes at `offset` into `dst`; [`IoError::Invalid`] if they are not
    /// all in the view.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), IoError> {
        let mut done = 0;
        for (gpa, n) in self.pieces(offset, dst.len())? {
            self.mem
                .read(gpa, &mut dst[done..done + n])
                .map_err(|_| IoError::Disconnected)?;
            done += n;
        }
        Ok(())
    }

    /// Appends all the data to `dst` (a buffer the caller reuses: nothing is zeroed first).
    pub fn append_to(&self, dst: &mut Vec<u8>) -> Result<(), IoError> {
        dst.reserve(self.len);
        for (gpa, n) in self.pieces(0, self.len)? {
            self.mem
                .append_to(gpa, n, dst)
                .map_err(|_| IoError::Disconnected)?;
        }
        Ok(())
    }

    /// All the data in a new `Vec`.
    pub fn to_vec(&self) -> Result<Vec<u8>, IoError> {
        let mut v = Vec::with_capacity(self.len);
        self.append_to(&mut v)?;
        Ok(v)
    }
}

/// What runs when a request completes: a callback that takes the data as a `Vec`
/// ([`Disk::submit`]), or one that reads it in place ([`Disk::submit_read`]).
enum Done {
    Owned(Callback),
    View(ReadCallback),
}

impl Done {
    /// Runs the callback with an error.
    fn fail(self, e: IoError) {
        match self {
            Done::Owned(f) => f(Err(e)),
            Done::View(f) => f(Err(e)),
        }
    }
}

thread_local! {
    /// The queue whose thread this is (null elsewhere): requests submitted here stay on it.
    static ON_QUEUE: std::cell::Cell<*const Shared> = const { std::cell::Cell::new(std::ptr::null()) };
    /// Requests submitted on a queue thread to its own queue (by completion callbacks and
    /// sources, which that thread runs): its next pass takes them. No other thread touches
    /// them, so they skip the `SegQueue` and its atomics (a push and a pop cost about 260
    /// instructions per request, `benches/storage-icount.sh`'s way of counting).
    static ON_QUEUE_REQUESTS: std::cell::RefCell<Vec<Request>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct Request {
    op: DiskOp,
    done: Done,
    /// The LUN it goes to.
    lun: u8,
    /// That LUN's block size (the CDB counts blocks).
    block_size: u32,
    /// When it was submitted (with the latency breakdown).
    born: Option<std::time::Instant>,
}

/// The storvsc hops of the latency breakdown (`vscd --latency-breakdown`).
pub static HOP_ISSUE: Hop = Hop::new("vscd storvsc: request submitted -> SRB in the ring");
/// See [`HOP_ISSUE`]: the host's hops and the transport both ways.
pub static HOP_ROUND_TRIP: Hop = Hop::new("vscd storvsc: SRB in the ring -> its completion read");

/// Size and properties of the disk, from INQUIRY, READ CAPACITY(16) and MODE SENSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Logical blocks.
    pub blocks: u64,
    /// Bytes per logical block.
    pub block_size: u32,
    /// Write protected.
    pub read_only: bool,
    /// Logical block provisioning (UNMAP) enabled.
    pub thin: bool,
}

impl Geometry {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        // `geometry_from` refused a size that does not fit.
        self.blocks.saturating_mul(u64::from(self.block_size))
    }
}

/// A storvsc channel served by a queue thread: the SCSI controller, whose LUNs are [`Disk`]s.
pub struct Controller {
    /// One per channel (the primary, then subchannels); requests go round-robin.
    queues: Vec<QueueHandle>,
    next: std::sync::atomic::AtomicUsize,
    /// The queue the next source goes to (round-robin).
    next_source: std::sync::atomic::AtomicUsize,
    max_transfer: u32,
}

/// A queue thread serving one channel of a controller.
struct QueueHandle {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<Result<Storvsc, Error>>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    stats: Arc<crate::channel::ChannelStats>,
    completed: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("max_transfer", &self.max_transfer)
            .finish()
    }
}

/// A SCSI disk: one LUN of a [`Controller`].
pub struct Disk {
    ctl: Arc<Controller>,
    geometry: Geometry,
    lun: u8,
}

/// Counters of a [`Disk`]: requests completed, and the wakeups its channel needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskStats {
    /// Requests completed (successfully or not).
    pub completed: u64,
    /// Signals the guest sent the host.
    pub signals: u64,
    /// Interrupts the guest took.
    pub interrupts: u64,
    /// Requests written again on a channel reopened after the host went away.
    pub resent: u64,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("geometry", &self.geometry)
            .field("lun", &self.lun)
            .finish()
    }
}

impl Controller {
    /// Starts the queue thread of `storvsc`'s channel.
    pub fn start(storvsc: Storvsc, front: Arc<dyn FrontEnd>) -> Result<Arc<Self>, Error> {
        Self::start_queues(vec![storvsc], front)
    }

    /// Starts a queue thread per channel: the primary first, then its subchannels.
    pub fn start_queues(
        channels: Vec<Storvsc>,
        front: Arc<dyn FrontEnd>,
    ) -> Result<Arc<Self>, Error> {
        let max_transfer = channels
            .iter()
            .map(|c| c.max_transfer)
            .min()
            .unwrap_or(4096);
        let mut queues = Vec::new();
        for storvsc in channels {
            let (mut lp, bell) = EventLoop::new()?;
            lp.set_interrupt(storvsc.ch.interrupt().as_fd())?;
            let shared = Arc::new(Shared {
                requests: SegQueue::new(),
                bell,
                replacement: Mutex::new(None),
                hold_ms: AtomicU64::new(0),
                resent: AtomicU64::new(0),
            });
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let pages = front.alloc_pages(BOUNCE_BYTES / 4096)?;
            let stats = storvsc.ch.stats().clone();
            let completed = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let relid = storvsc.ch.relid;
            let q = Queue {
                shared: shared.clone(),
                st: storvsc,
                front: front.clone(),
                stop: stop.clone(),
                free_pages: pages,
                waiting: VecDeque::new(),
                resend: VecDeque::new(),
                slots: (0..MAX_IN_FLIGHT)
                    .map(|_| InFlight {
                        tx: 0,
                        done: None,
                        pages: Vec::new(),
                        data_in: 0,
                        given_back: Vec::new(),
                        req: ScsiRequest::new_zeroed(),
                        len: 0,
                        sent: None,
                    })
                    .collect(),
                free_slots: (0..=(MAX_IN_FLIGHT - 1) as u8).rev().collect(),
                seq: 1,
                header: Vec::new(),
                callbacks_ran: false,
                completed: completed.clone(),
                hooks: Vec::new(),
                hooks_seen: 0,
                blocked: None,
            };
            let thread = std::thread::Builder::new()
                .name(format!("storvsc-{relid}"))
                .spawn(move || {
                    // With polling off, on the CPU vspd's worker of this channel picks.
                    ringbuf::poller::share_cpu_when_sleeping(relid);
                    q.run(lp)
                })
                .map_err(Error::Thread)?;
            queues.push(QueueHandle {
                shared,
                thread: Mutex::new(Some(thread)),
                stop,
                stats,
                completed,
            });
        }
        Ok(Arc::new(Self {
            queues,
            next: std::sync::atomic::AtomicUsize::new(0),
            next_source: std::sync::atomic::AtomicUsize::new(0),
            max_transfer,
        }))
    }

    /// Registers `hook` to run on every queue thread after each batch of completion callbacks
    /// it ran: callbacks can leave their results for the hook to deliver together (for
    /// example several replies in one socket write). The hook must not block for long: the
    /// queue thread serves every disk of the controller.
    pub fn add_batch_hook(&self, hook: BatchHook) -> BatchHookGuard {
        let bells = self.queues.iter().map(|q| q.shared.bell.clone()).collect();
        BatchHookGuard::register(bells, hook)
    }

    /// Runs `source` on one of the queue threads (round-robin), between its batches, until the
    /// source says it is done or the controller stops (then the source is dropped). Gives the
    /// source back if the controller has stopped.
    pub fn add_source(
        &self,
        source: Box<dyn QueueSource>,
    ) -> Result<SourceWaker, Box<dyn QueueSource>> {
        let i = self.next_source.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        self.queues[i].shared.bell.add_source(source)
    }

    /// Number of queues (channels).
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// How long the queues hold requests while the host is away (0, the default: they fail at
    /// once). Requests in flight and submitted meanwhile wait for
    /// [`replace_channels`](Self::replace_channels); after `hold` without it they fail with
    /// [`IoError::Disconnected`], as do new ones until the channels come back.
    /// A queue holding requests already applies the new time at once (counted from when its
    /// host went away).
    pub fn set_hold(&self, hold: Duration) {
        let ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX);
        for q in &self.queues {
            q.shared.hold_ms.store(ms, Ordering::Relaxed);
            q.shared.bell.ring();
        }
    }

    /// Tells the queues the host went away (they would notice within a second anyway).
    pub fn host_lost(&self) {
        for q in &self.queues {
            q.shared.bell.ring();
        }
    }

    /// Gives each queue, in order, its channel reopened (and initialised) on a new host
    /// session: the queue drops its dead channel, writes its requests in flight again on the
    /// new one and carries on. Returns the channels no queue takes, for the caller to abandon:
    /// those beyond the queue count, and earlier ones a queue had not taken yet. Queues beyond
    /// the channels given stay without a host.
    pub fn replace_channels(&self, channels: Vec<Storvsc>) -> Vec<Storvsc> {
        let mut channels = channels.into_iter();
        let mut left = Vec::new();
        for q in &self.queues {
            let Some(st) = channels.next() else { break };
            let old = q
                .shared
                .replacement
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .replace(st);
            left.extend(old);
            q.shared.bell.ring();
        }
        left.extend(channels);
        left
    }

    fn submit(&self, lun: u8, block_size: u32, op: DiskOp, done: Done) {
        // On one of this controller's queue threads (a source's request): that queue.
        let here = ON_QUEUE.with(|c| c.get());
        let r = Request {
            op,
            done,
            lun,
            block_size,
            born: latency::now(),
        };
        if self.queues.iter().any(|q| Arc::as_ptr(&q.shared) == here) {
            // This thread is that queue's: it takes the request in the pass after the callback
            // or source now running (see `Queue::take_new`).
            ON_QUEUE_REQUESTS.with(|l| l.borrow_mut().push(r));
        } else {
            // A busy queue thread finds the request without a wakeup: no eventfd write per
            // request.
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
            self.queues[i].shared.submit(r);
        }
    }

    fn call(&self, lun: u8, block_size: u32, op: DiskOp) -> IoResult {
        let (tx, rx) = channel();
        self.submit(
            lun,
            block_size,
            op,
            Done::Owned(Box::new(move |r| {
                let _ = tx.send(r);
            })),
        );
        rx.recv().unwrap_or(Err(IoError::Disconnected))
    }

    /// The LUNs of target 0 (REPORT LUNS, sent to LUN 0).
    pub fn report_luns(&self) -> Result<Vec<u8>, Error> {
        let mut cdb = vec![0u8; 12];
        cdb[0] = 0xA0;
        cdb[6..10].copy_from_slice(&(8 + 8 * 256u32).to_be_bytes());
        let data = self
            .call(
                0,
                512,
                DiskOp::Scsi {
                    cdb,
                    data_out: vec![],
                    data_in: 8 + 8 * 256,
                },
            )
            .map_err(|e| Error::Protocol(format!("REPORT LUNS failed: {e:?}")))?;
        if data.len() < 8 {
            return Err(Error::Protocol("short REPORT LUNS data".into()));
        }
        let n = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes")) as usize / 8;
        Ok(data[8..].chunks_exact(8).take(n).map(|e| e[1]).collect())
    }

    /// Probes LUN `lun` and returns it as a disk.
    pub fn disk(self: &Arc<Self>, lun: u8) -> Result<Arc<Disk>, Error> {
        let mut disk = Disk {
            ctl: self.clone(),
            geometry: Geometry {
                blocks: 0,
                block_size: 512,
                read_only: false,
                thin: false,
            },
            lun,
        };
        disk.geometry = disk.probe()?;
        Ok(Arc::new(disk))
    }

    /// Requests completed and wakeups so far, over all queues.
    pub fn stats(&self) -> DiskStats {
        use std::sync::atomic::Ordering::Relaxed;
        let mut d = DiskStats::default();
        for q in &self.queues {
            d.completed += q.completed.load(Relaxed);
            d.resent += q.shared.resent.load(Relaxed);
            d.signals += q.stats.signals.load(Relaxed);
            d.interrupts += q.stats.interrupts.load(Relaxed);
        }
        d
    }

    /// Stops the queue threads (failing queued requests) and gives the channels back (empty
    /// if already stopped).
    pub fn shutdown(&self) -> Result<Vec<Storvsc>, Error> {
        for q in &self.queues {
            q.stop.store(true, std::sync::atomic::Ordering::Release);
            q.shared.bell.ring();
        }
        let mut out = Vec::new();
        for q in &self.queues {
            let t = q.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(t) = t {
                out.push(
                    t.join()
                        .map_err(|_| Error::Protocol("queue thread panicked".into()))??,
                );
            }
        }
        Ok(out)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

impl Disk {
    /// Starts a controller on `storvsc` and probes its LUN `lun` (a channel with one disk).
    pub fn start(storvsc: Storvsc, front: Arc<dyn FrontEnd>, lun: u8) -> Result<Arc<Self>, Error> {
        Controller::start(storvsc, front)?.disk(lun)
    }

    /// The controller this disk is on.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.ctl
    }

    /// The disk's LUN.
    pub fn lun(&self) -> u8 {
        self.lun
    }

    fn probe(&self) -> Result<Geometry, Error> {
        let fail = |what: &str, e: IoError| Error::Protocol(format!("{what} failed: {e:?}"));
        let inq = self
            .command(vec![Opcode::INQUIRY.0, 0, 0, 0, 36, 0], vec![], 36)
            .map_err(|e| fail("INQUIRY", e))?;
        let mut rc = vec![0u8; 16];
        rc[0] = Opcode::SERVICE_ACTION_IN_16.0;
        rc[1] = scsi_proto::service_action::READ_CAPACITY_16;
        rc[13] = 32;
        let cap = self
            .command(rc, vec![], 32)
            .map_err(|e| fail("READ CAPACITY(16)", e))?;
        let ms = self
            .command(
                vec![Opcode::MODE_SENSE_6.0, 0x08, 0x3f, 0, 255, 0],
                vec![],
                255,
            )
            .map_err(|e| fail("MODE SENSE(6)", e))?;
        geometry_from(self.lun, &inq, &cap, &ms)
    }

    /// Requests completed and wakeups so far (of the whole controller).
    pub fn stats(&self) -> DiskStats {
        self.ctl.stats()
    }

    /// The disk's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The largest single transfer.
    pub fn max_transfer(&self) -> u32 {
        self.ctl.max_transfer
    }

    /// Submits a request; `done` runs on the queue thread when it completes.
    pub fn submit(&self, op: DiskOp, done: Callback) {
        self.ctl
            .submit(self.lun, self.geometry.block_size, op, Done::Owned(done))
    }

    /// Submits a read of `len` bytes at `offset` whose callback, on the queue thread, sees the
    /// data where the host put it ([`ReadView`]) instead of a `Vec`: it copies what it needs,
    /// where it needs it, before it returns.
    pub fn submit_read<F>(&self, offset: u64, len: u32, done: F)
    where
        F: for<'a> FnOnce(Result<ReadView<'a>, IoError>) + Send + 'static,
    {
        self.ctl.submit(
            self.lun,
            self.geometry.block_size,
            DiskOp::Read { offset, len },
            Done::View(Box::new(done)),
        )
    }

    /// Submits and waits.
    pub fn call(&self, op: DiskOp) -> IoResult {
        self.ctl.call(self.lun, self.geometry.block_size, op)
    }

    /// A raw SCSI command, waiting for it.
    pub fn command(&self, cdb: Vec<u8>, data_out: Vec<u8>, data_in: u32) -> IoResult {
        self.call(DiskOp::Scsi {
            cdb,
            data_out,
            data_in,
        })
    }

    /// Reads `buf.len()` bytes at `offset`, splitting large reads (the pieces in flight
    /// together). A piece that comes back short is [`IoError::Short`].
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let step = self.ctl.max_transfer as usize;
        let ops = (0..buf.len())
            .step_by(step)
            .map(|at| DiskOp::Read {
                offset: offset + at as u64,
                len: step.min(buf.len() - at) as u32,
            })
            .collect();
        for (chunk, r) in buf.chunks_mut(step).zip(self.call_all(ops)) {
            let data = r?;
            if data.len() != chunk.len() {
                return Err(IoError::Short);
            }
            chunk.copy_from_slice(&data);
        }
        Ok(())
    }

    /// Writes `data` at `offset`, splitting large writes (the pieces in flight together).
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
        let step = self.ctl.max_transfer as usize;
        let ops = data
            .chunks(step)
            .enumerate()
            .map(|(i, c)| DiskOp::Write {
                offset: offset + (i * step) as u64,
                data: c.to_vec(),
                fua,
            })
            .collect();
        self.call_all(ops)
            .into_iter()
            .try_for_each(|r| r.map(|_| ()))
    }

    /// Submits `ops` together and waits for all; results in order.
    pub fn call_all(&self, ops: Vec<DiskOp>) -> Vec<IoResult> {
        let n = ops.len();
        let (tx, rx) = channel();
        for (i, op) in ops.into_iter().enumerate() {
            let tx = tx.clone();
            self.submit(
                op,
                Box::new(move |r| {
                    let _ = tx.send((i, r));
                }),
            );
        }
        let mut out: Vec<IoResult> = (0..n).map(|_| Err(IoError::Disconnected)).collect();
        for _ in 0..n {
            match rx.recv() {
                Ok((i, r)) => out[i] = r,
                Err(_) => break,
            }
        }
        out
    }

    /// Flushes the disk's write cache.
    pub fn flush(&self) -> Result<(), IoError> {
        self.call(DiskOp::Flush).map(|_| ())
    }

    /// Stops the controller's queue threads (every disk on it) and gives the channels back.
    pub fn shutdown(&self) -> Result<Vec<Storvsc>, Error> {
        self.ctl.shutdown()
    }
}

/// A request on the wire: its callback, bounce pages and what to copy back.
struct InFlight {
    /// Its transaction id (slot index in the low 8 bits, a sequence number above).
    tx: u64,
    /// `None` while the slot is free.
    done: Option<Done>,
    /// Bounce pages (guest page numbers); the Vec stays with the slot between requests.
    pages: Vec<u64>,
    /// Bytes to copy back (reads and data-in commands).
    data_in: u32,
    /// A write's data buffer, given back in its result.
    given_back: Vec<u8>,
    /// The SRB as sent, and its data length: to send it again on a reopened channel.
    req: ScsiRequest,
    len: u32,
    /// When it was written to the ring (with the latency breakdown).
    sent: Option<std::time::Instant>,
}

/// What the queue thread shares with submitters.
struct Shared {
    /// Requests submitted and not yet taken by the queue thread.
    requests: SegQueue<Request>,
    /// The queue thread's doorbell (its sleep flag, waker, batch hooks and sources).
    bell: Arc<Doorbell>,
    /// The channel reopened on a new host session, for the queue thread to take.
    replacement: Mutex<Option<Storvsc>>,
    /// How long requests are held while the host is away, in milliseconds.
    hold_ms: AtomicU64,
    /// Requests written again on reopened channels (a counter for [`DiskStats`]).
    resent: AtomicU64,
}

impl Shared {
    /// Queues a request and wakes the queue thread if it may be asleep; fails it at once if
    /// the thread has stopped.
    fn submit(&self, r: Request) {
        self.requests.push(r);
        // The queue thread looks at `requests` after announcing its sleep or its stop.
        if self.bell.handed() == Handed::Closed {
            self.fail_queued();
        }
    }

    fn fail_queued(&self) {
        let mut failed = false;
        while let Some(r) = self.requests.pop() {
            r.done.fail(IoError::Disconnected);
            failed = true;
        }
        if failed {
            self.bell.hooks().run_all();
        }
    }
}

struct Queue {
    shared: Arc<Shared>,
    st: Storvsc,
    front: Arc<dyn FrontEnd>,
    stop: Arc<AtomicBool>,
    free_pages: Vec<u64>,
    /// Requests taken from `shared` that do not fit yet (no slot, bounce pages or ring room).
    waiting: VecDeque<Request>,
    /// Slots of requests in flight to write again (on a reopened channel), in their order.
    resend: VecDeque<u8>,
    /// `MAX_IN_FLIGHT` slots; `free_slots` holds the indices of the free ones.
    slots: Vec<InFlight>,
    free_slots: Vec<u8>,
    /// Sequence number for the next transaction id.
    seq: u64,
    /// The GPA-direct header being built (kept to reuse its allocation).
    header: Vec<u8>,
    /// Callbacks ran outside the completion loop (failed requests): the batch hooks are due.
    callbacks_ran: bool,
    completed: Arc<AtomicU64>,
    /// The batch hooks as last copied, and the version copied.
    hooks: Vec<BatchHook>,
    hooks_seen: u64,
    /// The ring bytes the last request that did not fit needed (`None`: it waited for a slot
    /// or bounce pages, or nothing waited).
    blocked: Option<u32>,
}

impl QueueWork for Queue {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn pass(&mut self, _lp: &mut EventLoop) -> Result<bool, Error> {
        let mut moved = false;
        self.take_new();
        // Issue what fits: requests to send again first, then new ones.
        self.blocked = None;
        while let Some(&slot_no) = self.resend.front() {
            match self.reissue(slot_no)? {
                None => {
                    self.resend.pop_front();
                    moved = true;
                }
                Some(needed) => {
                    self.blocked = Some(needed);
                    break;
                }
            }
        }
        while let Some(r) = self
            .resend
            .is_empty()
            .then(|| self.waiting.pop_front())
            .flatten()
        {
            match self.issue(r)? {
                Ok(()) => moved = true,
                Err((r, needed)) => {
                    self.waiting.push_front(r);
                    self.blocked = needed;
                    break;
                }
            }
        }
        self.st.ch.commit_out()?;
        // Completions.
        self.st.ch.inc.mask();
        let mut completed = false;
        // The host asleep: every publication of requests would cost it a signal and a wakeup;
        // completing (and so resubmitting) all at once sends them with one.
        let batch = if self.st.ch.out.reader_waiting() {
            MAX_IN_FLIGHT
        } else {
            COMPLETE_BATCH
        };
        for _ in 0..batch {
            match self.complete_one()? {
                Some(n) => completed |= n,
                None => break,
            }
        }
        self.st.ch.commit_in()?;
        if completed || std::mem::take(&mut self.callbacks_ran) {
            moved = true;
            self.shared
                .bell
                .hooks()
                .refresh(&mut self.hooks_seen, &mut self.hooks);
            for h in &self.hooks {
                h();
            }
        }
        Ok(moved)
    }

    fn in_flight(&self) -> bool {
        Queue::in_flight(self) > 0
    }

    fn serves_requests(&self) -> bool {
        true
    }

    fn prepare_sleep(&mut self) -> Result<bool, Error> {
        let (empty, signal) = self.st.ch.inc.prepare_sleep();
        if signal {
            self.st.ch.signal_host()?;
        }
        let still_blocked = match self.blocked {
            Some(n) => self.st.ch.out.prepare_sleep(n),
            None => true,
        };
        Ok(empty && still_blocked)
    }

    fn cancel_sleep(&mut self) {
        self.st.ch.out.clear_pending();
    }

    fn handed_work(&self) -> bool {
        !self.shared.requests.is_empty() || ON_QUEUE_REQUESTS.with(|l| !l.borrow().is_empty())
    }

    fn before_sleep(&mut self) {
        // Drops the copies of hooks unregistered since the last batch.
        self.shared
            .bell
            .hooks()
            .refresh(&mut self.hooks_seen, &mut self.hooks);
    }

    fn woke(&mut self, woke: Woke) -> Result<(), Error> {
        if woke.interrupt {
            // The loop watches the line edge-triggered: no need to reset it.
            self.st.ch.count_interrupt();
        }
        if !self.st.ch.host_alive() {
            // The daemon is gone: nothing will complete; fail what is pending.
            return Err(Error::Disconnected);
        }
        Ok(())
    }
}

/// What an SRB needs: CDB, direction, bytes, and the data-out bytes (borrowed from the
/// request where it has them).
struct Srb<'a> {
    cdb: [u8; 16],
    cdb_len: u8,
    dir: DataDirection,
    len: u32,
    data_out: Option<std::borrow::Cow<'a, [u8]>>,
}

impl Srb<'_> {
    fn cdb(&self) -> &[u8] {
        &self.cdb[..usize::from(self.cdb_len)]
    }
}

/// A CDB in a fixed array.
fn cdb_of(bytes: &[u8]) -> ([u8; 16], u8) {
    let mut cdb = [0u8; 16];
    cdb[..bytes.len()].copy_from_slice(bytes);
    (cdb, bytes.len() as u8)
}

impl Queue {
    fn run(mut self, mut lp: EventLoop) -> Result<Storvsc, Error> {
        ON_QUEUE.with(|c| c.set(Arc::as_ptr(&self.shared)));
        let result = loop {
            match lp.run(&mut self) {
                // Its session is over (the daemon went away): hold the requests until the
                // channel is reopened on a new one.
                Err(e) if !self.st.ch.host_alive() => {
                    tracing::debug!(error = %e, "storvsc queue lost its host");
                    match self.host_down(&mut lp) {
                        Ok(true) => continue,
                        Ok(false) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
                r => break r,
            }
        };
        // No longer this queue's thread: what the callbacks below submit goes through
        // `shared` (failed there once the doorbell is closed), not to a list no pass takes.
        ON_QUEUE.with(|c| c.set(std::ptr::null()));
        self.take_new();
        self.resend.clear();
        for s in &mut self.slots {
            if let Some(done) = s.done.take() {
                done.fail(IoError::Disconnected);
            }
        }
        for r in self.waiting.drain(..) {
            r.done.fail(IoError::Disconnected);
        }
        // The callbacks above may have left results for the hooks to deliver.
        self.shared.bell.hooks().run_all();
        // From here submitters fail their requests themselves; the sources end with the queue
        // (see `Doorbell::add_source` for the order).
        lp.close();
        self.shared.fail_queued();
        if let Err(e) = &result {
            tracing::warn!(error = %e, "storvsc queue stopped");
        }
        result.map(|()| self.st)
    }

    fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.free_slots.len()
    }

    /// Moves the requests submitted since the last pass into `waiting`: those other threads
    /// handed over `shared`, then those this thread submitted to itself.
    fn take_new(&mut self) {
        while let Some(r) = self.shared.requests.pop() {
            self.waiting.push_back(r);
        }
        ON_QUEUE_REQUESTS.with(|l| self.waiting.extend(l.borrow_mut().drain(..)));
    }
    fn srb_for(op: &DiskOp, bs: u32) -> Result<Srb<'_>, IoError> {
        use std::borrow::Cow;
        Ok(match op {
            DiskOp::Read { offset, len } => {
                let (cdb, cdb_len) = rw16(bs, 0x88, *offset, *len, false)?;
                Srb {
                    cdb,
                    cdb_len,
                    dir: DataDirection::READ,
                    len: *len,
                    data_out: None,
                }
            }
            DiskOp::Write { offset, data, fua } => {
                let len = u32::try_from(data.len()).map_err(|_| IoError::Invalid)?;
                let (cdb, cdb_len) = rw16(bs, 0x8a, *offset, len, *fua)?;
                Srb {
                    cdb,
                    cdb_len,
                    dir: DataDirection::WRITE,
                    len,
                    data_out: Some(Cow::Borrowed(data)),
                }
            }
            DiskOp::Flush => {
                let (cdb, cdb_len) = cdb_of(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
                Srb {
                    cdb,
                    cdb_len,
                    dir: DataDirection::UNKNOWN,
                    len: 0,
                    data_out: None,
                }
            }
            DiskOp::Discard { offset, len } => {
                let (lba, blocks) = blocks_of(bs, *offset, *len)?;
                let mut list = vec![0u8; 24];
                list[0..2].copy_from_slice(&22u16.to_be_bytes());
                list[2..4].copy_from_slice(&16u16.to_be_bytes());
                list[8..16].copy_from_slice(&lba.to_be_bytes());
                list[16..20].copy_from_slice(&blocks.to_be_bytes());
                let mut cdb = [0u8; 10];
                cdb[0] = 0x42;
                cdb[7..9].copy_from_slice(&24u16.to_be_bytes());
                let (cdb, cdb_len) = cdb_of(&cdb);
                Srb {
                    cdb,
                    cdb_len,
                    dir: DataDirection::WRITE,
                    len: 24,
                    data_out: Some(Cow::Owned(list)),
                }
            }
            DiskOp::WriteZeroes { offset, len, unmap } => {
                let (lba, blocks) = blocks_of(bs, *offset, *len)?;
                let mut cdb = [0u8; 16];
                cdb[0] = 0x93;
                cdb[1] = if *unmap { 0x08 } else { 0 };
                cdb[2..10].copy_from_slice(&lba.to_be_bytes());
                cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
                Srb {
                    cdb,
                    cdb_len: 16,
                    dir: DataDirection::WRITE,
                    len: bs,
                    data_out: Some(Cow::Owned(vec![0u8; bs as usize])),
                }
            }
            DiskOp::Scsi {
                cdb,
                data_out,
                data_in,
            } => {
                if cdb.is_empty() || cdb.len() > 16 {
                    return Err(IoError::Invalid);
                }
                let (cdb, cdb_len) = cdb_of(cdb);
                if !data_out.is_empty() {
                    Srb {
                        cdb,
                        cdb_len,
                        dir: DataDirection::WRITE,
                        len: u32::try_from(data_out.len()).map_err(|_| IoError::Invalid)?,
                        data_out: Some(Cow::Borrowed(data_out)),
                    }
                } else {
                    Srb {
                        cdb,
                        cdb_len,
                        dir: if *data_in > 0 {
                            DataDirection::READ
                        } else {
                            DataDirection::UNKNOWN
                        },
                        len: *data_in,
                        data_out: None,
                    }
                }
            }
        })
    }

    /// Fails a request that did not reach the host: its callback now, the batch hooks after
    /// (the loop runs them when `callbacks_ran` is set).
    fn fail(&mut self, done: Done, e: IoError) {
        self.callbacks_ran = true;
        done.fail(e);
    }

    /// Writes one request into the ring. `Ok(Err(..))` gives it back when there is no room
    /// (bounce pages, slots or ring space), with the ring bytes needed if the ring was full.
    #[allow(clippy::type_complexity)]
    fn issue(&mut self, mut r: Request) -> Result<Result<(), (Request, Option<u32>)>, Error> {
        let srb = match Self::srb_for(&r.op, r.block_size) {
            Ok(s) => s,
            Err(e) => {
                self.fail(r.done, e);
                return Ok(Ok(()));
            }
        };
        if srb.len > self.st.max_transfer.max(512) || srb.len as usize > BOUNCE_BYTES {
            self.fail(r.done, IoError::Invalid);
            return Ok(Ok(()));
        }
        let npages = (srb.len as usize).div_ceil(4096);
        let Some(&slot_no) = self.free_slots.last() else {
            return Ok(Err((r, None)));
        };
        if self.free_pages.len() < npages {
            return Ok(Err((r, None)));
        }
        let slot = &mut self.slots[usize::from(slot_no)];
        slot.pages.clear();
        let at = self.free_pages.len() - npages;
        slot.pages.extend(self.free_pages.drain(at..));
        if let Some(data) = &srb.data_out {
            let mem = self.front.memory();
            let copied = data
                .chunks(4096)
                .enumerate()
                .try_for_each(|(i, chunk)| mem.write(slot.pages[i] * 4096, chunk));
            if let Err(e) = copied {
                // Our own bounce pages are not guest memory: the channel is unusable.
                self.free_pages.append(&mut slot.pages);
                self.fail(r.done, IoError::Disconnected);
                return Err(e.into());
            }
        }
        let mut req = ScsiRequest::new_zeroed();
        req.length = SCSI_REQUEST_SIZE as u16;
        req.lun = r.lun;
        req.cdb_length = srb.cdb_len;
        req.sense_info_length = SENSE_BUFFER_SIZE as u8;
        req.data_in = srb.dir;
        req.data_transfer_length = srb.len;
        req.cdb_or_sense[..srb.cdb().len()].copy_from_slice(srb.cdb());
        req.srb_flags = match srb.dir {
            DataDirection::READ => srb_flags::DATA_IN,
            DataDirection::WRITE => srb_flags::DATA_OUT,
            _ => srb_flags::NO_DATA_TRANSFER,
        } | srb_flags::DISABLE_SYNCH_TRANSFER;
        req.time_out_value = 60;
        let tx = ((self.seq << 8) | u64::from(slot_no)) & !CONTROL_TX;
        let written = write_srb(
            &mut self.st.ch.out,
            &mut self.header,
            &req,
            srb.len,
            &slot.pages,
            tx,
        );
        let data_in = if srb.dir == DataDirection::READ {
            srb.len
        } else {
            0
        };
        match written {
            Ok(()) => {}
            Err(ringbuf::Error::Full { needed, .. }) => {
                self.free_pages.append(&mut slot.pages);
                return Ok(Err((r, Some(needed))));
            }
            Err(e) => {
                self.free_pages.append(&mut slot.pages);
                self.fail(r.done, IoError::Disconnected);
                return Err(e.into());
            }
        }
        let len = srb.len;
        self.seq = self.seq.wrapping_add(1);
        self.free_slots.pop();
        slot.tx = tx;
        // A write's buffer goes back to its submitter with the completion: freed here, on
        // another thread than the one that allocated it, it would cost an allocator lock.
        slot.given_back = match &mut r.op {
            DiskOp::Write { data, .. } => std::mem::take(data),
            _ => Vec::new(),
        };
        slot.done = Some(r.done);
        slot.data_in = data_in;
        slot.sent = latency::now();
        HOP_ISSUE.between(r.born, slot.sent);
        slot.req = req;
        slot.len = len;
        Ok(Ok(()))
    }

    /// Writes the request of slot `slot_no` again (on a reopened channel) under a new
    /// transaction id; the ring bytes needed if the ring is full.
    fn reissue(&mut self, slot_no: u8) -> Result<Option<u32>, Error> {
        let tx = ((self.seq << 8) | u64::from(slot_no)) & !CONTROL_TX;
        let slot = &mut self.slots[usize::from(slot_no)];
        match write_srb(
            &mut self.st.ch.out,
            &mut self.header,
            &slot.req,
            slot.len,
            &slot.pages,
            tx,
        ) {
            Ok(()) => {
                self.seq = self.seq.wrapping_add(1);
                slot.tx = tx;
                Ok(None)
            }
            Err(ringbuf::Error::Full { needed, .. }) => Ok(Some(needed)),
            Err(e) => Err(e.into()),
        }
    }

    /// The host went away: holds the requests (those in flight keep their slots and bounce
    /// pages) until the channel is reopened (true: serve it) or the queue stops (false). After
    /// the hold time, fails them and every new one until then.
    fn host_down(&mut self, lp: &mut EventLoop) -> Result<bool, Error> {
        // Completions the host wrote before it went are real answers: take them. The batch
        // hooks are due in any case: the loop may have left before running them for the
        // callbacks of its last batch (a failed signal).
        self.st.ch.inc.mask();
        while let Ok(Some(_)) = self.complete_one() {}
        let _ = self.st.ch.commit_in();
        self.callbacks_ran = true;
        let shared = self.shared.clone();
        let hold = move || Duration::from_millis(shared.hold_ms.load(Ordering::Relaxed));
        let since = Instant::now();
        let mut failing = false;
        tracing::warn!(
            relid = self.st.ch.relid,
            in_flight = self.in_flight(),
            waiting = self.waiting.len(),
            hold = ?hold(),
            "storvsc: the host went away; holding requests"
        );
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(false);
            }
            let new = self
                .shared
                .replacement
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(st) = new {
                self.adopt(st, lp)?;
                return Ok(true);
            }
            self.take_new();
            // Read each time: the owner may shorten it (to stop).
            let deadline = since
                .checked_add(hold())
                .unwrap_or(since + Duration::from_secs(86_400));
            if !failing && Instant::now() >= deadline {
                failing = true;
                if self.in_flight() + self.waiting.len() > 0 {
                    tracing::warn!(
                        relid = self.st.ch.relid,
                        "storvsc: no host after {:?}: failing the requests held",
                        since.elapsed()
                    );
                }
                self.fail_in_flight();
            }
            if failing {
                while let Some(r) = self.waiting.pop_front() {
                    self.fail(r.done, IoError::Disconnected);
                }
            }
            let moved = lp.has_sources() && lp.poll_sources();
            if std::mem::take(&mut self.callbacks_ran) {
                self.shared.bell.hooks().run_all();
            }
            if moved {
                continue;
            }
            let left = if failing {
                MAX_SLEEP
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            // Wakes for a submitter, the reconnection, a source, or the deadline (the dead
            // channel's line is ignored).
            let requests = &self.shared.requests;
            lp.sleep_unless(left.min(MAX_SLEEP), || !requests.is_empty())?;
        }
    }

    /// Fails every request in flight (the host will not answer them) and frees their slots.
    fn fail_in_flight(&mut self) {
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Some(done) = s.done.take() {
                self.free_pages.append(&mut s.pages);
                self.free_slots.push(i as u8);
                s.given_back = Vec::new();
                self.callbacks_ran = true;
                done.fail(IoError::Disconnected);
            }
        }
        self.resend.clear();
    }

    /// Takes a channel reopened on a new host session: the dead one's ring pages are freed,
    /// and the requests in flight are written again, oldest first.
    fn adopt(&mut self, mut st: Storvsc, lp: &mut EventLoop) -> Result<(), Error> {
        st.ch.adopt_stats(self.st.ch.stats().clone());
        // Watch the new line before the old one closes.
        lp.set_interrupt(st.ch.interrupt().as_fd())?;
        let old = std::mem::replace(&mut self.st, st);
        old.into_channel().abandon(&self.front);
        let mut busy: Vec<(u64, u8)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.done.is_some())
            .map(|(i, s)| (s.tx >> 8, i as u8))
            .collect();
        busy.sort_unstable();
        self.resend = busy.into_iter().map(|(_, i)| i).collect();
        self.shared
            .resent
            .fetch_add(self.resend.len() as u64, Ordering::Relaxed);
        tracing::warn!(
            relid = self.st.ch.relid,
            resend = self.resend.len(),
            waiting = self.waiting.len(),
            "storvsc: channel reopened; sending the requests in flight again"
        );
        Ok(())
    }

    /// Handles one packet from the host; `None` when the ring is empty.
    fn complete_one(&mut self) -> Result<Option<bool>, Error> {
        let Some(pkt) = self.st.ch.inc.read()? else {
            return Ok(None);
        };
        if !matches!(pkt.kind, PacketKind::Completion | PacketKind::InBand) {
            return Ok(Some(false));
        }
        let tx = pkt.transaction_id;
        let Some(slot_no) = slot_of(&self.slots, tx) else {
            tracing::debug!(tx, "completion for no request");
            return Ok(Some(false));
        };
        let slot = &mut self.slots[usize::from(slot_no)];
        HOP_ROUND_TRIP.since(slot.sent.take());
        let outcome = completion_outcome(pkt.payload, slot.data_in)?;
        let done = slot.done.take().expect("checked above");
        let given_back = std::mem::take(&mut slot.given_back);
        // The data (`n` is at most the length asked, checked by `completion_outcome`, and 0
        // when nothing was to come back) stays in the bounce pages: a view callback reads it
        // there, a `Vec` callback gets a copy. Pages that are not guest memory break the channel.
        let mut broken = None;
        let view = outcome.and_then(
            |n| match ReadView::new(self.front.memory(), &slot.pages, n) {
                Ok(v) => Ok(v),
                Err(e) => {
                    broken = Some(e);
                    Err(IoError::Disconnected)
                }
            },
        );
        match done {
            Done::View(f) => f(view),
            Done::Owned(f) => f(match view {
                Ok(_) if slot.data_in == 0 => Ok(given_back),
                Ok(v) => v.to_vec(),
                Err(e) => Err(e),
            }),
        }
        self.free_pages.append(&mut slot.pages);
        self.free_slots.push(slot_no);
        if let Some(e) = broken {
            return Err(e.into());
        }
        self.completed.fetch_add(1, Ordering::Relaxed);
        Ok(Some(true))
    }
}

/// Writes an EXECUTE_SRB packet for `req` (GPA-direct over `pages` when `len` is not 0).
fn write_srb(
    out: &mut ringbuf::OutgoingRing,
    header: &mut Vec<u8>,
    req: &ScsiRequest,
    len: u32,
    pages: &[u64],
    tx: u64,
) -> Result<(), ringbuf::Error> {
    let mut p = VstorPacket::new(VstorOperation::EXECUTE_SRB, REQUEST_COMPLETION_FLAG, 0);
    p.set_body(req);
    let parts = [p.as_bytes()];
    if len > 0 {
        gpa_direct_header(header, &[(0, len, pages)]);
        out.write(&OutgoingPacket {
            packet_type: PacketType::DATA_USING_GPA_DIRECT,
            flags: vmbus_proto::ring::PACKET_FLAG_COMPLETION_REQUESTED,
            transaction_id: tx,
            header,
            payload: &parts,
        })
    } else {
        out.write(&OutgoingPacket::in_band(tx, true, &parts))
    }
}

/// What a host's completion packet (`payload`, after the ring's packet header) says of the
/// request it answers, which expected `data_in` bytes back: the bytes of data the host
/// transferred (at most `data_in`), or the request's error. A payload too short for a VSTOR
/// packet is a protocol error (the channel is broken). The host is not trusted: every field
/// is taken as it comes, and nothing it says can make this index or allocate beyond
/// `data_in`.
pub fn completion_outcome(payload: &[u8], data_in: u32) -> Result<Result<usize, IoError>, Error> {
    let Ok((vp, _)) = VstorPacket::read_from_prefix(payload) else {
        return Err(Error::Protocol("short storvsc completion".into()));
    };
    let srb: ScsiRequest = vp.body();
    Ok(if { vp.operation } != VstorOperation::COMPLETE_IO {
        Err(IoError::Srb(0))
    } else if srb_status::code(srb.srb_status) != srb_status::SUCCESS || srb.scsi_status != 0 {
        if srb.scsi_status == scsi_proto::status::CHECK_CONDITION {
            let s = &srb.cdb_or_sense[..CDB_SENSE_AREA_SIZE];
            Err(IoError::Sense {
                key: s[2] & 0x0f,
                asc: s[12],
                ascq: s[13],
            })
        } else if srb.scsi_status != 0 {
            Err(IoError::Status(srb.scsi_status))
        } else {
            Err(IoError::Srb(srb.srb_status))
        }
    } else {
        Ok(srb.data_transfer_length.min(data_in) as usize)
    })
}

/// A disk's geometry from the host's answers to INQUIRY, READ CAPACITY(16) and MODE SENSE(6)
/// (each as the host returned it, possibly short). The host is not trusted: a LUN that is
/// not a disk, or a capacity that is implausible or whose size in bytes does not fit 64 bits,
/// is refused.
pub fn geometry_from(
    lun: u8,
    inquiry: &[u8],
    capacity: &[u8],
    mode_sense: &[u8],
) -> Result<Geometry, Error> {
    if inquiry.first().map(|b| b & 0x1f) != Some(0) {
        return Err(Error::Protocol(format!("LUN {lun} is not a disk")));
    }
    let (Some(last), Some(block_size)) = (
        capacity
            .get(0..8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes"))),
        capacity
            .get(8..12)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes"))),
    ) else {
        return Err(Error::Protocol("short READ CAPACITY(16) data".into()));
    };
    let thin = capacity.get(14).is_some_and(|b| b & 0x80 != 0);
    let size = last
        .checked_add(1)
        .and_then(|blocks| blocks.checked_mul(u64::from(block_size)));
    if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() || size.is_none() {
        return Err(Error::Protocol(format!(
            "implausible capacity: {last} blocks of {block_size}"
        )));
    }
    Ok(Geometry {
        blocks: last + 1,
        block_size,
        read_only: mode_sense.get(2).is_some_and(|b| b & 0x80 != 0),
        thin,
    })
}

/// The slot of the request in flight whose transaction id the host names, if there is one
/// (the host is not trusted: an id may be stale, forged or out of range).
fn slot_of(slots: &[InFlight], tx: u64) -> Option<u8> {
    let slot_no = (tx & 0xff) as u8;
    slots
        .get(usize::from(slot_no))
        .filter(|s| s.done.is_some() && s.tx == tx)
        .map(|_| slot_no)
}

/// Byte range to (LBA, blocks) for `bs`-byte blocks; unaligned ranges are invalid.
fn blocks_of(bs: u32, offset: u64, len: u64) -> Result<(u64, u32), IoError> {
    let bs = u64::from(bs);
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) || len / bs > u64::from(u32::MAX) {
        return Err(IoError::Invalid);
    }
    Ok((offset / bs, (len / bs) as u32))
}

/// READ(16)/WRITE(16), and its length.
fn rw16(bs: u32, op: u8, offset: u64, len: u32, fua: bool) -> Result<([u8; 16], u8), IoError> {
    let (lba, blocks) = blocks_of(bs, offset, u64::from(len))?;
    let mut cdb = [0u8; 16];
    cdb[0] = op;
    cdb[1] = if fua { 0x08 } else { 0 };
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    Ok((cdb, 16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_hosts_capacity_is_refused_where_it_cannot_be_served() {
        let inquiry = [0u8; 36];
        let cap = |last: u64, bs: u32| {
            let mut c = last.to_be_bytes().to_vec();
            c.extend(bs.to_be_bytes());
            c.extend([0, 0, 0x80, 0]);
            c
        };
        let g = geometry_from(0, &inquiry, &cap(2047, 512), &[0, 0, 0x80]).unwrap();
        assert_eq!((g.size(), g.read_only, g.thin), (1 << 20, true, true));
        // The size in bytes does not fit 64 bits (it used to overflow in `size`).
        assert!(geometry_from(0, &inquiry, &cap(u64::MAX / 512, 4096), &[]).is_err());
        assert!(geometry_from(0, &inquiry, &cap(u64::MAX, 512), &[]).is_err());
        assert!(
            geometry_from(0, &inquiry, &cap(7, 1000), &[]).is_err(),
            "not a power of two"
        );
        assert!(
            geometry_from(0, &inquiry, &cap(7, 512)[..10], &[]).is_err(),
            "short"
        );
        assert!(
            geometry_from(0, &[0x05], &cap(7, 512), &[]).is_err(),
            "a CD-ROM"
        );
        assert!(
            geometry_from(0, &[], &cap(7, 512), &[]).is_err(),
            "no INQUIRY data"
        );
    }

    #[test]
    fn completions_never_promise_more_data_than_was_asked() {
        let mut vp = VstorPacket::new(VstorOperation::COMPLETE_IO, 0, 0);
        let mut srb = ScsiRequest::new_zeroed();
        srb.srb_status = srb_status::SUCCESS;
        srb.data_transfer_length = u32::MAX;
        vp.set_body(&srb);
        assert_eq!(
            completion_outcome(vp.as_bytes(), 4096).unwrap().unwrap(),
            4096
        );
        srb.scsi_status = scsi_proto::status::CHECK_CONDITION;
        srb.cdb_or_sense[2] = 0x05;
        srb.cdb_or_sense[12] = 0x24;
        vp.set_body(&srb);
        assert!(matches!(
            completion_outcome(vp.as_bytes(), 4096).unwrap(),
            Err(IoError::Sense {
                key: 5,
                asc: 0x24,
                ascq: 0
            })
        ));
        assert!(completion_outcome(&vp.as_bytes()[..10], 4096).is_err());
    }

    fn slot(tx: u64, busy: bool) -> InFlight {
        InFlight {
            tx,
            done: busy.then(|| Done::Owned(Box::new(|_| {}))),
            pages: Vec::new(),
            data_in: 0,
            given_back: Vec::new(),
            req: ScsiRequest::new_zeroed(),
            len: 0,
            sent: None,
        }
    }

    #[test]
    fn completions_match_only_requests_in_flight() {
        // Slot 0 free (its last id 0x100), slot 1 busy with id 0x201, slot 2 busy with 0x302.
        let slots = vec![slot(0x100, false), slot(0x201, true), slot(0x302, true)];
        assert_eq!(slot_of(&slots, 0x201), Some(1));
        assert_eq!(slot_of(&slots, 0x302), Some(2));
        // A completion for a slot that is free: stale (answered already) or made up.
        assert_eq!(slot_of(&slots, 0x100), None);
        // The right slot, another sequence number: an earlier request of that slot.
        assert_eq!(slot_of(&slots, 0x101), None);
        assert_eq!(slot_of(&slots, 0x1201), None);
        // A slot beyond the table, and a control request's id.
        assert_eq!(slot_of(&slots, 0x2ff), None);
        assert_eq!(slot_of(&slots, CONTROL_TX | 1), None);
    }

    /// Guest memory of 16 pages, page `p` filled with bytes `p * 16 + i % 16`.
    fn stamped_memory() -> GuestMemory {
        let mut mem = GuestMemory::new();
        let fd = ringbuf::shmem::create_memfd("view", 16 * PAGE_SIZE).unwrap();
        mem.add_region(0, 16 * PAGE_SIZE, fd, 0).unwrap();
        for p in 0..16u64 {
            let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (p * 16 + i % 16) as u8).collect();
            mem.write(p * PAGE_SIZE, &page).unwrap();
        }
        mem
    }

    /// What the bounce pages `pages` hold, first `len` bytes, as `stamped_memory` made them.
    fn stamped(pages: &[u64], len: usize) -> Vec<u8> {
        (0..len)
            .map(|at| (pages[at / 4096] * 16 + at as u64 % 16) as u8)
            .collect()
    }

    #[test]
    fn a_read_view_copies_the_bytes_of_its_pages_in_order() {
        let mem = stamped_memory();
        // Scattered, out of order, one page twice; a length that is not a page multiple.
        let pages = [7u64, 2, 11, 2, 5];
        let len = 3 * 4096 + 1536;
        let view = ReadView::new(&mem, &pages, len).unwrap();
        assert_eq!((view.len(), view.is_empty()), (len, false));
        let want = stamped(&pages, len);
        assert_eq!(view.to_vec().unwrap(), want);
        // Appended after what a reused buffer holds.
        let mut buf = b"header".to_vec();
        view.append_to(&mut buf).unwrap();
        assert_eq!((&buf[..6], &buf[6..]), (&b"header"[..], &want[..]));
        // Ranges within a page, across page ends, at the very end.
        for (at, n) in [
            (0, 8),
            (4090, 12),
            (4096, 4096),
            (100, 3 * 4096),
            (len - 5, 5),
        ] {
            let mut dst = vec![0u8; n];
            view.read_at(at, &mut dst).unwrap();
            assert_eq!(dst, want[at..at + n], "{n} bytes at {at}");
        }
        view.read_at(len, &mut []).unwrap();
        // Beyond the data (the fifth page is not part of it), or overflowing.
        assert_eq!(view.read_at(len - 4, &mut [0; 5]), Err(IoError::Invalid));
        assert_eq!(view.read_at(usize::MAX, &mut [0; 2]), Err(IoError::Invalid));
    }

    #[test]
    fn a_short_completion_gives_a_view_of_the_bytes_the_host_moved() {
        let mem = stamped_memory();
        let pages = [3u64, 9, 4];
        let mut vp = VstorPacket::new(VstorOperation::COMPLETE_IO, 0, 0);
        let mut srb = ScsiRequest::new_zeroed();
        srb.srb_status = srb_status::SUCCESS;
        srb.data_transfer_length = 4096 + 1000;
        vp.set_body(&srb);
        let n = completion_outcome(vp.as_bytes(), 3 * 4096)
            .unwrap()
            .unwrap();
        let view = ReadView::new(&mem, &pages, n).unwrap();
        assert_eq!(view.len(), 5096);
        assert_eq!(view.to_vec().unwrap(), stamped(&pages, 5096));
        assert_eq!(view.read_at(5000, &mut [0; 200]), Err(IoError::Invalid));
        // Nothing moved: an empty view.
        let view = ReadView::new(&mem, &pages, 0).unwrap();
        assert!(view.is_empty() && view.to_vec().unwrap().is_empty());
    }

    #[test]
    fn a_view_over_pages_that_are_not_guest_memory_is_refused() {
        let mem = stamped_memory();
        // The bytes asked for reach a page beyond memory: refused, whatever the others.
        assert!(matches!(
            ReadView::new(&mem, &[1, 16], 4097),
            Err(ringbuf::Error::GuestAddress { gpa: 65536, .. })
        ));
        assert!(ReadView::new(&mem, &[u64::MAX], 1).is_err());
        // More bytes than the pages hold.
        assert!(ReadView::new(&mem, &[1, 2], 2 * 4096 + 1).is_err());
        // A page beyond memory that the data does not reach is not read, so not refused.
        assert_eq!(ReadView::new(&mem, &[1, 16], 4096).unwrap().len(), 4096);
    }

    #[test]
    fn read_write_cdbs() {
        let (cdb, len) = rw16(512, 0x88, 4096, 8192, false).unwrap();
        assert_eq!(len, 16);
        assert_eq!(cdb[0], 0x88);
        assert_eq!(u64::from_be_bytes(cdb[2..10].try_into().unwrap()), 8);
        assert_eq!(u32::from_be_bytes(cdb[10..14].try_into().unwrap()), 16);
        let (cdb, _) = rw16(4096, 0x8a, 0, 4096, true).unwrap();
        assert_eq!(cdb[1], 0x08, "FUA");
        assert_eq!(rw16(512, 0x88, 100, 512, false), Err(IoError::Invalid));
    }
}
