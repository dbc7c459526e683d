//! The NBD server against hostile clients written here on raw sockets: clients that ask for
//! large reads and never take the replies, that pipeline thousands of flushes and trims, that
//! open connections and never finish their handshake. Each time a well-behaved client keeps
//! being served (verified I/O, within a liveness timeout) and the server's threads stay
//! bounded. The server runs in this process over a memory device.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vsc::nbd::{proto, BlockDevice, Export, IoError, Limits, NbdServer};
use vsc::nbdclient::NbdClient;

/// A device in memory; flushes and trims take `delay` (a slow disk keeps workers busy).
struct MemDevice {
    data: Mutex<Vec<u8>>,
    delay: Duration,
}

impl MemDevice {
    fn new(size: usize, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0u8; size]),
            delay,
        })
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..][..buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), IoError> {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..][..data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), IoError> {
        std::thread::sleep(self.delay);
        Ok(())
    }
    fn supports_trim(&self) -> bool {
        true
    }
    fn trim(&self, _offset: u64, _len: u64) -> Result<(), IoError> {
        std::thread::sleep(self.delay);
        Ok(())
    }
}

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "nbdh-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server running in a thread, stopped on drop.
struct Running {
    socket: PathBuf,
    stop: Arc<ringbuf::Event>,
    thread: Option<JoinHandle<Result<(), vsc::Error>>>,
    _dir: TempDir,
}

impl Running {
    fn start(tag: &str, device: Arc<MemDevice>, limits: Limits) -> Self {
        let dir = TempDir::new(tag);
        let socket = dir.0.join("nbd.sock");
        let export = Export {
            name: "disk".into(),
            description: String::new(),
            device,
        };
        let server = NbdServer::bind(&socket, vec![export])
            .unwrap()
            .with_limits(limits);
        let stop = Arc::new(ringbuf::Event::new().unwrap());
        let s = stop.clone();
        Self {
            socket,
            stop,
            thread: Some(std::thread::spawn(move || server.run(s))),
            _dir: dir,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.signal().unwrap();
        let t = self.thread.take().unwrap();
        if !std::thread::panicking() {
            t.join().unwrap().unwrap();
        }
    }
}

/// Runs `f` in a thread and waits at most `secs` for it: a hang fails the test.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: still running after {secs} s")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

/// A raw connection through the handshake (`NBD_OPT_EXPORT_NAME`), at the transmission phase.
fn raw_connect(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut opt = proto::IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&4u32.to_be_bytes());
    opt.extend_from_slice(b"disk");
    s.write_all(&opt).unwrap();
    let mut hello = [0u8; 10];
    s.read_exact(&mut hello).unwrap();
    s
}

fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    proto::Request {
        flags: 0,
        kind,
        cookie,
        offset,
        len,
    }
    .encode()
}

/// `len` bytes of a pattern that differs with `seed`.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Threads of this process now.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// `rounds` verified 4 KiB writes and reads on a fresh connection, each answered within
/// `secs` (a liveness bound).
fn good_client(socket: &Path, rounds: u64, secs: u64) {
    let socket = socket.to_owned();
    let mut c = within(secs, "the good client's handshake", move || {
        NbdClient::connect(&socket, "disk").unwrap()
    });
    for round in 0..rounds {
        let off = (round % 256) * 4096;
        let data = pattern(4096, round + 1);
        c = within(
            secs,
            &format!("the good client's round {round}"),
            move || {
                assert_eq!(c.write(off, &data, false).unwrap(), 0);
                let mut back = vec![0u8; 4096];
                assert_eq!(c.read(off, &mut back).unwrap(), 0);
                assert!(back == data, "round {round}: read back differs");
                c
            },
        );
    }
    c.disconnect();
}

