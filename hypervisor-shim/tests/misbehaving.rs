//! Misbehaving guests beside served ones (tests/vspd.rs has the bad hypercall inputs, the
//! SIMP outside RAM, the posted-message flood and resets one guest at a time): a SINT
//! programmed with an exception vector; a guest that resets with garbage in its open storvsc
//! ring; and one that resets in the middle of its storvsc writes; each time a second guest on
//! the same vspd verifies disk I/O all along, and vspd gives back everything the first held.

mod common;

use common::client_vm::{ClientVm, RING};
use common::mailbox::CMD_RESET;
use common::vmbus::{contact_guest, initiate_contact, wrmsr, INPUT};
use common::{guests, kvm_or_skip, Console, InProcessVspd};
use hypervisor_shim::hyperv;
use hypervisor_shim::vm::{ExitStatus, Vm, VmConfig};
use hypervisor_shim::Error;
use iced_x86::code_asm::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmbus_proto::channel::Guid;
use vsc::nbd::BlockDevice;
use zerocopy::IntoBytes;

/// The tests here count the process's descriptors and mappings: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A guest that serves the contact guest's InitiateContact on `socket`: 0x600D when vspd
/// answered.
fn contact_served(socket: &std::path::Path) -> ExitStatus {
    let mut vm = Vm::new(VmConfig {
        memory: 4 << 20,
        vcpus: 1,
    })
    .unwrap();
    vm.attach(socket).unwrap();
    vm.ram()
        .write(INPUT, initiate_contact().as_bytes())
        .unwrap();
    let entry = vm.load_flat(&contact_guest(INPUT).unwrap()).unwrap();
    vm.run(entry, Box::new(Console::default())).unwrap().status
}

#[test]
fn a_sint_with_an_exception_vector_is_refused_and_vspd_serves_on() {
    if !kvm_or_skip("a_sint_with_an_exception_vector_is_refused_and_vspd_serves_on") {
        return;
    }
    let _serial = serial();
    let vspd = InProcessVspd::start("sint-vector", Vec::new());
    // Vector 5 masked is accepted (the guest prints B); unmasked it is refused with #GP,
    // which ends the run here (exceptions at CPL 0 are not delivered on this KVM; with
    // hardware virtualization and no IDT, a triple fault): C is never printed.
    let mut a = CodeAssembler::new(64).unwrap();
    wrmsr(&mut a, hyperv::GUEST_OS_ID, 1).unwrap();
    wrmsr(&mut a, hyperv::SIMP, 0x3000 | 1).unwrap();
    wrmsr(&mut a, hyperv::SCONTROL, 1).unwrap();
    guests::print(&mut a, b"A").unwrap();
    wrmsr(&mut a, hyperv::SINT0 + 2, 0x05 | (1 << 16)).unwrap();
    guests::print(&mut a, b"B").unwrap();
    wrmsr(&mut a, hyperv::SINT0 + 2, 0x05).unwrap();
    guests::print(&mut a, b"C").unwrap();
    guests::exit(&mut a, 1).unwrap();
    let mut vm = Vm::new(VmConfig {
        memory: 4 << 20,
        vcpus: 1,
    })
    .unwrap();
    vm.attach(&vspd.socket).unwrap();
    let entry = vm.load_flat(&guests::assemble(a)).unwrap();
    let console = Console::default();
    let r = vm.run(entry, Box::new(console.clone()));
    assert_eq!(
        console.text(),
        "AB",
        "the unmasked exception vector was taken"
    );
    match r {
        Err(Error::Emulation { vcpu: 0, .. }) => {}
        Ok(out) => assert_eq!(out.status, ExitStatus::TripleFault),
        Err(e) => panic!("unexpected end: {e}"),
    }
    // The daemon serves the next guest.
    assert_eq!(contact_served(&vspd.socket), ExitStatus::DebugExit(0x600D));
    vspd.stop();
}

/// Open descriptors of this process, and its mappings of a guest's RAM memfd.
fn held() -> (usize, usize) {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    (
        fds,
        maps.lines().filter(|l| l.contains("guest-ram")).count(),
    )
}

