//! The synthetic interrupt controller (SynIC) and hypercall interface VMBus rides on: message
//! slots, hypercall inputs and the control word, status codes, synthetic MSRs and the monitor page.
//!
//! Sources: the Hyper-V TLFS as Linux transcribes it (`include/hyperv/hvgdk_mini.h`, formerly
//! `asm/hyperv-tlfs.h`) and `drivers/hv/hyperv_vmbus.h`.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Number of SINTs per VP.
pub const SINT_COUNT: usize = 16;
/// The SINT VMBus uses.
pub const VMBUS_SINT: u8 = 2;
/// Size of one message slot in the SIMP page (and of one event-flags bitmap in the SIEF page).
pub const MESSAGE_SLOT_SIZE: usize = 256;
/// Bytes of payload in one SynIC message (`HV_MESSAGE_PAYLOAD_BYTE_COUNT`).
pub const MESSAGE_PAYLOAD_SIZE: usize = 240;
/// Event flags per SINT in the SIEF page: 256 bytes of bits.
pub const EVENT_FLAGS_COUNT: usize = 256 * 8;
/// The message type the guest passes to HvPostMessage for VMBus channel messages, and the type
/// the host's channel messages carry in the slot.
pub const VMBUS_POST_MESSAGE_TYPE: u32 = 1;

open_enum! {
    /// `enum hv_message_type`: the type of a SynIC message slot (0 = slot free).
    pub enum HvMessageType: u32 {
        /// The slot is free.
        NONE = 0,
        /// A VMBus channel message (the value hv_vmbus posts; absent from Linux's enum).
        VMBUS = 1,
        /// Unmapped GPA intercept.
        UNMAPPED_GPA = 0x8000_0000,
        /// GPA intercept.
        GPA_INTERCEPT = 0x8000_0001,
        /// Synthetic timer expired.
        TIMER_EXPIRED = 0x8000_0010,
        /// Invalid VP register value.
        INVALID_VP_REGISTER_VALUE = 0x8000_0020,
        /// Unrecoverable exception.
        UNRECOVERABLE_EXCEPTION = 0x8000_0021,
        /// Unsupported feature.
        UNSUPPORTED_FEATURE = 0x8000_0022,
        /// Event log buffer complete.
        EVENTLOG_BUFFERCOMPLETE = 0x8000_0040,
        /// x64 I/O port intercept.
        X64_IOPORT_INTERCEPT = 0x8001_0000,
        /// x64 MSR intercept.
        X64_MSR_INTERCEPT = 0x8001_0001,
        /// x64 CPUID intercept.
        X64_CPUID_INTERCEPT = 0x8001_0002,
        /// x64 exception intercept.
        X64_EXCEPTION_INTERCEPT = 0x8001_0003,
        /// x64 APIC EOI.
        X64_APIC_EOI = 0x8001_0004,
        /// x64 legacy FP error.
        X64_LEGACY_FP_ERROR = 0x8001_0005,
    }
}

/// Message flag bit 0: another message is pending; the guest writes EOM when it frees the slot.
pub const MESSAGE_FLAG_PENDING: u8 = 1;

/// `struct hv_message_header`: the first 16 bytes of a message slot.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HvMessageHeader {
    /// The message type; written last when delivering, [`HvMessageType::NONE`] when free.
    pub message_type: HvMessageType,
    /// Bytes of payload used.
    pub payload_size: u8,
    /// Flags, see [`MESSAGE_FLAG_PENDING`].
    pub flags: u8,
    /// Reserved.
    pub reserved: [u8; 2],
    /// The sender (port id) or origination id.
    pub sender: u64,
}
const _: () = assert!(size_of::<HvMessageHeader>() == 16);

impl HvMessageHeader {
    /// Whether the message-pending flag is set.
    pub const fn message_pending(&self) -> bool {
        self.flags & MESSAGE_FLAG_PENDING != 0
    }
}