#[test]
fn clients_that_never_read_their_large_reads_starve_no_other() {
    // The trigger: 8 connections each asking two 32 MiB reads and never reading the
    // replies hold 512 MiB, the whole shared budget, until the reply timeout closes them.
    let dev = MemDevice::new(64 << 20, Duration::ZERO);
    let server = Running::start("starve", dev, Limits::default());
    let hostile: Vec<UnixStream> = (0..8)
        .map(|_| {
            let mut s = raw_connect(&server.socket);
            for i in 0..2u64 {
                s.write_all(&request(proto::CMD_READ, i, i << 25, 32 << 20))
                    .unwrap();
            }
            s
        })
        .collect();
    // Let the hostile reads take their budget.
    std::thread::sleep(Duration::from_millis(500));
    // A well-behaved client is served all the while, from its connection's reserve.
    good_client(&server.socket, 64, 10);
    // The hostile connections are still open, their replies untaken.
    drop(hostile);
}

#[test]
fn a_client_that_never_reads_is_closed_after_one_reply_timeout() {
    // A 32 MiB reply is far more than a socket buffer: the worker writing it finds the socket
    // full once, and the connection ends one reply timeout later (3 s), not one per partial
    // write (the first partial write returned after one timeout, the next failed after
    // another: 6 s here, 120 s by default).
    let dev = MemDevice::new(64 << 20, Duration::ZERO);
    let limits = Limits {
        reply_timeout: Duration::from_secs(3),
        ..Limits::default()
    };
    let server = Running::start("timeout", dev, limits);
    let mut s = raw_connect(&server.socket);
    s.write_all(&request(proto::CMD_READ, 1, 0, 32 << 20))
        .unwrap();
    s.write_all(&request(proto::CMD_READ, 2, 32 << 20, 32 << 20))
        .unwrap();
    std::thread::sleep(Duration::from_millis(4500));
    // Everything the server sent before it gave up, then the end of the stream (or a reset).
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection is still open after the reply timeout: {e}"),
        }
    }
    assert!(got < 32 << 20, "{got} bytes: a whole reply was sent");
}

#[test]
fn pipelined_flushes_and_trims_keep_threads_bounded_and_are_all_answered() {
    // 8 connections pipelining 5000 flushes and trims each to a slow disk: each would start
    // its 64 workers before (over 500 threads); the server's cap holds them to 16.
    const CONNECTIONS: usize = 8;
    const REQUESTS: u64 = 5000;
    const MAX_WORKERS: usize = 16;
    let dev = MemDevice::new(1 << 20, Duration::from_millis(1));
    let limits = Limits {
        workers_per_connection: 64,
        max_workers: MAX_WORKERS,
        ..Limits::default()
    };
    let server = Running::start("flood", dev, limits);
    let before = threads();
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let mut s = raw_connect(&server.socket);
            let mut r = s.try_clone().unwrap();
            // The writer pipelines everything at once (it blocks when the server stops reading).
            let writer = std::thread::spawn(move || {
                let mut all = Vec::with_capacity(REQUESTS as usize * 28);
                for i in 0..REQUESTS {
                    let kind = if i % 2 == 0 {
                        proto::CMD_FLUSH
                    } else {
                        proto::CMD_TRIM
                    };
                    all.extend_from_slice(&request(kind, i, (i % 256) * 4096, 4096));
                }
                s.write_all(&all).unwrap();
            });
            let reader = std::thread::spawn(move || {
                r.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut seen = vec![false; REQUESTS as usize];
                for _ in 0..REQUESTS {
                    let mut h = [0u8; 16];
                    r.read_exact(&mut h).unwrap();
                    assert_eq!(&h[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
                    assert_eq!(&h[4..8], &[0; 4], "a request failed");
                    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
                    assert!(!std::mem::replace(&mut seen[cookie as usize], true));
                }
            });
            (writer, reader)
        })
        .collect();
    // The clients' own threads: two each, and a liveness helper.
    let mut most = 0;
    while clients.iter().any(|(_, r)| !r.is_finished()) {
        most = most.max(threads());
        std::thread::sleep(Duration::from_millis(5));
    }
    for (w, r) in clients {
        w.join().unwrap();
        r.join().unwrap();
    }
    let server_threads = most.saturating_sub(before + 2 * CONNECTIONS);
    println!("threads: {before} before, {most} at most ({server_threads} for the server)");
    // A thread per connection and the workers.
    assert!(
        server_threads <= CONNECTIONS + MAX_WORKERS,
        "{server_threads} server threads for {CONNECTIONS} connections"
    );
    good_client(&server.socket, 4, 10);
}

