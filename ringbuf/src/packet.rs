//! Ring packets: validation and parsing of a packet copied out of the ring, and the header
//! bytes of a packet to be written. No shared memory here: parsing works on the local copy.

use vmbus_proto::ring::{
    GpaDirectHeader, GpaRangeHeader, PacketDescriptor, PacketType, TransferPageHeader,
    TransferPageRange, PACKET_FLAG_COMPLETION_REQUESTED,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::Error;

/// Size of the trailer that follows every packet.
pub const TRAILER: usize = vmbus_proto::ring::PACKET_TRAILER_SIZE;

/// Size of the packet descriptor.
pub const DESCRIPTOR_SIZE: usize = size_of::<PacketDescriptor>();

/// A packet read from a ring: the validated descriptor fields and its parts, borrowed from the
/// reader's local copy.
#[derive(Debug, Clone, Copy)]
pub struct Packet<'a> {
    /// The packet type, as sent (unknown types are passed through with their payload).
    pub packet_type: PacketType,
    /// The transaction id.
    pub transaction_id: u64,
    /// The raw descriptor flags.
    pub flags: u16,
    /// The type-specific part.
    pub kind: PacketKind<'a>,
    /// The payload: from `data_offset8 * 8` to `length8 * 8`, so it includes the sender's padding
    /// to 8 bytes.
    pub payload: &'a [u8],
}

impl Packet<'_> {
    /// Whether the sender asked for a completion.
    pub fn completion_requested(&self) -> bool {
        self.flags & PACKET_FLAG_COMPLETION_REQUESTED != 0
    }
}

/// The type-specific part of a [`Packet`].
#[derive(Debug, Clone, Copy)]
pub enum PacketKind<'a> {
    /// An in-band data packet.
    InBand,
    /// A completion packet.
    Completion,
    /// A transfer-page packet: ranges of a buffer the receiver registered.
    TransferPages {
        /// The transfer page set id.
        set_id: u16,
        /// The ranges.
        ranges: &'a [TransferPageRange],
    },
    /// A GPA-direct packet: ranges of guest pages.
    GpaDirect(GpaRanges<'a>),
    /// Any other type: header bytes between the descriptor and the payload, uninterpreted.
    Other {
        /// Bytes between the descriptor and the payload.
        header: &'a [u8],
    },
}

/// The validated ranges of a GPA-direct packet. Iterating yields each range with its page list.
#[derive(Debug, Clone, Copy)]
pub struct GpaRanges<'a> {
    count: u32,
    bytes: &'a [u8],
}

impl<'a> GpaRanges<'a> {
    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether there is no range.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Iterates over the ranges.
    #[inline]
    pub fn iter(&self) -> GpaRangeIter<'a> {
        GpaRangeIter {
            remaining: self.count,
            bytes: self.bytes,
        }
    }

    fn validate(count: u32, mut bytes: &'a [u8]) -> Result<Self, &'static str> {
        let all = bytes;
        for _ in 0..count {
            let (h, rest) = GpaRangeHeader::read_from_prefix(bytes)
                .map_err(|_| "GPA range header truncated")?;
            let pfn_bytes = h
                .page_count()
                .checked_mul(8)
                .filter(|&n| n <= rest.len() as u64)
                .ok_or("GPA range page list truncated")? as usize;
            bytes = &rest[pfn_bytes..];
        }
        Ok(Self {
            count,
            bytes: &all[..all.len() - bytes.len()],
        })
    }
}

/// One GPA range: byte offset into its first page, byte count, and the page frame numbers.
#[derive(Debug, Clone, Copy)]
pub struct GpaRange<'a> {
    /// Offset of the range's start in its first page.
    pub byte_offset: u32,
    /// Length of the range in bytes.
    pub byte_count: u32,
    /// The page frame numbers, `page_count()` of them.
    pub pfns: &'a [zerocopy::little_endian::U64],
}

/// Iterator over [`GpaRanges`].
#[derive(Debug, Clone)]
pub struct GpaRangeIter<'a> {
    remaining: u32,
    bytes: &'a [u8],
}

impl<'a> Iterator for GpaRangeIter<'a> {
    type Item = GpaRange<'a>;

    #[inline]
    fn next(&mut self) -> Option<GpaRange<'a>> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        // Validated at construction: every header and page list is present.
        let (h, rest) = GpaRangeHeader::read_from_prefix(self.bytes).ok()?;
        let n = h.page_count() as usize;
        let (pfns, rest) =
            <[zerocopy::little_endian::U64]>::ref_from_prefix_with_elems(rest, n).ok()?;
        self.bytes = rest;
        Some(GpaRange {
            byte_offset: h.byte_offset,
            byte_count: h.byte_count,
            pfns,
        })
    }
}

/// Checks a descriptor read from the ring at a point where `available` bytes are published, and
/// returns the packet's length (without trailer). `available` counts from the descriptor.
#[inline]
pub(crate) fn check_descriptor(d: &PacketDescriptor, available: u32) -> Result<u32, &'static str> {
    let len = u32::from(d.length8) * 8;
    let offset = u32::from(d.data_offset8) * 8;
    if len < DESCRIPTOR_SIZE as u32 {
        return Err("packet shorter than its descriptor");
    }
    if offset < DESCRIPTOR_SIZE as u32 || offset > len {
        return Err("payload offset outside the packet");
    }
    if u64::from(len) + 8 > u64::from(available) {
        return Err("packet longer than the published data");
    }
    Ok(len)
}