/// `struct hv_message`: one 256-byte slot of the SIMP page.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HvMessage {
    /// The header.
    pub header: HvMessageHeader,
    /// The payload.
    pub payload: [u8; MESSAGE_PAYLOAD_SIZE],
}
const _: () = assert!(size_of::<HvMessage>() == MESSAGE_SLOT_SIZE);

impl HvMessage {
    /// The used part of the payload (`payload_size` clamped to 240).
    pub fn payload(&self) -> &[u8] {
        &self.payload[..usize::from(self.header.payload_size).min(MESSAGE_PAYLOAD_SIZE)]
    }
}

/// `struct hv_input_post_message`: the input page of HvPostMessage.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HvPostMessageInput {
    /// The connection id (low 24 bits significant).
    pub connection_id: u32,
    /// Reserved.
    pub reserved: u32,
    /// The message type; [`VMBUS_POST_MESSAGE_TYPE`] for VMBus.
    pub message_type: u32,
    /// Payload bytes, at most 240.
    pub payload_size: u32,
    /// The payload.
    pub payload: [u8; MESSAGE_PAYLOAD_SIZE],
}
const _: () = assert!(size_of::<HvPostMessageInput>() == 256);

/// `struct hv_input_signal_event`: the input of HvSignalEvent (Linux passes it as the fast
/// hypercall's single register: `connection_id | flag_number << 32`).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HvSignalEventInput {
    /// The connection id.
    pub connection_id: u32,
    /// The event flag to set.
    pub flag_number: u16,
    /// Reserved.
    pub reserved: u16,
}
const _: () = assert!(size_of::<HvSignalEventInput>() == 8);

impl HvSignalEventInput {
    /// Decodes the fast-hypercall register form.
    pub const fn from_fast(v: u64) -> Self {
        Self {
            connection_id: v as u32,
            flag_number: (v >> 32) as u16,
            reserved: (v >> 48) as u16,
        }
    }

    /// Encodes the fast-hypercall register form.
    pub const fn to_fast(self) -> u64 {
        self.connection_id as u64 | (self.flag_number as u64) << 32 | (self.reserved as u64) << 48
    }
}

open_enum! {
    /// Hypercall call codes (bits 0-15 of the control word) VMBus uses.
    pub enum HypercallCode: u16 {
        /// HvPostMessage.
        POST_MESSAGE = 0x5C,
        /// HvSignalEvent.
        SIGNAL_EVENT = 0x5D,
    }
}

open_enum! {
    /// Hypercall status codes (bits 0-15 of the result).
    pub enum HvStatus: u16 {
        /// Success.
        SUCCESS = 0,
        /// Unknown call code.
        INVALID_HYPERCALL_CODE = 2,
        /// Bad control word (reserved bits, rep/fast misuse).
        INVALID_HYPERCALL_INPUT = 3,
        /// Misaligned input or output GPA.
        INVALID_ALIGNMENT = 4,
        /// Invalid parameter.
        INVALID_PARAMETER = 5,
        /// Access denied.
        ACCESS_DENIED = 6,
        /// Invalid partition state.
        INVALID_PARTITION_STATE = 7,
        /// Operation denied.
        OPERATION_DENIED = 8,
        /// Unknown property.
        UNKNOWN_PROPERTY = 9,
        /// Property value out of range.
        PROPERTY_VALUE_OUT_OF_RANGE = 0xA,
        /// Insufficient memory.
        INSUFFICIENT_MEMORY = 0xB,
        /// Invalid partition id.
        INVALID_PARTITION_ID = 0xD,
        /// Invalid VP index.
        INVALID_VP_INDEX = 0xE,
        /// Not found.
        NOT_FOUND = 0x10,
        /// Invalid port id.
        INVALID_PORT_ID = 0x11,
        /// Invalid connection id.
        INVALID_CONNECTION_ID = 0x12,
        /// No message buffer free at the receiver: retry later.
        INSUFFICIENT_BUFFERS = 0x13,
        /// Not acknowledged.
        NOT_ACKNOWLEDGED = 0x14,
        /// Invalid VP state.
        INVALID_VP_STATE = 0x15,
        /// No resources.
        NO_RESOURCES = 0x1D,
    }
}