/// Connects and reads the greeting, then says nothing more.
fn dawdle(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s
}

/// Whether the server closed `s` (end of stream, or a reset) within its read timeout.
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn handshakes_that_never_finish_hold_no_place_of_a_served_client() {
    let limits = Limits {
        max_connections: 4,
        max_handshakes: 4,
        handshake_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let server = Running::start("slowhs", MemDevice::new(1 << 20, Duration::ZERO), limits);
    // As many dawdlers as there are connections (and handshakes) allowed.
    let mut dawdlers: Vec<UnixStream> = (0..4).map(|_| dawdle(&server.socket)).collect();
    std::thread::sleep(Duration::from_millis(200));
    // A good client is served at once: its handshake takes the oldest dawdler's place.
    good_client(&server.socket, 4, 10);
    dawdlers[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(closed(&mut dawdlers[0]), "the oldest dawdler was kept");
    // More served clients, with dawdlers about: all served (three: the first good client may
    // still count as served while its connection's thread ends).
    let socket = server.socket.clone();
    let served: Vec<NbdClient> = within(10, "three served clients", move || {
        (0..3)
            .map(|_| NbdClient::connect(&socket, "disk").unwrap())
            .collect()
    });
    for mut c in served {
        let mut b = vec![0u8; 4096];
        assert_eq!(c.read(0, &mut b).unwrap(), 0);
        c.disconnect();
    }
}

#[test]
fn a_handshake_that_trickles_is_closed_at_the_handshake_deadline() {
    let limits = Limits {
        handshake_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let server = Running::start("trickle", MemDevice::new(1 << 20, Duration::ZERO), limits);
    let mut s = dawdle(&server.socket);
    let start = Instant::now();
    // The client flags and an NBD_OPT_LIST header, one byte every 300 ms: each byte well within
    // any per-read timeout, the whole far beyond the deadline.
    let mut bytes = (proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    bytes.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&proto::OPT_LIST.to_be_bytes());
    bytes.extend_from_slice(&0u32.to_be_bytes());
    let mut refused = false;
    for b in bytes {
        if s.write_all(&[b]).is_err() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        if start.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(
        refused || closed(&mut s),
        "the trickling handshake was kept"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "closed only after {:?}",
        start.elapsed()
    );
}

#[test]
fn the_socket_is_created_private_whatever_the_umask() {
    // With a umask of 0 a socket bound and then chmod'ed is 0777 until the chmod. The server's
    // file must have mode 0600 from the moment it exists: it is 0600 once bound, and no change
    // of attributes (inotify's IN_ATTRIB, which a chmod raises) happened to any file in the
    // directory since the watch began, so it never had another mode.
    use rustix::fs::inotify;
    let dir = TempDir::new("mode");
    let socket = dir.0.join("nbd.sock");
    let watch =
        inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
    inotify::add_watch(
        &watch,
        &dir.0,
        inotify::WatchFlags::CREATE | inotify::WatchFlags::ATTRIB | inotify::WatchFlags::MOVED_TO,
    )
    .unwrap();
    let old = rustix::process::umask(rustix::fs::Mode::empty());
    let export = Export {
        name: "disk".into(),
        description: String::new(),
        device: MemDevice::new(1 << 20, Duration::ZERO),
    };
    let server = NbdServer::bind(&socket, vec![export]);
    rustix::process::umask(old);
    let server = server.unwrap();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
    let mut events = inotify::Reader::new(&watch, &mut buf);
    let mut created = 0;
    loop {
        match events.next() {
            Ok(e) => {
                let name = e.file_name().map(|n| n.to_string_lossy().into_owned());
                assert!(
                    !e.events().contains(inotify::ReadFlags::ATTRIB),
                    "{name:?}: its attributes changed after it was created"
                );
                if e.events().contains(inotify::ReadFlags::CREATE) {
                    created += 1;
                }
            }
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => panic!("inotify: {e}"),
        }
    }
    assert!(created > 0, "no file creation seen");
    drop(server);
}
