//! A guest that does what hv_vmbus does first: reads the Hyper-V CPUID leaves, sets
//! GUEST_OS_ID, programs SIMP and a SINT, enables the hypercall page and calls through it.
//! Results are stored in guest RAM and read by the test after the run.

mod common;

use common::{guests, kvm_or_skip, Console};
use hypervisor_shim::hyperv::{self, status};
use hypervisor_shim::vm::{ExitStatus, Vm, VmConfig};
use iced_x86::code_asm::*;

const RESULTS: u64 = 0x6000;
const HYPERCALL_PAGE: u64 = 0x4000;
const SIMP_PAGE: u64 = 0x3000;
const OS_ID: u64 = 0x8100_0601_0000_1234;

fn store_edx_eax(a: &mut CodeAssembler, off: i32) -> Result<(), IcedError> {
    a.shl(rdx, 32u32)?;
    a.mov(eax, eax)?; // zero-extend
    a.or(rax, rdx)?;
    a.mov(qword_ptr(rdi + off), rax)
}

fn wrmsr(a: &mut CodeAssembler, msr: u32, value: u64) -> Result<(), IcedError> {
    a.mov(ecx, msr)?;
    a.mov(eax, value as u32)?;
    a.mov(edx, (value >> 32) as u32)?;
    a.wrmsr()
}

fn rdmsr(a: &mut CodeAssembler, msr: u32, off: i32) -> Result<(), IcedError> {
    a.mov(ecx, msr)?;
    a.rdmsr()?;
    store_edx_eax(a, off)
}

fn hypercall(a: &mut CodeAssembler, control: u64, off: i32) -> Result<(), IcedError> {
    a.mov(rcx, control)?;
    a.mov(rdx, 7u64)?;
    a.xor(r8d, r8d)?;
    a.mov(rax, HYPERCALL_PAGE)?;
    a.call(rax)?;
    a.mov(qword_ptr(rdi + off), rax)
}

fn guest() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.mov(rdi, RESULTS)?;
    for (i, leaf) in [0x4000_0000u32, 0x4000_0001, 0x4000_0003, 0x4000_0004]
        .into_iter()
        .enumerate()
    {
        let off = (i * 16) as i32;
        a.mov(eax, leaf)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(dword_ptr(rdi + off), eax)?;
        a.mov(dword_ptr(rdi + off + 4), ebx)?;
        a.mov(dword_ptr(rdi + off + 8), ecx)?;
        a.mov(dword_ptr(rdi + off + 12), edx)?;
    }
    wrmsr(&mut a, hyperv::GUEST_OS_ID, OS_ID)?;
    rdmsr(&mut a, hyperv::GUEST_OS_ID, 0x40)?;
    wrmsr(&mut a, hyperv::SIMP, SIMP_PAGE | 1)?;
    rdmsr(&mut a, hyperv::SIMP, 0x48)?;
    rdmsr(&mut a, hyperv::VP_INDEX, 0x50)?;
    rdmsr(&mut a, hyperv::SVERSION, 0x58)?;
    rdmsr(&mut a, hyperv::SINT0 + 2, 0x60)?;
    wrmsr(&mut a, hyperv::SINT0 + 2, 0xF3)?;
    rdmsr(&mut a, hyperv::SINT0 + 2, 0x68)?;
    wrmsr(&mut a, hyperv::HYPERCALL, HYPERCALL_PAGE | 1)?;
    rdmsr(&mut a, hyperv::HYPERCALL, 0x70)?;
    // HvSignalEvent (fast) and an unknown call code, through the page.
    hypercall(&mut a, 0x1_005D, 0x78)?;
    hypercall(&mut a, 0x0099, 0x80)?;
    rdmsr(&mut a, hyperv::APIC_FREQUENCY, 0x88)?;
    guests::print(&mut a, b"hv ok\n")?;
    guests::exit(&mut a, 0x600D)?;
    Ok(guests::assemble(a))
}

#[test]
fn guest_sees_hyper_v_and_its_synthetic_msrs() {
    if !kvm_or_skip("guest_sees_hyper_v_and_its_synthetic_msrs") {
        return;
    }
    let vm = Vm::new(VmConfig {
        memory: 4 << 20,
        vcpus: 1,
    })
    .expect("create VM");
    let ram = vm.ram();
    let entry = vm.load_flat(&guest().unwrap()).unwrap();
    let console = Console::default();
    let out = vm.run(entry, Box::new(console.clone())).expect("run");
    assert_eq!(out.status, ExitStatus::DebugExit(0x600D));
    assert_eq!(console.text(), "hv ok\n");
    let mut r = [0u8; 0x90];
    ram.read(RESULTS, &mut r).unwrap();
    let d = |o: usize| u32::from_le_bytes(r[o..o + 4].try_into().unwrap());
    let q = |o: usize| u64::from_le_bytes(r[o..o + 8].try_into().unwrap());
    // 0x40000000: max leaf and "Microsoft Hv", not KVM's signature.
    assert_eq!(d(0), 0x4000_0006);
    assert_eq!([d(4), d(8), d(12)], hyperv::SIGNATURE);
    assert_eq!(d(16), hyperv::INTERFACE, "Hv#1");
    assert_eq!(d(32) & 0x64, 0x64, "SynIC, hypercall and VP index MSRs");
    assert_eq!(d(36) & 0x30, 0x30, "PostMessages, SignalEvents");
    assert_eq!(d(48) & (1 << 9), 1 << 9, "AEOI deprecated");
    assert_eq!(q(0x40), OS_ID);
    assert_eq!(q(0x48), SIMP_PAGE | 1);
    assert_eq!(q(0x50), 0, "VP index");
    assert_eq!(q(0x58), 1, "SVERSION");
    assert_eq!(q(0x60), 1 << 16, "SINT reset value is masked");
    assert_eq!(q(0x68), 0xF3);
    assert_eq!(q(0x70), HYPERCALL_PAGE | 1);
    assert_eq!(q(0x78), u64::from(status::INVALID_CONNECTION_ID));
    assert_eq!(q(0x80), u64::from(status::INVALID_HYPERCALL_CODE));
    assert_eq!(q(0x88), hyperv::APIC_HZ);
    let mut page = [0u8; 4096];
    ram.read(HYPERCALL_PAGE, &mut page).unwrap();
    assert_eq!(page, hyperv::hypercall_page());
    assert_eq!(out.partition.guest_os_id, OS_ID);
    eprintln!("exits: {:?}", out.exits);
    let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        n(&out.exits.hypercall),
        1,
        "the unknown call code, on the slow path"
    );
    assert_eq!(
        n(&out.exits.signal_exits),
        1,
        "a signal of an unbound connection exits"
    );
}

