//! The network VSP protocol (NVSP) netvsc and netvsp exchange as in-band ring packets.
//!
//! Source: Linux `drivers/net/hyperv/hyperv_net.h`. Every message is a 4-byte
//! [`NvspMessageHeader`] and a body, 40 bytes in all ([`NvspMessage`]). RNDIS messages (see
//! [`crate::rndis`]) travel in the send/receive buffers or GPA-direct pages that
//! [`SendRndisPacket`] messages point to.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

open_enum! {
    /// NVSP message types (the anonymous enum of `NVSP_MSG*_TYPE_*`).
    pub enum NvspMessageType: u32 {
        /// None.
        NONE = 0,
        /// Guest proposes a version range ([`NvspInit`]).
        INIT = 1,
        /// Host answers ([`NvspInitComplete`]).
        INIT_COMPLETE = 2,
        /// v1: guest sends its NDIS version ([`SendNdisVersion`]).
        SEND_NDIS_VERSION = 100,
        /// v1: guest gives the receive buffer ([`SendReceiveBuffer`]).
        SEND_RECEIVE_BUFFER = 101,
        /// v1: host accepts it ([`SendReceiveBufferComplete`]).
        SEND_RECEIVE_BUFFER_COMPLETE = 102,
        /// v1: guest revokes the receive buffer ([`RevokeReceiveBuffer`]).
        REVOKE_RECEIVE_BUFFER = 103,
        /// v1: guest gives the send buffer ([`SendSendBuffer`]).
        SEND_SEND_BUFFER = 104,
        /// v1: host accepts it ([`SendSendBufferComplete`]).
        SEND_SEND_BUFFER_COMPLETE = 105,
        /// v1: guest revokes the send buffer ([`RevokeSendBuffer`]).
        REVOKE_SEND_BUFFER = 106,
        /// v1: an RNDIS message ([`SendRndisPacket`]).
        SEND_RNDIS_PACKET = 107,
        /// v1: its completion ([`SendRndisPacketComplete`]).
        SEND_RNDIS_PACKET_COMPLETE = 108,
        /// v2: chimney delegated buffer.
        SEND_CHIMNEY_DELEGATED_BUFFER = 109,
        /// v2: its completion.
        SEND_CHIMNEY_DELEGATED_BUFFER_COMPLETE = 110,
        /// v2: revoke chimney delegated buffer.
        REVOKE_CHIMNEY_DELEGATED_BUFFER = 111,
        /// v2: resume chimney receive indication.
        RESUME_CHIMNEY_RX_INDICATION = 112,
        /// v2: terminate chimney.
        TERMINATE_CHIMNEY = 113,
        /// v2: its completion.
        TERMINATE_CHIMNEY_COMPLETE = 114,
        /// v2: indicate chimney event.
        INDICATE_CHIMNEY_EVENT = 115,
        /// v2: send chimney packet.
        SEND_CHIMNEY_PACKET = 116,
        /// v2: its completion.
        SEND_CHIMNEY_PACKET_COMPLETE = 117,
        /// v2: post chimney receive request.
        POST_CHIMNEY_RECV_REQUEST = 118,
        /// v2: its completion.
        POST_CHIMNEY_RECV_REQUEST_COMPLETE = 119,
        /// v2: allocate a receive buffer ([`AllocRxBuf`]).
        ALLOC_RXBUF = 120,
        /// v2: its completion ([`AllocRxBufComplete`]).
        ALLOC_RXBUF_COMPLETE = 121,
        /// v2: free a receive buffer ([`FreeRxBuf`]).
        FREE_RXBUF = 122,
        /// v2: send VMQ RNDIS packet.
        SEND_VMQ_RNDIS_PACKET = 123,
        /// v2: its completion.
        SEND_VMQ_RNDIS_PACKET_COMPLETE = 124,
        /// v2: guest sends MTU and capabilities ([`SendNdisConfig`]).
        SEND_NDIS_CONFIG = 125,
        /// v2: allocate chimney handle.
        ALLOC_CHIMNEY_HANDLE = 126,
        /// v2: its completion.
        ALLOC_CHIMNEY_HANDLE_COMPLETE = 127,
        /// v4: host tells the guest about a VF ([`SendVfAssociation`]).
        SEND_VF_ASSOCIATION = 128,
        /// v4: guest switches the data path ([`SwitchDataPath`]).
        SWITCH_DATA_PATH = 129,
        /// v4: uplink connect state (deprecated).
        UPLINK_CONNECT_STATE_DEPRECATED = 130,
        /// v5: OID query ex.
        OID_QUERY_EX = 131,
        /// v5: its completion.
        OID_QUERY_EX_COMPLETE = 132,
        /// v5: subchannel request and its completion ([`SubchannelRequest`],
        /// [`SubchannelComplete`]).
        SUBCHANNEL = 133,
        /// v5: host sends the send indirection table ([`SendIndirectionTable`]).
        SEND_INDIRECTION_TABLE = 134,
        /// v6: PacketDirect API ([`PdApiRequest`], [`PdApiComplete`]).
        PD_API = 135,
        /// v6: PacketDirect post batch.
        PD_POST_BATCH = 136,
    }
}

