//! `vmbus-demo`: the whole storage path at work, with no configuration.
//!
//! It creates a scratch disk image, starts the VSP daemon (this same executable, in a second
//! process), attaches a loopback guest to it (VMBus client, storvsc client) and exports the disk
//! over NBD, then runs a verified random read/write workload through the whole path: NBD clients
//! -> the NBD export -> storvsc -> the VMBus ring -> storvsp -> io_uring -> the image. It prints
//! a live progress line, then IOPS and latency percentiles, verifies every acknowledged write in
//! the image file itself, and says how to point fio or qemu-img at the export.
//!
//! Then, run as root, it shows the network path: `vspd` (this machine's `vspd` binary, beside
//! this one) with a NIC on a TAP in one network namespace, the netvsc client behind a TAP in
//! another, and a verified TCP transfer between them with a live progress line: guest TCP ->
//! guest TAP -> netvsc -> the VMBus ring -> netvsp -> host TAP -> host TCP; then the same
//! transfer over a plain veth pair, for comparison. Elsewhere it says why it skips it.
//!
//! `--ring` runs the earlier ring demo instead: two processes exchanging verified packets over a
//! pair of VMBus rings in one memfd.

// Taking ownership of the descriptors the parent hands to the ring peer process needs `unsafe`.
#![allow(unsafe_code)]

use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use command_fds::{CommandFdExt, FdMapping};
use ringbuf::pair::RingPair;
use ringbuf::traffic::{self, Config, Stats};
use ringbuf::Event;
use vsc::nbdclient::NbdClient;

const FD_MEM: i32 = 10;
const FD_PEER_EVENT: i32 = 11;
const FD_MAIN_EVENT: i32 = 12;

/// The storage path end to end: vspd, a loopback guest, an NBD export and a verified workload.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Seconds of workload.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Parallel NBD clients (each one request at a time: the queue depth).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Size of the scratch disk in MiB.
    #[arg(long, default_value_t = 256)]
    disk_mib: u64,
    /// Percentage of writes.
    #[arg(long, default_value_t = 50)]
    write_percent: u64,
    /// Block size of the workload in bytes (a multiple of 512).
    #[arg(long, default_value_t = 4096)]
    block: u64,
    /// Directory for the scratch image and sockets (default: a new one under the temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the daemon and the NBD export running after the workload, for fio or qemu-img,
    /// until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Seconds of the network demo's TCP transfer (each path); 0 skips the network demo.
    #[arg(long, default_value_t = 5)]
    net_seconds: u64,
    /// Run the ring demo instead (two processes, one memfd, verified packets).
    #[arg(long)]
    ring: bool,
    /// Ring demo: packets each side sends.
    #[arg(long, default_value_t = 10_000_000)]
    packets: u64,
    /// Internal: run as the VSP daemon on this socket, serving --daemon-disk.
    #[arg(long, hide = true)]
    daemon_socket: Option<PathBuf>,
    /// Internal: the daemon's disk.
    #[arg(long, hide = true)]
    daemon_disk: Option<PathBuf>,
    /// Internal: run as the ring demo's peer process.
    #[arg(long, hide = true)]
    peer: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let args = Args::parse();
    let result = if let Some(socket) = &args.daemon_socket {
        run_daemon(socket, args.daemon_disk.as_deref())
    } else if args.peer {
        run_peer(&args)
    } else if args.ring {
        run_ring(&args)
    } else {
        run_storage(&args).and_then(|()| run_network(&args))
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

fn run_daemon(socket: &Path, disk: Option<&Path>) -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VSPD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = vsp::config::Config {
        socket: Some(socket.to_owned()),
        disks: disk
            .map(|p| vsp::config::DiskConfig {
                path: p.to_owned(),
                readonly: false,
                direct: false,
                queues: 1,
                controller: None,
                lun: None,
                uids: None,
            })
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let again = config.clone();
    vsp::daemon::serve(config, move || Ok(again.clone()))?;
    Ok(())
}

/// The daemon child, stopped (SIGTERM) and reaped on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let _ = self.0.wait();
    }
}

fn pattern(block: u64, version: u64, buf: &mut [u8]) {
    let mut x = (block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.rotate_left(32)) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    buf[..8].copy_from_slice(&block.to_le_bytes());
    buf[8..16].copy_from_slice(&version.to_le_bytes());
}

#[derive(Default)]
struct Worker {
    lat_us: Vec<u32>,
    /// Last version written to each of this worker's blocks (0: never written).
    versions: Vec<u64>,
    errors: u64,
}

