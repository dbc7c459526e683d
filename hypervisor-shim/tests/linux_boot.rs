//! The Linux boot path: a real Debian cloud bzImage loaded into guest RAM (its setup header,
//! the zero page, the e820 map, the command line, the initrd and the ACPI tables checked in
//! RAM afterwards), and a bzImage made here whose 64-bit entry, run on a real vCPU, reports
//! what it was handed.
//!
//! A stock kernel cannot run on these machines (guest code at CPL 0 is emulated and its early
//! exception self-test ends the run), so the real image is only loaded, not started; see
//! scripts/boot-linux.sh for hosts with VT-x/AMD-V.

mod common;

use common::{kvm_or_skip, Console};
use hypervisor_shim::boot::{self, CMDLINE_ADDR, HIMEM_START, ZERO_PAGE};
use hypervisor_shim::vm::{ExitStatus, GuestRam, Vm, VmConfig};
use iced_x86::code_asm::*;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The zero page's fields this test reads (offsets from Documentation/arch/x86/zero-page.rst
/// and boot.rst).
mod zp {
    pub const ACPI_RSDP_ADDR: u64 = 0x070;
    pub const E820_ENTRIES: u64 = 0x1E8;
    pub const SETUP_SECTS: u64 = 0x1F1;
    pub const BOOT_FLAG: u64 = 0x1FE;
    pub const HEADER: u64 = 0x202;
    pub const VERSION: u64 = 0x206;
    pub const TYPE_OF_LOADER: u64 = 0x210;
    pub const CODE32_START: u64 = 0x214;
    pub const RAMDISK_IMAGE: u64 = 0x218;
    pub const RAMDISK_SIZE: u64 = 0x21C;
    pub const CMD_LINE_PTR: u64 = 0x228;
    pub const INITRD_ADDR_MAX: u64 = 0x22C;
    pub const E820_TABLE: u64 = 0x2D0;
}

fn read(ram: &GuestRam, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    ram.read(gpa, &mut b).unwrap();
    b
}

