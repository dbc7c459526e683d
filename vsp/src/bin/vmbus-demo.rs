//! `vmbus-demo`: the VMBus ring at work between two processes.
//!
//! Until the storage path exists, the demo starts a second process, shares one memfd holding a
//! ring each way with it, and the two exchange verified packets of mixed types and sizes
//! (in-band, completion, GPA direct, transfer pages) under the real VMBus signalling rules,
//! printing packets/s as they go.

// Taking ownership of the descriptors the parent hands to the peer process needs `unsafe`.
#![allow(unsafe_code)]

use std::io::Write;
use std::os::fd::AsFd;
use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::Parser;
use command_fds::{CommandFdExt, FdMapping};
use ringbuf::pair::RingPair;
use ringbuf::traffic::{self, Config, Stats};
use ringbuf::Event;

const FD_MEM: i32 = 10;
const FD_PEER_EVENT: i32 = 11;
const FD_MAIN_EVENT: i32 = 12;

/// Two processes exchange verified packets over a pair of VMBus rings in one memfd.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Packets each side sends.
    #[arg(long, default_value_t = 10_000_000)]
    packets: u64,
    /// Data area of each ring, in KiB (a multiple of 4).
    #[arg(long, default_value_t = 256)]
    ring_kib: usize,
    /// Largest payload in bytes.
    #[arg(long, default_value_t = 4096)]
    max_payload: usize,
    /// Internal: run as the peer process (descriptors 10-12 inherited).
    #[arg(long, hide = true)]
    peer: bool,
}

fn config(args: &Args, seed: u64, peer_seed: u64) -> Config {
    Config {
        packets: args.packets,
        seed,
        peer_seed,
        max_payload: args.max_payload,
        ..Config::default()
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = if args.peer {
        run_peer(&args)
    } else {
        run_main(&args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmbus-demo: {e}");
            let mut source = std::error::Error::source(&*e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn run_main(args: &Args) -> Result<(), BoxError> {
    if args.ring_kib == 0 || !args.ring_kib.is_multiple_of(4) {
        return Err("--ring-kib must be a non-zero multiple of 4".into());
    }
    if args.max_payload < 16 || args.max_payload > args.ring_kib * 1024 / 4 {
        return Err("--max-payload must be between 16 and a quarter of the ring".into());
    }
    let data_len = args.ring_kib * 1024;
    let (pair, memfd) = RingPair::create_memfd(data_len)?;
    let main_event = Event::new()?;
    let peer_event = Event::new()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "--peer",
        "--packets",
        &args.packets.to_string(),
        "--ring-kib",
        &args.ring_kib.to_string(),
        "--max-payload",
        &args.max_payload.to_string(),
    ]);
    cmd.fd_mappings(vec![
        FdMapping {
            parent_fd: memfd,
            child_fd: FD_MEM,
        },
        FdMapping {
            parent_fd: peer_event.as_fd().try_clone_to_owned()?,
            child_fd: FD_PEER_EVENT,
        },
        FdMapping {
            parent_fd: main_event.as_fd().try_clone_to_owned()?,
            child_fd: FD_MAIN_EVENT,
        },
    ])?;
    let mut peer = cmd.spawn()?;
    println!(
        "vmbus-demo: two processes, one memfd, two {} KiB VMBus rings; {} verified packets each way",
        args.ring_kib, args.packets
    );
    let (mut out, mut inc) = pair.side_a()?;
    let start = Instant::now();
    let show = |st: &Stats| {
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        let done = st.sent + st.received;
        print!(
            "\r  {:>5.1}%  {:>6.2} M packets/s  {:>6.2} GB/s  {} signals  {} sleeps   ",
            100.0 * done as f64 / (2 * args.packets) as f64,
            done as f64 / secs / 1e6,
            (st.bytes_sent + st.bytes_received) as f64 / secs / 1e9,
            st.signals,
            st.sleeps,
        );
        let _ = std::io::stdout().flush();
    };
    let stats = traffic::run(
        &mut out,
        &mut inc,
        &main_event,
        &peer_event,
        &config(args, 1, 2),
        show,
    )?;
    let elapsed = start.elapsed();
    let status = peer.wait()?;
    if !status.success() {
        return Err(format!("the peer process failed: {status}").into());
    }
    let total = stats.sent + stats.received;
    println!();
    println!(
        "done: {total} packets ({:.2} GB of payload) verified in {:.2} s: {:.2} M packets/s, {:.2} GB/s",
        (stats.bytes_sent + stats.bytes_received) as f64 / 1e9,
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64() / 1e6,
        (stats.bytes_sent + stats.bytes_received) as f64 / elapsed.as_secs_f64() / 1e9,
    );
    println!(
        "signals sent by this side: {} ({:.5} per packet), sleeps: {}, lost wakeups: {}",
        stats.signals,
        stats.signals as f64 / total as f64,
        stats.sleeps,
        stats.lost_wakeups
    );
    if stats.lost_wakeups != 0 {
        return Err("lost wakeups detected".into());
    }
    Ok(())
}

fn run_peer(args: &Args) -> Result<(), BoxError> {
    // SAFETY: `run_main` mapped these descriptors into this process when it started it with
    // `--peer`; nothing else in this process owns them.
    let (mem, my_event, main_event) = unsafe {
        (
            ringbuf::shmem::inherited_fd(FD_MEM)?,
            ringbuf::shmem::inherited_fd(FD_PEER_EVENT)?,
            ringbuf::shmem::inherited_fd(FD_MAIN_EVENT)?,
        )
    };
    let pair = RingPair::open(mem.as_fd(), args.ring_kib * 1024)?;
    let (mut out, mut inc) = pair.side_b()?;
    let stats = traffic::run(
        &mut out,
        &mut inc,
        &Event::from_fd(my_event),
        &Event::from_fd(main_event),
        &config(args, 2, 1),
        |_| {},
    )?;
    if stats.lost_wakeups != 0 {
        return Err("lost wakeups detected in the peer".into());
    }
    Ok(())
}