open_enum! {
    /// NVSP protocol versions (`NVSP_PROTOCOL_VERSION_*`).
    pub enum NvspVersion: u32 {
        /// Version 1 (the value is 2).
        V1 = 0x2,
        /// Version 2.
        V2 = 0x30002,
        /// Version 4.
        V4 = 0x40000,
        /// Version 5.
        V5 = 0x50000,
        /// Version 6.
        V6 = 0x60000,
        /// Version 6.1.
        V61 = 0x60001,
    }
}

/// `NVSP_INVALID_PROTOCOL_VERSION`.
pub const INVALID_PROTOCOL_VERSION: u32 = 0xFFFF_FFFF;

/// The versions Linux 6.1 proposes, newest first (each in its own INIT message with
/// `min == max`).
pub const LINUX_6_1_VERSIONS: [NvspVersion; 6] = [
    NvspVersion::V61,
    NvspVersion::V6,
    NvspVersion::V5,
    NvspVersion::V4,
    NvspVersion::V2,
    NvspVersion::V1,
];

open_enum! {
    /// NVSP status values (`NVSP_STAT_*`).
    pub enum NvspStatus: u32 {
        /// None.
        NONE = 0,
        /// Success.
        SUCCESS = 1,
        /// Failure.
        FAIL = 2,
        /// Protocol too new.
        PROTOCOL_TOO_NEW = 3,
        /// Protocol too old.
        PROTOCOL_TOO_OLD = 4,
        /// Invalid RNDIS packet.
        INVALID_RNDIS_PACKET = 5,
        /// Busy.
        BUSY = 6,
        /// Protocol unsupported.
        PROTOCOL_UNSUPPORTED = 7,
    }
}

/// `channel_type` of [`SendRndisPacket`]: RNDIS data messages (RMC_DATA).
pub const CHANNEL_TYPE_DATA: u32 = 0;
/// `channel_type` of [`SendRndisPacket`]: RNDIS control messages (RMC_CONTROL).
pub const CHANNEL_TYPE_CONTROL: u32 = 1;
/// `send_buffer_section_index` meaning "not in the send buffer" (`NETVSC_INVALID_INDEX`).
pub const INVALID_SECTION_INDEX: u32 = 0xFFFF_FFFF;
/// The receive buffer id Linux uses (`NETVSC_RECEIVE_BUFFER_ID`).
pub const LINUX_RECEIVE_BUFFER_ID: u16 = 0xCAFE;
/// The send buffer id Linux uses (`NETVSC_SEND_BUFFER_ID`).
pub const LINUX_SEND_BUFFER_ID: u16 = 0;

/// Most RNDIS packets (fragments) a receive-segment-coalesced frame may come in, all in one
/// transfer-page packet (`NVSP_RSC_MAX`; RSC is a capability from NVSP 6.1).
pub const RSC_MAX_FRAGMENTS: usize = 562;

/// NDIS 6.1 (`0x0006_0001`): what Linux sends for NVSP 4 and below.
pub const NDIS_VERSION_6_1: u32 = 0x0006_0001;
/// NDIS 6.30 (`0x0006_001E`): what Linux sends above NVSP 4.
pub const NDIS_VERSION_6_30: u32 = 0x0006_001E;

open_enum! {
    /// `enum nvsp_subchannel_operation`.
    pub enum NvspSubchannelOperation: u32 {
        /// None.
        NONE = 0,
        /// Allocate subchannels.
        ALLOCATE = 1,
    }
}

open_enum! {
    /// `enum nvsp_vm_datapath`.
    pub enum NvspDatapath: u32 {
        /// Synthetic (through netvsp).
        SYNTHETIC = 0,
        /// Through the VF.
        VF = 1,
    }
}

/// `struct nvsp_message_header`.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct NvspMessageHeader {
    /// The message type.
    pub message_type: NvspMessageType,
}
const _: () = assert!(size_of::<NvspMessageHeader>() == 4);

/// Bytes of body in an [`NvspMessage`].
pub const MESSAGE_BODY_SIZE: usize = 36;

