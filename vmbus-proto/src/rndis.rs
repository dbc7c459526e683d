//! Remote NDIS as netvsc speaks it: message types and bodies, status codes, OIDs, per-packet
//! information and the NDIS offload and RSS structures.
//!
//! Sources: Linux `include/linux/rndis.h` and `drivers/net/hyperv/hyperv_net.h`. Every RNDIS
//! message is an 8-byte [`RndisMessageHeader`] (type, total length) and a body. Offsets inside
//! bodies (`info_buffer_offset`, `data_offset`, ...) count from the start of the body, i.e. 8
//! bytes after the header's start.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Bit set in the type of a completion message (`RNDIS_MSG_COMPLETION`).
pub const MESSAGE_COMPLETION: u32 = 0x8000_0000;

open_enum! {
    /// RNDIS message types (`REMOTE_NDIS_*_MSG` / `*_CMPLT`).
    pub enum RndisMessageType: u32 {
        /// A data packet ([`RndisPacket`]).
        PACKET = 1,
        /// Initialise ([`InitializeRequest`]).
        INITIALIZE = 2,
        /// Halt ([`HaltRequest`]).
        HALT = 3,
        /// Query an OID ([`QueryRequest`]).
        QUERY = 4,
        /// Set an OID ([`SetRequest`]).
        SET = 5,
        /// Reset ([`ResetRequest`]).
        RESET = 6,
        /// Status indication from the device ([`IndicateStatus`]).
        INDICATE_STATUS = 7,
        /// Keepalive ([`KeepaliveRequest`]).
        KEEPALIVE = 8,
        /// Initialise completion ([`InitializeComplete`]).
        INITIALIZE_COMPLETE = 0x8000_0002,
        /// Query completion ([`QueryComplete`]).
        QUERY_COMPLETE = 0x8000_0004,
        /// Set completion ([`SetComplete`]).
        SET_COMPLETE = 0x8000_0005,
        /// Reset completion ([`ResetComplete`]).
        RESET_COMPLETE = 0x8000_0006,
        /// Keepalive completion ([`KeepaliveComplete`]).
        KEEPALIVE_COMPLETE = 0x8000_0008,
    }
}

open_enum! {
    /// RNDIS/NDIS status codes.
    pub enum RndisStatus: u32 {
        /// Success.
        SUCCESS = 0,
        /// Pending.
        PENDING = 0x0000_0103,
        /// Online.
        ONLINE = 0x4001_0003,
        /// Reset start.
        RESET_START = 0x4001_0004,
        /// Reset end.
        RESET_END = 0x4001_0005,
        /// Media connected.
        MEDIA_CONNECT = 0x4001_000B,
        /// Media disconnected.
        MEDIA_DISCONNECT = 0x4001_000C,
        /// Media-specific indication.
        MEDIA_SPECIFIC_INDICATION = 0x4001_0012,
        /// Link speed changed.
        LINK_SPEED_CHANGE = 0x4001_0013,
        /// Network changed (Linux renews its DHCP lease).
        NETWORK_CHANGE = 0x4001_0018,
        /// Buffer overflow.
        BUFFER_OVERFLOW = 0x8000_0005,
        /// Failure.
        FAILURE = 0xC000_0001,
        /// Resources.
        RESOURCES = 0xC000_009A,
        /// Not supported.
        NOT_SUPPORTED = 0xC000_00BB,
        /// Closing.
        CLOSING = 0xC001_0002,
        /// Bad version.
        BAD_VERSION = 0xC001_0004,
        /// Invalid length.
        INVALID_LENGTH = 0xC001_0014,
        /// Invalid data.
        INVALID_DATA = 0xC001_0015,
        /// Buffer too short.
        BUFFER_TOO_SHORT = 0xC001_0016,
        /// Invalid OID.
        INVALID_OID = 0xC001_0017,
    }
}

