//! Helpers for the guest tests: the /dev/kvm check and a console buffer.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};

/// How long the tests wait for the guest or vspd to do something (a liveness bound, not a
/// timing): the guest's CPL-0 code is emulated, and a workspace test run that starts many
/// processes at once on two cores has made 10 s too short.
pub const LIVENESS: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether KVM can be used here; prints why a test skips when not.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP {test}: /dev/kvm cannot be opened ({e})");
            false
        }
    }
}

/// A console that the test reads after the run.
#[derive(Clone, Default)]
pub struct Console(pub Arc<Mutex<Vec<u8>>>);

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub mod guests {
    //! Test guests, assembled here: flat 64-bit code for `Vm::load_flat`.
    use hypervisor_shim::vm::{DEBUG_EXIT_PORT, FLAT_LOAD_ADDR};
    use iced_x86::code_asm::*;

    /// Prints `text` on COM1, polling LSR.THRE before each byte.
    pub fn print(a: &mut CodeAssembler, text: &[u8]) -> Result<(), IcedError> {
        for &b in text {
            let mut wait = a.create_label();
            a.set_label(&mut wait)?;
            a.mov(dx, 0x3FDu32)?;
            a.in_(al, dx)?;
            a.test(al, 0x20u32)?;
            a.jz(wait)?;
            a.mov(dx, 0x3F8u32)?;
            a.mov(al, u32::from(b))?;
            a.out(dx, al)?;
        }
        Ok(())
    }

    /// Ends the VM through the debug-exit port with `code`.
    pub fn exit(a: &mut CodeAssembler, code: u32) -> Result<(), IcedError> {
        a.mov(dx, u32::from(DEBUG_EXIT_PORT))?;
        a.mov(eax, code)?;
        a.out(dx, eax)?;
        // Not reached: the VMM stops this vCPU at the OUT.
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.jmp(spin)
    }

    /// Assembles at the flat load address.
    pub fn assemble(mut a: CodeAssembler) -> Vec<u8> {
        a.assemble(FLAT_LOAD_ADDR).expect("assemble")
    }

    /// "hello\n", then exit `code`.
    pub fn hello(code: u32) -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        print(&mut a, b"hello\n").unwrap();
        exit(&mut a, code).unwrap();
        assemble(a)
    }
}

pub mod vmbus {
    //! A guest that starts VMBus as hv_vmbus does, for the tests against vspd.
    use super::guests;
    use hypervisor_shim::hyperv;
    use iced_x86::code_asm::*;
    use vmbus_proto::channel::{
        InitiateContact, MessageHeader, MessageType, VmbusVersion, MESSAGE_CONNECTION_ID_4,
        MESSAGE_SINT,
    };
    use vmbus_proto::synic::HvPostMessageInput;
    use zerocopy::{FromZeros, IntoBytes};

    /// Where `contact_image` puts the InitiateContact input page, from the image's start.
    pub const IMAGE_INPUT_OFFSET: usize = 0x1000;

    /// A flat image that carries its own input page: the guest posts from
    /// `FLAT_LOAD_ADDR + IMAGE_INPUT_OFFSET`.
    pub fn contact_image() -> Vec<u8> {
        let input = hypervisor_shim::vm::FLAT_LOAD_ADDR + IMAGE_INPUT_OFFSET as u64;
        let mut image = contact_guest(input).unwrap();
        assert!(image.len() <= IMAGE_INPUT_OFFSET);
        image.resize(IMAGE_INPUT_OFFSET, 0xCC);
        image.extend_from_slice(initiate_contact().as_bytes());
        image
    }

    pub const RESULTS: u64 = 0x6000;
    const HYPERCALL_PAGE: u64 = 0x4000;
    const SIMP: u64 = 0x3000;
    const SIEFP: u64 = 0x5000;
    pub const INPUT: u64 = 0x7000;
    pub const VECTOR: u32 = 0xF3;
    const SLOT: u64 = SIMP + 256 * MESSAGE_SINT as u64;
    /// Polling rounds before the guest gives up (about 4 emulated instructions each).
    const POLLS: u32 = 4_000_000;
    /// Reads of the LAPIC's IRR (each an exit to KVM) while waiting for the SINT's vector.
    const IRR_POLLS: u32 = 200_000;

