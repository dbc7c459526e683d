//! Criterion bench `network`: frames through the whole network path against raw TAP read and
//! write of the same frames, in the same group.
//!
//! The bench moves into a network namespace of its own, starts the real `vspd` with
//! `--nic tap=htap` and the netvsc client (`vsc::netvsc::Nic`, in process) behind `gtap`.
//! Frames enter and leave through TAPs the bench holds, bridged to the path's ends:
//!
//! - guest -> host (`vmbus_tx_*`): written to `itap` (bridged with `gtap`), so the guest
//!   kernel hands them to netvsc; they come out of `htap` into bridge `brh` and are read from
//!   `otap`;
//! - host -> guest (`vmbus_rx_*`): the reverse, written to `otap`, read from `itap`;
//! - the baseline (`tap_*`): written to `rin`, bridged straight to `rout`, read there: the
//!   same TAP writes, bridge and TAP reads, without the VMBus path between.
//!
//! Frames are 64 bytes (frames/s), 1500 bytes and 64 KiB TCP/IPv4 GSO frames (TSO: the TAPs
//! take them whole; Gbit/s). Each iteration writes a window of frames and reads until they
//! are all back, waiting in `poll` when a read finds none (a lost frame ends its window after
//! 50 ms and is counted, printed at the end).
//!
//! Needs root (namespaces, TAPs) and `ip`; it says why and exits where it cannot run. The
//! `vspd` binary: `$VMBUS_BENCH_VSPD`, else beside the bench's profile directory, else
//! `target/release/vspd`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use netdev::{IoPiece, IoPieceMut, Tap, TapQueue, TunOffload, VirtioNetHdr, VnetFlags};
use rustix::event::{poll, PollFd, PollFlags, Timespec};

/// Frames in flight per window.
const WINDOW: usize = 32;
/// Empty reads in a row before the reader blocks in `poll` on its TAP, as a real receiver
/// would. Spinning on `read` (64 tries, or forever) cost 4-11 system calls per frame on the
/// bench's side: CPU the path's own threads need on a two-core machine; the raw TAP baseline
/// never waits (its frames are there when its writes return), so this only stops the bench
/// from competing with what it measures.
const SPINS: u32 = 2;
/// Frames lost (not back within 50 ms), over the whole run.
static LOST: AtomicU64 = AtomicU64::new(0);

fn ip(args: &str) -> Result<(), String> {
    let s = Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .map_err(|e| format!("ip: {e}"))?;
    s.success()
        .then_some(())
        .ok_or_else(|| format!("ip {args} failed"))
}