open_enum! {
    /// Object identifiers for QUERY and SET.
    pub enum Oid: u32 {
        /// Supported OIDs.
        GEN_SUPPORTED_LIST = 0x0001_0101,
        /// Hardware status.
        GEN_HARDWARE_STATUS = 0x0001_0102,
        /// Media supported.
        GEN_MEDIA_SUPPORTED = 0x0001_0103,
        /// Media in use.
        GEN_MEDIA_IN_USE = 0x0001_0104,
        /// Maximum lookahead.
        GEN_MAXIMUM_LOOKAHEAD = 0x0001_0105,
        /// Maximum frame size without the Ethernet header (the MTU): Linux queries it.
        GEN_MAXIMUM_FRAME_SIZE = 0x0001_0106,
        /// Link speed in 100 bps units: Linux queries it.
        GEN_LINK_SPEED = 0x0001_0107,
        /// Transmit buffer space.
        GEN_TRANSMIT_BUFFER_SPACE = 0x0001_0108,
        /// Receive buffer space.
        GEN_RECEIVE_BUFFER_SPACE = 0x0001_0109,
        /// Transmit block size.
        GEN_TRANSMIT_BLOCK_SIZE = 0x0001_010A,
        /// Receive block size.
        GEN_RECEIVE_BLOCK_SIZE = 0x0001_010B,
        /// Vendor id.
        GEN_VENDOR_ID = 0x0001_010C,
        /// Vendor description.
        GEN_VENDOR_DESCRIPTION = 0x0001_010D,
        /// Packet filter (see [`packet_filter`]): Linux sets it.
        GEN_CURRENT_PACKET_FILTER = 0x0001_010E,
        /// Current lookahead.
        GEN_CURRENT_LOOKAHEAD = 0x0001_010F,
        /// Driver version.
        GEN_DRIVER_VERSION = 0x0001_0110,
        /// Maximum total size.
        GEN_MAXIMUM_TOTAL_SIZE = 0x0001_0111,
        /// Protocol options.
        GEN_PROTOCOL_OPTIONS = 0x0001_0112,
        /// MAC options.
        GEN_MAC_OPTIONS = 0x0001_0113,
        /// Media connect status ([`MEDIA_STATE_CONNECTED`]): Linux queries it.
        GEN_MEDIA_CONNECT_STATUS = 0x0001_0114,
        /// Maximum send packets.
        GEN_MAXIMUM_SEND_PACKETS = 0x0001_0115,
        /// Vendor driver version.
        GEN_VENDOR_DRIVER_VERSION = 0x0001_0116,
        /// Supported GUIDs.
        GEN_SUPPORTED_GUIDS = 0x0001_0117,
        /// Network layer addresses.
        GEN_NETWORK_LAYER_ADDRESSES = 0x0001_0118,
        /// Transport header offset.
        GEN_TRANSPORT_HEADER_OFFSET = 0x0001_0119,
        /// Machine name.
        GEN_MACHINE_NAME = 0x0001_021A,
        /// Configuration parameter (Linux sets "NetworkAddress" to change the MAC).
        GEN_RNDIS_CONFIG_PARAMETER = 0x0001_021B,
        /// VLAN id.
        GEN_VLAN_ID = 0x0001_021C,
        /// Media capabilities.
        GEN_MEDIA_CAPABILITIES = 0x0001_0201,
        /// Physical medium.
        GEN_PHYSICAL_MEDIUM = 0x0001_0202,
        /// RSS capabilities ([`NdisRecvScaleCap`]): Linux queries it.
        GEN_RECEIVE_SCALE_CAPABILITIES = 0x0001_0203,
        /// RSS parameters ([`NdisRecvScaleParam`]): Linux sets it.
        GEN_RECEIVE_SCALE_PARAMETERS = 0x0001_0204,
        /// Link state (NDIS 6; from Windows' ntddndis.h, not used by Linux).
        GEN_LINK_STATE = 0x0001_0207,
        /// Frames sent.
        GEN_XMIT_OK = 0x0002_0101,
        /// Frames received.
        GEN_RCV_OK = 0x0002_0102,
        /// Send errors.
        GEN_XMIT_ERROR = 0x0002_0103,
        /// Receive errors.
        GEN_RCV_ERROR = 0x0002_0104,
        /// Receive drops for lack of buffers.
        GEN_RCV_NO_BUFFER = 0x0002_0105,
        /// Permanent MAC address: Linux queries it.
        E802_3_PERMANENT_ADDRESS = 0x0101_0101,
        /// Current MAC address.
        E802_3_CURRENT_ADDRESS = 0x0101_0102,
        /// Multicast list.
        E802_3_MULTICAST_LIST = 0x0101_0103,
        /// Maximum multicast list size.
        E802_3_MAXIMUM_LIST_SIZE = 0x0101_0104,
        /// 802.3 MAC options.
        E802_3_MAC_OPTIONS = 0x0101_0105,
        /// Encapsulation offload.
        OFFLOAD_ENCAPSULATION = 0x0101_010A,
        /// Current offload configuration (query).
        TCP_OFFLOAD_CURRENT_CONFIG = 0xFC01_020B,
        /// Offload parameters ([`NdisOffloadParams`]): Linux sets it.
        TCP_OFFLOAD_PARAMETERS = 0xFC01_020C,
        /// Offload hardware capabilities ([`NdisOffload`]): Linux queries it.
        TCP_OFFLOAD_HARDWARE_CAPABILITIES = 0xFC01_020D,
        /// Connection offload current configuration.
        TCP_CONNECTION_OFFLOAD_CURRENT_CONFIG = 0xFC01_020E,
        /// Connection offload hardware capabilities.
        TCP_CONNECTION_OFFLOAD_HARDWARE_CAPABILITIES = 0xFC01_020F,
        /// PnP capabilities.
        PNP_CAPABILITIES = 0xFD01_0100,
        /// PnP set power.
        PNP_SET_POWER = 0xFD01_0101,
        /// PnP query power.
        PNP_QUERY_POWER = 0xFD01_0102,
    }
}

/// RNDIS version netvsc sends in [`InitializeRequest`].
pub const RNDIS_MAJOR_VERSION: u32 = 1;
/// RNDIS minor version.
pub const RNDIS_MINOR_VERSION: u32 = 0;
/// Device flag: connectionless (`RNDIS_DF_CONNECTIONLESS`).
pub const DF_CONNECTIONLESS: u32 = 1;
/// Medium 802.3 (`RNDIS_MEDIUM_802_3`).
pub const MEDIUM_802_3: u32 = 0;
/// `GEN_MEDIA_CONNECT_STATUS`: connected.
pub const MEDIA_STATE_CONNECTED: u32 = 0;
/// `GEN_MEDIA_CONNECT_STATUS`: disconnected.
pub const MEDIA_STATE_DISCONNECTED: u32 = 1;
/// Configuration parameter type: integer.
pub const CONFIG_PARAM_TYPE_INTEGER: u32 = 0;
/// Configuration parameter type: string (UTF-16).
pub const CONFIG_PARAM_TYPE_STRING: u32 = 2;

/// Packet filter bits (`NDIS_PACKET_TYPE_*` as hyperv_net.h defines them).
pub mod packet_filter {
    /// Directed.
    pub const DIRECTED: u32 = 0x0000_0001;
    /// Multicast.
    pub const MULTICAST: u32 = 0x0000_0002;
    /// All multicast.
    pub const ALL_MULTICAST: u32 = 0x0000_0004;
    /// Broadcast.
    pub const BROADCAST: u32 = 0x0000_0008;
    /// Source routing.
    pub const SOURCE_ROUTING: u32 = 0x0000_0010;
    /// Promiscuous.
    pub const PROMISCUOUS: u32 = 0x0000_0020;
    /// SMT.
    pub const SMT: u32 = 0x0000_0040;
    /// All local.
    pub const ALL_LOCAL: u32 = 0x0000_0080;
    /// Group.
    pub const GROUP: u32 = 0x0000_0100;
    /// All functional.
    pub const ALL_FUNCTIONAL: u32 = 0x0000_0200;
    /// Functional.
    pub const FUNCTIONAL: u32 = 0x0000_0400;
    /// MAC frame.
    pub const MAC_FRAME: u32 = 0x0000_0800;
}

