//! The network path end to end, in network namespaces these tests make and always remove:
//! "host" holds `vspd`'s TAP (`--nic tap=htap`), "guest" holds `vscd --tap gtap`'s; frames go
//! guest TAP -> netvsc -> VMBus ring -> netvsp -> host TAP and back.
//!
//! Needs root (network namespaces, TAP devices), `ip` and `ping` (scripts/install-deps.sh
//! installs them); where anything is missing each test prints why it skips.

mod common;
#[allow(dead_code)]
#[path = "common/hostile.rs"]
mod hostile;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const HOST4: &str = "10.77.0.1";
const GUEST4: &str = "10.77.0.2";
const HOST6: &str = "fd77::1";
const GUEST6: &str = "fd77::2";

/// Bytes each way of the TCP transfers (see `tcp_transfers_each_way_arrive_intact`).
const TCP_BYTES: u64 = 256 << 20;

/// The `vscd` binary, beside `vspd` in the build tree (a workspace build makes both; vsc's
/// binary is not one of this package's, so cargo does not name it here).
fn vscd_binary() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_vspd")).with_file_name("vscd")
}

/// Why a test cannot run here, or `None`.
fn missing() -> Option<String> {
    if !vscd_binary().exists() {
        let msg = format!(
            "{} is not built (cargo build -p vsc)",
            vscd_binary().display()
        );
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        return Some(msg);
    }
    if let Some(why) = vsc::netns::unavailable() {
        return Some(why);
    }
    let ping = Command::new("ping")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if ping.is_err() {
        return Some("`ping` is missing (scripts/install-deps.sh installs it)".into());
    }
    None
}

/// A network namespace (`vsc::netns::Netns`) with what the tests do in it.
struct Netns(vsc::netns::Netns);

impl Netns {
    fn new(name: String) -> Option<Self> {
        vsc::netns::Netns::create(&name).ok().map(Self)
    }

    fn name(&self) -> &str {
        self.0.name()
    }

    fn ip(&self, args: &str) {
        self.0.ip(args).unwrap();
    }

