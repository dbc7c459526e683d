//! `vscd`: the guest side as a host process. Attaches to a running `vspd` as a loopback guest
//! and lists the channels it offers (`--list`), or exports every disk over NBD (`--nbd PATH`),
//! riding out restarts of the daemon (`--reconnect-timeout`), and/or puts its network adapter
//! behind a guest-side TAP (`--tap NAME`), which also rides out restarts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::builder::TypedValueParser;
use clap::Parser;
use vsc::client::{Client, SUPPORTED_VERSIONS};
use vsc::loopback::Loopback;
use vsc::nbd::Limits;

/// Attaches to a vspd as a loopback guest.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// The vspd partition socket to attach to.
    #[arg(long, value_name = "SOCKET")]
    connect: PathBuf,
    /// List the offered channels and exit.
    #[arg(long)]
    list: bool,
    /// Export every disk as an NBD export on a Unix socket at this path (exports `disk0`,
    /// `disk1`, ...; the empty name is `disk0`), mode 0600. Serves until SIGTERM or SIGINT. What
    /// clients can make it hold is bounded by the --nbd-* options.
    #[arg(long, value_name = "PATH", conflicts_with = "list")]
    nbd: Option<PathBuf>,
    /// Put the daemon's network adapter behind this TAP (created if missing, in vscd's network
    /// namespace): frames written to it travel netvsc -> VMBus ring -> netvsp -> the host's
    /// TAP, and back. The NIC uses a loopback guest of its own (a second session), survives
    /// restarts of vspd and reopens its channels when the TAP's MTU changes. Serves until
    /// SIGTERM or SIGINT, then prints its counters. Needs CAP_NET_ADMIN.
    #[arg(long, value_name = "NAME", conflicts_with = "list")]
    tap: Option<String>,
    /// With --tap: queues (TAP queues, and channels as the host grants subchannels).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    #[command(flatten)]
    nbd_limits: NbdLimits,
    /// Guest memory of the loopback guest, in MiB (each disk controller takes about 9 MiB of
    /// it for rings and bounce buffers).
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// How long, in microseconds, a storvsc queue thread keeps polling for work before it
    /// sleeps (0-1000000). Polling saves a wakeup (30-40 us) per burst of requests or
    /// completions; 0 sleeps at once, for hosts whose cores are shared.
    #[arg(long, value_name = "US", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    poll_us: u64,
    /// With --nbd: how long, in seconds, requests wait for a vspd that went away (restarted,
    /// killed) to come back. vscd reconnects to the socket as soon as a daemon listens there
    /// again, reopens the disks and sends the requests in flight again: NBD clients see a pause.
    /// After this long, the requests held fail with EIO, and new ones fail at once until the
    /// daemon is back (vscd keeps trying to reconnect). 0 fails them at once.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    reconnect_timeout: u64,
    /// Run without the seccomp filter (for debugging: strace, gdb). By default, once the NBD
    /// socket is bound and the NIC is up, every thread runs under an allowlist of the system calls serving
    /// needs; anything else (running programs, network sockets, tracing) fails with EPERM.
    #[arg(long)]
    no_seccomp: bool,
    /// Time each NBD request's stages on this side (submitted -> SRB in the ring -> its
    /// completion read -> reply written) and print their percentiles when vscd stops (a few
    /// clock reads per request; `vspd --latency-breakdown` times the host's).
    #[arg(long)]
    latency_breakdown: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VSCD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vscd: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), vsc::Error> {
    ringbuf::poller::set_default_limit(std::time::Duration::from_micros(args.poll_us));
    let nic = match &args.tap {
        Some(tap) => Some(start_nic(&args, tap)?),
        None => None,
    };
    if let Some(path) = &args.nbd {
        if args.latency_breakdown {
            ringbuf::latency::enable();
        }
        let r = export(&args, path);
        if let Some(nic) = nic {
            stop_nic(nic);
        }
        if args.latency_breakdown {
            use vsc::storvsc::{HOP_ISSUE, HOP_ROUND_TRIP};
            eprint!(
                "vscd latency breakdown:\n{}",
                ringbuf::latency::report(&[
                    &vsc::nbd::HOP_TURN,
                    &HOP_ISSUE,
                    &HOP_ROUND_TRIP,
                    &vsc::nbd::HOP_REPLY
                ])
            );
        }
        return r;
    }
    if let Some(nic) = nic {
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])
        .map_err(vsc::Error::Thread)?;
        sandbox(&args)?;
        signals.forever().next();
        stop_nic(nic);
        return Ok(());
    }
    if !args.list {
        return Err(vsc::Error::Protocol(
            "nothing to do: give --list, --nbd PATH or --tap NAME".into(),
        ));
    }
    let (front, messages) = Loopback::connect(&args.connect, args.memory_mib << 20)?;
    let front = Arc::new(front);
    let mut client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS)?;
    let offers = client.request_offers()?;
    let v = client.version();
    println!(
        "VMBus {}.{} via {}",
        v.major(),
        v.minor(),
        args.connect.display()
    );
    println!(
        "{:>5}  {:<8}  {:<36}  {:<36}  {:>4}  {:>10}",
        "relid", "class", "class guid", "instance", "sub", "connection"
    );
    for o in &offers {
        println!(
            "{:>5}  {:<8}  {:<36}  {:<36}  {:>4}  {:>#10x}",
            o.relid,
            o.class_name(),
            o.interface_type,
            o.interface_instance,
            o.subchannel_index,
            o.connection_id
        );
    }
    client.unload()?;
    Ok(())
}

