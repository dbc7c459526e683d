//! A vCPU attached to a real `vspd` (its daemon, run in this process) over the partition
//! socket: the guest programs the SynIC through the MSRs, posts InitiateContact through the
//! hypercall page, and finds the daemon's VersionResponse in its SIMP slot, with the VMBus
//! SINT's vector raised in its LAPIC through the irqfd the shim handed over.

mod common;

use common::vmbus::{contact_guest, initiate_contact, INPUT, RESULTS, VECTOR};
use common::{kvm_or_skip, Console};
use hypervisor_shim::vm::{ExitStatus, Vm, VmConfig};
use vmbus_proto::channel::{MessageType, VersionResponse};
use zerocopy::{FromBytes, IntoBytes};

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
    let entry = vm.load_flat(&contact_guest(INPUT).unwrap()).unwrap();
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
