//! The guest side of the VMBus stack (the VSCs).
//!
//! Not filled in yet. It will hold: the VMBus client (version negotiation, offers, GPADLs,
//! open/close, rescind, unload); the storvsc client with its NBD export; the netvsc client with
//! its TAP export; the loopback front end (a host process playing the guest over the partition
//! socket); and the `vscd` binary. See `docs/ARCHITECTURE.md`.
