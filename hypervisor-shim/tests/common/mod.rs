//! Helpers for the guest tests: the /dev/kvm check and a console buffer.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};

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
        let dir = std::env::temp_dir().join(format!("shim-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vspd.sock");
        let daemon = vsp::daemon::Daemon::bind(
            &socket,
            vsp::daemon::DaemonConfig::default(),
            offers.clone(),
            Default::default(),
            vsp::session::unimplemented_devices(),
        )
        .expect("bind vspd");
        let stop = daemon.stop_handle();
        let served = std::thread::spawn(move || {
            daemon.run(move || Ok((offers.clone(), Default::default())))
        });
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
