//! VMBus channel messages: the control plane the guest and host exchange over SynIC messages.
//!
//! Every message is at most [`MAX_MESSAGE_SIZE`] bytes and starts with an 8-byte
//! [`MessageHeader`]. The structs here include that header, as Linux's do
//! (`include/linux/hyperv.h`, `struct vmbus_channel_*`), so each struct is a whole message and its
//! size is the size Linux sends. Structs Linux declares `__packed` whose natural layout would differ
//! are `repr(C, packed)` here.
//!
//! [`Message::parse`] turns untrusted bytes into a typed message; it never panics.

use core::fmt;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Largest channel message, header included: the payload of one SynIC message.
pub const MAX_MESSAGE_SIZE: usize = 240;

/// Connection id guest-to-host channel messages go to below VMBus 5.0, and InitiateContact
/// for every version below 5.0 (`VMBUS_MESSAGE_CONNECTION_ID`).
pub const MESSAGE_CONNECTION_ID: u32 = 1;
/// Connection id of InitiateContact from VMBus 5.0 on (`VMBUS_MESSAGE_CONNECTION_ID_4`); later
/// messages go to the `msg_conn_id` of the [`VersionResponse`].
pub const MESSAGE_CONNECTION_ID_4: u32 = 4;
/// Port id the host listens to channel messages on (`VMBUS_MESSAGE_PORT_ID`).
pub const MESSAGE_PORT_ID: u32 = 1;
/// Connection id of the shared event (interrupt page) signal used before dedicated interrupts
/// (`VMBUS_EVENT_CONNECTION_ID`).
pub const EVENT_CONNECTION_ID: u32 = 2;
/// Port id matching [`EVENT_CONNECTION_ID`] (`VMBUS_EVENT_PORT_ID`).
pub const EVENT_PORT_ID: u32 = 2;
/// Connection id of the monitor pages (`VMBUS_MONITOR_CONNECTION_ID`).
pub const MONITOR_CONNECTION_ID: u32 = 3;
/// Port id matching [`MONITOR_CONNECTION_ID`] (`VMBUS_MONITOR_PORT_ID`).
pub const MONITOR_PORT_ID: u32 = 3;
/// The SINT channel messages arrive on (`VMBUS_MESSAGE_SINT`).
pub const MESSAGE_SINT: u8 = 2;

/// Bytes of user data in an offer or an OpenChannel message (`MAX_USER_DEFINED_BYTES`).
pub const MAX_USER_DEFINED_BYTES: usize = 120;
/// Bytes of user data left to pipe-mode offers after the 4-byte pipe mode
/// (`MAX_PIPE_USER_DEFINED_BYTES`).
pub const MAX_PIPE_USER_DEFINED_BYTES: usize = 116;

/// Page frame numbers that fit in a [`GpadlHeader`] message carrying one range:
/// (240 - 20 - 8) / 8.
pub const MAX_GPADL_HEADER_PFNS: usize =
    (MAX_MESSAGE_SIZE - size_of::<GpadlHeader>() - size_of::<crate::ring::GpaRangeHeader>()) / 8;
/// Page frame numbers that fit in one [`GpadlBody`] message: (240 - 16) / 8.
pub const MAX_GPADL_BODY_PFNS: usize = (MAX_MESSAGE_SIZE - size_of::<GpadlBody>()) / 8;
const _: () = assert!(MAX_GPADL_HEADER_PFNS == 26);
const _: () = assert!(MAX_GPADL_BODY_PFNS == 28);

/// GPADL type of a ring buffer (`GPADL_TYPE_RING_BUFFER`; guest-internal, not on the wire).
pub const GPADL_TYPE_RING_BUFFER: u32 = 1;

/// Offer flags (`chn_flags` of [`ChannelOffer`]).
pub mod offer_flags {
    /// Enumerate the device interface (`VMBUS_CHANNEL_ENUMERATE_DEVICE_INTERFACE`).
    pub const ENUMERATE_DEVICE_INTERFACE: u16 = 0x1;
    /// The server supports transfer pages.
    pub const SERVER_SUPPORTS_TRANSFER_PAGES: u16 = 0x2;
    /// The server supports GPADLs.
    pub const SERVER_SUPPORTS_GPADLS: u16 = 0x4;
    /// The channel is a named pipe; the user data starts with a pipe mode.
    pub const NAMED_PIPE_MODE: u16 = 0x10;
    /// Loopback offer.
    pub const LOOPBACK_OFFER: u16 = 0x100;
    /// Parent offer.
    pub const PARENT_OFFER: u16 = 0x200;
    /// The server asks for monitored notification.
    pub const REQUEST_MONITORED_NOTIFICATION: u16 = 0x400;
    /// A Hyper-V socket (hv_sock) offer (`VMBUS_CHANNEL_TLNPI_PROVIDER_OFFER`).
    pub const TLNPI_PROVIDER_OFFER: u16 = 0x2000;
}

