//! netvsp: the synthetic NIC's device, one per channel (the primary and each subchannel),
//! over one queue of the host's TAP.
//!
//! The primary channel speaks the control protocol (NVSP version, NDIS version and config, the
//! receive and send buffers, RNDIS INITIALIZE/QUERY/SET/..., subchannel allocation); every
//! channel moves frames: the guest's RNDIS data messages (in send-buffer sections or GPA-direct
//! pages) go to its TAP queue with one `writev` (a virtio-net header and a rewritten copy of the
//! frame's headers where offloads need it, then the frame straight from guest memory), and the
//! TAP queue's frames are read with one `readv` straight into a free section of the guest's
//! receive buffer, announced with a transfer-page packet, and the section comes back with the
//! guest's completion. When the guest negotiated receive segment coalescing (RSC, NVSP 6.1)
//! and enabled it, the TAP is given checksum and TCP segmentation offloads: it then hands over
//! the host's TCP super-frames (up to 64 KiB) whole, each read into a per-channel buffer and
//! delivered as one transfer-page packet of several sections, one per TCP segment, each an
//! RNDIS packet marked as a fragment (first, middle, last) of one coalesced frame; small
//! frames then go the same way, one section each. A channel's receive sections are its own slice of the buffer, so no lock
//! is taken per frame and a guest that never returns sections stalls only its own queue (the
//! TAP keeps, then drops, what it cannot hand over; memory stays bounded).
//!
//! The protocol logic without I/O is in [`protocol`]; the buffers the guest lends are reached
//! page by page through [`buffer::GuestBuffer`].

pub mod buffer;
pub mod harness;
pub mod protocol;
pub mod rss;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netdev::offload::Vlan;
use netdev::vnet::gso;
use netdev::{
    IoPiece, IoPieceMut, RxOffload, Shared, TapQueue, TunOffload, VirtioNetHdr, VnetFlags,
};
use ringbuf::guestmem::GuestMemory;
use ringbuf::packet::{transfer_page_header, OutgoingPacket, PacketKind};
use ringbuf::{OutgoingRing, Packet};
use vmbus_proto::netvsp::{
    NvspInit, NvspInitComplete, NvspMessage, NvspMessageType, NvspStatus, NvspSubchannelOperation,
    NvspVersion, ReceiveBufferSection, RevokeReceiveBuffer, RevokeSendBuffer, SendIndirectionTable,
    SendNdisConfig, SendReceiveBuffer, SendReceiveBufferComplete, SendRndisPacket,
    SendRndisPacketComplete, SendSendBuffer, SendSendBufferComplete, SubchannelComplete,
    SubchannelRequest, CHANNEL_TYPE_CONTROL, CHANNEL_TYPE_DATA, INVALID_PROTOCOL_VERSION,
    INVALID_SECTION_INDEX, RSC_MAX_FRAGMENTS, SEND_INDIRECTION_TABLE_SIZE,
};
use vmbus_proto::ring::{PacketType, TransferPageRange, PACKET_FLAG_COMPLETION_REQUESTED};
use vmbus_proto::rndis::{PacketFilter, PktInfoFlags, RndisMessageHeader, RndisMessageType};
use zerocopy::{FromBytes, IntoBytes};

use crate::channel::Device;
use crate::server::GpadlIndex;
use crate::session::SubchannelRequest as RequestSubchannels;
use crate::Error;
use buffer::GuestBuffer;
use protocol::{NicView, RndisControl, DATA_HEAD_BYTES, MAX_CONTROL_MESSAGE, RX_DATA_OFFSET};

/// Most queues (channels) a NIC may have (Linux's `VRSS_CHANNEL_MAX`).
pub const MAX_QUEUES: u16 = 64;
/// Largest MTU.
pub const MAX_MTU: u32 = 9000;
/// Smallest MTU.
pub const MIN_MTU: u32 = 68;
/// Send-buffer section size answered to the guest (Hyper-V's).
pub const SEND_SECTION_SIZE: u32 = 6144;
/// Control answers a channel holds while it has no free receive section (more are dropped).
const MAX_PENDING_CONTROL: usize = 16;
/// Frames a channel moves from its TAP queue per poll.
const RX_BATCH: usize = 64;
/// Least time between two link indications (Linux applies at most one per 2 s).
const LINK_INDICATION_SPACING: Duration = Duration::from_secs(2);
/// How often the primary channel looks at the host link's state.
const LINK_POLL: Duration = Duration::from_secs(1);
/// Largest frame a large send may carry (Ethernet header, IP's 64 KiB).
const MAX_LSO_FRAME: u32 = 65535 + 18;
/// Most RNDIS messages handled from one send-buffer section or GPA-direct packet.
const MAX_MESSAGES_PER_PACKET: usize = 64;
/// Largest frame the TAP hands over with segmentation offloads on: IP's 64 KiB, the Ethernet
/// header and a VLAN tag.
const MAX_GSO_FRAME: usize = 65535 + 14 + 4;
/// Bytes of a host frame read into a local buffer before the receive sections: its headers,
/// checked and filtered on without the guest changing them meanwhile, then copied into the
/// first section (less the VLAN tag, when one is stripped).
const RX_LEAD: usize = 128;
const _: () = assert!(RX_LEAD as u32 <= receive_section_size(MIN_MTU) - RX_DATA_OFFSET);
/// While polling, a look at the TAP that finds nothing costs a `readv` (about a microsecond
/// here): done on every turn of a busy worker it was 9 failed reads per frame sent, most of a
/// core. After an empty look the TAP is left alone for 2 us, doubling up to this while it stays
/// empty; a frame read or written (its answer may be queued already), sections coming back or
/// a control message to send end the wait, and a sleeping worker is woken by the TAP's
/// readiness as before. The cost: a frame that arrives while the worker polls, with no traffic
/// the other way, waits at most this long.
const TAP_BACKOFF_MAX: Duration = Duration::from_micros(16);
/// See [`TAP_BACKOFF_MAX`].
const TAP_BACKOFF_MIN: Duration = Duration::from_micros(2);
/// "No next section" in a chain of sections announced together.
const NO_NEXT: u32 = u32::MAX;
/// Size of a receive section for frames of `mtu` bytes: header room, the frame, and a VLAN
/// tag read while it is stripped, rounded up to 64.
pub const fn receive_section_size(mtu: u32) -> u32 {
    (RX_DATA_OFFSET + mtu + 14 + 4).next_multiple_of(64)
}

