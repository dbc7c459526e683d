//! A vCPU attached to a real `vspd` (its daemon, run in this process) over the partition
//! socket: the guest programs the SynIC through the MSRs, posts InitiateContact through the
//! hypercall page, and finds the daemon's VersionResponse in its SIMP slot, with the VMBus
//! SINT's vector raised in its LAPIC through the irqfd the shim handed over.

mod common;

use common::{guests, kvm_or_skip, Console};
use hypervisor_shim::hyperv;
use hypervisor_shim::vm::{ExitStatus, Vm, VmConfig};
use iced_x86::code_asm::*;
use vmbus_proto::channel::{
    InitiateContact, MessageHeader, MessageType, VersionResponse, VmbusVersion,
    MESSAGE_CONNECTION_ID_4, MESSAGE_SINT,
};
use vmbus_proto::synic::HvPostMessageInput;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

const RESULTS: u64 = 0x6000;
const HYPERCALL_PAGE: u64 = 0x4000;
const SIMP: u64 = 0x3000;
const SIEFP: u64 = 0x5000;
const INPUT: u64 = 0x7000;
const VECTOR: u32 = 0xF3;
const SLOT: u64 = SIMP + 256 * MESSAGE_SINT as u64;
/// Polling rounds before the guest gives up (about 4 emulated instructions each).
const POLLS: u32 = 4_000_000;

fn wrmsr(a: &mut CodeAssembler, msr: u32, value: u64) -> Result<(), IcedError> {
    a.mov(ecx, msr)?;
    a.mov(eax, value as u32)?;
    a.mov(edx, (value >> 32) as u32)?;
    a.wrmsr()
}

fn guest() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.mov(rdi, RESULTS)?;
    // Software-enable the LAPIC (SVR bit 8): KVM drops fixed interrupts to a disabled one.
    a.mov(rax, 0xFEE0_00F0u64)?;
    a.mov(dword_ptr(rax), 0x1FFu32)?;
    wrmsr(&mut a, hyperv::GUEST_OS_ID, 0x8100_0601_0000_0001)?;
    wrmsr(&mut a, hyperv::HYPERCALL, HYPERCALL_PAGE | 1)?;
    wrmsr(&mut a, hyperv::SIMP, SIMP | 1)?;
    wrmsr(&mut a, hyperv::SIEFP, SIEFP | 1)?;
    wrmsr(
        &mut a,
        hyperv::SINT0 + u32::from(MESSAGE_SINT),
        u64::from(VECTOR),
    )?;
    wrmsr(&mut a, hyperv::SCONTROL, 1)?;
    // HvPostMessage(INPUT): InitiateContact.
    a.mov(rcx, 0x5Cu64)?;
    a.mov(rdx, INPUT)?;
    a.xor(r8d, r8d)?;
    a.mov(rax, HYPERCALL_PAGE)?;
    a.call(rax)?;
    a.mov(qword_ptr(rdi), rax)?;
    // Poll the VMBus SINT's slot.
    a.mov(rsi, SLOT)?;
    a.mov(r13d, POLLS)?;
    let mut poll = a.create_label();
    let mut got = a.create_label();
    a.set_label(&mut poll)?;
    a.mov(eax, dword_ptr(rsi))?;
    a.test(eax, eax)?;
    a.jnz(got)?;
    a.dec(r13d)?;
    a.jnz(poll)?;
    guests::exit(&mut a, 0xDEAD)?;
    a.set_label(&mut got)?;
    // Copy the slot's first 48 bytes (header and the 16-byte VersionResponse), free it, EOM.
    for i in 0..6 {
        a.mov(rax, qword_ptr(rsi + i * 8))?;
        a.mov(qword_ptr(rdi + 16 + i * 8), rax)?;
    }
    a.mov(dword_ptr(rsi), 0u32)?;
    wrmsr(&mut a, hyperv::EOM, 0)?;
    guests::exit(&mut a, 0x600D)?;
    Ok(guests::assemble(a))
}

fn initiate_contact() -> HvPostMessageInput {
    let msg = InitiateContact {
        header: MessageHeader {
            message_type: MessageType::INITIATE_CONTACT,
            padding: 0,
        },
        vmbus_version_requested: VmbusVersion::WIN10_V5.0,
        target_vcpu: 0,
        interrupt_page_or_target_info: u64::from(MESSAGE_SINT),
        monitor_page1: 0x8000,
        monitor_page2: 0x2000,
    };
    let mut input = HvPostMessageInput::new_zeroed();
    input.connection_id = MESSAGE_CONNECTION_ID_4;
    input.message_type = 1;
    let bytes = msg.as_bytes();
    input.payload_size = bytes.len() as u32;
    input.payload[..bytes.len()].copy_from_slice(bytes);
    input
}

#[test]
fn a_vcpu_posts_initiate_contact_and_vspd_answers_in_its_simp() {
    if !kvm_or_skip("a_vcpu_posts_initiate_contact_and_vspd_answers_in_its_simp") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("shim-vspd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("vspd.sock");
    let daemon = vsp::daemon::Daemon::bind(
        &socket,
        vsp::daemon::DaemonConfig::default(),
        Vec::new(),
        Default::default(),
        vsp::session::unimplemented_devices(),
    )
    .expect("bind vspd");
    let stop = daemon.stop_handle();
    let served = std::thread::spawn(move || daemon.run(|| Ok((Vec::new(), Default::default()))));

    let mut vm = Vm::new(VmConfig {
        memory: 4 << 20,
        vcpus: 1,
    })
    .expect("create VM");
    vm.attach(&socket).expect("attach to vspd");
    let ram = vm.ram();
    ram.write(INPUT, initiate_contact().as_bytes()).unwrap();
    let entry = vm.load_flat(&guest().unwrap()).unwrap();
    let out = vm.run(entry, Box::new(Console::default())).expect("run");
    stop.signal().unwrap();
    served.join().unwrap().expect("vspd ran");
    let _ = std::fs::remove_dir_all(&dir);

    eprintln!("exits: {:?}", out.exits);
    assert_eq!(
        out.status,
        ExitStatus::DebugExit(0x600D),
        "0xDEAD: no message arrived"
    );
    let mut r = [0u8; 64];
    ram.read(RESULTS, &mut r).unwrap();
    assert_eq!(
        u64::from_le_bytes(r[..8].try_into().unwrap()),
        0,
        "HvPostMessage status"
    );
    let slot = &r[16..64];
    assert_eq!(
        u32::from_le_bytes(slot[..4].try_into().unwrap()),
        1,
        "HvMessageType VMBUS"
    );
    let size = usize::from(slot[4]);
    assert!(size >= 16, "payload size {size}");
    let resp = VersionResponse::read_from_bytes(&slot[16..32]).unwrap();
    assert_eq!(resp.header.message_type, MessageType::VERSION_RESPONSE);
    assert_eq!(resp.version_supported, 1, "vspd accepts VMBus 5.0");
    // The SINT vector reached the LAPIC (IF is clear, so it is still pending in the IRR).
    let irr = out.lapic_irr[0];
    assert_ne!(
        irr[(VECTOR / 32) as usize] & (1 << (VECTOR % 32)),
        0,
        "IRR {irr:x?}"
    );
}
