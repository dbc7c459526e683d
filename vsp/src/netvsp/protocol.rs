//! netvsp's protocol logic without I/O: NVSP version choice, the RNDIS control messages
//! (INITIALIZE, QUERY, SET, RESET, HALT, KEEPALIVE) and their answers, the parsing of a
//! guest's RNDIS data message, and the RNDIS headers of frames and status indications toward
//! the guest. Everything here takes bytes the guest wrote (copied out of its memory) and
//! answers with bytes; no panic and no allocation proportional to guest input beyond one
//! message.

use netdev::{RxOffload, TxOffload};
use vmbus_proto::netvsp::NvspVersion;
use vmbus_proto::rndis::PacketFilter;
use vmbus_proto::rndis::{
    object_type, IndicateStatus, InitializeComplete, InitializeRequest, InternalPpiType,
    KeepaliveComplete, KeepaliveRequest, NdisCsumOffload, NdisLsoV2Offload, NdisObjectHeader,
    NdisOffload, NdisOffloadParams, NdisPkt8021qInfo, NdisRecvScaleCap, NdisRecvScaleParam,
    NdisRscOffload, NdisTcpIpChecksumInfo, NdisTcpLsoInfo, Oid, PerPacketInfo, PktInfoFlags,
    PktInfoId, PpiType, QueryComplete, QueryRequest, ResetComplete, RndisMessageHeader,
    RndisMessageType, RndisPacket, RndisStatus, SetComplete, SetRequest, DF_CONNECTIONLESS,
    MEDIA_STATE_CONNECTED, MEDIA_STATE_DISCONNECTED, MEDIUM_802_3, NDIS_OFFLOAD_SIZE_6_0,
    NDIS_OFFLOAD_SIZE_6_1, RNDIS_MAJOR_VERSION, RNDIS_MINOR_VERSION, RSS_HASH_KEY_SIZE,
    RSS_INDIRECTION_TABLE_ENTRIES, RSS_REVISION_2,
};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The versions we speak, newest first: all Linux 6.1 asks for.
pub const VERSIONS: [NvspVersion; 6] = vmbus_proto::netvsp::LINUX_6_1_VERSIONS;

/// A SEND_RNDIS_PACKET message: a control or data RNDIS message, in send-buffer section
/// `(index, bytes)` or (`None`) elsewhere (GPA-direct pages, the receive buffer).
pub fn send_rndis_message(
    control: bool,
    section: Option<(u32, u32)>,
) -> vmbus_proto::netvsp::NvspMessage {
    use vmbus_proto::netvsp::{
        NvspMessage, NvspMessageType, SendRndisPacket, CHANNEL_TYPE_CONTROL, CHANNEL_TYPE_DATA,
        INVALID_SECTION_INDEX,
    };
    let (index, size) = section.unwrap_or((INVALID_SECTION_INDEX, 0));
    NvspMessage::new(
        NvspMessageType::SEND_RNDIS_PACKET,
        &SendRndisPacket {
            channel_type: if control {
                CHANNEL_TYPE_CONTROL
            } else {
                CHANNEL_TYPE_DATA
            },
            send_buffer_section_index: index,
            send_buffer_section_size: size,
        },
    )
}

/// The version to use for a guest's INIT range (`min ..= max`): the newest we speak in it.
pub fn negotiate(min: NvspVersion, max: NvspVersion) -> Option<NvspVersion> {
    VERSIONS.into_iter().find(|v| min.0 <= v.0 && v.0 <= max.0)
}

/// `RNDIS_OID_GEN_FRIENDLY_NAME` (not in the Linux layouts the wire crate mirrors).
pub const OID_GEN_FRIENDLY_NAME: Oid = Oid(0x0002_0216);
/// RNDIS packets the guest may put in one send section (answered in INITIALIZE).
pub const MAX_PACKETS_PER_MESSAGE: u32 = 8;
/// log2 of the alignment of packets in one send section (answered in INITIALIZE).
pub const PACKET_ALIGNMENT_SHIFT: u32 = 3;
/// Largest large send we take (the TSO size Hyper-V announces to Linux).
pub const MAX_LSO_SIZE: u32 = 62_768;
/// Link speed reported, in units of 100 bit/s (10 Gbit/s).
pub const LINK_SPEED_100BPS: u32 = 100_000_000;
/// Longest control message we read; longer ones are answered INVALID_LENGTH.
pub const MAX_CONTROL_MESSAGE: usize = 4096;
/// Longest per-packet info area of a data message we read.
pub const MAX_PPI_BYTES: usize = 256;
/// Bytes of a data message's start copied to parse it.
pub const DATA_HEAD_BYTES: usize = RNDIS_HEADER + size_of::<RndisPacket>() + MAX_PPI_BYTES;
/// Bytes of the RNDIS message header.
pub const RNDIS_HEADER: usize = size_of::<RndisMessageHeader>();
/// Where a frame toward the guest starts in its receive section: after the RNDIS header,
/// the packet message and room for four per-packet info entries (checksum, VLAN, hash and the
/// RSC fragment's packet id), rounded up to 16.
pub const RX_DATA_OFFSET: u32 = 112;