open_enum! {
    /// `enum vmbus_channel_message_type`: the first word of every channel message.
    pub enum MessageType: u32 {
        /// Invalid.
        INVALID = 0,
        /// Host offers a channel ([`OfferChannel`]).
        OFFER_CHANNEL = 1,
        /// Host removes an offer ([`RescindChannelOffer`]).
        RESCIND_CHANNEL_OFFER = 2,
        /// Guest asks for the offers (header only).
        REQUEST_OFFERS = 3,
        /// Host has sent every offer (header only).
        ALL_OFFERS_DELIVERED = 4,
        /// Guest opens a channel ([`OpenChannel`]).
        OPEN_CHANNEL = 5,
        /// Host answers an open ([`OpenResult`]).
        OPEN_CHANNEL_RESULT = 6,
        /// Guest closes a channel ([`CloseChannel`]).
        CLOSE_CHANNEL = 7,
        /// Guest starts a GPADL ([`GpadlHeader`]).
        GPADL_HEADER = 8,
        /// More page numbers of a GPADL ([`GpadlBody`]).
        GPADL_BODY = 9,
        /// Host answers a GPADL ([`GpadlCreated`]).
        GPADL_CREATED = 10,
        /// Guest tears a GPADL down ([`GpadlTeardown`]).
        GPADL_TEARDOWN = 11,
        /// Host answers a teardown ([`GpadlTorndown`]).
        GPADL_TORNDOWN = 12,
        /// Guest releases a rescinded channel's id ([`RelIdReleased`]).
        RELID_RELEASED = 13,
        /// Guest starts the connection ([`InitiateContact`]).
        INITIATE_CONTACT = 14,
        /// Host answers InitiateContact ([`VersionResponse`]).
        VERSION_RESPONSE = 15,
        /// Guest disconnects (header only).
        UNLOAD = 16,
        /// Host answers Unload (header only).
        UNLOAD_RESPONSE = 17,
        /// Unused (`CHANNELMSG_18`).
        MSG_18 = 18,
        /// Unused (`CHANNELMSG_19`).
        MSG_19 = 19,
        /// Unused (`CHANNELMSG_20`).
        MSG_20 = 20,
        /// Guest connects a Hyper-V socket ([`TlConnectRequest`]).
        TL_CONNECT_REQUEST = 21,
        /// Guest retargets a channel's interrupt ([`ModifyChannel`]).
        MODIFY_CHANNEL = 22,
        /// Host answers a Hyper-V socket connect.
        TL_CONNECT_RESULT = 23,
        /// Host answers ModifyChannel ([`ModifyChannelResponse`]).
        MODIFY_CHANNEL_RESPONSE = 24,
    }
}

open_enum! {
    /// A VMBus protocol version: `major << 16 | minor`.
    pub enum VmbusVersion: u32 {
        /// Windows Server 2008, 0.13.
        WS2008 = 13,
        /// Windows 7, 1.1.
        WIN7 = 0x1_0001,
        /// Windows 8 / Server 2012, 2.4.
        WIN8 = 0x2_0004,
        /// Windows 8.1 / Server 2012 R2, 3.0.
        WIN8_1 = 0x3_0000,
        /// Windows 10, 4.0.
        WIN10 = 0x4_0000,
        /// Windows 10 RS3, 4.1.
        WIN10_RS3 = 0x4_0001,
        /// Windows 10 RS3 and later, 5.0: InitiateContact moves to connection id 4.
        WIN10_V5 = 0x5_0000,
        /// Windows 10 RS4, 5.1.
        WIN10_RS4 = 0x5_0001,
        /// Windows 10 RS5, 5.2.
        WIN10_RS5 = 0x5_0002,
        /// Iron (Windows Server 2022), 5.3.
        IRON = 0x5_0003,
        /// Copper, 6.0 (adds feature flags to InitiateContact).
        COPPER = 0x6_0000,
    }
}

impl VmbusVersion {
    /// Builds a version from its major and minor numbers.
    pub const fn new(major: u16, minor: u16) -> Self {
        Self(((major as u32) << 16) | minor as u32)
    }

    /// The major number (upper 16 bits).
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// The minor number (lower 16 bits).
    pub const fn minor(self) -> u16 {
        self.0 as u16
    }

    /// The connection id the guest sends InitiateContact for this version to.
    pub const fn initiate_contact_connection_id(self) -> u32 {
        if self.0 >= Self::WIN10_V5.0 {
            MESSAGE_CONNECTION_ID_4
        } else {
            MESSAGE_CONNECTION_ID
        }
    }
}

