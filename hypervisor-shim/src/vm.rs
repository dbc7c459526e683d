//! The VM: guest RAM in a sealed memfd, the in-kernel irqchip, vCPUs with a thread each, and
//! the exits that reach userspace (port I/O for the UART, the debug-exit port, reset ports and
//! the hypercall page; RDMSR/WRMSR of the synthetic MSRs through the MSR filter).
//!
//! Boot state of a flat guest ([`Vm::load_flat`], [`Vm::run`]): vCPU 0 starts in 64-bit long
//! mode at CPL 0 at the entry address, with the first 4 GiB identity-mapped by 2 MiB pages
//! (tables at [`PAGE_TABLES`]), a flat GDT at [`GDT_ADDR`] (code 0x08, data 0x10), RSP equal to
//! the entry address (the stack grows down below it), interrupts disabled. The other vCPUs wait
//! for an INIT/SIPI from vCPU 0, as on a PC, unless [`Vm::start_ap`] gave them an entry.
#![allow(unsafe_code)] // kvm-ioctls' memory-slot registration and the kvm_run union read.

use crate::frontend::Link;
use crate::hyperv::{self, Hypercall, MsrWrite, Partition, VpState};
use crate::uart::{self, Uart};
use crate::{Error, Result};
use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_segment, kvm_userspace_memory_region, CpuId,
    KvmIrqRouting, KVM_CAP_X86_USER_SPACE_MSR, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES,
    KVM_MSR_EXIT_REASON_FILTER, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{
    IoEventAddress, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuExit,
    VcpuFd, VmFd,
};
use ringbuf::shmem::{create_memfd, Mapping};
use rustix::event::EventfdFlags;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::Duration;
use vmbus_proto::channel::{MESSAGE_CONNECTION_ID, MESSAGE_CONNECTION_ID_4, MESSAGE_SINT};
use vmbus_proto::partition::{vp_flags, SetVp};
use vmbus_proto::synic::HvPostMessageInput;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};
use zerocopy::FromBytes;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 64;
/// Smallest guest RAM: the boot structures below 1 MiB plus room for a flat guest above it.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Where [`Vm::load_flat`] puts a flat binary and where it starts.
pub const FLAT_LOAD_ADDR: u64 = 0x10_0000;
/// The debug-exit port: a guest `out` of a byte, word or dword here ends the VM with
/// [`ExitStatus::DebugExit`] carrying the value written.
pub const DEBUG_EXIT_PORT: u16 = 0xF4;
/// The reset control register: a write with bit 2 set resets the machine.
pub const RESET_PORT: u16 = 0xCF9;
/// The keyboard controller's command port: 0xFE pulses the reset line.
pub const KBD_COMMAND_PORT: u16 = 0x64;
/// The flat GDT of a flat guest.
pub const GDT_ADDR: u64 = 0x500;
/// PML4, PDPT and four page directories of a flat guest (6 pages from here).
pub const PAGE_TABLES: u64 = 0x9000;
/// RAM above this (3 GiB) is placed from 4 GiB up, leaving the MMIO hole of the LAPIC/IOAPIC.
pub const LOW_RAM_END: u64 = 0xC000_0000;
const HIGH_RAM_BASE: u64 = 1 << 32;
/// A flat 64-bit code segment descriptor (execute/read, L).
const CODE64_DESC: u64 = 0x00AF_9A00_0000_FFFF;
/// A flat data segment descriptor (read/write, 4 GiB).
const DATA_DESC: u64 = 0x00CF_9200_0000_FFFF;

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// The guest wrote this value to [`DEBUG_EXIT_PORT`].
    DebugExit(u32),
    /// The guest reset the machine (port 0xCF9, the keyboard controller, or a KVM reset event).
    Reset,
    /// The guest powered off (a KVM shutdown system event).
    PowerOff,
    /// A triple fault.
    TripleFault,
}

/// Exits that reached userspace, by kind.
#[derive(Debug, Default)]
pub struct ExitCounts {
    /// Port I/O other than the hypercall page.
    pub io: AtomicU64,
    /// Synthetic-MSR reads and writes.
    pub msr: AtomicU64,
    /// Calls into the hypercall page (slow path).
    pub hypercall: AtomicU64,
    /// Fast-path HvSignalEvent calls that exited (no eventfd bound to their connection id).
    pub signal_exits: AtomicU64,
    /// All exits, including the above.
    pub total: AtomicU64,
}

/// What [`Vm::run`] gives back.
#[derive(Debug)]
pub struct Outcome {
    /// How the VM ended.
    pub status: ExitStatus,
    /// Exits to userspace over the run.
    pub exits: ExitCounts,
    /// The partition-wide synthetic registers at the end.
    pub partition: Partition,
    /// Each vCPU's LAPIC IRR (256 bits as 8 words) when it stopped: which vectors were
    /// pending and not yet taken.
    pub lapic_irr: Vec<[u32; 8]>,
}

