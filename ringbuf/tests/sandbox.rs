//! The seccomp filter in a child process (it applies to every thread of the process that
//! installs it, so the test binary re-runs itself with the ignored test `child_side`): what the
//! daemon and the guest need still works, and what they never need is refused with EPERM.

// One raw call (ptrace) has no safe wrapper to show refused.
#![allow(unsafe_code)]

use std::process::Command;

const CHILD_ENV: &str = "RINGBUF_SANDBOX_CHILD";

#[test]
fn forbidden_calls_are_refused_and_the_serving_calls_work() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_side", "--ignored", "--nocapture"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("sandbox child: all checks passed"), "{text}");
}

#[test]
#[ignore = "run by forbidden_calls_are_refused_and_the_serving_calls_work in a child process"]
fn child_side() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    assert!(!ringbuf::sandbox::filtered());
    ringbuf::sandbox::install().unwrap();
    assert!(
        ringbuf::sandbox::filtered(),
        "/proc/self/status shows the filter"
    );

    // Refused: running a program, an internet socket, tracing another process.
    let e = Command::new("/bin/true").status().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "execve: {e}");
    let e = std::net::TcpListener::bind("127.0.0.1:0").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "AF_INET socket: {e}");
    // SAFETY: ptrace(PTRACE_TRACEME) takes no pointers; it is refused before it does anything.
    let r = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );

    // Allowed: what serving needs (threads, memfds, mappings, eventfds, Unix sockets, files).
    let fd = ringbuf::shmem::create_memfd("sandboxed", 8192).unwrap();
    let m = ringbuf::Mapping::from_shared_file(std::os::fd::AsFd::as_fd(&fd), 0, 8192).unwrap();
    m.write(0, b"ok").unwrap();
    let ev = ringbuf::Event::new().unwrap();
    let t = std::thread::spawn(move || ev.signal().unwrap());
    t.join().unwrap();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    drop((a, b));
    let path = std::env::temp_dir().join(format!("ringbuf-sandbox-{}", std::process::id()));
    std::fs::write(&path, b"data").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
    std::fs::remove_file(&path).unwrap();
    println!("sandbox child: all checks passed");
}