/// The versions this stack speaks, newest first: Win8 (2.4) to Copper (6.0). Older versions
/// lack dedicated channel interrupts, which is how channels signal here. The server accepts
/// exactly these and the client proposes them in this order.
pub const STACK_VERSIONS: [VmbusVersion; 9] = [
    VmbusVersion::COPPER,
    VmbusVersion::IRON,
    VmbusVersion::WIN10_RS5,
    VmbusVersion::WIN10_RS4,
    VmbusVersion::WIN10_V5,
    VmbusVersion::WIN10_RS3,
    VmbusVersion::WIN10,
    VmbusVersion::WIN8_1,
    VmbusVersion::WIN8,
];

/// The versions Linux 6.1 proposes, in the order it tries them.
pub const LINUX_6_1_VERSIONS: [VmbusVersion; 8] = [
    VmbusVersion::IRON,
    VmbusVersion::WIN10_RS5,
    VmbusVersion::WIN10_RS4,
    VmbusVersion::WIN10_V5,
    VmbusVersion::WIN10_RS3,
    VmbusVersion::WIN10,
    VmbusVersion::WIN8_1,
    VmbusVersion::WIN8,
];

/// A GUID in the Windows mixed-endian byte order VMBus uses: a little-endian u32, two
/// little-endian u16s, then 8 bytes in order (`guid_t`).
#[repr(transparent)]
#[derive(
    Copy,
    Clone,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Guid(pub [u8; 16]);
const _: () = assert!(size_of::<Guid>() == 16);

/// A string that is not a GUID in `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` form.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GuidParseError;

impl fmt::Display for GuidParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a GUID of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")
    }
}

impl core::error::Error for GuidParseError {}

impl Guid {
    /// The all-zero GUID.
    pub const ZERO: Guid = Guid([0; 16]);

    /// Storage class of synthetic SCSI controllers (storvsc).
    pub const SCSI: Guid = Guid::from_fields(
        0xba6163d9,
        0x04a1,
        0x4d29,
        [0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1, 0xdc, 0x7f],
    );
    /// Storage class of synthetic IDE controllers (storvsc, IDE flavour).
    pub const IDE: Guid = Guid::from_fields(
        0x32412632,
        0x86cb,
        0x44a2,
        [0x9b, 0x5c, 0x50, 0xd1, 0x41, 0x73, 0x54, 0xf5],
    );
    /// Class of synthetic network adapters (netvsc).
    pub const NETWORK: Guid = Guid::from_fields(
        0xf8615163,
        0xdf3e,
        0x46c5,
        [0x91, 0x3f, 0xf2, 0xd2, 0xf9, 0x65, 0xed, 0x0e],
    );

    /// Builds a GUID from its four textual groups (the last two groups joined as 8 bytes).
    pub const fn from_fields(data1: u32, data2: u16, data3: u16, data4: [u8; 8]) -> Self {
        let a = data1.to_le_bytes();
        let b = data2.to_le_bytes();
        let c = data3.to_le_bytes();
        let d = data4;
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ])
    }

    /// The first group.
    pub const fn data1(&self) -> u32 {
        u32::from_le_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }

    /// The second group.
    pub const fn data2(&self) -> u16 {
        u16::from_le_bytes([self.0[4], self.0[5]])
    }

    /// The third group.
    pub const fn data3(&self) -> u16 {
        u16::from_le_bytes([self.0[6], self.0[7]])
    }

    /// The last 8 bytes (the fourth and fifth groups), in order.
    pub const fn data4(&self) -> [u8; 8] {
        let b = &self.0;
        [b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]
    }

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (hex digits of either case, optionally in
    /// braces).
    pub fn parse(s: &str) -> Result<Self, GuidParseError> {
        let s = s
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or(s);
        let b = s.as_bytes();
        if b.len() != 36 || b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
            return Err(GuidParseError);
        }
        let mut digits = [0u8; 16];
        let mut n = 0;
        let mut i = 0;
        while i < b.len() {
            if matches!(i, 8 | 13 | 18 | 23) {
                i += 1;
                continue;
            }
            let hi = hex_value(b[i]).ok_or(GuidParseError)?;
            let lo = hex_value(b[i + 1]).ok_or(GuidParseError)?;
            digits[n] = hi << 4 | lo;
            n += 1;
            i += 2;
        }
        let d = digits;
        Ok(Guid::from_fields(
            u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
            u16::from_be_bytes([d[4], d[5]]),
            u16::from_be_bytes([d[6], d[7]]),
            [d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15]],
        ))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl core::str::FromStr for Guid {
    type Err = GuidParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Guid::parse(s)
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.data4();
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            self.data1(),
            self.data2(),
            self.data3(),
            d[0],
            d[1],
            d[2],
            d[3],
            d[4],
            d[5],
            d[6],
            d[7]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `struct vmbus_channel_message_header`: the first 8 bytes of every channel message.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct MessageHeader {
    /// The message type.
    pub message_type: MessageType,
    /// Padding; zero.
    pub padding: u32,
}
const _: () = assert!(size_of::<MessageHeader>() == 8);

impl MessageHeader {
    /// A header of the given type.
    pub const fn new(message_type: MessageType) -> Self {
        Self {
            message_type,
            padding: 0,
        }
    }
}

/// `struct vmbus_channel_offer`: the description of a channel inside [`OfferChannel`].
#[repr(C, packed)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ChannelOffer {
    /// The device class (interface type).
    pub interface_type: Guid,
    /// The device instance; subchannels share their primary's.
    pub interface_instance: Guid,
    /// Reserved.
    pub reserved1: u64,
    /// Reserved.
    pub reserved2: u64,
    /// Flags, see [`offer_flags`].
    pub flags: u16,
    /// MMIO space the device wants, in MiB.
    pub mmio_megabytes: u16,
    /// Device-specific data (for pipes: a u32 pipe mode, then 116 bytes).
    pub user_defined: [u8; MAX_USER_DEFINED_BYTES],
    /// Index of this subchannel; 0 for the primary channel.
    pub subchannel_index: u16,
    /// Reserved.
    pub reserved3: u16,
}
const _: () = assert!(size_of::<ChannelOffer>() == 176);