fn pattern(n: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| (n.wrapping_mul(0x9E37_79B9) >> 8 ^ i) as u8)
        .collect()
}

/// Guest B's disk: blocks of 4 KiB.
const BLOCKS: u64 = 64;

/// Guest B: vsc's loopback front end and storvsc client on a vspd, writing a pattern to a
/// block of its disk (the one of `BLOCKS` blocks) and reading it back, over and over.
struct Verifier {
    guest: vsc::guest::StorageGuest,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    io: std::thread::JoinHandle<u64>,
}

impl Verifier {
    fn start(socket: &std::path::Path) -> Self {
        let guest = vsc::guest::StorageGuest::attach(socket, 32 << 20).expect("guest B attaches");
        let disk = guest
            .disks
            .iter()
            .find(|(_, d)| d.size() == BLOCKS * 4096)
            .map(|(_, d)| Arc::clone(d))
            .expect("B's disk");
        let (stop, done) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let io = {
            let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let at = (n % BLOCKS) * 4096;
                    let p = pattern(n);
                    disk.write(at, &p, false).expect("B's write");
                    disk.read(at, &mut buf).expect("B's read");
                    assert!(buf == p, "B read back another pattern at I/O {n}");
                    n += 1;
                    done.store(n, Ordering::SeqCst);
                }
                disk.flush().expect("B's flush");
                n
            })
        };
        let v = Verifier {
            guest,
            stop,
            done,
            io,
        };
        wait_for("B's first I/O", &|| v.count() > 10);
        v
    }

    fn count(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }

    /// Stops B, detaches it, and checks that `image` holds in each block the last pattern B
    /// wrote there. Returns B's write+read pairs.
    fn finish(self, image: &std::path::Path) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let n = self.io.join().expect("B verified every I/O");
        self.guest.detach().expect("B detaches");
        let bytes = std::fs::read(image).unwrap();
        for blk in 0..BLOCKS.min(n) {
            let last = (0..n).rev().find(|k| k % BLOCKS == blk).unwrap();
            let at = (blk * 4096) as usize;
            assert!(bytes[at..at + 4096] == pattern(last)[..], "block {blk}");
        }
        n
    }
}

