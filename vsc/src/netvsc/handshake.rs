//! The netvsc initialisation handshake as a state machine with no I/O: it says what to send
//! ([`Action`]) and takes what the host answered; the driver ([`super::Nic`]) moves the bytes.
//!
//! The order is Linux 6.1's hv_netvsc (`netvsc_connect_vsp`, `netvsc_init_buf`,
//! `rndis_filter_device_add`, `rndis_set_subchannel`, `rndis_filter_open`):
//!
//! 1. NVSP INIT with `min == max`, newest version first (6.1, 6, 5, 4, 2, 1), until the host
//!    answers SUCCESS; then, from version 2, the NDIS config (MTU + Ethernet header, 802.1Q;
//!    from 5 SR-IOV and teaming; from 6.1 RSC) and the NDIS version (6.30 above NVSP 4, else
//!    6.1), neither answered.
//! 2. The receive buffer (GPADL, id 0xCAFE): its completion must be SUCCESS with exactly one
//!    section at offset 0, a suballocation size of at least [`MIN_SECTION`] and size x count
//!    inside the buffer. Then the send buffer (id 0): SUCCESS and a section size of at least
//!    [`MIN_SECTION`].
//! 3. RNDIS INITIALIZE, then the OIDs: maximum frame size, permanent and current address,
//!    friendly name, offload hardware capabilities (object type 0xA7, revision and size
//!    checked), offload parameters (set; must succeed; RSC enabled both ways from NVSP 6.1 when
//!    the host does RSC over IPv4 and IPv6, as Linux with LRO on), media connect status; from NVSP 5 link
//!    speed and RSS capabilities, and with two queues or more the subchannel request (at most
//!    what was asked) and, once the driver opened them, the RSS parameters; last the packet
//!    filter.
//!
//! Every answer is from an untrusted host: lengths are checked before anything is read.

use bitflags::bitflags;
use vmbus_proto::netvsp::{
    NvspCapabilities, NvspInit, NvspInitComplete, NvspMessage, NvspMessageType, NvspStatus,
    NvspSubchannelOperation, NvspVersion, SendNdisConfig, SendNdisVersion, SendReceiveBuffer,
    SendReceiveBufferComplete, SendSendBuffer, SendSendBufferComplete, SubchannelComplete,
    SubchannelRequest, LINUX_6_1_VERSIONS, LINUX_RECEIVE_BUFFER_ID, LINUX_SEND_BUFFER_ID,
    NDIS_VERSION_6_1, NDIS_VERSION_6_30,
};
pub use vmbus_proto::rndis::PacketFilter;
use vmbus_proto::rndis::{
    self, InitializeComplete, InitializeRequest, NdisObjectHeader, NdisOffload, NdisOffloadParams,
    NdisRecvScaleCap, NdisRecvScaleParam, Oid, QueryComplete, QueryRequest, RndisMessageHeader,
    RndisMessageType, RndisStatus, SetComplete, SetRequest,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::Error;

/// Smallest section the host may give (of the receive or send buffer): an RNDIS packet message
/// with room for a minimal frame, as Linux checks it.
pub const MIN_SECTION: u32 = 68;

/// The receive buffer Linux allocates from NVSP 4 (16 MiB; 15 MiB up to NVSP 2).
pub const RECEIVE_BUFFER_SIZE: u32 = 16 << 20;
/// The receive buffer up to NVSP 2.
pub const RECEIVE_BUFFER_SIZE_LEGACY: u32 = 15 << 20;
/// The send buffer (1 MiB).
pub const SEND_BUFFER_SIZE: u32 = 1 << 20;

/// The largest RNDIS message the guest takes (RNDIS INITIALIZE's `max_transfer_size`).
pub const RNDIS_MAX_TRANSFER: u32 = 0x4000;

/// Channels at most (Linux's `VRSS_CHANNEL_MAX`).
pub const MAX_CHANNELS: u16 = 64;

/// Entries of the RSS indirection table the guest sets (Linux's `ITAB_NUM`).
pub const RSS_TABLE_ENTRIES: usize = 128;

/// The Toeplitz key Linux uses by default (`netvsc_hash_key`).
pub const RSS_KEY: [u8; rndis::RSS_HASH_KEY_SIZE] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

/// The friendly name OID (`RNDIS_OID_GEN_FRIENDLY_NAME`), not in the NDIS list of
/// [`rndis::Oid`].
pub const OID_GEN_FRIENDLY_NAME: Oid = Oid(0x0002_0216);

bitflags! {
    /// Transmit checksum capabilities of the host (`NDIS_TXCSUM_CAP_*`, in
    /// [`NdisOffload`]'s `csum.ip4_tx_csum` and `ip6_tx_csum`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct TxChecksumCaps: u32 {
        /// IP options.
        const IP_OPTIONS = rndis::csum_cap::IP_OPTIONS;
        /// TCP options.
        const TCP_OPTIONS = rndis::csum_cap::TCP_OPTIONS;
        /// TCP.
        const TCP = rndis::csum_cap::TCP;
        /// UDP.
        const UDP = rndis::csum_cap::UDP;
        /// The IPv4 header.
        const IP4 = rndis::csum_cap::IP4;
        /// What Linux needs to checksum TCP (`NDIS_TXCSUM_ALL_TCP4`/`6`, less the IP header).
        const ALL_TCP = Self::IP_OPTIONS.bits() | Self::TCP_OPTIONS.bits() | Self::TCP.bits();
    }
}

/// The packet filter Linux sets on an interface that is not promiscuous and has multicast
/// addresses (IPv6 always has).
pub const DEFAULT_FILTER: PacketFilter = PacketFilter::DIRECTED
    .union(PacketFilter::ALL_MULTICAST)
    .union(PacketFilter::BROADCAST);

/// What the guest asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// The guest interface's MTU.
    pub mtu: u32,
    /// Channels wanted (1: no subchannels).
    pub queues: u16,
}

