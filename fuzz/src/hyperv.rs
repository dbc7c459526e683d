//! Fuzz target `hyperv_handlers`: a hostile guest's synthetic-MSR reads and writes and its calls
//! into the hypercall page, given to the shim's pure handlers (`hypervisor_shim::hyperv`:
//! `read_msr`, `write_msr`, `decide_hypercall`, `fast_signal_rax`) for a partition of two VPs,
//! with a 64 KiB guest RAM the input fills (the HvPostMessage input pages).
//!
//! Input: a list of operations, each an opcode byte then its operands (little-endian; missing
//! bytes read as zero):
//! - 0 RDMSR: VP byte, MSR u16 (an offset from 0x40000000 when below 0x200, else a raw index
//!   taken from a further u32);
//! - 1 WRMSR: VP byte, MSR as for RDMSR, value u64;
//! - 2 hypercall: control u64, input GPA u64, a "known connection" byte;
//! - 3 fill RAM: offset u16, length byte, that many bytes;
//! - 4 fast-signal status: RDX u64, status u16;
//! - 5 HvPostMessage of a valid input: RAM offset u16, connection id u32, payload length byte
//!   and payload (written as a guest would, then called with code 0x5C).
//!
//! Invariants: no panic; a refused write (#GP) changes nothing; every SINT is masked or has a
//! vector of 16 or more; the hypercall page is enabled only once a guest OS id is set, and its
//! GPA is page-aligned; a call decided as a post has code 0x5C, an aligned input inside one page
//! and in RAM, message type 1, at most 240 payload bytes, and is exactly what RAM held; a signal
//! has code 0x5D with the fast bit; every status is one of the Hyper-V codes the shim uses.

use hypervisor_shim::hyperv::{
    self, decide_hypercall, read_msr, write_msr, Hypercall, MsrWrite, Partition, VpState,
};
use vmbus_proto::synic::{msr, HvPostMessageInput};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

/// Guest RAM the input pages live in.
pub const RAM: usize = 64 << 10;
/// Operations run at most per input.
const MAX_OPS: usize = 4096;

/// The opcodes (see the module documentation).
pub mod op {
    /// RDMSR.
    pub const RDMSR: u8 = 0;
    /// WRMSR.
    pub const WRMSR: u8 = 1;
    /// A call into the hypercall page.
    pub const HYPERCALL: u8 = 2;
    /// Bytes into guest RAM.
    pub const FILL: u8 = 3;
    /// `fast_signal_rax`.
    pub const FAST_RAX: u8 = 4;
    /// A valid HvPostMessage input written and posted.
    pub const POST: u8 = 5;
    /// How many opcodes there are (others are taken modulo this).
    pub const COUNT: u8 = 6;
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes(&mut self, n: usize) -> [u8; 8] {
        let mut b = [0u8; 8];
        let k = n.min(self.0.len());
        b[..k].copy_from_slice(&self.0[..k]);
        self.0 = &self.0[k..];
        b
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }
    fn u16(&mut self) -> u16 {
        let b = self.bytes(2);
        u16::from_le_bytes([b[0], b[1]])
    }
    fn u32(&mut self) -> u32 {
        let b = self.bytes(4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes(8))
    }
    fn msr(&mut self) -> u32 {
        let m = self.u16();
        if u32::from(m) < hyperv::MSR_COUNT {
            hyperv::MSR_BASE + u32::from(m)
        } else {
            self.u32()
        }
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let k = n.min(self.0.len());
        let (a, b) = self.0.split_at(k);
        self.0 = b;
        a
    }
}

fn read_page(ram: &[u8], gpa: u64) -> Option<HvPostMessageInput> {
    let at = usize::try_from(gpa).ok()?;
    let end = at.checked_add(size_of::<HvPostMessageInput>())?;
    HvPostMessageInput::read_from_bytes(ram.get(at..end)?).ok()
}