fn wait_for(what: &str, cond: &dyn Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A scratch directory with B's disk image and, if `a_bytes` > 0, one for guest A.
fn images(
    name: &str,
    a_bytes: u64,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("shim-{name}-disks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (b, a) = (dir.join("b.img"), dir.join("a.img"));
    std::fs::write(&b, vec![0u8; (BLOCKS * 4096) as usize]).unwrap();
    if a_bytes > 0 {
        std::fs::write(&a, vec![0u8; a_bytes as usize]).unwrap();
    }
    (dir, b, a)
}

#[test]
fn a_guest_reset_with_garbage_in_its_storvsc_ring_is_released_while_another_verifies_io() {
    let test =
        "a_guest_reset_with_garbage_in_its_storvsc_ring_is_released_while_another_verifies_io";
    if !kvm_or_skip(test) {
        return;
    }
    let _serial = serial();
    let (dir, image, _) = images("reset-garbage", 0);
    let vspd = InProcessVspd::with_disks("reset-garbage", &[format!("path={}", image.display())]);
    let b = Verifier::start(&vspd.socket);
    let before = held();

    // Guest A, on a vCPU: opens the SCSI controller's channel through the hypercall page
    // (vspd maps its ring GPADL and starts storvsp on it), fills its outgoing ring with
    // garbage, signals, and resets.
    let mut vm = ClientVm::start(&vspd.socket);
    let offers = vm.client.request_offers().expect("offers");
    let o = offers
        .iter()
        .find(|o| o.interface_type == Guid::SCSI)
        .expect("the SCSI controller");
    vm.open(o);
    // A's RAM is mapped by its VM and by vspd's session: what the end must give back.
    let (_, maps) = held();
    assert!(
        maps >= before.1 + 2,
        "{maps} mappings of guest RAM with A running"
    );
    let garbage: Vec<u8> = (0..0x3000u32).map(|i| (i * 151 + 7) as u8).collect();
    vm.ram.write(RING + 0x1000, &garbage).unwrap();
    vm.ram.write(RING, &0x1800u32.to_le_bytes()).unwrap(); // write index
    let b_at_reset = b.count();
    for _ in 0..10 {
        vsc::synic::HostInterface::signal_event(&*vm.host, o.connection_id).expect("signal");
    }
    let out = vm.finish(CMD_RESET).expect("A's VM ends cleanly");
    assert_eq!(out.status, ExitStatus::Reset);

    // vspd lets go of everything A held (its session, the mapping of its RAM, the ring
    // and eventfds): the process is back to what it held with B alone. B keeps verifying.
    wait_for("vspd to release guest A", &|| held() == before);
    wait_for("B's I/O after the reset", &|| b.count() > b_at_reset + 200);
    let n = b.finish(&image);
    vspd.stop();
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("B: {n} verified write+read pairs, {b_at_reset} before A's reset");
}

#[test]
fn a_guest_reset_mid_storvsc_io_is_released_while_another_verifies_io() {
    let test = "a_guest_reset_mid_storvsc_io_is_released_while_another_verifies_io";
    if !kvm_or_skip(test) {
        return;
    }
    let _serial = serial();
    const A_BYTES: u64 = 1 << 20;
    let (dir, image_b, image_a) = images("reset-mid-io", A_BYTES);
    let vspd = InProcessVspd::with_disks(
        "reset-mid-io",
        &[
            format!("path={}", image_b.display()),
            format!("path={}", image_a.display()),
        ],
    );
    let b = Verifier::start(&vspd.socket);
    let before = held();

    // Guest A, on a vCPU: vsc's storvsc client on the other disk's controller, its rings and
    // buffers in A's RAM, every signal and message through the hypercall page, writing
    // without pause; reset while its writes are in flight.
    let mut vm = ClientVm::start_sized(&vspd.socket, 32 << 20);
    let offers = vm.client.request_offers().expect("offers");
    let instance = b
        .guest
        .disks
        .iter()
        .find(|(_, d)| d.size() == A_BYTES)
        .map(|(o, _)| o.interface_instance)
        .expect("A's disk, as B's guest sees it");
    let o = offers
        .iter()
        .find(|o| o.interface_type == Guid::SCSI && o.interface_instance == instance)
        .expect("A's controller")
        .clone();
    let (ctl, disk) = vm.storvsc_disk(&o);
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (disk, written) = (Arc::clone(&disk), Arc::clone(&written));
        std::thread::spawn(move || {
            for n in 0u64.. {
                let at = (n % (A_BYTES / 4096)) * 4096;
                if let Err(e) = disk.write(at, &pattern(n), false) {
                    return e;
                }
                written.store(n + 1, Ordering::SeqCst);
            }
            unreachable!()
        })
    };
    wait_for("A's writes", &|| written.load(Ordering::SeqCst) >= 20);
    let b_at_reset = b.count();
    let pages = Arc::clone(&vm.pages);
    let out = vm.finish(CMD_RESET).expect("A's VM ends cleanly");
    assert_eq!(out.status, ExitStatus::Reset);
    // A's client sees its host gone: the write in flight fails, nothing hangs.
    let e = writer.join().expect("A's writer ends");
    eprintln!(
        "A: {} writes before the reset, then: {e:?}",
        written.load(Ordering::SeqCst)
    );
    drop(disk);
    if let Ok(channels) = ctl.shutdown() {
        for st in channels {
            st.into_channel().abandon(&*pages);
        }
    }
    drop((ctl, pages));

    wait_for("vspd to release guest A", &|| held() == before);
    wait_for("B's I/O after the reset", &|| b.count() > b_at_reset + 200);
    let n = b.finish(&image_b);
    vspd.stop();
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("B: {n} verified write+read pairs, {b_at_reset} before A's reset");
}