/// `struct vmbus_channel_offer_channel` (type 1): the host offers a channel.
#[repr(C, packed)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct OfferChannel {
    /// Header, type [`MessageType::OFFER_CHANNEL`].
    pub header: MessageHeader,
    /// The offer.
    pub offer: ChannelOffer,
    /// The channel's relative id; names the channel in later messages and its event bit.
    pub child_relid: u32,
    /// Monitor id (bit index in the monitor page) when a monitor is allocated.
    pub monitor_id: u8,
    /// Bit 0: a monitor is allocated (`monitor_allocated`); bits 1-7 reserved.
    pub monitor_flags: u8,
    /// Bit 0: the channel has a dedicated interrupt (`is_dedicated_interrupt`); rest reserved.
    pub interrupt_flags: u16,
    /// Connection id the guest signals this channel with.
    pub connection_id: u32,
}
const _: () = assert!(size_of::<OfferChannel>() == 196);

impl OfferChannel {
    /// Whether a monitor is allocated (bit 0 of `monitor_flags`).
    pub const fn monitor_allocated(&self) -> bool {
        self.monitor_flags & 1 != 0
    }

    /// Sets or clears the monitor-allocated bit, keeping the reserved bits.
    pub fn set_monitor_allocated(&mut self, v: bool) {
        self.monitor_flags = (self.monitor_flags & !1) | u8::from(v);
    }

    /// Whether the channel has a dedicated interrupt (bit 0 of `interrupt_flags`).
    pub const fn is_dedicated_interrupt(&self) -> bool {
        self.interrupt_flags & 1 != 0
    }

    /// Sets or clears the dedicated-interrupt bit, keeping the reserved bits.
    pub fn set_dedicated_interrupt(&mut self, v: bool) {
        self.interrupt_flags = (self.interrupt_flags & !1) | u16::from(v);
    }
}

/// `struct vmbus_channel_rescind_offer` (type 2): the host removes a channel.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct RescindChannelOffer {
    /// Header, type [`MessageType::RESCIND_CHANNEL_OFFER`].
    pub header: MessageHeader,
    /// The channel.
    pub child_relid: u32,
}
const _: () = assert!(size_of::<RescindChannelOffer>() == 12);

/// `struct vmbus_channel_open_channel` (type 5): the guest opens a channel on a ring GPADL.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct OpenChannel {
    /// Header, type [`MessageType::OPEN_CHANNEL`].
    pub header: MessageHeader,
    /// The channel.
    pub child_relid: u32,
    /// Id echoed in the [`OpenResult`].
    pub open_id: u32,
    /// The GPADL holding both rings.
    pub ring_buffer_gpadl: u32,
    /// The VP host-to-guest interrupts for this channel go to.
    pub target_vp: u32,
    /// Page offset in the GPADL where the host-to-guest (downstream) ring starts.
    pub downstream_ring_buffer_page_offset: u32,
    /// Data for the device.
    pub user_data: [u8; MAX_USER_DEFINED_BYTES],
}
const _: () = assert!(size_of::<OpenChannel>() == 148);

/// `struct vmbus_channel_open_result` (type 6): the host answers an open.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct OpenResult {
    /// Header, type [`MessageType::OPEN_CHANNEL_RESULT`].
    pub header: MessageHeader,
    /// The channel.
    pub child_relid: u32,
    /// The `open_id` of the request.
    pub open_id: u32,
    /// 0 on success.
    pub status: u32,
}
const _: () = assert!(size_of::<OpenResult>() == 20);

/// `struct vmbus_channel_close_channel` (type 7): the guest closes a channel.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct CloseChannel {
    /// Header, type [`MessageType::CLOSE_CHANNEL`].
    pub header: MessageHeader,
    /// The channel.
    pub child_relid: u32,
}
const _: () = assert!(size_of::<CloseChannel>() == 12);

