//! Two processes share one memfd holding a ring each way and exchange ten million packets of
//! mixed types and sizes, each checked (sequence, checksum, ranges), signalling each other with
//! eventfds under the real rules. No corruption and no lost wakeup may occur.
//!
//! The child is this same test binary, re-run with the ignored test `child_side` selected; the
//! memfd and the two eventfds are mapped into it at fixed descriptor numbers by `command-fds`.

// Taking ownership of the inherited descriptors in the child needs `unsafe` (see `child_side`).
#![allow(unsafe_code)]

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use ringbuf::pair::RingPair;
use ringbuf::traffic::{self, Config, Stats};
use ringbuf::Event;

const DATA_LEN: usize = 256 * 1024;
/// Packets each side sends: ten million exchanged in all.
const PACKETS: u64 = 5_000_000;
const CHILD_ENV: &str = "RINGBUF_CROSS_PROCESS_CHILD";
const FD_MEM: i32 = 10;
const FD_CHILD_EVENT: i32 = 11;
const FD_PARENT_EVENT: i32 = 12;

fn config(seed: u64, peer_seed: u64) -> Config {
    Config {
        packets: PACKETS,
        seed,
        peer_seed,
        ..Config::default()
    }
}

#[test]
fn ten_million_packets_between_two_processes() {
    let (pair, memfd) = RingPair::create_memfd(DATA_LEN).unwrap();
    let parent_event = Event::new().unwrap();
    let child_event = Event::new().unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_side",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, "1")
    .stdout(Stdio::piped());
    cmd.fd_mappings(vec![
        FdMapping {
            parent_fd: memfd.as_fd().try_clone_to_owned().unwrap(),
            child_fd: FD_MEM,
        },
        FdMapping {
            parent_fd: child_event.as_fd().try_clone_to_owned().unwrap(),
            child_fd: FD_CHILD_EVENT,
        },
        FdMapping {
            parent_fd: parent_event.as_fd().try_clone_to_owned().unwrap(),
            child_fd: FD_PARENT_EVENT,
        },
    ])
    .unwrap();
    let child = cmd.spawn().unwrap();

    let start = Instant::now();
    let (mut out, mut inc) = pair.side_a().unwrap();
    let stats = traffic::run(
        &mut out,
        &mut inc,
        &parent_event,
        &child_event,
        &config(1, 2),
        |_| {},
    )
    .unwrap();
    let elapsed = start.elapsed();
    let output = child.wait_with_output().unwrap();
    let child_log = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {child_log}");
    assert!(
        child_log.contains("1 passed"),
        "the child side did not run: {child_log}"
    );

    println!(
        "parent: {stats:?}; {:.2} M packets/s exchanged in {elapsed:?}",
        (2 * PACKETS) as f64 / elapsed.as_secs_f64() / 1e6
    );
    assert_eq!(stats.sent, PACKETS);
    assert_eq!(stats.received, PACKETS);
    assert_eq!(stats.lost_wakeups, 0, "a wakeup was lost: {stats:?}");
    assert!(stats.bytes_received > PACKETS * 16);
}

/// The child's side: runs only when the parent test starts it.
#[test]
#[ignore = "run by ten_million_packets_between_two_processes in a child process"]
fn child_side() {
    assert_eq!(
        std::env::var(CHILD_ENV).as_deref(),
        Ok("1"),
        "only the parent test runs this"
    );
    // SAFETY: the parent mapped these three descriptors into this process for this test (via
    // command-fds), and nothing else in the process owns them.
    let (mem, my_event, peer_event) = unsafe {
        (
            ringbuf::shmem::inherited_fd(FD_MEM).unwrap(),
            ringbuf::shmem::inherited_fd(FD_CHILD_EVENT).unwrap(),
            ringbuf::shmem::inherited_fd(FD_PARENT_EVENT).unwrap(),
        )
    };
    let pair = RingPair::open(mem.as_fd(), DATA_LEN).unwrap();
    let (mut out, mut inc) = pair.side_b().unwrap();
    let stats: Stats = traffic::run(
        &mut out,
        &mut inc,
        &Event::from_fd(my_event),
        &Event::from_fd(peer_event),
        &Config {
            stall_timeout: Duration::from_secs(60),
            ..config(2, 1)
        },
        |_| {},
    )
    .unwrap();
    println!("child: {stats:?}");
    assert_eq!(
        (stats.sent, stats.received, stats.lost_wakeups),
        (PACKETS, PACKETS, 0)
    );
}
