//! The Hyper-V interface, in userspace: the CPUID leaves a Linux guest reads to find Hyper-V,
//! the synthetic MSRs (which KVM's MSR filter sends to this process), and the hypercall page.
//!
//! The decisions are pure functions over [`Partition`] and [`VpState`], so they are tested
//! without a vCPU: an exception raised at CPL 0 ends the run on the KVM these tests run on, so
//! the #GP paths are checked here and never by a guest.

use kvm_bindings::kvm_cpuid_entry2;
use vmbus_proto::synic::{HvPostMessageInput, MESSAGE_PAYLOAD_SIZE};

// The synthetic MSR numbers are vmbus-proto's (its `synic::msr`), re-exported under the names
// this module's handlers use.
pub use vmbus_proto::synic::msr::{
    APIC_FREQUENCY, CRASH_CTL, CRASH_P0, EOM, GUEST_OS_ID, HYPERCALL, SCONTROL, SIEFP, SIMP, SINT0,
    SVERSION, TSC_FREQUENCY, VP_ASSIST_PAGE, VP_INDEX,
};

/// First synthetic MSR; the filter sends `MSR_BASE .. MSR_BASE + MSR_COUNT` to userspace.
pub const MSR_BASE: u32 = vmbus_proto::synic::msr::FIRST;
/// Number of MSRs the filter covers.
pub const MSR_COUNT: u32 = vmbus_proto::synic::msr::LAST - MSR_BASE + 1;

/// HV_X64_MSR_CRASH_CTL bit 63 (CRASH_NOTIFY) written: the guest panicked with P0-P4.
const CRASH_NOTIFY: u64 = 1 << 63;

/// The APIC timer frequency the in-kernel LAPIC uses (1 ns per bus cycle).
pub const APIC_HZ: u64 = 1_000_000_000;

/// SINT reset value: masked.
const SINT_MASKED: u64 = 1 << 16;
/// Bits of a SINT a guest may set: vector, masked, auto-EOI, polling.
const SINT_WRITABLE: u64 = 0xFF | (1 << 16) | (1 << 17) | (1 << 18);
const PAGE_MASK: u64 = !0xFFF;

/// The I/O port of the hypercall page's slow path: the VMM handles the call on that exit.
/// Not a port of the in-kernel PIC, PIT or ELCR.
pub const HYPERCALL_PORT: u8 = 0x99;
/// The I/O port of the HvSignalEvent fast path: the page writes the connection id here (a
/// dword). A connection bound with KVM_IOEVENTFD (datamatch on the id) is signalled in the
/// kernel with no exit; any other id exits to the VMM, which answers as for a slow call.
pub const SIGNAL_PORT: u8 = 0x9A;

/// The fast HvSignalEvent control word as ECX holds it: call code 0x5D, fast bit.
pub const SIGNAL_EVENT_FAST: u32 = 0x1_005D;

/// The hypercall page's code. `rcx` is the control word, `rdx` the input (GPA or fast
/// argument), `r8` the output GPA; the status comes back in `rax`.
///
/// ```text
/// endbr64
/// cmp ecx, 0x1005D          ; fast HvSignalEvent?
/// jne slow
/// mov eax, edx              ; the connection id
/// out SIGNAL_PORT, eax      ; ioeventfd match: no exit; else the VMM sets eax = edx + status
/// sub eax, edx              ; 0 (success) after a match, the VMM's status otherwise
/// ret
/// slow: out HYPERCALL_PORT, al  ; the VMM puts the status in rax
/// ret
/// ```
/// The rest of the page is `int3` filler.
pub fn hypercall_page() -> [u8; 4096] {
    let mut page = [0xCC; 4096];
    let [c0, c1, c2, c3] = SIGNAL_EVENT_FAST.to_le_bytes();
    let code = [
        0xF3,
        0x0F,
        0x1E,
        0xFA, // endbr64
        0x81,
        0xF9,
        c0,
        c1,
        c2,
        c3, // cmp ecx, imm32
        0x75,
        0x07, // jne +7
        0x89,
        0xD0, // mov eax, edx
        0xE7,
        SIGNAL_PORT, // out imm8, eax
        0x29,
        0xD0, // sub eax, edx
        0xC3, // ret
        0xE6,
        HYPERCALL_PORT, // slow: out imm8, al
        0xC3,           // ret
    ];
    page[..code.len()].copy_from_slice(&code);
    page
}

