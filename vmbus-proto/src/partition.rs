//! The partition socket: the one seam between the VSP daemon (`vspd`) and whoever plays a
//! guest's side (the KVM shim, or the loopback front end). See `docs/partition-socket.md`.
//!
//! A `SOCK_SEQPACKET` Unix socket: each datagram is one message, a [`Header`] and its body, at
//! most [`MAX_MESSAGE_SIZE`] bytes, with file descriptors attached (`SCM_RIGHTS`) where the
//! message kind says so. All integers are little-endian (the structs are `#[repr(C)]` on
//! x86-64 and have no padding).

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::synic::{HvPostMessageInput, MESSAGE_PAYLOAD_SIZE, VMBUS_POST_MESSAGE_TYPE};

/// The protocol version this crate describes.
pub const VERSION: u32 = 1;

/// The largest datagram either side sends.
pub const MAX_MESSAGE_SIZE: usize = 512;

/// The most file descriptors one message carries.
pub const MAX_FDS: usize = 2;

open_enum! {
    /// Message kinds. Front end to daemon below 100, daemon to front end from 100.
    pub enum Kind: u32 {
        /// Front end: opens the session (body [`Hello`]). Answered with [`Kind::HELLO_REPLY`].
        HELLO = 1,
        /// Front end: a region of guest memory (body [`AddMemory`], one fd: the memfd).
        /// Answered with [`Kind::STATUS`].
        ADD_MEMORY = 2,
        /// Front end: a VP's SynIC state (body [`SetVp`]; one optional fd: the irqfd that raises
        /// the VP's VMBus SINT vector, kept until replaced). Answered with [`Kind::STATUS`].
        SET_VP = 3,
        /// Front end: the guest called HvPostMessage (body [`PostMessage`]). No answer: the
        /// front end validated the hypercall; the daemon queues the message.
        POST_MESSAGE = 4,
        /// Front end: the guest wrote the EOM MSR on a VP (body [`Eom`]). No answer.
        EOM = 5,
        /// Front end: the guest called HvSignalEvent for a connection id that has no bound
        /// eventfd (body [`SignalEvent`]). No answer.
        SIGNAL_EVENT = 6,
        /// Daemon: answer to [`Kind::HELLO`] (body [`HelloReply`]).
        HELLO_REPLY = 101,
        /// Daemon: answer to a request (body [`Status`]).
        STATUS = 102,
        /// Daemon: a channel opened; signal the attached eventfd when the guest calls
        /// HvSignalEvent with this connection id (body [`ChannelSignal`], one fd).
        CHANNEL_SIGNAL = 103,
        /// Daemon: the channel closed; forget its eventfd (body [`ChannelSignal`], no fd).
        CHANNEL_SIGNAL_REMOVED = 104,
    }
}

/// Every message starts with this.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Header {
    /// What follows.
    pub kind: Kind,
    /// Length of the body in bytes.
    pub body_len: u32,
}
const _: () = assert!(size_of::<Header>() == 8);

/// Body of [`Kind::HELLO`].
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Hello {
    /// The protocol version the front end speaks ([`VERSION`]).
    pub version: u32,
    /// Number of virtual processors (1 to [`MAX_VPS`]).
    pub vp_count: u32,
}
const _: () = assert!(size_of::<Hello>() == 8);

/// The most VPs a partition may have.
pub const MAX_VPS: u32 = 256;

/// Body of [`Kind::HELLO_REPLY`].
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HelloReply {
    /// The protocol version the daemon will speak; 0 if it refuses the session.
    pub version: u32,
    /// [`status`] code.
    pub status: u32,
}
const _: () = assert!(size_of::<HelloReply>() == 8);

/// Body of [`Kind::ADD_MEMORY`].
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct AddMemory {
    /// Guest-physical address of the region (page aligned).
    pub gpa: u64,
    /// Length in bytes (page aligned).
    pub len: u64,
    /// Offset of the region in the attached fd (page aligned).
    pub fd_offset: u64,
}
const _: () = assert!(size_of::<AddMemory>() == 24);

/// Body of [`Kind::SET_VP`].
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SetVp {
    /// The VP index.
    pub vp: u32,
    /// [`vp_flags`].
    pub flags: u32,
    /// Guest-physical address of the SIMP page (valid with [`vp_flags::SIMP_ENABLED`]).
    pub simp_gpa: u64,
    /// Guest-physical address of the SIEFP page (valid with [`vp_flags::SIEFP_ENABLED`]).
    pub siefp_gpa: u64,
}
const _: () = assert!(size_of::<SetVp>() == 24);

/// Flags of [`SetVp`].
pub mod vp_flags {
    /// The SIMP (message page) is enabled.
    pub const SIMP_ENABLED: u32 = 1;
    /// The SIEFP (event flags page) is enabled.
    pub const SIEFP_ENABLED: u32 = 2;
    /// The VMBus SINT is masked: queue, do not deliver.
    pub const SINT_MASKED: u32 = 4;
}

/// Body of [`Kind::POST_MESSAGE`].
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PostMessage {
    /// The VP that made the call.
    pub vp: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// The hypercall's input page, as the guest wrote it.
    pub input: HvPostMessageInput,
}
const _: () = assert!(size_of::<PostMessage>() == 264);

impl PostMessage {
    /// The HvPostMessage of VMBus channel message `payload` on `connection_id` by `vp`, as a
    /// front end forwards it; `None` if the payload is longer than a message slot holds.
    pub fn vmbus(vp: u32, connection_id: u32, payload: &[u8]) -> Option<Self> {
        if payload.len() > MESSAGE_PAYLOAD_SIZE {
            return None;
        }
        let mut input = HvPostMessageInput::new_zeroed();
        input.connection_id = connection_id;
        input.message_type = VMBUS_POST_MESSAGE_TYPE;
        input.payload_size = payload.len() as u32;
        input.payload[..payload.len()].copy_from_slice(payload);
        Some(Self {
            vp,
            reserved: 0,
            input,
        })
    }
}

