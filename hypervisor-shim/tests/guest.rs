//! Small guests assembled here, run on a real vCPU: the UART, the debug-exit port, reset and
//! emulation failures.

mod common;

use common::{guests, kvm_or_skip, Console};
use hypervisor_shim::vm::{ExitStatus, Vm, VmConfig};
use hypervisor_shim::Error;
use iced_x86::code_asm::*;

fn run(
    image: &[u8],
    vcpus: u32,
) -> (
    hypervisor_shim::Result<hypervisor_shim::vm::Outcome>,
    String,
) {
    let vm = Vm::new(VmConfig {
        memory: 4 << 20,
        vcpus,
    })
    .expect("create VM");
    let entry = vm.load_flat(image).expect("load");
    let console = Console::default();
    let r = vm.run(entry, Box::new(console.clone()));
    (r, console.text())
}

#[test]
fn guest_prints_hello_and_exits_with_its_code() {
    if !kvm_or_skip("guest_prints_hello_and_exits_with_its_code") {
        return;
    }
    let (r, text) = run(&guests::hello(42), 1);
    let out = r.expect("run");
    assert_eq!(text, "hello\n");
    assert_eq!(out.status, ExitStatus::DebugExit(42));
    eprintln!("exits: {:?}", out.exits);
}

#[test]
fn idle_application_processors_do_not_keep_the_vm_alive() {
    if !kvm_or_skip("idle_application_processors_do_not_keep_the_vm_alive") {
        return;
    }
    let (r, text) = run(&guests::hello(7), 4);
    assert_eq!(r.expect("run").status, ExitStatus::DebugExit(7));
    assert_eq!(text, "hello\n");
}

#[test]
fn reset_port_ends_the_vm_with_reset() {
    if !kvm_or_skip("reset_port_ends_the_vm_with_reset") {
        return;
    }
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(dx, 0xCF9u32).unwrap();
    a.mov(al, 0x06u32).unwrap();
    a.out(dx, al).unwrap();
    guests::exit(&mut a, 1).unwrap();
    let (r, _) = run(&guests::assemble(a), 1);
    assert_eq!(r.expect("run").status, ExitStatus::Reset);
}

#[test]
fn a_fault_at_cpl0_ends_the_vm_with_the_exit_details() {
    if !kvm_or_skip("a_fault_at_cpl0_ends_the_vm_with_the_exit_details") {
        return;
    }
    // ud2 with no IDT: on this KVM, an emulation failure; with hardware virtualization, a
    // triple fault. Either way the VM ends and says why.
    let mut a = CodeAssembler::new(64).unwrap();
    guests::print(&mut a, b"x").unwrap();
    a.ud2().unwrap();
    let (r, text) = run(&guests::assemble(a), 1);
    assert_eq!(text, "x");
    match r {
        Err(Error::Emulation {
            vcpu: 0,
            suberror,
            rip,
            ..
        }) => {
            eprintln!("emulation failure: suberror {suberror} rip {rip:#x}");
        }
        Ok(out) => {
            eprintln!("ended with {:?}", out.status);
            assert_eq!(out.status, ExitStatus::TripleFault);
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn vm_config_is_checked() {
    let bad = |memory, vcpus| matches!(Vm::new(VmConfig { memory, vcpus }), Err(Error::Config(_)));
    assert!(bad(4 << 20, 0));
    assert!(bad(4 << 20, 65));
    assert!(bad(1 << 20, 1));
    assert!(bad((4 << 20) + 1, 1));
    assert!(matches!(
        Vm::new(VmConfig {
            memory: 1 << 50,
            vcpus: 1
        }),
        Err(Error::MemoryTooLarge { .. })
    ));
}

#[test]
fn an_exception_the_emulator_cannot_deliver_is_reported_as_an_error() {
    if !kvm_or_skip("an_exception_the_emulator_cannot_deliver_is_reported_as_an_error") {
        return;
    }
    // A valid IDT whose #BP gate leads to a handler that exits with 3, then int3. With hardware
    // virtualization the handler runs; on the emulating KVM of these machines the exception
    // cannot be delivered at CPL 0 and KVM reports an internal error (emulation failure).
    const IDT: u64 = 0x8000;
    const IDTR: u64 = 0x7000;
    const HANDLER: u64 = 0x20_0000;
    let vm = Vm::new(VmConfig {
        memory: 4 << 20,
        vcpus: 1,
    })
    .expect("create VM");
    let ram = vm.ram();
    let mut h = CodeAssembler::new(64).unwrap();
    guests::exit(&mut h, 3).unwrap();
    ram.write(HANDLER, &h.assemble(HANDLER).unwrap()).unwrap();
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(HANDLER as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&0x08u16.to_le_bytes());
    gate[5] = 0x8E; // present, DPL 0, 64-bit interrupt gate
    gate[6..8].copy_from_slice(&((HANDLER >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((HANDLER >> 32) as u32).to_le_bytes());
    ram.write(IDT + 3 * 16, &gate).unwrap();
    let mut idtr = [0u8; 10];
    idtr[0..2].copy_from_slice(&(256u16 * 16 - 1).to_le_bytes());
    idtr[2..10].copy_from_slice(&IDT.to_le_bytes());
    ram.write(IDTR, &idtr).unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, IDTR).unwrap();
    a.lidt(ptr(rax)).unwrap();
    a.int3().unwrap();
    guests::exit(&mut a, 1).unwrap();
    let entry = vm.load_flat(&guests::assemble(a)).unwrap();
    match vm.run(entry, Box::new(Console::default())) {
        Err(Error::Emulation {
            vcpu: 0,
            suberror,
            rip,
            data,
        }) => {
            eprintln!("emulation failure: suberror {suberror} rip {rip:#x} data {data:x?}");
            assert_eq!(suberror, 1, "KVM_INTERNAL_ERROR_EMULATION");
        }
        Ok(out) => assert_eq!(out.status, ExitStatus::DebugExit(3)),
        Err(e) => panic!("unexpected error: {e}"),
    }
}