/// Guest memory: one memfd, mapped once in this process, registered with KVM as one slot below
/// [`LOW_RAM_END`] and, for larger guests, a second from 4 GiB.
pub struct GuestRam {
    fd: OwnedFd,
    map: Mapping,
    size: u64,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM (a sparse memfd, mapped once).
    pub fn new(size: u64) -> Result<Self> {
        let fd =
            create_memfd("guest-ram", size).map_err(|source| Error::Memory { size, source })?;
        let len = usize::try_from(size).map_err(|_| Error::Config("memory too large".into()))?;
        let map = Mapping::from_fd(fd.as_fd(), 0, len)
            .map_err(|source| Error::Memory { size, source })?;
        Ok(GuestRam { fd, map, size })
    }

    /// The memfd (to hand to `vspd`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd offset of guest-physical `gpa .. gpa + len`, if all of it is RAM.
    pub fn offset(&self, gpa: u64, len: u64) -> Option<usize> {
        let low = self.size.min(LOW_RAM_END);
        let end = gpa.checked_add(len)?;
        let off = if end <= low {
            gpa
        } else if gpa >= HIGH_RAM_BASE && end - HIGH_RAM_BASE <= self.size - low {
            low + (gpa - HIGH_RAM_BASE)
        } else {
            return None;
        };
        usize::try_from(off).ok()
    }

    /// Copies `bytes` into guest RAM at `gpa`.
    pub fn write(&self, gpa: u64, bytes: &[u8]) -> Result<()> {
        let off = self
            .offset(gpa, bytes.len() as u64)
            .ok_or(Error::OutsideRam {
                gpa,
                len: bytes.len() as u64,
            })?;
        self.map.write(off, bytes).map_err(|source| Error::Memory {
            size: self.size,
            source,
        })
    }

    /// Copies guest RAM at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let off = self
            .offset(gpa, buf.len() as u64)
            .ok_or(Error::OutsideRam {
                gpa,
                len: buf.len() as u64,
            })?;
        self.map.read(off, buf).map_err(|source| Error::Memory {
            size: self.size,
            source,
        })
    }

    /// The slots to register: (guest-physical base, memfd offset, length).
    pub fn slots(&self) -> Vec<(u64, u64, u64)> {
        let low = self.size.min(LOW_RAM_END);
        let mut v = vec![(0, 0, low)];
        if self.size > low {
            v.push((HIGH_RAM_BASE, low, self.size - low));
        }
        v
    }
}

/// Size and shape of a VM.
#[derive(Debug, Clone, Copy)]
pub struct VmConfig {
    /// Guest RAM in bytes: a multiple of 4 KiB, at least [`MIN_MEMORY`].
    pub memory: u64,
    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub vcpus: u32,
}

/// A KVM VM with its RAM and vCPUs, ready to run.
pub struct Vm {
    _kvm: Kvm,
    fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    vcpus: Vec<VcpuFd>,
    tsc_hz: u64,
    link: Option<Arc<Link>>,
    /// Application processors started at an entry of their own ([`Vm::start_ap`]).
    ap_entries: Vec<(u32, u64)>,
    /// Set by [`Vm::load_linux`]: vCPU 0 enters a Linux kernel with RSI = this zero page.
    linux_zero_page: Option<u64>,
}

/// First GSI of the per-VP MSI routes that the irqfds handed to `vspd` use (0-23 are the
/// PIC's and IOAPIC's).
pub const IRQFD_GSI_BASE: u32 = 24;

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Physical memory of the host, from /proc/meminfo.
fn host_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