bitflags::bitflags! {
    /// The RNDIS packet filter (`OID_GEN_CURRENT_PACKET_FILTER`) as a flag set; the values are
    /// [`packet_filter`]'s. Unknown bits are kept.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct PacketFilter: u32 {
        /// Frames to the adapter's address.
        const DIRECTED = packet_filter::DIRECTED;
        /// Frames to the multicast list.
        const MULTICAST = packet_filter::MULTICAST;
        /// Every multicast frame.
        const ALL_MULTICAST = packet_filter::ALL_MULTICAST;
        /// Broadcast frames.
        const BROADCAST = packet_filter::BROADCAST;
        /// Every frame.
        const PROMISCUOUS = packet_filter::PROMISCUOUS;
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// The `flags` of [`NdisRecvScaleParam`] as a flag set; the values are
    /// [`rss_param_flag`]'s. Unknown bits are kept.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct RssParamFlags: u16 {
        /// The base CPU is unchanged.
        const BASE_CPU_UNCHANGED = rss_param_flag::BASE_CPU_UNCHANGED;
        /// The hash information is unchanged.
        const HASH_INFO_UNCHANGED = rss_param_flag::HASH_INFO_UNCHANGED;
        /// The indirection table is unchanged.
        const ITABLE_UNCHANGED = rss_param_flag::ITABLE_UNCHANGED;
        /// The hash key is unchanged.
        const HASH_KEY_UNCHANGED = rss_param_flag::HASH_KEY_UNCHANGED;
        /// RSS is off.
        const DISABLE_RSS = rss_param_flag::DISABLE_RSS;
        const _ = !0;
    }
}

/// `struct rndis_message` less its union: the header of every RNDIS message.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct RndisMessageHeader {
    /// The message type.
    pub message_type: RndisMessageType,
    /// Total length of the message in bytes, this header included.
    pub message_length: u32,
}
const _: () = assert!(size_of::<RndisMessageHeader>() == 8);