/// HvSignalEvent through the page to a connection bound with KVM_IOEVENTFD: the eventfd fires
/// and the call costs no exit to userspace; an unbound connection exits and gets its status.
#[test]
fn a_bound_signal_costs_no_exit() {
    if !kvm_or_skip("a_bound_signal_costs_no_exit") {
        return;
    }
    const CALLS: u32 = 1000;
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rdi, RESULTS).unwrap();
    wrmsr(&mut a, hyperv::GUEST_OS_ID, OS_ID).unwrap();
    wrmsr(&mut a, hyperv::HYPERCALL, HYPERCALL_PAGE | 1).unwrap();
    // CALLS signals of connection 9 (bound), OR-ing their statuses together.
    a.xor(r12d, r12d).unwrap();
    a.mov(r13d, CALLS).unwrap();
    let mut again = a.create_label();
    a.set_label(&mut again).unwrap();
    a.mov(rcx, 0x1_005Du64).unwrap();
    a.mov(rdx, 9u64).unwrap();
    a.mov(rax, HYPERCALL_PAGE).unwrap();
    a.call(rax).unwrap();
    a.or(r12, rax).unwrap();
    a.dec(r13d).unwrap();
    a.jnz(again).unwrap();
    a.mov(qword_ptr(rdi), r12).unwrap();
    // One signal of connection 10 (unbound).
    hypercall(&mut a, 0x1_005D, 8).unwrap(); // rdx = 7 in `hypercall`: unbound as well
    guests::exit(&mut a, 0x600D).unwrap();
    let image = guests::assemble(a);

    let vm = Vm::new(VmConfig {
        memory: 4 << 20,
        vcpus: 1,
    })
    .expect("create VM");
    let efd = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    vm.bind_signal(9, &efd).unwrap();
    let ram = vm.ram();
    let entry = vm.load_flat(&image).unwrap();
    let started = std::time::Instant::now();
    let out = vm.run(entry, Box::new(Console::default())).expect("run");
    let bound_time = started.elapsed();
    // The same guest with nothing bound: every signal exits (a figure, not an assertion).
    let unbound = Vm::new(VmConfig {
        memory: 4 << 20,
        vcpus: 1,
    })
    .expect("create VM");
    let entry = unbound.load_flat(&image).unwrap();
    let started = std::time::Instant::now();
    let out2 = unbound
        .run(entry, Box::new(Console::default()))
        .expect("run");
    eprintln!(
        "{CALLS} HvSignalEvent calls: bound {bound_time:?} ({:?} exits), unbound {:?} ({:?} exits)",
        out.exits.total,
        started.elapsed(),
        out2.exits.total
    );
    assert_eq!(out.status, ExitStatus::DebugExit(0x600D));
    let mut r = [0u8; 16];
    ram.read(RESULTS, &mut r).unwrap();
    assert_eq!(
        u64::from_le_bytes(r[..8].try_into().unwrap()),
        0,
        "every bound signal succeeded"
    );
    assert_eq!(
        u64::from_le_bytes(r[8..].try_into().unwrap()),
        u64::from(status::INVALID_CONNECTION_ID)
    );
    assert_eq!(
        efd.read().unwrap(),
        u64::from(CALLS),
        "the eventfd counted every signal"
    );
    let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{CALLS} bound signals: exits {:?}", out.exits);
    assert_eq!(
        n(&out.exits.signal_exits),
        1,
        "only the unbound signal exited"
    );
    assert_eq!(n(&out.exits.hypercall), 0);
}

/// A guest panic reported through the crash MSRs is printed on the console.
#[test]
fn a_guest_crash_report_is_printed() {
    if !kvm_or_skip("a_guest_crash_report_is_printed") {
        return;
    }
    let mut a = CodeAssembler::new(64).unwrap();
    for i in 0..5u32 {
        wrmsr(&mut a, hyperv::CRASH_P0 + i, 0xC0DE_0000 + u64::from(i)).unwrap();
    }
    wrmsr(&mut a, hyperv::CRASH_CTL, 1 << 63).unwrap();
    guests::exit(&mut a, 0x600D).unwrap();
    let vm = Vm::new(VmConfig {
        memory: 4 << 20,
        vcpus: 1,
    })
    .expect("create VM");
    let entry = vm.load_flat(&guests::assemble(a)).unwrap();
    let console = Console::default();
    let out = vm.run(entry, Box::new(console.clone())).expect("run");
    assert_eq!(out.status, ExitStatus::DebugExit(0x600D));
    let text = console.text();
    assert!(text.contains("guest crash reported on vCPU 0"), "{text}");
    assert!(
        text.contains("0xc0de0000") && text.contains("0xc0de0004"),
        "{text}"
    );
}