const _: () = assert!(RNDIS_HEADER + size_of::<RndisPacket>() + 4 * 16 <= RX_DATA_OFFSET as usize);

/// What the NIC is, as the RNDIS answers describe it.
#[derive(Clone, Debug)]
pub struct NicView {
    /// Largest frame payload (MTU).
    pub mtu: u32,
    /// The permanent address.
    pub mac: [u8; 6],
    /// Medium connected.
    pub connected: bool,
    /// Queues (receive channels) the NIC may have.
    pub max_queues: u32,
    /// Channels the guest has now (primary and granted subchannels).
    pub channels: u32,
    /// The negotiated NVSP version.
    pub version: NvspVersion,
    /// The name reported as the friendly name.
    pub name: String,
}

/// The receive-side settings the guest chose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RssSettings {
    /// The indirection table (channel numbers).
    pub table: Vec<u32>,
    /// The Toeplitz key.
    pub key: Vec<u8>,
    /// The hash information (`NDIS_HASH_*`: function and types; 0 from [`parse_rss`]: left
    /// unchanged).
    pub hash_info: u32,
}

/// The RNDIS device state the guest's control messages change.
#[derive(Clone, Debug, Default)]
pub struct RndisControl {
    /// INITIALIZE done (and no HALT since).
    pub initialized: bool,
    /// The packet filter; empty delivers nothing.
    pub filter: PacketFilter,
    /// The current address, if the guest set one.
    pub current_mac: Option<[u8; 6]>,
    /// The multicast list's length (entries).
    pub multicast: usize,
    /// The last offload parameters set.
    pub offload: Option<NdisOffloadParams>,
    /// RSS settings (None: RSS off).
    pub rss: Option<RssSettings>,
    /// Receive segment coalescing the guest enabled over IPv4 and IPv6 (offload parameters'
    /// `rsc_ip_v4`, `rsc_ip_v6`; a parameter of "no change" keeps the last value).
    pub rsc: RscEnabled,
}

/// Whether receive segment coalescing is on, per IP version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RscEnabled {
    /// Over IPv4.
    pub ipv4: bool,
    /// Over IPv6.
    pub ipv6: bool,
}

impl RscEnabled {
    /// Either is on.
    pub fn any(&self) -> bool {
        self.ipv4 || self.ipv6
    }
}

/// The outcome of one control message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ControlOutcome {
    /// The complete message to send back (in a receive section), if any.
    pub response: Option<Vec<u8>>,
    /// The message was malformed or not a control message (counted).
    pub malformed: bool,
}