/// The hypercall input control word (rcx on x64).
#[repr(transparent)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HypercallControl(pub u64);

impl HypercallControl {
    /// Mask of the bits that are defined; the rest must be zero.
    pub const DEFINED_BITS: u64 = 0xffff | 1 << 16 | 0x3ff << 17 | 0xfff << 32 | 0xfff << 48;

    /// A control word for a call code with everything else zero.
    pub const fn new(code: HypercallCode) -> Self {
        Self(code.0 as u64)
    }

    /// The call code, bits 0-15.
    pub const fn code(self) -> HypercallCode {
        HypercallCode(self.0 as u16)
    }

    /// The fast bit, bit 16: input in registers.
    pub const fn fast(self) -> bool {
        self.0 & 1 << 16 != 0
    }

    /// Returns this word with the fast bit set or cleared.
    pub const fn with_fast(self, fast: bool) -> Self {
        Self((self.0 & !(1 << 16)) | (fast as u64) << 16)
    }

    /// Variable header size in 8-byte units, bits 17-26.
    pub const fn variable_header_size(self) -> u16 {
        ((self.0 >> 17) & 0x3ff) as u16
    }

    /// Rep count, bits 32-43.
    pub const fn rep_count(self) -> u16 {
        ((self.0 >> 32) & 0xfff) as u16
    }

    /// Returns this word with the rep count set (truncated to 12 bits).
    pub const fn with_rep_count(self, n: u16) -> Self {
        Self((self.0 & !(0xfff << 32)) | ((n as u64) & 0xfff) << 32)
    }

    /// Rep start index, bits 48-59.
    pub const fn rep_start(self) -> u16 {
        ((self.0 >> 48) & 0xfff) as u16
    }

    /// Whether any reserved bit is set.
    pub const fn has_reserved_bits(self) -> bool {
        self.0 & !Self::DEFINED_BITS != 0
    }
}

/// The hypercall result value (rax on x64): status in bits 0-15, reps completed in bits 32-43.
#[repr(transparent)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HypercallOutput(pub u64);

impl HypercallOutput {
    /// A result with the given status and reps completed.
    pub const fn new(status: HvStatus, reps_completed: u16) -> Self {
        Self(status.0 as u64 | ((reps_completed as u64) & 0xfff) << 32)
    }

    /// The status.
    pub const fn status(self) -> HvStatus {
        HvStatus(self.0 as u16)
    }

    /// Reps completed.
    pub const fn reps_completed(self) -> u16 {
        ((self.0 >> 32) & 0xfff) as u16
    }
}