    pub fn wrmsr(a: &mut CodeAssembler, msr: u32, value: u64) -> Result<(), IcedError> {
        a.mov(ecx, msr)?;
        a.mov(eax, value as u32)?;
        a.mov(edx, (value >> 32) as u32)?;
        a.wrmsr()
    }

    /// The guest: SynIC on, InitiateContact posted from `input`, the answer awaited in SIMP slot 2.
    /// Exits 0x600D when a VersionResponse accepting the version arrived, 0xBAD when another
    /// message did, 0xDEAD when none did.
    pub fn contact_guest(input: u64) -> Result<Vec<u8>, IcedError> {
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
        a.mov(rdx, input)?;
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
        let mut bad = a.create_label();
        a.cmp(dword_ptr(rdi + 16 + 16), MessageType::VERSION_RESPONSE.0)?;
        a.jne(bad)?;
        a.cmp(byte_ptr(rdi + 16 + 24), 1u32)?;
        a.jne(bad)?;
        // The SINT's interrupt follows the message (the irqfd is written after the slot): wait
        // for its vector in the LAPIC's IRR (IF is clear, so it stays pending there) before
        // exiting, so the test that checks it does not race the delivery. Bounded: a vector
        // that never comes fails that test's check, not this guest.
        a.mov(rax, 0xFEE0_0200u64 + 0x10 * u64::from(VECTOR / 32))?;
        a.mov(r13d, IRR_POLLS)?;
        let mut irr = a.create_label();
        let mut pending = a.create_label();
        a.set_label(&mut irr)?;
        a.test(dword_ptr(rax), 1u32 << (VECTOR % 32))?;
        a.jnz(pending)?;
        a.dec(r13d)?;
        a.jnz(irr)?;
        a.set_label(&mut pending)?;
        guests::exit(&mut a, 0x600D)?;
        a.set_label(&mut bad)?;
        guests::exit(&mut a, 0xBAD)?;
        Ok(guests::assemble(a))
    }

    pub fn initiate_contact() -> HvPostMessageInput {
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
}

/// vsp's daemon run in this process (cargo builds no `vspd` binary for this crate's tests),
/// listening in a fresh directory and serving `offers` onto channels that discard their
/// packets.
pub struct InProcessVspd {
    /// Its directory.
    pub dir: std::path::PathBuf,
    /// Its partition socket.
    pub socket: std::path::PathBuf,
    stop: Arc<ringbuf::Event>,
    served: Option<std::thread::JoinHandle<Result<(), vsp::Error>>>,
}

impl InProcessVspd {
    /// Binds `TEMP/shim-NAME-PID/vspd.sock` and serves on a thread of its own.
    pub fn start(name: &str, offers: Vec<vsp::server::OfferSpec>) -> Self {
        Self::serve(
            name,
            offers,
            Default::default(),
            vsp::session::unimplemented_devices(),
        )
    }

    /// As [`InProcessVspd::start`], serving real disks: `disks` in vspd's `--disk` syntax.
    pub fn with_disks(name: &str, disks: &[String]) -> Self {
        let mut config = vsp::config::Config::default();
        for d in disks {
            config
                .disks
                .push(vsp::config::parse_kv("disk", d).expect("disk options"));
        }
        let registry = Arc::new(vsp::devices::Registry::default());
        let offers = registry.update(&config).expect("open the disks");
        Self::serve(name, offers, config.access(), registry.factory())
    }