/// Which of the two buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// The receive buffer (the host writes frames to the guest in it).
    Receive,
    /// The send buffer (the guest writes frames to the host in it).
    Send,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this NVSP message in-band, asking for a completion or not.
    Nvsp {
        /// The message.
        msg: NvspMessage,
        /// Completion requested (the answer comes as a completion packet).
        completion: bool,
    },
    /// Allocate this buffer of `bytes`, create its GPADL, and call
    /// [`Handshake::buffer_ready`].
    CreateBuffer(Buffer, u32),
    /// Send this RNDIS control message (in a send-buffer section).
    Rndis(Vec<u8>),
    /// Open this many subchannels (their offers arrive as the host makes them) and call
    /// [`Handshake::subchannels_open`].
    OpenSubchannels(u16),
    /// The handshake is over.
    Done,
}

/// What the host's answers established.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// The NVSP version.
    pub version: NvspVersion,
    /// Receive buffer: section (suballocation) size and count.
    pub recv_section_size: u32,
    /// Receive sections.
    pub recv_sections: u32,
    /// Bytes of the receive buffer.
    pub recv_buffer_bytes: u32,
    /// Send buffer section size.
    pub send_section_size: u32,
    /// Send sections (the buffer's size over the section size).
    pub send_sections: u32,
    /// RNDIS messages per PACKET message the host takes.
    pub max_packets_per_message: u32,
    /// Packet alignment (bytes) the host wants between messages.
    pub packet_alignment: u32,
    /// The host's maximum frame size (Ethernet payload), if it said.
    pub max_frame_size: Option<u32>,
    /// The permanent MAC address.
    pub permanent_mac: [u8; 6],
    /// The current MAC address (the permanent one if the host did not say).
    pub mac: [u8; 6],
    /// The friendly name, if the host gave one.
    pub friendly_name: Option<String>,
    /// Checksum offloads the host does (IPv4 TCP, UDP; IPv6 TCP, UDP).
    pub csum_tcp4: bool,
    /// UDP over IPv4 checksum offload.
    pub csum_udp4: bool,
    /// TCP over IPv6 checksum offload.
    pub csum_tcp6: bool,
    /// UDP over IPv6 checksum offload.
    pub csum_udp6: bool,
    /// Large send (LSO v2) over IPv4, and its largest send.
    pub lso4: Option<u32>,
    /// Large send over IPv6.
    pub lso6: Option<u32>,
    /// Receive segment coalescing is on (NVSP 6.1, the host does it over IPv4 and IPv6, and
    /// the guest enabled it): the host may send one frame as fragments in several ranges.
    pub rsc: bool,
    /// The medium is connected.
    pub connected: bool,
    /// Link speed in units of 100 bit/s, if the host said.
    pub link_speed: Option<u32>,
    /// Receive queues the host has (RSS capabilities).
    pub rss_queues: u32,
    /// Channels in use (the primary and its subchannels).
    pub channels: u16,
    /// The packet filter set.
    pub filter: Option<PacketFilter>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Init(usize),
    ReceiveBufferGpadl,
    ReceiveBuffer,
    SendBufferGpadl,
    SendBuffer,
    RndisInit,
    Oid(Step),
    Subchannels,
    SubchannelsOpening,
    Done,
}

/// The RNDIS requests after INITIALIZE, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    MaxFrameSize,
    PermanentAddress,
    CurrentAddress,
    FriendlyName,
    OffloadCaps,
    OffloadParams,
    MediaConnect,
    LinkSpeed,
    RssCaps,
    RssParams,
    Filter,
}

/// The handshake in progress.
#[derive(Debug, Clone)]
pub struct Handshake {
    params: Params,
    phase: Phase,
    out: Negotiated,
    /// The id of the RNDIS request waiting for its completion.
    request_id: u32,
    /// NDIS version sent.
    ndis: u32,
}

/// The transaction id of the handshake's NVSP requests that ask for a completion (one is in
/// flight at a time).
pub const CONTROL_TX: u64 = 0xFFFF_0000_0000_0000;

fn status_error(what: &'static str, status: u32) -> Error {
    Error::Status { what, status }
}

impl Handshake {
    /// Starts the handshake: the first INIT to send.
    pub fn start(params: Params) -> (Self, Vec<Action>) {
        let h = Self {
            params,
            phase: Phase::Init(0),
            out: Negotiated::default(),
            request_id: 0,
            ndis: 0,
        };
        let a = h.init(0);
        (h, vec![a])
    }

    /// What has been established so far (all of it once [`Action::Done`] was given).
    pub fn negotiated(&self) -> &Negotiated {
        &self.out
    }

    /// Whether the handshake is over.
    pub fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    fn init(&self, i: usize) -> Action {
        let v = LINUX_6_1_VERSIONS[i];
        Action::Nvsp {
            msg: NvspMessage::new(
                NvspMessageType::INIT,
                &NvspInit {
                    min_protocol_version: v,
                    max_protocol_version: v,
                },
            ),
            completion: true,
        }
    }

