//! Booting Linux through its 64-bit boot protocol (Documentation/arch/x86/boot.rst): the
//! bzImage's protected-mode kernel and the initrd are loaded with the rust-vmm `linux-loader`
//! crate, then the zero page (`boot_params`: the image's setup header, the e820 map, the
//! command line, the initrd, the RSDP) and the ACPI tables ([`crate::acpi`]) are written, and
//! vCPU 0 enters the kernel's 64-bit entry (load address + 0x200) in long mode with RSI
//! pointing at the zero page.
//!
//! Guest-physical layout below 1 MiB: the flat GDT at 0x500 ([`crate::vm::GDT_ADDR`]), the
//! zero page at [`ZERO_PAGE`], the identity-mapping page tables at 0x9000-0xEFFF, the command
//! line at [`CMDLINE_ADDR`], the ACPI tables from [`crate::acpi::ACPI_BASE`]. The kernel goes
//! at its `code32_start` (1 MiB), the initrd at the top of low RAM below the kernel's
//! `initrd_addr_max`, above the space the kernel decompresses into.

use crate::acpi;
use crate::vm::{GuestRam, LOW_RAM_END};
use crate::{Error, Result};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

/// The zero page (`struct boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// The most command-line bytes this layout has room for (including the NUL).
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Where the protected-mode kernel is loaded (its `code32_start` must not be below it).
pub const HIMEM_START: u64 = 0x10_0000;
/// The command line when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
/// The 64-bit entry is this far into the protected-mode kernel.
const ENTRY_64_OFFSET: u64 = 0x200;
/// Low RAM the e820 map gives the guest below the ACPI tables (the usual 639 KiB).
const LOW_MEMORY_END: u64 = 0x9_FC00;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// setup_header.xloadflags: the kernel has a 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// setup_header.loadflags: the protected-mode code is loaded at 0x100000 (a bzImage).
const LOADED_HIGH: u8 = 1 << 0;
/// The oldest boot protocol with the 64-bit entry and the fields used here (2.12).
const MIN_PROTOCOL: u16 = 0x020C;

/// What [`load`] put where.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The zero page's address (RSI at the entry).
    pub zero_page: u64,
    /// Where the protected-mode kernel was loaded, and its end.
    pub kernel: (u64, u64),
    /// Where the initrd was loaded, and its size.
    pub initrd: Option<(u64, u64)>,
    /// The zero page as written.
    pub params: boot_params,
    /// The RSDP's address.
    pub rsdp: u64,
}

fn boot_err(what: impl std::fmt::Display) -> Error {
    Error::Boot(what.to_string())
}