impl Vm {
    /// Creates the VM: opens /dev/kvm, creates the in-kernel irqchip, guest RAM and the vCPUs
    /// with the Hyper-V CPUID, and sends the synthetic MSRs to userspace.
    pub fn new(cfg: VmConfig) -> Result<Self> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!(
                "--cpus must be 1 to {MAX_VCPUS}, not {}",
                cfg.vcpus
            )));
        }
        if cfg.memory < MIN_MEMORY || !cfg.memory.is_multiple_of(4096) {
            return Err(Error::Config(format!(
                "memory must be a multiple of 4 KiB and at least {} MiB, not {} bytes",
                MIN_MEMORY >> 20,
                cfg.memory
            )));
        }
        if let Some(total) = host_memory() {
            if cfg.memory > total {
                return Err(Error::MemoryTooLarge {
                    size: cfg.memory,
                    host: total,
                });
            }
        }
        let kvm = Kvm::new().map_err(Error::NoKvm)?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(0xFFFB_D000)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;

        let ram = Arc::new(GuestRam::new(cfg.memory)?);
        for (slot, (gpa, off, len)) in ram.slots().into_iter().enumerate() {
            let host = ram
                .map
                .host_ptr(off as usize, len as usize)
                .map_err(|source| Error::Memory {
                    size: cfg.memory,
                    source,
                })?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: len,
                userspace_addr: host.as_ptr() as u64,
            };
            // SAFETY: the range is inside `ram.map` (host_ptr checked it), which lives as long
            // as the VM: `ram` is held by the Vm and by every vCPU thread, and the VM fd is
            // dropped (ending all guest access) no later than the mapping.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            args: [u64::from(KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
            ..Default::default()
        };
        fd.enable_cap(&cap)
            .map_err(kvm_err("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
        let deny = [0u8; (hyperv::MSR_COUNT / 8) as usize];
        let range = MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base: hyperv::MSR_BASE,
            msr_count: hyperv::MSR_COUNT,
            bitmap: &deny,
        };
        fd.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
            .map_err(kvm_err("KVM_X86_SET_MSR_FILTER"))?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for i in 0..cfg.vcpus {
            let vcpu = fd
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let entries = hyperv::build_cpuid(supported.as_slice(), i, cfg.vcpus);
            let cpuid = CpuId::from_entries(&entries)
                .map_err(|_| Error::Config("too many CPUID entries".into()))?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            vcpus.push(vcpu);
        }
        let tsc_hz = vcpus[0]
            .get_tsc_khz()
            .map(|k| u64::from(k) * 1000)
            .unwrap_or(0);
        Ok(Vm {
            _kvm: kvm,
            fd: Arc::new(fd),
            ram,
            vcpus,
            tsc_hz,
            link: None,
            ap_entries: Vec::new(),
            linux_zero_page: None,
        })
    }

    /// Guest RAM, shared: it outlives [`Vm::run`] for whoever keeps this handle (tests read a
    /// guest's results from it after the run).
    pub fn ram(&self) -> Arc<GuestRam> {
        Arc::clone(&self.ram)
    }

    /// Attaches the VM to the `vspd` listening at `socket` (HELLO, then ADD_MEMORY for guest
    /// RAM): from then on the guest's SynIC programming, HvPostMessage, EOM and HvSignalEvent go
    /// to the daemon, and its channel eventfds are bound with KVM_IOEVENTFD.
    pub fn attach(&mut self, socket: &Path) -> Result<()> {
        let link = Link::attach(socket, self.vcpus.len() as u32, &self.ram)?;
        self.link = Some(Arc::new(link));
        Ok(())
    }

    /// The connection to `vspd`, once attached (to see which channels it bound).
    pub fn link(&self) -> Option<Arc<Link>> {
        self.link.clone()
    }

    /// Binds `eventfd` to HvSignalEvent of `connection_id`: the hypercall page's fast path then
    /// signals it in the kernel (KVM_IOEVENTFD on [`hyperv::SIGNAL_PORT`], datamatch on the id)
    /// with no exit to userspace.
    pub fn bind_signal(&self, connection_id: u32, eventfd: &EventFd) -> Result<()> {
        bind_signal(&self.fd, connection_id, eventfd, true)
    }

    /// Loads a flat binary at [`FLAT_LOAD_ADDR`] and returns its entry point (the same address).
    pub fn load_flat(&self, image: &[u8]) -> Result<u64> {
        self.ram.write(FLAT_LOAD_ADDR, image)?;
        Ok(FLAT_LOAD_ADDR)
    }

    /// Loads a Linux bzImage, an initrd and a command line with the zero page and the ACPI
    /// tables (see [`crate::boot`]); returns the kernel's 64-bit entry for [`Vm::run`].
    pub fn load_linux(
        &mut self,
        kernel: &mut std::fs::File,
        initrd: Option<&mut std::fs::File>,
        cmdline: &str,
    ) -> Result<u64> {
        let loaded =
            crate::boot::load(&self.ram, self.vcpus.len() as u32, kernel, initrd, cmdline)?;
        self.linux_zero_page = Some(loaded.zero_page);
        Ok(loaded.entry)
    }

    /// Starts vCPU `vp` (not 0) at `entry` too, in the same long-mode state as vCPU 0 with
    /// RSP = `entry`, instead of waiting for INIT/SIPI: for flat guests that use several VPs.
    pub fn start_ap(&mut self, vp: u32, entry: u64) -> Result<()> {
        if vp == 0 || vp as usize >= self.vcpus.len() {
            return Err(Error::Config(format!("no application processor {vp}")));
        }
        self.ap_entries.push((vp, entry));
        Ok(())
    }

    fn setup_long_mode(&self, entry: u64) -> Result<()> {
        // GDT: null, 64-bit code (0x08), data (0x10); for Linux, the boot protocol's
        // __BOOT_CS (0x10) and __BOOT_DS (0x18).
        let gdt: &[u64] = match self.linux_zero_page {
            None => &[0, CODE64_DESC, DATA_DESC],
            Some(_) => &[0, 0, CODE64_DESC, DATA_DESC],
        };
        let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
        self.ram.write(GDT_ADDR, &bytes)?;
        // PML4 -> PDPT -> 4 page directories of 2 MiB pages: 0..4 GiB identity-mapped.
        let (pml4, pdpt, pd) = (PAGE_TABLES, PAGE_TABLES + 0x1000, PAGE_TABLES + 0x2000);
        self.ram.write(pml4, &(pdpt | 3).to_le_bytes())?;
        for i in 0..4u64 {
            self.ram
                .write(pdpt + i * 8, &((pd + i * 0x1000) | 3).to_le_bytes())?;
            let dir: Vec<u8> = (0..512u64)
                .flat_map(|j| (((i << 30) | (j << 21)) | 0x83).to_le_bytes())
                .collect();
            self.ram.write(pd + i * 0x1000, &dir)?;
        }
        let starts = std::iter::once((0, entry)).chain(self.ap_entries.iter().copied());
        for (vp, entry) in starts {
            let linux = self.linux_zero_page.filter(|_| vp == 0);
            self.enter_long_mode(&self.vcpus[vp as usize], entry, vp != 0, linux)?;
        }
        Ok(())
    }

    fn enter_long_mode(
        &self,
        vcpu: &VcpuFd,
        entry: u64,
        ap: bool,
        linux_zero_page: Option<u64>,
    ) -> Result<()> {
        let (gdt_len, cs, ds) = match linux_zero_page {
            None => (3, 0x08, 0x10),
            Some(_) => (4, 0x10, 0x18),
        };
        let pml4 = PAGE_TABLES;
        if ap {
            // Out of wait-for-SIPI: runnable from the state set below.
            let state = kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            };
            vcpu.set_mp_state(state)
                .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        }
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xFFFF_FFFF,
            selector: cs,
            type_: 0xB,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: ds,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = (gdt_len * 8 - 1) as u16;
        sregs.cr3 = pml4;
        sregs.cr4 |= 1 << 5; // PAE
        sregs.cr0 |= (1 << 0) | (1 << 31); // PE, PG
        sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let regs = kvm_bindings::kvm_regs {
            rip: entry,
            rsp: entry,
            rsi: linux_zero_page.unwrap_or(0),
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
    }

    /// Runs the VM from `entry` (a flat guest's entry, see the module doc) until it ends,
    /// with the UART's output going to `console`.
    pub fn run(self, entry: u64, console: Box<dyn Write + Send>) -> Result<Outcome> {
        self.setup_long_mode(entry)?;
        let irq = match &self.link {
            Some(_) => Some(Irq::new(&self.fd, self.vcpus.len())?),
            None => None,
        };
        let shared = Arc::new(Shared {
            vm: Arc::clone(&self.fd),
            link: self.link.clone(),
            irq,
            lapic_irr: Mutex::new(vec![[0; 8]; self.vcpus.len()]),
            ram: Arc::clone(&self.ram),
            uart: Mutex::new(Uart::new(console)),
            partition: Mutex::new(Partition {
                tsc_hz: self.tsc_hz,
                ..Default::default()
            }),
            exits: ExitCounts::default(),
            stop: AtomicBool::new(false),
            end: Mutex::new(None),
            ended: Condvar::new(),
        });
        static KICK_HANDLER: Once = Once::new();
        KICK_HANDLER.call_once(|| {
            // The handler does nothing: the signal only makes KVM_RUN return EINTR.
            let _ = register_signal_handler(SIGRTMIN(), kick_handler);
        });
        let mut threads = Vec::new();
        let Vm {
            _kvm,
            fd,
            ram: _,
            vcpus,
            tsc_hz: _,
            link,
            ap_entries: _,
            linux_zero_page: _,
        } = self;
        // The daemon's messages: STATUS answers and the channels' eventfds, bound as they come.
        let reader = match &link {
            Some(link) => {
                let (link, vm, sh) = (Arc::clone(link), Arc::clone(&fd), Arc::clone(&shared));
                let t = std::thread::Builder::new()
                    .name("vspd-link".into())
                    .spawn(move || {
                        let r = link.serve(|id, efd, bound| {
                            if let Err(e) = bind_signal(&vm, id, efd, bound) {
                                eprintln!("vmbus-vm: connection {id}: {e}");
                            }
                        });
                        // The daemon going away ends the VM (unless it is ending already).
                        if !sh.stop.load(Ordering::SeqCst) {
                            let e = r
                                .err()
                                .unwrap_or(Error::Vsp("vspd closed the connection".into()));
                            sh.finish(Err(e));
                        }
                    })
                    .map_err(|e| Error::Thread(e.to_string()))?;
                Some(t)
            }
            None => None,
        };
        for (i, mut vcpu) in vcpus.into_iter().enumerate() {
            let shared = Arc::clone(&shared);
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    let r = vcpu_loop(i as u32, &mut vcpu, &shared);
                    if let Ok(lapic) = vcpu.get_lapic() {
                        let mut irr = [0u32; 8];
                        for (w, word) in irr.iter_mut().enumerate() {
                            let at = 0x200 + 0x10 * w;
                            let b: Vec<u8> =
                                lapic.regs[at..at + 4].iter().map(|&c| c as u8).collect();
                            *word = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        }
                        shared.lapic_irr.lock().unwrap_or_else(|e| e.into_inner())[i] = irr;
                    }
                    shared.finish(r);
                })
                .map_err(|e| Error::Thread(e.to_string()))?;
            threads.push(t);
        }
        let result = {
            let mut end = shared.end.lock().unwrap_or_else(|e| e.into_inner());
            while end.is_none() {
                end = shared.ended.wait(end).unwrap_or_else(|e| e.into_inner());
            }
            end.take().unwrap_or(Err(Error::Thread("no result".into())))
        };
        // Stop the other vCPUs: the flag is checked before each KVM_RUN and the signal ends a
        // KVM_RUN in progress; resent until each thread is gone, since one sent just before a
        // thread enters KVM_RUN would be lost.
        shared.stop.store(true, Ordering::SeqCst);
        if let Some(link) = &link {
            link.stop_sending();
        }
        for t in threads {
            while !t.is_finished() {
                let _ = t.kill(SIGRTMIN());
                std::thread::sleep(Duration::from_millis(2));
            }
            t.join()
                .map_err(|_| Error::Thread("a vCPU thread panicked".into()))?;
        }
        if let (Some(link), Some(reader)) = (&link, reader) {
            link.shutdown();
            reader
                .join()
                .map_err(|_| Error::Thread("the vspd reader panicked".into()))?;
        }
        drop(link);
        drop(fd);
        let shared = Arc::into_inner(shared).ok_or(Error::Thread("state still shared".into()))?;
        let mut uart = shared.uart.into_inner().unwrap_or_else(|e| e.into_inner());
        uart.flush().map_err(Error::Console)?;
        let status = result?;
        Ok(Outcome {
            status,
            lapic_irr: shared
                .lapic_irr
                .into_inner()
                .unwrap_or_else(|e| e.into_inner()),
            exits: shared.exits,
            partition: shared
                .partition
                .into_inner()
                .unwrap_or_else(|e| e.into_inner()),
        })
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn bind_signal(vm: &VmFd, connection_id: u32, eventfd: &EventFd, bound: bool) -> Result<()> {
    let port = IoEventAddress::Pio(u64::from(hyperv::SIGNAL_PORT));
    if bound {
        vm.register_ioevent(eventfd, &port, connection_id)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    } else {
        vm.unregister_ioevent(eventfd, &port, connection_id)
            .map_err(kvm_err("KVM_IOEVENTFD(deassign)"))
    }
}