    /// An NVSP message the host sent (an answer to the handshake's request: the driver
    /// matched its transaction id, [`CONTROL_TX`]).
    pub fn on_nvsp(&mut self, msg: &NvspMessage) -> Result<Vec<Action>, Error> {
        let t = msg.header.message_type;
        match self.phase {
            Phase::Init(i) if t == NvspMessageType::INIT_COMPLETE => {
                let c: NvspInitComplete = msg.body();
                let v = LINUX_6_1_VERSIONS[i];
                if c.status != NvspStatus::SUCCESS {
                    tracing::debug!(version = ?v, status = ?c.status, "NVSP version refused");
                    if i + 1 == LINUX_6_1_VERSIONS.len() {
                        return Err(Error::Refused("no NVSP version accepted".into()));
                    }
                    self.phase = Phase::Init(i + 1);
                    return Ok(vec![self.init(i + 1)]);
                }
                self.out.version = v;
                let mut acts = Vec::new();
                if v.0 >= NvspVersion::V2.0 {
                    let mut caps = NvspCapabilities::default().with_ieee8021q(true);
                    if v.0 >= NvspVersion::V5.0 {
                        caps = caps.with_sriov(true).with_teaming(true);
                    }
                    if v.0 >= NvspVersion::V61.0 {
                        caps = caps.with_rsc(true);
                    }
                    acts.push(Action::Nvsp {
                        msg: NvspMessage::new(
                            NvspMessageType::SEND_NDIS_CONFIG,
                            &SendNdisConfig {
                                mtu: self.params.mtu + 14,
                                reserved: 0,
                                capabilities: caps,
                            },
                        ),
                        completion: false,
                    });
                }
                self.ndis = if v.0 > NvspVersion::V4.0 {
                    NDIS_VERSION_6_30
                } else {
                    NDIS_VERSION_6_1
                };
                acts.push(Action::Nvsp {
                    msg: NvspMessage::new(
                        NvspMessageType::SEND_NDIS_VERSION,
                        &SendNdisVersion {
                            ndis_major_version: self.ndis >> 16,
                            ndis_minor_version: self.ndis & 0xffff,
                        },
                    ),
                    completion: false,
                });
                let size = if v.0 <= NvspVersion::V2.0 {
                    RECEIVE_BUFFER_SIZE_LEGACY
                } else {
                    RECEIVE_BUFFER_SIZE
                };
                self.out.recv_buffer_bytes = size;
                acts.push(Action::CreateBuffer(Buffer::Receive, size));
                self.phase = Phase::ReceiveBufferGpadl;
                Ok(acts)
            }
            Phase::ReceiveBuffer if t == NvspMessageType::SEND_RECEIVE_BUFFER_COMPLETE => {
                let c: SendReceiveBufferComplete = msg.body();
                if c.status != NvspStatus::SUCCESS {
                    return Err(status_error("receive buffer", c.status.0));
                }
                let s = c.sections[0];
                let total = u64::from(s.sub_alloc_size) * u64::from(s.num_sub_allocs);
                if c.num_sections != 1
                    || s.offset != 0
                    || s.sub_alloc_size < MIN_SECTION
                    || s.num_sub_allocs == 0
                    || total > u64::from(self.out.recv_buffer_bytes)
                {
                    return Err(Error::Protocol(format!(
                        "receive buffer sections refused: {} section(s), {s:?}",
                        c.num_sections
                    )));
                }
                self.out.recv_section_size = s.sub_alloc_size;
                self.out.recv_sections = s.num_sub_allocs;
                self.phase = Phase::SendBufferGpadl;
                Ok(vec![Action::CreateBuffer(Buffer::Send, SEND_BUFFER_SIZE)])
            }
            Phase::SendBuffer if t == NvspMessageType::SEND_SEND_BUFFER_COMPLETE => {
                let c: SendSendBufferComplete = msg.body();
                if c.status != NvspStatus::SUCCESS {
                    return Err(status_error("send buffer", c.status.0));
                }
                if c.section_size < MIN_SECTION || c.section_size > SEND_BUFFER_SIZE {
                    return Err(Error::Protocol(format!(
                        "send buffer section size {} refused",
                        c.section_size
                    )));
                }
                self.out.send_section_size = c.section_size;
                self.out.send_sections = SEND_BUFFER_SIZE / c.section_size;
                self.phase = Phase::RndisInit;
                Ok(vec![self.rndis(
                    RndisMessageType::INITIALIZE,
                    InitializeRequest {
                        request_id: 0,
                        major_version: rndis::RNDIS_MAJOR_VERSION,
                        minor_version: rndis::RNDIS_MINOR_VERSION,
                        max_transfer_size: RNDIS_MAX_TRANSFER,
                    }
                    .as_bytes(),
                    &[],
                )])
            }
            Phase::Subchannels if t == NvspMessageType::SUBCHANNEL => {
                let c: SubchannelComplete = msg.body();
                let asked = u32::from(self.out.channels - 1);
                if c.status != NvspStatus::SUCCESS {
                    return Err(status_error("subchannel request", c.status.0));
                }
                if c.num_subchannels > asked {
                    return Err(Error::Protocol(format!(
                        "{} subchannels granted, {asked} asked",
                        c.num_subchannels
                    )));
                }
                self.out.channels = 1 + c.num_subchannels as u16;
                self.phase = Phase::SubchannelsOpening;
                Ok(vec![Action::OpenSubchannels(c.num_subchannels as u16)])
            }
            _ => {
                tracing::debug!(?t, phase = ?self.phase, "NVSP message ignored by the handshake");
                Ok(Vec::new())
            }
        }
    }

    /// The driver created `which`'s GPADL.
    pub fn buffer_ready(&mut self, which: Buffer, gpadl: u32) -> Result<Vec<Action>, Error> {
        let (msg, phase) = match (which, self.phase) {
            (Buffer::Receive, Phase::ReceiveBufferGpadl) => (
                NvspMessage::new(
                    NvspMessageType::SEND_RECEIVE_BUFFER,
                    &SendReceiveBuffer {
                        gpadl_handle: gpadl,
                        id: LINUX_RECEIVE_BUFFER_ID,
                    },
                ),
                Phase::ReceiveBuffer,
            ),
            (Buffer::Send, Phase::SendBufferGpadl) => (
                NvspMessage::new(
                    NvspMessageType::SEND_SEND_BUFFER,
                    &SendSendBuffer {
                        gpadl_handle: gpadl,
                        id: LINUX_SEND_BUFFER_ID,
                    },
                ),
                Phase::SendBuffer,
            ),
            _ => return Err(Error::Protocol("buffer out of order".into())),
        };
        self.phase = phase;
        Ok(vec![Action::Nvsp {
            msg,
            completion: true,
        }])
    }

    /// The driver opened the subchannels granted.
    pub fn subchannels_open(&mut self) -> Result<Vec<Action>, Error> {
        if self.phase != Phase::SubchannelsOpening {
            return Err(Error::Protocol("subchannels out of order".into()));
        }
        Ok(vec![self.step(Step::RssParams)])
    }

