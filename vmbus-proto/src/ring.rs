//! Ring packets: the descriptor every packet starts with, the type-specific headers of
//! transfer-page and GPA-direct packets, and the ring control page's word offsets.
//!
//! Layout (Linux `include/linux/hyperv.h`, `struct vmpacket_descriptor` and friends): a packet is
//! a 16-byte [`PacketDescriptor`], then a type-specific header, then the payload, padded to
//! 8 bytes, then an 8-byte trailer whose upper 32 bits hold the packet's start offset in the ring.
//! `data_offset8` and `length8` count 8-byte units from the start of the descriptor.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

open_enum! {
    /// `enum vmbus_packet_type`.
    pub enum PacketType: u16 {
        /// Invalid.
        INVALID = 0,
        /// Synch.
        SYNCH = 1,
        /// Add a transfer page set.
        ADD_XFER_PAGESET = 2,
        /// Remove a transfer page set.
        RM_XFER_PAGESET = 3,
        /// Establish a GPADL.
        ESTABLISH_GPADL = 4,
        /// Tear down a GPADL.
        TEARDOWN_GPADL = 5,
        /// In-band data: the payload is inside the packet.
        DATA_INBAND = 6,
        /// Data in transfer pages (ranges of a buffer the receiver registered).
        DATA_USING_XFER_PAGES = 7,
        /// Data in a GPADL.
        DATA_USING_GPADL = 8,
        /// Data in guest physical pages listed in the packet.
        DATA_USING_GPA_DIRECT = 9,
        /// Cancel a request.
        CANCEL_REQUEST = 10,
        /// A completion.
        COMP = 11,
        /// Data using an additional packet.
        DATA_USING_ADDITIONAL_PKT = 12,
        /// Additional data.
        ADDITIONAL_DATA = 13,
    }
}

/// Descriptor flag: the sender asks for a completion packet with the same transaction id.
pub const PACKET_FLAG_COMPLETION_REQUESTED: u16 = 1;

/// Size of the trailer that follows every packet.
pub const PACKET_TRAILER_SIZE: usize = 8;

/// Size of a page as VMBus counts them (page frame numbers are in these units).
pub const PAGE_SIZE: usize = 4096;

/// `struct vmpacket_descriptor`: the first 16 bytes of every ring packet.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct PacketDescriptor {
    /// The packet type.
    pub packet_type: PacketType,
    /// Offset of the payload from the descriptor's start, in 8-byte units.
    pub data_offset8: u16,
    /// Length of the packet (descriptor, header and padded payload; no trailer), in 8-byte units.
    pub length8: u16,
    /// Flags, see [`PACKET_FLAG_COMPLETION_REQUESTED`].
    pub flags: u16,
    /// The transaction id a completion echoes.
    pub transaction_id: u64,
}
const _: () = assert!(size_of::<PacketDescriptor>() == 16);

/// The header that follows the descriptor of a transfer-page packet
/// (`struct vmtransfer_page_packet_header` less its descriptor).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct TransferPageHeader {
    /// The transfer page set (for netvsp: the receive buffer id).
    pub transfer_page_set_id: u16,
    /// Whether the sender owns the pages (unused by Linux).
    pub sender_owns_set: u8,
    /// Reserved.
    pub reserved: u8,
    /// Number of [`TransferPageRange`]s that follow.
    pub range_count: u32,
}
const _: () = assert!(size_of::<TransferPageHeader>() == 8);

/// One range of a transfer-page packet (`struct vmtransfer_page_range`).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct TransferPageRange {
    /// Length of the range in bytes.
    pub byte_count: u32,
    /// Offset of the range in the transfer page set.
    pub byte_offset: u32,
}
const _: () = assert!(size_of::<TransferPageRange>() == 8);

/// The header that follows the descriptor of a GPA-direct packet
/// (`struct vmbus_packet_mpb_array` less its descriptor and ranges).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct GpaDirectHeader {
    /// Reserved.
    pub reserved: u32,
    /// Number of ranges that follow.
    pub range_count: u32,
}
const _: () = assert!(size_of::<GpaDirectHeader>() == 8);

/// The fixed part of a GPA range (`struct gpa_range` / `struct hv_mpb_array`): followed by
/// `page_count(byte_offset, byte_count)` u64 page frame numbers.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct GpaRangeHeader {
    /// Length of the range in bytes.
    pub byte_count: u32,
    /// Offset of the range's start in its first page.
    pub byte_offset: u32,
}
const _: () = assert!(size_of::<GpaRangeHeader>() == 8);