    fn serve(
        name: &str,
        offers: Vec<vsp::server::OfferSpec>,
        access: vsp::config::Access,
        devices: vsp::session::DeviceFactory,
    ) -> Self {
        let dir = std::env::temp_dir().join(format!("shim-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vspd.sock");
        let daemon = vsp::daemon::Daemon::bind(
            &socket,
            vsp::daemon::DaemonConfig::default(),
            offers.clone(),
            access.clone(),
            devices,
        )
        .expect("bind vspd");
        let stop = daemon.stop_handle();
        let served =
            std::thread::spawn(move || daemon.run(move || Ok((offers.clone(), access.clone()))));
        Self {
            dir,
            socket,
            stop,
            served: Some(served),
        }
    }

    /// Stops the daemon, checks it ended cleanly, and removes its directory.
    pub fn stop(mut self) {
        self.stop.signal().unwrap();
        let served = self.served.take().unwrap();
        served.join().unwrap().expect("vspd ran");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for InProcessVspd {
    fn drop(&mut self) {
        // Only reached without `stop` (a failing test): stop it, wait for nothing.
        let _ = self.stop.signal();
    }
}

pub mod mailbox {
    //! A guest that runs the host's commands: SynIC on, then forever: wait for a command in
    //! its mailbox page, run it through the hypercall page (or the EOM MSR, or the reset port),
    //! store RAX, clear the command. With [`VcpuHost`], vsc's VMBus client runs on it: every
    //! HvPostMessage and HvSignalEvent executed by the vCPU, every message taken from the SIMP
    //! page vspd wrote ([`pump`]).
    use super::guests;
    use super::vmbus::wrmsr;
    use hypervisor_shim::hyperv;
    use hypervisor_shim::vm::GuestRam;
    use iced_x86::code_asm::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    use vmbus_proto::synic::HvPostMessageInput;
    use zerocopy::{FromZeros, IntoBytes};

    pub const MAILBOX: u64 = 0x6800;
    pub const INPUT: u64 = 0x7000;
    pub const SIMP: u64 = 0x3000;
    pub const SIEFP: u64 = 0x5000;
    pub const SLOT: u64 = SIMP + 2 * 256;
    pub const CMD_POST: u64 = 1;
    pub const CMD_SIGNAL: u64 = 2;
    pub const CMD_EOM: u64 = 3;
    pub const CMD_EXIT: u64 = 4;
    /// Resets the machine (port 0xCF9).
    pub const CMD_RESET: u64 = 5;

    /// The guest's image.
    pub fn guest() -> Vec<u8> {
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
        let mut not_reset = a.create_label();
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
        a.cmp(rax, CMD_RESET as i32).unwrap();
        a.jne(not_reset).unwrap();
        a.mov(dx, 0xCF9u32).unwrap();
        a.mov(al, 0x06u32).unwrap();
        a.out(dx, al).unwrap();
        a.set_label(&mut not_reset).unwrap();
        guests::exit(&mut a, 0x600D).unwrap();
        a.set_label(&mut ack).unwrap();
        a.mov(qword_ptr(rbx + 16), rax).unwrap();
        a.mov(qword_ptr(rbx), 0i32).unwrap();
        a.jmp(idle).unwrap();
        guests::assemble(a)
    }

    /// Runs commands in the guest's mailbox, one at a time.
    pub struct Mailbox {
        pub ram: Arc<GuestRam>,
        lock: Mutex<()>,
        /// Set once the guest was told to exit or reset: it takes no more commands.
        dead: AtomicBool,
    }

    impl Mailbox {
        pub fn new(ram: Arc<GuestRam>) -> Arc<Self> {
            Arc::new(Mailbox {
                ram,
                lock: Mutex::new(()),
                dead: AtomicBool::new(false),
            })
        }

        /// Whether the guest still takes commands.
        pub fn alive(&self) -> bool {
            !self.dead.load(Ordering::SeqCst)
        }

        /// Runs `cmd` with `arg` and returns the guest's RAX; EXIT and RESET do not wait.
        /// After those, every command returns `u64::MAX` at once.
        pub fn run(&self, cmd: u64, arg: u64) -> u64 {
            let _one = self.lock.lock().unwrap();
            if !self.alive() {
                return u64::MAX;
            }
            self.ram.write(MAILBOX + 8, &arg.to_le_bytes()).unwrap();
            self.ram.write(MAILBOX, &cmd.to_le_bytes()).unwrap();
            if cmd == CMD_EXIT || cmd == CMD_RESET {
                self.dead.store(true, Ordering::SeqCst);
                return 0;
            }
            let deadline = Instant::now() + super::LIVENESS;
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

    /// vsc's host interface, executed by the vCPU; channel interrupts come from the event
    /// flags vspd sets in the SIEFP page ([`pump`] takes them).
    pub struct VcpuHost {
        pub mailbox: Arc<Mailbox>,
        interrupts: Mutex<HashMap<u32, ringbuf::Event>>,
    }

    impl VcpuHost {
        pub fn new(mailbox: Arc<Mailbox>) -> Arc<Self> {
            Arc::new(VcpuHost {
                mailbox,
                interrupts: Mutex::default(),
            })
        }
    }

    impl vsc::synic::HostInterface for VcpuHost {
        fn post_message(&self, connection_id: u32, payload: &[u8]) -> Result<(), vsc::Error> {
            let mut input = HvPostMessageInput::new_zeroed();
            input.connection_id = connection_id;
            input.message_type = 1;
            input.payload_size = payload.len() as u32;
            input.payload[..payload.len()].copy_from_slice(payload);
            self.mailbox.ram.write(INPUT, input.as_bytes()).unwrap();
            match self.mailbox.run(CMD_POST, INPUT) {
                0 => Ok(()),
                u64::MAX => Err(vsc::Error::Disconnected),
                s => Err(vsc::Error::Protocol(format!("HvPostMessage status {s}"))),
            }
        }
        fn signal_event(&self, connection_id: u32) -> Result<(), vsc::Error> {
            match self.mailbox.run(CMD_SIGNAL, u64::from(connection_id)) {
                0 => Ok(()),
                u64::MAX => Err(vsc::Error::Disconnected),
                s => Err(vsc::Error::Protocol(format!("HvSignalEvent status {s}"))),
            }
        }
        fn host_alive(&self) -> bool {
            self.mailbox.alive()
        }
        fn set_channel_interrupt(&self, relid: u32, event: Option<ringbuf::Event>) -> u32 {
            let mut m = self.interrupts.lock().unwrap();
            match event {
                Some(e) => m.insert(relid, e),
                None => m.remove(&relid),
            };
            0
        }
    }

    /// The pump: takes the messages vspd wrote into the SIMP slot, frees the slot, and has the
    /// guest write EOM when the daemon has more pending; takes the channel event flags vspd set
    /// in the SIEFP page (an atomic swap, as the guest's handler does) and fires the channels'
    /// interrupt lines. Until `done` is set.
    pub fn pump(
        host: &Arc<VcpuHost>,
        memory: &Arc<ringbuf::guestmem::GuestMemory>,
        done: &Arc<AtomicBool>,
    ) -> (
        std::sync::mpsc::Receiver<Vec<u8>>,
        std::thread::JoinHandle<()>,
    ) {
        let (tx, rx) = std::sync::mpsc::channel();
        let (host, memory, done) = (Arc::clone(host), Arc::clone(memory), Arc::clone(done));
        let t = std::thread::spawn(move || {
            let mailbox = &host.mailbox;
            let mut slot = [0u8; 256];
            // The VMBus SINT's 2048 event flags, as 32-bit words.
            let flags: Vec<&std::sync::atomic::AtomicU32> = (0..64)
                .map(|w| memory.atomic_u32(SIEFP + 2 * 256 + 4 * w).unwrap())
                .collect();
            let slot_type = memory.atomic_u32(SLOT).unwrap();
            while !done.load(Ordering::SeqCst) {
                let mut idle = true;
                for (w, word) in flags.iter().enumerate() {
                    if word.load(Ordering::Relaxed) == 0 {
                        continue;
                    }
                    // Acquire: pairs with vspd's release fetch_or after its ring writes.
                    let bits = word.swap(0, Ordering::Acquire);
                    idle = false;
                    let m = host.interrupts.lock().unwrap();
                    for b in (0..32).filter(|b| bits & (1 << b) != 0) {
                        if let Some(e) = m.get(&(32 * w as u32 + b)) {
                            e.signal().unwrap();
                        }
                    }
                }
                // Acquire: pairs with the host's release store of the type after the payload.
                if slot_type.load(Ordering::Acquire) != 0 {
                    idle = false;
                    mailbox.ram.read(SLOT, &mut slot).unwrap();
                    let size = usize::from(slot[4]).min(240);
                    let _ = tx.send(slot[16..16 + size].to_vec());
                    // Free the slot, then look at message_pending: the host sets it and then
                    // re-checks the type (SeqCst fences on both sides), so either it finds the
                    // slot free and delivers at once, or we see the flag and send EOM. The
                    // flag in the copy taken before the slot was freed may be stale: a message
                    // that came in between would wait for an EOM nobody sends.
                    slot_type.store(0, Ordering::Release);
                    std::sync::atomic::fence(Ordering::SeqCst);
                    let mut flags = [0u8; 1];
                    mailbox.ram.read(SLOT + 5, &mut flags).unwrap();
                    if flags[0] & 1 != 0 {
                        let s = mailbox.run(CMD_EOM, 0);
                        assert!(s == 0 || !mailbox.alive(), "EOM: {s}");
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        });
        (rx, t)
    }
}

pub mod client_vm {
    //! A VM running the [`super::mailbox`] guest, attached to a vspd, with vsc's VMBus client
    //! connected through its vCPU.
    use super::mailbox::{self, Mailbox, VcpuHost};
    use super::Console;
    use hypervisor_shim::frontend::Link;
    use hypervisor_shim::vm::{GuestRam, Outcome, Vm, VmConfig};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    /// Where [`ClientVm::open`] puts a channel's ring, and its pages (both directions).
    pub const RING: u64 = 0x4_0000;
    pub const RING_PAGES: u64 = 8;
    /// Guest RAM from here up is the pool [`Pages`] allocates from (VMs larger than 4 MiB).
    pub const POOL: u64 = 4 << 20;

    /// The VM's RAM as vsc's client sees it: the memfd mapped again (`ringbuf`'s
    /// `GuestMemory`), and the pages from [`POOL`] up to allocate rings and buffers from.
    pub struct Pages {
        memory: Arc<ringbuf::guestmem::GuestMemory>,
        free: std::sync::Mutex<Vec<u64>>,
    }

    impl Pages {
        pub fn new(ram: &GuestRam) -> Arc<Self> {
            let mut memory = ringbuf::guestmem::GuestMemory::new();
            for (gpa, off, len) in ram.slots() {
                let fd = ram.fd().try_clone_to_owned().unwrap();
                memory.add_region(gpa, len, fd, off).expect("map guest RAM");
            }
            let top = ram.size().min(hypervisor_shim::vm::LOW_RAM_END);
            Arc::new(Pages {
                memory: Arc::new(memory),
                free: std::sync::Mutex::new((POOL >> 12..top >> 12).rev().collect()),
            })
        }

        pub fn memory_arc(&self) -> &Arc<ringbuf::guestmem::GuestMemory> {
            &self.memory
        }
    }

    impl vsc::channel::FrontEnd for Pages {
        fn memory(&self) -> &ringbuf::guestmem::GuestMemory {
            &self.memory
        }
        fn alloc_pages(&self, n: usize) -> Result<Vec<u64>, vsc::Error> {
            let mut free = self.free.lock().unwrap();
            if free.len() < n {
                return Err(vsc::Error::OutOfGuestMemory(n));
            }
            let at = free.len() - n;
            let pages: Vec<u64> = free.drain(at..).rev().collect();
            for &p in &pages {
                self.memory
                    .fill(p << 12, 4096, 0)
                    .map_err(vsc::Error::from)?;
            }
            Ok(pages)
        }
        fn free_pages(&self, pages: &[u64]) {
            self.free.lock().unwrap().extend(pages.iter().rev());
        }
    }

    pub struct ClientVm {
        pub link: Arc<Link>,
        pub ram: Arc<GuestRam>,
        pub mailbox: Arc<Mailbox>,
        pub host: Arc<VcpuHost>,
        pub pages: Arc<Pages>,
        pub client: vsc::client::Client,
        /// The VM's run, on its own thread.
        pub running: JoinHandle<hypervisor_shim::Result<Outcome>>,
        pumping_done: Arc<AtomicBool>,
        pump: Option<JoinHandle<()>>,
    }

    impl ClientVm {
        /// Starts a 4 MiB, 1-vCPU VM attached to `socket` and negotiates VMBus 5.0 through it.
        pub fn start(socket: &std::path::Path) -> Self {
            Self::start_sized(socket, 4 << 20)
        }

        /// As [`ClientVm::start`], with `memory` bytes of RAM.
        pub fn start_sized(socket: &std::path::Path, memory: u64) -> Self {
            let mut vm = Vm::new(VmConfig { memory, vcpus: 1 }).expect("create VM");
            vm.attach(socket).expect("attach");
            let link = vm.link().unwrap();
            let ram = vm.ram();
            let entry = vm.load_flat(&mailbox::guest()).unwrap();
            let running = std::thread::spawn(move || vm.run(entry, Box::new(Console::default())));
            let mailbox = Mailbox::new(Arc::clone(&ram));
            let pages = Pages::new(&ram);
            let pumping_done = Arc::new(AtomicBool::new(false));
            let host = VcpuHost::new(Arc::clone(&mailbox));
            let (rx, pump) = mailbox::pump(&host, pages.memory_arc(), &pumping_done);
            let mut client = vsc::client::Client::connect(
                host.clone(),
                rx,
                0,
                &[vmbus_proto::channel::VmbusVersion::WIN10_V5],
            )
            .expect("VMBus negotiated through the vCPU");
            client.set_timeout(super::LIVENESS);
            ClientVm {
                link,
                ram,
                mailbox,
                host,
                pages,
                client,
                running,
                pumping_done,
                pump: Some(pump),
            }
        }

        /// Opens the channel of `offer` on a ring GPADL at [`RING`] and waits until vspd's
        /// CHANNEL_SIGNAL bound its eventfd (a liveness wait, not a timing).
        pub fn open(&mut self, offer: &vsc::client::Offer) {
            let pfns: Vec<u64> = (0..RING_PAGES).map(|i| (RING >> 12) + i).collect();
            let gpadl = self
                .client
                .create_gpadl(offer.relid, &pfns)
                .expect("ring GPADL in guest memory");
            self.client
                .open(offer.relid, gpadl, (RING_PAGES / 2) as u32, 0, &[])
                .expect("channel open");
            let deadline = Instant::now() + super::LIVENESS;
            while !self.link.knows_channel(offer.connection_id) {
                assert!(
                    Instant::now() < deadline,
                    "vspd never handed the channel's eventfd"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        /// Opens the SCSI controller `offer` with vsc's storvsc client (rings and bounce
        /// buffers in this VM's RAM, from [`POOL`] up: give it 32 MiB) and starts its queue;
        /// returns the controller and its first LUN's disk.
        pub fn storvsc_disk(
            &mut self,
            offer: &vsc::client::Offer,
        ) -> (Arc<vsc::storvsc::Controller>, Arc<vsc::storvsc::Disk>) {
            let channel = vsc::channel::GuestChannel::open(
                &mut self.client,
                &*self.pages,
                offer,
                vsc::guest::STORAGE_RING_PAGES,
            )
            .expect("storvsc channel open on rings in guest RAM");
            let st = vsc::storvsc::Storvsc::init(channel).expect("storvsc handshake");
            let front: Arc<dyn vsc::channel::FrontEnd> = self.pages.clone();
            let ctl = vsc::storvsc::Controller::start(st, front).expect("storvsc queue");
            let luns = ctl.report_luns().expect("REPORT LUNS");
            let disk = ctl.disk(luns[0]).expect("the disk");
            (ctl, disk)
        }

        /// Stops taking messages from the SIMP page.
        pub fn stop_pump(&mut self) {
            self.pumping_done.store(true, Ordering::SeqCst);
            if let Some(p) = self.pump.take() {
                p.join().unwrap();
            }
        }

        /// Stops the pump, gives the guest `end` (EXIT or RESET), drops the client and every
        /// handle on the VM, and waits for the run's end.
        pub fn finish(mut self, end: u64) -> hypervisor_shim::Result<Outcome> {
            self.stop_pump();
            self.mailbox.run(end, 0);
            let ClientVm { running, .. } = self;
            running.join().expect("the VM's thread")
        }
    }
}
