//! vsc's VMBus client against a real vspd, with every HvPostMessage and HvSignalEvent executed
//! by a vCPU through the real hypercall page: the guest runs a mailbox loop (post, signal, EOM
//! on command), and the client's messages are taken from the guest's SIMP page, which vspd
//! wrote. The client negotiates, reads the offers, creates a ring GPADL in guest memory and
//! opens a channel; then its HvSignalEvent calls reach vspd's eventfd with no exit.

mod common;

use common::vmbus::wrmsr;
use common::{guests, kvm_or_skip, Console, InProcessVspd};
use hypervisor_shim::hyperv::{self, status};
use hypervisor_shim::vm::{ExitStatus, GuestRam, Vm, VmConfig};
use iced_x86::code_asm::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmbus_proto::channel::Guid;
use vmbus_proto::synic::HvPostMessageInput;
use zerocopy::{FromZeros, IntoBytes};

const MAILBOX: u64 = 0x6800;
const INPUT: u64 = 0x7000;
const SIMP: u64 = 0x3000;
const SIEFP: u64 = 0x5000;
const SLOT: u64 = SIMP + 2 * 256;
const RING: u64 = 0x4_0000;
const RING_PAGES: u64 = 8;
const CMD_POST: u64 = 1;
const CMD_SIGNAL: u64 = 2;
const CMD_EOM: u64 = 3;
const CMD_EXIT: u64 = 4;

/// The guest: SynIC on, then forever: wait for a command in the mailbox, run it through the
/// hypercall page (or the EOM MSR), store RAX, clear the command.
fn mailbox_guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, 0xFEE0_00F0u64).unwrap();
    a.mov(dword_ptr(rax), 0x1FFu32).unwrap();
    wrmsr(&mut a, hyperv::GUEST_OS_ID, 1).unwrap();
    wrmsr(&mut a, hyperv::HYPERCALL, 0x4000 | 1).unwrap();
    wrmsr(&mut a, hyperv::SIMP, SIMP | 1).unwrap();
    wrmsr(&mut a, hyperv::SIEFP, SIEFP | 1).unwrap();
    wrmsr(&mut a, hyperv::SINT0 + 2, 0xF3).unwrap();
    wrmsr(&mut a, hyperv::SCONTROL, 1).unwrap();
    a.mov(rbx, MAILBOX).unwrap();
    let mut idle = a.create_label();
    let mut ack = a.create_label();
    let mut not_post = a.create_label();
    let mut not_signal = a.create_label();
    let mut not_eom = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.mov(rax, qword_ptr(rbx)).unwrap();
    a.test(rax, rax).unwrap();
    a.jz(idle).unwrap();
    a.cmp(rax, CMD_POST as i32).unwrap();
    a.jne(not_post).unwrap();
    a.mov(rcx, 0x5Cu64).unwrap();
    a.mov(rdx, qword_ptr(rbx + 8)).unwrap();
    a.xor(r8d, r8d).unwrap();
    a.mov(rax, 0x4000u64).unwrap();
    a.call(rax).unwrap();
    a.jmp(ack).unwrap();
    a.set_label(&mut not_post).unwrap();
    a.cmp(rax, CMD_SIGNAL as i32).unwrap();
    a.jne(not_signal).unwrap();
    a.mov(rcx, 0x1_005Du64).unwrap();
    a.mov(rdx, qword_ptr(rbx + 8)).unwrap();
    a.mov(rax, 0x4000u64).unwrap();
    a.call(rax).unwrap();
    a.jmp(ack).unwrap();
    a.set_label(&mut not_signal).unwrap();
    a.cmp(rax, CMD_EOM as i32).unwrap();
    a.jne(not_eom).unwrap();
    wrmsr(&mut a, hyperv::EOM, 0).unwrap();
    a.xor(eax, eax).unwrap();
    a.jmp(ack).unwrap();
    a.set_label(&mut not_eom).unwrap();
    guests::exit(&mut a, 0x600D).unwrap();
    a.set_label(&mut ack).unwrap();
    a.mov(qword_ptr(rbx + 16), rax).unwrap();
    a.mov(qword_ptr(rbx), 0i32).unwrap();
    a.jmp(idle).unwrap();
    guests::assemble(a)
}

/// Runs commands in the guest's mailbox, one at a time.
struct Mailbox {
    ram: Arc<GuestRam>,
    lock: Mutex<()>,
}

