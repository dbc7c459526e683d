//! The virtio-net header a TAP opened with `IFF_VNET_HDR` puts before every frame it reads and
//! expects before every frame written to it (`struct virtio_net_hdr_v1`, 12 bytes; the TAP is
//! told that size with `TUNSETVNETHDRSZ`). Multi-byte fields are little-endian: the TAP uses the
//! host's byte order, and this crate only builds for little-endian hosts (checked below).

use zerocopy::byteorder::little_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

#[cfg(not(target_endian = "little"))]
compile_error!(
    "the TAP's virtio-net header is in host byte order; only little-endian hosts are supported"
);

bitflags::bitflags! {
    /// `flags` of [`VirtioNetHdr`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct VnetFlags: u8 {
        /// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum from `csum_start` to the end, stored at
        /// `csum_start + csum_offset`, is still to be computed (the field holds the
        /// pseudo-header sum).
        const NEEDS_CSUM = 1;
        /// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was verified.
        const DATA_VALID = 2;
        /// `VIRTIO_NET_HDR_F_RSC_INFO`.
        const RSC_INFO = 4;
    }
}

/// `gso_type` of [`VirtioNetHdr`] (`VIRTIO_NET_HDR_GSO_*`), without the ECN bit.
pub mod gso {
    /// Not a GSO frame.
    pub const NONE: u8 = 0;
    /// TCP over IPv4.
    pub const TCPV4: u8 = 1;
    /// UDP fragmentation offload.
    pub const UDP: u8 = 3;
    /// TCP over IPv6.
    pub const TCPV6: u8 = 4;
    /// UDP segmentation (USO).
    pub const UDP_L4: u8 = 5;
    /// Bit: the TCP frame has ECN CWR set.
    pub const ECN: u8 = 0x80;
}

/// `struct virtio_net_hdr_v1`.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VirtioNetHdr {
    /// [`VnetFlags`] bits.
    pub flags: u8,
    /// One of [`gso`].
    pub gso_type: u8,
    /// Bytes of headers (Ethernet to TCP) in a GSO frame.
    pub hdr_len: U16,
    /// Segment payload size of a GSO frame (the MSS).
    pub gso_size: U16,
    /// Where checksumming starts (with `NEEDS_CSUM`).
    pub csum_start: U16,
    /// Where, from `csum_start`, the checksum goes.
    pub csum_offset: U16,
    /// Merged receive buffers (unused by TAP).
    pub num_buffers: U16,
}
const _: () = assert!(size_of::<VirtioNetHdr>() == 12);

/// Bytes of [`VirtioNetHdr`]: the size given to `TUNSETVNETHDRSZ`.
pub const VNET_HDR_SIZE: usize = size_of::<VirtioNetHdr>();

impl VirtioNetHdr {
    /// The known flag bits (unknown ones dropped).
    pub fn flags(&self) -> VnetFlags {
        VnetFlags::from_bits_truncate(self.flags)
    }
}
