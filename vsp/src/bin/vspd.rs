//! `vspd`: the VMBus service provider daemon.
//!
//! Listens on a Unix socket (the partition socket, mode 0600); each front end that connects
//! (the KVM shim, or `vscd`'s loopback guest) is one partition, served by its own session with
//! the offers the configuration makes: one SCSI controller per `--disk`, one network adapter per
//! `--nic`. SIGTERM and SIGINT stop it cleanly;
//! SIGHUP re-reads the configuration and hot adds or removes (rescinds) devices in every guest.

// The option docs are `--help` text, where `[,key=value]` means optional, not a doc link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vsp::config::{parse_kv, Config, DiskConfig, NicConfig};

/// The VMBus service provider daemon: serves disks and NICs to guests over VMBus.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Path of the partition socket to listen on (created mode 0600).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// A disk: path=FILE[,readonly=on][,direct=on][,queues=N][,controller=C][,lun=L].
    /// Repeatable; disks naming the same controller share one SCSI controller as LUNs; queues
    /// (1-64) lets the guest open that many channels (the primary and subchannels).
    #[arg(long, value_name = "OPTIONS")]
    disk: Vec<String>,
    /// A NIC: tap=NAME[,mac=MAC][,mtu=N][,vlan=ID][,queues=N][,uids=U:U]. Repeatable. The TAP
    /// is created if missing (opened if it exists); the MAC defaults to a stable locally
    /// administered address; MTU 68-9000 (1500); frames are tagged with the VLAN toward the
    /// host and untagged toward the guest; queues (1-64) are TAP queues and channels.
    #[arg(long, value_name = "OPTIONS")]
    nic: Vec<String>,
    /// A TOML file with `socket`, `[[disk]]` and `[[nic]]` tables (same keys as the options);
    /// command-line disks and NICs are added to the file's.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How long, in microseconds, a channel worker keeps polling for work before it sleeps
    /// (0-1000000). Polling saves a wakeup (30-40 us) per burst of guest requests; 0 sleeps at
    /// once, for hosts whose cores are shared.
    #[arg(long, value_name = "US", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    poll_us: u64,
    /// Also allow processes of this uid to connect (repeatable). By default only vspd's own
    /// uid may; root is not implied. Checked with SO_PEERCRED before anything is read.
    #[arg(long, value_name = "UID")]
    allow_uid: Vec<u32>,
    /// Also allow processes whose group (the gid they connect with) is GID (repeatable).
    #[arg(long, value_name = "GID")]
    allow_gid: Vec<u32>,
    /// Most front ends connected at a time (default 64); more are refused.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=65536))]
    max_sessions: Option<u64>,
    /// Most channels one guest may have open at a time (default 256).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=2047))]
    max_channels: Option<u64>,
    /// Most GPADLs one guest may hold (default 4096).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_gpadls: Option<u64>,
    /// Run without the seccomp filter (for debugging: strace, gdb). By default, once the
    /// socket is bound, every thread runs under an allowlist of the system calls serving
    /// needs; anything else (running programs, network sockets, tracing) fails with EPERM.
    #[arg(long)]
    no_seccomp: bool,
    /// Time each storage request's stages (SRB read -> I/O submitted -> completion reaped ->
    /// answer in the ring) and print their percentiles when vspd stops (a few clock reads per
    /// request; for benches: `benches/storage-vs-baseline.sh` uses it at QD1).
    #[arg(long)]
    latency_breakdown: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VSPD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vspd: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// The configuration: the file's, then the command line's disks and NICs added.
fn load(args: &Args) -> Result<Config, vsp::Error> {
    let mut config = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(s) = &args.socket {
        config.socket = Some(s.clone());
    }
    for d in &args.disk {
        config.disks.push(parse_kv::<DiskConfig>("disk", d)?);
    }
    for n in &args.nic {
        config.nics.push(parse_kv::<NicConfig>("nic", n)?);
    }
    config.allow_uid.extend(&args.allow_uid);
    config.allow_gid.extend(&args.allow_gid);
    if let Some(n) = args.max_sessions {
        config.max_sessions = Some(n as usize);
    }
    if let Some(n) = args.max_channels {
        config.max_channels = Some(n as usize);
    }
    if let Some(n) = args.max_gpadls {
        config.max_gpadls = Some(n as usize);
    }
    if args.no_seccomp {
        config.seccomp = Some(false);
    }
    config.validate()?;
    Ok(config)
}

fn run(args: Args) -> Result<(), vsp::Error> {
    ringbuf::poller::set_default_limit(std::time::Duration::from_micros(args.poll_us));
    // The thread that bounds writes into the front ends' eventfds (see ringbuf::kick): started
    // now, so that sessions come and go without changing the daemon's thread count.
    ringbuf::kick::start();
    let config = load(&args)?;
    if args.latency_breakdown {
        ringbuf::latency::enable();
    }
    let r = vsp::daemon::serve(config, || load(&args));
    if args.latency_breakdown {
        use vsp::storvsp::{HOP_ANSWER, HOP_IO, HOP_SUBMIT};
        eprint!(
            "vspd latency breakdown:\n{}",
            ringbuf::latency::report(&[&HOP_SUBMIT, &HOP_IO, &HOP_ANSWER])
        );
    }
    r
}