macro_rules! rndis_struct {
    (
        $(#[$m:meta])*
        pub struct $name:ident { $( $(#[$fm:meta])* pub $f:ident : $t:ty, )* } = $size:expr;
    ) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
        #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
        pub struct $name { $( $(#[$fm])* pub $f: $t, )* }
        const _: () = assert!(size_of::<$name>() == $size);
    };
}

rndis_struct! {
    /// `struct rndis_initialize_request`.
    pub struct InitializeRequest {
        /// Request id echoed in the completion.
        pub request_id: u32,
        /// RNDIS major version.
        pub major_version: u32,
        /// RNDIS minor version.
        pub minor_version: u32,
        /// Largest message the guest accepts.
        pub max_transfer_size: u32,
    } = 16;
}

rndis_struct! {
    /// `struct rndis_initialize_complete`.
    pub struct InitializeComplete {
        /// The request's id.
        pub request_id: u32,
        /// Status.
        pub status: RndisStatus,
        /// RNDIS major version.
        pub major_version: u32,
        /// RNDIS minor version.
        pub minor_version: u32,
        /// Device flags, [`DF_CONNECTIONLESS`].
        pub device_flags: u32,
        /// Medium, [`MEDIUM_802_3`].
        pub medium: u32,
        /// Packets per PACKET message the device accepts.
        pub max_packets_per_message: u32,
        /// Largest message the device accepts.
        pub max_transfer_size: u32,
        /// Packet alignment as a power of two.
        pub packet_alignment_factor: u32,
        /// Address family list offset (connection-oriented only).
        pub af_list_offset: u32,
        /// Address family list size.
        pub af_list_size: u32,
    } = 44;
}

rndis_struct! {
    /// `struct rndis_halt_request`.
    pub struct HaltRequest {
        /// Request id.
        pub request_id: u32,
    } = 4;
}

rndis_struct! {
    /// `struct rndis_query_request`; the input buffer follows at `info_buffer_offset`.
    pub struct QueryRequest {
        /// Request id.
        pub request_id: u32,
        /// The OID.
        pub oid: Oid,
        /// Input buffer length.
        pub info_buffer_length: u32,
        /// Input buffer offset from the start of this body.
        pub info_buffer_offset: u32,
        /// Device VC handle (0).
        pub device_vc_handle: u32,
    } = 20;
}

rndis_struct! {
    /// `struct rndis_query_complete`; the answer follows at `info_buffer_offset`.
    pub struct QueryComplete {
        /// The request's id.
        pub request_id: u32,
        /// Status.
        pub status: RndisStatus,
        /// Answer length.
        pub info_buffer_length: u32,
        /// Answer offset from the start of this body.
        pub info_buffer_offset: u32,
    } = 16;
}

rndis_struct! {
    /// `struct rndis_set_request`; the value follows at `info_buffer_offset`.
    pub struct SetRequest {
        /// Request id.
        pub request_id: u32,
        /// The OID.
        pub oid: Oid,
        /// Value length.
        pub info_buffer_length: u32,
        /// Value offset from the start of this body.
        pub info_buffer_offset: u32,
        /// Device VC handle (0).
        pub device_vc_handle: u32,
    } = 20;
}

rndis_struct! {
    /// `struct rndis_set_complete`.
    pub struct SetComplete {
        /// The request's id.
        pub request_id: u32,
        /// Status.
        pub status: RndisStatus,
    } = 8;
}

rndis_struct! {
    /// `struct rndis_reset_request`.
    pub struct ResetRequest {
        /// Reserved.
        pub reserved: u32,
    } = 4;
}

rndis_struct! {
    /// `struct rndis_reset_complete`.
    pub struct ResetComplete {
        /// Status.
        pub status: RndisStatus,
        /// Non-zero if the multicast list and packet filter were reset.
        pub addressing_reset: u32,
    } = 8;
}

rndis_struct! {
    /// `struct rndis_indicate_status`; the status buffer follows at `status_buffer_offset`.
    pub struct IndicateStatus {
        /// The status being indicated (e.g. [`RndisStatus::MEDIA_CONNECT`]).
        pub status: RndisStatus,
        /// Status buffer length.
        pub status_buffer_length: u32,
        /// Status buffer offset from the start of this body.
        pub status_buffer_offset: u32,
    } = 12;
}

rndis_struct! {
    /// `struct rndis_diagnostic_info`: the status buffer of an error indication.
    pub struct DiagnosticInfo {
        /// Diagnostic status.
        pub diagnostic_status: RndisStatus,
        /// Offset of the offending byte.
        pub error_offset: u32,
    } = 8;
}

rndis_struct! {
    /// `struct rndis_keepalive_request`.
    pub struct KeepaliveRequest {
        /// Request id.
        pub request_id: u32,
    } = 4;
}

rndis_struct! {
    /// `struct rndis_keepalive_complete`.
    pub struct KeepaliveComplete {
        /// The request's id.
        pub request_id: u32,
        /// Status.
        pub status: RndisStatus,
    } = 8;
}

rndis_struct! {
    /// `struct rndis_packet`: a data packet. Offsets count from the start of this body.
    pub struct RndisPacket {
        /// Offset of the frame.
        pub data_offset: u32,
        /// Length of the frame.
        pub data_length: u32,
        /// Offset of out-of-band data (unused).
        pub oob_data_offset: u32,
        /// Length of out-of-band data.
        pub oob_data_length: u32,
        /// Number of out-of-band elements.
        pub num_oob_data_elements: u32,
        /// Offset of the per-packet info ([`PerPacketInfo`] entries).
        pub per_packet_info_offset: u32,
        /// Length of the per-packet info.
        pub per_packet_info_length: u32,
        /// VC handle (0).
        pub vc_handle: u32,
        /// Reserved.
        pub reserved: u32,
    } = 36;
}

rndis_struct! {
    /// `struct rndis_config_parameter_info`: the value of a
    /// [`Oid::GEN_RNDIS_CONFIG_PARAMETER`] set; name and value (UTF-16) follow.
    pub struct ConfigParameterInfo {
        /// Offset of the name from the start of this struct.
        pub parameter_name_offset: u32,
        /// Length of the name in bytes.
        pub parameter_name_length: u32,
        /// [`CONFIG_PARAM_TYPE_STRING`] or [`CONFIG_PARAM_TYPE_INTEGER`].
        pub parameter_type: u32,
        /// Offset of the value.
        pub parameter_value_offset: u32,
        /// Length of the value in bytes.
        pub parameter_value_length: u32,
    } = 20;
}

open_enum! {
    /// `enum ndis_per_pkt_info_type`: the type of a per-packet info entry (31 bits).
    pub enum PpiType: u32 {
        /// Checksum ([`NdisTcpIpChecksumInfo`]).
        TCPIP_CHKSUM = 0,
        /// IPsec.
        IPSEC = 1,
        /// Large send ([`NdisTcpLsoInfo`]).
        TCP_LARGESEND = 2,
        /// Classification handle.
        CLASSIFICATION_HANDLE = 3,
        /// Reserved.
        NDIS_RESERVED = 4,
        /// Scatter-gather list.
        SG_LIST = 5,
        /// 802.1Q tag ([`NdisPkt8021qInfo`]).
        IEEE_8021Q = 6,
        /// Original packet info.
        ORIGINAL = 7,
        /// Packet cancel id; also the RSS hash value (`NBL_HASH_VALUE`, a u32).
        PACKET_CANCEL_ID = 8,
        /// Original net buffer list.
        ORIGINAL_NET_BUFLIST = 9,
        /// Cached net buffer list.
        CACHED_NET_BUFLIST = 10,
        /// Short packet padding info.
        SHORT_PKT_PADINFO = 11,
    }
}

impl PpiType {
    /// The RSS hash value (`NBL_HASH_VALUE`), same number as [`PpiType::PACKET_CANCEL_ID`].
    pub const NBL_HASH_VALUE: PpiType = PpiType(8);
}

open_enum! {
    /// `enum rndis_per_pkt_info_interal_type`: types of internal per-packet info.
    pub enum InternalPpiType: u32 {
        /// Packet id ([`PktInfoId`]).
        PKTINFO_ID = 1,
    }
}

/// `struct rndis_per_packet_info`: one per-packet info entry; its payload follows at
/// `ppi_offset` from the entry's start.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct PerPacketInfo {
    /// Size of the entry including its payload.
    pub size: u32,
    /// Bits 0-30: the type; bit 31: internal (type is an [`InternalPpiType`]).
    pub type_internal: u32,
    /// Offset of the payload from the start of the entry (12).
    pub ppi_offset: u32,
}
const _: () = assert!(size_of::<PerPacketInfo>() == 12);

impl PerPacketInfo {
    /// An entry header for a payload of `payload_len` bytes placed right after it.
    pub const fn new(ppi_type: PpiType, internal: bool, payload_len: u32) -> Self {
        Self {
            size: size_of::<Self>() as u32 + payload_len,
            type_internal: (ppi_type.0 & 0x7fff_ffff) | (internal as u32) << 31,
            ppi_offset: size_of::<Self>() as u32,
        }
    }

    /// The type (bits 0-30).
    pub const fn ppi_type(&self) -> PpiType {
        PpiType(self.type_internal & 0x7fff_ffff)
    }

    /// The internal bit (bit 31).
    pub const fn internal(&self) -> bool {
        self.type_internal & 0x8000_0000 != 0
    }
}

/// Flags of [`PktInfoId`].
pub mod pktinfo_flags {
    /// Suballocated.
    pub const SUBALLOC: u8 = 1;
    /// First fragment.
    pub const FIRST_FRAGMENT: u8 = 2;
    /// Last fragment.
    pub const LAST_FRAGMENT: u8 = 4;
}

bitflags::bitflags! {
    /// The `flag` of [`PktInfoId`] as a flag set; the values are [`pktinfo_flags`]'s. A
    /// receive-segment-coalesced (RSC) frame comes as several RNDIS packets of one transfer-page
    /// packet, each with `SUBALLOC`: the first also with `FIRST_FRAGMENT`, the last with
    /// `LAST_FRAGMENT`. Unknown bits are kept.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct PktInfoFlags: u8 {
        /// `RNDIS_PKTINFO_SUBALLOC`: a fragment of a coalesced frame.
        const SUBALLOC = pktinfo_flags::SUBALLOC;
        /// `RNDIS_PKTINFO_1ST_FRAG`.
        const FIRST_FRAGMENT = pktinfo_flags::FIRST_FRAGMENT;
        /// `RNDIS_PKTINFO_LAST_FRAG`.
        const LAST_FRAGMENT = pktinfo_flags::LAST_FRAGMENT;
        const _ = !0;
    }
}

/// Version of [`PktInfoId`] (`RNDIS_PKTINFO_ID_V1`).
pub const PKTINFO_ID_V1: u8 = 1;

rndis_struct! {
    /// `struct rndis_pktinfo_id`: payload of an internal [`InternalPpiType::PKTINFO_ID`].
    pub struct PktInfoId {
        /// Version, [`PKTINFO_ID_V1`].
        pub version: u8,
        /// Flags, see [`pktinfo_flags`].
        pub flag: u8,
        /// Packet id.
        pub packet_id: u16,
    } = 4;
}

impl PktInfoId {
    /// A version-1 entry with `flags` and packet id 0.
    pub const fn new(flags: PktInfoFlags) -> Self {
        Self {
            version: PKTINFO_ID_V1,
            flag: flags.bits(),
            packet_id: 0,
        }
    }

    /// The flags.
    pub const fn flags(&self) -> PktInfoFlags {
        PktInfoFlags::from_bits_retain(self.flag)
    }
}

macro_rules! bit_accessors {
    ($ty:ident { $($(#[$m:meta])* $get:ident = $shift:literal : $width:literal;)* }) => {
        impl $ty {
            $(
                $(#[$m])*
                pub const fn $get(self) -> u32 {
                    (self.0 >> $shift) & ((1u32 << $width) - 1)
                }
            )*
        }
    };
}

/// `struct ndis_tcp_ip_checksum_info`: payload of [`PpiType::TCPIP_CHKSUM`], a u32 whose bits
/// mean different things on transmit and receive.
#[repr(transparent)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct NdisTcpIpChecksumInfo(pub u32);
const _: () = assert!(size_of::<NdisTcpIpChecksumInfo>() == 4);

bit_accessors!(NdisTcpIpChecksumInfo {
    /// Transmit: IPv4 packet.
    tx_is_ipv4 = 0:1;
    /// Transmit: IPv6 packet.
    tx_is_ipv6 = 1:1;
    /// Transmit: compute the TCP checksum.
    tx_tcp_checksum = 2:1;
    /// Transmit: compute the UDP checksum.
    tx_udp_checksum = 3:1;
    /// Transmit: compute the IP header checksum.
    tx_ip_header_checksum = 4:1;
    /// Transmit: offset of the TCP header.
    tx_tcp_header_offset = 16:10;
    /// Receive: TCP checksum failed.
    rx_tcp_checksum_failed = 0:1;
    /// Receive: UDP checksum failed.
    rx_udp_checksum_failed = 1:1;
    /// Receive: IP checksum failed.
    rx_ip_checksum_failed = 2:1;
    /// Receive: TCP checksum succeeded.
    rx_tcp_checksum_succeeded = 3:1;
    /// Receive: UDP checksum succeeded.
    rx_udp_checksum_succeeded = 4:1;
    /// Receive: IP checksum succeeded.
    rx_ip_checksum_succeeded = 5:1;
    /// Receive: loopback.
    rx_loopback = 6:1;
});

/// `struct ndis_tcp_lso_info`: payload of [`PpiType::TCP_LARGESEND`].
#[repr(transparent)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct NdisTcpLsoInfo(pub u32);
const _: () = assert!(size_of::<NdisTcpLsoInfo>() == 4);

bit_accessors!(NdisTcpLsoInfo {
    /// Transmit: maximum segment size.
    mss = 0:20;
    /// Transmit: offset of the TCP header.
    tcp_header_offset = 20:10;
    /// Transmit: LSO type (1 = LSO v2).
    lso_type = 30:1;
    /// LSO v2 transmit: IP version (0 = IPv4, 1 = IPv6).
    ip_version = 31:1;
    /// Transmit completion: TCP payload bytes sent.
    tcp_payload = 0:30;
});

/// `struct ndis_pkt_8021q_info`: payload of [`PpiType::IEEE_8021Q`].
#[repr(transparent)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct NdisPkt8021qInfo(pub u32);
const _: () = assert!(size_of::<NdisPkt8021qInfo>() == 4);

bit_accessors!(NdisPkt8021qInfo {
    /// User priority.
    priority = 0:3;
    /// Canonical format indicator.
    cfi = 3:1;
    /// VLAN id.
    vlan_id = 4:12;
});

impl NdisPkt8021qInfo {
    /// Builds the value from priority, CFI and VLAN id (each truncated to its width).
    pub const fn new(priority: u8, cfi: bool, vlan_id: u16) -> Self {
        Self((priority as u32 & 7) | (cfi as u32) << 3 | (vlan_id as u32 & 0xfff) << 4)
    }
}

/// NDIS object types of [`NdisObjectHeader`].
pub mod object_type {
    /// Default (offload parameters).
    pub const DEFAULT: u8 = 0x80;
    /// RSS capabilities.
    pub const RSS_CAPABILITIES: u8 = 0x88;
    /// RSS parameters.
    pub const RSS_PARAMETERS: u8 = 0x89;
    /// Offload capabilities.
    pub const OFFLOAD: u8 = 0xA7;
}

/// Revision of [`NdisRecvScaleCap`] and [`NdisRecvScaleParam`] Linux uses.
pub const RSS_REVISION_2: u8 = 2;
/// Offload parameters revision 1 (NDIS 6.0).
pub const OFFLOAD_PARAMETERS_REVISION_1: u8 = 1;
/// Offload parameters revision 2 (NDIS 6.1).
pub const OFFLOAD_PARAMETERS_REVISION_2: u8 = 2;
/// Offload parameters revision 3 (NDIS 6.30).
pub const OFFLOAD_PARAMETERS_REVISION_3: u8 = 3;
/// Size of [`NdisOffload`] for NDIS 6.0 (up to `ipsecv2`).
pub const NDIS_OFFLOAD_SIZE_6_0: usize = 112;
/// Size of [`NdisOffload`] for NDIS 6.1 (up to `rsc`).
pub const NDIS_OFFLOAD_SIZE_6_1: usize = 144;
/// Size of an [`NdisOffloadParams`] for NVSP version 4 (`VERSION_4_OFFLOAD_SIZE`).
pub const VERSION_4_OFFLOAD_SIZE: usize = 22;

/// Values of the [`NdisOffloadParams`] byte fields.
pub mod offload_param {
    /// No change.
    pub const NO_CHANGE: u8 = 0;
    /// LSO v2 disabled.
    pub const LSOV2_DISABLED: u8 = 1;
    /// LSO v2 enabled.
    pub const LSOV2_ENABLED: u8 = 2;
    /// LSO v1 enabled.
    pub const LSOV1_ENABLED: u8 = 2;
    /// RSC disabled.
    pub const RSC_DISABLED: u8 = 1;
    /// RSC enabled.
    pub const RSC_ENABLED: u8 = 2;
    /// Checksum offload off in both directions.
    pub const TX_RX_DISABLED: u8 = 1;
    /// Checksum offload on transmit only.
    pub const TX_ENABLED_RX_DISABLED: u8 = 2;
    /// Checksum offload on receive only.
    pub const RX_ENABLED_TX_DISABLED: u8 = 3;
    /// Checksum offload on in both directions.
    pub const TX_RX_ENABLED: u8 = 4;
}

/// Encapsulation bits of offload capabilities (`NDIS_OFFLOAD_ENCAP_*`).
pub mod offload_encap {
    /// None.
    pub const NONE: u32 = 0;
    /// Null.
    pub const NULL: u32 = 1;
    /// 802.3.
    pub const E802_3: u32 = 2;
    /// 802.3 with priority/VLAN tag.
    pub const E802_3_PQ: u32 = 4;
    /// 802.3 with priority/VLAN tag out of band.
    pub const E802_3_PQ_OOB: u32 = 8;
    /// RFC 1483.
    pub const RFC1483: u32 = 0x10;
}

/// Checksum capability bits of [`NdisCsumOffload`] (the same values for IPv4 and IPv6 fields).
pub mod csum_cap {
    /// IPv4 options / IPv6 extension headers.
    pub const IP_OPTIONS: u32 = 0x001;
    /// TCP options.
    pub const TCP_OPTIONS: u32 = 0x004;
    /// TCP.
    pub const TCP: u32 = 0x010;
    /// UDP.
    pub const UDP: u32 = 0x040;
    /// IPv4 header checksum.
    pub const IP4: u32 = 0x100;
}

/// RSS hash bits of [`NdisRecvScaleParam::hash_info`] (`NDIS_HASH_*`).
pub mod rss_hash {
    /// Toeplitz hash function.
    pub const FUNC_TOEPLITZ: u32 = 0x0000_0001;
    /// IPv4.
    pub const IPV4: u32 = 0x0000_0100;
    /// TCP over IPv4.
    pub const TCP_IPV4: u32 = 0x0000_0200;
    /// IPv6.
    pub const IPV6: u32 = 0x0000_0400;
    /// IPv6 with extension headers.
    pub const IPV6_EX: u32 = 0x0000_0800;
    /// TCP over IPv6.
    pub const TCP_IPV6: u32 = 0x0000_1000;
    /// TCP over IPv6 with extension headers.
    pub const TCP_IPV6_EX: u32 = 0x0000_2000;
}

/// RSS parameter flags (`NDIS_RSS_PARAM_FLAG_*`).
pub mod rss_param_flag {
    /// Base CPU unchanged.
    pub const BASE_CPU_UNCHANGED: u16 = 0x0001;
    /// Hash info unchanged.
    pub const HASH_INFO_UNCHANGED: u16 = 0x0002;
    /// Indirection table unchanged.
    pub const ITABLE_UNCHANGED: u16 = 0x0004;
    /// Hash key unchanged.
    pub const HASH_KEY_UNCHANGED: u16 = 0x0008;
    /// Disable RSS.
    pub const DISABLE_RSS: u16 = 0x0010;
}

/// RSS capability flags (`NDIS_RSS_CAPS_*`).
pub mod rss_caps {
    /// Message-signalled interrupts.
    pub const MESSAGE_SIGNALED_INTERRUPTS: u32 = 0x0100_0000;
    /// Classification at ISR.
    pub const CLASSIFICATION_AT_ISR: u32 = 0x0200_0000;
    /// Classification at DPC.
    pub const CLASSIFICATION_AT_DPC: u32 = 0x0400_0000;
    /// Using MSI-X.
    pub const USING_MSI_X: u32 = 0x0800_0000;
    /// RSS available on ports.
    pub const RSS_AVAILABLE_ON_PORTS: u32 = 0x1000_0000;
    /// Supports MSI-X.
    pub const SUPPORTS_MSI_X: u32 = 0x2000_0000;
    /// Hash type TCP IPv4.
    pub const HASH_TYPE_TCP_IPV4: u32 = 0x0000_0100;
    /// Hash type TCP IPv6.
    pub const HASH_TYPE_TCP_IPV6: u32 = 0x0000_0200;
    /// Hash type TCP IPv6 extended.
    pub const HASH_TYPE_TCP_IPV6_EX: u32 = 0x0000_0400;
}

/// Largest RSS indirection table Linux sends, in entries (`ITAB_NUM`).
pub const RSS_INDIRECTION_TABLE_ENTRIES: usize = 128;
/// RSS hash key size (`NETVSC_HASH_KEYLEN`).
pub const RSS_HASH_KEY_SIZE: usize = 40;

/// `struct ndis_object_header` (also `struct ndis_obj_header`): the header of NDIS objects.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct NdisObjectHeader {
    /// Object type, see [`object_type`].
    pub object_type: u8,
    /// Revision.
    pub revision: u8,
    /// Size of the object in bytes.
    pub size: u16,
}
const _: () = assert!(size_of::<NdisObjectHeader>() == 4);

rndis_struct! {
    /// `struct ndis_csum_offload`: checksum offload capabilities.
    pub struct NdisCsumOffload {
        /// IPv4 transmit encapsulation.
        pub ip4_tx_encap: u32,
        /// IPv4 transmit checksum capabilities.
        pub ip4_tx_csum: u32,
        /// IPv4 receive encapsulation.
        pub ip4_rx_encap: u32,
        /// IPv4 receive checksum capabilities.
        pub ip4_rx_csum: u32,
        /// IPv6 transmit encapsulation.
        pub ip6_tx_encap: u32,
        /// IPv6 transmit checksum capabilities.
        pub ip6_tx_csum: u32,
        /// IPv6 receive encapsulation.
        pub ip6_rx_encap: u32,
        /// IPv6 receive checksum capabilities.
        pub ip6_rx_csum: u32,
    } = 32;
}

rndis_struct! {
    /// `struct ndis_lsov1_offload`.
    pub struct NdisLsoV1Offload {
        /// Encapsulation.
        pub encap: u32,
        /// Maximum offload size.
        pub max_size: u32,
        /// Minimum segment count.
        pub min_segments: u32,
        /// Options.
        pub opts: u32,
    } = 16;
}

rndis_struct! {
    /// `struct ndis_ipsecv1_offload`.
    pub struct NdisIpsecV1Offload {
        /// Encapsulation.
        pub encap: u32,
        /// AH and ESP.
        pub ah_esp: u32,
        /// Transport and tunnel.
        pub xport_tun: u32,
        /// IPv4 options.
        pub ip4_opts: u32,
        /// Flags.
        pub flags: u32,
        /// IPv4 AH.
        pub ip4_ah: u32,
        /// IPv4 ESP.
        pub ip4_esp: u32,
    } = 28;
}

rndis_struct! {
    /// `struct ndis_lsov2_offload`.
    pub struct NdisLsoV2Offload {
        /// IPv4 encapsulation.
        pub ip4_encap: u32,
        /// IPv4 maximum offload size.
        pub ip4_max_size: u32,
        /// IPv4 minimum segment count.
        pub ip4_min_segments: u32,
        /// IPv6 encapsulation.
        pub ip6_encap: u32,
        /// IPv6 maximum offload size.
        pub ip6_max_size: u32,
        /// IPv6 minimum segment count.
        pub ip6_min_segments: u32,
        /// IPv6 options.
        pub ip6_opts: u32,
    } = 28;
}

rndis_struct! {
    /// `struct ndis_ipsecv2_offload`.
    pub struct NdisIpsecV2Offload {
        /// Encapsulation.
        pub encap: u32,
        /// IPv6.
        pub ip6: u8,
        /// IPv4 options.
        pub ip4_opt: u8,
        /// IPv6 extension headers.
        pub ip6_ext: u8,
        /// AH.
        pub ah: u8,
        /// ESP.
        pub esp: u8,
        /// AH and ESP.
        pub ah_esp: u8,
        /// Transport.
        pub xport: u8,
        /// Tunnel.
        pub tun: u8,
        /// Transport and tunnel.
        pub xport_tun: u8,
        /// LSO.
        pub lso: u8,
        /// Extended sequence numbers.
        pub ext_seq: u8,
        /// Padding (implicit in C).
        pub padding: u8,
        /// UDP ESP.
        pub udp_esp: u32,
        /// Authentication algorithms.
        pub auth: u32,
        /// Crypto algorithms.
        pub crypto: u32,
        /// SA capabilities.
        pub sa_caps: u32,
    } = 32;
}

rndis_struct! {
    /// `struct ndis_rsc_offload`: receive segment coalescing.
    pub struct NdisRscOffload {
        /// IPv4.
        pub ip4: u8,
        /// IPv6.
        pub ip6: u8,
    } = 2;
}

rndis_struct! {
    /// `struct ndis_encap_offload`.
    pub struct NdisEncapOffload {
        /// Flags.
        pub flags: u32,
        /// Maximum header size.
        pub max_header: u32,
    } = 8;
}

rndis_struct! {
    /// `struct ndis_offload`: the answer to [`Oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES`].
    pub struct NdisOffload {
        /// Header, type [`object_type::OFFLOAD`].
        pub header: NdisObjectHeader,
        /// Checksum offload.
        pub csum: NdisCsumOffload,
        /// LSO v1.
        pub lsov1: NdisLsoV1Offload,
        /// IPsec v1.
        pub ipsecv1: NdisIpsecV1Offload,
        /// LSO v2.
        pub lsov2: NdisLsoV2Offload,
        /// Flags.
        pub flags: u32,
        /// IPsec v2 (NDIS 6.1 and later).
        pub ipsecv2: NdisIpsecV2Offload,
        /// RSC (NDIS 6.30 and later).
        pub rsc: NdisRscOffload,
        /// Padding (implicit in C).
        pub padding: [u8; 2],
        /// GRE encapsulation.
        pub encap_gre: NdisEncapOffload,
    } = 156;
}

rndis_struct! {
    /// `struct ndis_offload_params`: the value of a [`Oid::TCP_OFFLOAD_PARAMETERS`] set. Byte
    /// fields take [`offload_param`] values.
    pub struct NdisOffloadParams {
        /// Header, type [`object_type::DEFAULT`].
        pub header: NdisObjectHeader,
        /// IPv4 header checksum.
        pub ip_v4_csum: u8,
        /// TCP over IPv4 checksum.
        pub tcp_ip_v4_csum: u8,
        /// UDP over IPv4 checksum.
        pub udp_ip_v4_csum: u8,
        /// TCP over IPv6 checksum.
        pub tcp_ip_v6_csum: u8,
        /// UDP over IPv6 checksum.
        pub udp_ip_v6_csum: u8,
        /// LSO v1.
        pub lso_v1: u8,
        /// IPsec v1.
        pub ip_sec_v1: u8,
        /// LSO v2 over IPv4.
        pub lso_v2_ipv4: u8,
        /// LSO v2 over IPv6.
        pub lso_v2_ipv6: u8,
        /// TCP connection offload over IPv4.
        pub tcp_connection_ip_v4: u8,
        /// TCP connection offload over IPv6.
        pub tcp_connection_ip_v6: u8,
        /// Padding (implicit in C).
        pub padding: u8,
        /// Flags.
        pub flags: u32,
        /// IPsec v2.
        pub ip_sec_v2: u8,
        /// IPsec v2 over IPv4.
        pub ip_sec_v2_ip_v4: u8,
        /// RSC over IPv4.
        pub rsc_ip_v4: u8,
        /// RSC over IPv6.
        pub rsc_ip_v6: u8,
        /// Encapsulated packet task offload.
        pub encapsulated_packet_task_offload: u8,
        /// Encapsulation types.
        pub encapsulation_types: u8,
        /// Padding (implicit in C).
        pub padding2: [u8; 2],
    } = 28;
}

/// `struct ndis_recv_scale_cap`: the answer to [`Oid::GEN_RECEIVE_SCALE_CAPABILITIES`].
#[repr(C, packed)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct NdisRecvScaleCap {
    /// Header, type [`object_type::RSS_CAPABILITIES`].
    pub header: NdisObjectHeader,
    /// Capability flags, see [`rss_caps`].
    pub capabilities: u32,
    /// Number of interrupt messages.
    pub num_interrupt_messages: u32,
    /// Number of receive queues (Linux caps its channel count with it).
    pub num_recv_queues: u32,
    /// Indirection table entries.
    pub num_indirect_table_entries: u16,
}
const _: () = assert!(size_of::<NdisRecvScaleCap>() == 18);

rndis_struct! {
    /// `struct ndis_recv_scale_param`: the value of a [`Oid::GEN_RECEIVE_SCALE_PARAMETERS`]
    /// set; the indirection table and key follow at their offsets from this struct's start.
    pub struct NdisRecvScaleParam {
        /// Header, type [`object_type::RSS_PARAMETERS`].
        pub header: NdisObjectHeader,
        /// Flags, see [`rss_param_flag`].
        pub flags: u16,
        /// Base CPU number.
        pub base_cpu_number: u16,
        /// Hash function and types, see [`rss_hash`].
        pub hash_info: u32,
        /// Indirection table size in bytes.
        pub indirection_table_size: u16,
        /// Padding (implicit in C).
        pub padding1: u16,
        /// Indirection table offset.
        pub indirection_table_offset: u32,
        /// Hash key size in bytes.
        pub hash_key_size: u16,
        /// Padding (implicit in C).
        pub padding2: u16,
        /// Hash key offset.
        pub hash_key_offset: u32,
        /// Processor masks offset.
        pub processor_masks_offset: u32,
        /// Number of processor masks.
        pub num_processor_masks: u32,
        /// Size of one processor mask entry.
        pub processor_masks_entry_size: u32,
    } = 40;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_message_bytes() {
        let h = RndisMessageHeader {
            message_type: RndisMessageType::QUERY,
            message_length: 28,
        };
        let q = QueryRequest {
            request_id: 7,
            oid: Oid::E802_3_PERMANENT_ADDRESS,
            info_buffer_length: 0,
            info_buffer_offset: 20,
            device_vc_handle: 0,
        };
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(q.as_bytes());
        assert_eq!(bytes[0..8], [4, 0, 0, 0, 28, 0, 0, 0]);
        assert_eq!(bytes[12..16], [1, 1, 1, 1]);
        let (h2, rest) = RndisMessageHeader::read_from_prefix(&bytes).unwrap();
        assert_eq!(h2, h);
        assert_eq!(QueryRequest::read_from_bytes(rest).unwrap(), q);
        assert_eq!(
            RndisMessageType(RndisMessageType::QUERY.0 | MESSAGE_COMPLETION),
            RndisMessageType::QUERY_COMPLETE
        );
    }

    #[test]
    fn per_packet_info() {
        let p = PerPacketInfo::new(PpiType::IEEE_8021Q, false, 4);
        assert_eq!(p.as_bytes(), &[16, 0, 0, 0, 6, 0, 0, 0, 12, 0, 0, 0]);
        let i = PerPacketInfo::new(PpiType(InternalPpiType::PKTINFO_ID.0), true, 4);
        assert!(i.internal());
        assert_eq!(i.ppi_type(), PpiType(1));
        assert_eq!(i.as_bytes()[4..8], [1, 0, 0, 0x80]);
        let id = PktInfoId::new(PktInfoFlags::SUBALLOC | PktInfoFlags::LAST_FRAGMENT);
        assert_eq!(id.as_bytes(), &[1, 5, 0, 0]);
        assert_eq!(
            PktInfoId::read_from_bytes(&[1, 3, 0, 0]).unwrap().flags(),
            PktInfoFlags::SUBALLOC | PktInfoFlags::FIRST_FRAGMENT
        );
        let v = NdisPkt8021qInfo::new(5, false, 100);
        assert_eq!((v.priority(), v.cfi(), v.vlan_id()), (5, 0, 100));
        let c = NdisTcpIpChecksumInfo(1 | 1 << 2 | 34 << 16);
        assert_eq!(
            (
                c.tx_is_ipv4(),
                c.tx_tcp_checksum(),
                c.tx_tcp_header_offset()
            ),
            (1, 1, 34)
        );
        let l = NdisTcpLsoInfo(1460 | 34 << 20 | 1 << 30);
        assert_eq!(
            (l.mss(), l.tcp_header_offset(), l.lso_type(), l.ip_version()),
            (1460, 34, 1, 0)
        );
    }

    #[test]
    fn offload_sizes() {
        assert_eq!(
            core::mem::offset_of!(NdisOffload, ipsecv2),
            NDIS_OFFLOAD_SIZE_6_0
        );
        assert_eq!(
            core::mem::offset_of!(NdisOffload, rsc),
            NDIS_OFFLOAD_SIZE_6_1
        );
        assert_eq!(
            core::mem::offset_of!(NdisOffloadParams, rsc_ip_v4),
            VERSION_4_OFFLOAD_SIZE
        );
        let p = NdisRecvScaleCap {
            num_indirect_table_entries: 128,
            ..Default::default()
        };
        assert_eq!(p.as_bytes()[16..18], [128, 0]);
    }
}