impl GpaRangeHeader {
    /// The number of page frame numbers that follow this header: the pages that
    /// `byte_offset .. byte_offset + byte_count` touches. Zero-length ranges list no page.
    /// Computed in u64, so hostile values cannot overflow.
    pub fn page_count(&self) -> u64 {
        if self.byte_count == 0 {
            return 0;
        }
        let start = u64::from(self.byte_offset);
        let end = start + u64::from(self.byte_count);
        end.div_ceil(PAGE_SIZE as u64) - start / PAGE_SIZE as u64
    }
}

/// `struct hv_ring_buffer`: the 4096-byte control page at the start of each ring. Shared memory
/// is not read through this type (see the ring crate); it documents the layout and lets tests
/// check it.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct RingControlPage {
    /// Where the writer writes next.
    pub write_index: u32,
    /// Where the reader reads next.
    pub read_index: u32,
    /// Non-zero when the reader does not want to be signalled.
    pub interrupt_mask: u32,
    /// Bytes a blocked writer waits for.
    pub pending_send_size: u32,
    /// Reserved.
    pub reserved1: [u32; 12],
    /// Feature bits, see [`control::FEATURE_PENDING_SEND_SIZE`].
    pub feature_bits: u32,
    /// Reserved up to the end of the page.
    pub reserved2: [u8; 4028],
}
const _: () = assert!(size_of::<RingControlPage>() == control::SIZE);
const _: () =
    assert!(core::mem::offset_of!(RingControlPage, feature_bits) == control::FEATURE_BITS);

/// A GPA-direct packet with one range, as Linux's storvsc and netvsc build it
/// (`struct vmbus_packet_mpb_array`): descriptor, [`GpaDirectHeader`], then the first range's
/// [`GpaRangeHeader`]; its page numbers follow.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct GpaDirectPacketHeader {
    /// The descriptor.
    pub descriptor: PacketDescriptor,
    /// Reserved word and range count.
    pub header: GpaDirectHeader,
    /// The first range.
    pub range: GpaRangeHeader,
}
const _: () = assert!(size_of::<GpaDirectPacketHeader>() == 32);

/// Byte offsets of the words of a ring's control page (`struct hv_ring_buffer`).
pub mod control {
    /// `write_index`: where the writer writes next; owned by the writer.
    pub const WRITE_INDEX: usize = 0;
    /// `read_index`: where the reader reads next; owned by the reader.
    pub const READ_INDEX: usize = 4;
    /// `interrupt_mask`: non-zero when the reader does not want to be signalled.
    pub const INTERRUPT_MASK: usize = 8;
    /// `pending_send_sz`: bytes a blocked writer waits for; 0 when no writer waits.
    pub const PENDING_SEND_SIZE: usize = 12;
    /// `feature_bits`.
    pub const FEATURE_BITS: usize = 64;
    /// Feature bit 0: the ring honours `pending_send_sz`.
    pub const FEATURE_PENDING_SEND_SIZE: u32 = 1;
    /// Size of the control page; the data area starts here.
    pub const SIZE: usize = 4096;
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromBytes;

    #[test]
    fn descriptor_round_trip() {
        let d = PacketDescriptor {
            packet_type: PacketType::DATA_USING_GPA_DIRECT,
            data_offset8: 4,
            length8: 9,
            flags: PACKET_FLAG_COMPLETION_REQUESTED,
            transaction_id: 0x1122_3344_5566_7788,
        };
        let bytes = d.as_bytes();
        assert_eq!(bytes[0..2], [9, 0]);
        assert_eq!(bytes[8..16], 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(PacketDescriptor::read_from_bytes(bytes).unwrap(), d);
    }

    #[test]
    fn page_count_of_ranges() {
        let r = |byte_offset, byte_count| GpaRangeHeader {
            byte_count,
            byte_offset,
        };
        assert_eq!(r(0, 0).page_count(), 0);
        assert_eq!(r(0, 1).page_count(), 1);
        assert_eq!(r(0, 4096).page_count(), 1);
        assert_eq!(r(1, 4096).page_count(), 2);
        assert_eq!(r(4095, 2).page_count(), 2);
        assert_eq!(r(u32::MAX, u32::MAX).page_count(), 1_048_577);
    }
}
