//! `vmbus-vm`: runs a guest on KVM with the userspace Hyper-V interface of `hypervisor-shim`.

// The option docs are `--help` text, where `[,key=value]` means optional, not a doc link.
#![allow(rustdoc::broken_intra_doc_links)]

use clap::Parser;
use hypervisor_shim::boot::{self, DEFAULT_CMDLINE};
use hypervisor_shim::own_vspd::{find_vspd, OwnVspd};
use hypervisor_shim::vm::{ExitStatus, Vm, VmConfig, DEBUG_EXIT_PORT, FLAT_LOAD_ADDR};
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status of vmbus-vm itself when it fails (the VM could not be built or run).
const VMM_FAILED: u8 = 125;

#[derive(Parser, Debug)]
#[command(
    name = "vmbus-vm",
    about = "Run a guest on KVM with a userspace Hyper-V interface",
    after_help = format!(
        "KERNEL is a Linux bzImage (64-bit boot protocol 2.12 or later) or a flat 64-bit binary. \
A bzImage is loaded with its zero page (e820 map, command line, initrd, ACPI RSDP) and ACPI \
tables (FADT hardware-reduced, MADT, a DSDT with the VMBus device), and vCPU 0 enters its 64-bit \
entry. A flat 64-bit binary is loaded at {FLAT_LOAD_ADDR:#x} and vCPU 0 starts there in long \
mode at CPL 0, with the first 4 GiB identity-mapped, RSP = {FLAT_LOAD_ADDR:#x}, interrupts off. \
The other vCPUs wait for INIT/SIPI.\n\n\
The guest's COM1 (16550 at 0x3F8) is this process's standard output. The VM ends when the \
guest writes a value to I/O port {DEBUG_EXIT_PORT:#x} (vmbus-vm then exits with the value's low \
byte), resets (port 0xCF9 or 0x64; exit 0), powers off (ACPI S5; exit 0) or triple-faults (exit 1). \
If the VM cannot be built or run, vmbus-vm says why and exits with {VMM_FAILED}."
    )
)]
struct Args {
    /// Guest RAM, in bytes or with a K, M or G suffix (binary units).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Number of vCPUs (1-64).
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// The guest kernel: a Linux bzImage, or a flat 64-bit binary (see below).
    #[arg(long)]
    kernel: PathBuf,
    /// An initrd (initramfs) for a bzImage kernel.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// The kernel command line of a bzImage kernel.
    #[arg(long, value_name = "S", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// vspd's partition socket: the guest's SynIC, HvPostMessage, EOM and HvSignalEvent go to
    /// that daemon, which serves the guest's VMBus (without it, VMBus calls get
    /// HV_STATUS_INVALID_CONNECTION_ID).
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["disk", "nic"])]
    vsp: Option<PathBuf>,
    /// A disk for a vspd of the VM's own (vspd's --disk syntax:
    /// path=FILE[,readonly=on][,direct=on][,queues=N][,controller=C][,lun=L]). Repeatable.
    /// With --disk or --nic, vmbus-vm starts vspd as a child process on a private socket,
    /// attaches to it, and stops it when the VM ends.
    #[arg(long, value_name = "OPTIONS")]
    disk: Vec<String>,
    /// A NIC for a vspd of the VM's own (vspd's --nic syntax: tap=NAME). Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    nic: Vec<String>,
    /// The vspd program for --disk/--nic (default: the vspd next to vmbus-vm, else from PATH).
    #[arg(long, value_name = "PATH")]
    vspd: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 512M, 2G, 4194304)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn run(args: Args) -> Result<ExitStatus, String> {
    let kpath = args.kernel.display();
    let mut kernel =
        File::open(&args.kernel).map_err(|e| format!("cannot read kernel {kpath}: {e}"))?;
    let bzimage =
        boot::is_bzimage(&mut kernel).map_err(|e| format!("cannot read kernel {kpath}: {e}"))?;
    let mut initrd = match &args.initrd {
        Some(p) => {
            Some(File::open(p).map_err(|e| format!("cannot read initrd {}: {e}", p.display()))?)
        }
        None => None,
    };
    let mut flat = Vec::new();
    if bzimage {
        boot::check_bzimage(&mut kernel).map_err(|e| format!("{kpath}: {e}"))?;
    } else {
        kernel
            .read_to_end(&mut flat)
            .map_err(|e| format!("cannot read kernel {kpath}: {e}"))?;
        if flat.starts_with(b"\x7fELF") {
            return Err(format!(
                "{kpath} is an ELF file (a vmlinux?), not a bzImage: give the compressed \
                 kernel (arch/x86/boot/bzImage, /boot/vmlinuz-*)"
            ));
        }
        if initrd.is_some() || args.cmdline != DEFAULT_CMDLINE {
            return Err(format!(
                "{kpath} is not a bzImage (no \"HdrS\" header at offset 0x202): \
                 --initrd and --cmdline need a Linux bzImage"
            ));
        }
    }
    let mut vm = Vm::new(VmConfig {
        memory: args.memory,
        vcpus: args.cpus,
    })
    .map_err(|e| e.to_string())?;
    if let Some(socket) = &args.vsp {
        vm.attach(socket).map_err(|e| e.to_string())?;
    }
    // Dropped when run() returns, after the VM: SIGTERM, wait, remove its directory.
    let mut own = None;
    if !args.disk.is_empty() || !args.nic.is_empty() {
        let vspd = find_vspd(args.vspd.as_deref());
        let o = OwnVspd::start(&vspd, &args.disk, &args.nic).map_err(|e| e.to_string())?;
        eprintln!(
            "vmbus-vm: started {} (pid {}) on {}",
            vspd.display(),
            o.pid(),
            o.socket().display()
        );
        vm.attach(o.socket()).map_err(|e| e.to_string())?;
        own = Some(o);
    }
    let entry = if bzimage {
        vm.load_linux(&mut kernel, initrd.as_mut(), &args.cmdline)
            .map_err(|e| format!("{kpath}: {e}"))?
    } else {
        vm.load_flat(&flat)
            .map_err(|e| format!("{kpath} does not fit in guest RAM: {e}"))?
    };
    let out = vm
        .run(entry, Box::new(std::io::stdout()))
        .map_err(|e| e.to_string())?;
    drop(own);
    Ok(out.status)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(status) => {
            eprintln!("vmbus-vm: guest ended: {status:?}");
            ExitCode::from(match status {
                ExitStatus::DebugExit(v) => v as u8,
                ExitStatus::Reset | ExitStatus::PowerOff => 0,
                ExitStatus::TripleFault => 1,
            })
        }
        Err(e) => {
            eprintln!("vmbus-vm: {e}");
            ExitCode::from(VMM_FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4194304"), Ok(4 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1MB"), Ok(1 << 20));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