/// Synthetic MSR numbers (x64).
pub mod msr {
    /// Guest OS identity.
    pub const GUEST_OS_ID: u32 = 0x4000_0000;
    /// Hypercall page: bit 0 enable, bits 12+ page GPA.
    pub const HYPERCALL: u32 = 0x4000_0001;
    /// This VP's index (read-only).
    pub const VP_INDEX: u32 = 0x4000_0002;
    /// Reset.
    pub const RESET: u32 = 0x4000_0003;
    /// VP runtime.
    pub const VP_RUNTIME: u32 = 0x4000_0010;
    /// Partition reference time.
    pub const TIME_REF_COUNT: u32 = 0x4000_0020;
    /// Reference TSC page.
    pub const REFERENCE_TSC: u32 = 0x4000_0021;
    /// TSC frequency in Hz.
    pub const TSC_FREQUENCY: u32 = 0x4000_0022;
    /// APIC timer frequency in Hz.
    pub const APIC_FREQUENCY: u32 = 0x4000_0023;
    /// APIC EOI.
    pub const EOI: u32 = 0x4000_0070;
    /// APIC ICR.
    pub const ICR: u32 = 0x4000_0071;
    /// APIC TPR.
    pub const TPR: u32 = 0x4000_0072;
    /// VP assist page.
    pub const VP_ASSIST_PAGE: u32 = 0x4000_0073;
    /// SynIC control: bit 0 enable.
    pub const SCONTROL: u32 = 0x4000_0080;
    /// SynIC version (1).
    pub const SVERSION: u32 = 0x4000_0081;
    /// SynIC event flags page: bit 0 enable, bits 12+ GPA.
    pub const SIEFP: u32 = 0x4000_0082;
    /// SynIC message page: bit 0 enable, bits 12+ GPA.
    pub const SIMP: u32 = 0x4000_0083;
    /// End of message: the guest freed a slot.
    pub const EOM: u32 = 0x4000_0084;
    /// SINT0; SINTn is `SINT0 + n`.
    pub const SINT0: u32 = 0x4000_0090;
    /// SINT15.
    pub const SINT15: u32 = 0x4000_009F;
    /// Synthetic timer 0 config; timer n config is `STIMER0_CONFIG + 2 * n`.
    pub const STIMER0_CONFIG: u32 = 0x4000_00B0;
    /// Synthetic timer 0 count.
    pub const STIMER0_COUNT: u32 = 0x4000_00B1;
    /// Crash parameter 0; P0..P4 are consecutive.
    pub const CRASH_P0: u32 = 0x4000_0100;
    /// Crash parameter 4.
    pub const CRASH_P4: u32 = 0x4000_0104;
    /// Crash control.
    pub const CRASH_CTL: u32 = 0x4000_0105;
    /// First synthetic MSR.
    pub const FIRST: u32 = 0x4000_0000;
    /// Last synthetic MSR of the range a VMM typically filters.
    pub const LAST: u32 = 0x4000_01FF;

    /// The SINTn MSR, or `None` if `n` is not below 16.
    pub const fn sint(n: u8) -> Option<u32> {
        if (n as usize) < super::SINT_COUNT {
            Some(SINT0 + n as u32)
        } else {
            None
        }
    }

    /// Enable bit of the hypercall, SIMP, SIEFP and SCONTROL MSRs.
    pub const ENABLE: u64 = 1;
    /// GPA bits of the hypercall, SIMP and SIEFP MSRs.
    pub const PAGE_MASK: u64 = !0xfff;
    /// SINT vector, bits 0-7.
    pub const SINT_VECTOR_MASK: u64 = 0xff;
    /// SINT masked, bit 16 (set at reset).
    pub const SINT_MASKED: u64 = 1 << 16;
    /// SINT auto-EOI, bit 17.
    pub const SINT_AUTO_EOI: u64 = 1 << 17;
}

/// `struct hv_monitor_parameter`: what the host signals when a monitor bit is set.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HvMonitorParameter {
    /// Connection id to signal.
    pub connection_id: u32,
    /// Event flag number.
    pub flag_number: u16,
    /// Reserved, zero.
    pub reserved: u16,
}
const _: () = assert!(size_of::<HvMonitorParameter>() == 8);

/// `union hv_monitor_trigger_group`, as its struct view: 32 pending bits and 32 armed bits.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HvMonitorTriggerGroup {
    /// Bits set by the guest: monitor id `32 * group + bit` has something to say.
    pub pending: u32,
    /// Armed bits.
    pub armed: u32,
}
const _: () = assert!(size_of::<HvMonitorTriggerGroup>() == 8);