fn run_storage(args: &Args) -> Result<(), BoxError> {
    if args.block == 0 || !args.block.is_multiple_of(512) || args.block > 1 << 20 {
        return Err("--block must be a multiple of 512, at most 1 MiB".into());
    }
    if args.clients == 0 || args.clients > 256 || args.write_percent > 100 {
        return Err("--clients must be 1 to 256 and --write-percent 0 to 100".into());
    }
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("vmbus-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("scratch.img");
    let size = args.disk_mib << 20;
    std::fs::File::create(&image)?.set_len(size)?;
    let socket = dir.join("vspd.sock");
    let nbd = dir.join("nbd.sock");
    let _ = std::fs::remove_file(&socket);
    println!(
        "vmbus-demo: scratch disk {} ({} MiB)",
        image.display(),
        args.disk_mib
    );
    let daemon = Daemon(
        Command::new(std::env::current_exe()?)
            .arg("--daemon-socket")
            .arg(&socket)
            .arg("--daemon-disk")
            .arg(&image)
            .stdin(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err("the daemon did not start".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "  vspd (pid {}) listening on {}",
        daemon.0.id(),
        socket.display()
    );
    let guest = vsc::guest::StorageGuest::attach(&socket, 128 << 20)?;
    let disk = guest
        .disks
        .first()
        .ok_or("the daemon offered no disk")?
        .1
        .clone();
    println!(
        "  loopback guest attached: VMBus {}.{}, storvsc {:?}, disk of {} blocks",
        guest.version().major(),
        guest.version().minor(),
        disk.geometry().block_size,
        disk.geometry().blocks
    );
    let export = vsc::nbd::Export {
        name: "disk0".into(),
        description: "vmbus-demo scratch disk".into(),
        device: disk.clone() as Arc<dyn vsc::nbd::BlockDevice>,
    };
    let server = vsc::nbd::NbdServer::bind(&nbd, vec![export])?;
    let stop_nbd = Arc::new(Event::new()?);
    let stop2 = stop_nbd.clone();
    let nbd_thread = std::thread::spawn(move || server.run(stop2));
    println!("  NBD export on {}", nbd.display());

    let blocks_total = size / args.block;
    let per = blocks_total / args.clients as u64;
    if per == 0 {
        return Err("the disk is too small for that many clients".into());
    }
    let ops = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    println!(
        "  workload: {} s of {} B random I/O, {}% writes, {} NBD clients, every read verified",
        args.seconds, args.block, args.write_percent, args.clients
    );
    let before = disk.stats();
    let start = Instant::now();
    let mut threads = Vec::new();
    for w in 0..args.clients {
        let (nbd, ops, done) = (nbd.clone(), ops.clone(), done.clone());
        let (bs, wp) = (args.block, args.write_percent);
        threads.push(std::thread::spawn(move || -> Result<Worker, String> {
            let mut c = NbdClient::connect(&nbd, "disk0").map_err(|e| e.to_string())?;
            let mut st = Worker {
                versions: vec![0; per as usize],
                ..Default::default()
            };
            let mut buf = vec![0u8; bs as usize];
            let mut want = vec![0u8; bs as usize];
            let mut rng = 0x2545_F491_4F6C_DD1Du64 ^ (w as u64 + 1).wrapping_mul(0x9E37_79B9);
            let mut version = 0u64;
            while !done.load(Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = rng % per;
                let block = w as u64 * per + i;
                let t = Instant::now();
                if rng % 100 < wp {
                    version += 1;
                    pattern(block, version, &mut buf);
                    if c.write(block * bs, &buf, false)
                        .map_err(|e| e.to_string())?
                        != 0
                    {
                        st.errors += 1;
                    } else {
                        st.versions[i as usize] = version;
                    }
                } else {
                    if c.read(block * bs, &mut buf).map_err(|e| e.to_string())? != 0 {
                        st.errors += 1;
                    }
                    match st.versions[i as usize] {
                        0 => want.fill(0),
                        v => pattern(block, v, &mut want),
                    }
                    if buf != want {
                        return Err(format!(
                            "block {block}: read back data that was not written"
                        ));
                    }
                }
                st.lat_us
                    .push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                ops.fetch_add(1, Ordering::Relaxed);
            }
            if c.flush().map_err(|e| e.to_string())? != 0 {
                st.errors += 1;
            }
            c.disconnect();
            Ok(st)
        }));
    }
    let mut last = (Instant::now(), 0u64);
    while start.elapsed() < Duration::from_secs(args.seconds) {
        std::thread::sleep(Duration::from_millis(500));
        let n = ops.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = (n - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, n);
        print!(
            "\r  {:>5.1} s  {:>9} ops  {:>8.0} IOPS  {:>7.1} MiB/s   ",
            start.elapsed().as_secs_f64(),
            n,
            rate,
            rate * args.block as f64 / (1 << 20) as f64
        );
        let _ = std::io::stdout().flush();
    }
    done.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut versions = Vec::new();
    let mut errors = 0;
    for t in threads {
        let st = t.join().map_err(|_| "a client thread panicked")??;
        all.extend(st.lat_us);
        errors += st.errors;
        versions.push(st.versions);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = disk.stats();
    println!();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "  {} ops in {:.1} s: {:.0} IOPS, {:.1} MiB/s; latency p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us; {} errors",
        all.len(),
        elapsed,
        all.len() as f64 / elapsed,
        all.len() as f64 * args.block as f64 / elapsed / (1 << 20) as f64,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        all.last().copied().unwrap_or(0),
        errors
    );
    // Every acknowledged write must be in the image itself (the clients flushed).
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(&image)?;
    let mut got = vec![0u8; args.block as usize];
    let mut want = vec![0u8; args.block as usize];
    let mut checked = 0u64;
    for (w, vs) in versions.iter().enumerate() {
        for (i, &v) in vs.iter().enumerate() {
            if v == 0 {
                continue;
            }
            let block = w as u64 * per + i as u64;
            f.read_exact_at(&mut got, block * args.block)?;
            pattern(block, v, &mut want);
            if got != want {
                return Err(format!(
                    "block {block} in the image does not hold its last acknowledged write"
                )
                .into());
            }
            checked += 1;
        }
    }
    let reqs = (after.completed - before.completed).max(1);
    println!(
        "  wakeups: {} signals to the host + {} interrupts from it for {} requests ({:.3} per request)",
        after.signals - before.signals,
        after.interrupts - before.interrupts,
        reqs,
        (after.signals - before.signals + after.interrupts - before.interrupts) as f64 / reqs as f64
    );
    println!("  verified: every read matched; {checked} written blocks checked in the image file");
    if errors > 0 {
        return Err(format!("{errors} requests failed").into());
    }
    if args.keep {
        println!("\nThe export stays up until Ctrl-C. Try:");
    } else {
        println!("\nTo measure with your own tools, run with --keep (or start vspd and vscd --nbd), then:");
    }
    println!(
        "  qemu-img info 'nbd+unix:///disk0?socket={}'",
        nbd.display()
    );
    println!(
        "  fio --name=randrw --ioengine=nbd --uri='nbd+unix:///disk0?socket={}' --rw=randrw --bs=4k --iodepth=32 --size=64m --verify=crc32c",
        nbd.display()
    );
    if args.keep {
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])?;
        signals.forever().next();
    }
    let _ = stop_nbd.signal();
    let _ = nbd_thread.join();
    guest.detach()?;
    drop(daemon);
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

fn ring_config(args: &Args, seed: u64, peer_seed: u64) -> Config {
    Config {
        packets: args.packets,
        seed,
        peer_seed,
        ..Config::default()
    }
}

fn run_ring(args: &Args) -> Result<(), BoxError> {
    let data_len = 256 * 1024;
    let (pair, memfd) = RingPair::create_memfd(data_len)?;
    let main_event = Event::new()?;
    let peer_event = Event::new()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["--peer", "--packets", &args.packets.to_string()]);
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
    println!("vmbus-demo --ring: two processes, one memfd, two 256 KiB VMBus rings; {} verified packets each way", args.packets);
    let (mut out, mut inc) = pair.side_a()?;
    let start = Instant::now();
    let mut last = Instant::now();
    let show = |st: &Stats| {
        if last.elapsed() < Duration::from_millis(500) {
            return;
        }
        last = Instant::now();
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        let done = st.sent + st.received;
        print!(
            "\r  {:>5.1}%  {:>6.2} M packets/s  {} signals  {} sleeps   ",
            100.0 * done as f64 / (2 * args.packets) as f64,
            done as f64 / secs / 1e6,
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
        &ring_config(args, 1, 2),
        show,
    )?;
    let elapsed = start.elapsed();
    if !peer.wait()?.success() {
        return Err("the peer process failed".into());
    }
    let total = stats.sent + stats.received;
    println!();
    println!(
        "done: {total} packets verified in {:.2} s: {:.2} M packets/s, {:.2} GB/s; {} signals, {} lost wakeups",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64() / 1e6,
        (stats.bytes_sent + stats.bytes_received) as f64 / elapsed.as_secs_f64() / 1e9,
        stats.signals,
        stats.lost_wakeups
    );
    if stats.lost_wakeups != 0 {
        return Err("lost wakeups detected".into());
    }
    Ok(())
}

fn run_peer(args: &Args) -> Result<(), BoxError> {
    // SAFETY: `run_ring` mapped these descriptors into this process when it started it with
    // `--peer`; nothing else in this process owns them.
    let (mem, my_event, main_event) = unsafe {
        (
            ringbuf::shmem::inherited_fd(FD_MEM)?,
            ringbuf::shmem::inherited_fd(FD_PEER_EVENT)?,
            ringbuf::shmem::inherited_fd(FD_MAIN_EVENT)?,
        )
    };
    let pair = RingPair::open(mem.as_fd(), 256 * 1024)?;
    let (mut out, mut inc) = pair.side_b()?;
    let stats = traffic::run(
        &mut out,
        &mut inc,
        &Event::from_fd(my_event),
        &Event::from_fd(main_event),
        &ring_config(args, 2, 1),
        |_| {},
    )?;
    if stats.lost_wakeups != 0 {
        return Err("lost wakeups detected in the peer".into());
    }
    Ok(())
}

/// FNV-1a over the 64-bit words of a byte stream, however it is cut into reads (the network
/// demo's check that every byte arrived intact; words, so that it costs less than the path).
struct Fnv(u64, [u8; 8], usize);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325, [0; 8], 0)
    }

    fn word(&mut self, w: [u8; 8]) {
        self.0 = (self.0 ^ u64::from_le_bytes(w)).wrapping_mul(0x100_0000_01b3);
    }

    fn add(&mut self, mut b: &[u8]) {
        if self.2 > 0 {
            let n = (8 - self.2).min(b.len());
            self.1[self.2..self.2 + n].copy_from_slice(&b[..n]);
            self.2 += n;
            b = &b[n..];
            if self.2 < 8 {
                return;
            }
            let w = self.1;
            self.word(w);
            self.2 = 0;
        }
        let mut words = b.chunks_exact(8);
        for w in &mut words {
            self.word(w.try_into().expect("8 bytes"));
        }
        let rest = words.remainder();
        self.1[..rest.len()].copy_from_slice(rest);
        self.2 = rest.len();
    }

    /// The hash (the last partial word padded with zeros).
    fn finish(mut self) -> u64 {
        if self.2 > 0 {
            let mut w = [0u8; 8];
            w[..self.2].copy_from_slice(&self.1[..self.2]);
            self.word(w);
            self.0 ^= self.2 as u64;
        }
        self.0
    }
}