/// `struct nvsp_message`: a whole NVSP message, 40 bytes; interpret the body by type with
/// [`NvspMessage::body`].
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct NvspMessage {
    /// The header.
    pub header: NvspMessageHeader,
    /// The body (the `nvsp_all_messages` union).
    pub body: [u8; MESSAGE_BODY_SIZE],
}
const _: () = assert!(size_of::<NvspMessage>() == 40);

impl NvspMessage {
    /// A message of the given type with its body set to `body` and the rest zero.
    pub fn new<T: IntoBytes + Immutable>(message_type: NvspMessageType, body: &T) -> Self {
        let mut m = Self {
            header: NvspMessageHeader { message_type },
            body: [0; MESSAGE_BODY_SIZE],
        };
        m.set_body(body);
        m
    }

    /// Reads a body struct from the start of the body.
    pub fn body<T: FromBytes>(&self) -> T {
        const { assert!(size_of::<T>() <= MESSAGE_BODY_SIZE) };
        // The size was asserted above, so the prefix read cannot fail.
        match T::read_from_prefix(&self.body) {
            Ok((v, _)) => v,
            Err(_) => unreachable!(),
        }
    }

    /// Writes a body struct at the start of the body.
    pub fn set_body<T: IntoBytes + Immutable>(&mut self, value: &T) {
        const { assert!(size_of::<T>() <= MESSAGE_BODY_SIZE) };
        self.body[..size_of::<T>()].copy_from_slice(value.as_bytes());
    }

    /// Reads a message from the start of a packet payload. Linux sometimes sends fewer than 40
    /// bytes (only the header and the body it uses); missing bytes read as zero. Returns `None`
    /// if not even the header is there.
    pub fn read_from_payload(payload: &[u8]) -> Option<Self> {
        if payload.len() < size_of::<NvspMessageHeader>() {
            return None;
        }
        let mut bytes = [0u8; size_of::<NvspMessage>()];
        let n = payload.len().min(bytes.len());
        bytes[..n].copy_from_slice(&payload[..n]);
        Self::read_from_bytes(&bytes).ok()
    }
}

/// `struct nvsp_message_init` (type 1).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct NvspInit {
    /// Lowest acceptable version.
    pub min_protocol_version: NvspVersion,
    /// Highest acceptable version.
    pub max_protocol_version: NvspVersion,
}
const _: () = assert!(size_of::<NvspInit>() == 8);

/// `struct nvsp_message_init_complete` (type 2).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct NvspInitComplete {
    /// The negotiated version.
    pub negotiated_protocol_version: NvspVersion,
    /// Maximum MDL chain length.
    pub max_mdl_chain_length: u32,
    /// Status.
    pub status: NvspStatus,
}
const _: () = assert!(size_of::<NvspInitComplete>() == 12);

/// `struct nvsp_1_message_send_ndis_version` (type 100).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SendNdisVersion {
    /// NDIS major version.
    pub ndis_major_version: u32,
    /// NDIS minor version.
    pub ndis_minor_version: u32,
}
const _: () = assert!(size_of::<SendNdisVersion>() == 8);

/// `struct nvsp_1_message_send_receive_buffer` (type 101).
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
pub struct SendReceiveBuffer {
    /// The buffer's GPADL.
    pub gpadl_handle: u32,
    /// The buffer id (the transfer page set id of receive packets).
    pub id: u16,
}
const _: () = assert!(size_of::<SendReceiveBuffer>() == 6);

/// `struct nvsp_1_receive_buffer_section`.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ReceiveBufferSection {
    /// Offset of the section.
    pub offset: u32,
    /// Size of each suballocation.
    pub sub_alloc_size: u32,
    /// Number of suballocations.
    pub num_sub_allocs: u32,
    /// End offset of the section.
    pub end_offset: u32,
}
const _: () = assert!(size_of::<ReceiveBufferSection>() == 16);

/// `struct nvsp_1_message_send_receive_buffer_complete` (type 102), with the one section
/// Linux 6.1 declares (and reads).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SendReceiveBufferComplete {
    /// Status.
    pub status: NvspStatus,
    /// Number of sections; Linux requires 1.
    pub num_sections: u32,
    /// The section.
    pub sections: [ReceiveBufferSection; 1],
}
const _: () = assert!(size_of::<SendReceiveBufferComplete>() == 24);

/// `struct nvsp_1_message_revoke_receive_buffer` (type 103).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct RevokeReceiveBuffer {
    /// The buffer id.
    pub id: u16,
}
const _: () = assert!(size_of::<RevokeReceiveBuffer>() == 2);

