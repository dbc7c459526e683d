//! The VMBus ring buffer over shared memory, byte-compatible with Linux's
//! `drivers/hv/ring_buffer.c`, and hardened against a hostile peer.
//!
//! - [`shmem`]: the one audited primitive for shared memory ([`Mapping`]).
//! - [`ring`]: a ring (control page and data area) and its two halves, [`OutgoingRing`] (the
//!   writer) and [`IncomingRing`] (the reader), with two-phase commit: packets are written or
//!   read against a private index, and `commit` publishes a whole batch with one index update
//!   and one signal decision.
//! - [`signal`]: the signalling rules (interrupt mask, pending send size, the drain loop's
//!   unmask-and-recheck), written once over an abstract control page so that the loom model
//!   checks the very code the ring runs.
//! - [`packet`]: parsing and validation of packets (in-band, completion, transfer pages, GPA
//!   direct) from the reader's local copy.
//! - [`latency`]: per-hop latency histograms (the latency breakdown of vspd and vscd).
//! - [`poller`]: how long a consumer polls before it sleeps (time-adaptive).
//! - [`event`]: eventfd-based signals, and [`pair`]: two rings in one memfd, as two processes
//!   share them.
//!
//! Every index, offset, length and range count read from shared memory is validated once,
//! from a local copy. A corrupt peer produces an [`Error`], never a panic and never an access
//! outside the ring.

pub mod event;
pub mod guestmem;
pub mod kick;
pub mod latency;
pub mod packet;
pub mod pair;
pub mod poller;
pub mod ring;
pub mod sandbox;
pub mod shmem;
pub mod signal;
pub mod socket;
pub mod traffic;

pub use event::Event;
pub use packet::{OutgoingPacket, Packet, PacketKind};
pub use ring::{IncomingRing, OutgoingRing, Ring};
pub use shmem::Mapping;

/// Errors of the ring buffer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A mapping of zero bytes was asked for.
    #[error("cannot map zero bytes")]
    EmptyMapping,
    /// mmap, memfd or ftruncate failed.
    #[error("mapping shared memory failed")]
    Map(#[source] rustix::io::Errno),
    /// An access outside a mapping (a bug in the caller's arithmetic, caught).
    #[error("access of {len} bytes at offset {offset:#x} is outside the mapping")]
    OutOfBounds {
        /// Offset of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
    },
    /// An atomic access at an unaligned offset.
    #[error("atomic access at unaligned offset {offset:#x}")]
    Misaligned {
        /// Offset of the access.
        offset: usize,
    },
    /// The ring's size is not a control page plus a non-zero multiple of 4 KiB inside the
    /// mapping.
    #[error("a ring of {0} bytes is not a control page plus a non-empty multiple of 4096 bytes inside the mapping")]
    RingSize(usize),
    /// The peer published an index outside the data area or not a multiple of 8.
    #[error("the peer's {which:?} {value:#x} is invalid")]
    BadIndex {
        /// Which index.
        which: signal::Word,
        /// Its value.
        value: u32,
    },
    /// The peer wrote a malformed packet.
    #[error("malformed packet at ring offset {offset:#x}: {reason}")]
    BadPacket {
        /// Offset of the packet's descriptor in the data area.
        offset: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The packet does not fit in the ring now.
    #[error("ring full: the packet needs {needed} bytes, {writable} are writable")]
    Full {
        /// Bytes the packet needs, trailer included.
        needed: u32,
        /// Bytes writable now.
        writable: u32,
    },
    /// The packet can never fit in this ring or be described by a descriptor.
    #[error("packet too large for the ring")]
    TooLarge,
    /// A packet header that is not a multiple of 8 bytes.
    #[error("packet header length is not a multiple of 8")]
    Unaligned,
    /// A guest memory region that is unaligned, empty, or overlaps another.
    #[error(
        "guest memory region of {len:#x} bytes at {gpa:#x} is unaligned, empty or overlapping"
    )]
    GuestRegion {
        /// Guest-physical address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A guest-physical range that is not (wholly, in one region) guest memory.
    #[error("guest-physical range of {len:#x} bytes at {gpa:#x} is not guest memory")]
    GuestAddress {
        /// Guest-physical address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A socket operation failed.
    #[error("socket operation failed")]
    Socket(#[source] rustix::io::Errno),
    /// A datagram (or its descriptors) did not fit the receive buffer.
    #[error("datagram truncated")]
    Truncated,
    /// More descriptors than one datagram may carry.
    #[error("{0} descriptors are more than one datagram may carry")]
    TooManyFds(usize),
    /// An eventfd operation failed.
    #[error("eventfd operation failed")]
    Event(#[source] rustix::io::Errno),
    /// A descriptor offered as shared memory that could shrink or vanish under the mapping
    /// (not a regular file, too short for the range, or a memfd without `F_SEAL_SHRINK`):
    /// mapping it would let the peer turn our accesses into SIGBUS.
    #[error("shared memory refused: {0}")]
    UnsafeSharedFile(&'static str),
    /// The seccomp filter could not be built or installed.
    #[error("installing the seccomp filter failed: {0}")]
    Sandbox(String),
    /// Mapping these pages would exceed the mapping budget (the kernel's `vm.max_map_count` is
    /// shared by the whole process, so a peer's scattered pages are paid for from a budget).
    #[error("mapping {wanted} pieces exceeds the budget ({available} left)")]
    MapBudget {
        /// Pieces (separate kernel mappings) the request needs.
        wanted: usize,
        /// Pieces still available.
        available: usize,
    },
}