/// RAX to set on a fast-path signal that exited to the VMM so that the page's `sub eax, edx`
/// leaves `status` in RAX.
pub fn fast_signal_rax(rdx: u64, status: u16) -> u64 {
    u64::from((rdx as u32).wrapping_add(u32::from(status)))
}

/// Partition-wide synthetic registers.
#[derive(Debug, Default, Clone)]
pub struct Partition {
    /// HV_X64_MSR_GUEST_OS_ID.
    pub guest_os_id: u64,
    /// HV_X64_MSR_HYPERCALL as the guest last wrote it.
    pub hypercall: u64,
    /// TSC frequency in Hz reported by HV_X64_MSR_TSC_FREQUENCY.
    pub tsc_hz: u64,
    /// HV_X64_MSR_CRASH_P0-P4 (Linux: the panic's code, RIP and message address).
    pub crash: [u64; 5],
}

/// Per-VP SynIC state.
#[derive(Debug, Clone)]
pub struct VpState {
    /// The VP's index (its vCPU id).
    pub index: u32,
    /// HV_X64_MSR_VP_ASSIST_PAGE (accepted and stored, not used).
    pub vp_assist: u64,
    /// HV_X64_MSR_SCONTROL.
    pub scontrol: u64,
    /// HV_X64_MSR_SIEFP.
    pub siefp: u64,
    /// HV_X64_MSR_SIMP.
    pub simp: u64,
    /// HV_X64_MSR_SINT0..15.
    pub sint: [u64; 16],
    /// Number of EOM writes seen.
    pub eoms: u64,
}

impl VpState {
    /// The reset state of VP `index`.
    pub fn new(index: u32) -> Self {
        VpState {
            index,
            vp_assist: 0,
            scontrol: 0,
            siefp: 0,
            simp: 0,
            sint: [SINT_MASKED; 16],
            eoms: 0,
        }
    }
}

/// What the vCPU loop does after a synthetic-MSR write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsrWrite {
    /// Accepted; nothing more to do.
    Done,
    /// Accepted: write [`hypercall_page`] at this guest-physical address before resuming.
    HypercallPage(u64),
    /// The SynIC message or event page of this VP changed (a front end to `vspd` registers it).
    SynicChanged,
    /// The guest signalled end of message: deliver the next queued message, if any.
    Eom,
    /// The guest reported a crash through CRASH_CTL, with these P0-P4: print it.
    Crash([u64; 5]),
    /// Refused: inject #GP.
    Gp,
}

/// A guest RDMSR of synthetic MSR `index`: `Some(value)`, or `None` for #GP.
pub fn read_msr(p: &Partition, vp: &VpState, index: u32) -> Option<u64> {
    Some(match index {
        GUEST_OS_ID => p.guest_os_id,
        HYPERCALL => p.hypercall,
        i if (CRASH_P0..CRASH_P0 + 5).contains(&i) => p.crash[(i - CRASH_P0) as usize],
        CRASH_CTL => CRASH_NOTIFY, // the crash notification is supported
        VP_INDEX => u64::from(vp.index),
        TSC_FREQUENCY => p.tsc_hz,
        APIC_FREQUENCY => APIC_HZ,
        VP_ASSIST_PAGE => vp.vp_assist,
        SCONTROL => vp.scontrol,
        SVERSION => 1,
        SIEFP => vp.siefp,
        SIMP => vp.simp,
        EOM => 0,
        i if (SINT0..SINT0 + 16).contains(&i) => vp.sint[(i - SINT0) as usize],
        _ => return None,
    })
}