    /// An RNDIS message the host sent (a completion, or a status indication: those are
    /// ignored here, the data path applies them).
    pub fn on_rndis(&mut self, bytes: &[u8]) -> Result<Vec<Action>, Error> {
        let Ok((h, body)) = RndisMessageHeader::read_from_prefix(bytes) else {
            return Err(Error::Protocol("short RNDIS message".into()));
        };
        let len = (h.message_length as usize).min(bytes.len());
        let body = &body[..len.saturating_sub(8).min(body.len())];
        match (self.phase, h.message_type) {
            (Phase::RndisInit, RndisMessageType::INITIALIZE_COMPLETE) => {
                let c = InitializeComplete::read_from_prefix(body)
                    .map_err(|_| Error::Protocol("short RNDIS INITIALIZE_COMPLETE".into()))?
                    .0;
                if c.request_id != self.request_id {
                    return Ok(Vec::new());
                }
                if c.status != RndisStatus::SUCCESS {
                    return Err(status_error("RNDIS initialize", c.status.0));
                }
                self.out.max_packets_per_message = c.max_packets_per_message.max(1);
                self.out.packet_alignment = 1u32
                    .checked_shl(c.packet_alignment_factor)
                    .filter(|&a| a <= 4096)
                    .unwrap_or(8);
                Ok(vec![self.step(Step::MaxFrameSize)])
            }
            (Phase::Oid(step), RndisMessageType::QUERY_COMPLETE) => {
                let (c, _) = QueryComplete::read_from_prefix(body)
                    .map_err(|_| Error::Protocol("short RNDIS QUERY_COMPLETE".into()))?;
                if c.request_id != self.request_id {
                    return Ok(Vec::new());
                }
                // The answer lies at `info_buffer_offset` from the body's start.
                let info = (c.status == RndisStatus::SUCCESS)
                    .then(|| {
                        let at = c.info_buffer_offset as usize;
                        let end = at.checked_add(c.info_buffer_length as usize)?;
                        body.get(at..end)
                    })
                    .flatten();
                self.answered(step, c.status, info)
            }
            (Phase::Oid(step), RndisMessageType::SET_COMPLETE) => {
                let (c, _) = SetComplete::read_from_prefix(body)
                    .map_err(|_| Error::Protocol("short RNDIS SET_COMPLETE".into()))?;
                if c.request_id != self.request_id {
                    return Ok(Vec::new());
                }
                self.answered(step, c.status, None)
            }
            (_, t) => {
                tracing::debug!(?t, phase = ?self.phase, "RNDIS message ignored by the handshake");
                Ok(Vec::new())
            }
        }
    }

    /// Handles the answer to `step`; the next action.
    fn answered(
        &mut self,
        step: Step,
        status: RndisStatus,
        info: Option<&[u8]>,
    ) -> Result<Vec<Action>, Error> {
        let u32_of = |b: Option<&[u8]>| {
            b.filter(|b| b.len() == 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        };
        let next = match step {
            Step::MaxFrameSize => {
                self.out.max_frame_size = u32_of(info);
                Step::PermanentAddress
            }
            Step::PermanentAddress => {
                let mac: [u8; 6] = info
                    .filter(|b| b.len() == 6)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| Error::Protocol("no permanent MAC address".into()))?;
                self.out.permanent_mac = mac;
                self.out.mac = mac;
                Step::CurrentAddress
            }
            Step::CurrentAddress => {
                if let Some(mac) = info.filter(|b| b.len() == 6) {
                    self.out.mac.copy_from_slice(mac);
                }
                Step::FriendlyName
            }
            Step::FriendlyName => {
                self.out.friendly_name = info.filter(|b| !b.is_empty()).map(|b| {
                    let units: Vec<u16> = b
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .take_while(|&u| u != 0)
                        .collect();
                    String::from_utf16_lossy(&units)
                });
                Step::OffloadCaps
            }
            Step::OffloadCaps => {
                let b = info.ok_or_else(|| status_error("offload capabilities", status.0))?;
                let (h, _) = NdisObjectHeader::read_from_prefix(b)
                    .map_err(|_| Error::Protocol("short offload capabilities".into()))?;
                if h.object_type != rndis::object_type::OFFLOAD
                    || h.revision < rndis::OFFLOAD_PARAMETERS_REVISION_1
                    || usize::from(h.size) > b.len()
                    || usize::from(h.size) < rndis::NDIS_OFFLOAD_SIZE_6_0
                {
                    return Err(Error::Protocol(format!(
                        "offload capabilities refused: {h:?}"
                    )));
                }
                let mut full = [0u8; size_of::<NdisOffload>()];
                let n = b.len().min(full.len());
                full[..n].copy_from_slice(&b[..n]);
                let caps = NdisOffload::read_from_bytes(&full).expect("exact size");
                let c4 = TxChecksumCaps::from_bits_retain(caps.csum.ip4_tx_csum);
                let c6 = TxChecksumCaps::from_bits_retain(caps.csum.ip6_tx_csum);
                self.out.csum_tcp4 = c4.contains(TxChecksumCaps::ALL_TCP);
                self.out.csum_udp4 = self.out.csum_tcp4 && c4.contains(TxChecksumCaps::UDP);
                self.out.csum_tcp6 = c6.contains(TxChecksumCaps::ALL_TCP);
                self.out.csum_udp6 = self.out.csum_tcp6 && c6.contains(TxChecksumCaps::UDP);
                let e8023 = rndis::offload_encap::E802_3;
                self.out.lso4 = (self.out.csum_tcp4 && caps.lsov2.ip4_encap & e8023 != 0)
                    .then_some(caps.lsov2.ip4_max_size);
                self.out.lso6 = (self.out.csum_tcp6
                    && caps.lsov2.ip6_encap & e8023 != 0
                    && caps.lsov2.ip6_opts & 0x5 == 0x5)
                    .then_some(caps.lsov2.ip6_max_size);
                // Only the full (NDIS 6.30) capabilities reach the RSC bytes.
                self.out.rsc = self.out.version.0 >= NvspVersion::V61.0
                    && n > core::mem::offset_of!(NdisOffload, rsc) + 1
                    && caps.rsc.ip4 != 0
                    && caps.rsc.ip6 != 0;
                Step::OffloadParams
            }
            Step::OffloadParams => {
                if status != RndisStatus::SUCCESS {
                    return Err(status_error("offload parameters", status.0));
                }
                Step::MediaConnect
            }
            Step::MediaConnect => {
                self.out.connected = u32_of(info) == Some(rndis::MEDIA_STATE_CONNECTED);
                if self.out.version.0 < NvspVersion::V5.0 {
                    return Ok(vec![self.finish_channels()]);
                }
                Step::LinkSpeed
            }
            Step::LinkSpeed => {
                self.out.link_speed = u32_of(info);
                Step::RssCaps
            }
            Step::RssCaps => {
                let caps = info
                    .filter(|b| b.len() >= size_of::<NdisRecvScaleCap>())
                    .and_then(|b| NdisRecvScaleCap::read_from_prefix(b).ok())
                    .map(|(c, _)| c);
                self.out.rss_queues = caps.map_or(0, |c| c.num_recv_queues);
                let want =
                    u32::from(self.params.queues.clamp(1, MAX_CHANNELS)).min(self.out.rss_queues);
                if want < 2 {
                    return Ok(vec![self.finish_channels()]);
                }
                self.out.channels = want as u16;
                self.phase = Phase::Subchannels;
                return Ok(vec![Action::Nvsp {
                    msg: NvspMessage::new(
                        NvspMessageType::SUBCHANNEL,
                        &SubchannelRequest {
                            op: NvspSubchannelOperation::ALLOCATE,
                            num_subchannels: want - 1,
                        },
                    ),
                    completion: true,
                }]);
            }
            Step::RssParams => {
                // Failures are ignored (the channels stay), as Linux does.
                Step::Filter
            }
            Step::Filter => {
                if status != RndisStatus::SUCCESS {
                    return Err(status_error("packet filter", status.0));
                }
                self.out.filter = Some(DEFAULT_FILTER);
                self.phase = Phase::Done;
                return Ok(vec![Action::Done]);
            }
        };
        Ok(vec![self.step(next)])
    }