/// `struct vmbus_channel_gpadl_header` (type 8): the first message of a GPADL. Followed by
/// `range_count` GPA ranges ([`crate::ring::GpaRangeHeader`] + u64 page numbers each),
/// `range_buflen` bytes in all, continued in [`GpadlBody`] messages.
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
pub struct GpadlHeader {
    /// Header, type [`MessageType::GPADL_HEADER`].
    pub header: MessageHeader,
    /// The channel the GPADL belongs to.
    pub child_relid: u32,
    /// The GPADL id the guest chose.
    pub gpadl: u32,
    /// Total bytes of the range list (headers and page numbers), across all messages.
    pub range_buflen: u16,
    /// Number of ranges.
    pub range_count: u16,
}
const _: () = assert!(size_of::<GpadlHeader>() == 20);

/// `struct vmbus_channel_gpadl_body` (type 9): more page numbers of a GPADL; followed by u64
/// page numbers.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct GpadlBody {
    /// Header, type [`MessageType::GPADL_BODY`].
    pub header: MessageHeader,
    /// Sequence number of this body message.
    pub message_number: u32,
    /// The GPADL.
    pub gpadl: u32,
}
const _: () = assert!(size_of::<GpadlBody>() == 16);

/// `struct vmbus_channel_gpadl_created` (type 10): the host answers a GPADL.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct GpadlCreated {
    /// Header, type [`MessageType::GPADL_CREATED`].
    pub header: MessageHeader,
    /// The channel.
    pub child_relid: u32,
    /// The GPADL.
    pub gpadl: u32,
    /// 0 on success.
    pub creation_status: u32,
}
const _: () = assert!(size_of::<GpadlCreated>() == 20);

/// `struct vmbus_channel_gpadl_teardown` (type 11): the guest tears a GPADL down.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct GpadlTeardown {
    /// Header, type [`MessageType::GPADL_TEARDOWN`].
    pub header: MessageHeader,
    /// The channel.
    pub child_relid: u32,
    /// The GPADL.
    pub gpadl: u32,
}
const _: () = assert!(size_of::<GpadlTeardown>() == 16);

/// `struct vmbus_channel_gpadl_torndown` (type 12): the host answers a teardown.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct GpadlTorndown {
    /// Header, type [`MessageType::GPADL_TORNDOWN`].
    pub header: MessageHeader,
    /// The GPADL.
    pub gpadl: u32,
}
const _: () = assert!(size_of::<GpadlTorndown>() == 12);

/// `struct vmbus_channel_relid_released` (type 13): the guest lets go of a rescinded channel.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct RelIdReleased {
    /// Header, type [`MessageType::RELID_RELEASED`].
    pub header: MessageHeader,
    /// The channel.
    pub child_relid: u32,
}
const _: () = assert!(size_of::<RelIdReleased>() == 12);

/// `struct vmbus_channel_initiate_contact` (type 14): the guest proposes a version.
///
/// The 8 bytes at offset 16 are a union: below 5.0 the `interrupt_page` GPA; from 5.0
/// `msg_sint: u8, msg_vtl: u8, reserved: [u8; 2], feature_flags: u32` (feature flags from 6.0).
/// They are kept as one u64 here; use the accessors.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct InitiateContact {
    /// Header, type [`MessageType::INITIATE_CONTACT`].
    pub header: MessageHeader,
    /// The proposed version ([`VmbusVersion`]).
    pub vmbus_version_requested: u32,
    /// The VP the host sends channel messages to.
    pub target_vcpu: u32,
    /// The union at 16: `interrupt_page` (< 5.0) or `msg_sint`/`msg_vtl`/`feature_flags`.
    pub interrupt_page_or_target_info: u64,
    /// GPA of the host-to-guest monitor page (unused by Linux's host side).
    pub monitor_page1: u64,
    /// GPA of the guest-to-host monitor page.
    pub monitor_page2: u64,
}
const _: () = assert!(size_of::<InitiateContact>() == 40);

impl InitiateContact {
    /// The interrupt page GPA (meaningful below VMBus 5.0).
    pub const fn interrupt_page(&self) -> u64 {
        self.interrupt_page_or_target_info
    }

    /// The SINT the host should deliver messages to (VMBus 5.0 and later): byte 16.
    pub const fn msg_sint(&self) -> u8 {
        self.interrupt_page_or_target_info as u8
    }

    /// The VTL the host should deliver messages to (VMBus 5.0 and later): byte 17.
    pub const fn msg_vtl(&self) -> u8 {
        (self.interrupt_page_or_target_info >> 8) as u8
    }

    /// Feature flags (VMBus 6.0 and later): bytes 20-23.
    pub const fn feature_flags(&self) -> u32 {
        (self.interrupt_page_or_target_info >> 32) as u32
    }

