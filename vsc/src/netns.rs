//! Named network namespaces for the network demo, tests and benches: made with `ip netns add`,
//! removed (with every interface in them) on drop; threads run inside one with `setns`.

use std::os::fd::AsFd;
use std::process::{Command, Stdio};

/// Runs `ip ARGS` (words split on whitespace); its error output if it fails.
pub fn ip(args: &str) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why network namespaces with TAPs cannot be made here (not root, no `/dev/net/tun`, no
/// `ip`), or `None`.
pub fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root (network namespaces and TAP devices)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    if ip("-V").is_err() {
        return Some("`ip` is missing (iproute2; scripts/install-deps.sh installs it)".into());
    }
    None
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns(String);

impl Netns {
    /// Makes the namespace `name` (replacing a stale one of that name), with `lo` up.
    pub fn create(name: &str) -> Result<Self, String> {
        let _ = ip(&format!("netns del {name}"));
        ip(&format!("netns add {name}"))?;
        let ns = Self(name.to_owned());
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Runs `ip ARGS` in the namespace.
    pub fn ip(&self, args: &str) -> Result<(), String> {
        ip(&format!("-n {} {args}", self.0))
    }

    /// A command that runs `program` in the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    /// Runs `f` on a new thread that lives in the namespace (sockets, TAPs and threads it
    /// makes are there), and returns what it returns.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(&self.0, f)
    }
}

/// Runs `f` on a new thread in the namespace `name`; panics (on the caller) if `f` panics or
/// the namespace cannot be entered.
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).expect("the namespace's file");
        rustix::thread::move_into_link_name_space(
            fd.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns into the namespace");
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&format!("netns del {}", self.0));
    }
}