/// `struct nvsp_1_message_send_send_buffer` (type 104).
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
pub struct SendSendBuffer {
    /// The buffer's GPADL.
    pub gpadl_handle: u32,
    /// The buffer id.
    pub id: u16,
}
const _: () = assert!(size_of::<SendSendBuffer>() == 6);

/// `struct nvsp_1_message_send_send_buffer_complete` (type 105).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SendSendBufferComplete {
    /// Status.
    pub status: NvspStatus,
    /// Section size the host chose.
    pub section_size: u32,
}
const _: () = assert!(size_of::<SendSendBufferComplete>() == 8);

/// `struct nvsp_1_message_revoke_send_buffer` (type 106).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct RevokeSendBuffer {
    /// The buffer id.
    pub id: u16,
}
const _: () = assert!(size_of::<RevokeSendBuffer>() == 2);

/// `struct nvsp_1_message_send_rndis_packet` (type 107).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SendRndisPacket {
    /// [`CHANNEL_TYPE_DATA`] or [`CHANNEL_TYPE_CONTROL`].
    pub channel_type: u32,
    /// Send buffer section holding the message, or [`INVALID_SECTION_INDEX`].
    pub send_buffer_section_index: u32,
    /// Bytes used in that section.
    pub send_buffer_section_size: u32,
}
const _: () = assert!(size_of::<SendRndisPacket>() == 12);

/// `struct nvsp_1_message_send_rndis_packet_complete` (type 108).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SendRndisPacketComplete {
    /// Status.
    pub status: NvspStatus,
}
const _: () = assert!(size_of::<SendRndisPacketComplete>() == 4);

/// `struct nvsp_2_vsc_capability`: what the guest can do, sent in [`SendNdisConfig`].
#[repr(transparent)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct NvspCapabilities(pub u64);

macro_rules! capability_bits {
    ($($(#[$m:meta])* $get:ident, $set:ident = $bit:expr;)*) => {
        impl NvspCapabilities {
            $(
                $(#[$m])*
                pub const fn $get(self) -> bool {
                    self.0 & (1 << $bit) != 0
                }

                /// Returns these capabilities with the bit set or cleared.
                pub const fn $set(self, v: bool) -> Self {
                    Self((self.0 & !(1 << $bit)) | (v as u64) << $bit)
                }
            )*
        }
    };
}

capability_bits! {
    /// Bit 0: VMQ.
    vmq, with_vmq = 0;
    /// Bit 1: TCP chimney.
    chimney, with_chimney = 1;
    /// Bit 2: SR-IOV.
    sriov, with_sriov = 2;
    /// Bit 3: IEEE 802.1Q.
    ieee8021q, with_ieee8021q = 3;
    /// Bit 4: correlation id.
    correlation_id, with_correlation_id = 4;
    /// Bit 5: teaming.
    teaming, with_teaming = 5;
    /// Bit 6: virtual subnet id.
    vsubnetid, with_vsubnetid = 6;
    /// Bit 7: receive segment coalescing.
    rsc, with_rsc = 7;
}

/// `struct nvsp_2_send_ndis_config` (type 125).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SendNdisConfig {
    /// MTU (Ethernet payload bytes).
    pub mtu: u32,
    /// Reserved.
    pub reserved: u32,
    /// Capabilities.
    pub capabilities: NvspCapabilities,
}
const _: () = assert!(size_of::<SendNdisConfig>() == 16);

/// `struct nvsp_2_alloc_rxbuf` (type 120).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct AllocRxBuf {
    /// Matches request and response.
    pub alloc_id: u32,
    /// Length of the buffer to allocate.
    pub len: u32,
}
const _: () = assert!(size_of::<AllocRxBuf>() == 8);

/// `struct nvsp_2_alloc_rxbuf_comp` (type 121).
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
pub struct AllocRxBufComplete {
    /// NDIS status.
    pub status: u32,
    /// The request's `alloc_id`.
    pub alloc_id: u32,
    /// GPADL of the allocated buffer.
    pub gpadl_handle: u32,
    /// Receive buffer id.
    pub recv_buf_id: u64,
}
const _: () = assert!(size_of::<AllocRxBufComplete>() == 20);

/// `struct nvsp_2_free_rxbuf` (type 122).
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
pub struct FreeRxBuf {
    /// Receive buffer id.
    pub recv_buf_id: u64,
}
const _: () = assert!(size_of::<FreeRxBuf>() == 8);

/// `struct nvsp_4_send_vf_association` (type 128).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SendVfAssociation {
    /// 1 if a VF is allocated and `serial` is valid.
    pub allocated: u32,
    /// Serial number of the VF to team with.
    pub serial: u32,
}
const _: () = assert!(size_of::<SendVfAssociation>() == 8);