/// A TCP transfer for `seconds` from a thread in `client` to a listener at `addr` in `server`,
/// with a live progress line; returns Gbit/s once the receiver's hash matched the sender's.
fn transfer(
    server: &vsc::netns::Netns,
    client: &vsc::netns::Netns,
    addr: &'static str,
    seconds: u64,
    label: &str,
) -> Result<f64, BoxError> {
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    let (tx, rx) = std::sync::mpsc::channel();
    let server_ns = server.name().to_owned();
    let receiver = std::thread::spawn(move || {
        vsc::netns::run_in(&server_ns, move || -> std::io::Result<(u64, u64)> {
            let l = TcpListener::bind((addr, 0))?;
            let _ = tx.send(l.local_addr()?.port());
            let (mut c, _) = l.accept()?;
            c.set_read_timeout(Some(Duration::from_secs(30)))?;
            let (mut h, mut n, mut buf) = (Fnv::new(), 0u64, vec![0u8; 1 << 16]);
            loop {
                match c.read(&mut buf)? {
                    0 => return Ok((n, h.finish())),
                    k => {
                        h.add(&buf[..k]);
                        n += k as u64;
                    }
                }
            }
        })
    });
    let port = rx.recv_timeout(Duration::from_secs(10))?;
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let client_ns = client.name().to_owned();
    let (s, d) = (sent.clone(), done.clone());
    let sender = std::thread::spawn(move || {
        vsc::netns::run_in(&client_ns, move || -> std::io::Result<u64> {
            let target = std::net::SocketAddr::new(addr.parse().expect("an address"), port);
            let mut c = TcpStream::connect_timeout(&target, Duration::from_secs(10))?;
            let (mut h, mut buf) = (Fnv::new(), vec![0u8; 1 << 16]);
            let end = Instant::now() + Duration::from_secs(seconds);
            let mut block = 0u64;
            while Instant::now() < end {
                pattern(block, 1, &mut buf);
                block += 1;
                std::io::Write::write_all(&mut c, &buf)?;
                h.add(&buf);
                s.fetch_add(buf.len() as u64, Ordering::Relaxed);
            }
            d.store(true, Ordering::Relaxed);
            Ok(h.finish())
        })
    });
    let start = Instant::now();
    while !done.load(Ordering::Relaxed) && !sender.is_finished() {
        std::thread::sleep(Duration::from_millis(250));
        let n = sent.load(Ordering::Relaxed);
        print!(
            "\r  {label}: {:>6} MiB sent, {:>6.2} Gbit/s   ",
            n >> 20,
            n as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
        );
        let _ = std::io::stdout().flush();
    }
    let hash = sender.join().map_err(|_| "the sender panicked")??;
    let elapsed = start.elapsed();
    let (got, got_hash) = receiver.join().map_err(|_| "the receiver panicked")??;
    let n = sent.load(Ordering::Relaxed);
    if got != n || got_hash != hash {
        return Err(format!(
            "{label}: {got} of {n} bytes arrived, hash {got_hash:#x} vs {hash:#x}"
        )
        .into());
    }
    let gbps = n as f64 * 8.0 / elapsed.as_secs_f64() / 1e9;
    println!(
        "\r  {label}: {} MiB in {:.1} s, {gbps:.2} Gbit/s, every byte verified   ",
        n >> 20,
        elapsed.as_secs_f64()
    );
    Ok(gbps)
}

