//! The host side of the VMBus stack (the VSPs).
//!
//! Not filled in yet. It will hold: the VMBus server (the channel state machine: versions,
//! offers, GPADLs, open/close, rescind, unload, modify channel); storvsp (a SCSI target on
//! io_uring); netvsp (NVSP and RNDIS on TAP); and the `vspd` daemon (configuration, the event
//! loop, the partition socket). The `vmbus-demo` binary lives here too. See
//! `docs/ARCHITECTURE.md`.