impl Mailbox {
    fn run(&self, cmd: u64, arg: u64) -> u64 {
        let _one = self.lock.lock().unwrap();
        self.ram.write(MAILBOX + 8, &arg.to_le_bytes()).unwrap();
        self.ram.write(MAILBOX, &cmd.to_le_bytes()).unwrap();
        if cmd == CMD_EXIT {
            return 0;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut b = [0u8; 8];
        loop {
            self.ram.read(MAILBOX, &mut b).unwrap();
            if u64::from_le_bytes(b) == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the guest did not take command {cmd}"
            );
            std::thread::yield_now();
        }
        self.ram.read(MAILBOX + 16, &mut b).unwrap();
        u64::from_le_bytes(b)
    }
}

/// vsc's host interface, executed by the vCPU.
struct VcpuHost(Arc<Mailbox>);

impl vsc::synic::HostInterface for VcpuHost {
    fn post_message(&self, connection_id: u32, payload: &[u8]) -> Result<(), vsc::Error> {
        let mut input = HvPostMessageInput::new_zeroed();
        input.connection_id = connection_id;
        input.message_type = 1;
        input.payload_size = payload.len() as u32;
        input.payload[..payload.len()].copy_from_slice(payload);
        self.0.ram.write(INPUT, input.as_bytes()).unwrap();
        match self.0.run(CMD_POST, INPUT) {
            0 => Ok(()),
            s => Err(vsc::Error::Protocol(format!("HvPostMessage status {s}"))),
        }
    }
    fn signal_event(&self, connection_id: u32) -> Result<(), vsc::Error> {
        match self.0.run(CMD_SIGNAL, u64::from(connection_id)) {
            0 => Ok(()),
            s => Err(vsc::Error::Protocol(format!("HvSignalEvent status {s}"))),
        }
    }
    fn set_channel_interrupt(&self, _relid: u32, _event: Option<ringbuf::Event>) {}
}

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

    let mut vm = Vm::new(VmConfig {
        memory: 4 << 20,
        vcpus: 1,
    })
    .expect("create VM");
    vm.attach(&vspd.socket).expect("attach");
    let link = vm.link().unwrap();
    let ram = vm.ram();
    let entry = vm.load_flat(&mailbox_guest()).unwrap();
    let running = std::thread::spawn(move || vm.run(entry, Box::new(Console::default())));
    let mailbox = Arc::new(Mailbox {
        ram: Arc::clone(&ram),
        lock: Mutex::new(()),
    });

    // The message pump: takes what vspd wrote into the SIMP slot, frees the slot, and has the
    // guest write EOM when the daemon has more pending.
    let (tx, rx) = std::sync::mpsc::channel();
    let done = Arc::new(AtomicBool::new(false));
    let pump = {
        let (mailbox, done) = (Arc::clone(&mailbox), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut slot = [0u8; 256];
            while !done.load(Ordering::SeqCst) {
                mailbox.ram.read(SLOT, &mut slot).unwrap();
                if u32::from_le_bytes(slot[..4].try_into().unwrap()) == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let size = usize::from(slot[4]).min(240);
                let _ = tx.send(slot[16..16 + size].to_vec());
                mailbox.ram.write(SLOT, &0u32.to_le_bytes()).unwrap();
                if slot[5] & 1 != 0 {
                    assert_eq!(mailbox.run(CMD_EOM, 0), 0);
                }
            }
        })
    };

    let host = Arc::new(VcpuHost(Arc::clone(&mailbox)));
    let mut client = vsc::client::Client::connect(
        host.clone(),
        rx,
        0,
        &[vmbus_proto::channel::VmbusVersion::WIN10_V5],
    )
    .expect("VMBus negotiated through the vCPU");
    let offers = client.request_offers().expect("offers");
    let o = offers
        .iter()
        .find(|o| o.interface_type == class)
        .expect("our offer");
    let pfns: Vec<u64> = (0..RING_PAGES).map(|i| (RING >> 12) + i).collect();
    let gpadl = client
        .create_gpadl(o.relid, &pfns)
        .expect("ring GPADL in guest memory");
    client
        .open(o.relid, gpadl, (RING_PAGES / 2) as u32, 0, &[])
        .expect("channel open");
    // The daemon's CHANNEL_SIGNAL binds the channel's eventfd (liveness wait, not a timing).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !link.knows_channel(o.connection_id) {
        assert!(
            Instant::now() < deadline,
            "vspd never handed the channel's eventfd"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for _ in 0..SIGNALS {
        vsc::synic::HostInterface::signal_event(&*host, o.connection_id).expect("signal");
    }
    // An id vspd never opened is forwarded for the daemon to ignore.
    assert_eq!(mailbox.run(CMD_SIGNAL, 0xBAD), u64::from(status::SUCCESS));

    done.store(true, Ordering::SeqCst);
    pump.join().unwrap();
    drop(client);
    mailbox.run(CMD_EXIT, 0);
    let out = running.join().unwrap().expect("run");
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
