//! External tools the NBD tests drive (qemu-img, qemu-io, fio), shared by the vsc and vsp test
//! suites (`vsp/tests/nbd_end_to_end.rs` includes this file by path): whether a tool runs,
//! and running one to completion.
// Each suite uses a different part of it.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Output};
use std::time::Instant;

/// Whether `tool` runs (checked with `args`). Missing: a failure under CI, a SKIP line elsewhere.
pub fn have(tool: &str, args: &[&str], test: &str) -> bool {
    let ok = Command::new(tool)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        let msg = format!(
            "{test}: `{tool} {}` does not run; install it with scripts/install-deps.sh",
            args.join(" ")
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{msg}");
        }
        // Straight to the stderr stream: the test harness captures `eprintln!` of passing tests.
        let _ = writeln!(std::io::stderr(), "SKIP {msg}");
    }
    ok
}

/// Whether qemu-img and qemu-io both run.
pub fn have_qemu(test: &str) -> bool {
    have("qemu-img", &["--version"], test) && have("qemu-io", &["--version"], test)
}

/// A command's stdout then stderr, as text.
pub fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Runs a command to completion; panics with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let t = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let report = format!(
        "{cmd:?} ({:.2?}): {}\n{}",
        t.elapsed(),
        out.status,
        text(&out)
    );
    assert!(out.status.success(), "{report}");
    eprintln!("{report}");
    out
}

/// Checks that `bin args... --OPTION=VALUE` is refused as a usage error (exit status 2, the
/// message naming the option) for every value in `bad`.
pub fn refuses_values(bin: &str, args: &[&str], option: &str, bad: &[&str]) {
    for value in bad {
        let out = Command::new(bin)
            .args(args)
            .arg(format!("{option}={value}"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{option}={value}: {err}");
        assert!(err.contains(option), "{option}={value}: {err}");
    }
}