/// A guest WRMSR of `value` to synthetic MSR `index`.
pub fn write_msr(p: &mut Partition, vp: &mut VpState, index: u32, value: u64) -> MsrWrite {
    match index {
        GUEST_OS_ID => {
            p.guest_os_id = value;
            // Clearing the guest OS id disables the hypercall page (TLFS).
            if value == 0 {
                p.hypercall &= !1;
            }
            MsrWrite::Done
        }
        HYPERCALL => {
            // Bits 1..11 are reserved (bit 1 is "locked", which this shim does not honour).
            let value = value & (PAGE_MASK | 1);
            // The page cannot be enabled before the guest has said who it is.
            if p.guest_os_id == 0 && value & 1 != 0 {
                return MsrWrite::Done;
            }
            p.hypercall = value;
            if value & 1 != 0 {
                MsrWrite::HypercallPage(value & PAGE_MASK)
            } else {
                MsrWrite::Done
            }
        }
        i if (CRASH_P0..CRASH_P0 + 5).contains(&i) => {
            p.crash[(i - CRASH_P0) as usize] = value;
            MsrWrite::Done
        }
        CRASH_CTL if value & CRASH_NOTIFY != 0 => MsrWrite::Crash(p.crash),
        CRASH_CTL => MsrWrite::Done,
        VP_ASSIST_PAGE => {
            vp.vp_assist = value & (PAGE_MASK | 1);
            MsrWrite::Done
        }
        SCONTROL => {
            vp.scontrol = value & 1;
            MsrWrite::SynicChanged
        }
        SIEFP => {
            vp.siefp = value & (PAGE_MASK | 1);
            MsrWrite::SynicChanged
        }
        SIMP => {
            vp.simp = value & (PAGE_MASK | 1);
            MsrWrite::SynicChanged
        }
        EOM => {
            vp.eoms += 1;
            MsrWrite::Eom
        }
        i if (SINT0..SINT0 + 16).contains(&i) => {
            let vector = value & 0xFF;
            // Vectors 0-15 are exceptions, not interrupts: refused unless masked (TLFS).
            if value & SINT_MASKED == 0 && vector < 16 {
                return MsrWrite::Gp;
            }
            vp.sint[(i - SINT0) as usize] = value & SINT_WRITABLE;
            MsrWrite::SynicChanged
        }
        // Read-only and unknown MSRs.
        _ => MsrWrite::Gp,
    }
}

/// Hyper-V hypercall status codes.
pub mod status {
    /// HV_STATUS_SUCCESS.
    pub const SUCCESS: u16 = 0;
    /// HV_STATUS_INVALID_HYPERCALL_CODE.
    pub const INVALID_HYPERCALL_CODE: u16 = 2;
    /// HV_STATUS_INVALID_HYPERCALL_INPUT.
    pub const INVALID_HYPERCALL_INPUT: u16 = 3;
    /// HV_STATUS_INVALID_ALIGNMENT.
    pub const INVALID_ALIGNMENT: u16 = 4;
    /// HV_STATUS_INVALID_PARAMETER.
    pub const INVALID_PARAMETER: u16 = 5;
    /// HV_STATUS_INSUFFICIENT_BUFFERS.
    pub const INSUFFICIENT_BUFFERS: u16 = 19;
    /// HV_STATUS_INVALID_CONNECTION_ID.
    pub const INVALID_CONNECTION_ID: u16 = 18;
}

/// HvPostMessage.
pub const HVCALL_POST_MESSAGE: u16 = 0x5C;
/// HvSignalEvent.
pub const HVCALL_SIGNAL_EVENT: u16 = 0x5D;

/// What the VMM does for a call into the hypercall page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hypercall {
    /// Answer with this status and do nothing else.
    Status(u16),
    /// HvPostMessage with a valid input page: forward it, answer success.
    Post(Box<HvPostMessageInput>),
    /// HvSignalEvent of a known connection: signal it, answer success.
    Signal {
        /// The connection id.
        connection_id: u32,
        /// The flag number (bits 32-47 of the fast argument).
        flag: u16,
    },
}

/// Control-word bit 16: arguments in registers.
const CONTROL_FAST: u64 = 1 << 16;

