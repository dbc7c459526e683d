//! The guest side of the VMBus stack (the VSCs).
//!
//! - [`client`]: the VMBus client (version negotiation, offers, GPADLs, open/close, rescind,
//!   unload), over a [`synic::HostInterface`].
//! - [`loopback`]: the loopback front end, a host process playing the guest on `vspd`'s
//!   partition socket: guest RAM in a memfd, SIMP/SIEFP pages inside it, an eventfd as its
//!   interrupt line.
//! - [`channel`]: the guest's end of an open channel; [`guest`]: a loopback guest with its
//!   disks attached.
//! - [`queue`]: the queue loop every client's channels run on (a thread per channel: its ring,
//!   the [`queue::QueueSource`]s that feed it, polling, then sleeping on mio).
//! - [`storvsc`]: the storvsc client: a `Controller` with a queue per channel and a `Disk` per
//!   LUN.
//! - [`nbd`]: an NBD server; [`export`]: `Disk` as its block device; [`nbdclient`]: a small
//!   NBD client for the demo and tests.
//! - The `vscd` binary: attaches to a running `vspd`, lists the offers it sees (`--list`) or
//!   exports every disk over NBD (`--nbd PATH`).
//!
//! Not filled in yet: the netvsc client with its TAP export. See `docs/ARCHITECTURE.md`.

pub mod channel;
pub mod client;
pub mod export;
pub mod guest;
pub mod loopback;
pub mod nbd;
pub mod nbdclient;
pub mod netvsc;
pub mod queue;
pub mod storvsc;
pub mod synic;

/// Errors of the guest side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A ring, shared-memory or socket operation failed.
    #[error("ring, shared memory or socket")]
    Ring(#[from] ringbuf::Error),
    /// The daemon sent something that is not the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The daemon refused a request.
    #[error("refused: {0}")]
    Refused(String),
    /// The connection to the daemon is gone.
    #[error("the host went away")]
    Disconnected,
    /// No answer in time.
    #[error("timed out waiting for the host")]
    Timeout,
    /// The host answered with a failure status.
    #[error("{what} failed with status {status:#x}")]
    Status {
        /// What failed.
        what: &'static str,
        /// The status the host gave.
        status: u32,
    },
    /// A GPADL larger than the protocol can describe.
    #[error("GPADL too large")]
    GpadlTooLarge,
    /// Guest memory is exhausted.
    #[error("out of guest memory ({0} pages wanted)")]
    OutOfGuestMemory(usize),
    /// A thread could not be started.
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    /// An NBD server's configuration is unusable (no exports, duplicate names, a live socket...).
    #[error("NBD server: {0}")]
    NbdConfig(String),
    /// An NBD server's socket operation failed.
    #[error("NBD server: {what}")]
    NbdIo {
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}