/// From here on every thread runs under the seccomp allowlist (unless --no-seccomp): what
/// needs more (the NBD socket, the TAP, the signal handlers) is done.
fn sandbox(args: &Args) -> Result<(), vsc::Error> {
    if args.no_seccomp {
        tracing::warn!("running without the seccomp filter (--no-seccomp)");
        Ok(())
    } else {
        Ok(ringbuf::sandbox::install()?)
    }
}

fn start_nic(args: &Args, tap: &str) -> Result<vsc::netvsc::Nic, vsc::Error> {
    let config = vsc::netvsc::NicConfig {
        queues: args.queues,
        ..vsc::netvsc::NicConfig::new(tap)
    };
    let nic = vsc::netvsc::Nic::start(&args.connect, config)?;
    eprintln!(
        "vscd: network adapter behind TAP {tap} ({} channel(s))",
        nic.stats()
            .channels
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(nic)
}

fn stop_nic(nic: vsc::netvsc::Nic) {
    let stats = nic.stats().clone();
    nic.stop();
    eprintln!("vscd: NIC counters: {}", stats.summary());
}

fn export(args: &Args, path: &std::path::Path) -> Result<(), vsc::Error> {
    use vsc::guest::{GuestConfig, Reconnect, StorageGuest};
    use vsc::nbd::{Export, NbdServer};
    let config = GuestConfig {
        reconnect: Some(Reconnect {
            hold: std::time::Duration::from_secs(args.reconnect_timeout),
            ..Reconnect::default()
        }),
        ..GuestConfig::new(args.memory_mib << 20)
    };
    let guest = StorageGuest::attach_with(&args.connect, config)?;
    if guest.disks.is_empty() {
        return Err(vsc::Error::Refused("the daemon offers no disk".into()));
    }
    let exports = guest
        .disks
        .iter()
        .enumerate()
        .map(|(i, (offer, disk))| {
            let g = disk.geometry();
            Export {
                name: format!("disk{i}"),
                description: format!(
                    "VMBus SCSI disk {} ({} blocks of {} bytes{})",
                    offer.interface_instance,
                    g.blocks,
                    g.block_size,
                    if g.read_only { ", read-only" } else { "" }
                ),
                device: disk.clone() as Arc<dyn vsc::nbd::BlockDevice>,
            }
        })
        .collect();
    let server = NbdServer::bind(path, exports)?.with_limits(args.nbd_limits.limits());
    let stop = Arc::new(ringbuf::Event::new()?);
    let s = stop.clone();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(vsc::Error::Thread)?;
    // Stopping while the daemon is away: what the disks hold fails now, not after the hold
    // time (the NBD server waits for its connections' requests).
    let controllers: Vec<_> = guest
        .disks
        .iter()
        .map(|(_, d)| d.controller().clone())
        .collect();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = s.signal();
            for c in &controllers {
                c.set_hold(std::time::Duration::ZERO);
            }
        }
    });
    // Everything that needs more than serving does (the NBD socket, the signal handlers) is
    // done: from here on every thread runs under the seccomp allowlist.
    sandbox(args)?;
    eprintln!(
        "vscd: {} disk(s) exported on {} (for example: qemu-img info 'nbd+unix:///disk0?socket={}')",
        guest.disks.len(),
        path.display(),
        path.display()
    );
    server.run(stop)?;
    guest.detach()
}