/// The network demo (see the module's documentation).
fn run_network(args: &Args) -> Result<(), BoxError> {
    use vsc::netns::Netns;
    if args.net_seconds == 0 {
        return Ok(());
    }
    println!("\nvmbus-demo: the network path (netvsc -> VMBus ring -> netvsp, TAPs at both ends)");
    if let Some(why) = vsc::netns::unavailable() {
        println!("  skipped: {why}; run vmbus-demo as root to see it");
        return Ok(());
    }
    let vspd = std::env::current_exe()?.with_file_name("vspd");
    if !vspd.is_file() {
        println!(
            "  skipped: no vspd binary beside vmbus-demo ({}; cargo build --release --bins)",
            vspd.display()
        );
        return Ok(());
    }
    let tag = std::process::id();
    let host = Netns::create(&format!("demo-h{tag}"))?;
    let guest = Netns::create(&format!("demo-g{tag}"))?;
    let dir = std::env::temp_dir().join(format!("vmbus-demo-net-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("vspd.sock");
    let log = dir.join("vspd.log");
    let daemon = Daemon(
        host.command(&vspd.display().to_string())
            .arg("--socket")
            .arg(&socket)
            .args(["--nic", "tap=htap"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err(format!("vspd did not start: {}", std::fs::read_to_string(&log)?).into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    host.ip("addr add 10.80.0.1/24 dev htap")?;
    host.ip("link set htap up")?;
    let s = socket.clone();
    let nic = guest.run(move || {
        vsc::netvsc::Nic::start(&s, vsc::netvsc::NicConfig::new("gtap")).map_err(|e| e.to_string())
    })?;
    guest.ip("addr add 10.80.0.2/24 dev gtap")?;
    guest.ip("link set gtap up")?;
    println!(
        "  namespaces {} (vspd, TAP htap 10.80.0.1) and {} (netvsc, TAP gtap 10.80.0.2), {} channel(s)",
        host.name(),
        guest.name(),
        nic.stats().channels.load(Ordering::Relaxed)
    );
    let ours = transfer(
        &host,
        &guest,
        "10.80.0.1",
        args.net_seconds,
        "TCP guest -> host, netvsc/netvsp",
    )?;
    let a = Netns::create(&format!("demo-a{tag}"))?;
    let b = Netns::create(&format!("demo-b{tag}"))?;
    vsc::netns::ip(&format!(
        "link add va{tag} netns {} type veth peer name vb{tag} netns {}",
        a.name(),
        b.name()
    ))?;
    a.ip(&format!("addr add 10.81.0.1/24 dev va{tag}"))?;
    b.ip(&format!("addr add 10.81.0.2/24 dev vb{tag}"))?;
    a.ip(&format!("link set va{tag} up"))?;
    b.ip(&format!("link set vb{tag} up"))?;
    let veth = transfer(
        &a,
        &b,
        "10.81.0.1",
        args.net_seconds,
        "TCP over a plain veth pair   ",
    )?;
    println!(
        "  netvsc/netvsp moved {ours:.2} Gbit/s, {:.2}x a veth pair's {veth:.2} (one run on a shared machine: benches/network-vs-baseline.sh measures properly)",
        ours / veth
    );
    println!("  netvsc: {}", nic.stats().summary());
    nic.stop();
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