fn le(b: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    v[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(v)
}

fn field(ram: &GuestRam, off: u64, len: usize) -> u64 {
    le(&read(ram, ZERO_PAGE + off, len))
}

/// Debian's cloud kernel (the bzImage of the package `linux-image-cloud-amd64` depends on),
/// fetched once with `apt-get download` and cached under target/; `None` (with the reason
/// printed) where apt or the network cannot provide it.
fn debian_kernel(test: &str) -> Option<PathBuf> {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian-cloud-kernel");
    let vmlinuz = cache.join("vmlinuz");
    let skip = |why: String| {
        eprintln!("SKIP {test}: no Debian cloud kernel: {why}");
        None
    };
    if let Err(e) = std::fs::create_dir_all(&cache) {
        return skip(format!("cannot create {}: {e}", cache.display()));
    }
    // One test process downloads; the others wait on the lock and find the cached file.
    let lock = File::create(cache.join(".lock")).ok()?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).ok()?;
    if vmlinuz.exists() {
        return Some(vmlinuz);
    }
    let sh = |script: &str, dir: &Path| {
        Command::new("sh")
            .args(["-c", script])
            .current_dir(dir)
            .output()
    };
    let work = cache.join(format!("download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).ok()?;
    // Only boot/vmlinuz-* is extracted from the package (its modules are not needed).
    let script = "set -e
        pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
        [ -n \"$pkg\" ] || { echo 'apt knows no linux-image-cloud-amd64' >&2; exit 1; }
        apt-get download -q \"$pkg\" >&2
        dpkg-deb --fsys-tarfile ./*.deb | tar -x --wildcards './boot/vmlinuz-*'
        mv ./boot/vmlinuz-* ../vmlinuz.part";
    let r = sh(script, &work);
    let _ = std::fs::remove_dir_all(&work);
    match r {
        Ok(o) if o.status.success() => {
            std::fs::rename(cache.join("vmlinuz.part"), &vmlinuz).ok()?;
            Some(vmlinuz)
        }
        Ok(o) => skip(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => skip(format!("cannot run sh: {e}")),
    }
}

#[test]
fn debian_bzimage_is_loaded_with_its_zero_page_initrd_and_acpi_tables() {
    let test = "debian_bzimage_is_loaded_with_its_zero_page_initrd_and_acpi_tables";
    let Some(path) = debian_kernel(test) else {
        return;
    };
    let image = std::fs::read(&path).unwrap();
    let initrd_bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 4096) as u8).collect();
    let dir = std::env::temp_dir().join(format!("shim-linux-boot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let initrd_path = dir.join("initrd");
    std::fs::write(&initrd_path, &initrd_bytes).unwrap();

    // A sparse memfd: 512 MiB costs only the pages written.
    let ram = GuestRam::new(512 << 20).unwrap();
    let cmdline = "console=ttyS0 root=/dev/sda rdinit=/init";
    let loaded = boot::load(
        &ram,
        2,
        &mut File::open(&path).unwrap(),
        Some(&mut File::open(&initrd_path).unwrap()),
        cmdline,
    )
    .expect("load the Debian bzImage");
    let _ = std::fs::remove_dir_all(&dir);

    // The setup header is the image's own, with what the loader must fill in.
    let setup_sects = u64::from(image[0x1F1]);
    assert_eq!(field(&ram, zp::SETUP_SECTS, 1), setup_sects);
    assert_eq!(field(&ram, zp::BOOT_FLAG, 2), 0xAA55);
    assert_eq!(&read(&ram, ZERO_PAGE + zp::HEADER, 4), b"HdrS");
    let version = field(&ram, zp::VERSION, 2);
    assert!(version >= 0x020C, "boot protocol {version:#x}");
    assert_eq!(field(&ram, zp::TYPE_OF_LOADER, 1), 0xFF);
    assert_eq!(field(&ram, zp::CODE32_START, 4), HIMEM_START);
    assert_eq!(loaded.entry, HIMEM_START + 0x200, "the 64-bit entry");
    assert_eq!(loaded.zero_page, ZERO_PAGE);

    // The protected-mode kernel is the image after its setup sectors, byte for byte.
    let pm = &image[(setup_sects as usize + 1) * 512..];
    assert_eq!(loaded.kernel, (HIMEM_START, HIMEM_START + pm.len() as u64));
    assert!(
        read(&ram, HIMEM_START, pm.len()) == pm,
        "kernel bytes differ"
    );

    // The command line, NUL-terminated, where cmd_line_ptr says.
    assert_eq!(field(&ram, zp::CMD_LINE_PTR, 4), CMDLINE_ADDR);
    let line = read(&ram, CMDLINE_ADDR, cmdline.len() + 1);
    assert_eq!(&line[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(line[cmdline.len()], 0);

    // The initrd: page-aligned, below initrd_addr_max, clear of the space the kernel
    // decompresses into, byte for byte.
    let (at, size) = loaded.initrd.unwrap();
    assert_eq!(field(&ram, zp::RAMDISK_IMAGE, 4), at);
    assert_eq!(field(&ram, zp::RAMDISK_SIZE, 4), size);
    assert_eq!(size, initrd_bytes.len() as u64);
    assert_eq!(at % 4096, 0);
    assert!(at + size <= field(&ram, zp::INITRD_ADDR_MAX, 4) + 1);
    let hdr = loaded.params.hdr;
    let (pref, init) = (hdr.pref_address, hdr.init_size);
    let runs_to = pref.max(HIMEM_START) + u64::from(init);
    assert!(
        at >= runs_to,
        "initrd at {at:#x} inside the kernel's {runs_to:#x}"
    );
    assert!(read(&ram, at, initrd_bytes.len()) == initrd_bytes);

    // e820: low memory, the reserved BIOS/ACPI range, RAM from 1 MiB to the end.
    let n = field(&ram, zp::E820_ENTRIES, 1);
    let map: Vec<(u64, u64, u64)> = (0..n)
        .map(|i| {
            let e = ZERO_PAGE + zp::E820_TABLE + i * 20;
            (
                le(&read(&ram, e, 8)),
                le(&read(&ram, e + 8, 8)),
                le(&read(&ram, e + 16, 4)),
            )
        })
        .collect();
    assert_eq!(
        map,
        vec![
            (0, 0x9_FC00, 1),
            (0xE_0000, 0x2_0000, 2),
            (HIMEM_START, (512 << 20) - HIMEM_START, 1)
        ]
    );

    // The RSDP in guest RAM, where acpi_rsdp_addr says, with a valid checksum; the DSDT it
    // leads to holds the VMBus device.
    let rsdp_at = field(&ram, zp::ACPI_RSDP_ADDR, 8);
    assert_eq!(rsdp_at, loaded.rsdp);
    let rsdp = read(&ram, rsdp_at, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(rsdp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    let xsdt_at = le(&rsdp[24..32]);
    let fadt_at = le(&read(&ram, xsdt_at + 36, 8));
    let fadt = read(&ram, fadt_at, 276);
    assert_eq!(&fadt[..4], b"FACP");
    let dsdt_at = le(&fadt[140..148]);
    let dsdt_len = le(&read(&ram, dsdt_at + 4, 4)) as usize;
    let dsdt = read(&ram, dsdt_at, dsdt_len);
    assert!(dsdt.windows(7).any(|w| w == b"\x0DVMBus\0"));
}

#[test]
fn a_kernel_that_needs_more_ram_than_given_is_refused() {
    let test = "a_kernel_that_needs_more_ram_than_given_is_refused";
    let Some(path) = debian_kernel(test) else {
        return;
    };
    let ram = GuestRam::new(8 << 20).unwrap();
    let e = boot::load(&ram, 1, &mut File::open(&path).unwrap(), None, "").unwrap_err();
    assert!(e.to_string().contains("give more --memory"), "{e}");
}

/// Where the made-up kernel below leaves what it saw.
const REPORT: u64 = 0x3000;

/// A bzImage made here: one setup sector after the boot sector, a header of boot protocol
/// 2.15 with a 64-bit entry, and a protected-mode kernel whose 64-bit entry (+0x200) stores
/// RSI, CS, DS, the e820 entry count and the first 8 bytes of the command line, of the RSDP
/// and of the initrd at [`REPORT`], then powers the machine off through the FADT's sleep
/// register.
fn made_up_bzimage() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let store = |a: &mut CodeAssembler, slot: i32| a.mov(qword_ptr(rdi + slot * 8), rax);
    a.mov(edi, REPORT as u32).unwrap();
    a.mov(rax, rsi).unwrap();
    store(&mut a, 0).unwrap();
    a.xor(eax, eax).unwrap();
    a.mov(ax, cs).unwrap();
    store(&mut a, 1).unwrap();
    a.mov(ax, ds).unwrap();
    store(&mut a, 2).unwrap();
    a.movzx(eax, byte_ptr(rsi + zp::E820_ENTRIES as i32))
        .unwrap();
    store(&mut a, 3).unwrap();
    a.mov(eax, dword_ptr(rsi + zp::CMD_LINE_PTR as i32))
        .unwrap();
    a.mov(rax, qword_ptr(rax)).unwrap();
    store(&mut a, 4).unwrap();
    a.mov(rax, qword_ptr(rsi + zp::ACPI_RSDP_ADDR as i32))
        .unwrap();
    a.mov(rax, qword_ptr(rax)).unwrap();
    store(&mut a, 5).unwrap();
    a.mov(eax, dword_ptr(rsi + zp::RAMDISK_IMAGE as i32))
        .unwrap();
    a.mov(rax, qword_ptr(rax)).unwrap();
    store(&mut a, 6).unwrap();
    // S5: SLP_TYP 5 in bits 2-4, SLP_EN (bit 5).
    a.mov(dx, u32::from(hypervisor_shim::acpi::SLEEP_PORT))
        .unwrap();
    a.mov(
        al,
        (u32::from(hypervisor_shim::acpi::S5_SLP_TYP) << 2) | 0x20,
    )
    .unwrap();
    a.out(dx, al).unwrap();
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.jmp(spin).unwrap();
    let entry64 = a.assemble(HIMEM_START + 0x200).unwrap();

    let setup_sects = 1u8;
    let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    let put = |img: &mut Vec<u8>, at: usize, b: &[u8]| img[at..at + b.len()].copy_from_slice(b);
    img[0x1F1] = setup_sects;
    put(&mut img, 0x1FE, &0xAA55u16.to_le_bytes());
    put(&mut img, 0x202, b"HdrS");
    put(&mut img, 0x206, &0x020Fu16.to_le_bytes());
    img[0x211] = 1; // loadflags: LOADED_HIGH
    put(&mut img, 0x214, &(HIMEM_START as u32).to_le_bytes());
    put(&mut img, 0x22C, &0x7FFF_FFFFu32.to_le_bytes()); // initrd_addr_max
    put(&mut img, 0x236, &1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(&mut img, 0x238, &255u32.to_le_bytes()); // cmdline_size
    put(&mut img, 0x258, &(HIMEM_START).to_le_bytes()); // pref_address
    put(&mut img, 0x260, &0x1_0000u32.to_le_bytes()); // init_size
                                                      // The protected-mode kernel: the 32-bit entry's 512 bytes (unused: hlt), then the 64-bit.
    img.extend(std::iter::repeat_n(0xF4, 0x200));
    img.extend(entry64);
    img
}

#[test]
fn a_bzimage_64_bit_entry_gets_the_zero_page_and_boot_segments() {
    let test = "a_bzimage_64_bit_entry_gets_the_zero_page_and_boot_segments";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("shim-made-up-bz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (kpath, ipath) = (dir.join("bzImage"), dir.join("initrd"));
    std::fs::write(&kpath, made_up_bzimage()).unwrap();
    std::fs::write(&ipath, b"INITRD!!and more").unwrap();
    let mut vm = Vm::new(VmConfig {
        memory: 16 << 20,
        vcpus: 2,
    })
    .unwrap();
    let entry = vm
        .load_linux(
            &mut File::open(&kpath).unwrap(),
            Some(&mut File::open(&ipath).unwrap()),
            "CMDLINE! console=ttyS0",
        )
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let ram = vm.ram();
    let out = vm.run(entry, Box::new(Console::default())).unwrap();
    assert_eq!(out.status, ExitStatus::PowerOff, "the guest's ACPI S5");
    let report: Vec<u64> = (0..7).map(|i| le(&read(&ram, REPORT + i * 8, 8))).collect();
    assert_eq!(report[0], ZERO_PAGE, "RSI is the zero page");
    assert_eq!(report[1], 0x10, "CS is __BOOT_CS");
    assert_eq!(report[2], 0x18, "DS is __BOOT_DS");
    assert_eq!(report[3], 3, "e820 entries");
    assert_eq!(&report[4].to_le_bytes(), b"CMDLINE!");
    assert_eq!(&report[5].to_le_bytes(), b"RSD PTR ");
    assert_eq!(&report[6].to_le_bytes(), b"INITRD!!");
}

#[test]
fn vmbus_vm_names_what_a_bzimage_lacks() {
    let test = "vmbus_vm_names_what_a_bzimage_lacks";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(path) = debian_kernel(test) else {
        return;
    };
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vmbus-vm"))
            .args(args)
            .output()
            .unwrap()
    };
    let k = path.to_str().unwrap();
    let o = run(&["--memory", "8M", "--kernel", k]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(err.contains("give more --memory"), "{err}");
    let o = run(&["--kernel", k, "--initrd", "/nonexistent/initrd"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("cannot read initrd /nonexistent/initrd"),
        "{err}"
    );
    let long = "x".repeat(70_000);
    let o = run(&["--memory", "512M", "--kernel", k, "--cmdline", &long]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(err.contains("command line (70000 bytes"), "{err}");
}
