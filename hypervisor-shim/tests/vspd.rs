//! A vCPU attached to a real `vspd` (its daemon, run in this process) over the partition
//! socket: the guest programs the SynIC through the MSRs, posts InitiateContact through the
//! hypercall page, and finds the daemon's VersionResponse in its SIMP slot, with the VMBus
//! SINT's vector raised in its LAPIC through the irqfd the shim handed over.

mod common;

use common::vmbus::{contact_guest, initiate_contact, INPUT, RESULTS, VECTOR};
use common::{kvm_or_skip, Console, InProcessVspd};
use hypervisor_shim::vm::{ExitStatus, Vm, VmConfig};
use vmbus_proto::channel::{MessageType, VersionResponse};
use zerocopy::{FromBytes, IntoBytes};

/// The tests here run one at a time: one of them counts the process's descriptors, which the
/// others' VMs and sessions would change under it (`cargo test` runs tests as threads).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn a_vcpu_posts_initiate_contact_and_vspd_answers_in_its_simp() {
    if !kvm_or_skip("a_vcpu_posts_initiate_contact_and_vspd_answers_in_its_simp") {
        return;
    }
    let _serial = serial();
    let vspd = InProcessVspd::start("vspd", Vec::new());

    let mut vm = Vm::new(VmConfig {
        memory: 4 << 20,
        vcpus: 1,
    })
    .expect("create VM");
    vm.attach(&vspd.socket).expect("attach to vspd");
    let ram = vm.ram();
    ram.write(INPUT, initiate_contact().as_bytes()).unwrap();
    let entry = vm.load_flat(&contact_guest(INPUT).unwrap()).unwrap();
    let out = vm.run(entry, Box::new(Console::default())).expect("run");
    vspd.stop();

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

