//! The seccomp filter the daemon (`vspd`) and the loopback guest (`vscd`) run under once they
//! are set up: an allowlist of the system calls their serving threads make, with the arguments
//! checked where a call could reach beyond them (`socket` only for Unix sockets, `ioctl` only
//! for a few descriptor flags, `prctl` only for thread names, `sched_setaffinity` only for the
//! calling thread). Everything else, `execve`, `ptrace`, `process_vm_*`, network sockets,
//! `mount`, `bpf` among them, fails with `EPERM`.
//!
//! Why `EPERM` and not killing the process: the daemon serves many guests; a call that a new
//! code path makes and the list misses should fail that one operation (and show in the log as
//! an I/O error), not take every guest down. Either way the call does not happen.
//!
//! The filter is installed for every thread of the process at once (`SECCOMP_FILTER_FLAG_TSYNC`)
//! and inherited by the threads started later. Install it after the listening sockets are bound
//! and the configuration's files are open; files opened later (disk images on a reload) are
//! opened with `openat`, which the list allows.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::Error;

/// Calls allowed with any arguments.
const ALLOWED: &[libc::c_long] = &[
    // Descriptors and files.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_memfd_create,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    // Waiting.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_restart_syscall,
    // io_uring.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // Unix sockets already open (the partition socket, NBD connections).
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_socketpair,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    // Threads and signals.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_set_tid_address,
    libc::SYS_rseq,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_tgkill,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_prlimit64,
    libc::SYS_getrandom,
    libc::SYS_uname,
    // netvsp's link-state timer.
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
];

/// `ioctl` requests allowed: descriptor flags, the terminal check of the log writer, and what
/// a TAP backend needs (netdev: opening a TAP queue on a reload that adds a NIC, attaching and
/// detaching queues as channels open and close, its link's MTU, address, up/down and state
/// through a Unix socket).
const IOCTLS: &[libc::c_ulong] = &[
    libc::FIONBIO,
    libc::FIOCLEX,
    libc::FIONCLEX,
    libc::TCGETS,
    libc::TUNSETIFF as libc::c_ulong,
    libc::TUNSETVNETHDRSZ as libc::c_ulong,
    libc::TUNSETOFFLOAD as libc::c_ulong,
    libc::TUNSETQUEUE as libc::c_ulong,
    libc::TUNSETCARRIER as libc::c_ulong,
    libc::SIOCGIFFLAGS,
    libc::SIOCSIFFLAGS,
    libc::SIOCGIFMTU,
    libc::SIOCSIFMTU,
    libc::SIOCGIFHWADDR,
    libc::SIOCSIFHWADDR,
];

/// `prctl` options allowed: thread names.
const PRCTLS: &[u64] = &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64];

fn eq(arg: u8, len: SeccompCmpArgLen, value: u64) -> Result<SeccompRule, Error> {
    let c = SeccompCondition::new(arg, len, SeccompCmpOp::Eq, value)
        .map_err(|e| Error::Sandbox(e.to_string()))?;
    SeccompRule::new(vec![c]).map_err(|e| Error::Sandbox(e.to_string()))
}

/// What happens to a call the allowlist does not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// It fails with EPERM (the default: see the module's documentation).
    Eperm,
    /// The process is killed (SIGSYS). The test suites run the daemons so, through
    /// [`MISMATCH_ENV`], so that a call the list misses fails a test loudly instead of
    /// turning into an I/O error somebody might ignore.
    Kill,
}

/// The environment variable that picks [`Mismatch`]: `kill`, or anything else for EPERM.
pub const MISMATCH_ENV: &str = "VMBUS_SECCOMP_MISMATCH";

impl Mismatch {
    /// From [`MISMATCH_ENV`].
    pub fn from_env() -> Self {
        match std::env::var(MISMATCH_ENV).as_deref() {
            Ok("kill") => Self::Kill,
            _ => Self::Eperm,
        }
    }
}

/// The filter, compiled for this machine.
#[allow(clippy::unnecessary_cast)]
pub fn filter(mismatch: Mismatch) -> Result<BpfProgram, Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&n| (n, Vec::new())).collect();
    rules.insert(
        libc::SYS_socket,
        vec![eq(0, SeccompCmpArgLen::Dword, libc::AF_UNIX as u64)?],
    );
    rules.insert(
        libc::SYS_ioctl,
        IOCTLS
            .iter()
            // `c_ulong` is not `u64` on every target.
            .map(|&r| eq(1, SeccompCmpArgLen::Dword, r as u64))
            .collect::<Result<_, _>>()?,
    );
    // A thread's own CPU affinity only (pid 0: `poller::share_cpu_when_sleeping`).
    rules.insert(
        libc::SYS_sched_setaffinity,
        vec![eq(0, SeccompCmpArgLen::Dword, 0)?],
    );
    rules.insert(
        libc::SYS_prctl,
        PRCTLS
            .iter()
            .map(|&o| eq(0, SeccompCmpArgLen::Dword, o))
            .collect::<Result<_, _>>()?,
    );
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| Error::Sandbox(format!("no filter for {}", std::env::consts::ARCH)))?;
    let on_mismatch = match mismatch {
        Mismatch::Eperm => SeccompAction::Errno(libc::EPERM as u32),
        Mismatch::Kill => SeccompAction::KillProcess,
    };
    let filter = SeccompFilter::new(rules, on_mismatch, SeccompAction::Allow, arch)
        .map_err(|e| Error::Sandbox(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Sandbox(e.to_string()))
}

/// Installs the filter on every thread of the process (and so on every thread started later),
/// with the [`Mismatch`] action [`MISMATCH_ENV`] names. It cannot be removed.
pub fn install() -> Result<(), Error> {
    let program = filter(Mismatch::from_env())?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| Error::Sandbox(e.to_string()))
}

/// Whether the calling process runs under a seccomp filter (from `/proc/self/status`).
pub fn filtered() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim() == "2"))
        })
        .unwrap_or(false)
}