/// Decides a call into the hypercall page. `control` is RCX, `input` RDX (the input page's GPA,
/// or the fast argument); `read_input` reads an HvPostMessage input page from guest RAM (`None`
/// when it is not all in RAM); `known` says whether a connection id exists (the VMBus message
/// connections for a post, the channels `vspd` opened for a signal). Only the two calls
/// hv_vmbus makes are implemented; every other code is refused with INVALID_HYPERCALL_CODE.
pub fn decide_hypercall(
    control: u64,
    input: u64,
    read_input: impl FnOnce(u64) -> Option<HvPostMessageInput>,
    known: impl FnOnce(&Hypercall) -> bool,
) -> Hypercall {
    let code = control as u16;
    let rep_count = (control >> 32) & 0xFFF;
    let fast = control & CONTROL_FAST != 0;
    match code {
        HVCALL_POST_MESSAGE => {
            if rep_count != 0 || fast {
                return Hypercall::Status(status::INVALID_HYPERCALL_INPUT);
            }
            // The 256-byte input must be 8-byte aligned and inside one page of RAM.
            if !input.is_multiple_of(8)
                || (input & 0xFFF) + size_of::<HvPostMessageInput>() as u64 > 4096
            {
                return Hypercall::Status(status::INVALID_ALIGNMENT);
            }
            let Some(msg) = read_input(input) else {
                return Hypercall::Status(status::INVALID_PARAMETER);
            };
            if msg.message_type != 1 || msg.payload_size as usize > MESSAGE_PAYLOAD_SIZE {
                return Hypercall::Status(status::INVALID_PARAMETER);
            }
            let call = Hypercall::Post(Box::new(msg));
            if known(&call) {
                call
            } else {
                Hypercall::Status(status::INVALID_CONNECTION_ID)
            }
        }
        HVCALL_SIGNAL_EVENT => {
            if rep_count != 0 || !fast {
                return Hypercall::Status(status::INVALID_HYPERCALL_INPUT);
            }
            let call = Hypercall::Signal {
                connection_id: input as u32,
                flag: (input >> 32) as u16,
            };
            if known(&call) {
                call
            } else {
                Hypercall::Status(status::INVALID_CONNECTION_ID)
            }
        }
        _ => Hypercall::Status(status::INVALID_HYPERCALL_CODE),
    }
}

/// "Microsoft Hv" as EBX, ECX, EDX.
pub const SIGNATURE: [u32; 3] = [0x7263_694D, 0x666F_736F, 0x7648_2074];
/// "Hv#1".
pub const INTERFACE: u32 = 0x3123_7648;

/// Leaf 0x40000003 EAX: SynIC MSRs (2), hypercall MSRs (5), VP index (6), frequency MSRs (11),
/// invariant TSC (15).
const FEATURES_EAX: u32 = (1 << 2) | (1 << 5) | (1 << 6) | (1 << 11) | (1 << 15);
/// Leaf 0x40000003 EBX: PostMessages (4), SignalEvents (5).
const FEATURES_EBX: u32 = (1 << 4) | (1 << 5);
/// Leaf 0x40000003 EDX: guest crash MSRs available (10).
const FEATURES_EDX: u32 = 1 << 10;
/// Leaf 0x40000004 EAX: AEOI deprecated (9): the in-kernel LAPIC cannot auto-EOI.
const HINTS_EAX: u32 = 1 << 9;

fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index: 0,
        flags: 0,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

