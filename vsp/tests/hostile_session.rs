//! Hostile front ends and guests against the real `vspd` (issue 9): each test reproduces a
//! trigger that used to wedge, bloat or flood the daemon, and shows that the attacker is
//! contained, that a second loopback guest keeps doing verified I/O, that the daemon's figures
//! (RSS, threads) stay bounded, and that SIGTERM still ends it.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringbuf::guestmem::GuestMemory;
use ringbuf::shmem::create_memfd;
use ringbuf::socket::SeqPacket;
use ringbuf::OutgoingPacket;
use vmbus_proto::channel::{
    Guid, InitiateContact, MessageHeader, MessageType, VmbusVersion, MESSAGE_CONNECTION_ID,
};
use vmbus_proto::partition::{self as wire, status, vp_flags, Kind};
use vmbus_proto::storvsp::{SubchannelCount, VstorOperation, VstorPacket, REQUEST_COMPLETION_FLAG};
use vmbus_proto::synic::VMBUS_POST_MESSAGE_TYPE;
use vsc::channel::GuestChannel;
use vsc::client::{Client, Event, SUPPORTED_VERSIONS};
use vsc::loopback::Loopback;
use vsc::storvsc::{Disk, Storvsc};
use zerocopy::{FromZeros, IntoBytes};

mod common;

const MEM: u64 = 1 << 20;

