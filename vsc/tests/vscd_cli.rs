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
