//! `vmbus-vm` run as a process on an assembled flat guest, and its refusals.

mod common;

use common::{guests, kvm_or_skip, InProcessVspd};
use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_vmbus-vm");

/// A scratch file in a directory of its own, both removed on drop.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn scratch(name: &str, bytes: &[u8]) -> Scratch {
    let dir = std::env::temp_dir().join(format!("vmbus-vm-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    Scratch(p)
}

fn vmbus_vm(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run vmbus-vm")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn runs_a_flat_guest_and_exits_with_its_code() {
    if !kvm_or_skip("runs_a_flat_guest_and_exits_with_its_code") {
        return;
    }
    let k = scratch("hello.bin", &guests::hello(42));
    let o = vmbus_vm(&[
        "--memory",
        "8M",
        "--cpus",
        "2",
        "--kernel",
        k.to_str().unwrap(),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "hello\n",
        "stderr: {}",
        stderr(&o)
    );
    assert_eq!(o.status.code(), Some(42), "stderr: {}", stderr(&o));
    assert!(stderr(&o).contains("DebugExit(42)"));
}

#[test]
fn help_describes_the_kernel_format() {
    let o = vmbus_vm(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "--memory",
        "--cpus",
        "--kernel",
        "--vsp",
        "--initrd",
        "--cmdline",
        "flat 64-bit binary",
        "bzImage",
        "ACPI",
    ] {
        assert!(text.contains(needle), "--help lacks {needle:?}");
    }
}

#[test]
fn refusals_say_why() {
    let missing = vmbus_vm(&["--kernel", "/nonexistent/guest.bin"]);
    assert_eq!(missing.status.code(), Some(125));
    assert!(
        stderr(&missing).contains("cannot read kernel /nonexistent/guest.bin"),
        "{}",
        stderr(&missing)
    );

    // A bzImage header of boot protocol 2.01: refused before any VM is built.
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x0201u16.to_le_bytes());
    let bz = scratch("bzImage", &bz);
    let o = vmbus_vm(&["--kernel", bz.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("boot protocol 2.01 is too old"),
        "{}",
        stderr(&o)
    );
    // 64-bit boot protocol but no 64-bit entry.
    let mut bz32 = vec![0u8; 0x400];
    bz32[0x202..0x206].copy_from_slice(b"HdrS");
    bz32[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
    bz32[0x211] = 1;
    let bz32 = scratch("bzImage32", &bz32);
    let o = vmbus_vm(&["--kernel", bz32.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("no 64-bit entry"), "{}", stderr(&o));

    // --initrd and --cmdline belong to a bzImage; an ELF vmlinux is named as such.
    let flat = scratch("flat.bin", &[0xF4; 16]);
    let o = vmbus_vm(&[
        "--kernel",
        flat.to_str().unwrap(),
        "--initrd",
        flat.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("is not a bzImage"), "{}", stderr(&o));
    let elf = scratch("vmlinux", b"\x7fELF\x02\x01\x01");
    let o = vmbus_vm(&["--kernel", elf.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("is an ELF file"), "{}", stderr(&o));

    let k = scratch("tiny.bin", &[0xF4]);
    let o = vmbus_vm(&["--memory", "1P", "--kernel", k.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "clap usage error: {}", stderr(&o));
    let o = vmbus_vm(&["--memory", "1048576G", "--kernel", k.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("cannot be had"), "{}", stderr(&o));
    let o = vmbus_vm(&["--cpus", "0", "--kernel", k.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("--cpus must be 1 to 64"),
        "{}",
        stderr(&o)
    );
    let o = vmbus_vm(&[
        "--vsp",
        "/nonexistent/vspd.sock",
        "--kernel",
        k.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("cannot connect to /nonexistent/vspd.sock"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_missing_dev_kvm_is_named() {
    // Hide /dev/kvm in a private mount namespace (needs root and unshare(1)).
    let k = scratch("hello2.bin", &guests::hello(0));
    let script = format!(
        "mount -t tmpfs none /dev && exec {BIN} --memory 4M --kernel {}",
        k.display()
    );
    let o = match Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
    {
        Ok(o) if !stderr(&o).contains("unshare failed") && !stderr(&o).contains("mount:") => o,
        other => {
            eprintln!("SKIP a_missing_dev_kvm_is_named: cannot hide /dev/kvm here ({other:?})");
            return;
        }
    };
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot open /dev/kvm"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn attached_to_vspd_the_guest_gets_its_version_response() {
    if !kvm_or_skip("attached_to_vspd_the_guest_gets_its_version_response") {
        return;
    }
    let vspd = InProcessVspd::start("cli-vspd", Vec::new());
    let k = scratch("contact.bin", &common::vmbus::contact_image());
    let o = vmbus_vm(&[
        "--memory",
        "16M",
        "--vsp",
        vspd.socket.to_str().unwrap(),
        "--kernel",
        k.to_str().unwrap(),
    ]);
    vspd.stop();
    // 0x600D: a VersionResponse accepting VMBus 5.0 arrived in the SIMP slot.
    assert_eq!(o.status.code(), Some(0x0D), "stderr: {}", stderr(&o));
}

/// The vspd that `vmbus-vm --disk` starts: the one built next to vmbus-vm (a workspace build
/// builds both); `None`, said, when it was not built.
fn vspd_beside(test: &str) -> Option<PathBuf> {
    let p = std::path::Path::new(BIN).with_file_name("vspd");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "SKIP {test}: {} is not built (cargo build -p vsp --bin vspd; the workspace's tests \
             build it)",
            p.display()
        );
        None
    }
}

/// The pid and socket path in vmbus-vm's "started ... (pid N) on SOCKET" line.
fn started(stderr: &str) -> (u32, PathBuf) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("vmbus-vm: started "))
        .unwrap_or_else(|| panic!("no 'started' line in {stderr}"));
    let pid = line
        .split("(pid ")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let socket = line.rsplit(" on ").next().unwrap();
    (pid.parse().unwrap(), PathBuf::from(socket))
}

/// Whether process `pid` is gone (or a zombie nobody has reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .starts_with('Z'),
    }
}

#[test]
fn its_own_vspd_serves_the_disks_and_ends_with_the_vm() {
    let test = "its_own_vspd_serves_the_disks_and_ends_with_the_vm";
    if !kvm_or_skip(test) || vspd_beside(test).is_none() {
        return;
    }
    let (d1, d2) = (
        scratch("disk1.img", &[0; 1 << 20]),
        scratch("disk2.img", &[0; 1 << 20]),
    );
    let k = scratch("contact-own.bin", &common::vmbus::contact_image());
    let o = vmbus_vm(&[
        "--memory",
        "16M",
        "--disk",
        &format!("path={}", d1.display()),
        "--disk",
        &format!("path={},readonly=on", d2.display()),
        "--kernel",
        k.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    // 0x600D: the guest's InitiateContact answered by the child vspd through the SIMP slot.
    assert_eq!(o.status.code(), Some(0x0D), "stderr: {err}");
    // vspd's log (colours stripped) says it serves both disks.
    let plain: String = err
        .split('\x1b')
        .map(|part| match part.strip_prefix('[') {
            Some(rest) => rest.split_once('m').map_or(rest, |(_, t)| t),
            None => part,
        })
        .collect();
    assert!(
        plain.contains("offers=2"),
        "vspd offers both disks: {plain}"
    );
    let (pid, socket) = started(&err);
    assert!(gone(pid), "vspd {pid} still runs after the VM ended");
    assert!(!socket.exists(), "{} left behind", socket.display());
    assert!(
        !socket.parent().unwrap().exists(),
        "socket directory left behind"
    );
}

#[test]
fn its_own_vspd_refusing_its_options_is_reported() {
    let test = "its_own_vspd_refusing_its_options_is_reported";
    if !kvm_or_skip(test) || vspd_beside(test).is_none() {
        return;
    }
    let k = scratch("tiny-own.bin", &guests::hello(0));
    let o = vmbus_vm(&[
        "--disk",
        "path=/nonexistent/disk.img",
        "--kernel",
        k.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("vspd ended") && stderr(&o).contains("before listening"),
        "{}",
        stderr(&o)
    );
    // Attaching to a running vspd and starting one are exclusive.
    let o = vmbus_vm(&[
        "--vsp",
        "/tmp/x.sock",
        "--disk",
        "path=/tmp/d",
        "--kernel",
        k.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
    // A vspd program that is not there is named.
    let o = vmbus_vm(&[
        "--vspd",
        "/nonexistent/vspd",
        "--disk",
        "path=/tmp/d",
        "--kernel",
        k.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot start /nonexistent/vspd"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn killing_vmbus_vm_stops_its_vspd() {
    let test = "killing_vmbus_vm_stops_its_vspd";
    if !kvm_or_skip(test) || vspd_beside(test).is_none() {
        return;
    }
    use iced_x86::code_asm::*;
    use std::io::BufRead;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.pause().unwrap();
    a.jmp(spin).unwrap();
    let k = scratch("spin.bin", &guests::assemble(a));
    let d = scratch("disk3.img", &[0; 1 << 20]);
    let mut child = Command::new(BIN)
        .args(["--memory", "8M", "--kernel", k.to_str().unwrap(), "--disk"])
        .arg(format!("path={}", d.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.starts_with("vmbus-vm: started "))
        .expect("vmbus-vm started its vspd");
    let (pid, _) = started(&line);
    assert!(!gone(pid));
    child.kill().unwrap(); // SIGKILL: vmbus-vm cannot clean up; the parent-death signal does.
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !gone(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(gone(pid), "vspd {pid} outlived its vmbus-vm");
}