fn message(kind: RndisMessageType, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = RNDIS_HEADER + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(
        RndisMessageHeader {
            message_type: kind,
            message_length: len as u32,
        }
        .as_bytes(),
    );
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

fn read<T: FromBytes>(b: &[u8]) -> Option<T> {
    T::read_from_prefix(b).ok().map(|(v, _)| v)
}

fn bytes_of<T: IntoBytes + Immutable>(v: &T) -> &[u8] {
    v.as_bytes()
}

/// The info buffer of a QUERY or SET: `len` bytes at `offset` from the body's start, inside
/// the message's `body`.
fn info_buffer(body: &[u8], offset: u32, len: u32, fixed: usize) -> Option<&[u8]> {
    if len == 0 {
        return Some(&[]);
    }
    let start = offset as usize;
    let end = start.checked_add(len as usize)?;
    (start >= fixed && end <= body.len()).then(|| &body[start..end])
}

impl RndisControl {
    /// Handles one control message (the whole message, as the guest wrote it).
    pub fn handle(&mut self, msg: &[u8], nic: &NicView) -> ControlOutcome {
        let bad = ControlOutcome {
            response: None,
            malformed: true,
        };
        let Some(h) = read::<RndisMessageHeader>(msg) else {
            return bad;
        };
        let len = h.message_length as usize;
        if len < RNDIS_HEADER || len > msg.len() {
            return bad;
        }
        let body = &msg[RNDIS_HEADER..len];
        let response = match h.message_type {
            RndisMessageType::INITIALIZE => {
                let Some(r) = read::<InitializeRequest>(body) else {
                    return bad;
                };
                self.initialized = true;
                self.filter = PacketFilter::empty();
                self.rsc = RscEnabled::default();
                let status = if r.major_version == RNDIS_MAJOR_VERSION {
                    RndisStatus::SUCCESS
                } else {
                    self.initialized = false;
                    RndisStatus::BAD_VERSION
                };
                let c = InitializeComplete {
                    request_id: r.request_id,
                    status,
                    major_version: RNDIS_MAJOR_VERSION,
                    minor_version: RNDIS_MINOR_VERSION,
                    device_flags: DF_CONNECTIONLESS,
                    medium: MEDIUM_802_3,
                    max_packets_per_message: MAX_PACKETS_PER_MESSAGE,
                    max_transfer_size: MAX_LSO_SIZE + 4096,
                    packet_alignment_factor: PACKET_ALIGNMENT_SHIFT,
                    af_list_offset: 0,
                    af_list_size: 0,
                };
                Some(message(
                    RndisMessageType::INITIALIZE_COMPLETE,
                    &[bytes_of(&c)],
                ))
            }
            RndisMessageType::HALT => {
                self.initialized = false;
                self.filter = PacketFilter::empty();
                self.rsc = RscEnabled::default();
                None
            }
            RndisMessageType::RESET => {
                self.filter = PacketFilter::empty();
                let c = ResetComplete {
                    status: RndisStatus::SUCCESS,
                    addressing_reset: 0,
                };
                Some(message(RndisMessageType::RESET_COMPLETE, &[bytes_of(&c)]))
            }
            RndisMessageType::KEEPALIVE => {
                let Some(r) = read::<KeepaliveRequest>(body) else {
                    return bad;
                };
                let c = KeepaliveComplete {
                    request_id: r.request_id,
                    status: RndisStatus::SUCCESS,
                };
                Some(message(
                    RndisMessageType::KEEPALIVE_COMPLETE,
                    &[bytes_of(&c)],
                ))
            }
            RndisMessageType::QUERY => {
                let Some(r) = read::<QueryRequest>(body) else {
                    return bad;
                };
                let (status, info) = if !self.initialized {
                    (RndisStatus::FAILURE, Vec::new())
                } else {
                    match info_buffer(
                        body,
                        r.info_buffer_offset,
                        r.info_buffer_length,
                        size_of::<QueryRequest>(),
                    ) {
                        None => (RndisStatus::INVALID_LENGTH, Vec::new()),
                        Some(_) => self.query(r.oid, nic),
                    }
                };
                let c = QueryComplete {
                    request_id: r.request_id,
                    status,
                    info_buffer_length: info.len() as u32,
                    info_buffer_offset: size_of::<QueryComplete>() as u32,
                };
                Some(message(
                    RndisMessageType::QUERY_COMPLETE,
                    &[bytes_of(&c), &info],
                ))
            }
            RndisMessageType::SET => {
                let Some(r) = read::<SetRequest>(body) else {
                    return bad;
                };
                let status = if !self.initialized {
                    RndisStatus::FAILURE
                } else {
                    match info_buffer(
                        body,
                        r.info_buffer_offset,
                        r.info_buffer_length,
                        size_of::<SetRequest>(),
                    ) {
                        None => RndisStatus::INVALID_LENGTH,
                        Some(info) => self.set(r.oid, info, nic),
                    }
                };
                let c = SetComplete {
                    request_id: r.request_id,
                    status,
                };
                Some(message(RndisMessageType::SET_COMPLETE, &[bytes_of(&c)]))
            }
            _ => return bad,
        };
        ControlOutcome {
            response,
            malformed: false,
        }
    }

    fn query(&self, oid: Oid, nic: &NicView) -> (RndisStatus, Vec<u8>) {
        let ok = |b: &[u8]| (RndisStatus::SUCCESS, b.to_vec());
        match oid {
            Oid::GEN_MAXIMUM_FRAME_SIZE => ok(&nic.mtu.to_le_bytes()),
            Oid::E802_3_PERMANENT_ADDRESS => ok(&nic.mac),
            Oid::E802_3_CURRENT_ADDRESS => ok(&self.current_mac.unwrap_or(nic.mac)),
            OID_GEN_FRIENDLY_NAME => {
                let mut name: Vec<u8> = nic
                    .name
                    .encode_utf16()
                    .flat_map(|c| c.to_le_bytes())
                    .collect();
                name.extend_from_slice(&[0, 0]);
                ok(&name)
            }
            Oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES => ok(&hardware_offloads(nic.version)),
            Oid::GEN_MEDIA_CONNECT_STATUS => ok(&(if nic.connected {
                MEDIA_STATE_CONNECTED
            } else {
                MEDIA_STATE_DISCONNECTED
            })
            .to_le_bytes()),
            Oid::GEN_LINK_SPEED => ok(&LINK_SPEED_100BPS.to_le_bytes()),
            Oid::GEN_RECEIVE_SCALE_CAPABILITIES => {
                let c = NdisRecvScaleCap {
                    header: NdisObjectHeader {
                        object_type: object_type::RSS_CAPABILITIES,
                        revision: RSS_REVISION_2,
                        size: size_of::<NdisRecvScaleCap>() as u16,
                    },
                    capabilities: vmbus_proto::rndis::rss_caps::HASH_TYPE_TCP_IPV4
                        | vmbus_proto::rndis::rss_caps::HASH_TYPE_TCP_IPV6,
                    num_interrupt_messages: nic.max_queues,
                    num_recv_queues: nic.max_queues,
                    num_indirect_table_entries: RSS_INDIRECTION_TABLE_ENTRIES as u16,
                };
                ok(c.as_bytes())
            }
            Oid::GEN_CURRENT_PACKET_FILTER => ok(&self.filter.bits().to_le_bytes()),
            Oid::GEN_MAXIMUM_TOTAL_SIZE => ok(&(nic.mtu + 14).to_le_bytes()),
            _ => (RndisStatus::NOT_SUPPORTED, Vec::new()),
        }
    }

    fn set(&mut self, oid: Oid, info: &[u8], nic: &NicView) -> RndisStatus {
        match oid {
            Oid::GEN_CURRENT_PACKET_FILTER => match read::<u32>(info) {
                Some(f) if info.len() == 4 => {
                    self.filter = PacketFilter::from_bits_retain(f);
                    RndisStatus::SUCCESS
                }
                _ => RndisStatus::INVALID_LENGTH,
            },
            Oid::E802_3_CURRENT_ADDRESS => match <[u8; 6]>::try_from(info) {
                Ok(mac) if mac[0] & 1 == 0 => {
                    self.current_mac = Some(mac);
                    RndisStatus::SUCCESS
                }
                Ok(_) => RndisStatus::INVALID_DATA,
                Err(_) => RndisStatus::INVALID_LENGTH,
            },
            Oid::E802_3_MULTICAST_LIST => {
                if !info.len().is_multiple_of(6) || info.len() / 6 > 32 {
                    return RndisStatus::INVALID_LENGTH;
                }
                self.multicast = info.len() / 6;
                RndisStatus::SUCCESS
            }
            Oid::TCP_OFFLOAD_PARAMETERS => {
                let Some(p) = read::<NdisOffloadParams>(&pad(info, size_of::<NdisOffloadParams>()))
                else {
                    return RndisStatus::INVALID_LENGTH;
                };
                if info.len() < vmbus_proto::rndis::VERSION_4_OFFLOAD_SIZE
                    || usize::from(p.header.size) > info.len()
                {
                    return RndisStatus::INVALID_LENGTH;
                }
                if p.header.object_type != object_type::DEFAULT {
                    return RndisStatus::INVALID_DATA;
                }
                // The RSC bytes follow the first 22 (NDIS 6.30's parameters); shorter
                // parameters leave RSC as it was, and so does a "no change" (0).
                if info.len() > core::mem::offset_of!(NdisOffloadParams, rsc_ip_v6) {
                    use vmbus_proto::rndis::offload_param::{RSC_DISABLED, RSC_ENABLED};
                    let apply = |now: bool, v: u8| match v {
                        RSC_ENABLED => true,
                        RSC_DISABLED => false,
                        _ => now,
                    };
                    self.rsc.ipv4 = apply(self.rsc.ipv4, p.rsc_ip_v4);
                    self.rsc.ipv6 = apply(self.rsc.ipv6, p.rsc_ip_v6);
                }
                self.offload = Some(p);
                RndisStatus::SUCCESS
            }
            Oid::GEN_RECEIVE_SCALE_PARAMETERS => match parse_rss(info, nic.channels) {
                Ok(rss) => {
                    if let Some(r) = rss {
                        // Unchanged parts keep their values.
                        let old = self.rss.take().unwrap_or_default();
                        self.rss = Some(RssSettings {
                            table: if r.table.is_empty() {
                                old.table
                            } else {
                                r.table
                            },
                            key: if r.key.is_empty() { old.key } else { r.key },
                            hash_info: if r.hash_info == 0 {
                                old.hash_info
                            } else {
                                r.hash_info
                            },
                        });
                    } else {
                        self.rss = None;
                    }
                    RndisStatus::SUCCESS
                }
                Err(s) => s,
            },
            Oid::GEN_RNDIS_CONFIG_PARAMETER => RndisStatus::SUCCESS,
            _ => RndisStatus::NOT_SUPPORTED,
        }
    }
}

/// `b` extended with zeros to at least `n` bytes.
fn pad(b: &[u8], n: usize) -> Vec<u8> {
    let mut v = b.to_vec();
    if v.len() < n {
        v.resize(n, 0);
    }
    v
}

/// Validates RSS parameters for `channels` channels: `Ok(None)` disables RSS; tables and keys
/// left unchanged come back empty.
pub fn parse_rss(info: &[u8], channels: u32) -> Result<Option<RssSettings>, RndisStatus> {
    use vmbus_proto::rndis::RssParamFlags as F;
    let p = read::<NdisRecvScaleParam>(info).ok_or(RndisStatus::INVALID_LENGTH)?;
    let flags = F::from_bits_retain(p.flags);
    if p.header.object_type != object_type::RSS_PARAMETERS {
        return Err(RndisStatus::INVALID_DATA);
    }
    if flags.contains(F::DISABLE_RSS) {
        return Ok(None);
    }
    let mut out = RssSettings::default();
    if !flags.contains(F::ITABLE_UNCHANGED) {
        let size = usize::from(p.indirection_table_size);
        let start = p.indirection_table_offset as usize;
        if !size.is_multiple_of(4) || size == 0 || size > RSS_INDIRECTION_TABLE_ENTRIES * 4 {
            return Err(RndisStatus::INVALID_LENGTH);
        }
        let t = info
            .get(start..start.checked_add(size).ok_or(RndisStatus::INVALID_LENGTH)?)
            .ok_or(RndisStatus::INVALID_LENGTH)?;
        for e in t.chunks_exact(4) {
            let ch = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            if ch >= channels {
                return Err(RndisStatus::INVALID_DATA);
            }
            out.table.push(ch);
        }
    }
    if !flags.contains(F::HASH_KEY_UNCHANGED) {
        let size = usize::from(p.hash_key_size);
        let start = p.hash_key_offset as usize;
        if size != RSS_HASH_KEY_SIZE {
            return Err(RndisStatus::INVALID_LENGTH);
        }
        let k = info
            .get(start..start + size)
            .ok_or(RndisStatus::INVALID_LENGTH)?;
        out.key = k.to_vec();
    }
    if !flags.contains(F::HASH_INFO_UNCHANGED) {
        if p.hash_info & 0xff != vmbus_proto::rndis::rss_hash::FUNC_TOEPLITZ {
            return Err(RndisStatus::NOT_SUPPORTED);
        }
        out.hash_info = p.hash_info;
    }
    Ok(Some(out))
}

/// The offload capabilities answered to `OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES`, sized and
/// revised for the NVSP version as Linux asks: checksums (TCP and UDP, IPv4 and IPv6, both
/// ways) and LSO v2 over 802.3; from NVSP 6.1 receive segment coalescing (IPv4 and IPv6:
/// Linux offers LRO only when both are there); no IPsec.
pub fn hardware_offloads(version: NvspVersion) -> Vec<u8> {
    use vmbus_proto::rndis::{
        csum_cap as cs, offload_encap as enc, OFFLOAD_PARAMETERS_REVISION_1,
        OFFLOAD_PARAMETERS_REVISION_2, OFFLOAD_PARAMETERS_REVISION_3,
    };
    let (revision, size) = if version.0 >= NvspVersion::V5.0 {
        (OFFLOAD_PARAMETERS_REVISION_3, size_of::<NdisOffload>())
    } else if version.0 >= NvspVersion::V4.0 {
        (OFFLOAD_PARAMETERS_REVISION_2, NDIS_OFFLOAD_SIZE_6_1)
    } else {
        (OFFLOAD_PARAMETERS_REVISION_1, NDIS_OFFLOAD_SIZE_6_0)
    };
    let tcp_udp = cs::TCP | cs::TCP_OPTIONS | cs::UDP | cs::IP_OPTIONS;
    let o = NdisOffload {
        header: NdisObjectHeader {
            object_type: object_type::OFFLOAD,
            revision,
            size: size as u16,
        },
        csum: NdisCsumOffload {
            ip4_tx_encap: enc::E802_3,
            ip4_tx_csum: tcp_udp,
            ip4_rx_encap: enc::E802_3,
            ip4_rx_csum: tcp_udp | cs::IP4,
            ip6_tx_encap: enc::E802_3,
            ip6_tx_csum: tcp_udp,
            ip6_rx_encap: enc::E802_3,
            ip6_rx_csum: tcp_udp,
        },
        lsov2: NdisLsoV2Offload {
            ip4_encap: enc::E802_3,
            ip4_max_size: MAX_LSO_SIZE,
            ip4_min_segments: 2,
            ip6_encap: enc::E802_3,
            ip6_max_size: MAX_LSO_SIZE,
            ip6_min_segments: 2,
            ip6_opts: cs::IP_OPTIONS | cs::TCP_OPTIONS,
        },
        rsc: if version.0 >= NvspVersion::V61.0 {
            NdisRscOffload { ip4: 1, ip6: 1 }
        } else {
            NdisRscOffload::default()
        },
        ..Default::default()
    };
    o.as_bytes()[..size].to_vec()
}

/// A guest's RNDIS data message, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataPacket {
    /// Where the frame starts, from the message's start.
    pub data_offset: u32,
    /// The frame's length.
    pub data_len: u32,
    /// Its offloads.
    pub tx: TxOffload,
}