/// `struct hv_monitor_page`: a 4096-byte monitor page. Monitor id `m` is bit `m % 32` of
/// trigger group `m / 32`; its parameters are `parameter[m / 32][m % 32]`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HvMonitorPage {
    /// `trigger_state`: bits 0-3 enable the four groups.
    pub trigger_state: u32,
    /// Reserved, zero.
    pub rsvdz1: u32,
    /// The four trigger groups.
    pub trigger_group: [HvMonitorTriggerGroup; 4],
    /// Reserved, zero.
    pub rsvdz2: [u64; 3],
    /// Next check time per monitor id.
    pub next_check_time: [[i32; 32]; 4],
    /// Latency per monitor id, in 100 ns units.
    pub latency: [[u16; 32]; 4],
    /// Reserved, zero.
    pub rsvdz3: [u64; 32],
    /// Signal parameters per monitor id.
    pub parameter: [[HvMonitorParameter; 32]; 4],
    /// Reserved, zero.
    pub rsvdz4: [u8; 1984],
}
const _: () = assert!(size_of::<HvMonitorPage>() == 4096);

impl HvMonitorPage {
    /// Whether monitor id `id` is pending (false for ids beyond 127).
    pub fn is_pending(&self, id: u8) -> bool {
        let (group, bit) = (usize::from(id / 32), id % 32);
        group < 4 && self.trigger_group[group].pending & (1 << bit) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    #[test]
    fn control_word_fields() {
        let c = HypercallControl(0x0fff_0000_0000_005c | 1 << 16 | 3 << 17 | 0x123 << 32);
        assert_eq!(c.code(), HypercallCode::POST_MESSAGE);
        assert!(c.fast());
        assert_eq!(c.variable_header_size(), 3);
        assert_eq!(c.rep_count(), 0x123);
        assert_eq!(c.rep_start(), 0xfff);
        assert!(!c.has_reserved_bits());
        assert!(HypercallControl(1 << 63).has_reserved_bits());
        let d = HypercallControl::new(HypercallCode::SIGNAL_EVENT)
            .with_fast(true)
            .with_rep_count(2);
        assert_eq!(d.0, 0x0000_0002_0001_005d);
        let o = HypercallOutput::new(HvStatus::INSUFFICIENT_BUFFERS, 5);
        assert_eq!(o.0, 0x0000_0005_0000_0013);
        assert_eq!(
            (o.status(), o.reps_completed()),
            (HvStatus::INSUFFICIENT_BUFFERS, 5)
        );
    }

    #[test]
    fn message_slot_bytes() {
        let mut m = HvMessage::new_zeroed();
        m.header.message_type = HvMessageType::VMBUS;
        m.header.payload_size = 3;
        m.header.flags = MESSAGE_FLAG_PENDING;
        m.header.sender = 0x0102;
        m.payload[..3].copy_from_slice(&[7, 8, 9]);
        let b = m.as_bytes();
        assert_eq!(b[0..4], [1, 0, 0, 0]);
        assert_eq!(b[4], 3);
        assert_eq!(b[5], 1);
        assert_eq!(b[8..10], [2, 1]);
        assert_eq!(b[16..19], [7, 8, 9]);
        let back = HvMessage::read_from_bytes(b).unwrap();
        assert_eq!(back.payload(), &[7, 8, 9]);
        assert!(back.header.message_pending());
    }

    #[test]
    fn signal_event_fast_form() {
        let s = HvSignalEventInput {
            connection_id: 0x20,
            flag_number: 3,
            reserved: 0,
        };
        assert_eq!(s.to_fast(), 0x3_0000_0020);
        assert_eq!(HvSignalEventInput::from_fast(s.to_fast()), s);
        assert_eq!(s.as_bytes(), &[0x20, 0, 0, 0, 3, 0, 0, 0]);
    }

    #[test]
    fn monitor_page_bits() {
        let mut p = HvMonitorPage::new_zeroed();
        p.trigger_group[1].pending = 1 << 5;
        assert!(p.is_pending(37));
        assert!(!p.is_pending(5));
        assert!(!p.is_pending(200));
        assert_eq!(msr::sint(2), Some(0x4000_0092));
        assert_eq!(msr::sint(16), None);
    }
}