/// A guest that misuses the interface while another guest on the same vspd starts VMBus: bad
/// input pages, an unknown call code, an oversized payload, an unknown connection id, a SIMP
/// outside its RAM and a flood of posts. Each call gets its Hyper-V status, the hostile VM ends
/// cleanly, and the other guest still gets its VersionResponse.
#[test]
fn a_misbehaving_guest_gets_statuses_and_another_guest_is_served() {
    use common::vmbus::wrmsr;
    use hypervisor_shim::hyperv::{self, status};
    use iced_x86::code_asm::*;
    if !kvm_or_skip("a_misbehaving_guest_gets_statuses_and_another_guest_is_served") {
        return;
    }
    let _serial = serial();
    const FLOOD: u32 = 2000;
    let vspd = InProcessVspd::start("vspd-hostile", Vec::new());

    // The hostile guest's input pages: a good one, one with 241 payload bytes, one naming an
    // unknown connection.
    let good = initiate_contact();
    let mut oversized = good;
    oversized.payload_size = 241;
    let mut stranger = good;
    stranger.connection_id = 77;
    // (Below the page tables at 0x9000-0xEFFF.)
    let (good_at, oversized_at, stranger_at) = (0x7000u64, 0x8000u64, 0x2000u64);
    let calls: [(u64, u64); 7] = [
        (0x5C, 0x4000_0000),  // input outside RAM
        (0x5C, good_at + 4),  // misaligned
        (0x0042, good_at),    // unknown call code
        (0x5C, oversized_at), // oversized payload
        (0x5C, stranger_at),  // unknown connection id
        (0x5C, 0xFFF8),       // crosses into the next page
        (0x1_005D, 55),       // signal of a connection vspd never opened
    ];
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rdi, RESULTS).unwrap();
    wrmsr(&mut a, hyperv::GUEST_OS_ID, 1).unwrap();
    wrmsr(&mut a, hyperv::HYPERCALL, 0x4000 | 1).unwrap();
    wrmsr(&mut a, hyperv::SIMP, 0x7F00_0000 | 1).unwrap(); // outside its 4 MiB
    wrmsr(&mut a, hyperv::SINT0 + 2, u64::from(VECTOR)).unwrap();
    wrmsr(&mut a, hyperv::SCONTROL, 1).unwrap();
    for (i, (control, input)) in calls.iter().enumerate() {
        a.mov(rcx, *control).unwrap();
        a.mov(rdx, *input).unwrap();
        a.mov(rax, 0x4000u64).unwrap();
        a.call(rax).unwrap();
        a.mov(qword_ptr(rdi + 8 * i as i32), rax).unwrap();
    }
    // The flood: FLOOD good posts, statuses OR-ed.
    a.xor(r12d, r12d).unwrap();
    a.mov(r13d, FLOOD).unwrap();
    let mut again = a.create_label();
    a.set_label(&mut again).unwrap();
    a.mov(rcx, 0x5Cu64).unwrap();
    a.mov(rdx, good_at).unwrap();
    a.mov(rax, 0x4000u64).unwrap();
    a.call(rax).unwrap();
    a.or(r12, rax).unwrap();
    a.dec(r13d).unwrap();
    a.jnz(again).unwrap();
    a.mov(qword_ptr(rdi + 0x40), r12).unwrap();
    common::guests::exit(&mut a, 0x600D).unwrap();

    let mut hostile = Vm::new(VmConfig {
        memory: 4 << 20,
        vcpus: 1,
    })
    .unwrap();
    hostile
        .attach(&vspd.socket)
        .expect("attach the hostile guest");
    let hostile_ram = hostile.ram();
    hostile_ram.write(good_at, good.as_bytes()).unwrap();
    hostile_ram
        .write(oversized_at, oversized.as_bytes())
        .unwrap();
    hostile_ram.write(stranger_at, stranger.as_bytes()).unwrap();
    let hostile_entry = hostile.load_flat(&common::guests::assemble(a)).unwrap();
    let hostile_run =
        std::thread::spawn(move || hostile.run(hostile_entry, Box::new(Console::default())));

    let mut vm = Vm::new(VmConfig {
        memory: 4 << 20,
        vcpus: 1,
    })
    .expect("create VM");
    vm.attach(&vspd.socket).expect("attach the good guest");
    let ram = vm.ram();
    ram.write(INPUT, initiate_contact().as_bytes()).unwrap();
    let entry = vm.load_flat(&contact_guest(INPUT).unwrap()).unwrap();
    let out = vm.run(entry, Box::new(Console::default())).expect("run");
    let hostile_out = hostile_run
        .join()
        .unwrap()
        .expect("the hostile VM ends cleanly");
    vspd.stop();

    assert_eq!(
        out.status,
        ExitStatus::DebugExit(0x600D),
        "the good guest was served"
    );
    assert_eq!(hostile_out.status, ExitStatus::DebugExit(0x600D));
    let mut r = [0u8; 0x48];
    hostile_ram.read(RESULTS, &mut r).unwrap();
    let q = |i: usize| u64::from_le_bytes(r[8 * i..8 * i + 8].try_into().unwrap());
    let want = [
        status::INVALID_PARAMETER,
        status::INVALID_ALIGNMENT,
        status::INVALID_HYPERCALL_CODE,
        status::INVALID_PARAMETER,
        status::INVALID_CONNECTION_ID,
        status::INVALID_ALIGNMENT,
        // Forwarded as SIGNAL_EVENT (vspd owns the ids and ignores this one).
        status::SUCCESS,
    ];
    for (i, w) in want.iter().enumerate() {
        assert_eq!(q(i), u64::from(*w), "call {i}: {:x?}", calls[i]);
    }
    // Each flooded post was forwarded (0) or, with the socket full, refused with
    // INSUFFICIENT_BUFFERS for the guest to retry: nothing else.
    let insufficient = u64::from(hyperv::status::INSUFFICIENT_BUFFERS);
    assert_eq!(q(8) & !insufficient, 0, "flood statuses OR-ed: {:#x}", q(8));
    eprintln!("hostile guest exits: {:?}", hostile_out.exits);
    // Its SIMP was outside RAM: vspd was never given it, so no interrupt reached the LAPIC.
    assert_eq!(
        hostile_out.lapic_irr[0][(VECTOR / 32) as usize] & (1 << (VECTOR % 32)),
        0
    );
}

