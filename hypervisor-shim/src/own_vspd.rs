//! A `vspd` of the VM's own: `vmbus-vm --disk ... --nic ...` starts the daemon as a child
//! process on a partition socket in a private directory, attaches to it like `--vsp`, and stops
//! it when the VM ends.
//!
//! A child process rather than the `vsp` library in this process: vspd confines every one of
//! its threads with a seccomp allowlist that has no KVM ioctls, a device back end that crashes
//! or is compromised through a hostile guest's requests must not take the VMM with it (nor
//! the other way round), and the shim stays a plain front end of the partition socket (it
//! depends on `vmbus-proto` and `ringbuf`, not on `vsp`). The child gets SIGTERM if vmbus-vm
//! dies without stopping it (PR_SET_PDEATHSIG).
#![allow(unsafe_code)] // Command::pre_exec, to set the parent-death signal in the child.

use crate::{Error, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the child may take to listen on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The `vspd` to run: `explicit` if given, else the one installed next to this executable,
/// else `vspd` from PATH.
pub fn find_vspd(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("vspd")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("vspd"))
}

/// A running child `vspd`; stopped (SIGTERM, then SIGKILL) and its directory removed on drop.
pub struct OwnVspd {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl OwnVspd {
    /// Starts `vspd` with these `--disk` and `--nic` options on a socket in a new private
    /// directory (mode 0700) under the runtime or temporary directory, and waits until it
    /// listens. Its log goes to this process's standard error.
    pub fn start(vspd: &Path, disks: &[String], nics: &[String]) -> Result<Self> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = private_dir(&base)?;
        let socket = dir.join("vspd.sock");
        let mut cmd = Command::new(vspd);
        cmd.arg("--socket").arg(&socket);
        for d in disks {
            cmd.arg("--disk").arg(d);
        }
        for n in nics {
            cmd.arg("--nic").arg(n);
        }
        // The guest's console is this process's stdout: vspd's log stays on stderr.
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only makes one
        // prctl(2) system call (async-signal-safe, no allocation, no locks).
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::TERM,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Error::Vsp(format!(
                    "cannot start {} ({e}); build it (cargo build -p vsp --bin vspd) or name \
                     it with --vspd",
                    vspd.display()
                )));
            }
        };
        let mut own = OwnVspd { child, dir, socket };
        let deadline = Instant::now() + START_TIMEOUT;
        while !own.socket.exists() {
            if let Ok(Some(status)) = own.child.try_wait() {
                return Err(Error::Vsp(format!(
                    "its own vspd ended ({status}) before listening: its messages are above"
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Vsp(format!(
                    "its own vspd did not listen on {} within {START_TIMEOUT:?}",
                    own.socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(own)
    }

    /// The partition socket to attach to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Directory holding the socket.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Creates `BASE/vmbus-vm-PID-N`, mode 0700, with the first N not taken.
fn private_dir(base: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    for n in 0..1000 {
        let dir = base.join(format!("vmbus-vm-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Error::Vsp(format!(
                    "cannot create a directory for vspd's socket in {}: {e}",
                    base.display()
                )))
            }
        }
    }
    Err(Error::Vsp(format!(
        "no free directory name for vspd's socket in {}",
        base.display()
    )))
}

impl Drop for OwnVspd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