/// Why a data message was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketError {
    /// Shorter than its headers, or its length past the data it came in.
    Length,
    /// Not an RNDIS packet message.
    NotPacket,
    /// Its frame lies outside the message, or is shorter than an Ethernet header.
    DataOutside,
    /// Its per-packet info lies outside the message or the part we read.
    PpiOutside,
    /// A per-packet info entry of a bad size or offset.
    BadPpi,
}

/// Parses a data message of `msg_len` bytes whose first bytes are `head` (at least
/// `min(msg_len, DATA_HEAD_BYTES)` of them).
pub fn parse_data(head: &[u8], msg_len: u32) -> Result<DataPacket, PacketError> {
    let fixed = RNDIS_HEADER + size_of::<RndisPacket>();
    let h = read::<RndisMessageHeader>(head).ok_or(PacketError::Length)?;
    if h.message_type != RndisMessageType::PACKET {
        return Err(PacketError::NotPacket);
    }
    if (msg_len as usize) < fixed
        || h.message_length > msg_len
        || (h.message_length as usize) < fixed
    {
        return Err(PacketError::Length);
    }
    let len = u64::from(h.message_length);
    let p = read::<RndisPacket>(&head[RNDIS_HEADER..]).ok_or(PacketError::Length)?;
    let data_start = RNDIS_HEADER as u64 + u64::from(p.data_offset);
    if data_start < fixed as u64
        || data_start + u64::from(p.data_length) > len
        || p.data_length < 14
    {
        return Err(PacketError::DataOutside);
    }
    let (mut csum, mut lso, mut vlan) = (None, None, None);
    if p.per_packet_info_length != 0 {
        let start = RNDIS_HEADER as u64 + u64::from(p.per_packet_info_offset);
        let end = start + u64::from(p.per_packet_info_length);
        if start < fixed as u64 || end > len || end > head.len() as u64 {
            return Err(PacketError::PpiOutside);
        }
        let mut area = &head[start as usize..end as usize];
        while !area.is_empty() {
            let e = read::<PerPacketInfo>(area).ok_or(PacketError::BadPpi)?;
            let size = e.size as usize;
            let off = e.ppi_offset as usize;
            if size < size_of::<PerPacketInfo>()
                || size > area.len()
                || off < size_of::<PerPacketInfo>()
                || off > size
            {
                return Err(PacketError::BadPpi);
            }
            let payload = &area[off..size];
            let value = || read::<u32>(payload).ok_or(PacketError::BadPpi);
            if !e.internal() {
                match e.ppi_type() {
                    PpiType::TCPIP_CHKSUM => csum = Some(NdisTcpIpChecksumInfo(value()?)),
                    PpiType::TCP_LARGESEND => lso = Some(NdisTcpLsoInfo(value()?)),
                    PpiType::IEEE_8021Q => vlan = Some(NdisPkt8021qInfo(value()?)),
                    _ => {}
                }
            }
            area = &area[size..];
        }
    }
    Ok(DataPacket {
        data_offset: data_start as u32,
        data_len: p.data_length,
        tx: TxOffload::from_ppi(csum, lso, vlan),
    })
}