/// Every register a write may change.
fn snapshot(p: &Partition, vp: &VpState) -> [u64; 29] {
    let mut s = [0u64; 29];
    s[..4].copy_from_slice(&[p.guest_os_id, p.hypercall, p.tsc_hz, vp.vp_assist]);
    s[4..9].copy_from_slice(&p.crash);
    s[9..13].copy_from_slice(&[vp.scontrol, vp.siefp, vp.simp, vp.eoms]);
    s[13..].copy_from_slice(&vp.sint);
    s
}

fn check_state(p: &Partition, vps: &[VpState]) {
    for vp in vps {
        for (n, &s) in vp.sint.iter().enumerate() {
            assert!(s & (1 << 16) != 0 || s & 0xFF >= 16, "SINT{n} = {s:#x}");
        }
    }
    if p.hypercall & 1 != 0 {
        assert_ne!(p.guest_os_id, 0, "hypercall page on with no guest OS id");
    }
}

fn hypercall(ram: &[u8], control: u64, input: u64, known: bool) -> Hypercall {
    let mut read_at = None;
    let call = decide_hypercall(
        control,
        input,
        |gpa| {
            read_at = Some(gpa);
            read_page(ram, gpa)
        },
        |_| known,
    );
    let code = control as u16;
    match &call {
        Hypercall::Post(m) => {
            assert_eq!(code, hyperv::HVCALL_POST_MESSAGE);
            assert_eq!(control & (1 << 16), 0, "a post is never fast");
            assert_eq!(read_at, Some(input));
            assert_eq!(input % 8, 0);
            assert!((input & 0xFFF) + 256 <= 4096, "input crosses a page");
            assert_eq!(m.message_type, 1);
            assert!(m.payload_size <= 240);
            assert_eq!(Some(**m), read_page(ram, input), "not what RAM held");
        }
        Hypercall::Signal { connection_id, .. } => {
            assert_eq!(code, hyperv::HVCALL_SIGNAL_EVENT);
            assert_ne!(control & (1 << 16), 0, "a signal is fast");
            assert_eq!(*connection_id, input as u32);
        }
        Hypercall::Status(s) => {
            use hyperv::status::*;
            assert!(
                [
                    INVALID_HYPERCALL_CODE,
                    INVALID_HYPERCALL_INPUT,
                    INVALID_ALIGNMENT,
                    INVALID_PARAMETER,
                    INVALID_CONNECTION_ID
                ]
                .contains(s),
                "status {s}"
            );
            if let Some(gpa) = read_at {
                assert_eq!(gpa, input, "read another page than the input");
            }
        }
    }
    call
}