    /// One channel (no subchannels): straight to the packet filter.
    fn finish_channels(&mut self) -> Action {
        self.out.channels = 1;
        self.step(Step::Filter)
    }

    /// Builds the request of `step`.
    fn step(&mut self, step: Step) -> Action {
        self.phase = Phase::Oid(step);
        let query = |oid: Oid| (RndisMessageType::QUERY, oid, Vec::new());
        let (kind, oid, value) = match step {
            Step::MaxFrameSize => query(Oid::GEN_MAXIMUM_FRAME_SIZE),
            Step::PermanentAddress => query(Oid::E802_3_PERMANENT_ADDRESS),
            Step::CurrentAddress => query(Oid::E802_3_CURRENT_ADDRESS),
            Step::FriendlyName => query(OID_GEN_FRIENDLY_NAME),
            Step::OffloadCaps => {
                let (revision, size) = if self.out.version.0 >= NvspVersion::V5.0 {
                    (
                        rndis::OFFLOAD_PARAMETERS_REVISION_3,
                        size_of::<NdisOffload>(),
                    )
                } else if self.ndis >= NDIS_VERSION_6_1 {
                    (
                        rndis::OFFLOAD_PARAMETERS_REVISION_2,
                        rndis::NDIS_OFFLOAD_SIZE_6_1,
                    )
                } else {
                    (
                        rndis::OFFLOAD_PARAMETERS_REVISION_1,
                        rndis::NDIS_OFFLOAD_SIZE_6_0,
                    )
                };
                let caps = NdisOffload {
                    header: NdisObjectHeader {
                        object_type: rndis::object_type::OFFLOAD,
                        revision,
                        size: size as u16,
                    },
                    ..Default::default()
                };
                (
                    RndisMessageType::QUERY,
                    Oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES,
                    caps.as_bytes()[..size].to_vec(),
                )
            }
            Step::OffloadParams => {
                use rndis::offload_param::{
                    LSOV2_ENABLED, RSC_ENABLED, TX_RX_DISABLED, TX_RX_ENABLED,
                };
                let n = &self.out;
                let on = |b: bool| if b { TX_RX_ENABLED } else { 0 };
                let lso = |b: bool| if b { LSOV2_ENABLED } else { 0 };
                let mut p = NdisOffloadParams {
                    ip_v4_csum: TX_RX_DISABLED,
                    tcp_ip_v4_csum: on(n.csum_tcp4),
                    udp_ip_v4_csum: on(n.csum_udp4),
                    tcp_ip_v6_csum: on(n.csum_tcp6),
                    udp_ip_v6_csum: on(n.csum_udp6),
                    lso_v2_ipv4: lso(n.lso4.is_some()),
                    lso_v2_ipv6: lso(n.lso6.is_some()),
                    rsc_ip_v4: if n.rsc { RSC_ENABLED } else { 0 },
                    rsc_ip_v6: if n.rsc { RSC_ENABLED } else { 0 },
                    ..Default::default()
                };
                let len = if n.version.0 <= NvspVersion::V4.0 {
                    p.header = NdisObjectHeader {
                        object_type: rndis::object_type::DEFAULT,
                        revision: rndis::OFFLOAD_PARAMETERS_REVISION_1,
                        size: rndis::VERSION_4_OFFLOAD_SIZE as u16,
                    };
                    rndis::VERSION_4_OFFLOAD_SIZE
                } else {
                    p.header = NdisObjectHeader {
                        object_type: rndis::object_type::DEFAULT,
                        revision: rndis::OFFLOAD_PARAMETERS_REVISION_3,
                        size: size_of::<NdisOffloadParams>() as u16,
                    };
                    size_of::<NdisOffloadParams>()
                };
                (
                    RndisMessageType::SET,
                    Oid::TCP_OFFLOAD_PARAMETERS,
                    p.as_bytes()[..len].to_vec(),
                )
            }
            Step::MediaConnect => query(Oid::GEN_MEDIA_CONNECT_STATUS),
            Step::LinkSpeed => query(Oid::GEN_LINK_SPEED),
            Step::RssCaps => {
                let caps = NdisRecvScaleCap {
                    header: NdisObjectHeader {
                        object_type: rndis::object_type::RSS_CAPABILITIES,
                        revision: rndis::RSS_REVISION_2,
                        size: size_of::<NdisRecvScaleCap>() as u16,
                    },
                    ..Default::default()
                };
                (
                    RndisMessageType::QUERY,
                    Oid::GEN_RECEIVE_SCALE_CAPABILITIES,
                    caps.as_bytes().to_vec(),
                )
            }
            Step::RssParams => (
                RndisMessageType::SET,
                Oid::GEN_RECEIVE_SCALE_PARAMETERS,
                rss_params(self.out.channels),
            ),
            Step::Filter => (
                RndisMessageType::SET,
                Oid::GEN_CURRENT_PACKET_FILTER,
                DEFAULT_FILTER.bits().to_le_bytes().to_vec(),
            ),
        };
        self.request_id = self.request_id.wrapping_add(1);
        let head = QueryRequest {
            request_id: self.request_id,
            oid,
            info_buffer_length: value.len() as u32,
            info_buffer_offset: if value.is_empty() {
                0
            } else {
                size_of::<QueryRequest>() as u32
            },
            device_vc_handle: 0,
        };
        // QUERY and SET requests have the same layout.
        const _: () = assert!(size_of::<QueryRequest>() == size_of::<SetRequest>());
        self.rndis_raw(kind, head.as_bytes(), &value)
    }