fn find_vspd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VMBUS_BENCH_VSPD") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let exe = std::env::current_exe().ok()?;
    let profile = exe.parent()?.parent()?;
    [
        profile.join("vspd"),
        profile.parent()?.join("release").join("vspd"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// The path and the TAPs the bench holds.
struct Setup {
    itap: Tap,
    otap: Tap,
    rin: Tap,
    rout: Tap,
    nic: Option<vsc::netvsc::Nic>,
    vspd: Child,
    dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        drop(self.nic.take());
        if let Some(pid) = rustix::process::Pid::from_raw(self.vspd.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.vspd.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup() -> Result<Setup, String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not root".into());
    }
    let vspd = find_vspd().ok_or("no vspd binary (cargo build --release --bins)")?;
    // A named namespace (removed on drop), entered by this thread: vspd, the NIC's threads and
    // criterion's all start from here.
    let ns = format!("vmbench{}", std::process::id());
    ip(&format!("netns add {ns}")).map_err(|e| format!("cannot make a network namespace: {e}"))?;
    let entered = std::fs::File::open(format!("/run/netns/{ns}"))
        .map_err(|e| e.to_string())
        .and_then(|f| {
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&f),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| e.to_string())
        });
    // The namespace lives on while this thread is in it; its name goes now.
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    entered.map_err(|e| format!("cannot enter a network namespace: {e}"))?;
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1");
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
    ip("link set lo up")?;
    let dir = std::env::temp_dir().join(format!("vmbus-bench-net-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let socket = dir.join("vspd.sock");
    let child = Command::new(vspd)
        .args(["--socket", &socket.display().to_string()])
        .args(["--nic", "tap=htap"])
        .env("VSPD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("vspd: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err("vspd did not bind its socket".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let open = |name: &str| {
        let t = Tap::open(name, 1).map_err(|e| format!("TAP {name}: {e}"))?;
        let q = &t.queues()[0];
        q.set_offload(TunOffload::CSUM | TunOffload::TSO4)
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(t)
    };
    let (itap, otap, rin, rout) = (open("itap")?, open("otap")?, open("rin")?, open("rout")?);
    let nic = vsc::netvsc::Nic::start(&socket, vsc::netvsc::NicConfig::new("gtap"))
        .map_err(|e| format!("netvsc: {e}"))?;
    for (br, a, b) in [
        ("brg", "itap", "gtap"),
        ("brh", "otap", "htap"),
        ("brr", "rin", "rout"),
    ] {
        ip(&format!("link add {br} type bridge"))?;
        for dev in [a, b] {
            ip(&format!("link set {dev} master {br}"))?;
            ip(&format!("link set {dev} mtu 9000"))?;
            ip(&format!("link set {dev} up"))?;
        }
        ip(&format!("link set {br} up"))?;
    }
    Ok(Setup {
        itap,
        otap,
        rin,
        rout,
        nic: Some(nic),
        vspd: child,
        dir,
    })
}

/// A frame of `len` bytes (broadcast, experimental ethertype) or, for `gso`, a TCP/IPv4 GSO
/// frame of `len` bytes with its virtio-net header.
fn frame(len: usize, gso: bool) -> (VirtioNetHdr, Vec<u8>) {
    let mut f = vec![0u8; len];
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 7]);
    if !gso {
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        return (VirtioNetHdr::default(), f);
    }
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((len - 14) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 88, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 88, 0, 2]);
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let c = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = 34;
    f[tcp..tcp + 2].copy_from_slice(&5001u16.to_be_bytes());
    f[tcp + 2..tcp + 4].copy_from_slice(&5002u16.to_be_bytes());
    f[tcp + 12] = 5 << 4;
    f[tcp + 13] = 0x10;
    f[tcp + 14..tcp + 16].copy_from_slice(&0xffffu16.to_be_bytes());
    // The pseudo-header sum, not complemented, as NEEDS_CSUM wants it.
    let mut p: u32 = 10 * 256 + 88 + 1 + 10 * 256 + 88 + 2 + 6 + (len - tcp) as u32;
    p = (p & 0xffff) + (p >> 16);
    f[tcp + 16..tcp + 18].copy_from_slice(&(p as u16).to_be_bytes());
    let hdr = VirtioNetHdr {
        flags: VnetFlags::NEEDS_CSUM.bits(),
        gso_type: 1,
        hdr_len: 54.into(),
        gso_size: 1448.into(),
        csum_start: 34.into(),
        csum_offset: 16.into(),
        ..Default::default()
    };
    (hdr, f)
}

/// Writes `n` frames to `from` in windows, each read back from `to`; the time taken.
fn pump(from: &TapQueue, to: &TapQueue, hdr: &VirtioNetHdr, f: &[u8], n: u64) -> Duration {
    let mut buf = vec![0u8; 70_000];
    let start = Instant::now();
    let mut left = n;
    while left > 0 {
        let w = (left as usize).min(WINDOW);
        let mut sent = 0;
        while sent < w {
            match from.write(hdr, &[IoPiece::Local(f)]) {
                Ok(Some(_)) => sent += 1,
                _ => std::thread::yield_now(),
            }
        }
        let mut got = 0;
        let mut idle = 0u32;
        let mut since = Instant::now();
        while got < w {
            let mut h = VirtioNetHdr::default();
            match to.read(&mut h, &mut [IoPieceMut::Local(&mut buf)]) {
                Ok(Some(k)) if k >= f.len().min(60) => {
                    got += 1;
                    since = Instant::now();
                }
                Ok(Some(_)) => {}
                _ => {
                    if since.elapsed() > Duration::from_millis(50) {
                        LOST.fetch_add((w - got) as u64, Ordering::Relaxed);
                        break;
                    }
                    idle += 1;
                    if idle < SPINS {
                        std::hint::spin_loop();
                    } else {
                        // Like a real receiver: block until the TAP is readable, leaving the
                        // core to whoever carries the frames (here: the path's threads).
                        idle = 0;
                        let mut fds = [PollFd::new(to, PollFlags::IN)];
                        let _ = poll(
                            &mut fds,
                            Some(&Timespec {
                                tv_sec: 0,
                                tv_nsec: 10_000_000,
                            }),
                        );
                    }
                }
            }
        }
        left -= w as u64;
    }
    start.elapsed()
}

fn network(c: &mut Criterion) {
    let s = match setup() {
        Ok(s) => s,
        Err(e) => {
            println!("network bench skipped: {e}");
            return;
        }
    };
    // Let the bridges settle (and the guest's carrier come up).
    std::thread::sleep(Duration::from_millis(500));
    let mut g = c.benchmark_group("network");
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_millis(500));
    for (name, len, gso) in [
        ("64", 64usize, false),
        ("1500", 1500, false),
        ("tso64k", 65_000, true),
    ] {
        let (hdr, f) = frame(len, gso);
        if len == 64 {
            g.throughput(Throughput::Elements(1));
        } else {
            g.throughput(Throughput::Bytes(len as u64));
        }
        let (i, o) = (&s.itap.queues()[0], &s.otap.queues()[0]);
        let (ri, ro) = (&s.rin.queues()[0], &s.rout.queues()[0]);
        g.bench_function(format!("vmbus_tx_{name}"), |b| {
            b.iter_custom(|n| pump(i, o, &hdr, &f, n))
        });
        g.bench_function(format!("tap_tx_{name}"), |b| {
            b.iter_custom(|n| pump(ri, ro, &hdr, &f, n))
        });
        g.bench_function(format!("vmbus_rx_{name}"), |b| {
            b.iter_custom(|n| pump(o, i, &hdr, &f, n))
        });
        g.bench_function(format!("tap_rx_{name}"), |b| {
            b.iter_custom(|n| pump(ro, ri, &hdr, &f, n))
        });
    }
    g.finish();
    if let Some(nic) = &s.nic {
        println!("netvsc counters: {}", nic.stats().summary());
    }
    println!(
        "frames lost (not back within 50 ms): {}",
        LOST.load(Ordering::Relaxed)
    );
}

criterion_group!(benches, network);
criterion_main!(benches);