/// The fuzz target (see the module documentation).
pub fn hyperv_handlers(data: &[u8]) {
    let mut input = Input(data);
    let mut p = Partition {
        tsc_hz: 2_000_000_000,
        ..Default::default()
    };
    let mut vps = [VpState::new(0), VpState::new(1)];
    let mut ram = vec![0u8; RAM];
    for _ in 0..MAX_OPS {
        if input.0.is_empty() {
            break;
        }
        match input.u8() % op::COUNT {
            op::RDMSR => {
                let vp = &vps[usize::from(input.u8() & 1)];
                let index = input.msr();
                let v = read_msr(&p, vp, index);
                if index == msr::VP_INDEX {
                    assert_eq!(v, Some(u64::from(vp.index)));
                }
                if !(hyperv::MSR_BASE..hyperv::MSR_BASE + hyperv::MSR_COUNT).contains(&index) {
                    assert_eq!(v, None, "MSR {index:#x} is not synthetic");
                }
            }
            op::WRMSR => {
                let vp = &mut vps[usize::from(input.u8() & 1)];
                let (index, value) = (input.msr(), input.u64());
                let before = snapshot(&p, vp);
                match write_msr(&mut p, vp, index, value) {
                    MsrWrite::Gp => assert!(before == snapshot(&p, vp), "#GP changed state"),
                    MsrWrite::HypercallPage(gpa) => {
                        assert_eq!(gpa & 0xFFF, 0);
                        assert_ne!(p.guest_os_id, 0);
                    }
                    MsrWrite::SynicChanged => {
                        // What reads back is the written value with unwritable bits cleared.
                        let back = read_msr(&p, vp, index).expect("a SynIC MSR reads back");
                        assert_eq!(
                            back & !value,
                            0,
                            "{index:#x}: wrote {value:#x}, read {back:#x}"
                        );
                    }
                    MsrWrite::Done | MsrWrite::Eom | MsrWrite::Crash(_) => {}
                }
            }
            op::HYPERCALL => {
                let (control, gpa, known) = (input.u64(), input.u64(), input.u8() & 1 != 0);
                hypercall(&ram, control, gpa, known);
            }
            op::FILL => {
                let at = usize::from(input.u16());
                let n = usize::from(input.u8());
                let bytes = input.take(n);
                let end = (at + bytes.len()).min(RAM);
                ram[at..end].copy_from_slice(&bytes[..end - at]);
            }
            op::FAST_RAX => {
                let (rdx, status) = (input.u64(), input.u16());
                let _ = hyperv::fast_signal_rax(rdx, status);
            }
            _ => {
                // op::POST
                // 8-byte aligned, the 256 bytes inside one page.
                let at = usize::from(input.u16()) & !7;
                let at = if at & 0xFFF > 4096 - 256 {
                    at & !0xFFF
                } else {
                    at
                };
                let mut m = HvPostMessageInput::new_zeroed();
                m.connection_id = input.u32();
                m.message_type = 1;
                let len = usize::from(input.u8().min(240));
                let payload = input.take(len);
                m.payload_size = payload.len() as u32;
                m.payload[..payload.len()].copy_from_slice(payload);
                ram[at..at + 256].copy_from_slice(m.as_bytes());
                match hypercall(
                    &ram,
                    u64::from(hyperv::HVCALL_POST_MESSAGE),
                    at as u64,
                    true,
                ) {
                    Hypercall::Post(got) => assert_eq!(*got, m),
                    other => panic!("a valid post at {at:#x} was decided {other:?}"),
                }
            }
        }
        check_state(&p, &vps);
    }
}

/// Encodes operations as the target reads them: for the checked-in seeds.
pub mod seed {
    use super::op;

    /// An input being written.
    #[derive(Default)]
    pub struct Seed(pub Vec<u8>);

    impl Seed {
        /// RDMSR of the synthetic MSR `index` on `vp`.
        pub fn rdmsr(mut self, vp: u8, index: u32) -> Self {
            self.0.extend([op::RDMSR, vp]);
            self.msr(index);
            self
        }
        /// WRMSR.
        pub fn wrmsr(mut self, vp: u8, index: u32, value: u64) -> Self {
            self.0.extend([op::WRMSR, vp]);
            self.msr(index);
            self.0.extend(value.to_le_bytes());
            self
        }
        fn msr(&mut self, index: u32) {
            match index.checked_sub(hypervisor_shim::hyperv::MSR_BASE) {
                Some(off) if off < hypervisor_shim::hyperv::MSR_COUNT => {
                    self.0.extend((off as u16).to_le_bytes())
                }
                _ => {
                    self.0.extend(u16::MAX.to_le_bytes());
                    self.0.extend(index.to_le_bytes());
                }
            }
        }
        /// A call into the hypercall page.
        pub fn hypercall(mut self, control: u64, input: u64, known: bool) -> Self {
            self.0.push(op::HYPERCALL);
            self.0.extend(control.to_le_bytes());
            self.0.extend(input.to_le_bytes());
            self.0.push(u8::from(known));
            self
        }
        /// Bytes into guest RAM at `at` (at most 255).
        pub fn fill(mut self, at: u16, bytes: &[u8]) -> Self {
            let bytes = &bytes[..bytes.len().min(255)];
            self.0.push(op::FILL);
            self.0.extend(at.to_le_bytes());
            self.0.push(bytes.len() as u8);
            self.0.extend(bytes);
            self
        }
        /// A valid HvPostMessage input at `at`, posted.
        pub fn post(mut self, at: u16, connection_id: u32, payload: &[u8]) -> Self {
            self.0.push(op::POST);
            self.0.extend(at.to_le_bytes());
            self.0.extend(connection_id.to_le_bytes());
            self.0.push(payload.len() as u8);
            self.0.extend(payload);
            self
        }
        /// `fast_signal_rax`.
        pub fn fast_rax(mut self, rdx: u64, status: u16) -> Self {
            self.0.push(op::FAST_RAX);
            self.0.extend(rdx.to_le_bytes());
            self.0.extend(status.to_le_bytes());
            self
        }
    }