/// `vspd` serving `a.img` (16 MiB) with `disk_opts` and `extra` arguments.
fn vspd(name: &str, disk_opts: &str, extra: &[&str]) -> common::Daemon {
    let dir = common::fresh_dir("vspd-hostile", name);
    std::fs::File::create(dir.join("a.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut args = vec!["--disk".to_string(), format!("path=a.img{disk_opts}")];
    args.extend(extra.iter().map(|s| s.to_string()));
    common::Daemon::spawn(&dir, args).owning_dir()
}

/// A well-behaved guest with the first disk started.
struct Guest {
    _front: Arc<Loopback>,
    _client: Client,
    disk: Arc<Disk>,
}

fn guest(socket: &Path) -> Guest {
    let (front, messages) = Loopback::connect(socket, 32 << 20).unwrap();
    let front = Arc::new(front);
    let mut client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS).unwrap();
    let offers = client.request_offers().unwrap();
    let o = offers
        .iter()
        .find(|o| o.interface_type == Guid::SCSI)
        .unwrap();
    let ch = GuestChannel::open(&mut client, &front, o, 16).unwrap();
    let disk = Disk::start(Storvsc::init(ch).unwrap(), front.clone(), 0).unwrap();
    Guest {
        _front: front,
        _client: client,
        disk,
    }
}

/// Writes a pattern at `round`'s place and reads it back.
fn verified_io(disk: &Disk, round: u64) {
    let data: Vec<u8> = (0..64 * 1024u64)
        .map(|i| (i.wrapping_mul(31) ^ round) as u8)
        .collect();
    let offset = (round % 200) * 64 * 1024;
    disk.write(offset, &data, false).unwrap();
    let mut back = vec![0u8; data.len()];
    disk.read(offset, &mut back).unwrap();
    assert!(back == data, "read back differs at round {round}");
}

fn sigterm(pid: u32) {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
}

/// SIGTERM, then wait for the exit (a liveness bound, not a speed test).
fn stop_in_bounded_time(d: &mut common::Daemon) {
    sigterm(d.pid());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = d.try_wait() {
            assert!(status.success(), "vspd exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "vspd did not finish within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rss_kib(d: &common::Daemon) -> u64 {
    d.status_field("VmRSS:")
}

/// Receives one datagram within `timeout`: `None` on timeout, `Some(None)` at end of stream.
fn recv_timeout(sock: &SeqPacket, timeout: Duration) -> Option<Option<(Kind, Vec<u8>)>> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let ts = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    let mut fds = [PollFd::new(sock, PollFlags::IN)];
    if poll(&mut fds, Some(&ts)).unwrap() == 0 {
        return None;
    }
    let mut buf = [0u8; wire::MAX_MESSAGE_SIZE];
    match sock.recv(&mut buf) {
        Ok(Some(d)) => {
            let (k, body) = wire::split(&buf[..d.len]).unwrap();
            Some(Some((k, body.to_vec())))
        }
        Ok(None) | Err(_) => Some(None),
    }
}

/// A front end written by hand: one VP, 1 MiB of memory, SIMP at page 0 and SIEFP at page 1.
struct RawFront {
    sock: SeqPacket,
    mem: GuestMemory,
}

impl RawFront {
    /// Connects and sets up the partition with `irqfd` as VP 0's interrupt line.
    fn connect(socket: &Path, irqfd: OwnedFd) -> Self {
        let sock = SeqPacket::connect(socket).unwrap();
        let reply = |sock: &SeqPacket| {
            recv_timeout(sock, Duration::from_secs(10))
                .expect("a reply")
                .expect("the connection stays open")
        };
        sock.send(
            &wire::encode(
                Kind::HELLO,
                &wire::Hello {
                    version: wire::VERSION,
                    vp_count: 1,
                },
            ),
            &[],
        )
        .unwrap();
        assert_eq!(reply(&sock).0, Kind::HELLO_REPLY);
        let memfd = create_memfd("raw-front", MEM).unwrap();
        let add = wire::AddMemory {
            gpa: 0,
            len: MEM,
            fd_offset: 0,
        };
        sock.send(&wire::encode(Kind::ADD_MEMORY, &add), &[memfd.as_fd()])
            .unwrap();
        let st: wire::Status = wire::body(Kind::STATUS, &reply(&sock).1).unwrap();
        assert_eq!(st.status, status::OK);
        let vp = wire::SetVp {
            vp: 0,
            flags: vp_flags::SIMP_ENABLED | vp_flags::SIEFP_ENABLED,
            simp_gpa: 0,
            siefp_gpa: 4096,
        };
        sock.send(&wire::encode(Kind::SET_VP, &vp), &[irqfd.as_fd()])
            .unwrap();
        let st: wire::Status = wire::body(Kind::STATUS, &reply(&sock).1).unwrap();
        assert_eq!(st.status, status::OK);
        let mut mem = GuestMemory::new();
        mem.add_region(0, MEM, memfd, 0).unwrap();
        Self { sock, mem }
    }

    fn post_message(&self, connection_id: u32, payload: &[u8]) {
        let m = wire::PostMessage::vmbus(0, connection_id, payload).unwrap();
        self.sock
            .send(&wire::encode(Kind::POST_MESSAGE, &m), &[])
            .unwrap();
    }

    fn initiate_contact(&self, target_vcpu: u32) {
        let mut ic = InitiateContact::new_zeroed();
        ic.header = MessageHeader::new(MessageType::INITIATE_CONTACT);
        ic.vmbus_version_requested = VmbusVersion::IRON.0;
        ic.target_vcpu = target_vcpu;
        self.post_message(
            VmbusVersion::IRON.initiate_contact_connection_id(),
            ic.as_bytes(),
        );
    }

    /// The type of the message in VP 0's VMBus SINT slot (0: free).
    fn slot_type(&self) -> u32 {
        let mut b = [0u8; 4];
        self.mem
            .read(
                u64::from(vmbus_proto::synic::VMBUS_SINT)
                    * vmbus_proto::synic::MESSAGE_SLOT_SIZE as u64,
                &mut b,
            )
            .unwrap();
        u32::from_le_bytes(b)
    }

    /// A request the daemon answers with a STATUS (ADD_MEMORY without its descriptor).
    fn status_request(&self) -> Vec<u8> {
        wire::encode(Kind::ADD_MEMORY, &wire::AddMemory::default())
    }
}

/// A blocking eventfd whose counter is one below its maximum: a blocking write of 1 hangs.
fn saturated_eventfd() -> OwnedFd {
    let fd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    rustix::io::write(&fd, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).unwrap();
    fd
}

#[test]
fn a_saturated_irqfd_does_not_wedge_the_session_or_shutdown() {
    let mut d = vspd("irqfd", "", &[]);
    let good = guest(&d.socket);
    verified_io(&good.disk, 0);
    let irq = saturated_eventfd();
    let keep = irq.try_clone().unwrap();
    let raw = RawFront::connect(&d.socket, irq);
    // The VersionResponse is delivered into the slot, then the irqfd is written: that write
    // used to block the session thread forever, holding the VP's lock.
    raw.initiate_contact(0);
    // The session still answers.
    raw.sock.send(&raw.status_request(), &[]).unwrap();
    let (k, body) = recv_timeout(&raw.sock, Duration::from_secs(10))
        .expect("the session answers: it is not stuck on the irqfd")
        .unwrap();
    assert_eq!(k, Kind::STATUS);
    let st: wire::Status = wire::body(k, &body).unwrap();
    assert_eq!(st.status, status::MALFORMED);
    assert_eq!(
        raw.slot_type(),
        VMBUS_POST_MESSAGE_TYPE,
        "the message is there"
    );
    // The front end clears O_NONBLOCK on the shared description: the next interrupt's write
    // blocks until the daemon's watchdog interrupts it (ringbuf::kick); the session answers.
    rustix::fs::fcntl_setfl(&keep, rustix::fs::OFlags::empty()).unwrap();
    raw.post_message(
        MESSAGE_CONNECTION_ID,
        MessageHeader::new(MessageType::REQUEST_OFFERS).as_bytes(),
    );
    raw.sock.send(&raw.status_request(), &[]).unwrap();
    assert!(recv_timeout(&raw.sock, Duration::from_secs(10)).is_some());
    // A descriptor that is not an eventfd is refused as an irqfd.
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let vp = wire::SetVp {
        vp: 0,
        flags: vp_flags::SIMP_ENABLED,
        simp_gpa: 0,
        siefp_gpa: 0,
    };
    raw.sock
        .send(&wire::encode(Kind::SET_VP, &vp), &[a.as_fd()])
        .unwrap();
    let (_, body) = recv_timeout(&raw.sock, Duration::from_secs(10))
        .unwrap()
        .unwrap();
    let st: wire::Status = wire::body(Kind::STATUS, &body).unwrap();
    assert_eq!(st.status, status::MALFORMED);
    for round in 1..20 {
        verified_io(&good.disk, round);
    }
    stop_in_bounded_time(&mut d);
}

#[test]
fn a_front_end_that_never_reads_its_replies_is_dropped_and_shutdown_ends() {
    let mut d = vspd("noread", "", &[]);
    let good = guest(&d.socket);
    // Requests that each get a reply, never read: the daemon's replies fill our receive queue,
    // then it stops reading ours.
    let flood = |raw: &RawFront, until: Instant| -> Option<Duration> {
        let req = raw.status_request();
        let start = Instant::now();
        let mut full_since = None;
        while Instant::now() < until {
            match raw.sock.try_send(&req, &[]) {
                Ok(true) => full_since = None,
                Ok(false) => {
                    full_since.get_or_insert_with(Instant::now);
                    std::thread::sleep(Duration::from_millis(5));
                }
                // Dropped by the daemon.
                Err(_) => return Some(start.elapsed()),
            }
        }
        let _ = full_since;
        None
    };
    let raw = RawFront::connect(
        &d.socket,
        rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap(),
    );
    let dropped = flood(&raw, Instant::now() + Duration::from_secs(60));
    assert!(
        dropped.is_some(),
        "the daemon kept a front end that reads no replies"
    );
    println!("front end dropped after {:?}", dropped.unwrap());
    verified_io(&good.disk, 1);
    // Another one, stuck when SIGTERM comes: shutdown still ends.
    let raw = Arc::new(RawFront::connect(
        &d.socket,
        rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap(),
    ));
    let r = raw.clone();
    let t = std::thread::spawn(move || flood(&r, Instant::now() + Duration::from_secs(2)));
    t.join().unwrap();
    for round in 2..10 {
        verified_io(&good.disk, round);
    }
    stop_in_bounded_time(&mut d);
}

/// Writes CREATE_SUB_CHANNELS packets into `ch` as fast as the ring takes them and throws
/// the answers away, until `stop`; counts them in `sent`.
fn flood_subchannel_requests(
    mut ch: GuestChannel,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> GuestChannel {
    let mut count = 0u16;
    while !stop.load(Ordering::Relaxed) {
        loop {
            count = count % 3 + 1;
            let mut p = VstorPacket::new(
                VstorOperation::CREATE_SUB_CHANNELS,
                REQUEST_COMPLETION_FLAG,
                0,
            );
            p.set_body(&SubchannelCount { count });
            if ch
                .out
                .write(&OutgoingPacket::in_band(7, true, &[p.as_bytes()]))
                .is_err()
            {
                break;
            }
            sent.fetch_add(1, Ordering::Relaxed);
        }
        ch.commit_out().unwrap();
        while ch.inc.read().unwrap().is_some() {}
        ch.commit_in().unwrap();
    }
    ch
}

#[test]
fn a_create_sub_channels_flood_stays_bounded() {
    // Four controllers of four queues each: four primary channels flood at once.
    let dir = common::fresh_dir("vspd-hostile", "subflood");
    let mut args = Vec::new();
    for i in 0..4 {
        let img = format!("d{i}.img");
        std::fs::File::create(dir.join(&img))
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        args.push("--disk".to_string());
        args.push(format!("path={img},queues=4"));
    }
    let mut d = common::Daemon::spawn(&dir, args).owning_dir();
    let good = guest(&d.socket);
    let (front, messages) = Loopback::connect(&d.socket, 32 << 20).unwrap();
    let front = Arc::new(front);
    let mut client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS).unwrap();
    let offers = client.request_offers().unwrap();
    assert_eq!(offers.len(), 4);
    let channels: Vec<GuestChannel> = offers
        .iter()
        .map(|o| {
            let ch = GuestChannel::open(&mut client, &front, o, 64).unwrap();
            Storvsc::init(ch).unwrap().into_channel()
        })
        .collect();
    verified_io(&good.disk, 0);
    let (rss0, threads0) = (rss_kib(&d), d.threads());
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flooders: Vec<_> = channels
        .into_iter()
        .map(|ch| {
            let (s, n) = (stop.clone(), sent.clone());
            std::thread::spawn(move || flood_subchannel_requests(ch, s, n))
        })
        .collect();
    let start = Instant::now();
    let mut round = 1;
    let mut peak = rss0;
    while start.elapsed() < Duration::from_secs(5) {
        verified_io(&good.disk, round);
        round += 1;
        peak = peak.max(rss_kib(&d));
    }
    stop.store(true, Ordering::Relaxed);
    let _channels: Vec<GuestChannel> = flooders.into_iter().map(|t| t.join().unwrap()).collect();
    let sent = sent.load(Ordering::Relaxed);
    let (rss1, threads1) = (rss_kib(&d), d.threads());
    println!(
        "{sent} CREATE_SUB_CHANNELS in 5 s on 4 channels; vspd RSS {rss0} -> peak {peak} -> {rss1} KiB, threads {threads0} -> {threads1}; {round} verified I/O rounds meanwhile"
    );
    assert!(sent > 10_000, "the flood was too small to show anything");
    assert!(
        peak < rss0 + 32 * 1024,
        "vspd grew from {rss0} to {peak} KiB"
    );
    // No thread per request (a few io-wq workers may come and go with the good guest's I/O).
    assert!(threads1 <= threads0 + 8, "threads {threads0} -> {threads1}");
    // Each controller was offered subchannels 1 to 3, once each.
    let mut subs = Vec::new();
    while let Some(ev) = client.next_event(Duration::from_millis(500)).unwrap() {
        if let Event::Offer(o) = ev {
            subs.push(o.subchannel_index);
        }
    }
    subs.sort_unstable();
    assert_eq!(subs, [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]);
    stop_in_bounded_time(&mut d);
}

#[test]
fn a_guest_that_never_eoms_cannot_flood_the_log() {
    let mut d = vspd("logflood", "", &[]);
    let good = guest(&d.socket);
    let raw = RawFront::connect(
        &d.socket,
        rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap(),
    );
    // Every InitiateContact is answered; the guest never frees its slot nor EOMs. And a VP
    // the partition lacks is named (refused, answered on VP 0).
    for i in 0..20_000u32 {
        raw.initiate_contact(if i % 2 == 0 { 0 } else { 7 + i });
    }
    raw.sock.send(&raw.status_request(), &[]).unwrap();
    assert!(recv_timeout(&raw.sock, Duration::from_secs(30)).is_some());
    verified_io(&good.disk, 1);
    let log = std::fs::read_to_string(d.dir.join("vspd.log")).unwrap();
    let lines = log.lines().count();
    println!("{lines} log lines after 20000 unanswerable messages:\n{log}");
    assert!(lines <= 20, "{lines} log lines");
    stop_in_bounded_time(&mut d);
}

#[test]
fn sessions_beyond_the_limit_are_refused() {
    let mut d = vspd("maxsessions", "", &["--max-sessions", "1"]);
    let first = guest(&d.socket);
    let e = Loopback::connect(&d.socket, 8 << 20).err();
    assert!(e.is_some(), "a second session was accepted");
    verified_io(&first.disk, 0);
    drop(first);
    // Once the first has gone, a new one is served.
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        match Loopback::connect(&d.socket, 32 << 20) {
            Ok((front, messages)) => break (Arc::new(front), messages),
            Err(_) => {
                assert!(Instant::now() < deadline, "the slot never came back");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let mut c = Client::connect(again.0.clone(), again.1, 0, &SUPPORTED_VERSIONS).unwrap();
    assert_eq!(c.request_offers().unwrap().len(), 1);
    stop_in_bounded_time(&mut d);
}

#[test]
fn a_path_that_is_not_a_socket_is_left_alone() {
    let dir = common::fresh_dir("vspd-hostile", "notasocket");
    let path = dir.join("precious.txt");
    std::fs::write(&path, b"keep me").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vspd"))
        .arg("--socket")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `vspd` run as uid 65534 (nobody) in a directory it owns, with `extra` arguments.
struct AsNobody {
    child: std::process::Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl AsNobody {
    fn start(name: &str, extra: &[&str]) -> Self {
        Self::start_with(name, &["a.img"], &["--disk", "path=a.img"], extra)
    }

    /// vspd as nobody, in a fresh directory holding the 1 MiB `images`, with `args` then
    /// `extra`.
    fn start_with(name: &str, images: &[&str], args: &[&str], extra: &[&str]) -> Self {
        use std::os::unix::process::CommandExt;
        let dir = common::fresh_dir("vspd-hostile", name);
        // Copies of the binaries nobody can run, wherever the build tree is.
        let bin = dir.join("vspd");
        std::fs::copy(env!("CARGO_BIN_EXE_vspd"), &bin).unwrap();
        // And this test binary, for front ends that run as nobody (`as_nobody_list_offers`).
        let tests = dir.join("tests");
        std::fs::copy(std::env::current_exe().unwrap(), &tests).unwrap();
        let mut owned = vec![dir.clone(), bin.clone(), tests];
        for image in images {
            std::fs::File::create(dir.join(image))
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
            owned.push(dir.join(image));
        }
        for p in &owned {
            rustix::fs::chown(
                p.as_path(),
                Some(rustix::fs::Uid::from_raw(65534)),
                Some(rustix::fs::Gid::from_raw(65534)),
            )
            .unwrap();
        }
        let socket = dir.join("vspd.sock");
        let child = Command::new(&bin)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .args(extra)
            .current_dir(&dir)
            .uid(65534)
            .gid(65534)
            .env("VSPD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("vspd.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "vspd did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, dir, socket }
    }
}

impl Drop for AsNobody {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn only_allowed_uids_may_connect() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run vspd as another uid");
        return;
    }
    // vspd runs as nobody: root (this test) is not implied, and is refused before anything is
    // read; the log says so.
    let d = AsNobody::start("uid-refused", &[]);
    let sock = SeqPacket::connect(&d.socket).unwrap();
    let _ = sock.send(
        &wire::encode(
            Kind::HELLO,
            &wire::Hello {
                version: wire::VERSION,
                vp_count: 1,
            },
        ),
        &[],
    );
    assert!(
        matches!(recv_timeout(&sock, Duration::from_secs(10)), Some(None)),
        "the connection is closed without an answer"
    );
    assert!(Loopback::connect(&d.socket, 8 << 20).is_err());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(d.dir.join("vspd.log")).unwrap();
        if log.contains("uid 0") && log.contains("connection refused") {
            break;
        }
        assert!(Instant::now() < deadline, "no log line: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(d);
    // With --allow-uid 0, root is served.
    let d = AsNobody::start("uid-allowed", &["--allow-uid", "0"]);
    let g = guest(&d.socket);
    verified_io(&g.disk, 0);
    drop(g);
    drop(d);
    // So is a member of an allowed group (root's gid is 0).
    let d = AsNobody::start("gid-allowed", &["--allow-gid", "0"]);
    let g = guest(&d.socket);
    verified_io(&g.disk, 1);
    drop(g);
    drop(d);
    let d = AsNobody::start("gid-refused", &["--allow-gid", "4242"]);
    assert!(Loopback::connect(&d.socket, 8 << 20).is_err());
}

#[test]
fn vspd_serves_under_the_seccomp_filter_unless_told_not_to() {
    // The launcher sets the filter to kill vspd on any call it does not allow, so every other
    // test here also shows the allowlist covers what serving does.
    let mut d = vspd("seccomp", "", &[]);
    let g = guest(&d.socket);
    verified_io(&g.disk, 1);
    assert_eq!(d.status_field("Seccomp:"), 2, "vspd runs under a filter");
    assert!(d.try_wait().is_none(), "vspd died");
    drop(g);
    stop_in_bounded_time(&mut d);

    let d = vspd("no-seccomp", "", &["--no-seccomp"]);
    let g = guest(&d.socket);
    verified_io(&g.disk, 2);
    assert_eq!(
        d.status_field("Seccomp:"),
        0,
        "--no-seccomp installs no filter"
    );
}

const LIST_AS_NOBODY: &str = "VSPD_TEST_LIST_OFFERS_SOCKET";

/// The offers a front end running as uid 65534 sees from `d`, by class: this test binary
/// re-run as nobody (`as_nobody_list_offers`).
fn offers_seen_by_nobody(d: &AsNobody) -> Vec<String> {
    use std::os::unix::process::CommandExt;
    let out = Command::new(d.dir.join("tests"))
        .args([
            "--exact",
            "as_nobody_list_offers",
            "--ignored",
            "--nocapture",
        ])
        .env(LIST_AS_NOBODY, &d.socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("offers:"))
        .unwrap_or_else(|| panic!("no offers line: {text}"));
    line.split_whitespace().map(str::to_string).collect()
}

#[test]
#[ignore = "run as another uid by each_front_end_sees_only_the_devices_configured_for_it"]
fn as_nobody_list_offers() {
    let Some(socket) = std::env::var_os(LIST_AS_NOBODY) else {
        return;
    };
    println!(
        "offers: {}",
        offers_seen_by_root(Path::new(&socket)).join(" ")
    );
}

/// The offers a front end of this process's uid sees, by class.
fn offers_seen_by_root(socket: &Path) -> Vec<&'static str> {
    let (front, messages) = Loopback::connect(socket, 8 << 20).unwrap();
    let mut client = Client::connect(Arc::new(front), messages, 0, &SUPPORTED_VERSIONS).unwrap();
    let mut classes: Vec<&str> = client
        .request_offers()
        .unwrap()
        .iter()
        .map(|o| o.class_name())
        .collect();
    classes.sort();
    client.unload().unwrap();
    classes
}

#[test]
fn each_front_end_sees_only_the_devices_configured_for_it() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run front ends as two uids");
        return;
    }
    // a.img for nobody only, b.img for everyone, the NIC for root only; both uids may connect.
    let config = |b_uids: &str| {
        format!(
            "[[disk]]\npath = \"a.img\"\nuids = [65534]\n\
             [[disk]]\npath = \"b.img\"\n{b_uids}\
             [[nic]]\ntap = \"tap-acl0\"\nuids = [0]\n"
        )
    };
    // The file lives outside the daemon's fresh directory, so it exists before the daemon
    // reads it (readable by nobody, as the reload needs).
    let cfg = std::env::temp_dir().join(format!("vspd-acl-{}.toml", std::process::id()));
    std::fs::write(&cfg, config("")).unwrap();
    let d = AsNobody::start_with(
        "per-front-end",
        &["a.img", "b.img"],
        &["--config", cfg.to_str().unwrap(), "--allow-uid", "0"],
        &[],
    );
    assert_eq!(offers_seen_by_root(&d.socket), ["network", "scsi"]);
    assert_eq!(offers_seen_by_nobody(&d), ["scsi", "scsi"]);

    // A root guest stays connected while b.img is restricted to nobody on reload: its offer is
    // rescinded from that guest only.
    let (front, messages) = Loopback::connect(&d.socket, 8 << 20).unwrap();
    let mut root = Client::connect(Arc::new(front), messages, 0, &SUPPORTED_VERSIONS).unwrap();
    let before = root.request_offers().unwrap();
    let b = before
        .iter()
        .find(|o| o.class_name() == "scsi")
        .unwrap()
        .relid;
    std::fs::write(&cfg, config("uids = [65534]\n")).unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(d.child.id() as i32).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match root.next_event(Duration::from_millis(200)).unwrap() {
            Some(Event::Rescinded(r)) if r == b => break,
            _ => assert!(Instant::now() < deadline, "b.img was not rescinded"),
        }
    }
    assert_eq!(offers_seen_by_root(&d.socket), ["network"]);
    assert_eq!(offers_seen_by_nobody(&d), ["scsi", "scsi"]);
    let _ = std::fs::remove_file(cfg);
}