/// Turns KVM's supported CPUID into what VP `vp_index` of a Hyper-V partition with `vcpus` VPs
/// shows: KVM's own signature leaves (0x40000000-0x400001FF) dropped, the Hyper-V leaves
/// 0x40000000-0x40000006 added, leaf 1 with the hypervisor bit and this VP's APIC id, and the
/// instructions this KVM cannot emulate at CPL 0 hidden (CMPXCHG16B, XSAVE and AVX).
pub fn build_cpuid(
    supported: &[kvm_cpuid_entry2],
    vp_index: u32,
    vcpus: u32,
) -> Vec<kvm_cpuid_entry2> {
    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| !(0x4000_0000..0x4000_0200).contains(&e.function))
        .copied()
        .collect();
    for e in &mut out {
        match e.function {
            1 => {
                e.ecx |= 1 << 31; // hypervisor present
                e.ecx &= !((1 << 13) | (1 << 26) | (1 << 27) | (1 << 28)); // CX16, XSAVE, OSXSAVE, AVX
                e.ebx = (e.ebx & 0x00FF_FFFF) | (vp_index << 24);
            }
            7 if e.index == 0 => {
                e.ebx &= !((1 << 5) | (1 << 16)); // AVX2, AVX-512F
            }
            0xB | 0x1F => e.edx = vp_index, // x2APIC id
            _ => {}
        }
    }
    // Leaf 0xD describes XSAVE state, which is hidden.
    out.retain(|e| e.function != 0xD);
    let [b, c, d] = SIGNATURE;
    out.push(leaf(0x4000_0000, 0x4000_0006, b, c, d));
    out.push(leaf(0x4000_0001, INTERFACE, 0, 0, 0));
    // Version: build 20348, 10.0.
    out.push(leaf(0x4000_0002, 20348, 0x000A_0000, 0, 0));
    out.push(leaf(
        0x4000_0003,
        FEATURES_EAX,
        FEATURES_EBX,
        0,
        FEATURES_EDX,
    ));
    out.push(leaf(0x4000_0004, HINTS_EAX, 0xFFFF_FFFF, 0, 0));
    out.push(leaf(0x4000_0005, vcpus, vcpus, 0, 0));
    out.push(leaf(0x4000_0006, 0, 0, 0, 0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    fn fresh() -> (Partition, VpState) {
        (
            Partition {
                tsc_hz: 2_000_000_000,
                ..Default::default()
            },
            VpState::new(3),
        )
    }

    #[test]
    fn unknown_and_read_only_msrs_are_refused_with_gp() {
        let (mut p, mut vp) = fresh();
        for msr in [
            0x4000_0010,
            0x4000_01FF,
            VP_INDEX,
            SVERSION,
            TSC_FREQUENCY,
            APIC_FREQUENCY,
        ] {
            assert_eq!(write_msr(&mut p, &mut vp, msr, 1), MsrWrite::Gp, "{msr:#x}");
        }
        assert_eq!(read_msr(&p, &vp, 0x4000_0010), None);
        assert_eq!(read_msr(&p, &vp, 0x4000_0106), None);
    }

    #[test]
    fn guest_os_id_and_synic_pages_read_back() {
        let (mut p, mut vp) = fresh();
        assert_eq!(
            write_msr(&mut p, &mut vp, GUEST_OS_ID, 0x8100_0601_0000_0000),
            MsrWrite::Done
        );
        assert_eq!(read_msr(&p, &vp, GUEST_OS_ID), Some(0x8100_0601_0000_0000));
        assert_eq!(
            write_msr(&mut p, &mut vp, SIMP, 0x12_3456_7001),
            MsrWrite::SynicChanged
        );
        assert_eq!(read_msr(&p, &vp, SIMP), Some(0x12_3456_7001));
        assert_eq!(
            write_msr(&mut p, &mut vp, SIEFP, 0x5FFF),
            MsrWrite::SynicChanged
        );
        assert_eq!(
            read_msr(&p, &vp, SIEFP),
            Some(0x5001),
            "reserved bits dropped"
        );
        assert_eq!(read_msr(&p, &vp, VP_INDEX), Some(3));
        assert_eq!(read_msr(&p, &vp, SVERSION), Some(1));
        assert_eq!(read_msr(&p, &vp, TSC_FREQUENCY), Some(2_000_000_000));
        assert_eq!(write_msr(&mut p, &mut vp, EOM, 0), MsrWrite::Eom);
        assert_eq!(vp.eoms, 1);
    }

    #[test]
    fn hypercall_page_needs_a_guest_os_id_and_is_written_on_enable() {
        let (mut p, mut vp) = fresh();
        assert_eq!(
            write_msr(&mut p, &mut vp, HYPERCALL, 0x7000 | 1),
            MsrWrite::Done
        );
        assert_eq!(read_msr(&p, &vp, HYPERCALL), Some(0));
        write_msr(&mut p, &mut vp, GUEST_OS_ID, 1);
        assert_eq!(
            write_msr(&mut p, &mut vp, HYPERCALL, 0x7000 | 1),
            MsrWrite::HypercallPage(0x7000)
        );
        assert_eq!(read_msr(&p, &vp, HYPERCALL), Some(0x7001));
        write_msr(&mut p, &mut vp, GUEST_OS_ID, 0);
        assert_eq!(
            read_msr(&p, &vp, HYPERCALL),
            Some(0x7000),
            "disabled with the OS id"
        );
    }

    #[test]
    fn a_crash_report_carries_p0_to_p4() {
        let (mut p, mut vp) = fresh();
        assert_eq!(read_msr(&p, &vp, CRASH_CTL), Some(1 << 63));
        for i in 0..5 {
            assert_eq!(
                write_msr(&mut p, &mut vp, CRASH_P0 + i, 0x10 + u64::from(i)),
                MsrWrite::Done
            );
        }
        assert_eq!(read_msr(&p, &vp, CRASH_P0 + 4), Some(0x14));
        assert_eq!(write_msr(&mut p, &mut vp, CRASH_CTL, 0), MsrWrite::Done);
        assert_eq!(
            write_msr(&mut p, &mut vp, CRASH_CTL, 1 << 63),
            MsrWrite::Crash([0x10, 0x11, 0x12, 0x13, 0x14])
        );
    }

    proptest::proptest! {
        /// Any register values: the handlers never panic, and a refused write changes nothing.
        #[test]
        fn msr_and_hypercall_handlers_take_any_values(
            index in MSR_BASE..MSR_BASE + MSR_COUNT,
            value: u64,
            control: u64,
            input: u64,
            page: Vec<u8>,
        ) {
            let (mut p, mut vp) = fresh();
            let (p0, vp0) = (p.clone(), vp.clone());
            let _ = read_msr(&p, &vp, index);
            if write_msr(&mut p, &mut vp, index, value) == MsrWrite::Gp {
                proptest::prop_assert_eq!(format!("{p:?}{vp:?}"), format!("{p0:?}{vp0:?}"));
            }
            let mut bytes = [0u8; 256];
            let n = page.len().min(256);
            bytes[..n].copy_from_slice(&page[..n]);
            let read = |_| zerocopy::FromBytes::read_from_bytes(&bytes[..]).ok();
            match decide_hypercall(control, input, read, |_| true) {
                Hypercall::Post(m) => {
                    proptest::prop_assert_eq!(m.message_type, 1);
                    proptest::prop_assert!(m.payload_size <= 240);
                }
                Hypercall::Signal { .. } | Hypercall::Status(_) => {}
            }
        }
    }

    #[test]
    fn sints_reset_masked_and_refuse_exception_vectors() {
        let (mut p, mut vp) = fresh();
        for n in 0..16 {
            assert_eq!(read_msr(&p, &vp, SINT0 + n), Some(1 << 16));
        }
        assert_eq!(write_msr(&mut p, &mut vp, SINT0 + 2, 0x0F), MsrWrite::Gp);
        assert_eq!(
            read_msr(&p, &vp, SINT0 + 2),
            Some(1 << 16),
            "unchanged after #GP"
        );
        assert_eq!(
            write_msr(&mut p, &mut vp, SINT0 + 2, 0x0F | (1 << 16)),
            MsrWrite::SynicChanged
        );
        assert_eq!(
            write_msr(&mut p, &mut vp, SINT0 + 2, 0xF3),
            MsrWrite::SynicChanged
        );
        assert_eq!(read_msr(&p, &vp, SINT0 + 2), Some(0xF3));
    }

    fn post(t: u32, size: u32) -> HvPostMessageInput {
        let mut m = HvPostMessageInput::new_zeroed();
        m.connection_id = 4;
        m.message_type = t;
        m.payload_size = size;
        m
    }

    #[test]
    fn hypercalls_are_decided_with_the_right_status() {
        let ram = |m: HvPostMessageInput| move |gpa: u64| (gpa < 0x10_0000).then_some(m);
        let yes = |_: &Hypercall| true;
        let no = |_: &Hypercall| false;
        let ok = post(1, 240);
        assert_eq!(
            decide_hypercall(0x5C, 0x7000, ram(ok), yes),
            Hypercall::Post(Box::new(ok))
        );
        assert_eq!(
            decide_hypercall(0x5C, 0x7000, ram(ok), no),
            Hypercall::Status(status::INVALID_CONNECTION_ID)
        );
        assert_eq!(
            decide_hypercall(0x5C, 0x20_0000, ram(ok), yes),
            Hypercall::Status(status::INVALID_PARAMETER),
            "outside RAM"
        );
        assert_eq!(
            decide_hypercall(0x5C, 0x7004, ram(ok), yes),
            Hypercall::Status(status::INVALID_ALIGNMENT)
        );
        assert_eq!(
            decide_hypercall(0x5C, 0x7F08, ram(ok), yes),
            Hypercall::Status(status::INVALID_ALIGNMENT),
            "crosses a page"
        );
        assert_eq!(
            decide_hypercall(0x5C, u64::MAX - 7, ram(ok), yes),
            Hypercall::Status(status::INVALID_ALIGNMENT)
        );
        assert_eq!(
            decide_hypercall(0x5C, 0x7000, ram(post(1, 241)), yes),
            Hypercall::Status(status::INVALID_PARAMETER),
            "oversized"
        );
        assert_eq!(
            decide_hypercall(0x5C, 0x7000, ram(post(2, 8)), yes),
            Hypercall::Status(status::INVALID_PARAMETER),
            "message type"
        );
        assert_eq!(
            decide_hypercall(0x5C | (1 << 16), 0x7000, ram(ok), yes),
            Hypercall::Status(status::INVALID_HYPERCALL_INPUT)
        );
        assert_eq!(
            decide_hypercall(0x5C | (3 << 32), 0x7000, ram(ok), yes),
            Hypercall::Status(status::INVALID_HYPERCALL_INPUT)
        );
        let sig = decide_hypercall(0x1_005D, (5 << 32) | 9, ram(ok), yes);
        assert_eq!(
            sig,
            Hypercall::Signal {
                connection_id: 9,
                flag: 5
            }
        );
        assert_eq!(
            decide_hypercall(0x1_005D, 9, ram(ok), no),
            Hypercall::Status(status::INVALID_CONNECTION_ID)
        );
        assert_eq!(
            decide_hypercall(0x5D, 9, ram(ok), yes),
            Hypercall::Status(status::INVALID_HYPERCALL_INPUT),
            "slow signal"
        );
        for code in [0u64, 0x2, 0x5B, 0x5E, 0xFFFF] {
            assert_eq!(
                decide_hypercall(code, 0x7000, ram(ok), yes),
                Hypercall::Status(status::INVALID_HYPERCALL_CODE)
            );
        }
    }

    #[test]
    fn cpuid_shows_hyper_v_and_hides_kvm() {
        let kvm_sig = leaf(0x4000_0000, 0x4000_0001, 0x4B4D_564B, 0x564B_4D56, 0x4D);
        let kvm_feat = leaf(0x4000_0001, 0xFFFF, 0, 0, 0);
        let kvm_sig2 = leaf(0x4000_0100, 0x4000_0101, 0x4B4D_564B, 0, 0);
        let l1 = leaf(1, 0, 0x0001_0800, (1 << 13) | (1 << 26) | 1, 0);
        let out = build_cpuid(&[kvm_sig, kvm_feat, kvm_sig2, l1], 2, 4);
        let get = |f: u32| out.iter().filter(|e| e.function == f).collect::<Vec<_>>();
        assert!(get(0x4000_0100).is_empty());
        let sig = get(0x4000_0000);
        assert_eq!(sig.len(), 1);
        assert_eq!(
            (sig[0].eax, sig[0].ebx, sig[0].ecx, sig[0].edx),
            (0x4000_0006, SIGNATURE[0], SIGNATURE[1], SIGNATURE[2])
        );
        assert_eq!(get(0x4000_0001)[0].eax, INTERFACE);
        let l1 = get(1)[0];
        assert_eq!(l1.ecx, (1 << 31) | 1);
        assert_eq!(l1.ebx >> 24, 2);
        let f = get(0x4000_0003)[0];
        assert_eq!(f.eax & 0x64, 0x64, "SynIC, hypercall and VP index MSRs");
        assert_eq!(f.ebx & 0x2, 0, "no partition id");
        assert_eq!(f.ebx & (1 << 12), 0, "not the root partition");
        assert_eq!(
            get(0x4000_0004)[0].eax & 0x40E,
            0,
            "no hypercall-routed TLB flush, IPI, EOI, timers"
        );
        assert_eq!(get(0x4000_0004)[0].eax & (1 << 9), 1 << 9);
    }

    #[test]
    fn hypercall_page_has_a_fast_signal_path_then_the_slow_exit() {
        let p = hypercall_page();
        assert_eq!(&p[..4], &[0xF3, 0x0F, 0x1E, 0xFA]);
        assert_eq!(&p[4..10], &[0x81, 0xF9, 0x5D, 0x00, 0x01, 0x00]);
        assert_eq!(&p[14..16], &[0xE7, SIGNAL_PORT]);
        assert_eq!(&p[19..22], &[0xE6, HYPERCALL_PORT, 0xC3]);
        // The jne lands on the slow path.
        assert_eq!(12 + p[11] as usize, 19);
        assert!(p[22..].iter().all(|&b| b == 0xCC));
        // After `sub eax, edx` the guest sees the status.
        for (rdx, st) in [(9u64, 18u16), (0xFFFF_FFFF, 18), ((7 << 32) | 3, 2)] {
            let rax = fast_signal_rax(rdx, st);
            assert_eq!((rax as u32).wrapping_sub(rdx as u32), u32::from(st));
        }
    }
}
