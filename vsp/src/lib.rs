//! The host side of the VMBus stack (the VSPs).
//!
//! - [`server`]: the VMBus server, the channel state machine (versions, offers, GPADLs,
//!   open/close, rescind, unload, modify channel), free of I/O.
//! - [`session`]: one partition's session on the partition socket: guest memory, the SynIC
//!   ([`synic`]), the server, and a worker thread per open channel ([`channel`]).
//! - [`daemon`]: the listening socket and the session threads; [`config`]: what `vspd` offers.
//!
//! - [`storvsp`]: the storvsc protocol's host side, over [`scsi`] (the SCSI disk emulation) and
//!   [`disk`] (io_uring on the image file or block device); [`devices`]: the device behind each
//!   offer.
//!
//! Not filled in yet: netvsp (NVSP and RNDIS on TAP); until it exists, network channels open
//! and their packets are discarded with a warning. See `docs/ARCHITECTURE.md`.

pub mod channel;
pub mod config;
pub mod daemon;
pub mod devices;
pub mod disk;
pub mod netvsp;
pub mod scsi;
pub mod server;
pub mod session;
pub mod storvsp;
pub mod synic;

/// Errors of the host side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// A ring or shared-memory operation failed.
    #[error("ring or shared memory")]
    Ring(#[from] ringbuf::Error),
    /// A socket operation failed.
    #[error("socket operation failed")]
    Socket(#[source] rustix::io::Errno),
    /// A thread could not be started.
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    /// No offer has this relid.
    #[error("no offer has relid {0}")]
    UnknownRelid(u32),
    /// The offer is already rescinded; the guest has not released it yet.
    #[error("offer {0} is already rescinded")]
    AlreadyRescinded(u32),
    /// Every relid the SynIC event flags can name is in use.
    #[error("all {} relids are in use", server::RELID_LIMIT - 1)]
    TooManyOffers,
    /// A channel's ring GPADL is too small for its two rings.
    #[error("the ring buffer is too small for two rings")]
    RingTooSmall,
    /// A disk image or device could not be opened or inspected.
    #[error("cannot open disk {}", path.display())]
    DiskOpen {
        /// The path given.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Setting up, registering with or entering an io_uring failed.
    #[error("io_uring operation failed")]
    Uring(#[source] std::io::Error),
    /// A disk request reaches past the end of the disk.
    #[error("{len} bytes at offset {offset:#x} are outside the disk of {size} bytes")]
    DiskRange {
        /// Offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the disk.
        size: u64,
    },
    /// A request would change a read-only disk.
    #[error("the disk is read-only")]
    DiskReadOnly,
    /// Every slot of the disk queue is in flight.
    #[error("the disk queue is full")]
    DiskQueueFull,
    /// A disk request is malformed or not supported.
    #[error("invalid disk request: {0}")]
    DiskRequest(&'static str),
    /// The network backend (TAP) failed.
    #[error("network backend")]
    Net(#[source] netdev::Error),
    /// A disk request's buffer is not guest memory.
    #[error("disk request buffer")]
    DiskBuffer(#[source] ringbuf::Error),
}