    fn rndis(&mut self, kind: RndisMessageType, body: &[u8], tail: &[u8]) -> Action {
        self.request_id = self.request_id.wrapping_add(1);
        let mut b = body.to_vec();
        // Every request's id is its body's first word.
        b[..4].copy_from_slice(&self.request_id.to_le_bytes());
        self.rndis_raw(kind, &b, tail)
    }

    fn rndis_raw(&self, kind: RndisMessageType, body: &[u8], tail: &[u8]) -> Action {
        let len = 8 + body.len() + tail.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(
            RndisMessageHeader {
                message_type: kind,
                message_length: len as u32,
            }
            .as_bytes(),
        );
        m.extend_from_slice(body);
        m.extend_from_slice(tail);
        Action::Rndis(m)
    }
}

/// The RSS parameters Linux sets: Toeplitz over IPv4/IPv6 with TCP, the default key, and a
/// 128-entry table spreading over `channels`.
pub fn rss_params(channels: u16) -> Vec<u8> {
    let head = size_of::<NdisRecvScaleParam>();
    let table_bytes = RSS_TABLE_ENTRIES * 4;
    let p = NdisRecvScaleParam {
        header: NdisObjectHeader {
            object_type: rndis::object_type::RSS_PARAMETERS,
            revision: rndis::RSS_REVISION_2,
            size: head as u16,
        },
        flags: 0,
        base_cpu_number: 0,
        hash_info: rndis::rss_hash::FUNC_TOEPLITZ
            | rndis::rss_hash::IPV4
            | rndis::rss_hash::TCP_IPV4
            | rndis::rss_hash::IPV6
            | rndis::rss_hash::TCP_IPV6,
        indirection_table_size: table_bytes as u16,
        padding1: 0,
        indirection_table_offset: head as u32,
        hash_key_size: RSS_KEY.len() as u16,
        padding2: 0,
        hash_key_offset: (head + table_bytes) as u32,
        processor_masks_offset: 0,
        num_processor_masks: 0,
        processor_masks_entry_size: 0,
    };
    let mut out = p.as_bytes().to_vec();
    for i in 0..RSS_TABLE_ENTRIES {
        out.extend_from_slice(&(i as u32 % u32::from(channels.max(1))).to_le_bytes());
    }
    out.extend_from_slice(&RSS_KEY);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host's RNDIS completion of `kind` for request `id`, with `info` as its answer.
    fn rndis_completion(
        kind: RndisMessageType,
        id: u32,
        status: RndisStatus,
        info: &[u8],
    ) -> Vec<u8> {
        let mut body = Vec::new();
        match kind {
            RndisMessageType::QUERY_COMPLETE => body.extend_from_slice(
                QueryComplete {
                    request_id: id,
                    status,
                    info_buffer_length: info.len() as u32,
                    info_buffer_offset: 16,
                }
                .as_bytes(),
            ),
            RndisMessageType::SET_COMPLETE => body.extend_from_slice(
                SetComplete {
                    request_id: id,
                    status,
                }
                .as_bytes(),
            ),
            _ => body.extend_from_slice(
                InitializeComplete {
                    request_id: id,
                    status,
                    major_version: 1,
                    device_flags: rndis::DF_CONNECTIONLESS,
                    max_packets_per_message: 8,
                    max_transfer_size: 0x4000,
                    packet_alignment_factor: 3,
                    ..Default::default()
                }
                .as_bytes(),
            ),
        }
        body.extend_from_slice(info);
        let mut m = RndisMessageHeader {
            message_type: kind,
            message_length: 8 + body.len() as u32,
        }
        .as_bytes()
        .to_vec();
        m.extend(body);
        m
    }

    /// The request an action sends: its RNDIS type, id and OID (0 for INITIALIZE).
    fn request(a: &Action) -> (RndisMessageType, u32, Oid, Vec<u8>) {
        let Action::Rndis(m) = a else {
            panic!("not an RNDIS request: {a:?}")
        };
        let (h, body) = RndisMessageHeader::read_from_prefix(m).unwrap();
        assert_eq!(h.message_length as usize, m.len());
        let id = u32::from_le_bytes(body[..4].try_into().unwrap());
        if h.message_type == RndisMessageType::INITIALIZE {
            return (h.message_type, id, Oid(0), Vec::new());
        }
        let (q, _) = QueryRequest::read_from_prefix(body).unwrap();
        let at = q.info_buffer_offset as usize;
        let value = body[at..at + q.info_buffer_length as usize].to_vec();
        (h.message_type, id, q.oid, value)
    }

    fn offload_caps() -> Vec<u8> {
        let mut c = NdisOffload {
            header: NdisObjectHeader {
                object_type: rndis::object_type::OFFLOAD,
                revision: 3,
                size: size_of::<NdisOffload>() as u16,
            },
            ..Default::default()
        };
        let all = TxChecksumCaps::ALL_TCP | TxChecksumCaps::UDP | TxChecksumCaps::IP4;
        c.csum.ip4_tx_csum = all.bits();
        c.csum.ip6_tx_csum = all.bits();
        c.lsov2.ip4_encap = rndis::offload_encap::E802_3;
        c.lsov2.ip4_max_size = 62780;
        c.lsov2.ip6_encap = rndis::offload_encap::E802_3;
        c.lsov2.ip6_max_size = 62780;
        c.lsov2.ip6_opts = 0x5;
        c.rsc.ip4 = 1;
        c.rsc.ip6 = 1;
        c.as_bytes().to_vec()
    }

    /// Runs the handshake against a host that accepts `accept` (and refuses newer versions),
    /// grants `grant` subchannels; returns the versions proposed, the OIDs asked in order,
    /// and the result.
    fn run(
        accept: NvspVersion,
        queues: u16,
        grant: u32,
    ) -> (Vec<NvspVersion>, Vec<Oid>, Result<Negotiated, Error>) {
        let (mut h, mut acts) = Handshake::start(Params { mtu: 1500, queues });
        let (mut proposed, mut oids) = (Vec::new(), Vec::new());
        let mut steps = 0;
        while let Some(a) = (!acts.is_empty()).then(|| acts.remove(0)) {
            steps += 1;
            assert!(steps < 100, "no progress");
            let r = match &a {
                Action::Nvsp { msg, completion } => {
                    let t = msg.header.message_type;
                    let answer = match t {
                        NvspMessageType::INIT => {
                            let i: NvspInit = msg.body();
                            assert_eq!(i.min_protocol_version, i.max_protocol_version);
                            assert!(*completion);
                            proposed.push(i.max_protocol_version);
                            let ok = i.max_protocol_version == accept;
                            Some(NvspMessage::new(
                                NvspMessageType::INIT_COMPLETE,
                                &NvspInitComplete {
                                    negotiated_protocol_version: i.max_protocol_version,
                                    max_mdl_chain_length: 0,
                                    status: if ok {
                                        NvspStatus::SUCCESS
                                    } else {
                                        NvspStatus::FAIL
                                    },
                                },
                            ))
                        }
                        NvspMessageType::SEND_NDIS_CONFIG | NvspMessageType::SEND_NDIS_VERSION => {
                            assert!(!completion);
                            None
                        }
                        NvspMessageType::SEND_RECEIVE_BUFFER => {
                            let b: SendReceiveBuffer = msg.body();
                            assert_eq!({ b.id }, LINUX_RECEIVE_BUFFER_ID);
                            let mut c = SendReceiveBufferComplete {
                                status: NvspStatus::SUCCESS,
                                num_sections: 1,
                                ..Default::default()
                            };
                            c.sections[0].sub_alloc_size = 1728;
                            c.sections[0].num_sub_allocs = (16 << 20) / 1728;
                            Some(NvspMessage::new(
                                NvspMessageType::SEND_RECEIVE_BUFFER_COMPLETE,
                                &c,
                            ))
                        }
                        NvspMessageType::SEND_SEND_BUFFER => Some(NvspMessage::new(
                            NvspMessageType::SEND_SEND_BUFFER_COMPLETE,
                            &SendSendBufferComplete {
                                status: NvspStatus::SUCCESS,
                                section_size: 6144,
                            },
                        )),
                        NvspMessageType::SUBCHANNEL => Some(NvspMessage::new(
                            NvspMessageType::SUBCHANNEL,
                            &SubchannelComplete {
                                status: NvspStatus::SUCCESS,
                                num_subchannels: grant,
                            },
                        )),
                        other => panic!("unexpected {other:?}"),
                    };
                    match answer {
                        Some(m) => h.on_nvsp(&m),
                        None => Ok(Vec::new()),
                    }
                }
                Action::CreateBuffer(which, _) => h.buffer_ready(*which, 7),
                Action::OpenSubchannels(_) => h.subchannels_open(),
                Action::Rndis(_) => {
                    let (kind, id, oid, value) = request(&a);
                    if kind == RndisMessageType::INITIALIZE {
                        h.on_rndis(&rndis_completion(
                            RndisMessageType::INITIALIZE_COMPLETE,
                            id,
                            RndisStatus::SUCCESS,
                            &[],
                        ))
                    } else {
                        oids.push(oid);
                        let (status, info): (RndisStatus, Vec<u8>) = match oid {
                            Oid::GEN_MAXIMUM_FRAME_SIZE => {
                                (RndisStatus::SUCCESS, 1500u32.to_le_bytes().to_vec())
                            }
                            Oid::E802_3_PERMANENT_ADDRESS | Oid::E802_3_CURRENT_ADDRESS => {
                                (RndisStatus::SUCCESS, vec![2, 0, 0, 0, 0, 9])
                            }
                            Oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES => {
                                assert_eq!(value[0], rndis::object_type::OFFLOAD);
                                (RndisStatus::SUCCESS, offload_caps())
                            }
                            Oid::GEN_MEDIA_CONNECT_STATUS => {
                                (RndisStatus::SUCCESS, 0u32.to_le_bytes().to_vec())
                            }
                            Oid::GEN_LINK_SPEED => {
                                (RndisStatus::SUCCESS, 100_000_000u32.to_le_bytes().to_vec())
                            }
                            Oid::GEN_RECEIVE_SCALE_CAPABILITIES => (
                                RndisStatus::SUCCESS,
                                NdisRecvScaleCap {
                                    num_recv_queues: 8,
                                    ..Default::default()
                                }
                                .as_bytes()
                                .to_vec(),
                            ),
                            _ => (RndisStatus::NOT_SUPPORTED, Vec::new()),
                        };
                        let status = if kind == RndisMessageType::SET
                            && matches!(
                                oid,
                                Oid::TCP_OFFLOAD_PARAMETERS | Oid::GEN_CURRENT_PACKET_FILTER
                            ) {
                            RndisStatus::SUCCESS
                        } else {
                            status
                        };
                        let ck = if kind == RndisMessageType::SET {
                            RndisMessageType::SET_COMPLETE
                        } else {
                            RndisMessageType::QUERY_COMPLETE
                        };
                        h.on_rndis(&rndis_completion(ck, id, status, &info))
                    }
                }
                Action::Done => {
                    assert!(h.done());
                    return (proposed, oids, Ok(h.negotiated().clone()));
                }
            };
            match r {
                Ok(more) => acts.extend(more),
                Err(e) => return (proposed, oids, Err(e)),
            }
        }
        panic!("the handshake stalled");
    }

    #[test]
    fn versions_newest_first_and_oids_in_linux_order() {
        let (proposed, oids, r) = run(NvspVersion::V61, 4, 3);
        assert_eq!(proposed, [NvspVersion::V61]);
        let n = r.unwrap();
        assert_eq!(
            oids,
            [
                Oid::GEN_MAXIMUM_FRAME_SIZE,
                Oid::E802_3_PERMANENT_ADDRESS,
                Oid::E802_3_CURRENT_ADDRESS,
                OID_GEN_FRIENDLY_NAME,
                Oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES,
                Oid::TCP_OFFLOAD_PARAMETERS,
                Oid::GEN_MEDIA_CONNECT_STATUS,
                Oid::GEN_LINK_SPEED,
                Oid::GEN_RECEIVE_SCALE_CAPABILITIES,
                Oid::GEN_RECEIVE_SCALE_PARAMETERS,
                Oid::GEN_CURRENT_PACKET_FILTER,
            ]
        );
        assert_eq!(n.channels, 4);
        assert_eq!(n.mac, [2, 0, 0, 0, 0, 9]);
        assert!(n.connected && n.csum_tcp4 && n.csum_udp6);
        assert_eq!(n.lso4, Some(62780));
        assert!(n.rsc);
        assert_eq!((n.send_section_size, n.send_sections), (6144, 170));
        assert_eq!(n.packet_alignment, 8);
        assert_eq!(n.filter, Some(DEFAULT_FILTER));
    }

    #[test]
    fn an_old_host_is_found_by_going_down_the_list() {
        let (proposed, oids, r) = run(NvspVersion::V4, 4, 3);
        assert_eq!(
            proposed,
            [
                NvspVersion::V61,
                NvspVersion::V6,
                NvspVersion::V5,
                NvspVersion::V4
            ]
        );
        let n = r.unwrap();
        // Below NVSP 5: no link speed, no RSS, one channel; below 6.1 no RSC.
        assert_eq!(n.channels, 1);
        assert!(!n.rsc);
        assert_eq!(oids.last(), Some(&Oid::GEN_CURRENT_PACKET_FILTER));
        assert!(!oids.contains(&Oid::GEN_RECEIVE_SCALE_CAPABILITIES));
        let (_, _, r) = run(NvspVersion(0x1234), 1, 0);
        assert!(matches!(r, Err(Error::Refused(_))));
    }

    #[test]
    fn a_host_granting_more_subchannels_than_asked_is_refused() {
        let (_, _, r) = run(NvspVersion::V61, 2, 5);
        assert!(matches!(r, Err(Error::Protocol(_))), "{r:?}");
        let (_, _, r) = run(NvspVersion::V61, 4, 1);
        assert_eq!(r.unwrap().channels, 2, "fewer granted: that many used");
        let (_, oids, r) = run(NvspVersion::V61, 1, 0);
        assert_eq!(r.unwrap().channels, 1);
        assert!(!oids.contains(&Oid::GEN_RECEIVE_SCALE_PARAMETERS));
    }

    #[test]
    fn bad_buffer_completions_are_refused() {
        let start = || {
            let (mut h, _) = Handshake::start(Params {
                mtu: 1500,
                queues: 1,
            });
            h.on_nvsp(&NvspMessage::new(
                NvspMessageType::INIT_COMPLETE,
                &NvspInitComplete {
                    negotiated_protocol_version: NvspVersion::V61,
                    max_mdl_chain_length: 0,
                    status: NvspStatus::SUCCESS,
                },
            ))
            .unwrap();
            h.buffer_ready(Buffer::Receive, 1).unwrap();
            h
        };
        // A good completion, changed by `f`.
        let completion = |f: &dyn Fn(&mut SendReceiveBufferComplete)| {
            let mut c = SendReceiveBufferComplete {
                status: NvspStatus::SUCCESS,
                num_sections: 1,
                ..Default::default()
            };
            c.sections[0].sub_alloc_size = 1728;
            c.sections[0].num_sub_allocs = 100;
            f(&mut c);
            NvspMessage::new(NvspMessageType::SEND_RECEIVE_BUFFER_COMPLETE, &c)
        };
        let recv = |f: &dyn Fn(&mut SendReceiveBufferComplete)| start().on_nvsp(&completion(f));
        assert!(recv(&|_| {}).is_ok());
        assert!(recv(&|c| c.status = NvspStatus::FAIL).is_err());
        assert!(recv(&|c| c.num_sections = 2).is_err());
        assert!(recv(&|c| c.sections[0].offset = 64).is_err());
        assert!(recv(&|c| c.sections[0].sub_alloc_size = 67).is_err());
        assert!(recv(&|c| c.sections[0].num_sub_allocs = u32::MAX).is_err());
        let mut h = start();
        h.on_nvsp(&completion(&|_| {})).unwrap();
        h.buffer_ready(Buffer::Send, 2).unwrap();
        let mut small = h.clone();
        assert!(small
            .on_nvsp(&NvspMessage::new(
                NvspMessageType::SEND_SEND_BUFFER_COMPLETE,
                &SendSendBufferComplete {
                    status: NvspStatus::SUCCESS,
                    section_size: 67,
                },
            ))
            .is_err());
        // Out of order, or a buffer given twice.
        assert!(h.buffer_ready(Buffer::Receive, 3).is_err());
    }

    #[test]
    fn rss_parameters_spread_the_table_over_the_channels() {
        let p = rss_params(3);
        let (h, _) = NdisRecvScaleParam::read_from_prefix(&p).unwrap();
        assert_eq!(h.header.object_type, rndis::object_type::RSS_PARAMETERS);
        let t = h.indirection_table_offset as usize;
        let entry = |i: usize| u32::from_le_bytes(p[t + 4 * i..t + 4 * i + 4].try_into().unwrap());
        assert_eq!((entry(0), entry(1), entry(2), entry(3)), (0, 1, 2, 0));
        let k = h.hash_key_offset as usize;
        assert_eq!(&p[k..k + 40], &RSS_KEY);
        assert_eq!(p.len(), k + 40);
    }
}