/// Body of [`Kind::EOM`].
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Eom {
    /// The VP that wrote the EOM MSR.
    pub vp: u32,
    /// Reserved, zero.
    pub reserved: u32,
}
const _: () = assert!(size_of::<Eom>() == 8);

/// Body of [`Kind::SIGNAL_EVENT`].
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SignalEvent {
    /// The connection id the guest signalled.
    pub connection_id: u32,
    /// The flag number (0 for VMBus channels).
    pub flag_number: u32,
}
const _: () = assert!(size_of::<SignalEvent>() == 8);

/// Body of [`Kind::STATUS`].
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Status {
    /// The kind of the request this answers.
    pub request: Kind,
    /// [`status`] code.
    pub status: u32,
}
const _: () = assert!(size_of::<Status>() == 8);

/// Status codes.
pub mod status {
    /// Done.
    pub const OK: u32 = 0;
    /// The request was malformed (wrong length, missing or extra fds).
    pub const MALFORMED: u32 = 1;
    /// The request is not valid now (e.g. before HELLO).
    pub const BAD_STATE: u32 = 2;
    /// The protocol version is not spoken.
    pub const BAD_VERSION: u32 = 3;
    /// A memory region was refused (unaligned, overlapping, too large, not mappable).
    pub const BAD_MEMORY: u32 = 4;
    /// A VP index out of range, or a SynIC page outside guest memory.
    pub const BAD_VP: u32 = 5;
}

/// Body of [`Kind::CHANNEL_SIGNAL`] and [`Kind::CHANNEL_SIGNAL_REMOVED`].
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ChannelSignal {
    /// The connection id the guest signals the channel with.
    pub connection_id: u32,
    /// The channel's relid (for logs).
    pub relid: u32,
}
const _: () = assert!(size_of::<ChannelSignal>() == 8);

/// Why a partition message could not be parsed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than a header, or than the header says.
    Truncated,
    /// Longer than [`MAX_MESSAGE_SIZE`].
    TooLong,
    /// The body length does not match the kind's body.
    BadLength {
        /// The kind.
        kind: Kind,
    },
}

impl core::fmt::Display for ParseError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ParseError::Truncated => f.write_str("partition message truncated"),
            ParseError::TooLong => f.write_str("partition message too long"),
            ParseError::BadLength { kind } => write!(f, "{kind:?} message has the wrong length"),
        }
    }
}

impl core::error::Error for ParseError {}

/// Splits a datagram into its header and body, checking the body length against the header.
pub fn split(datagram: &[u8]) -> Result<(Kind, &[u8]), ParseError> {
    if datagram.len() > MAX_MESSAGE_SIZE {
        return Err(ParseError::TooLong);
    }
    let (h, body) = Header::read_from_prefix(datagram).map_err(|_| ParseError::Truncated)?;
    if body.len() != h.body_len as usize {
        return Err(ParseError::Truncated);
    }
    Ok((h.kind, body))
}

/// Reads a body of type `T`, which must be exactly the body's length.
pub fn body<T: FromBytes>(kind: Kind, body: &[u8]) -> Result<T, ParseError> {
    T::read_from_bytes(body).map_err(|_| ParseError::BadLength { kind })
}

/// Builds a datagram: header then body.
pub fn encode<T: IntoBytes + Immutable>(kind: Kind, body: &T) -> Vec<u8> {
    let b = body.as_bytes();
    let mut v = Vec::with_capacity(size_of::<Header>() + b.len());
    v.extend_from_slice(
        Header {
            kind,
            body_len: b.len() as u32,
        }
        .as_bytes(),
    );
    v.extend_from_slice(b);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posted_vmbus_messages_fit_a_slot() {
        let m = PostMessage::vmbus(1, 4, &[7; MESSAGE_PAYLOAD_SIZE]).unwrap();
        assert_eq!((m.vp, { m.input.connection_id }), (1, 4));
        assert_eq!({ m.input.message_type }, VMBUS_POST_MESSAGE_TYPE);
        assert_eq!({ m.input.payload_size } as usize, MESSAGE_PAYLOAD_SIZE);
        assert!(PostMessage::vmbus(0, 1, &[0; MESSAGE_PAYLOAD_SIZE + 1]).is_none());
    }

    #[test]
    fn encode_split_round_trip() {
        let m = AddMemory {
            gpa: 0x10_0000,
            len: 0x20_0000,
            fd_offset: 4096,
        };
        let d = encode(Kind::ADD_MEMORY, &m);
        assert_eq!(d.len(), 32);
        assert_eq!(&d[..8], &[2, 0, 0, 0, 24, 0, 0, 0]);
        let (k, b) = split(&d).unwrap();
        assert_eq!(k, Kind::ADD_MEMORY);
        assert_eq!(body::<AddMemory>(k, b).unwrap(), m);
        assert_eq!(
            body::<Hello>(k, b),
            Err(ParseError::BadLength {
                kind: Kind::ADD_MEMORY
            })
        );
    }

    #[test]
    fn malformed_datagrams_are_errors() {
        assert_eq!(split(&[1, 0, 0]), Err(ParseError::Truncated));
        assert_eq!(
            split(&[1, 0, 0, 0, 9, 0, 0, 0, 1]),
            Err(ParseError::Truncated)
        );
        assert_eq!(split(&[0; 600]), Err(ParseError::TooLong));
        let (k, b) = split(&[77, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!((k, b.len()), (Kind(77), 0));
    }
}