    /// The checked-in seeds: what hv_vmbus does at start, and the misbehaviours the shim must
    /// refuse. (name, input)
    pub fn all() -> Vec<(&'static str, Vec<u8>)> {
        use hypervisor_shim::hyperv::{HVCALL_POST_MESSAGE, SIGNAL_EVENT_FAST};
        use vmbus_proto::synic::msr::*;
        let post = u64::from(HVCALL_POST_MESSAGE);
        let signal = u64::from(SIGNAL_EVENT_FAST);
        // VMBus InitiateContact (msgtype 14) asking for version 5.0 from VP 0.
        let mut contact = vec![0u8; 40];
        contact[..4].copy_from_slice(&14u32.to_le_bytes());
        contact[8..12].copy_from_slice(&0x0005_0000u32.to_le_bytes());
        let linux_start = Seed::default()
            .rdmsr(0, VP_INDEX)
            .wrmsr(0, GUEST_OS_ID, 0x8100_0006_0100_0000)
            .wrmsr(0, HYPERCALL, 0x2000 | 1)
            .rdmsr(0, HYPERCALL)
            .wrmsr(0, VP_ASSIST_PAGE, 0x3000 | 1)
            .wrmsr(0, SIMP, 0x4000 | 1)
            .wrmsr(0, SIEFP, 0x5000 | 1)
            .wrmsr(0, SINT0 + 2, 0xF3)
            .wrmsr(0, SCONTROL, 1)
            .post(0x6000, 4, &contact)
            .wrmsr(0, EOM, 0)
            .hypercall(signal, 0x0000_0000_0000_0011, true)
            .fast_rax(0x11, 0);
        let hostile = Seed::default()
            .wrmsr(1, HYPERCALL, 0x7000 | 1) // before GUEST_OS_ID: ignored
            .wrmsr(1, SINT0 + 3, 0x05) // exception vector, unmasked: #GP
            .wrmsr(1, VP_INDEX, 9) // read-only: #GP
            .wrmsr(1, 0x4000_01FF, 1) // unknown synthetic MSR
            .rdmsr(1, 0xC000_0080) // not synthetic at all
            .fill(0x8000, &[0xFF; 255])
            .hypercall(post, 0x8000, true) // message type and size from the fill
            .hypercall(post, 0x8FF8, true) // crosses a page
            .hypercall(post, 0x8004, true) // unaligned
            .hypercall(post, 0x10_0000, true) // outside RAM
            .hypercall(post | (1 << 16), 0x8000, true) // "fast" post
            .hypercall(post | (3 << 32), 0x8000, true) // rep count
            .hypercall(0x5D, 0x11, true) // slow signal
            .hypercall(0x4_0002, 0, true) // another call code
            .hypercall(signal, 0x11, false) // unknown connection
            .wrmsr(0, CRASH_P0, 0xDEAD)
            .wrmsr(0, CRASH_CTL, 1 << 63);
        let mut flood = Seed::default().wrmsr(0, GUEST_OS_ID, 1);
        for i in 0..64u16 {
            flood = flood.post(0x100 * (i % 32), 1 + u32::from(i % 5), &[i as u8; 240]);
        }
        vec![
            ("linux-start", linux_start.0),
            ("hostile", hostile.0),
            ("post-flood", flood.0),
        ]
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_run_clean() {
        for (_, s) in super::seed::all() {
            super::hyperv_handlers(&s);
        }
    }
}