/// The per-VP irqfds handed to `vspd` and the MSI routes behind them: VP n's irqfd is GSI
/// `IRQFD_GSI_BASE + n`, routed as a fixed MSI of the VMBus SINT's vector to APIC id n once
/// the guest unmasks that SINT.
struct Irq {
    /// Each VP's irqfd: the descriptor handed to `vspd`, and the same eventfd registered with
    /// KVM_IRQFD.
    irqfds: Vec<(OwnedFd, EventFd)>,
    vectors: Mutex<Vec<Option<u8>>>,
}

impl Irq {
    fn new(vm: &VmFd, vcpus: usize) -> Result<Self> {
        let irq = Irq {
            irqfds: Vec::new(),
            vectors: Mutex::new(vec![None; vcpus]),
        };
        irq.route(vm, &[])?;
        let mut irqfds = Vec::new();
        for i in 0..vcpus {
            let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                .map_err(|e| Error::Vsp(format!("eventfd: {e}")))?;
            let dup = fd
                .try_clone()
                .map_err(|e| Error::Vsp(format!("eventfd: {e}")))?;
            let efd = crate::frontend::event_fd(dup);
            vm.register_irqfd(&efd, IRQFD_GSI_BASE + i as u32)
                .map_err(kvm_err("KVM_IRQFD"))?;
            irqfds.push((fd, efd));
        }
        Ok(Irq { irqfds, ..irq })
    }