/// Whether `image` starts like a bzImage: "HdrS" at 0x202, the boot protocol's magic.
pub fn is_bzimage(image: &mut File) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    image.seek(SeekFrom::Start(0x202))?;
    let r = image.read_exact(&mut magic);
    image.rewind()?;
    match r {
        Ok(()) => Ok(&magic == b"HdrS"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads and checks a bzImage's setup header: the boot protocol's magic, a version with the
/// 64-bit entry (2.12 or later) and the XLF_KERNEL_64 flag. For a clear refusal before any VM
/// is built; [`load`] checks the same.
pub fn check_bzimage(image: &mut File) -> Result<setup_header> {
    let io = |e: std::io::Error| boot_err(format!("reading the kernel: {e}"));
    if !is_bzimage(image).map_err(io)? {
        return Err(boot_err(
            "the kernel is not a bzImage (no \"HdrS\" boot-protocol header at offset 0x202)",
        ));
    }
    let mut hdr = setup_header::default();
    image.seek(SeekFrom::Start(0x1F1)).map_err(io)?;
    let r = image.read_exact(hdr.as_mut_slice());
    image.rewind().map_err(io)?;
    r.map_err(io)?;
    check_header(&hdr)?;
    Ok(hdr)
}

fn check_header(hdr: &setup_header) -> Result<()> {
    let version = hdr.version;
    if version < MIN_PROTOCOL {
        return Err(boot_err(format!(
            "boot protocol {}.{:02} is too old: the 64-bit entry needs 2.12 or later",
            version >> 8,
            version & 0xFF
        )));
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 || hdr.loadflags & LOADED_HIGH == 0 {
        return Err(boot_err(
            "the bzImage has no 64-bit entry point (xloadflags.XLF_KERNEL_64 is clear)",
        ));
    }
    Ok(())
}

/// Guest RAM as `vm-memory` sees it: the same memfd mapped again (shared, so writes through
/// it are the guest's memory), one region per KVM slot.
fn guest_memory(ram: &GuestRam) -> Result<GuestMemoryMmap> {
    let fd = ram
        .fd()
        .try_clone_to_owned()
        .map_err(|e| boot_err(format!("duplicating the guest RAM memfd: {e}")))?;
    let file = std::sync::Arc::new(File::from(fd));
    let ranges: Vec<_> = ram
        .slots()
        .into_iter()
        .map(|(gpa, off, len)| {
            (
                GuestAddress(gpa),
                len as usize,
                Some(FileOffset::from_arc(file.clone(), off)),
            )
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|e| boot_err(format!("mapping guest RAM: {e}")))
}

/// The e820 map of `ram`: low memory, the reserved range of the BIOS area and the ACPI tables,
/// RAM from 1 MiB to the end of the low slot, and RAM from 4 GiB for larger guests.
pub fn e820(ram: &GuestRam) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, end: u64, kind: u32| boot_e820_entry {
        addr,
        size: end - addr,
        r#type: kind,
    };
    let mut map = vec![
        entry(0, LOW_MEMORY_END, E820_RAM),
        entry(acpi::ACPI_BASE, acpi::ACPI_END, E820_RESERVED),
    ];
    for (gpa, _, len) in ram.slots() {
        let start = gpa.max(HIMEM_START);
        if gpa + len > start {
            map.push(entry(start, gpa + len, E820_RAM));
        }
    }
    map
}

/// Loads the bzImage `kernel`, the `initrd` and `cmdline` into `ram` for `vcpus` processors,
/// with the ACPI tables; returns where vCPU 0 starts.
pub fn load(
    ram: &GuestRam,
    vcpus: u32,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cmdline: &str,
) -> Result<Loaded> {
    let header = check_bzimage(kernel)?;
    // The kernel decompresses into [max(load, pref_address), + init_size): that must be RAM
    // (and the initrd goes above it).
    let image_len = kernel
        .metadata()
        .map_err(|e| boot_err(format!("reading the kernel: {e}")))?
        .len();
    // setup_sects 0 means 4 (the boot protocol's oldest rule).
    let sects = match header.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_len = (sects + 1) * 512;
    let low_end = ram.size().min(LOW_RAM_END);
    let runs_to = (HIMEM_START.max(header.pref_address) + u64::from(header.init_size))
        .max(HIMEM_START + image_len.saturating_sub(setup_len));
    if runs_to > low_end {
        return Err(boot_err(format!(
            "the kernel needs RAM up to {} MiB to decompress and run; give more --memory",
            runs_to.div_ceil(1 << 20)
        )));
    }
    let mem = guest_memory(ram)?;
    let result = BzImage::load(&mem, None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| boot_err(format!("loading the bzImage: {e}")))?;
    let hdr = result
        .setup_header
        .ok_or_else(|| boot_err("the bzImage has no setup header"))?;
    check_header(&hdr)?;
    let kernel_at = result.kernel_load.0;
    let kernel_end = result.kernel_end;

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = 0xFF;
    params.hdr.code32_start = kernel_at as u32;

    let line_max = (hdr.cmdline_size as usize + 1).min(CMDLINE_MAX);
    let line = Cmdline::try_from(cmdline, line_max).map_err(|e| {
        boot_err(format!(
            "command line ({} bytes, this kernel takes at most {}): {e}",
            cmdline.len(),
            line_max - 1
        ))
    })?;
    load_cmdline(&mem, GuestAddress(CMDLINE_ADDR), &line)
        .map_err(|e| boot_err(format!("writing the command line: {e}")))?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;

    let mut initrd_at = None;
    if let Some(file) = initrd {
        let size = file
            .metadata()
            .map_err(|e| boot_err(format!("reading the initrd: {e}")))?
            .len();
        let max = u64::from(hdr.initrd_addr_max).min(low_end - 1);
        let at = (max + 1)
            .checked_sub(size)
            .map(|a| a & !0xFFF)
            .filter(|&a| a >= runs_to)
            .ok_or_else(|| {
                boot_err(format!(
                    "the initrd ({size} bytes) does not fit between the kernel (up to {runs_to:#x}) \
                     and {:#x}; give more --memory",
                    max + 1
                ))
            })?;
        mem.read_exact_volatile_from(GuestAddress(at), file, size as usize)
            .map_err(|e| boot_err(format!("loading the initrd: {e}")))?;
        params.hdr.ramdisk_image = at as u32;
        params.hdr.ramdisk_size = size as u32;
        initrd_at = Some((at, size));
    }

    let map = e820(ram);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries = map.len() as u8;

    let tables = acpi::build(vcpus);
    for (at, bytes) in &tables.tables {
        ram.write(*at, bytes)?;
    }
    params.acpi_rsdp_addr = tables.rsdp();
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(|e| boot_err(format!("writing the zero page: {e}")))?;
    Ok(Loaded {
        entry: kernel_at + ENTRY_64_OFFSET,
        zero_page: ZERO_PAGE,
        kernel: (kernel_at, kernel_end),
        initrd: initrd_at,
        params,
        rsdp: tables.rsdp(),
    })
}