    /// Sets the 5.0+ form of the union: `msg_sint`, `msg_vtl`, zero reserved bytes and
    /// `feature_flags`.
    pub fn set_target_info(&mut self, msg_sint: u8, msg_vtl: u8, feature_flags: u32) {
        self.interrupt_page_or_target_info =
            u64::from(msg_sint) | u64::from(msg_vtl) << 8 | u64::from(feature_flags) << 32;
    }
}

/// `struct vmbus_channel_version_response` (type 15): the host accepts or refuses a version.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct VersionResponse {
    /// Header, type [`MessageType::VERSION_RESPONSE`].
    pub header: MessageHeader,
    /// Non-zero if the requested version is accepted.
    pub version_supported: u8,
    /// Host connection state.
    pub connection_state: u8,
    /// Padding.
    pub padding: u16,
    /// Connection id for the guest's later messages (VMBus 5.0 and later).
    pub msg_conn_id: u32,
}
const _: () = assert!(size_of::<VersionResponse>() == 16);

/// `struct vmbus_channel_version_supported`: the 9-byte pre-Win8 form of the version answer.
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
pub struct VersionSupported {
    /// Header, type [`MessageType::VERSION_RESPONSE`].
    pub header: MessageHeader,
    /// Non-zero if the requested version is accepted.
    pub version_supported: u8,
}
const _: () = assert!(size_of::<VersionSupported>() == 9);

/// `struct vmbus_channel_tl_connect_request` (type 21): the guest connects a Hyper-V socket.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct TlConnectRequest {
    /// Header, type [`MessageType::TL_CONNECT_REQUEST`].
    pub header: MessageHeader,
    /// The guest endpoint.
    pub guest_endpoint_id: Guid,
    /// The host service.
    pub host_service_id: Guid,
}
const _: () = assert!(size_of::<TlConnectRequest>() == 40);

/// `struct vmbus_channel_modifychannel` (type 22): the guest moves a channel's interrupt.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ModifyChannel {
    /// Header, type [`MessageType::MODIFY_CHANNEL`].
    pub header: MessageHeader,
    /// The channel.
    pub child_relid: u32,
    /// The new target VP.
    pub target_vp: u32,
}
const _: () = assert!(size_of::<ModifyChannel>() == 16);

/// `struct vmbus_channel_modifychannel_response` (type 24): the host answers ModifyChannel.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ModifyChannelResponse {
    /// Header, type [`MessageType::MODIFY_CHANNEL_RESPONSE`].
    pub header: MessageHeader,
    /// The channel.
    pub child_relid: u32,
    /// 0 on success.
    pub status: u32,
}
const _: () = assert!(size_of::<ModifyChannelResponse>() == 16);

/// Why a channel message could not be parsed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The message is longer than [`MAX_MESSAGE_SIZE`].
    TooLong {
        /// Its length.
        len: usize,
    },
    /// The message is shorter than its type's fixed part.
    TooShort {
        /// The message type.
        message_type: MessageType,
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        len: usize,
    },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::TooLong { len } => {
                write!(
                    f,
                    "channel message of {len} bytes exceeds {MAX_MESSAGE_SIZE}"
                )
            }
            ParseError::TooShort {
                message_type,
                needed,
                len,
            } => {
                write!(
                    f,
                    "{message_type:?} message of {len} bytes is shorter than {needed}"
                )
            }
        }
    }
}

impl core::error::Error for ParseError {}

/// Splits a channel message into its header and the bytes after the header.
pub fn parse_message(bytes: &[u8]) -> Result<(MessageHeader, &[u8]), ParseError> {
    if bytes.len() > MAX_MESSAGE_SIZE {
        return Err(ParseError::TooLong { len: bytes.len() });
    }
    let (header, rest) =
        MessageHeader::read_from_prefix(bytes).map_err(|_| ParseError::TooShort {
            message_type: MessageType::INVALID,
            needed: size_of::<MessageHeader>(),
            len: bytes.len(),
        })?;
    Ok((header, rest))
}

