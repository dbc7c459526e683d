//! What the VMBus client needs from its hypervisor: the two hypercalls and the interrupts.
//!
//! A front end (the loopback front end here; inside a real guest, the kernel's SynIC) implements
//! [`HostInterface`]; the client never knows which it runs on.

use std::sync::mpsc::Receiver;

use ringbuf::Event;

use crate::Error;

/// The hypercalls and interrupt plumbing a VMBus client uses.
pub trait HostInterface: Send + Sync {
    /// HvPostMessage: posts a channel message (at most 240 bytes) to `connection_id`.
    fn post_message(&self, connection_id: u32, payload: &[u8]) -> Result<(), Error>;
    /// HvSignalEvent: signals the host on `connection_id`.
    fn signal_event(&self, connection_id: u32) -> Result<(), Error>;
    /// Routes the interrupts of channel `relid` (its event flag) to `event`; `None` stops.
    /// Returns the VP the channel's open must name as its target: a front end may give a
    /// channel a VP of its own whose interrupt line is `event` itself, so that the host wakes
    /// the channel's thread with no dispatching thread between (0 otherwise).
    fn set_channel_interrupt(&self, relid: u32, event: Option<Event>) -> u32;
    /// Whether the host is still there (a loopback front end's daemon can go away).
    fn host_alive(&self) -> bool {
        true
    }
    /// The host session the front end is in: a front end that reconnects to a restarted host
    /// starts a new one, and channels opened in an earlier session are dead.
    fn session(&self) -> u64 {
        0
    }
}

/// The messages the host delivered to the VMBus SINT, in order.
pub type MessageStream = Receiver<Vec<u8>>;