/// Parses a packet from its local copy `bytes` (descriptor included, trailer excluded), whose
/// descriptor `d` has passed [`check_descriptor`] for `bytes.len()`.
#[inline]
pub(crate) fn parse<'a>(d: &PacketDescriptor, bytes: &'a [u8]) -> Result<Packet<'a>, &'static str> {
    let offset = usize::from(d.data_offset8) * 8;
    let header = &bytes[DESCRIPTOR_SIZE..offset];
    let payload = &bytes[offset..];
    let kind = match d.packet_type {
        PacketType::DATA_INBAND => PacketKind::InBand,
        PacketType::COMP => PacketKind::Completion,
        PacketType::DATA_USING_XFER_PAGES => {
            let (h, rest) = TransferPageHeader::read_from_prefix(header)
                .map_err(|_| "transfer-page header truncated")?;
            let count = h.range_count as usize;
            if count > rest.len() / size_of::<TransferPageRange>() {
                return Err("transfer-page ranges overrun the header area");
            }
            let (ranges, _) = <[TransferPageRange]>::ref_from_prefix_with_elems(rest, count)
                .map_err(|_| "transfer-page ranges misaligned")?;
            PacketKind::TransferPages {
                set_id: h.transfer_page_set_id,
                ranges,
            }
        }
        PacketType::DATA_USING_GPA_DIRECT => {
            let (h, rest) = GpaDirectHeader::read_from_prefix(header)
                .map_err(|_| "GPA-direct header truncated")?;
            PacketKind::GpaDirect(GpaRanges::validate(h.range_count, rest)?)
        }
        _ => PacketKind::Other { header },
    };
    Ok(Packet {
        packet_type: d.packet_type,
        transaction_id: d.transaction_id,
        flags: d.flags,
        kind,
        payload,
    })
}

/// A packet to write: its type-specific header and payload are given as byte slices.
#[derive(Debug, Clone, Copy)]
pub struct OutgoingPacket<'a> {
    /// The packet type.
    pub packet_type: PacketType,
    /// Descriptor flags.
    pub flags: u16,
    /// The transaction id.
    pub transaction_id: u64,
    /// The bytes between descriptor and payload (must be a multiple of 8 long).
    pub header: &'a [u8],
    /// The payload parts, written back to back and padded to 8 bytes.
    pub payload: &'a [&'a [u8]],
}

impl<'a> OutgoingPacket<'a> {
    /// An in-band packet.
    pub fn in_band(
        transaction_id: u64,
        completion_requested: bool,
        payload: &'a [&'a [u8]],
    ) -> Self {
        Self {
            packet_type: PacketType::DATA_INBAND,
            flags: if completion_requested {
                PACKET_FLAG_COMPLETION_REQUESTED
            } else {
                0
            },
            transaction_id,
            header: &[],
            payload,
        }
    }

    /// A completion packet.
    pub fn completion(transaction_id: u64, payload: &'a [&'a [u8]]) -> Self {
        Self {
            packet_type: PacketType::COMP,
            flags: 0,
            transaction_id,
            header: &[],
            payload,
        }
    }

    /// The payload's length in bytes, before padding.
    #[inline]
    pub fn payload_len(&self) -> usize {
        self.payload.iter().map(|p| p.len()).sum()
    }

    /// Length of the packet in the ring without trailer (descriptor, header, padded payload),
    /// or an error if it cannot be described by a descriptor.
    #[inline]
    pub fn ring_len(&self) -> Result<u32, Error> {
        if !self.header.len().is_multiple_of(8) {
            return Err(Error::Unaligned);
        }
        let len = (DESCRIPTOR_SIZE + self.header.len())
            .checked_add(self.payload_len())
            .map(|n| n.next_multiple_of(8))
            .filter(|&n| n / 8 <= usize::from(u16::MAX))
            .ok_or(Error::TooLarge)?;
        Ok(len as u32)
    }

    /// The descriptor for this packet.
    #[inline]
    pub(crate) fn descriptor(&self, len: u32) -> PacketDescriptor {
        PacketDescriptor {
            packet_type: self.packet_type,
            data_offset8: ((DESCRIPTOR_SIZE + self.header.len()) / 8) as u16,
            length8: (len / 8) as u16,
            flags: self.flags,
            transaction_id: self.transaction_id,
        }
    }
}

/// Builds the header bytes of a GPA-direct packet (after the descriptor) into `out`:
/// `GpaDirectHeader`, then each range's header and page numbers.
pub fn gpa_direct_header(out: &mut Vec<u8>, ranges: &[(u32, u32, &[u64])]) {
    out.clear();
    out.extend_from_slice(
        GpaDirectHeader {
            reserved: 0,
            range_count: ranges.len() as u32,
        }
        .as_bytes(),
    );
    for &(byte_offset, byte_count, pfns) in ranges {
        out.extend_from_slice(
            GpaRangeHeader {
                byte_count,
                byte_offset,
            }
            .as_bytes(),
        );
        for pfn in pfns {
            out.extend_from_slice(&pfn.to_le_bytes());
        }
    }
}

/// Builds the header bytes of a transfer-page packet (after the descriptor) into `out`.
pub fn transfer_page_header(out: &mut Vec<u8>, set_id: u16, ranges: &[TransferPageRange]) {
    out.clear();
    out.extend_from_slice(
        TransferPageHeader {
            transfer_page_set_id: set_id,
            sender_owns_set: 0,
            reserved: 0,
            range_count: ranges.len() as u32,
        }
        .as_bytes(),
    );
    out.extend_from_slice(ranges.as_bytes());
}

/// The number of pages a GPA range of `byte_count` bytes starting `byte_offset` into its first
/// page touches.
pub fn gpa_page_count(byte_offset: u32, byte_count: u32) -> usize {
    vmbus_proto::ring::GpaRangeHeader {
        byte_count,
        byte_offset,
    }
    .page_count() as usize
}