/// Guests that start VMBus and then reset, again and again: each VM ends with Reset, the shim
/// closes everything it opened (VM, vCPUs, memfd, irqfds, the socket) and vspd releases the
/// session, so the process's descriptors come back to where they were; the daemon still
/// serves the next guest.
#[test]
fn guests_that_reset_leave_nothing_behind() {
    use common::vmbus::wrmsr;
    use hypervisor_shim::hyperv;
    use iced_x86::code_asm::*;
    if !kvm_or_skip("guests_that_reset_leave_nothing_behind") {
        return;
    }
    let _serial = serial();
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let vspd = InProcessVspd::start("vspd-reset", Vec::new());
    // The resetting guest: SynIC on, InitiateContact posted, then a reset through 0xCF9
    // while vspd may still be answering.
    let mut a = CodeAssembler::new(64).unwrap();
    wrmsr(&mut a, hyperv::GUEST_OS_ID, 1).unwrap();
    wrmsr(&mut a, hyperv::HYPERCALL, 0x4000 | 1).unwrap();
    wrmsr(&mut a, hyperv::SIMP, 0x3000 | 1).unwrap();
    wrmsr(&mut a, hyperv::SIEFP, 0x5000 | 1).unwrap();
    wrmsr(&mut a, hyperv::SINT0 + 2, u64::from(VECTOR)).unwrap();
    wrmsr(&mut a, hyperv::SCONTROL, 1).unwrap();
    a.mov(rcx, 0x5Cu64).unwrap();
    a.mov(rdx, INPUT).unwrap();
    a.mov(rax, 0x4000u64).unwrap();
    a.call(rax).unwrap();
    a.mov(dx, 0xCF9u32).unwrap();
    a.mov(al, 0x06u32).unwrap();
    a.out(dx, al).unwrap();
    common::guests::exit(&mut a, 1).unwrap();
    let image = common::guests::assemble(a);

    let run_one = |image: &[u8]| {
        let mut vm = Vm::new(VmConfig {
            memory: 4 << 20,
            vcpus: 2,
        })
        .expect("create VM");
        vm.attach(&vspd.socket).expect("attach");
        vm.ram()
            .write(INPUT, initiate_contact().as_bytes())
            .unwrap();
        let entry = vm.load_flat(image).unwrap();
        vm.run(entry, Box::new(Console::default())).expect("run")
    };
    let baseline = fds();
    for round in 0..5 {
        let out = run_one(&image);
        assert_eq!(out.status, ExitStatus::Reset, "round {round}");
        // vspd tears the session down asynchronously.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while fds() != baseline {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: {} descriptors open, {baseline} before",
                fds()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    let out = run_one(&contact_guest(INPUT).unwrap());
    assert_eq!(
        out.status,
        ExitStatus::DebugExit(0x600D),
        "still served after the resets"
    );
    vspd.stop();
}

/// Two VPs: VP 1 programs its own SynIC, VP 0 posts InitiateContact naming VP 1 as the target;
/// the VersionResponse lands in VP 1's SIMP and the SINT vector in VP 1's LAPIC (the irqfd of
/// VP 1 is routed as an MSI to APIC id 1), not in VP 0's.
#[test]
fn messages_reach_the_vp_the_guest_names() {
    use common::guests;
    use common::vmbus::wrmsr;
    use hypervisor_shim::hyperv;
    use iced_x86::code_asm::*;
    if !kvm_or_skip("messages_reach_the_vp_the_guest_names") {
        return;
    }
    let _serial = serial();
    const AP_CODE: u64 = 0x18_0000;
    const VP1_SIMP: u64 = 0x2_0000;
    const VP1_SIEFP: u64 = 0x2_1000;
    const READY: u64 = 0x6100;
    const DONE: u64 = 0x6101;
    const COPY: u64 = 0x6200;
    const POLLS: u32 = 4_000_000;
    let wait_for = |a: &mut CodeAssembler, flag: u64, fail: u32| {
        let mut again = a.create_label();
        let mut ok = a.create_label();
        a.mov(rsi, flag).unwrap();
        a.mov(r13d, POLLS).unwrap();
        a.set_label(&mut again).unwrap();
        a.cmp(byte_ptr(rsi), 0u32).unwrap();
        a.jne(ok).unwrap();
        a.dec(r13d).unwrap();
        a.jnz(again).unwrap();
        guests::exit(a, fail).unwrap();
        a.set_label(&mut ok).unwrap();
    };

    // VP 1.
    let mut b = CodeAssembler::new(64).unwrap();
    b.mov(rax, 0xFEE0_00F0u64).unwrap();
    b.mov(dword_ptr(rax), 0x1FFu32).unwrap();
    wrmsr(&mut b, hyperv::SIMP, VP1_SIMP | 1).unwrap();
    wrmsr(&mut b, hyperv::SIEFP, VP1_SIEFP | 1).unwrap();
    wrmsr(&mut b, hyperv::SINT0 + 2, u64::from(VECTOR)).unwrap();
    wrmsr(&mut b, hyperv::SCONTROL, 1).unwrap();
    b.mov(rax, READY).unwrap();
    b.mov(byte_ptr(rax), 1u32).unwrap();
    wait_for(&mut b, VP1_SIMP + 512, 0xDEAD1);
    b.mov(rsi, VP1_SIMP + 512).unwrap();
    b.mov(rdi, COPY).unwrap();
    for i in 0..6 {
        b.mov(rax, qword_ptr(rsi + i * 8)).unwrap();
        b.mov(qword_ptr(rdi + i * 8), rax).unwrap();
    }
    b.mov(dword_ptr(rsi), 0u32).unwrap();
    wrmsr(&mut b, hyperv::EOM, 0).unwrap();
    b.mov(rax, DONE).unwrap();
    b.mov(byte_ptr(rax), 1u32).unwrap();
    let mut spin = b.create_label();
    b.set_label(&mut spin).unwrap();
    b.jmp(spin).unwrap();
    let ap = b.assemble(AP_CODE).unwrap();

    // VP 0.
    let mut a = CodeAssembler::new(64).unwrap();
    wrmsr(&mut a, hyperv::GUEST_OS_ID, 1).unwrap();
    wrmsr(&mut a, hyperv::HYPERCALL, 0x4000 | 1).unwrap();
    wait_for(&mut a, READY, 0xDEAD2);
    a.mov(rcx, 0x5Cu64).unwrap();
    a.mov(rdx, INPUT).unwrap();
    a.xor(r8d, r8d).unwrap();
    a.mov(rax, 0x4000u64).unwrap();
    a.call(rax).unwrap();
    a.mov(rdi, RESULTS).unwrap();
    a.mov(qword_ptr(rdi), rax).unwrap();
    wait_for(&mut a, DONE, 0xDEAD0);
    guests::exit(&mut a, 0x600D).unwrap();

    let vspd = InProcessVspd::start("vspd-vp1", Vec::new());

    let mut vm = Vm::new(VmConfig {
        memory: 4 << 20,
        vcpus: 2,
    })
    .expect("create VM");
    vm.attach(&vspd.socket).expect("attach");
    let ram = vm.ram();
    let mut contact = initiate_contact();
    contact.payload[12..16].copy_from_slice(&1u32.to_le_bytes()); // target_vcpu = 1
    ram.write(INPUT, contact.as_bytes()).unwrap();
    ram.write(AP_CODE, &ap).unwrap();
    vm.start_ap(1, AP_CODE).unwrap();
    let entry = vm.load_flat(&guests::assemble(a)).unwrap();
    let out = vm.run(entry, Box::new(Console::default())).expect("run");
    vspd.stop();

    assert_eq!(
        out.status,
        ExitStatus::DebugExit(0x600D),
        "0xDEADn: VP n waited in vain"
    );
    let mut r = [0u8; 8];
    ram.read(RESULTS, &mut r).unwrap();
    assert_eq!(u64::from_le_bytes(r), 0, "HvPostMessage status");
    let mut slot = [0u8; 48];
    ram.read(COPY, &mut slot).unwrap();
    assert_eq!(
        u32::from_le_bytes(slot[..4].try_into().unwrap()),
        1,
        "HvMessageType VMBUS"
    );
    let resp = VersionResponse::read_from_bytes(&slot[16..32]).unwrap();
    assert_eq!(resp.header.message_type, MessageType::VERSION_RESPONSE);
    assert_eq!(resp.version_supported, 1);
    let pending = |vp: usize| out.lapic_irr[vp][(VECTOR / 32) as usize] & (1 << (VECTOR % 32)) != 0;
    assert!(
        pending(1),
        "VP 1's LAPIC has the SINT vector: {:x?}",
        out.lapic_irr
    );
    assert!(!pending(0), "VP 0's LAPIC does not: {:x?}", out.lapic_irr);
}