/// One queue of a NIC's host backend: a TAP queue, or a stand-in for tests and fuzzing.
pub trait NetQueue: Send + std::fmt::Debug {
    /// Writes one frame (see [`TapQueue::write`]).
    fn write(
        &mut self,
        hdr: &VirtioNetHdr,
        pieces: &[IoPiece<'_>],
    ) -> Result<Option<usize>, netdev::Error>;
    /// Reads one frame (see [`TapQueue::read`]).
    fn read(
        &mut self,
        hdr: &mut VirtioNetHdr,
        pieces: &mut [IoPieceMut<'_>],
    ) -> Result<Option<usize>, netdev::Error>;
    /// Reads one frame into `lead`, then into the guest-memory ranges `runs` (see
    /// [`TapQueue::read_guest`]); by default through [`NetQueue::read`].
    fn read_guest(
        &mut self,
        hdr: &mut VirtioNetHdr,
        lead: &mut [u8],
        mem: &GuestMemory,
        runs: &[(u64, usize)],
    ) -> Result<Option<usize>, netdev::Error> {
        let mut pieces = Vec::with_capacity(runs.len() + 1);
        pieces.push(IoPieceMut::Local(lead));
        pieces.extend(
            runs.iter()
                .map(|&(gpa, len)| IoPieceMut::Shared(Shared::Guest { mem, gpa, len })),
        );
        self.read(hdr, &mut pieces)
    }
    /// A descriptor readable when a frame waits, if the queue has one.
    fn fd(&self) -> Option<BorrowedFd<'_>>;
    /// Whether the kernel should steer frames to this queue (see [`TapQueue::set_attached`]).
    fn set_attached(&mut self, attached: bool) -> Result<(), netdev::Error>;
    /// Which offloads the backend may leave in the frames it hands over (see
    /// [`TapQueue::set_offload`]; for the whole device, not just this queue).
    fn set_offload(&mut self, offload: TunOffload) -> Result<(), netdev::Error>;
}

impl NetQueue for TapQueue {
    fn write(
        &mut self,
        hdr: &VirtioNetHdr,
        pieces: &[IoPiece<'_>],
    ) -> Result<Option<usize>, netdev::Error> {
        TapQueue::write(self, hdr, pieces)
    }
    fn read(
        &mut self,
        hdr: &mut VirtioNetHdr,
        pieces: &mut [IoPieceMut<'_>],
    ) -> Result<Option<usize>, netdev::Error> {
        TapQueue::read(self, hdr, pieces)
    }
    fn read_guest(
        &mut self,
        hdr: &mut VirtioNetHdr,
        lead: &mut [u8],
        mem: &GuestMemory,
        runs: &[(u64, usize)],
    ) -> Result<Option<usize>, netdev::Error> {
        TapQueue::read_guest(self, hdr, lead, mem, runs)
    }
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
    fn set_attached(&mut self, attached: bool) -> Result<(), netdev::Error> {
        TapQueue::set_attached(self, attached)
    }
    fn set_offload(&mut self, offload: TunOffload) -> Result<(), netdev::Error> {
        TapQueue::set_offload(self, offload)
    }
}

/// Counters of a NIC, always on (tests and diagnostics read them).
#[derive(Debug)]
pub struct NicStats {
    /// Frames written to the host (per queue in `tx_queue`).
    pub tx_frames: AtomicU64,
    /// Frames delivered to the guest (per queue in `rx_queue`).
    pub rx_frames: AtomicU64,
    /// Guest frames dropped: malformed RNDIS, bad offloads (MSS 0, offsets outside).
    pub tx_malformed: AtomicU64,
    /// Guest frames dropped for being longer than the MTU.
    pub tx_over_mtu: AtomicU64,
    /// Guest frames the host TAP did not take.
    pub tx_backend_dropped: AtomicU64,
    /// Host frames dropped: not for the guest's filter, not on our VLAN, too long, GSO
    /// without RSC (or not deliverable as RSC).
    pub rx_dropped: AtomicU64,
    /// Host frames delivered coalesced (RSC: several sections in one transfer-page packet).
    pub rx_rsc_frames: AtomicU64,
    /// Sections (fragments) those frames took.
    pub rx_rsc_fragments: AtomicU64,
    /// Times a queue found frames waiting but no free receive section.
    pub rx_no_section: AtomicU64,
    /// NVSP messages refused (out of order, malformed, unknown) or completions for unknown
    /// transactions.
    pub bad_nvsp: AtomicU64,
    /// RNDIS control messages refused as malformed, and control answers dropped.
    pub bad_rndis: AtomicU64,
    /// Link indications sent.
    pub link_indications: AtomicU64,
    /// Per-queue frames to the host.
    pub tx_queue: [AtomicU64; MAX_QUEUES as usize],
    /// Per-queue frames to the guest.
    pub rx_queue: [AtomicU64; MAX_QUEUES as usize],
}

impl Default for NicStats {
    fn default() -> Self {
        Self {
            tx_frames: AtomicU64::new(0),
            rx_frames: AtomicU64::new(0),
            tx_malformed: AtomicU64::new(0),
            tx_over_mtu: AtomicU64::new(0),
            tx_backend_dropped: AtomicU64::new(0),
            rx_dropped: AtomicU64::new(0),
            rx_rsc_frames: AtomicU64::new(0),
            rx_rsc_fragments: AtomicU64::new(0),
            rx_no_section: AtomicU64::new(0),
            bad_nvsp: AtomicU64::new(0),
            bad_rndis: AtomicU64::new(0),
            link_indications: AtomicU64::new(0),
            tx_queue: std::array::from_fn(|_| AtomicU64::new(0)),
            rx_queue: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

fn count(c: &AtomicU64) {
    // Relaxed: statistics, read only for reporting.
    c.fetch_add(1, Ordering::Relaxed);
}

/// A NIC as configured: its host backend (one queue per possible channel) and settings, shared
/// by every guest's channels of it across reopens.
pub struct Nic {
    /// Its settings (the TAP's name, the guest's permanent address, the MTU, the VLAN frames
    /// carry on the host side).
    pub settings: NicSettings,
    /// Counters.
    pub stats: NicStats,
    link: Option<netdev::Link>,
    /// The stand-in link state when there is no TAP.
    link_up: AtomicBool,
    queues: Vec<Mutex<Option<Box<dyn NetQueue>>>>,
}

impl std::fmt::Debug for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nic")
            .field("name", &self.settings.tap)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

/// A NIC's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicSettings {
    /// TAP name.
    pub tap: String,
    /// Guest address.
    pub mac: [u8; 6],
    /// MTU ([`MIN_MTU`] ..= [`MAX_MTU`]).
    pub mtu: u32,
    /// VLAN id toward the host.
    pub vlan: Option<u16>,
    /// Queues (1 ..= [`MAX_QUEUES`]).
    pub queues: u16,
}

impl Nic {
    /// Opens (or creates) the TAP with one queue per possible channel, sets its MTU, brings it
    /// up, and detaches every queue but the first until its channel opens. The TAP takes no
    /// offloads from us (see below) until a guest enables RSC.
    pub fn open_tap(s: &NicSettings) -> Result<Arc<Self>, Error> {
        let tap = netdev::Tap::open(&s.tap, usize::from(s.queues)).map_err(Error::Net)?;
        let (link, queues) = tap.into_parts();
        // A VLAN device on the TAP takes the TAP's MTU, so its frames carry at most `mtu`
        // bytes of payload plus the tag: what a receive section holds.
        link.set_mtu(s.mtu).map_err(Error::Net)?;
        link.set_up(true).map_err(Error::Net)?;
        let mut boxed: Vec<Box<dyn NetQueue>> = Vec::new();
        for (i, q) in queues.into_iter().enumerate() {
            // No offloads: RNDIS can say "checksum succeeded" but not "checksum still to do",
            // so the host kernel finishes checksums (and segments) before a frame reaches us;
            // frames it verified come with DATA_VALID, and only those are "succeeded".
            q.set_offload(netdev::TunOffload::empty())
                .map_err(Error::Net)?;
            if i > 0 {
                q.set_attached(false).map_err(Error::Net)?;
            }
            boxed.push(Box::new(q));
        }
        Ok(Self::with_queues(s, boxed, Some(link)))
    }

    /// A NIC over the given queues (a stand-in backend when `link` is `None`).
    pub fn with_queues(
        s: &NicSettings,
        queues: Vec<Box<dyn NetQueue>>,
        link: Option<netdev::Link>,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings: s.clone(),
            stats: NicStats::default(),
            link,
            link_up: AtomicBool::new(true),
            queues: queues.into_iter().map(|q| Mutex::new(Some(q))).collect(),
        })
    }

    /// Queues the NIC has.
    pub fn queue_count(&self) -> u16 {
        self.queues.len() as u16
    }

    /// Whether the host link is up (with carrier).
    pub fn link_connected(&self) -> bool {
        match &self.link {
            Some(l) => l.state().map(|s| s.connected()).unwrap_or(false),
            // Relaxed: a flag a test flips; the next look sees it.
            None => self.link_up.load(Ordering::Relaxed),
        }
    }

    /// Sets the stand-in link state (no effect with a TAP).
    pub fn set_stand_in_link(&self, up: bool) {
        self.link_up.store(up, Ordering::Relaxed);
    }

    fn take_queue(&self, k: u16) -> Option<Box<dyn NetQueue>> {
        let mut q = self
            .queues
            .get(usize::from(k))?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        if k > 0 {
            let _ = q.set_attached(true);
        }
        Some(q)
    }

    fn give_back(&self, k: u16, mut q: Box<dyn NetQueue>) {
        if k > 0 {
            let _ = q.set_attached(false);
        }
        if let Some(slot) = self.queues.get(usize::from(k)) {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(q);
        }
    }
}

/// A buffer the guest lent, as its channels use it.
#[derive(Clone, Debug)]
struct LentBuffer {
    buffer: GuestBuffer,
    gpadl: u32,
    id: u16,
    section_size: u32,
    sections: u32,
}

/// What one guest's channels of a NIC share: set up through the primary channel, read by the
/// subchannels.
#[derive(Debug)]
pub struct Group {
    nic: Arc<Nic>,
    rx: Mutex<Option<LentBuffer>>,
    tx: Mutex<Option<LentBuffer>>,
    /// Bumped (release) whenever `rx` or `tx` changes; channels reload them when they see a
    /// new value (acquire).
    generation: AtomicU32,
    /// The RNDIS packet filter (0 until the guest sets one).
    filter: AtomicU32,
    /// The address frames for the guest are filtered on.
    mac: Mutex<[u8; 6]>,
    /// Channels the guest has (1 + granted subchannels).
    channels: AtomicU32,
    /// The TAP's offloads ([`TunOffload`] bits): not empty while the guest has RSC on, when
    /// the channels deliver super-frames coalesced.
    rsc_offload: AtomicU32,
    /// The receive hash the guest set up (RSS on, a key, types we hash); channels reload it
    /// when `generation` moves.
    rss: Mutex<Option<Arc<rss::RssHash>>>,
}

impl Group {
    /// The receive and send buffers the guest lent, as they are now.
    fn buffers(&self) -> (Option<LentBuffer>, Option<LentBuffer>) {
        let lent =
            |m: &Mutex<Option<LentBuffer>>| m.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (lent(&self.rx), lent(&self.tx))
    }

    /// A new group for a primary channel of `nic`.
    pub fn new(nic: Arc<Nic>) -> Arc<Self> {
        let mac = nic.settings.mac;
        Arc::new(Self {
            nic,
            rx: Mutex::new(None),
            tx: Mutex::new(None),
            generation: AtomicU32::new(0),
            filter: AtomicU32::new(0),
            mac: Mutex::new(mac),
            channels: AtomicU32::new(1),
            rsc_offload: AtomicU32::new(0),
            rss: Mutex::new(None),
        })
    }

    /// The NIC.
    pub fn nic(&self) -> &Arc<Nic> {
        &self.nic
    }

    fn bump(&self) {
        // Release: pairs with the acquire in `Netvsp::refresh`.
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// The NVSP handshake's state on the primary channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NvspState {
    /// No INIT yet: only INIT is taken.
    Uninit,
    /// Version agreed.
    Ready(NvspVersion),
}

/// Where a guest's RNDIS messages are: a send-buffer section or GPA-direct ranges.
enum Source<'a> {
    Section {
        buffer: &'a GuestBuffer,
        off: u32,
        len: u32,
    },
    Direct {
        mem: &'a GuestMemory,
        runs: Vec<(u64, usize)>,
        len: u32,
    },
}

impl Source<'_> {
    fn len(&self) -> u32 {
        match self {
            Source::Section { len, .. } | Source::Direct { len, .. } => *len,
        }
    }

    fn read(&self, off: u32, dst: &mut [u8]) -> Option<()> {
        if u64::from(off) + dst.len() as u64 > u64::from(self.len()) {
            return None;
        }
        match self {
            Source::Section {
                buffer, off: base, ..
            } => buffer.read(base + off, dst).ok(),
            Source::Direct { mem, .. } => {
                let mut done = 0;
                for (gpa, n) in self.direct_pieces(off, dst.len())? {
                    mem.read(gpa, &mut dst[done..done + n]).ok()?;
                    done += n;
                }
                Some(())
            }
        }
    }

    fn direct_pieces(&self, off: u32, len: usize) -> Option<Vec<(u64, usize)>> {
        let Source::Direct { runs, .. } = self else {
            return None;
        };
        let mut out = Vec::new();
        let mut skip = off as usize;
        let mut left = len;
        for &(gpa, n) in runs {
            if left == 0 {
                break;
            }
            if skip >= n {
                skip -= n;
                continue;
            }
            let take = (n - skip).min(left);
            out.push((gpa + skip as u64, take));
            skip = 0;
            left -= take;
        }
        (left == 0).then_some(out)
    }

    fn pieces<'b>(&'b self, off: u32, len: usize, out: &mut Vec<Shared<'b>>) -> Option<()> {
        if u64::from(off) + len as u64 > u64::from(self.len()) {
            return None;
        }
        match self {
            Source::Section {
                buffer, off: base, ..
            } => buffer.pieces(base + off, len, out).ok(),
            Source::Direct { mem, .. } => {
                for (gpa, n) in self.direct_pieces(off, len)? {
                    out.push(Shared::Guest { mem, gpa, len: n });
                }
                Some(())
            }
        }
    }
}

/// Everything a netvsp channel needs.
pub struct NetvspSpec {
    /// The group (a primary makes a new one; subchannels share their primary's).
    pub group: Arc<Group>,
    /// Subchannel index (0: primary).
    pub index: u16,
    /// The channel's relid (buffers must be GPADLs of the primary's).
    pub relid: u32,
    /// The guest's memory.
    pub mem: Arc<GuestMemory>,
    /// The guest's GPADLs.
    pub gpadls: GpadlIndex,
    /// Asks the session to offer subchannels.
    pub request_subchannels: Option<RequestSubchannels>,
}

/// One channel of a synthetic NIC.
pub struct Netvsp {
    group: Arc<Group>,
    index: u16,
    relid: u32,
    mem: Arc<GuestMemory>,
    gpadls: GpadlIndex,
    request_subchannels: Option<RequestSubchannels>,
    queue: Option<Box<dyn NetQueue>>,
    state: NvspState,
    rndis: RndisControl,
    generation: u32,
    rx: Option<LentBuffer>,
    tx: Option<LentBuffer>,
    /// This channel's receive sections: `first .. first + count` of the buffer.
    first: u32,
    count: u32,
    free: Vec<u32>,
    /// Sections announced as the first (the transaction) of a transfer-page packet.
    outstanding: Vec<bool>,
    /// Per section, the next one announced in the same packet ([`NO_NEXT`] for none).
    next: Vec<u32>,
    /// The guest's NDIS config said it takes RSC (primary).
    ndis_rsc: bool,
    /// Free sections a read needs now (1, or as many as the largest frame takes with RSC):
    /// the TAP is armed only while that many are free.
    rx_need: usize,
    /// The guest-memory ranges the next frame is read into, and the sections they cover
    /// (kept while the same sections are on top of the free list: a read that finds no frame
    /// costs no rebuilding).
    rx_runs: Vec<(u64, usize)>,
    rx_runs_for: Vec<u32>,
    rx_sections: Vec<u32>,
    rx_lens: Vec<u32>,
    rx_ranges: Vec<TransferPageRange>,
    /// Control answers and indications waiting for a section.
    pending_control: VecDeque<Vec<u8>>,
    /// NVSP answers the ring had no room for.
    pending_answers: VecDeque<(u64, Vec<u8>)>,
    blocked: Option<u32>,
    /// Link state last told to the guest, and when.
    link_told: Option<(bool, Instant)>,
    /// When the link was last looked at (the timer's expirations are read then too).
    link_checked: Instant,
    epoll: OwnedFd,
    timer: Option<OwnedFd>,
    tap_armed: bool,
    /// The group's receive hash, as of `generation`.
    rss: Option<Arc<rss::RssHash>>,
    /// How long the TAP is left alone after a look that found nothing (zero: looked at on
    /// every turn); see [`TAP_BACKOFF_MAX`].
    tap_backoff: Duration,
    /// When the TAP is next looked at, while `tap_backoff` is not zero.
    tap_next: Instant,
    scratch: Vec<u8>,
    xfer_header: Vec<u8>,
}

/// How a host frame goes to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxLayout {
    /// One section, a plain RNDIS packet.
    Single,
    /// Coalesced (RSC): the frame cut at every `capacity` bytes, one fragment per section, in
    /// `fragments` sections (the guest joins them byte for byte, as Linux's hv_netvsc does).
    Rsc { fragments: usize },
}

/// How a frame of `len` bytes whose first bytes are `head` and whose virtio-net header is
/// `hdr` is delivered in sections of `capacity` frame bytes, or `None` if it cannot be: longer
/// than a section and not a TCP GSO frame whose headers and segments each fit a section (the
/// guest's MTU), or of more than `max_fragments` sections.
fn rx_layout(
    head: &[u8],
    len: usize,
    hdr: &VirtioNetHdr,
    capacity: usize,
    max_fragments: usize,
) -> Option<RxLayout> {
    let kind = hdr.gso_type & !gso::ECN;
    if kind == gso::NONE || len <= capacity {
        return (len <= capacity).then_some(RxLayout::Single);
    }
    if !(kind == gso::TCPV4 || kind == gso::TCPV6) || !hdr.flags().contains(VnetFlags::NEEDS_CSUM) {
        return None;
    }
    // The TCP header is where the checksum starts (the header's `hdr_len` is only what the
    // kernel kept linear, not the headers' length).
    let l4 = usize::from(hdr.csum_start.get());
    let thl = usize::from(*head.get(l4 + 12)? >> 4) * 4;
    let headers = l4 + thl;
    let segment = usize::from(hdr.gso_size.get());
    if thl < 20 || headers >= len || segment == 0 || headers + segment > capacity {
        return None;
    }
    let fragments = len.div_ceil(capacity);
    (fragments <= max_fragments.min(RSC_MAX_FRAGMENTS)).then_some(RxLayout::Rsc { fragments })
}

/// Sections a frame of up to [`MAX_GSO_FRAME`] bytes takes at `capacity` bytes each.
fn gso_frame_sections(capacity: u32) -> usize {
    MAX_GSO_FRAME.div_ceil(capacity.max(1) as usize)
}

impl std::fmt::Debug for Netvsp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netvsp")
            .field("nic", &self.group.nic.settings.tap)
            .field("index", &self.index)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Netvsp {
    /// A channel of a NIC: takes the NIC's queue `index` (refused if another guest holds it).
    pub fn new(spec: NetvspSpec) -> Result<Self, Error> {
        let nic = spec.group.nic.clone();
        let queue = nic.take_queue(spec.index).ok_or_else(|| {
            Error::Config(format!(
                "queue {} of NIC {} is in use or absent",
                spec.index, nic.settings.tap
            ))
        })?;
        use rustix::event::epoll;
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(Error::Socket);
        let ep = match ep {
            Ok(e) => e,
            Err(e) => {
                nic.give_back(spec.index, queue);
                return Err(e);
            }
        };
        let mut me = Self {
            group: spec.group,
            index: spec.index,
            relid: spec.relid,
            mem: spec.mem,
            gpadls: spec.gpadls,
            request_subchannels: spec.request_subchannels,
            queue: Some(queue),
            state: NvspState::Uninit,
            rndis: RndisControl::default(),
            generation: u32::MAX,
            rx: None,
            tx: None,
            first: 0,
            count: 0,
            free: Vec::new(),
            outstanding: Vec::new(),
            next: Vec::new(),
            ndis_rsc: false,
            rx_need: 1,
            rx_runs: Vec::new(),
            rx_runs_for: Vec::new(),
            rx_sections: Vec::new(),
            rx_lens: Vec::new(),
            rx_ranges: Vec::new(),
            pending_control: VecDeque::new(),
            pending_answers: VecDeque::new(),
            blocked: None,
            link_told: None,
            link_checked: Instant::now(),
            epoll: ep,
            timer: None,
            tap_armed: false,
            rss: None,
            tap_backoff: Duration::ZERO,
            tap_next: Instant::now(),
            scratch: vec![0; MAX_LSO_FRAME as usize],
            xfer_header: Vec::with_capacity(32),
        };
        if let Some(fd) = me.queue.as_ref().and_then(|q| q.fd()) {
            epoll::add(
                &me.epoll,
                fd,
                epoll::EventData::new_u64(0),
                epoll::EventFlags::empty(),
            )
            .map_err(Error::Socket)?;
        }
        if me.index == 0 {
            use rustix::time::{timerfd_create, TimerfdClockId, TimerfdFlags};
            let t = timerfd_create(
                TimerfdClockId::Monotonic,
                TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
            )
            .map_err(Error::Socket)?;
            arm_link_timer(&t)?;
            epoll::add(
                &me.epoll,
                &t,
                epoll::EventData::new_u64(1),
                epoll::EventFlags::IN,
            )
            .map_err(Error::Socket)?;
            me.timer = Some(t);
        }
        Ok(me)
    }

    /// The group this channel belongs to.
    pub fn group(&self) -> &Arc<Group> {
        &self.group
    }

    fn nic(&self) -> &Nic {
        &self.group.nic
    }

    fn version(&self) -> Option<NvspVersion> {
        match self.state {
            NvspState::Ready(v) => Some(v),
            NvspState::Uninit => None,
        }
    }

    /// Reloads the shared buffers if the primary changed them.
    fn refresh(&mut self) {
        // Acquire: pairs with the release in `Group::bump`.
        let g = self.group.generation.load(Ordering::Acquire);
        if g == self.generation {
            return;
        }
        self.generation = g;
        self.rss = self
            .group
            .rss
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (rx, tx) = self.group.buffers();
        self.tx = tx;
        let same = match (&rx, &self.rx) {
            (Some(a), Some(b)) => a.gpadl == b.gpadl && a.sections == b.sections,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        self.rx = rx;
        self.rx_runs_for.clear();
        self.free.clear();
        self.outstanding.clear();
        self.next.clear();
        self.pending_control.retain(|_| false);
        if let Some(rx) = &self.rx {
            let queues = u32::from(self.nic().queue_count().max(1));
            let per = rx.sections / queues;
            self.first = per * u32::from(self.index);
            self.count = per;
            self.free = (0..per).rev().collect();
            self.outstanding = vec![false; per as usize];
            self.next = vec![NO_NEXT; per as usize];
        } else {
            self.count = 0;
        }
    }

    fn view(&self) -> NicView {
        NicView {
            mtu: self.nic().settings.mtu,
            mac: self.nic().settings.mac,
            connected: self.nic().link_connected(),
            max_queues: u32::from(self.nic().queue_count()),
            // Relaxed: written by this (primary) thread only.
            channels: self.group.channels.load(Ordering::Relaxed),
            version: self.version().unwrap_or(NvspVersion::V1),
            name: format!("vspd netvsp {}", self.nic().settings.tap),
        }
    }

    /// Writes an NVSP message as a completion (for `tx`) or an in-band packet.
    fn answer(
        &mut self,
        out: &mut OutgoingRing,
        tx: Option<u64>,
        bytes: Vec<u8>,
    ) -> Result<(), Error> {
        if !self.pending_answers.is_empty() {
            self.pending_answers
                .push_back((tx.map_or(u64::MAX, |t| t), bytes));
            return Ok(());
        }
        if !self.write_answer(out, tx, &bytes)? {
            self.pending_answers
                .push_back((tx.map_or(u64::MAX, |t| t), bytes));
        }
        Ok(())
    }

    fn write_answer(
        &mut self,
        out: &mut OutgoingRing,
        tx: Option<u64>,
        bytes: &[u8],
    ) -> Result<bool, Error> {
        let parts = [bytes];
        let p = match tx {
            Some(t) if t != u64::MAX => OutgoingPacket::completion(t, &parts),
            _ => OutgoingPacket::in_band(0, false, &parts),
        };
        match out.write(&p) {
            Ok(()) => {
                self.blocked = None;
                Ok(true)
            }
            Err(ringbuf::Error::Full { needed, .. }) => {
                self.blocked = Some(needed);
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Answers `packet` with an NVSP message if it asked for a completion.
    fn reply<T: IntoBytes + zerocopy::Immutable>(
        &mut self,
        out: &mut OutgoingRing,
        packet: &Packet<'_>,
        kind: NvspMessageType,
        body: &T,
    ) -> Result<(), Error> {
        if !packet.completion_requested() {
            return Ok(());
        }
        let m = NvspMessage::new(kind, body);
        self.answer(out, Some(packet.transaction_id), m.as_bytes().to_vec())
    }

    /// Refuses an NVSP message: counted, and answered with a failure where it expects a
    /// completion.
    fn refuse(
        &mut self,
        out: &mut OutgoingRing,
        packet: &Packet<'_>,
        kind: NvspMessageType,
    ) -> Result<(), Error> {
        count(&self.nic().stats.bad_nvsp);
        let fail = NvspStatus::FAIL;
        match kind {
            NvspMessageType::INIT => self.reply(
                out,
                packet,
                NvspMessageType::INIT_COMPLETE,
                &NvspInitComplete {
                    negotiated_protocol_version: NvspVersion(INVALID_PROTOCOL_VERSION),
                    max_mdl_chain_length: 0,
                    status: fail,
                },
            ),
            NvspMessageType::SEND_RECEIVE_BUFFER => self.reply(
                out,
                packet,
                NvspMessageType::SEND_RECEIVE_BUFFER_COMPLETE,
                &SendReceiveBufferComplete {
                    status: fail,
                    ..Default::default()
                },
            ),
            NvspMessageType::SEND_SEND_BUFFER => self.reply(
                out,
                packet,
                NvspMessageType::SEND_SEND_BUFFER_COMPLETE,
                &SendSendBufferComplete {
                    status: fail,
                    section_size: 0,
                },
            ),
            NvspMessageType::SEND_RNDIS_PACKET => self.reply(
                out,
                packet,
                NvspMessageType::SEND_RNDIS_PACKET_COMPLETE,
                &SendRndisPacketComplete { status: fail },
            ),
            NvspMessageType::SUBCHANNEL => self.reply(
                out,
                packet,
                NvspMessageType::SUBCHANNEL,
                &SubchannelComplete {
                    status: fail,
                    num_subchannels: 0,
                },
            ),
            _ => Ok(()),
        }
    }

    fn handle_nvsp(&mut self, packet: &Packet<'_>, out: &mut OutgoingRing) -> Result<(), Error> {
        if let PacketKind::Completion = packet.kind {
            return self.receive_completion(packet);
        }
        let Some(m) = NvspMessage::read_from_payload(packet.payload) else {
            count(&self.nic().stats.bad_nvsp);
            return Ok(());
        };
        let kind = m.header.message_type;
        // Data moves on every channel once the primary is set up.
        if kind == NvspMessageType::SEND_RNDIS_PACKET {
            self.refresh();
            let ready = self.index != 0 || self.state != NvspState::Uninit;
            if !ready {
                return self.refuse(out, packet, kind);
            }
            let status = self.send_rndis(packet, &m.body::<SendRndisPacket>(), out);
            return self.reply(
                out,
                packet,
                NvspMessageType::SEND_RNDIS_PACKET_COMPLETE,
                &SendRndisPacketComplete { status },
            );
        }
        if self.index != 0 {
            // Subchannels carry data only.
            return self.refuse(out, packet, kind);
        }
        match (kind, self.state) {
            (NvspMessageType::INIT, _) => {
                let init: NvspInit = m.body();
                match protocol::negotiate(init.min_protocol_version, init.max_protocol_version) {
                    Some(v) => {
                        self.state = NvspState::Ready(v);
                        self.ndis_rsc = false;
                        self.reply(
                            out,
                            packet,
                            NvspMessageType::INIT_COMPLETE,
                            &NvspInitComplete {
                                negotiated_protocol_version: v,
                                max_mdl_chain_length: 34,
                                status: NvspStatus::SUCCESS,
                            },
                        )
                    }
                    None => self.refuse(out, packet, kind),
                }
            }
            (_, NvspState::Uninit) => self.refuse(out, packet, kind),
            (NvspMessageType::SEND_NDIS_VERSION, _) => Ok(()),
            (NvspMessageType::SEND_NDIS_CONFIG, NvspState::Ready(v))
                if v.0 >= NvspVersion::V2.0 =>
            {
                // The guest's MTU (plus the Ethernet header): ours bounds what we take anyway.
                let cfg: SendNdisConfig = m.body();
                self.ndis_rsc = v.0 >= NvspVersion::V61.0 && cfg.capabilities.rsc();
                Ok(())
            }
            (NvspMessageType::SEND_RECEIVE_BUFFER, _) => {
                let r: SendReceiveBuffer = m.body();
                match self.lend(
                    r.gpadl_handle,
                    r.id,
                    receive_section_size(self.nic().settings.mtu),
                    true,
                ) {
                    Some(b) => {
                        let complete = SendReceiveBufferComplete {
                            status: NvspStatus::SUCCESS,
                            num_sections: 1,
                            sections: [ReceiveBufferSection {
                                offset: 0,
                                sub_alloc_size: b.section_size,
                                num_sub_allocs: b.sections,
                                end_offset: b.section_size * b.sections,
                            }],
                        };
                        *self.group.rx.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
                        self.group.bump();
                        self.reply(
                            out,
                            packet,
                            NvspMessageType::SEND_RECEIVE_BUFFER_COMPLETE,
                            &complete,
                        )
                    }
                    None => self.refuse(out, packet, kind),
                }
            }
            (NvspMessageType::SEND_SEND_BUFFER, _) => {
                let r: SendSendBuffer = m.body();
                match self.lend(r.gpadl_handle, r.id, SEND_SECTION_SIZE, false) {
                    Some(b) => {
                        *self.group.tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
                        self.group.bump();
                        self.reply(
                            out,
                            packet,
                            NvspMessageType::SEND_SEND_BUFFER_COMPLETE,
                            &SendSendBufferComplete {
                                status: NvspStatus::SUCCESS,
                                section_size: SEND_SECTION_SIZE,
                            },
                        )
                    }
                    None => self.refuse(out, packet, kind),
                }
            }
            (NvspMessageType::REVOKE_RECEIVE_BUFFER, _) => {
                let r: RevokeReceiveBuffer = m.body();
                self.revoke(true, r.id);
                Ok(())
            }
            (NvspMessageType::REVOKE_SEND_BUFFER, _) => {
                let r: RevokeSendBuffer = m.body();
                self.revoke(false, r.id);
                Ok(())
            }
            (NvspMessageType::SUBCHANNEL, NvspState::Ready(v)) if v.0 >= NvspVersion::V5.0 => {
                let r: SubchannelRequest = m.body();
                if r.op != NvspSubchannelOperation::ALLOCATE {
                    return self.refuse(out, packet, kind);
                }
                let max = u32::from(self.nic().queue_count()).saturating_sub(1);
                let granted = r.num_subchannels.min(max);
                if granted > 0 {
                    let asked = self
                        .request_subchannels
                        .as_ref()
                        .is_some_and(|f| f(granted as u16));
                    if !asked {
                        return self.refuse(out, packet, kind);
                    }
                }
                // Relaxed: read by this thread (RSS checks) and by reports.
                self.group.channels.store(1 + granted, Ordering::Relaxed);
                self.reply(
                    out,
                    packet,
                    NvspMessageType::SUBCHANNEL,
                    &SubchannelComplete {
                        status: NvspStatus::SUCCESS,
                        num_subchannels: granted,
                    },
                )?;
                self.send_indirection_table(out, 1 + granted)
            }
            _ => self.refuse(out, packet, kind),
        }
    }

    /// Sends the send indirection table: channel `i % channels` for entry `i`.
    fn send_indirection_table(
        &mut self,
        out: &mut OutgoingRing,
        channels: u32,
    ) -> Result<(), Error> {
        let head = NvspMessage::new(
            NvspMessageType::SEND_INDIRECTION_TABLE,
            &SendIndirectionTable {
                count: SEND_INDIRECTION_TABLE_SIZE as u32,
                offset: 12,
            },
        );
        let mut bytes = head.as_bytes()[..12].to_vec();
        for i in 0..SEND_INDIRECTION_TABLE_SIZE as u32 {
            bytes.extend_from_slice(&(i % channels).to_le_bytes());
        }
        self.answer(out, None, bytes)
    }

    /// Validates a buffer the guest lends: a GPADL of this channel, used for no other buffer,
    /// holding at least one section per queue (receive) or one section (send).
    fn lend(&self, gpadl: u32, id: u16, section_size: u32, receive: bool) -> Option<LentBuffer> {
        let g = self.gpadls.get(gpadl)?;
        if g.relid != self.relid {
            return None;
        }
        let (rx, tx) = self.group.buffers();
        let mine = if receive { &rx } else { &tx };
        if mine.is_some()
            || rx.as_ref().is_some_and(|b| b.gpadl == gpadl)
            || tx.as_ref().is_some_and(|b| b.gpadl == gpadl)
        {
            return None;
        }
        let buffer = GuestBuffer::new(self.mem.clone(), &g)?;
        let sections = buffer.len() / section_size;
        let needed = if receive {
            u32::from(self.nic().queue_count())
        } else {
            1
        };
        if sections < needed {
            return None;
        }
        Some(LentBuffer {
            buffer,
            gpadl,
            id,
            section_size,
            sections,
        })
    }

    fn revoke(&mut self, receive: bool, id: u16) {
        let slot = if receive {
            &self.group.rx
        } else {
            &self.group.tx
        };
        let mut b = slot.lock().unwrap_or_else(|e| e.into_inner());
        if b.as_ref().is_some_and(|b| b.id == id) {
            *b = None;
            drop(b);
            self.group.bump();
        } else {
            drop(b);
            count(&self.nic().stats.bad_nvsp);
        }
    }

    /// A completion from the guest: returns a receive section.
    fn receive_completion(&mut self, packet: &Packet<'_>) -> Result<(), Error> {
        self.refresh();
        let ok = NvspMessage::read_from_payload(packet.payload)
            .is_some_and(|m| m.header.message_type == NvspMessageType::SEND_RNDIS_PACKET_COMPLETE);
        let local = packet
            .transaction_id
            .checked_sub(1 + u64::from(self.first))
            .filter(|&l| l < u64::from(self.count));
        match (ok, local) {
            (true, Some(l)) if self.outstanding[l as usize] => {
                self.outstanding[l as usize] = false;
                // Sections came back: a frame that waited for them is read on this turn.
                self.tap_backoff = Duration::ZERO;
                // The packet's sections, in the order announced (a chain built here, at most
                // `count` long).
                let mut at = l as u32;
                for _ in 0..self.count {
                    self.free.push(at);
                    let n = std::mem::replace(&mut self.next[at as usize], NO_NEXT);
                    if n == NO_NEXT {
                        break;
                    }
                    at = n;
                }
            }
            _ => count(&self.nic().stats.bad_nvsp),
        }
        Ok(())
    }

    /// Handles one SEND_RNDIS_PACKET: every RNDIS message it carries.
    fn send_rndis(
        &mut self,
        packet: &Packet<'_>,
        m: &SendRndisPacket,
        out: &mut OutgoingRing,
    ) -> NvspStatus {
        let tx = self.tx.clone();
        let mem = self.mem.clone();
        let source = if m.send_buffer_section_index != INVALID_SECTION_INDEX {
            let Some(tx) = tx.as_ref() else {
                count(&self.nic().stats.tx_malformed);
                return NvspStatus::FAIL;
            };
            if m.send_buffer_section_index >= tx.sections
                || m.send_buffer_section_size == 0
                || m.send_buffer_section_size > tx.section_size
            {
                count(&self.nic().stats.tx_malformed);
                return NvspStatus::INVALID_RNDIS_PACKET;
            }
            Source::Section {
                buffer: &tx.buffer,
                off: m.send_buffer_section_index * tx.section_size,
                len: m.send_buffer_section_size,
            }
        } else {
            let PacketKind::GpaDirect(ranges) = packet.kind else {
                count(&self.nic().stats.tx_malformed);
                return NvspStatus::INVALID_RNDIS_PACKET;
            };
            let mut runs = Vec::new();
            let mut total: u64 = 0;
            for r in ranges.iter() {
                let mut at = u64::from(r.byte_offset);
                let mut left = u64::from(r.byte_count);
                if at >= 4096 || at + left > r.pfns.len() as u64 * 4096 {
                    count(&self.nic().stats.tx_malformed);
                    return NvspStatus::INVALID_RNDIS_PACKET;
                }
                for pfn in r.pfns {
                    if left == 0 {
                        break;
                    }
                    let in_page = at % 4096;
                    let n = (4096 - in_page).min(left);
                    let Some(gpa) = pfn.get().checked_mul(4096) else {
                        count(&self.nic().stats.tx_malformed);
                        return NvspStatus::INVALID_RNDIS_PACKET;
                    };
                    match runs.last_mut() {
                        Some((g, l)) if *g + *l as u64 == gpa + in_page => *l += n as usize,
                        _ => runs.push((gpa + in_page, n as usize)),
                    }
                    at = 0;
                    left -= n;
                    total += n;
                }
                if runs.len() > 2 * netdev::tap::MAX_PIECES
                    || total > u64::from(MAX_LSO_FRAME) + 4096
                {
                    count(&self.nic().stats.tx_malformed);
                    return NvspStatus::INVALID_RNDIS_PACKET;
                }
            }
            Source::Direct {
                mem: &mem,
                runs,
                len: total as u32,
            }
        };
        let _ = CHANNEL_TYPE_DATA;
        let _ = CHANNEL_TYPE_CONTROL;
        let mut off = 0u32;
        let mut status = NvspStatus::SUCCESS;
        for _ in 0..MAX_MESSAGES_PER_PACKET {
            if source.len() - off < size_of::<RndisMessageHeader>() as u32 {
                break;
            }
            let mut hb = [0u8; 8];
            if source.read(off, &mut hb).is_none() {
                status = NvspStatus::INVALID_RNDIS_PACKET;
                break;
            }
            let Ok(h) = RndisMessageHeader::read_from_bytes(&hb) else {
                break;
            };
            // Zero padding after the last message ends the list.
            if h.message_length == 0 && off > 0 {
                break;
            }
            if h.message_length < 8 || h.message_length > source.len() - off {
                count(&self.nic().stats.tx_malformed);
                status = NvspStatus::INVALID_RNDIS_PACKET;
                break;
            }
            let ok = if h.message_type == RndisMessageType::PACKET {
                self.send_frame(&source, off, h.message_length)
            } else {
                self.control(&source, off, h.message_length, out)
            };
            if !ok {
                status = NvspStatus::INVALID_RNDIS_PACKET;
            }
            off += h.message_length;
        }
        status
    }

    /// One RNDIS control message (primary channel only).
    fn control(
        &mut self,
        source: &Source<'_>,
        off: u32,
        len: u32,
        _out: &mut OutgoingRing,
    ) -> bool {
        if self.index != 0 || len as usize > MAX_CONTROL_MESSAGE {
            count(&self.nic().stats.bad_rndis);
            return false;
        }
        let mut msg = vec![0u8; len as usize];
        if source.read(off, &mut msg).is_none() {
            count(&self.nic().stats.bad_rndis);
            return false;
        }
        let view = self.view();
        let before = self.rndis.current_mac;
        let outcome = self.rndis.handle(&msg, &view);
        if outcome.malformed {
            count(&self.nic().stats.bad_rndis);
        }
        // Relaxed: read per frame by every channel; a frame racing the change may see either.
        self.group.filter.store(
            if self.rndis.initialized {
                self.rndis.filter.bits()
            } else {
                0
            },
            Ordering::Relaxed,
        );
        if self.rndis.current_mac != before {
            if let Some(mac) = self.rndis.current_mac {
                *self.group.mac.lock().unwrap_or_else(|e| e.into_inner()) = mac;
            }
        }
        let rss = self
            .rndis
            .rss
            .as_ref()
            .and_then(|r| rss::RssHash::new(&r.key, r.hash_info));
        let changed = {
            let mut shared = self.group.rss.lock().unwrap_or_else(|e| e.into_inner());
            let changed = shared.as_deref() != rss.as_ref();
            if changed {
                *shared = rss.map(Arc::new);
            }
            changed
        };
        if changed {
            self.group.bump();
        }
        if RndisMessageHeader::read_from_prefix(&msg)
            .is_ok_and(|(h, _)| h.message_type == RndisMessageType::QUERY)
        {
            // The guest learns the link state from this answer (or any query): baseline.
            if self.link_told.is_none() {
                self.link_told = Some((view.connected, Instant::now()));
            }
        }
        if let Some(r) = outcome.response {
            self.queue_control(r);
        }
        !outcome.malformed
    }

    fn queue_control(&mut self, msg: Vec<u8>) {
        if self.pending_control.len() >= MAX_PENDING_CONTROL {
            count(&self.nic().stats.bad_rndis);
            return;
        }
        self.pending_control.push_back(msg);
    }

    /// One RNDIS data message: its frame to the TAP.
    fn send_frame(&mut self, source: &Source<'_>, off: u32, len: u32) -> bool {
        let nic = self.group.nic.clone();
        let mut head = [0u8; DATA_HEAD_BYTES];
        let n = (len as usize).min(DATA_HEAD_BYTES);
        if source.read(off, &mut head[..n]).is_none() {
            count(&nic.stats.tx_malformed);
            return false;
        }
        let Ok(p) = protocol::parse_data(&head[..n], len) else {
            count(&nic.stats.tx_malformed);
            return false;
        };
        let frame_off = off + p.data_offset;
        let frame_len = p.data_len;
        let mut tx = p.tx;
        if let Some(id) = nic.settings.vlan {
            tx.vlan = Some(Vlan {
                id,
                priority: tx.vlan.map_or(0, |v| v.priority),
            });
        }
        let limit = if tx.lso.is_some() {
            MAX_LSO_FRAME
        } else {
            nic.settings.mtu + 14 + 4
        };
        if frame_len > limit {
            count(&nic.stats.tx_over_mtu);
            return false;
        }
        let mut hdrs = [0u8; netdev::offload::MAX_HEAD];
        let want = tx.headers_wanted(frame_len as usize);
        if source.read(frame_off, &mut hdrs[..want]).is_none() {
            count(&nic.stats.tx_malformed);
            return false;
        }
        if tx.lso.is_none() {
            // Untagged frames over the MTU (a tagged one may be 4 bytes longer).
            let mut et = [0u8; 2];
            let tagged = source.read(frame_off + 12, &mut et).is_some() && et == [0x81, 0x00];
            if frame_len > nic.settings.mtu + 14 + if tagged { 4 } else { 0 } {
                count(&nic.stats.tx_over_mtu);
                return false;
            }
        }
        let plan = match tx.prepare_tx(frame_len as usize, &hdrs[..want]) {
            Ok(p) => p,
            Err(_) => {
                count(&nic.stats.tx_malformed);
                return false;
            }
        };
        let mut shared = Vec::with_capacity(8);
        let rest = frame_len as usize - plan.consumed;
        if source
            .pieces(frame_off + plan.consumed as u32, rest, &mut shared)
            .is_none()
        {
            count(&nic.stats.tx_malformed);
            return false;
        }
        let Some(queue) = self.queue.as_mut() else {
            return false;
        };
        let result = if shared.len() < netdev::tap::MAX_PIECES {
            let mut pieces: Vec<IoPiece<'_>> = Vec::with_capacity(shared.len() + 1);
            pieces.push(IoPiece::Local(plan.head()));
            pieces.extend(shared.iter().map(|s| IoPiece::Shared(*s)));
            queue.write(&plan.hdr, &pieces)
        } else {
            // Too scattered for one writev: through a bounce buffer.
            let mut at = 0;
            let mut ok = true;
            for s in &shared {
                ok &= s.read(&mut self.scratch[at..at + s.len()]).is_ok();
                at += s.len();
            }
            if !ok {
                count(&nic.stats.tx_malformed);
                return false;
            }
            queue.write(
                &plan.hdr,
                &[
                    IoPiece::Local(plan.head()),
                    IoPiece::Local(&self.scratch[..at]),
                ],
            )
        };
        match result {
            Ok(Some(_)) => {
                count(&nic.stats.tx_frames);
                count(&nic.stats.tx_queue[usize::from(self.index)]);
                // An answer (an ACK, an echo reply) is often queued by the time the write
                // returns: look on this turn.
                self.tap_backoff = Duration::ZERO;
            }
            _ => count(&nic.stats.tx_backend_dropped),
        }
        true
    }

    /// Sends a receive-buffer message of `len` bytes in local section `l` to the guest.
    fn announce(
        &mut self,
        out: &mut OutgoingRing,
        l: u32,
        len: u32,
        control: bool,
    ) -> Result<bool, Error> {
        self.announce_sections(out, &[l], &[len], control)
    }

    /// Sends one transfer-page packet of local `sections` (not empty), message `lens[i]` bytes
    /// long in `sections[i]`; its transaction is the first section's, and the others are
    /// chained to it, to be freed with it.
    fn announce_sections(
        &mut self,
        out: &mut OutgoingRing,
        sections: &[u32],
        lens: &[u32],
        control: bool,
    ) -> Result<bool, Error> {
        let Some(rx) = &self.rx else {
            return Ok(false);
        };
        let Some(&head) = sections.first() else {
            return Ok(false);
        };
        let mut ranges = std::mem::take(&mut self.rx_ranges);
        ranges.clear();
        ranges.extend(
            sections
                .iter()
                .zip(lens)
                .map(|(&l, &len)| TransferPageRange {
                    byte_count: len,
                    byte_offset: (self.first + l) * rx.section_size,
                }),
        );
        transfer_page_header(&mut self.xfer_header, rx.id, &ranges);
        self.rx_ranges = ranges;
        let m = protocol::send_rndis_message(control, None);
        let parts = [m.as_bytes()];
        let p = OutgoingPacket {
            packet_type: PacketType::DATA_USING_XFER_PAGES,
            flags: PACKET_FLAG_COMPLETION_REQUESTED,
            transaction_id: 1 + u64::from(self.first + head),
            header: &self.xfer_header,
            payload: &parts,
        };
        match out.write(&p) {
            Ok(()) => {
                self.outstanding[head as usize] = true;
                for w in sections.windows(2) {
                    self.next[w[0] as usize] = w[1];
                }
                Ok(true)
            }
            Err(ringbuf::Error::Full { needed, .. }) => {
                self.blocked = Some(needed);
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Room an announcement of `n` sections needs in the ring: descriptor, transfer-page
    /// header and ranges, the NVSP message, padding and the trailer.
    const fn announce_bytes(n: usize) -> u32 {
        (16 + 8 + 8 * n + 40 + 8 + 8) as u32
    }

    /// Room an announcement of one section needs.
    const ANNOUNCE_BYTES: u32 = Self::announce_bytes(1);

    /// Delivers waiting control answers, then frames from the TAP queue, while sections and
    /// ring room last.
    fn receive(&mut self, out: &mut OutgoingRing) -> Result<bool, Error> {
        self.refresh();
        let Some(rx) = self.rx.clone() else {
            return Ok(false);
        };
        let mut moved = false;
        while let Some(msg) = self.pending_control.front() {
            let Some(&l) = self.free.last() else { break };
            if msg.len() as u32 > rx.section_size {
                self.pending_control.pop_front();
                count(&self.nic().stats.bad_rndis);
                continue;
            }
            if !out.fits(Self::ANNOUNCE_BYTES)? {
                self.blocked = Some(Self::ANNOUNCE_BYTES);
                return Ok(moved);
            }
            let at = (self.first + l) * rx.section_size;
            if rx.buffer.write(at, msg).is_err() {
                count(&self.nic().stats.bad_rndis);
                self.pending_control.pop_front();
                continue;
            }
            let len = msg.len() as u32;
            if !self.announce(out, l, len, true)? {
                return Ok(moved);
            }
            self.free.pop();
            self.pending_control.pop_front();
            moved = true;
        }
        // Relaxed: see `control`.
        let filter = PacketFilter::from_bits_retain(self.group.filter.load(Ordering::Relaxed));
        if filter.is_empty() || self.queue.is_none() {
            return Ok(moved);
        }
        let mac = *self.group.mac.lock().unwrap_or_else(|e| e.into_inner());
        self.receive_frames(out, &rx, filter, &mac)
            .map(|m| m || moved)
    }

    /// Reads frames from the TAP queue straight into free receive sections and announces
    /// them. Without RSC a frame goes in one section; with RSC (see [`Netvsp::update_rsc`])
    /// the TAP hands over TCP super-frames of up to 64 KiB, so each read offers the data areas
    /// of as many free sections as the largest frame takes (the first bytes go to a local
    /// buffer, checked there, then copied to the first section, less any VLAN tag), and the
    /// frame takes the first of them: cut at each section's end, each piece an RNDIS packet
    /// marked as a fragment (first, middle, last) of one coalesced frame, all announced in one
    /// transfer-page packet. With fewer sections free, or too little ring room for the
    /// announcement, nothing is read: the TAP keeps (then drops) the frames.
    fn receive_frames(
        &mut self,
        out: &mut OutgoingRing,
        rx: &LentBuffer,
        filter: PacketFilter,
        mac: &[u8; 6],
    ) -> Result<bool, Error> {
        let capacity = rx.section_size - RX_DATA_OFFSET;
        // Relaxed: see `update_rsc`.
        let rsc = self.group.rsc_offload.load(Ordering::Relaxed) != 0;
        let max_fragments = (self.count as usize).min(RSC_MAX_FRAGMENTS);
        let need = if rsc {
            gso_frame_sections(capacity).min(max_fragments).max(1)
        } else {
            1
        };
        self.rx_need = need;
        let vlan = self.nic().settings.vlan;
        let strip = if vlan.is_some() { 4 } else { 0 };
        let mut moved = false;
        for _ in 0..RX_BATCH {
            if self.free.len() < need {
                count(&self.nic().stats.rx_no_section);
                break;
            }
            let announce = Self::announce_bytes(need);
            if !out.fits(announce)? {
                self.blocked = Some(announce);
                break;
            }
            let top = self.free.len() - need;
            if self.rx_runs_for.len() != need
                || self.rx_runs_for.iter().rev().ne(self.free[top..].iter())
            {
                self.rx_runs.clear();
                self.rx_runs_for.clear();
                for j in 0..need {
                    let l = self.free[self.free.len() - 1 - j];
                    let area = (self.first + l) * rx.section_size + RX_DATA_OFFSET;
                    // The lead holds the frame's first bytes (less the tag), the first
                    // section the rest of its data area.
                    let skip = if j == 0 { (RX_LEAD - strip) as u32 } else { 0 };
                    if rx
                        .buffer
                        .gpa_runs(area + skip, (capacity - skip) as usize, &mut self.rx_runs)
                        .is_err()
                    {
                        self.rx_runs.clear();
                        return Err(Error::Config(
                            "receive buffer shorter than its sections".into(),
                        ));
                    }
                    self.rx_runs_for.push(l);
                }
            }
            let mut hdr = VirtioNetHdr::default();
            let mut lead = [0u8; RX_LEAD];
            let Some(q) = self.queue.as_mut() else { break };
            let n = match q.read_guest(&mut hdr, &mut lead, rx.buffer.memory(), &self.rx_runs) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => return Err(Error::Net(e)),
            };
            moved = true;
            // The frame's sections are now the ones read into: build them again next time.
            self.rx_runs_for.clear();
            match self.deliver_read(out, rx, n, hdr, &lead, strip, filter, mac)? {
                Some(fragments) => {
                    self.free.truncate(self.free.len() - fragments);
                }
                None => count(&self.nic().stats.rx_dropped),
            }
        }
        Ok(moved)
    }

    /// Delivers a frame just read: `n` bytes (with a VLAN tag of `strip` bytes to remove),
    /// the first in `lead`, the rest in the data areas of the top sections of the free list
    /// from `RX_LEAD - strip` on. Returns the sections it took, or `None` if it was dropped
    /// (too long, not on our VLAN, not for the guest's filter, not deliverable).
    #[allow(clippy::too_many_arguments)]
    fn deliver_read(
        &mut self,
        out: &mut OutgoingRing,
        rx: &LentBuffer,
        n: usize,
        mut hdr: VirtioNetHdr,
        lead: &[u8; RX_LEAD],
        strip: usize,
        filter: PacketFilter,
        mac: &[u8; 6],
    ) -> Result<Option<usize>, Error> {
        let capacity = (rx.section_size - RX_DATA_OFFSET) as usize;
        let need = self.rx_need;
        // Longer than the room offered (truncated), or shorter than its Ethernet header.
        if n > need * capacity + strip || n < 14 + strip {
            return Ok(None);
        }
        let mut head = [0u8; RX_LEAD];
        let read = n.min(RX_LEAD);
        if let Some(id) = self.nic().settings.vlan {
            let csum_start = hdr.csum_start.get();
            let partial = hdr.flags().contains(VnetFlags::NEEDS_CSUM);
            if Vlan::of_frame(&lead[..16]).map(|v| v.id) != Some(id) || (partial && csum_start < 18)
            {
                return Ok(None);
            }
            if partial {
                hdr.csum_start = (csum_start - 4).into();
            }
            head[..12].copy_from_slice(&lead[..12]);
            head[12..read - 4].copy_from_slice(&lead[16..read]);
        } else {
            head[..read].copy_from_slice(&lead[..read]);
        }
        let len = n - strip;
        let head = &head[..read - strip];
        let dst: [u8; 6] = head[..6].try_into().expect("6 bytes");
        if !filter_passes(filter, &dst, mac) {
            return Ok(None);
        }
        // Without RSC the room offered is one section.
        let Some(layout) = rx_layout(head, len, &hdr, capacity, need) else {
            return Ok(None);
        };
        let Ok(mut offload) = RxOffload::from_vnet(&VirtioNetHdr {
            gso_type: gso::NONE,
            ..hdr
        }) else {
            return Ok(None);
        };
        const _: () = assert!(rss::HEADER_BYTES <= RX_LEAD - 4);
        offload.hash = self.rss.as_ref().and_then(|h| h.of_frame(head));
        let fragments = match layout {
            RxLayout::Single => 1,
            RxLayout::Rsc { fragments } => fragments,
        };
        let mut sections = std::mem::take(&mut self.rx_sections);
        let mut lens = std::mem::take(&mut self.rx_lens);
        sections.clear();
        lens.clear();
        let mut written = true;
        for i in 0..fragments {
            let flen = capacity.min(len - i * capacity);
            let flags = match layout {
                RxLayout::Single => None,
                RxLayout::Rsc { .. } if i == 0 => Some(PktInfoFlags::FIRST_FRAGMENT),
                RxLayout::Rsc { .. } if i + 1 == fragments => Some(PktInfoFlags::LAST_FRAGMENT),
                RxLayout::Rsc { .. } => Some(PktInfoFlags::empty()),
            };
            let l = self.free[self.free.len() - 1 - i];
            let base = (self.first + l) * rx.section_size;
            let (header, msg_len) = protocol::rx_header(flen as u32, &offload, flags);
            written &= rx.buffer.write(base, &header).is_ok();
            if i == 0 {
                written &= rx.buffer.write(base + RX_DATA_OFFSET, head).is_ok();
            }
            sections.push(l);
            lens.push(msg_len);
        }
        let announced = if written {
            self.announce_sections(out, &sections, &lens, false)
        } else {
            Ok(false)
        };
        self.rx_sections = sections;
        self.rx_lens = lens;
        // Not written, or the ring filled after `fits` (it cannot: only this channel writes
        // it): the frame is lost, its sections stay free.
        if !announced? {
            return Ok(None);
        }
        let stats = &self.group.nic.stats;
        count(&stats.rx_frames);
        count(&stats.rx_queue[usize::from(self.index)]);
        if fragments > 1 {
            count(&stats.rx_rsc_frames);
            // Relaxed: statistics.
            stats
                .rx_rsc_fragments
                .fetch_add(fragments as u64, Ordering::Relaxed);
        }
        Ok(Some(fragments))
    }

    /// The TAP offloads the guest's state calls for (primary channel): checksums and TCP
    /// segmentation over the IP versions it enabled RSC for, when it negotiated NVSP 6.1 with
    /// the RSC capability, has RNDIS initialized and enough receive sections per channel;
    /// else none. Set on the TAP only when that changes.
    fn update_rsc(&mut self) {
        if self.index != 0 {
            return;
        }
        self.refresh();
        let rsc = self.rndis.rsc;
        let eligible = self.version().is_some_and(|v| v.0 >= NvspVersion::V61.0)
            && self.ndis_rsc
            && self.rndis.initialized
            && rsc.any()
            && self.rx.as_ref().is_some_and(|rx| {
                // Twice the sections the largest frame takes, so that one can be read while
                // the guest still holds the previous one.
                let need = gso_frame_sections(rx.section_size - RX_DATA_OFFSET);
                need <= RSC_MAX_FRAGMENTS && self.count as usize >= 2 * need
            });
        let mut want = TunOffload::empty();
        if eligible {
            want = TunOffload::CSUM;
            want.set(TunOffload::TSO4, rsc.ipv4);
            want.set(TunOffload::TSO6, rsc.ipv6);
        }
        // Relaxed: written by this (primary) thread only; the other channels read it per
        // frame, and one racing the change may see either (a stale frame is dropped).
        let now = self.group.rsc_offload.load(Ordering::Relaxed);
        if want.bits() == now {
            return;
        }
        if let Some(q) = self.queue.as_mut() {
            if let Err(e) = q.set_offload(want) {
                tracing::warn!(nic = %self.group.nic.settings.tap, "TAP offloads {want:?}: {e}");
            }
        }
        tracing::debug!(nic = %self.group.nic.settings.tap, "TAP offloads now {want:?}");
        self.group.rsc_offload.store(want.bits(), Ordering::Relaxed);
    }

    /// The primary channel tells the guest of host link changes, at most one per 2 s.
    fn watch_link(&mut self) {
        // At most once per timer period: the worker calls `poll` on every turn of its loop.
        if self.link_checked.elapsed() < LINK_POLL {
            return;
        }
        self.link_checked = Instant::now();
        if let Some(t) = &self.timer {
            // One-shot, armed after each look: it is readable only once `LINK_POLL` has
            // passed, when this check runs and reads it, so it never keeps the worker awake.
            let mut b = [0u8; 8];
            let _ = rustix::io::read(t, &mut b);
            let _ = arm_link_timer(t);
        }
        if self.index != 0 || !self.rndis.initialized {
            return;
        }
        let Some((told, when)) = self.link_told else {
            return;
        };
        let now = self.nic().link_connected();
        if now != told && when.elapsed() >= LINK_INDICATION_SPACING {
            self.queue_control(protocol::indication(now));
            count(&self.nic().stats.link_indications);
            self.link_told = Some((now, Instant::now()));
        }
    }

    fn flush_answers(&mut self, out: &mut OutgoingRing) -> Result<bool, Error> {
        let mut moved = false;
        while let Some((tx, bytes)) = self.pending_answers.pop_front() {
            let t = (tx != u64::MAX).then_some(tx);
            if !self.write_answer(out, t, &bytes)? {
                self.pending_answers.push_front((tx, bytes));
                break;
            }
            moved = true;
        }
        Ok(moved)
    }

    /// Arms the TAP queue in the wake set only while a frame could be taken.
    fn arm(&mut self) {
        // Without the sections a read needs, or ring room, the channel waits for the guest
        // (its completions or reads wake us), not for the TAP.
        let want = self.rx.is_some()
            && self.free.len() >= self.rx_need
            && self.group.filter.load(Ordering::Relaxed) != 0
            && self.blocked.is_none();
        if want == self.tap_armed {
            return;
        }
        use rustix::event::epoll;
        if let Some(fd) = self.queue.as_ref().and_then(|q| q.fd()) {
            let flags = if want {
                epoll::EventFlags::IN
            } else {
                epoll::EventFlags::empty()
            };
            if epoll::modify(&self.epoll, fd, epoll::EventData::new_u64(0), flags).is_ok() {
                self.tap_armed = want;
            }
        }
    }
}

/// Arms the primary channel's link timer to expire once, `LINK_POLL` from now.
fn arm_link_timer(t: &OwnedFd) -> Result<(), Error> {
    use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags, Timespec};
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let once = Itimerspec {
        it_interval: zero,
        it_value: Timespec {
            tv_sec: LINK_POLL.as_secs() as i64,
            tv_nsec: 0,
        },
    };
    timerfd_settime(t, TimerfdTimerFlags::empty(), &once).map_err(Error::Socket)?;
    Ok(())
}

/// Whether a frame to `dst` passes the guest's packet filter for address `mac`.
fn filter_passes(filter: PacketFilter, dst: &[u8; 6], mac: &[u8; 6]) -> bool {
    if filter.contains(PacketFilter::PROMISCUOUS) {
        return true;
    }
    if dst == &[0xff; 6] {
        return filter.contains(PacketFilter::BROADCAST);
    }
    if dst[0] & 1 != 0 {
        return filter.intersects(PacketFilter::MULTICAST | PacketFilter::ALL_MULTICAST);
    }
    dst == mac && filter.contains(PacketFilter::DIRECTED)
}

impl Device for Netvsp {
    fn handle(&mut self, packet: &Packet<'_>, out: &mut OutgoingRing) -> Result<(), Error> {
        let r = self.handle_nvsp(packet, out);
        self.update_rsc();
        r
    }

    fn poll(&mut self, out: &mut OutgoingRing) -> Result<bool, Error> {
        let mut moved = self.flush_answers(out)?;
        if self.pending_answers.is_empty() {
            self.blocked = None;
            self.watch_link();
            let now = (!self.tap_backoff.is_zero()).then(Instant::now);
            if now.is_none_or(|now| now >= self.tap_next) || !self.pending_control.is_empty() {
                if self.receive(out)? {
                    moved = true;
                    self.tap_backoff = Duration::ZERO;
                } else {
                    self.tap_backoff =
                        (self.tap_backoff * 2).clamp(TAP_BACKOFF_MIN, TAP_BACKOFF_MAX);
                    self.tap_next = now.unwrap_or_else(Instant::now) + self.tap_backoff;
                }
            }
        }
        self.arm();
        Ok(moved)
    }

    fn blocked_on_ring(&self) -> Option<u32> {
        self.blocked
    }

    fn idle_wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.epoll.as_fd())
    }
}

impl Drop for Netvsp {
    fn drop(&mut self) {
        // The guest is gone: the TAP segments and checksums again for whoever comes next.
        if self.index == 0 && self.group.rsc_offload.swap(0, Ordering::Relaxed) != 0 {
            if let Some(q) = self.queue.as_mut() {
                let _ = q.set_offload(TunOffload::empty());
            }
        }
        if let Some(q) = self.queue.take() {
            self.group.nic.give_back(self.index, q);
        }
    }
}
