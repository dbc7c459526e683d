//! What vsp's cross-process tests share: a launcher for the real `vspd` binary.
// Each test crate uses a different part of it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `vspd`, killed on drop (its log is printed if the test is failing).
pub struct Daemon {
    child: Child,
    /// Its working directory.
    pub dir: PathBuf,
    /// Its partition socket.
    pub socket: PathBuf,
    log: PathBuf,
    /// Remove `dir` once the daemon is gone.
    owns_dir: bool,
}

impl Daemon {
    /// Starts `vspd --socket DIR/vspd.sock ARGS...` in `dir` (relative paths in `args` are
    /// relative to it), logging to `DIR/vspd.log`, and waits for its socket.
    pub fn spawn<S: AsRef<OsStr>>(dir: &Path, args: impl IntoIterator<Item = S>) -> Self {
        let socket = dir.join("vspd.sock");
        let log = dir.join("vspd.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_vspd"))
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .current_dir(dir)
            .env("VSPD_LOG", "warn")
            // A system call the seccomp allowlist misses kills vspd, failing the test.
            .env(ringbuf::sandbox::MISMATCH_ENV, "kill")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "vspd exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "vspd did not create its socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child,
            dir: dir.to_owned(),
            socket,
            log,
            owns_dir: false,
        }
    }

    /// Removes its directory on drop, after the daemon has ended (and its log was printed).
    pub fn owning_dir(mut self) -> Self {
        self.owns_dir = true;
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has ended.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Its open file descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// A numeric field of `/proc/PID/status`.
    pub fn status_field(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = s.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    pub fn threads(&self) -> u64 {
        self.status_field("Threads:")
    }

    /// Stops it with SIGTERM and returns its log (stderr) once it has ended.
    pub fn terminate(mut self) -> String {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "vspd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `f` holds (the daemon tears down asynchronously).
    pub fn eventually(&self, what: &str, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for: {what} (fds {:?}, threads {})",
                std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                    .unwrap()
                    .map(|e| std::fs::read_link(e.unwrap().path()).unwrap_or_default())
                    .collect::<Vec<_>>(),
                self.threads()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let _ = writeln!(std::io::stderr(), "vspd's log:\n{log}");
        }
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A fresh directory for one test (removed by its owner).
pub fn fresh_dir(prefix: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The guest side of `vscd --nbd`, in this process: a loopback guest attached to a `vspd`,
/// every disk it is offered exported over NBD as `disk0`, `disk1`, ...
pub struct NbdGuest {
    /// The NBD server's socket.
    pub socket: PathBuf,
    stop: std::sync::Arc<ringbuf::Event>,
    server: Option<std::thread::JoinHandle<Result<(), vsc::Error>>>,
    disks: Vec<std::sync::Arc<vsc::storvsc::Disk>>,
    guest: Option<vsc::guest::StorageGuest>,
    /// The host died and [`NbdGuest::abandon`] failed what it held: no detach at the end.
    abandoned: bool,
}

impl NbdGuest {
    /// Attaches a guest with `memory` bytes of guest memory to the daemon at `vspd_socket` and
    /// serves its disks on `socket`.
    pub fn attach(vspd_socket: &Path, memory: u64, socket: PathBuf) -> Self {
        Self::attach_with(vspd_socket, vsc::guest::GuestConfig::new(memory), socket)
    }

    /// As [`NbdGuest::attach`], with the guest configured by `config` (queues, reconnection).
    pub fn attach_with(
        vspd_socket: &Path,
        config: vsc::guest::GuestConfig,
        socket: PathBuf,
    ) -> Self {
        use vsc::nbd::{BlockDevice, Export, NbdServer};
        let guest = vsc::guest::StorageGuest::attach_with(vspd_socket, config).unwrap();
        let disks: Vec<_> = guest.disks.iter().map(|(_, d)| d.clone()).collect();
        let exports = disks
            .iter()
            .enumerate()
            .map(|(i, d)| Export {
                name: format!("disk{i}"),
                description: format!("VMBus SCSI disk {i}"),
                device: d.clone() as std::sync::Arc<dyn BlockDevice>,
            })
            .collect();
        let server = NbdServer::bind(&socket, exports).unwrap();
        let stop = std::sync::Arc::new(ringbuf::Event::new().unwrap());
        let s = stop.clone();
        Self {
            socket,
            stop,
            server: Some(std::thread::spawn(move || server.run(s))),
            disks,
            guest: Some(guest),
            abandoned: false,
        }
    }

    /// The NBD URI of `export`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// The guest behind the exports.
    pub fn storage(&self) -> &vsc::guest::StorageGuest {
        self.guest.as_ref().expect("attached until stopped")
    }

    /// After the host died: fails whatever is queued or in flight on the disks (a dead host
    /// never completes it), so that NBD requests waiting for it are answered with an error.
    pub fn abandon(&mut self) {
        self.abandoned = true;
        for d in &self.disks {
            let _ = d.shutdown();
        }
    }

    /// Stops the NBD server (checking it ends cleanly and removes its socket), then detaches
    /// the guest (or, after [`NbdGuest::abandon`], just drops it).
    pub fn stop(mut self) {
        self.finish(true);
    }

    fn finish(&mut self, check: bool) {
        let _ = self.stop.signal();
        let Some(server) = self.server.take() else {
            return;
        };
        if !check {
            // Something failed: a connection may be stuck; do not wait for it.
            return;
        }
        server
            .join()
            .expect("NBD server thread panicked")
            .expect("NBD server failed");
        assert!(!self.socket.exists(), "NBD socket left behind");
        self.disks.clear();
        let guest = self.guest.take().unwrap();
        if !self.abandoned {
            guest.detach().expect("guest detach");
        }
    }
}

impl Drop for NbdGuest {
    fn drop(&mut self) {
        let check = !std::thread::panicking();
        self.finish(check);
    }
}

/// `len` bytes of a xorshift pattern that differs with `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The sense key and additional sense code of a request that ended in CHECK CONDITION.
pub fn sense(e: vsc::storvsc::IoError) -> (u8, u8) {
    match e {
        vsc::storvsc::IoError::Sense { key, asc, .. } => (key, asc),
        other => panic!("expected CHECK CONDITION, got {other:?}"),
    }
}

/// The `vscd` binary, beside `vspd` in the build tree (a workspace build makes both; vsc's
/// binary is not one of this package's, so cargo does not name it here). `None`, said, where it
/// is not built (never in CI).
pub fn vscd_binary(test: &str) -> Option<PathBuf> {
    let bin = Path::new(env!("CARGO_BIN_EXE_vspd")).with_file_name("vscd");
    if bin.exists() {
        return Some(bin);
    }
    let msg = format!(
        "{test}: {} is not built (cargo build -p vsc)",
        bin.display()
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
    eprintln!("SKIP {msg}");
    None
}