    /// Runs `f` on a thread that lives in this namespace (sockets it makes stay there).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.0.run(f)
    }

    /// Starts `program ARGS` in this namespace.
    fn spawn(&self, program: &str, args: &[String], log: &Path) -> Child {
        self.0
            .command(program)
            .args(args)
            // A system call the seccomp allowlist misses kills the daemon, failing the test.
            .env(ringbuf::sandbox::MISMATCH_ENV, "kill")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("ip netns exec")
    }

    /// Runs `ping ARGS` in this namespace: whether it got its answers.
    fn ping(&self, args: &str) -> bool {
        self.0
            .command("ping")
            .arg("-q")
            .args(args.split_whitespace())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Pings `addr` until it answers (true) or `within` passes.
    fn ping_until(&self, addr: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.ping(&format!("-c 1 -W 1 {addr}")) {
                return true;
            }
        }
        false
    }

    /// A line of `ip -o link show DEV`.
    fn link(&self, dev: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", self.name(), "-o", "link", "show", dev])
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A child process killed on drop, its log printed if the test fails.
struct Proc {
    child: Child,
    log: PathBuf,
    what: &'static str,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `line` in its log (panics if it exits first or 20 s pass).
    fn wait_for(&mut self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains(line) {
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!("{} exited with {s}:\n{}", self.what, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not say {line:?}:\n{}",
                self.what,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then its exit; returns its log.
    fn stop(mut self) -> String {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.child.id() as i32).unwrap(),
            rustix::process::Signal::TERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.log()
    }

    /// SIGKILL.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}'s log:\n{}", self.what, self.log());
        }
    }
}

/// The two namespaces, `vspd` in "host" and `vscd --tap` in "guest", addresses set.
struct Net {
    host: Netns,
    guest: Netns,
    dir: PathBuf,
    vspd: Option<Proc>,
    vscd: Option<Proc>,
    vspd_args: Vec<String>,
    vscd_args: Vec<String>,
}

impl Net {
    /// `nic` is the `--nic` value after `tap=htap`; `extra` more vspd arguments; `vscd` more
    /// vscd arguments. `None` (with a message) where the test cannot run.
    fn start(test: &str, nic: &str, extra: &[&str], vscd: &[&str]) -> Option<Self> {
        if let Some(why) = missing() {
            println!("SKIP {test}: {why}");
            return None;
        }
        let tag = format!("{}{}", std::process::id() % 100_000, test.len());
        let (Some(host), Some(guest)) = (
            Netns::new(format!("vh{tag}{}", &test[..4])),
            Netns::new(format!("vg{tag}{}", &test[..4])),
        ) else {
            println!("SKIP {test}: cannot make network namespaces");
            return None;
        };
        let dir = common::fresh_dir("vsp-net", test);
        let socket = dir.join("vspd.sock");
        let mut vspd_args = vec![
            "--socket".to_string(),
            socket.display().to_string(),
            "--poll-us".into(),
            "0".into(),
            "--nic".into(),
            format!("tap=htap{nic}"),
        ];
        vspd_args.extend(extra.iter().map(|s| s.to_string()));
        let mut vscd_args = vec![
            "--connect".to_string(),
            socket.display().to_string(),
            "--poll-us".into(),
            "0".into(),
            "--tap".into(),
            "gtap".into(),
        ];
        vscd_args.extend(vscd.iter().map(|s| s.to_string()));
        let mut net = Self {
            host,
            guest,
            dir,
            vspd: None,
            vscd: None,
            vspd_args,
            vscd_args,
        };
        net.start_vspd();
        net.start_vscd();
        Some(net)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("vspd.sock")
    }

    fn start_vspd(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let child = self.host.spawn(
            env!("CARGO_BIN_EXE_vspd"),
            &self.vspd_args,
            &self.dir.join("vspd.log"),
        );
        let mut p = Proc {
            child,
            log: self.dir.join("vspd.log"),
            what: "vspd",
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket().exists() {
            if let Some(s) = p.child.try_wait().unwrap() {
                panic!("vspd exited with {s}:\n{}", p.log());
            }
            assert!(Instant::now() < deadline, "vspd did not bind its socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Its TAP exists once the socket is bound.
        self.host.ip(&format!("addr add {HOST4}/24 dev htap"));
        self.host.ip(&format!("addr add {HOST6}/64 dev htap nodad"));
        self.host.ip("link set htap up");
        self.vspd = Some(p);
    }

    fn start_vscd(&mut self) {
        let log = self.dir.join("vscd.log");
        let child = self
            .guest
            .spawn(&vscd_binary().display().to_string(), &self.vscd_args, &log);
        let mut p = Proc {
            child,
            log,
            what: "vscd",
        };
        p.wait_for("network adapter behind TAP gtap");
        self.guest.ip(&format!("addr add {GUEST4}/24 dev gtap"));
        self.guest
            .ip(&format!("addr add {GUEST6}/64 dev gtap nodad"));
        self.guest.ip("link set gtap up");
        self.vscd = Some(p);
    }

    /// Both ways answer pings (waiting up to 10 s for the first).
    fn assert_pings(&self) {
        assert!(
            self.guest.ping_until(HOST4, Duration::from_secs(10)),
            "guest -> host IPv4"
        );
        assert!(
            self.host.ping(&format!("-c 2 -i 0.2 -W 2 {GUEST4}")),
            "host -> guest IPv4"
        );
    }

    /// Stops vscd (SIGTERM) and returns its log (with the NIC's counters).
    fn stop_vscd(&mut self) -> String {
        self.vscd.take().expect("vscd runs").stop()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        drop(self.vscd.take());
        drop(self.vspd.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// FNV-1a over a byte stream.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn add(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Sends `bytes` of a pseudo-random stream from a thread in `from` to a listener in `to` at
/// `addr`; returns (hash sent, hash received, bytes received).
fn tcp_transfer(
    from: &Netns,
    to: &Netns,
    addr: &str,
    bytes: u64,
    streams: usize,
) -> Vec<(u64, u64, u64)> {
    let (tx, rx) = mpsc::channel();
    let a: IpAddr = addr.parse().unwrap();
    let receiver = {
        let to = to.name().to_owned();
        std::thread::spawn(move || {
            vsc::netns::run_in(&to, move || {
                let l = TcpListener::bind(SocketAddr::new(a, 0)).unwrap();
                tx.send(l.local_addr().unwrap().port()).unwrap();
                let conns: Vec<TcpStream> = (0..streams).map(|_| l.accept().unwrap().0).collect();
                let handles: Vec<_> = conns
                    .into_iter()
                    .map(|mut c| {
                        std::thread::spawn(move || {
                            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                            let mut h = Fnv::new();
                            let mut buf = vec![0u8; 1 << 16];
                            let mut n = 0u64;
                            loop {
                                match c.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(k) => {
                                        h.add(&buf[..k]);
                                        n += k as u64;
                                    }
                                    Err(e) => panic!("receive: {e} after {n} bytes"),
                                }
                            }
                            (h.0, n)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            })
        })
    };
    let port = rx.recv_timeout(Duration::from_secs(10)).expect("listener");
    let sent = from.run(move || {
        let handles: Vec<_> = (0..streams)
            .map(|s| {
                std::thread::spawn(move || {
                    let mut c = TcpStream::connect_timeout(
                        &SocketAddr::new(a, port),
                        Duration::from_secs(10),
                    )
                    .expect("connect");
                    c.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
                    let mut h = Fnv::new();
                    let mut buf = vec![0u8; 1 << 16];
                    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ s as u64;
                    let mut left = bytes;
                    while left > 0 {
                        for w in buf.chunks_exact_mut(8) {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            w.copy_from_slice(&state.to_le_bytes());
                        }
                        let k = (left as usize).min(buf.len());
                        c.write_all(&buf[..k]).expect("send");
                        h.add(&buf[..k]);
                        left -= k as u64;
                    }
                    h.0
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let got = receiver.join().expect("receiver");
    // Streams are accepted in any order: match by hash.
    sent.into_iter()
        .map(|s| {
            let r = got.iter().find(|g| g.0 == s).copied().unwrap_or(got[0]);
            (s, r.0, r.1)
        })
        .collect()
}

#[test]
fn ping_both_ways_ipv4_and_ipv6() {
    let Some(net) = Net::start("ping_both_ways", "", &[], &[]) else {
        return;
    };
    net.assert_pings();
    assert!(
        net.guest.ping(&format!("-6 -c 2 -i 0.2 -W 2 {HOST6}")),
        "guest -> host IPv6"
    );
    assert!(
        net.host.ping(&format!("-6 -c 2 -i 0.2 -W 2 {GUEST6}")),
        "host -> guest IPv6"
    );
}

#[test]
fn tcp_transfers_each_way_arrive_intact_and_udp_datagrams_too() {
    let Some(mut net) = Net::start("tcp_and_udp", "", &[], &[]) else {
        return;
    };
    net.assert_pings();
    for (from, to, addr) in [
        (&net.guest, &net.host, HOST4),
        (&net.host, &net.guest, GUEST4),
    ] {
        let t = Instant::now();
        for (sent, got, n) in tcp_transfer(from, to, addr, TCP_BYTES, 1) {
            assert_eq!(n, TCP_BYTES, "{} -> {}: bytes", from.name(), to.name());
            assert_eq!(sent, got, "{} -> {}: hash", from.name(), to.name());
        }
        println!(
            "{} -> {}: {} MiB in {:?}",
            from.name(),
            to.name(),
            TCP_BYTES >> 20,
            t.elapsed()
        );
    }
    // UDP: 64- and 1400-byte datagrams, guest to host, every one intact.
    let (tx, rx) = mpsc::channel();
    let host = net.host.name().to_owned();
    let receiver = std::thread::spawn(move || {
        vsc::netns::run_in(&host, move || {
            let s = UdpSocket::bind((HOST4, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            tx.send(s.local_addr().unwrap().port()).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while got.len() < 200 {
                match s.recv(&mut buf) {
                    Ok(n) => got.push(buf[..n].to_vec()),
                    Err(_) => break,
                }
            }
            got
        })
    });
    let port = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    net.guest.run(move || {
        let s = UdpSocket::bind((GUEST4, 0)).unwrap();
        for i in 0..200u32 {
            let len = if i < 100 { 64 } else { 1400 };
            let d: Vec<u8> = (0..len).map(|j| (i as u8) ^ (j as u8)).collect();
            s.send_to(&d, (HOST4, port)).unwrap();
            std::thread::sleep(Duration::from_micros(500));
        }
    });
    let got = receiver.join().unwrap();
    assert_eq!(got.len(), 200, "datagrams received");
    for d in &got {
        let i = d[0];
        assert!(d.len() == 64 || d.len() == 1400);
        assert!(
            d.iter().enumerate().all(|(j, &b)| b == i ^ j as u8),
            "datagram intact"
        );
    }
    // Host to guest went coalesced (RSC): the host TAP handed over TCP super-frames, and
    // netvsc put them back together from their fragments.
    let log = net.stop_vscd();
    let line = counters_line(&log);
    println!("{line}");
    let rsc = queue_counter(&line, "q0", "rsc");
    assert!(rsc >= 100, "coalesced frames received: {line}");
}

/// The "NIC counters" line of vscd's log.
fn counters_line(log: &str) -> String {
    log.lines()
        .find(|l| l.contains("NIC counters"))
        .unwrap_or_else(|| panic!("no counters in vscd's log:\n{log}"))
        .to_owned()
}

/// Counter `name` of queue `q` (`q0 tx N rx N drop N rsc N`) in a counters line.
fn queue_counter(line: &str, q: &str, name: &str) -> u64 {
    let part = line
        .split(';')
        .find(|p| p.trim().starts_with(q))
        .unwrap_or_else(|| panic!("no {q} in {line}"));
    let words: Vec<&str> = part.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {part}"))
}

#[test]
fn jumbo_frames_after_a_guest_mtu_change() {
    let Some(net) = Net::start("jumbo_mtu", ",mtu=9000", &[], &[]) else {
        return;
    };
    net.host.ip("link set htap mtu 9000");
    net.assert_pings();
    // The guest's MTU change reopens the channels with the new MTU (as Linux does).
    net.guest.ip("link set gtap mtu 9000");
    assert!(
        net.guest.ping_until(HOST4, Duration::from_secs(15)),
        "pings after the MTU change"
    );
    assert!(
        net.guest.ping(&format!("-M do -s 8972 -c 2 -W 2 {HOST4}")),
        "guest -> host 9000"
    );
    assert!(
        net.host.ping(&format!("-M do -s 8972 -c 2 -W 2 {GUEST4}")),
        "host -> guest 9000"
    );
    // And back, any number of times.
    net.guest.ip("link set gtap mtu 1500");
    assert!(net.guest.ping_until(HOST4, Duration::from_secs(15)));
    assert!(
        !net.guest.ping(&format!("-M do -s 8972 -c 1 -W 1 {HOST4}")),
        "1500 now"
    );
}

#[test]
fn vlan_tagged_on_the_host_untagged_in_the_guest() {
    let Some(net) = Net::start("vlan_tagged", ",vlan=100", &[], &[]) else {
        return;
    };
    // This kernel may have no 802.1Q interfaces: the host side is a TAP of the test's own
    // (xtap), bridged with htap, that writes and reads raw frames. An ARP request tagged 100
    // reaches the guest untagged (the guest has no VLAN at all), and its answer comes back
    // tagged 100.
    net.host.ip("addr flush dev htap");
    net.host.ip("link add br0 type bridge");
    let xtap = net.host.run(|| netdev::Tap::open("xtap", 1).expect("xtap"));
    for dev in ["htap", "xtap"] {
        net.host.ip(&format!("link set {dev} master br0"));
        net.host.ip(&format!("link set {dev} up"));
    }
    net.host.ip("link set br0 up");
    let ours = [2, 0, 0, 0, 0, 0x99];
    let mut req = vec![0xff; 6];
    req.extend_from_slice(&ours);
    req.extend_from_slice(&[0x81, 0x00, 0x00, 100, 0x08, 0x06]);
    req.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    req.extend_from_slice(&ours);
    req.extend_from_slice(&[10, 77, 0, 1]);
    req.extend_from_slice(&[0; 6]);
    req.extend_from_slice(&[10, 77, 0, 2]);
    let q = &xtap.queues()[0];
    let hdr = netdev::VirtioNetHdr::default();
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut next_send = Instant::now();
    let reply = loop {
        assert!(
            Instant::now() < deadline,
            "no tagged ARP reply from the guest"
        );
        if Instant::now() >= next_send {
            q.write(&hdr, &[netdev::IoPiece::Local(&req)]).unwrap();
            next_send = Instant::now() + Duration::from_millis(300);
        }
        let mut h = netdev::VirtioNetHdr::default();
        match q
            .read(&mut h, &mut [netdev::IoPieceMut::Local(&mut buf)])
            .unwrap()
        {
            Some(n) if n >= 46 && buf[..6] == ours => break buf[..n].to_vec(),
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    assert_eq!(&reply[12..14], &[0x81, 0x00], "tagged toward the host");
    assert_eq!(
        u16::from_be_bytes([reply[14], reply[15]]) & 0xfff,
        100,
        "VLAN 100"
    );
    assert_eq!(&reply[16..18], &[0x08, 0x06], "an ARP");
    assert_eq!(&reply[24..26], &[0, 2], "a reply");
    assert_eq!(&reply[32..36], &[10, 77, 0, 2], "from the guest");
}

#[test]
fn the_guest_carrier_follows_the_host_link() {
    let Some(net) = Net::start("link_follows", "", &[], &[]) else {
        return;
    };
    net.assert_pings();
    let carrier = |up: bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let l = net.guest.link("gtap");
            if l.contains("NO-CARRIER") != up {
                return true;
            }
            if Instant::now() > deadline {
                println!("gtap: {l}");
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    net.host.ip("link set htap down");
    assert!(carrier(false), "the guest TAP lost its carrier");
    net.host.ip("link set htap up");
    assert!(carrier(true), "the guest TAP has its carrier again");
    assert!(net.guest.ping_until(HOST4, Duration::from_secs(10)));
}

#[test]
fn two_queues_both_carry_traffic() {
    let Some(mut net) = Net::start("two_queues", ",queues=2", &[], &["--queues", "2"]) else {
        return;
    };
    net.assert_pings();
    for (sent, got, n) in tcp_transfer(&net.guest, &net.host, HOST4, 16 << 20, 8) {
        assert_eq!((sent, n), (got, 16 << 20));
    }
    for (sent, got, n) in tcp_transfer(&net.host, &net.guest, GUEST4, 16 << 20, 8) {
        assert_eq!((sent, n), (got, 16 << 20));
    }
    let line = counters_line(&net.stop_vscd());
    println!("{line}");
    assert!(line.contains("channels 2"), "{line}");
    for q in ["q0", "q1"] {
        let part = line.split(';').find(|p| p.trim().starts_with(q)).expect(q);
        let nums: Vec<u64> = part
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert!(
            nums[0] > 0 && nums[1] > 0,
            "{q} carried traffic both ways: {part}"
        );
    }
}

#[test]
fn vscd_restarted_resumes_while_vspd_serves_another_guest() {
    // The other guest's disk.
    let dir = common::fresh_dir("vsp-net-disk", "restart");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let disk_arg = format!("path={}", disk.display());
    let net = Net::start("vscd_restart", "", &["--disk", &disk_arg], &[]);
    if let Some(mut net) = net {
        net.assert_pings();
        let other = hostile::good_guest(&net.socket());
        hostile::verified_io(&other, 1);
        net.vscd.take().unwrap().kill();
        // vspd keeps serving the other guest while this one is gone.
        hostile::verified_io(&other, 2);
        net.start_vscd();
        net.assert_pings();
        hostile::verified_io(&other, 3);
        drop(other);
        // And vscd rides out a restart of vspd: its NIC comes back by itself.
        net.vspd.take().unwrap().stop();
        net.start_vspd();
        assert!(
            net.guest.ping_until(HOST4, Duration::from_secs(20)),
            "pings after vspd restarted"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