/// A parsed channel message. Fixed-size messages are copied out; trailing bytes a sender may
/// add after the fixed part are ignored, except where the type has a variable tail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Type 1.
    OfferChannel(OfferChannel),
    /// Type 2.
    RescindChannelOffer(RescindChannelOffer),
    /// Type 3.
    RequestOffers,
    /// Type 4.
    AllOffersDelivered,
    /// Type 5.
    OpenChannel(OpenChannel),
    /// Type 6.
    OpenResult(OpenResult),
    /// Type 7.
    CloseChannel(CloseChannel),
    /// Type 8, with the range bytes that follow the fixed part in this message.
    GpadlHeader(GpadlHeader, &'a [u8]),
    /// Type 9, with the page-number bytes that follow the fixed part.
    GpadlBody(GpadlBody, &'a [u8]),
    /// Type 10.
    GpadlCreated(GpadlCreated),
    /// Type 11.
    GpadlTeardown(GpadlTeardown),
    /// Type 12.
    GpadlTorndown(GpadlTorndown),
    /// Type 13.
    RelIdReleased(RelIdReleased),
    /// Type 14.
    InitiateContact(InitiateContact),
    /// Type 15. A 9-byte pre-Win8 answer is widened with zero for the newer fields.
    VersionResponse(VersionResponse),
    /// Type 16.
    Unload,
    /// Type 17.
    UnloadResponse,
    /// Type 21.
    TlConnectRequest(TlConnectRequest),
    /// Type 22.
    ModifyChannel(ModifyChannel),
    /// Type 24.
    ModifyChannelResponse(ModifyChannelResponse),
    /// Any other type (including 18-20 and 23), with the bytes after the header.
    Other(MessageHeader, &'a [u8]),
}

fn read<T: FromBytes>(bytes: &[u8], message_type: MessageType) -> Result<T, ParseError> {
    T::read_from_prefix(bytes)
        .map(|(v, _)| v)
        .map_err(|_| ParseError::TooShort {
            message_type,
            needed: size_of::<T>(),
            len: bytes.len(),
        })
}

impl<'a> Message<'a> {
    /// Parses a whole channel message (header included). Bounded and panic-free on any input.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ParseError> {
        let (header, _) = parse_message(bytes)?;
        let t = header.message_type;
        Ok(match t {
            MessageType::OFFER_CHANNEL => Message::OfferChannel(read(bytes, t)?),
            MessageType::RESCIND_CHANNEL_OFFER => Message::RescindChannelOffer(read(bytes, t)?),
            MessageType::REQUEST_OFFERS => Message::RequestOffers,
            MessageType::ALL_OFFERS_DELIVERED => Message::AllOffersDelivered,
            MessageType::OPEN_CHANNEL => Message::OpenChannel(read(bytes, t)?),
            MessageType::OPEN_CHANNEL_RESULT => Message::OpenResult(read(bytes, t)?),
            MessageType::CLOSE_CHANNEL => Message::CloseChannel(read(bytes, t)?),
            MessageType::GPADL_HEADER => {
                let h = read(bytes, t)?;
                Message::GpadlHeader(h, &bytes[size_of::<GpadlHeader>()..])
            }
            MessageType::GPADL_BODY => {
                let b = read(bytes, t)?;
                Message::GpadlBody(b, &bytes[size_of::<GpadlBody>()..])
            }
            MessageType::GPADL_CREATED => Message::GpadlCreated(read(bytes, t)?),
            MessageType::GPADL_TEARDOWN => Message::GpadlTeardown(read(bytes, t)?),
            MessageType::GPADL_TORNDOWN => Message::GpadlTorndown(read(bytes, t)?),
            MessageType::RELID_RELEASED => Message::RelIdReleased(read(bytes, t)?),
            MessageType::INITIATE_CONTACT => Message::InitiateContact(read(bytes, t)?),
            MessageType::VERSION_RESPONSE => {
                if bytes.len() >= size_of::<VersionResponse>() {
                    Message::VersionResponse(read(bytes, t)?)
                } else {
                    let old: VersionSupported = read(bytes, t)?;
                    Message::VersionResponse(VersionResponse {
                        header: old.header,
                        version_supported: old.version_supported,
                        ..Default::default()
                    })
                }
            }
            MessageType::UNLOAD => Message::Unload,
            MessageType::UNLOAD_RESPONSE => Message::UnloadResponse,
            MessageType::TL_CONNECT_REQUEST => Message::TlConnectRequest(read(bytes, t)?),
            MessageType::MODIFY_CHANNEL => Message::ModifyChannel(read(bytes, t)?),
            MessageType::MODIFY_CHANNEL_RESPONSE => Message::ModifyChannelResponse(read(bytes, t)?),
            _ => Message::Other(header, &bytes[size_of::<MessageHeader>()..]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use zerocopy::FromZeros;

    #[test]
    fn guid_round_trip_and_layout() {
        let g: Guid = "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f".parse().unwrap();
        assert_eq!(g, Guid::SCSI);
        assert_eq!(g.to_string(), "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f");
        // Mixed endian: first three groups little-endian, the rest in order.
        assert_eq!(
            g.as_bytes(),
            &[
                0xd9, 0x63, 0x61, 0xba, 0xa1, 0x04, 0x29, 0x4d, 0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1,
                0xdc, 0x7f
            ]
        );
        assert_eq!(
            Guid::parse("{F8615163-DF3E-46C5-913F-F2D2F965ED0E}").unwrap(),
            Guid::NETWORK
        );
        assert_eq!(
            Guid::IDE.to_string(),
            "32412632-86cb-44a2-9b5c-50d1417354f5"
        );
        assert!(Guid::parse("ba6163d9-04a1-4d29-b605-72e2ffb1dc7").is_err());
        assert!(Guid::parse("ba6163d9x04a1-4d29-b605-72e2ffb1dc7f").is_err());
        assert!(Guid::parse("ba6163d9-04a1-4d29-b605-72e2ffb1dc7g").is_err());
    }

    #[test]
    fn version_parts() {
        assert_eq!(VmbusVersion::WIN8.major(), 2);
        assert_eq!(VmbusVersion::WIN8.minor(), 4);
        assert_eq!(VmbusVersion::new(5, 3), VmbusVersion::IRON);
        assert_eq!(VmbusVersion::COPPER.0, 0x60000);
        assert_eq!(VmbusVersion::WIN10_RS3.initiate_contact_connection_id(), 1);
        assert_eq!(VmbusVersion::WIN10_V5.initiate_contact_connection_id(), 4);
    }

    #[test]
    fn offer_bits_and_bytes() {
        let mut o = OfferChannel::new_zeroed();
        o.header = MessageHeader::new(MessageType::OFFER_CHANNEL);
        o.offer.interface_type = Guid::SCSI;
        o.child_relid = 0x0102_0304;
        o.monitor_id = 7;
        o.set_monitor_allocated(true);
        o.set_dedicated_interrupt(true);
        o.connection_id = 0x11;
        let b = o.as_bytes();
        assert_eq!(b.len(), 196);
        assert_eq!(b[0], 1);
        assert_eq!(&b[8..24], Guid::SCSI.as_bytes());
        assert_eq!(b[184..188], [4, 3, 2, 1]);
        assert_eq!(b[188], 7);
        assert_eq!(b[189], 1);
        assert_eq!(b[190..192], [1, 0]);
        assert_eq!(b[192..196], [0x11, 0, 0, 0]);
        let back = OfferChannel::read_from_bytes(b).unwrap();
        assert_eq!(back, o);
        assert!(back.monitor_allocated() && back.is_dedicated_interrupt());
        let mut c = back;
        c.set_monitor_allocated(false);
        assert!(!c.monitor_allocated());
        assert!(matches!(Message::parse(b).unwrap(), Message::OfferChannel(x) if x == o));
    }

    #[test]
    fn initiate_contact_union() {
        let mut m = InitiateContact {
            header: MessageHeader::new(MessageType::INITIATE_CONTACT),
            vmbus_version_requested: VmbusVersion::IRON.0,
            ..Default::default()
        };
        m.set_target_info(2, 0, 0xA5);
        let b = m.as_bytes();
        assert_eq!(b[16..24], [2, 0, 0, 0, 0xA5, 0, 0, 0]);
        assert_eq!((m.msg_sint(), m.msg_vtl(), m.feature_flags()), (2, 0, 0xA5));
        assert_eq!(Message::parse(b).unwrap(), Message::InitiateContact(m));
    }

    #[test]
    fn gpadl_header_with_ranges() {
        let h = GpadlHeader {
            header: MessageHeader::new(MessageType::GPADL_HEADER),
            child_relid: 3,
            gpadl: 9,
            range_buflen: 24,
            range_count: 1,
        };
        let mut msg = h.as_bytes().to_vec();
        msg.extend_from_slice(&[0u8; 24]);
        match Message::parse(&msg).unwrap() {
            Message::GpadlHeader(p, rest) => {
                assert_eq!(p, h);
                assert_eq!(rest.len(), 24);
            }
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn short_and_long_messages() {
        assert!(matches!(
            parse_message(&[1, 0, 0]),
            Err(ParseError::TooShort { .. })
        ));
        assert!(matches!(
            parse_message(&[0; 241]),
            Err(ParseError::TooLong { len: 241 })
        ));
        let h = MessageHeader::new(MessageType::OPEN_CHANNEL);
        assert!(matches!(
            Message::parse(h.as_bytes()),
            Err(ParseError::TooShort {
                needed: 148,
                len: 8,
                ..
            })
        ));
        let old = VersionSupported {
            header: MessageHeader::new(MessageType::VERSION_RESPONSE),
            version_supported: 1,
        };
        assert!(matches!(
            Message::parse(old.as_bytes()).unwrap(),
            Message::VersionResponse(VersionResponse {
                version_supported: 1,
                msg_conn_id: 0,
                ..
            })
        ));
        let other = MessageHeader::new(MessageType::TL_CONNECT_RESULT);
        assert!(matches!(
            Message::parse(other.as_bytes()).unwrap(),
            Message::Other(_, [])
        ));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Message::parse(&bytes);
        }

        #[test]
        fn parse_known_types(t in 0u32..26, tail in proptest::collection::vec(any::<u8>(), 0..232)) {
            let mut bytes = MessageHeader::new(MessageType(t)).as_bytes().to_vec();
            bytes.extend_from_slice(&tail);
            let _ = Message::parse(&bytes);
        }

        #[test]
        fn guid_text_round_trip(b in any::<[u8; 16]>()) {
            let g = Guid(b);
            prop_assert_eq!(Guid::parse(&g.to_string()).unwrap(), g);
        }
    }
}
