//! `vscd`'s command line: what it refuses before it connects anywhere.

use std::process::Command;

mod common {
    pub mod tools;
}
use common::tools::refuses_values;

#[test]
fn a_bad_polling_limit_is_refused_and_a_good_one_accepted() {
    refuses_values(
        env!("CARGO_BIN_EXE_vscd"),
        &["--connect", "/nonexistent/vspd.sock", "--list"],
        "--poll-us",
        &["abc", "-1", "1000001"],
    );
    // Accepted: it gets as far as the (missing) daemon.
    let out = Command::new(env!("CARGO_BIN_EXE_vscd"))
        .args([
            "--connect",
            "/nonexistent/vspd.sock",
            "--list",
            "--poll-us",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("--poll-us"));
}

#[test]
fn bad_nbd_limits_are_refused_and_good_ones_accepted() {
    let args = [
        "--connect",
        "/nonexistent/vspd.sock",
        "--nbd",
        "/nonexistent/nbd.sock",
    ];
    let bin = env!("CARGO_BIN_EXE_vscd");
    for (option, bad) in [
        ("--nbd-max-connections", &["0", "-1", "x"][..]),
        ("--nbd-max-handshakes", &["0", "65537"]),
        ("--nbd-handshake-timeout", &["0", "3601", "1.5"]),
        ("--nbd-reply-timeout", &["0", "3601"]),
        ("--nbd-connection-budget-mib", &["0", "65537"]),
        ("--nbd-connection-reserve-kib", &["-1", "1048577"]),
        ("--nbd-server-budget-mib", &["0"]),
        ("--nbd-workers-per-connection", &["0", "4097"]),
        ("--nbd-max-workers", &["-1", "65537"]),
        ("--nbd-queue-per-connection", &["0"]),
    ] {
        refuses_values(bin, &args, option, bad);
    }
    // Accepted: it gets as far as the (missing) daemon.
    let out = Command::new(bin)
        .args(args)
        .args([
            "--nbd-max-connections=1",
            "--nbd-max-handshakes=1",
            "--nbd-handshake-timeout=1",
            "--nbd-reply-timeout=3600",
            "--nbd-connection-budget-mib=32",
            "--nbd-connection-reserve-kib=0",
            "--nbd-server-budget-mib=64",
            "--nbd-workers-per-connection=1",
            "--nbd-max-workers=0",
            "--nbd-queue-per-connection=1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("--nbd-"));
}

#[test]
fn a_bad_reconnect_timeout_is_refused() {
    refuses_values(
        env!("CARGO_BIN_EXE_vscd"),
        &[
            "--connect",
            "/nonexistent/vspd.sock",
            "--nbd",
            "/nonexistent/nbd.sock",
        ],
        "--reconnect-timeout",
        &["abc", "-1", "86401"],
    );
}