/// `struct nvsp_4_sw_datapath` (type 129).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SwitchDataPath {
    /// The data path the guest now uses.
    pub active_datapath: NvspDatapath,
}
const _: () = assert!(size_of::<SwitchDataPath>() == 4);

/// `struct nvsp_5_subchannel_request` (type 133, guest to host).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SubchannelRequest {
    /// The operation.
    pub op: NvspSubchannelOperation,
    /// Subchannels wanted.
    pub num_subchannels: u32,
}
const _: () = assert!(size_of::<SubchannelRequest>() == 8);

/// `struct nvsp_5_subchannel_complete` (type 133, host to guest).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SubchannelComplete {
    /// Status.
    pub status: NvspStatus,
    /// Subchannels allocated.
    pub num_subchannels: u32,
}
const _: () = assert!(size_of::<SubchannelComplete>() == 8);

/// `struct nvsp_5_send_indirect_table` (type 134): `count` u32 channel numbers follow at
/// `offset` from the start of the [`NvspMessage`].
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SendIndirectionTable {
    /// Entries in the table.
    pub count: u32,
    /// Offset of the table from the start of the NVSP message.
    pub offset: u32,
}
const _: () = assert!(size_of::<SendIndirectionTable>() == 8);

/// Entries in the send indirection table Linux expects (`VRSS_SEND_TAB_SIZE`).
pub const SEND_INDIRECTION_TABLE_SIZE: usize = 16;

/// `struct nvsp_6_pd_api_req` (type 135): a PacketDirect request; the union is kept as bytes.
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
pub struct PdApiRequest {
    /// The operation.
    pub op: u32,
    /// Operation-specific data.
    pub data: [u8; 30],
}
const _: () = assert!(size_of::<PdApiRequest>() == 34);

/// `struct nvsp_6_pd_api_comp` (type 135): a PacketDirect completion.
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
pub struct PdApiComplete {
    /// The operation.
    pub op: u32,
    /// Status.
    pub status: u32,
    /// Operation-specific data.
    pub data: [u8; 28],
}
const _: () = assert!(size_of::<PdApiComplete>() == 36);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn init_message_bytes() {
        let m = NvspMessage::new(
            NvspMessageType::INIT,
            &NvspInit {
                min_protocol_version: NvspVersion::V61,
                max_protocol_version: NvspVersion::V61,
            },
        );
        let b = m.as_bytes();
        assert_eq!(b.len(), 40);
        assert_eq!(b[0..12], [1, 0, 0, 0, 1, 0, 6, 0, 1, 0, 6, 0]);
        let back = NvspMessage::read_from_bytes(b).unwrap();
        assert_eq!(
            back.body::<NvspInit>().max_protocol_version,
            NvspVersion::V61
        );
    }

    #[test]
    fn packed_bodies() {
        let m = NvspMessage::new(
            NvspMessageType::SEND_RECEIVE_BUFFER,
            &SendReceiveBuffer {
                gpadl_handle: 0x11223344,
                id: LINUX_RECEIVE_BUFFER_ID,
            },
        );
        assert_eq!(m.as_bytes()[4..10], [0x44, 0x33, 0x22, 0x11, 0xfe, 0xca]);
        let c = AllocRxBufComplete {
            status: 1,
            alloc_id: 2,
            gpadl_handle: 3,
            recv_buf_id: 4,
        };
        assert_eq!(c.as_bytes()[12..20], 4u64.to_le_bytes());
        let caps = NvspCapabilities::default()
            .with_sriov(true)
            .with_ieee8021q(true);
        assert_eq!(caps.0, 0b1100);
        assert!(caps.sriov() && !caps.vmq());
        let cfg = SendNdisConfig {
            mtu: 1500,
            reserved: 0,
            capabilities: caps,
        };
        assert_eq!(cfg.as_bytes()[8], 0b1100);
    }

    #[test]
    fn short_payloads() {
        assert_eq!(NvspMessage::read_from_payload(&[1, 0]), None);
        let m = NvspMessage::read_from_payload(&[2, 0, 0, 0, 0, 0, 6, 0]).unwrap();
        assert_eq!(m.header.message_type, NvspMessageType::INIT_COMPLETE);
        assert_eq!(
            m.body::<NvspInitComplete>().negotiated_protocol_version,
            NvspVersion::V6
        );
    }

    proptest! {
        #[test]
        fn any_payload_reads(p in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Some(m) = NvspMessage::read_from_payload(&p) {
                let _: PdApiComplete = m.body();
                let _: SendReceiveBufferComplete = m.body();
            }
        }
    }
}
