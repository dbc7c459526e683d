//! Network backends of the VMBus stack, shared by the host (vsp's netvsp) and the guest side
//! (vsc's netvsc client):
//!
//! - [`tap`]: a multi-queue TAP device whose frames carry a [`vnet::VirtioNetHdr`], read and
//!   written with scatter pieces that may lie in memory shared with a guest;
//! - [`vnet`]: that header;
//! - [`offload`]: a neutral description of a frame's offloads (checksum, LSO, VLAN, hash),
//!   converted to and from the virtio-net header and RNDIS per-packet info, with the fix-ups a
//!   large send from a Hyper-V guest needs before the kernel takes it as GSO.

pub mod offload;
pub mod tap;
pub mod vnet;

pub use offload::{ChecksumRequest, L4Protocol, Lso, RxOffload, TxOffload, TxPlan, Vlan};
pub use tap::{
    enter_new_netns, IoPiece, IoPieceMut, Link, LinkState, Shared, Tap, TapQueue, TunOffload,
};
pub use vnet::{VirtioNetHdr, VnetFlags, VNET_HDR_SIZE};

/// Errors of the network backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An interface name that is empty, too long or has forbidden characters.
    #[error("bad interface name {0:?}")]
    BadName(String),
    /// A queue count of zero or over the TAP's limit.
    #[error("bad TAP queue count {0}")]
    BadQueueCount(usize),
    /// An MTU the kernel cannot be given.
    #[error("bad MTU {0}")]
    BadMtu(u32),
    /// Opening `/dev/net/tun` failed.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    /// An ioctl failed.
    #[error("{0} failed")]
    Ioctl(&'static str, #[source] std::io::Error),
    /// Reading or writing a frame failed.
    #[error("TAP I/O failed")]
    Io(#[source] std::io::Error),
    /// More scatter pieces than one frame may have.
    #[error("{0} pieces for one frame")]
    TooManyPieces(usize),
    /// A piece lies outside the memory it names.
    #[error("frame piece outside its memory")]
    PieceOutOfBounds,
    /// A frame too short for its Ethernet header.
    #[error("frame of {0} bytes is too short")]
    Runt(usize),
    /// A frame too long for its IP length fields.
    #[error("frame of {0} bytes is too long")]
    TooLong(usize),
    /// A large send with an MSS of 0 (or over 65535).
    #[error("large send with MSS {0}")]
    BadMss(u32),
    /// An offload names a header offset at or past the end of the frame (or of the copied
    /// headers), or before the IP header.
    #[error("header offset {0} outside the frame")]
    HeaderOffset(usize),
    /// An offload for a frame that is not IPv4 or IPv6 (or whose IP header is malformed).
    #[error("offload requested for a frame that is not IP")]
    NotIp,
    /// A large send of a frame that is not TCP (or whose TCP header is malformed).
    #[error("large send of a frame that is not TCP")]
    NotTcp,
    /// A GSO frame of a kind this side does not segment.
    #[error("unsupported GSO type {0:#x}")]
    UnsupportedGso(u8),
}