    /// Installs the routing table: KVM's default PIC and IOAPIC routes for GSIs 0-23 (the table
    /// replaces them all), then one MSI route per VP with a vector.
    fn route(&self, vm: &VmFd, vectors: &[Option<u8>]) -> Result<()> {
        let mut entries = Vec::new();
        let chip = |gsi: u32, irqchip: u32, pin: u32| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = irqchip;
            e.u.irqchip.pin = pin;
            e
        };
        for gsi in 0..24 {
            if gsi < 8 {
                entries.push(chip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(chip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
            entries.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (vp, vector) in vectors.iter().enumerate() {
            let Some(vector) = vector else { continue };
            let mut e = kvm_irq_routing_entry {
                gsi: IRQFD_GSI_BASE + vp as u32,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            // Fixed delivery, physical destination: APIC id = VP index.
            e.u.msi.address_lo = 0xFEE0_0000 | ((vp as u32) << 12);
            e.u.msi.data = u32::from(*vector);
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| Error::Config("too many interrupt routes".into()))?;
        vm.set_gsi_routing(&table)
            .map_err(kvm_err("KVM_SET_GSI_ROUTING"))
    }
}

struct Shared {
    vm: Arc<VmFd>,
    link: Option<Arc<Link>>,
    irq: Option<Irq>,
    lapic_irr: Mutex<Vec<[u32; 8]>>,
    ram: Arc<GuestRam>,
    uart: Mutex<Uart<Box<dyn Write + Send>>>,
    partition: Mutex<Partition>,
    exits: ExitCounts,
    stop: AtomicBool,
    end: Mutex<Option<Result<ExitStatus>>>,
    ended: Condvar,
}

impl Shared {
    /// Records the first vCPU's way of ending the VM; later ones (the kicked threads) are
    /// dropped.
    fn finish(&self, r: Result<Option<ExitStatus>>) {
        let r = match r {
            Ok(Some(s)) => Ok(s),
            Ok(None) => return, // stopped by the flag
            Err(e) => Err(e),
        };
        self.stop.store(true, Ordering::SeqCst);
        let mut end = self.end.lock().unwrap_or_else(|e| e.into_inner());
        if end.is_none() {
            *end = Some(r);
            self.ended.notify_all();
        }
    }
}

/// What a port write asks for after the exit is released.
enum Io {
    Continue,
    Hypercall,
    Signal,
    End(ExitStatus),
}

fn port_out(shared: &Shared, port: u16, data: &[u8]) -> Result<Io> {
    let mut v = [0u8; 4];
    let n = data.len().min(4);
    v[..n].copy_from_slice(&data[..n]);
    let value = u32::from_le_bytes(v);
    Ok(match port {
        p if p == u16::from(hyperv::HYPERCALL_PORT) => return Ok(Io::Hypercall),
        p if p == u16::from(hyperv::SIGNAL_PORT) => return Ok(Io::Signal),
        DEBUG_EXIT_PORT => Io::End(ExitStatus::DebugExit(value)),
        RESET_PORT if value & 0x4 != 0 => Io::End(ExitStatus::Reset),
        KBD_COMMAND_PORT if value & 0xFF == 0xFE => Io::End(ExitStatus::Reset),
        crate::acpi::SLEEP_PORT if crate::acpi::is_power_off(value as u8) => {
            Io::End(ExitStatus::PowerOff)
        }
        p if (uart::COM1..uart::COM1 + uart::PORTS).contains(&p) => {
            let mut u = shared.uart.lock().unwrap_or_else(|e| e.into_inner());
            u.write(p - uart::COM1, data[0]).map_err(Error::Console)?;
            Io::Continue
        }
        _ => Io::Continue,
    })
}

fn port_in(shared: &Shared, port: u16, data: &mut [u8]) {
    if (uart::COM1..uart::COM1 + uart::PORTS).contains(&port) && !data.is_empty() {
        let mut u = shared.uart.lock().unwrap_or_else(|e| e.into_inner());
        data[0] = u.read(port - uart::COM1);
        return;
    }
    data.fill(0xFF); // nothing there
}

/// Runs one vCPU until the VM ends: `Ok(Some(status))` when this vCPU ended it, `Ok(None)`
/// when another did.
fn vcpu_loop(index: u32, vcpu: &mut VcpuFd, shared: &Shared) -> Result<Option<ExitStatus>> {
    let mut vp = VpState::new(index);
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(source) => {
                return Err(Error::Kvm {
                    what: "KVM_RUN",
                    source,
                })
            }
        };
        shared.exits.total.fetch_add(1, Ordering::Relaxed);
        let mut after = After::Nothing;
        match exit {
            VcpuExit::IoOut(port, data) => match port_out(shared, port, data)? {
                Io::Continue => {
                    shared.exits.io.fetch_add(1, Ordering::Relaxed);
                }
                Io::Hypercall => after = After::Hypercall { fast_signal: false },
                Io::Signal => after = After::Hypercall { fast_signal: true },
                Io::End(s) => return Ok(Some(s)),
            },
            VcpuExit::IoIn(port, data) => {
                shared.exits.io.fetch_add(1, Ordering::Relaxed);
                port_in(shared, port, data);
            }
            VcpuExit::X86Rdmsr(e) => {
                shared.exits.msr.fetch_add(1, Ordering::Relaxed);
                let p = shared.partition.lock().unwrap_or_else(|e| e.into_inner());
                match hyperv::read_msr(&p, &vp, e.index) {
                    Some(v) => *e.data = v,
                    None => *e.error = 1,
                }
            }
            VcpuExit::X86Wrmsr(e) => {
                shared.exits.msr.fetch_add(1, Ordering::Relaxed);
                let mut p = shared.partition.lock().unwrap_or_else(|e| e.into_inner());
                match hyperv::write_msr(&mut p, &mut vp, e.index, e.data) {
                    MsrWrite::HypercallPage(gpa) => {
                        if shared.ram.write(gpa, &hyperv::hypercall_page()).is_err() {
                            // A page outside RAM cannot hold the code: refuse the enable.
                            p.hypercall &= !1;
                            *e.error = 1;
                        }
                    }
                    MsrWrite::Gp => *e.error = 1,
                    MsrWrite::Crash(params) => {
                        let line = format!(
                            "\nvmbus-vm: guest crash reported on vCPU {index}: P0-P4 {params:#x?}\n"
                        );
                        let mut u = shared.uart.lock().unwrap_or_else(|e| e.into_inner());
                        for b in line.bytes() {
                            let _ = u.write(0, b);
                        }
                    }
                    MsrWrite::SynicChanged => after = After::Synic,
                    MsrWrite::Eom => after = After::Eom,
                    MsrWrite::Done => {}
                }
            }
            VcpuExit::MmioRead(_, data) => data.fill(0xFF),
            VcpuExit::MmioWrite(..) | VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
            VcpuExit::SystemEvent(kind, _) => {
                return Ok(Some(match kind {
                    KVM_SYSTEM_EVENT_RESET => ExitStatus::Reset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => ExitStatus::PowerOff,
                    other => {
                        return Err(Error::UnhandledExit {
                            vcpu: index,
                            exit: format!("system event {other}"),
                        })
                    }
                }))
            }
            VcpuExit::Shutdown => return Ok(Some(ExitStatus::TripleFault)),
            VcpuExit::InternalError => return Err(internal_error(index, vcpu)),
            other => {
                return Err(Error::UnhandledExit {
                    vcpu: index,
                    exit: format!("{other:?}"),
                })
            }
        };
        match after {
            After::Nothing => {}
            After::Synic => sync_vp(shared, &vp)?,
            After::Eom => {
                if let Some(link) = &shared.link {
                    link.eom(index)?;
                }
            }
            After::Hypercall { fast_signal } => {
                let counter = if fast_signal {
                    &shared.exits.signal_exits
                } else {
                    &shared.exits.hypercall
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
                let control = if fast_signal {
                    u64::from(hyperv::SIGNAL_EVENT_FAST)
                } else {
                    regs.rcx
                };
                let status = hypercall(shared, index, control, regs.rdx)?;
                regs.rax = if fast_signal {
                    hyperv::fast_signal_rax(regs.rdx, status)
                } else {
                    u64::from(status)
                };
                vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            }
        }
    }
}

/// Work left after a vCPU exit once the exit's borrow of the vCPU has ended.
enum After {
    Nothing,
    Hypercall { fast_signal: bool },
    Synic,
    Eom,
}

/// Handles a call into the hypercall page; returns the Hyper-V status.
fn hypercall(shared: &Shared, vp: u32, control: u64, input: u64) -> Result<u16> {
    let link = shared.link.as_deref();
    let read = |gpa: u64| {
        let mut buf = [0u8; size_of::<HvPostMessageInput>()];
        shared.ram.read(gpa, &mut buf).ok()?;
        HvPostMessageInput::read_from_bytes(&buf).ok()
    };
    let known = |call: &Hypercall| match (call, link) {
        (_, None) => false,
        (Hypercall::Post(m), Some(_)) => {
            m.connection_id == MESSAGE_CONNECTION_ID || m.connection_id == MESSAGE_CONNECTION_ID_4
        }
        // vspd owns the connection ids: one without a bound eventfd (yet: its CHANNEL_SIGNAL may
        // still be on the way) is forwarded as SIGNAL_EVENT, and the daemon ignores unknown ids.
        (Hypercall::Signal { .. }, Some(_)) => true,
        (Hypercall::Status(_), Some(_)) => false,
    };
    Ok(
        match hyperv::decide_hypercall(control, input, read, known) {
            Hypercall::Status(s) => s,
            Hypercall::Post(m) => match link {
                Some(l) if !l.post(vp, *m)? => hyperv::status::INSUFFICIENT_BUFFERS,
                _ => hyperv::status::SUCCESS,
            },
            Hypercall::Signal {
                connection_id,
                flag,
            } => match link {
                Some(l) if l.signal(connection_id) => hyperv::status::SUCCESS,
                Some(l) if l.signal_slow(connection_id, flag)? => hyperv::status::SUCCESS,
                Some(_) => hyperv::status::INSUFFICIENT_BUFFERS,
                None => hyperv::status::INVALID_CONNECTION_ID,
            },
        },
    )
}

/// After a SynIC MSR write: re-routes the VP's irqfd to the VMBus SINT's vector and tells
/// `vspd` the VP's pages and whether the SINT is masked. Pages outside guest RAM are not
/// passed on (the daemon could not write them); the guest gets no messages there.
fn sync_vp(shared: &Shared, vp: &VpState) -> Result<()> {
    let (Some(link), Some(irq)) = (&shared.link, &shared.irq) else {
        return Ok(());
    };
    let sint = vp.sint[usize::from(MESSAGE_SINT)];
    let masked = sint & (1 << 16) != 0 || vp.scontrol & 1 == 0;
    let vector = (!masked).then_some(sint as u8);
    {
        let mut vectors = irq.vectors.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut vectors[vp.index as usize];
        if *slot != vector {
            *slot = vector;
            irq.route(&shared.vm, &vectors)?;
        }
    }
    let page_ok = |reg: u64| reg & 1 != 0 && shared.ram.offset(reg & !0xFFF, 4096).is_some();
    let mut flags = 0;
    if page_ok(vp.simp) {
        flags |= vp_flags::SIMP_ENABLED;
    }
    if page_ok(vp.siefp) {
        flags |= vp_flags::SIEFP_ENABLED;
    }
    if masked {
        flags |= vp_flags::SINT_MASKED;
    }
    let set = SetVp {
        vp: vp.index,
        flags,
        simp_gpa: vp.simp & !0xFFF,
        siefp_gpa: vp.siefp & !0xFFF,
    };
    link.set_vp(set, irq.irqfds[vp.index as usize].0.as_fd())
}

fn internal_error(index: u32, vcpu: &mut VcpuFd) -> Error {
    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills the `internal`
    // member of the union; it is plain integers, valid for any bit pattern.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    Error::Emulation {
        vcpu: index,
        suberror: internal.suberror,
        rip,
        data: internal.data[..n].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_above_3_gib_is_placed_from_4_gib() {
        // A sparse memfd: nothing is touched, so this costs no memory.
        let ram = GuestRam::new(5 << 30).unwrap();
        assert_eq!(
            ram.slots(),
            vec![
                (0, 0, LOW_RAM_END),
                (1 << 32, LOW_RAM_END, (5 << 30) - LOW_RAM_END)
            ]
        );
        assert_eq!(ram.offset(0, 4096), Some(0));
        assert_eq!(
            ram.offset(LOW_RAM_END - 4096, 4096),
            Some(LOW_RAM_END as usize - 4096)
        );
        assert_eq!(
            ram.offset(LOW_RAM_END - 4096, 4097),
            None,
            "runs into the hole"
        );
        assert_eq!(
            ram.offset(0xFEE0_0000, 4),
            None,
            "the LAPIC page is not RAM"
        );
        assert_eq!(ram.offset(1 << 32, 8), Some(LOW_RAM_END as usize));
        let top = (1u64 << 32) + (5 << 30) - LOW_RAM_END;
        assert_eq!(ram.offset(top - 8, 8), Some((5usize << 30) - 8));
        assert_eq!(ram.offset(top - 8, 9), None);
        assert_eq!(ram.offset(u64::MAX, 2), None);
        ram.write(1 << 32, b"high").unwrap();
        let mut b = [0u8; 4];
        ram.read(1 << 32, &mut b).unwrap();
        assert_eq!(&b, b"high");
        assert!(matches!(
            ram.write(0xFEE0_0000, b"x"),
            Err(Error::OutsideRam { .. })
        ));
    }

    #[test]
    fn small_ram_has_one_slot() {
        let ram = GuestRam::new(4 << 20).unwrap();
        assert_eq!(ram.slots(), vec![(0, 0, 4 << 20)]);
        assert_eq!(ram.offset(4 << 20, 1), None);
        assert_eq!(ram.offset(1 << 32, 1), None);
    }
}
