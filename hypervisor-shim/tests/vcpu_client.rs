//! vsc's VMBus client against a real vspd, with every HvPostMessage and HvSignalEvent executed
//! by a vCPU through the real hypercall page: the guest runs a mailbox loop (post, signal, EOM
//! on command), and the client's messages are taken from the guest's SIMP page, which vspd
//! wrote. The client negotiates, reads the offers, creates a ring GPADL in guest memory and
//! opens a channel; then its HvSignalEvent calls reach vspd's eventfd with no exit.

mod common;

use common::client_vm::ClientVm;
use common::mailbox::{CMD_EXIT, CMD_SIGNAL};
use common::{kvm_or_skip, InProcessVspd};
use hypervisor_shim::hyperv::status;
use hypervisor_shim::vm::ExitStatus;
use std::sync::atomic::Ordering;
use vmbus_proto::channel::Guid;

#[test]
fn vsc_client_through_a_vcpu_opens_a_channel_and_signals_without_exits() {
    if !kvm_or_skip("vsc_client_through_a_vcpu_opens_a_channel_and_signals_without_exits") {
        return;
    }
    const SIGNALS: u64 = 200;
    let class = Guid::from_fields(0x5EC0_0001, 1, 2, [3, 4, 5, 6, 7, 8, 9, 10]);
    let offer = vsp::server::OfferSpec {
        interface_type: class,
        interface_instance: Guid::from_fields(0x5EC0_0002, 1, 2, [3, 4, 5, 6, 7, 8, 9, 10]),
        subchannel_index: 0,
        mmio_megabytes: 0,
        flags: 0,
        user_defined: [0; 120],
    };
    let vspd = InProcessVspd::start("vcpu-client", vec![offer]);

    let mut vm = ClientVm::start(&vspd.socket);
    let offers = vm.client.request_offers().expect("offers");
    let o = offers
        .iter()
        .find(|o| o.interface_type == class)
        .expect("our offer");
    vm.open(o);
    for _ in 0..SIGNALS {
        vsc::synic::HostInterface::signal_event(&*vm.host, o.connection_id).expect("signal");
    }
    // An id vspd never opened is forwarded for the daemon to ignore.
    assert_eq!(
        vm.mailbox.run(CMD_SIGNAL, 0xBAD),
        u64::from(status::SUCCESS)
    );

    let out = vm.finish(CMD_EXIT).expect("run");
    vspd.stop();

    assert_eq!(out.status, ExitStatus::DebugExit(0x600D));
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    eprintln!("exits over the whole run: {:?}", out.exits);
    assert_eq!(
        n(&out.exits.signal_exits),
        1,
        "the {SIGNALS} signals of the open channel cost no exit (only the unknown id's did)"
    );
}