/// What one NBD client can make the export hold (see `vsc::nbd::Limits`): every connection, in
/// its handshake or served, has a thread; requests that block (flush, trim, zeroing, large
/// reads and writes) run on worker threads; request data in memory is bounded per connection
/// and for the server, and each connection keeps a reserve of its own so that it is served
/// whatever the others hold.
/// The heading of the NBD limits in `--help`.
const NBD_LIMITS: &str = "NBD limits (with --nbd)";

#[derive(clap::Args, Debug)]
struct NbdLimits {
    /// Connections past their handshake served at once; more are closed when they arrive.
    #[arg(long, help_heading = NBD_LIMITS, value_name = "N", default_value_t = Limits::default().max_connections,
          value_parser = clap::value_parser!(u32).range(1..=65536).map(|n| n as usize))]
    nbd_max_connections: usize,
    /// Connections in their handshake at once (not counted as served); a new one arriving
    /// when there are this many closes the one that has been at it longest.
    #[arg(long, help_heading = NBD_LIMITS, value_name = "N", default_value_t = Limits::default().max_handshakes,
          value_parser = clap::value_parser!(u32).range(1..=65536).map(|n| n as usize))]
    nbd_max_handshakes: usize,
    /// The longest a client's whole handshake may take, in seconds; then it is closed.
    #[arg(long, help_heading = NBD_LIMITS, value_name = "SECS", default_value_t = Limits::default().handshake_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    nbd_handshake_timeout: u64,
    /// The longest a reply may wait for a client that takes none of it, in seconds; then the
    /// connection is closed and what it held is freed.
    #[arg(long, help_heading = NBD_LIMITS, value_name = "SECS", default_value_t = Limits::default().reply_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    nbd_reply_timeout: u64,
    /// Request data one connection may hold in memory, in MiB (flushes, trims and zeroing
    /// count 4 KiB each).
    #[arg(long, help_heading = NBD_LIMITS, value_name = "MIB", default_value_t = Limits::default().connection_budget >> 20,
          value_parser = clap::value_parser!(u64).range(1..=65536))]
    nbd_connection_budget_mib: u64,
    /// Request data each connection may hold outside the shared budget, in KiB: what keeps
    /// it served when other connections hold all of the shared budget (0: no reserve).
    #[arg(long, help_heading = NBD_LIMITS, value_name = "KIB", default_value_t = Limits::default().connection_reserve >> 10,
          value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    nbd_connection_reserve_kib: u64,
    /// Request data all connections may hold in memory beyond their reserves, in MiB.
    #[arg(long, help_heading = NBD_LIMITS, value_name = "MIB", default_value_t = Limits::default().server_budget >> 20,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    nbd_server_budget_mib: u64,
    /// Worker threads of one connection.
    #[arg(long, help_heading = NBD_LIMITS, value_name = "N", default_value_t = Limits::default().workers_per_connection,
          value_parser = clap::value_parser!(u32).range(1..=4096).map(|n| n as usize))]
    nbd_workers_per_connection: usize,
    /// Worker threads of the whole export (0: every connection runs its blocking requests on
    /// its own thread).
    #[arg(long, help_heading = NBD_LIMITS, value_name = "N", default_value_t = Limits::default().max_workers,
          value_parser = clap::value_parser!(u32).range(0..=65536).map(|n| n as usize))]
    nbd_max_workers: usize,
    /// Requests of one connection queued for its busy workers.
    #[arg(long, help_heading = NBD_LIMITS, value_name = "N", default_value_t = Limits::default().queue_per_connection,
          value_parser = clap::value_parser!(u32).range(1..=65536).map(|n| n as usize))]
    nbd_queue_per_connection: usize,
}

impl NbdLimits {
    fn limits(&self) -> Limits {
        use std::time::Duration;
        Limits {
            max_connections: self.nbd_max_connections,
            max_handshakes: self.nbd_max_handshakes,
            handshake_timeout: Duration::from_secs(self.nbd_handshake_timeout),
            workers_per_connection: self.nbd_workers_per_connection,
            max_workers: self.nbd_max_workers,
            queue_per_connection: self.nbd_queue_per_connection,
            connection_budget: self.nbd_connection_budget_mib << 20,
            connection_reserve: self.nbd_connection_reserve_kib << 10,
            server_budget: self.nbd_server_budget_mib << 20,
            reply_timeout: Duration::from_secs(self.nbd_reply_timeout),
        }
    }
}