/// The RNDIS header (message, packet, per-packet info) of a `frame_len`-byte frame toward the
/// guest, whose frame starts [`RX_DATA_OFFSET`] bytes into its section; returns the bytes to
/// write at the section's start and the message's length. A fragment of a coalesced (RSC)
/// frame carries its packet-id entry with `fragment`'s flags (`SUBALLOC` added); the offloads
/// are only read from the first fragment, so the others carry none.
pub fn rx_header(
    frame_len: u32,
    rx: &RxOffload,
    fragment: Option<PktInfoFlags>,
) -> ([u8; RX_DATA_OFFSET as usize], u32) {
    let mut ppi = [0u8; 64];
    let mut n = 0;
    let mut add = |t: PpiType, internal: bool, v: u32| {
        let e = PerPacketInfo::new(t, internal, 4);
        ppi[n..n + 12].copy_from_slice(e.as_bytes());
        ppi[n + 12..n + 16].copy_from_slice(&v.to_le_bytes());
        n += 16;
    };
    let first = fragment.is_none_or(|f| f.contains(PktInfoFlags::FIRST_FRAGMENT));
    let rx = if first { *rx } else { RxOffload::default() };
    if let Some(f) = fragment {
        let id = PktInfoId::new(f | PktInfoFlags::SUBALLOC);
        add(
            PpiType(InternalPpiType::PKTINFO_ID.0),
            true,
            u32::from_le_bytes(id.as_bytes().try_into().expect("4 bytes")),
        );
    }
    if let Some(c) = rx.checksum_ppi() {
        add(PpiType::TCPIP_CHKSUM, false, c.0);
    }
    if let Some(v) = rx.vlan {
        add(PpiType::IEEE_8021Q, false, v.to_ppi().0);
    }
    if let Some(h) = rx.hash {
        add(PpiType::NBL_HASH_VALUE, false, h);
    }
    let msg_len = RX_DATA_OFFSET + frame_len;
    let mut out = [0u8; RX_DATA_OFFSET as usize];
    let hdr = RndisMessageHeader {
        message_type: RndisMessageType::PACKET,
        message_length: msg_len,
    };
    let pkt = RndisPacket {
        data_offset: RX_DATA_OFFSET - RNDIS_HEADER as u32,
        data_length: frame_len,
        per_packet_info_offset: if n > 0 {
            size_of::<RndisPacket>() as u32
        } else {
            0
        },
        per_packet_info_length: n as u32,
        ..Default::default()
    };
    out[..8].copy_from_slice(hdr.as_bytes());
    out[8..44].copy_from_slice(pkt.as_bytes());
    const _: () = assert!(44 + 64 <= RX_DATA_OFFSET as usize);
    out[44..44 + n].copy_from_slice(&ppi[..n]);
    (out, msg_len)
}

/// An RNDIS status indication (media connect or disconnect).
pub fn indication(connected: bool) -> Vec<u8> {
    let s = IndicateStatus {
        status: if connected {
            RndisStatus::MEDIA_CONNECT
        } else {
            RndisStatus::MEDIA_DISCONNECT
        },
        status_buffer_length: 0,
        status_buffer_offset: 0,
    };
    message(RndisMessageType::INDICATE_STATUS, &[s.as_bytes()])
}
