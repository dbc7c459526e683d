//! The hypervisor shim: a thin VMM over KVM that gives a guest a userspace Hyper-V interface.
//!
//! What is here today: [`vm::Vm`], guest RAM in a sealed memfd (so that it can later be handed
//! to `vspd`), an in-kernel irqchip, 1 to [`vm::MAX_VCPUS`] vCPUs with a thread each, a 16550
//! UART at 0x3F8 ([`uart`]), a debug-exit port ([`vm::DEBUG_EXIT_PORT`]) and a clean end of the
//! VM with an [`vm::ExitStatus`]; the Hyper-V CPUID leaves and synthetic MSRs handled in
//! userspace through KVM's MSR filter ([`hyperv`]); the partition-socket front end to `vspd`
//! ([`frontend`]). Guests are Linux bzImages with an initrd and a command line, booted through
//! the 64-bit boot protocol with a zero page and ACPI tables ([`boot`], [`acpi`]), or flat
//! 64-bit binaries started in long mode ([`vm::Vm::load_flat`]). See `docs/ARCHITECTURE.md`.

pub mod acpi;
pub mod boot;
pub mod frontend;
pub mod hyperv;
pub mod own_vspd;
pub mod uart;
pub mod vm;

/// Everything that can go wrong building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm ({0}): is KVM available and do you have access to it?")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM could not be created or mapped.
    #[error("guest memory of {size} bytes cannot be had: {source}")]
    Memory {
        /// Requested size.
        size: u64,
        /// Why.
        #[source]
        source: ringbuf::Error,
    },
    /// More guest RAM than the host has.
    #[error("guest memory of {size} bytes cannot be had: the host has {host} bytes")]
    MemoryTooLarge {
        /// Requested size.
        size: u64,
        /// The host's physical memory.
        host: u64,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A guest-physical range lies outside guest RAM.
    #[error("guest range {gpa:#x}+{len:#x} is outside guest RAM")]
    OutsideRam {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// KVM could not emulate a guest instruction, or reported an internal error.
    #[error(
        "vCPU {vcpu}: KVM internal error, suberror {suberror} (1 = emulation failure), \
         rip {rip:#x}, data {data:x?}"
    )]
    Emulation {
        /// vCPU index.
        vcpu: u32,
        /// `kvm_run.internal.suberror`.
        suberror: u32,
        /// The guest's RIP at the exit.
        rip: u64,
        /// `kvm_run.internal.data[..ndata]`.
        data: Vec<u64>,
    },
    /// The vCPU exited for a reason this VMM does not handle.
    #[error("vCPU {vcpu}: unhandled exit {exit}")]
    UnhandledExit {
        /// vCPU index.
        vcpu: u32,
        /// Debug description of the exit.
        exit: String,
    },
    /// A vCPU thread could not be started or panicked.
    #[error("vCPU thread: {0}")]
    Thread(String),
    /// The partition socket to `vspd`: connecting, a refusal, or a protocol error.
    #[error("vspd: {0}")]
    Vsp(String),
    /// The kernel, initrd or command line cannot be loaded as the Linux boot protocol asks.
    #[error("Linux boot: {0}")]
    Boot(String),
    /// Writing console output failed.
    #[error("console output: {0}")]
    Console(#[source] std::io::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
