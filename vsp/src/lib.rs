//! The host side of the VMBus stack (the VSPs).
//!
//! - [`server`]: the VMBus server, the channel state machine (versions, offers, GPADLs,
//!   open/close, rescind, unload, modify channel), free of I/O.
//! - [`session`]: one partition's session on the partition socket: guest memory, the SynIC
//!   ([`synic`]), the server, and a worker thread per open channel ([`channel`]).
//! - [`daemon`]: the listening socket and the session threads; [`config`]: what `vspd` offers.
//!
//! Not filled in yet: storvsp (a SCSI target on io_uring) and netvsp (NVSP and RNDIS on TAP);
//! until they exist, their channels open and their packets are discarded with a warning. See
//! `docs/ARCHITECTURE.md`.

pub mod channel;
pub mod config;
pub mod daemon;
pub mod server;
pub mod session;
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
}
