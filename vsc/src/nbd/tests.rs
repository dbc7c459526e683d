//! Protocol tests over socketpairs: the handshake with well-formed and hostile input, request
//! checking, pipelining, and the listener's life cycle.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use proptest::prelude::*;

use super::proto::*;
use super::transmission::Budget;
use super::*;
use crate::queue::{QueueSource, SourcePoll, SourceWaker};

/// A device in memory, optionally slow (to see requests overlap), optionally with an event
/// loop (`event`: connections are then read by [`QueueSource`]s, as on a storvsc disk).
struct MemDevice {
    data: Mutex<Vec<u8>>,
    ro: bool,
    bs: u32,
    delay: Duration,
    busy: AtomicUsize,
    max_busy: AtomicUsize,
    flushes: AtomicUsize,
    event: bool,
    hooks: Arc<Mutex<Vec<(usize, BatchFlush)>>>,
    /// Sources attached (event mode).
    sources: AtomicUsize,
    /// An offset whose asynchronous read completes with data that fails to be copied out.
    uncopyable: Option<u64>,
}

/// Unregisters a [`MemDevice`] batch hook.
struct HookGuard(Arc<Mutex<Vec<(usize, BatchFlush)>>>, usize);

impl Drop for HookGuard {
    fn drop(&mut self) {
        self.0.lock().unwrap().retain(|(id, _)| *id != self.1);
    }
}

/// The event loop of a [`MemDevice`]: a thread per source that polls it, then runs the batch
/// hooks, and waits as a storvsc queue thread does (for the descriptor, or a millisecond).
fn event_loop(mut source: Box<dyn QueueSource>, hooks: Arc<Mutex<Vec<(usize, BatchFlush)>>>) {
    loop {
        let state = source.poll();
        let list: Vec<BatchFlush> = hooks
            .lock()
            .unwrap()
            .iter()
            .map(|(_, h)| h.clone())
            .collect();
        for h in list {
            h();
        }
        match state {
            SourcePoll::Done => return,
            SourcePoll::Progress => {}
            SourcePoll::Soon => std::thread::sleep(Duration::from_millis(1)),
            SourcePoll::Readable if source.busy() => std::thread::sleep(Duration::from_millis(1)),
            SourcePoll::Readable => {
                use rustix::event::{poll, PollFd, PollFlags, Timespec};
                let mut fds = [PollFd::from_borrowed_fd(source.fd(), PollFlags::IN)];
                let ts = Timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                let _ = poll(&mut fds, Some(&ts));
            }
        }
    }
}

impl MemDevice {
    fn new(size: usize) -> Self {
        Self {
            data: Mutex::new((0..size).map(|i| (i % 251) as u8).collect()),
            ro: false,
            bs: 1,
            delay: Duration::ZERO,
            busy: AtomicUsize::new(0),
            max_busy: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            event: false,
            hooks: Arc::default(),
            sources: AtomicUsize::new(0),
            uncopyable: None,
        }
    }

    /// With an event loop (or not).
    fn evented(mut self, event: bool) -> Self {
        self.event = event;
        self
    }

    fn enter(&self) {
        let n = self.busy.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_busy.fetch_max(n, Ordering::SeqCst);
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
    }

    fn leave(&self) {
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.ro
    }
    fn block_size(&self) -> u32 {
        self.bs
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.enter();
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        drop(d);
        self.leave();
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), IoError> {
        self.enter();
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        drop(d);
        self.leave();
        Ok(())
    }
    fn flush(&self) -> Result<(), IoError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn async_limit(&self) -> u32 {
        if self.event {
            MAX_REQUEST
        } else {
            0
        }
    }
    fn read_async(&self, offset: u64, len: u32, done: ReadDone) {
        /// Data that copies a few bytes, then fails.
        struct Uncopyable(usize);
        impl ReadData for Uncopyable {
            fn len(&self) -> usize {
                self.0
            }
            fn append_to(&self, dst: &mut Vec<u8>) -> Result<(), IoError> {
                dst.extend_from_slice(b"partial");
                Err(IoError::Io)
            }
        }
        if self.uncopyable == Some(offset) {
            return done(Ok(&Uncopyable(len as usize)));
        }
        let mut buf = vec![0u8; len as usize];
        match self.read(offset, &mut buf) {
            Ok(()) => done(Ok(&buf)),
            Err(e) => done(Err(e)),
        }
    }
    fn batch_hook(&self, flush: BatchFlush) -> Option<Box<dyn std::any::Any + Send>> {
        if !self.event {
            return None;
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        self.hooks.lock().unwrap().push((id, flush));
        Some(Box::new(HookGuard(self.hooks.clone(), id)))
    }
    fn attach_source(
        &self,
        source: Box<dyn QueueSource>,
    ) -> Result<SourceWaker, Box<dyn QueueSource>> {
        if !self.event {
            return Err(source);
        }
        self.sources.fetch_add(1, Ordering::SeqCst);
        let hooks = self.hooks.clone();
        std::thread::spawn(move || event_loop(source, hooks));
        // The loop looks at `busy` before it waits (and waits at most 100 ms).
        Ok(Arc::new(|| {}))
    }
}

fn export(name: &str, dev: MemDevice) -> Export {
    Export {
        name: name.into(),
        description: format!("the {name} disk"),
        device: Arc::new(dev),
    }
}

/// Serves one connection on a socketpair; returns the client end.
fn connect(exports: Vec<Export>) -> (UnixStream, JoinHandle<std::io::Result<()>>) {
    connect_with(exports, Limits::default())
}

/// [`connect`] with other limits.
fn connect_with(
    exports: Vec<Export>,
    limits: Limits,
) -> (UnixStream, JoinHandle<std::io::Result<()>>) {
    let (client, server) = UnixStream::pair().unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let t = std::thread::spawn(move || serve_stream(&server, &exports, &limits));
    (client, t)
}

fn read_u16(s: &mut UnixStream) -> u16 {
    let mut b = [0; 2];
    s.read_exact(&mut b).unwrap();
    u16::from_be_bytes(b)
}
fn read_u32(s: &mut UnixStream) -> u32 {
    let mut b = [0; 4];
    s.read_exact(&mut b).unwrap();
    u32::from_be_bytes(b)
}
fn read_u64(s: &mut UnixStream) -> u64 {
    let mut b = [0; 8];
    s.read_exact(&mut b).unwrap();
    u64::from_be_bytes(b)
}

/// Reads the greeting and sends the client flags.
fn greet(s: &mut UnixStream, cflags: u32) {
    assert_eq!(read_u64(s), NBDMAGIC);
    assert_eq!(read_u64(s), IHAVEOPT);
    assert_eq!(read_u16(s), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&cflags.to_be_bytes()).unwrap();
}

fn send_option(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// Reads one option reply: (type, data).
fn option_reply(s: &mut UnixStream, opt: u32) -> (u32, Vec<u8>) {
    assert_eq!(read_u64(s), OPTION_REPLY_MAGIC);
    assert_eq!(read_u32(s), opt);
    let kind = read_u32(s);
    let len = read_u32(s);
    let mut d = vec![0; len as usize];
    s.read_exact(&mut d).unwrap();
    (kind, d)
}

fn go_data(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

/// Negotiates with `NBD_OPT_GO`; returns (size, transmission flags, block sizes).
fn go(s: &mut UnixStream, name: &str) -> (u64, u16, (u32, u32, u32)) {
    greet(s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    send_option(s, OPT_GO, &go_data(name, &[INFO_BLOCK_SIZE, INFO_NAME]));
    let (mut size, mut flags, mut bs) = (None, None, None);
    loop {
        let (kind, d) = option_reply(s, OPT_GO);
        match kind {
            REP_ACK => break,
            REP_INFO => match u16::from_be_bytes([d[0], d[1]]) {
                INFO_EXPORT => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap()));
                    flags = Some(u16::from_be_bytes(d[10..12].try_into().unwrap()));
                }
                INFO_BLOCK_SIZE => {
                    let f = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                    bs = Some((f(2), f(6), f(10)));
                }
                INFO_NAME => assert!(name.is_empty() || &d[2..] == name.as_bytes()),
                other => panic!("unexpected info {other}"),
            },
            other => panic!("unexpected reply {other:#x}"),
        }
    }
    (size.unwrap(), flags.unwrap(), bs.unwrap())
}

fn request(s: &mut UnixStream, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
    let r = Request {
        flags,
        kind,
        cookie,
        offset,
        len,
    };
    s.write_all(&r.encode()).unwrap();
}

/// Reads a simple reply header: (error, cookie).
fn reply(s: &mut UnixStream) -> (u32, u64) {
    assert_eq!(read_u32(s), SIMPLE_REPLY_MAGIC);
    (read_u32(s), read_u64(s))
}

/// Whether the server closed the connection (EOF, or a reset).
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn go_read_write_flush_disc_threaded() {
    go_read_write_flush_disc(false);
}

#[test]
fn go_read_write_flush_disc_on_an_event_loop() {
    go_read_write_flush_disc(true);
}

fn go_read_write_flush_disc(event: bool) {
    let dev = Arc::new(MemDevice::new(1 << 20).evented(event));
    let exports = vec![Export {
        name: "a".into(),
        description: String::new(),
        device: dev.clone(),
    }];
    let (mut s, t) = connect(exports);
    let (size, flags, bs) = go(&mut s, "");
    assert_eq!(size, 1 << 20);
    assert_eq!(
        flags,
        FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_CAN_MULTI_CONN
    );
    assert_eq!(bs, (1, 4096, 32 << 20));

    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    request(&mut s, CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 8192);
    s.write_all(&data).unwrap();
    assert_eq!(reply(&mut s), (0, 1));
    request(&mut s, CMD_READ, 0, 2, 4096, 8192);
    assert_eq!(reply(&mut s), (0, 2));
    let mut back = vec![0; 8192];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, data);

    request(&mut s, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 3, 4096, 100);
    assert_eq!(reply(&mut s), (0, 3));
    request(&mut s, CMD_READ, 0, 4, 4096, 101);
    assert_eq!(reply(&mut s), (0, 4));
    let mut back = vec![0; 101];
    s.read_exact(&mut back).unwrap();
    assert!(back[..100].iter().all(|&b| b == 0));
    assert_eq!(back[100], data[100]);

    request(&mut s, CMD_FLUSH, 0, 5, 0, 0);
    assert_eq!(reply(&mut s), (0, 5));
    assert_eq!(dev.flushes.load(Ordering::SeqCst), 1);

    request(&mut s, CMD_DISC, 0, 6, 0, 0);
    assert!(closed(&mut s));
    t.join().unwrap().unwrap();
}

#[test]
fn refused_requests_keep_the_connection_threaded() {
    refused_requests_keep_the_connection(false);
}

#[test]
fn refused_requests_keep_the_connection_on_an_event_loop() {
    refused_requests_keep_the_connection(true);
}

fn refused_requests_keep_the_connection(event: bool) {
    let (mut s, t) = connect(vec![export("a", MemDevice::new(1 << 16).evented(event))]);
    go(&mut s, "a");
    let cases: &[(u16, u16, u64, u32, u32)] = &[
        (CMD_READ, 0, 1 << 16, 1, EINVAL),               // past the end
        (CMD_READ, 0, u64::MAX - 10, 100, EINVAL),       // offset + length overflows
        (CMD_READ, 0, 0, 0, EINVAL),                     // empty
        (CMD_READ, 0, 0, MAX_REQUEST + 1, EINVAL),       // too large
        (CMD_READ, CMD_FLAG_DF, 0, 512, EINVAL),         // flag not negotiated
        (CMD_READ, 1 << 15, 0, 512, EINVAL),             // unknown flag
        (CMD_TRIM, 0, 0, 512, EINVAL),                   // not advertised
        (CMD_CACHE, 0, 0, 512, EINVAL),                  // unknown command
        (CMD_BLOCK_STATUS, 0, 0, 512, EINVAL),           // not negotiated
        (0x4242, 0, 0, 512, EINVAL),                     // unknown command
        (CMD_WRITE_ZEROES, 0, (1 << 16) - 1, 2, ENOSPC), // past the end
        (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 2, EINVAL),
    ];
    for (i, &(kind, flags, offset, len, errno)) in cases.iter().enumerate() {
        request(&mut s, kind, flags, i as u64, offset, len);
        assert_eq!(reply(&mut s), (errno, i as u64), "case {i}");
    }
    // A refused write's payload is skipped, and the stream stays in step.
    request(&mut s, CMD_WRITE, 0, 100, (1 << 16) - 8, 16);
    s.write_all(&[0xee; 16]).unwrap();
    assert_eq!(reply(&mut s), (ENOSPC, 100));
    request(&mut s, CMD_READ, 0, 101, 0, 4);
    assert_eq!(reply(&mut s), (0, 101));
    let mut b = [0; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b, [0, 1, 2, 3]);
    drop(s);
    t.join().unwrap().unwrap();
}

#[test]
fn read_only_export_refuses_writes_threaded() {
    read_only_export_refuses_writes(false);
}

#[test]
fn read_only_export_refuses_writes_on_an_event_loop() {
    read_only_export_refuses_writes(true);
}

fn read_only_export_refuses_writes(event: bool) {
    let mut dev = MemDevice::new(1 << 16).evented(event);
    dev.ro = true;
    let (mut s, t) = connect(vec![export("ro", dev)]);
    let (_, flags, _) = go(&mut s, "ro");
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
    request(&mut s, CMD_WRITE, 0, 1, 0, 512);
    s.write_all(&[1; 512]).unwrap();
    assert_eq!(reply(&mut s), (EPERM, 1));
    request(&mut s, CMD_WRITE_ZEROES, 0, 2, 0, 512);
    assert_eq!(reply(&mut s), (EPERM, 2));
    request(&mut s, CMD_TRIM, 0, 3, 0, 512);
    assert_eq!(reply(&mut s), (EPERM, 3));
    request(&mut s, CMD_READ, 0, 4, 0, 2);
    assert_eq!(reply(&mut s), (0, 4));
    let mut b = [0; 2];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b, [0, 1]);
    request(&mut s, CMD_DISC, 0, 5, 0, 0);
    t.join().unwrap().unwrap();
}

#[test]
fn alignment_is_enforced_threaded() {
    alignment_is_enforced(false);
}

#[test]
fn alignment_is_enforced_on_an_event_loop() {
    alignment_is_enforced(true);
}

fn alignment_is_enforced(event: bool) {
    let mut dev = MemDevice::new(1 << 16).evented(event);
    dev.bs = 512;
    let (mut s, t) = connect(vec![export("a", dev)]);
    let (_, _, bs) = go(&mut s, "a");
    assert_eq!(bs, (512, 4096, 32 << 20));
    request(&mut s, CMD_READ, 0, 1, 1, 512);
    assert_eq!(reply(&mut s), (EINVAL, 1));
    request(&mut s, CMD_READ, 0, 2, 512, 100);
    assert_eq!(reply(&mut s), (EINVAL, 2));
    request(&mut s, CMD_READ, 0, 3, 512, 512);
    assert_eq!(reply(&mut s), (0, 3));
    let mut b = [0; 512];
    s.read_exact(&mut b).unwrap();
    drop(s);
    t.join().unwrap().unwrap();
}

#[test]
fn bad_request_magic_disconnects_threaded() {
    bad_request_magic_disconnects(false);
}

#[test]
fn bad_request_magic_disconnects_on_an_event_loop() {
    bad_request_magic_disconnects(true);
}

fn bad_request_magic_disconnects(event: bool) {
    let (mut s, t) = connect(vec![export("a", MemDevice::new(4096).evented(event))]);
    go(&mut s, "a");
    s.write_all(&[0x55; REQUEST_LEN]).unwrap();
    assert!(closed(&mut s));
    assert!(t.join().unwrap().is_err());
}

#[test]
fn requests_are_pipelined() {
    let mut dev = MemDevice::new(1 << 20);
    dev.delay = Duration::from_millis(50);
    let dev = Arc::new(dev);
    let exports = vec![Export {
        name: "slow".into(),
        description: String::new(),
        device: dev.clone(),
    }];
    let (mut s, t) = connect(exports);
    go(&mut s, "slow");
    for i in 0..8u64 {
        request(&mut s, CMD_READ, 0, i, i * 4096, 4096);
    }
    let mut seen = Vec::new();
    for _ in 0..8 {
        let (err, cookie) = reply(&mut s);
        assert_eq!(err, 0);
        let mut b = vec![0; 4096];
        s.read_exact(&mut b).unwrap();
        let off = cookie as usize * 4096;
        assert!(b
            .iter()
            .enumerate()
            .all(|(j, &x)| x == ((off + j) % 251) as u8));
        seen.push(cookie);
    }
    seen.sort();
    assert_eq!(seen, (0..8).collect::<Vec<_>>());
    assert!(
        dev.max_busy.load(Ordering::SeqCst) > 1,
        "no two requests overlapped"
    );
    drop(s);
    t.join().unwrap().unwrap();
}

#[test]
fn list_info_and_errors() {
    let (mut s, t) = connect(vec![
        export("first", MemDevice::new(4096)),
        export("second", MemDevice::new(8192)),
    ]);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);

    send_option(&mut s, OPT_LIST, &[]);
    for (name, desc) in [("first", "the first disk"), ("second", "the second disk")] {
        let (kind, d) = option_reply(&mut s, OPT_LIST);
        assert_eq!(kind, REP_SERVER);
        let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
        assert_eq!(&d[4..4 + n], name.as_bytes());
        assert_eq!(&d[4 + n..], desc.as_bytes());
    }
    assert_eq!(option_reply(&mut s, OPT_LIST).0, REP_ACK);
    send_option(&mut s, OPT_LIST, b"x");
    assert_eq!(option_reply(&mut s, OPT_LIST).0, REP_ERR_INVALID);

    send_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(option_reply(&mut s, OPT_STRUCTURED_REPLY).0, REP_ERR_UNSUP);
    send_option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(option_reply(&mut s, OPT_STARTTLS).0, REP_ERR_UNSUP);
    send_option(&mut s, 0xdead, &[1, 2, 3]);
    assert_eq!(option_reply(&mut s, 0xdead).0, REP_ERR_UNSUP);

    send_option(&mut s, OPT_INFO, &go_data("nope", &[]));
    assert_eq!(option_reply(&mut s, OPT_INFO).0, REP_ERR_UNKNOWN);
    let mut bad = go_data("second", &[INFO_NAME]);
    bad.pop();
    send_option(&mut s, OPT_INFO, &bad);
    assert_eq!(option_reply(&mut s, OPT_INFO).0, REP_ERR_INVALID);
    let mut liar = go_data("second", &[]);
    liar[3] = 200; // name length beyond the data
    send_option(&mut s, OPT_GO, &liar);
    assert_eq!(option_reply(&mut s, OPT_GO).0, REP_ERR_INVALID);
    send_option(&mut s, OPT_GO, &go_data(&"n".repeat(MAX_STRING + 1), &[]));
    assert_eq!(option_reply(&mut s, OPT_GO).0, REP_ERR_TOO_BIG);

    send_option(&mut s, OPT_INFO, &go_data("second", &[INFO_DESCRIPTION]));
    let (kind, d) = option_reply(&mut s, OPT_INFO);
    assert_eq!((kind, &d[..2]), (REP_INFO, &INFO_EXPORT.to_be_bytes()[..]));
    assert_eq!(u64::from_be_bytes(d[2..10].try_into().unwrap()), 8192);
    let (kind, d) = option_reply(&mut s, OPT_INFO);
    assert_eq!(kind, REP_INFO);
    assert_eq!(&d[2..], b"the second disk");
    let (kind, d) = option_reply(&mut s, OPT_INFO);
    assert_eq!(
        (kind, &d[..2]),
        (REP_INFO, &INFO_BLOCK_SIZE.to_be_bytes()[..])
    );
    assert_eq!(option_reply(&mut s, OPT_INFO).0, REP_ACK);

    send_option(&mut s, OPT_ABORT, &[]);
    assert_eq!(option_reply(&mut s, OPT_ABORT).0, REP_ACK);
    assert!(closed(&mut s));
    t.join().unwrap().unwrap();
}

#[test]
fn export_name_with_and_without_zeroes() {
    for no_zeroes in [false, true] {
        let (mut s, t) = connect(vec![
            export("first", MemDevice::new(4096)),
            export("second", MemDevice::new(8192)),
        ]);
        let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        greet(&mut s, cflags);
        send_option(&mut s, OPT_EXPORT_NAME, b"second");
        assert_eq!(read_u64(&mut s), 8192);
        assert_ne!(read_u16(&mut s) & FLAG_HAS_FLAGS, 0);
        if !no_zeroes {
            let mut z = [1u8; 124];
            s.read_exact(&mut z).unwrap();
            assert_eq!(z, [0; 124]);
        }
        request(&mut s, CMD_READ, 0, 9, 0, 1);
        assert_eq!(reply(&mut s), (0, 9));
        let mut b = [9; 1];
        s.read_exact(&mut b).unwrap();
        assert_eq!(b, [0]);
        request(&mut s, CMD_DISC, 0, 0, 0, 0);
        assert!(closed(&mut s));
        t.join().unwrap().unwrap();
    }
}

#[test]
fn handshake_violations_disconnect() {
    type Attack = fn(&mut UnixStream);
    let attacks: &[Attack] = &[
        // No fixed newstyle.
        |s| greet(s, 0),
        // Unknown client flag.
        |s| greet(s, FLAG_C_FIXED_NEWSTYLE | 4),
        // Bad option magic.
        |s| {
            greet(s, FLAG_C_FIXED_NEWSTYLE);
            s.write_all(&[0u8; 16]).unwrap();
        },
        // Oversized option data.
        |s| {
            greet(s, FLAG_C_FIXED_NEWSTYLE);
            let mut b = IHAVEOPT.to_be_bytes().to_vec();
            b.extend_from_slice(&OPT_GO.to_be_bytes());
            b.extend_from_slice(&(MAX_OPTION_DATA + 1).to_be_bytes());
            s.write_all(&b).unwrap();
        },
        // Unknown export with the legacy option: no error reply exists.
        |s| {
            greet(s, FLAG_C_FIXED_NEWSTYLE);
            send_option(s, OPT_EXPORT_NAME, b"nope");
        },
        // Endless options.
        |s| {
            greet(s, FLAG_C_FIXED_NEWSTYLE);
            for _ in 0..300 {
                send_option(s, OPT_STRUCTURED_REPLY, &[]);
                if option_reply(s, OPT_STRUCTURED_REPLY).0 != REP_ERR_UNSUP {
                    break;
                }
            }
        },
    ];
    for (i, attack) in attacks.iter().enumerate() {
        let (mut s, t) = connect(vec![export("a", MemDevice::new(4096))]);
        let attacker = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attack(&mut s)));
        drop(attacker);
        assert!(closed(&mut s), "attack {i}");
        assert!(t.join().unwrap().is_err(), "attack {i}");
    }
}

/// Some well-formed option headers with arbitrary contents, then arbitrary bytes.
fn hostile_session() -> impl Strategy<Value = Vec<u8>> {
    let option = (
        prop_oneof![
            Just(OPT_GO),
            Just(OPT_INFO),
            Just(OPT_LIST),
            Just(OPT_EXPORT_NAME),
            any::<u32>()
        ],
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(opt, data)| {
            let mut b = IHAVEOPT.to_be_bytes().to_vec();
            b.extend_from_slice(&opt.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(&data);
            b
        });
    let go_default = Just({
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        let d = go_data("", &[]);
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&(d.len() as u32).to_be_bytes());
        b.extend_from_slice(&d);
        b
    });
    let request = (
        0u16..10,
        any::<u16>(),
        0u64..20_000,
        0u32..20_000,
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(kind, flags, offset, len, junk)| {
            let mut b = Request {
                flags: flags & 0x7,
                kind,
                cookie: 7,
                offset,
                len,
            }
            .encode()
            .to_vec();
            b.extend_from_slice(&junk);
            b
        });
    (
        any::<u32>().prop_map(|f| f & 3),
        prop::collection::vec(option, 0..4),
        prop::option::of(go_default),
        prop::collection::vec(request, 0..4),
        prop::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(flags, options, go, requests, tail)| {
            let mut b = flags.to_be_bytes().to_vec();
            options.iter().for_each(|o| b.extend_from_slice(o));
            if let Some(g) = go {
                b.extend_from_slice(&g);
                requests.iter().for_each(|r| b.extend_from_slice(r));
            }
            b.extend_from_slice(&tail);
            b
        })
}

/// Feeds `input` to a server connection, closes the client's sending side and checks the server
/// ends the connection without panicking.
fn feed(input: &[u8], event: bool) {
    let (mut s, t) = connect(vec![export("a", MemDevice::new(16384).evented(event))]);
    let mut reader = s.try_clone().unwrap();
    let drain = std::thread::spawn(move || closed(&mut reader));
    // The server may close early: a failed write is fine.
    let _ = s.write_all(input);
    let _ = s.shutdown(std::net::Shutdown::Write);
    assert!(
        drain.join().unwrap(),
        "the server did not close the connection"
    );
    // Errors are fine (most inputs are violations); a panic is not.
    let _ = t.join().expect("the connection thread panicked");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..512)) {
        feed(&input, false);
    }

    #[test]
    fn hostile_sessions_never_panic(input in hostile_session()) {
        feed(&input, false);
    }

    #[test]
    fn hostile_sessions_never_panic_an_event_loop(input in hostile_session()) {
        feed(&input, true);
    }
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vsc-nbd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn server_binds_privately_serves_and_stops() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("life");
    let path = dir.join("s");
    // A stale socket is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let server = NbdServer::bind(&path, vec![export("a", MemDevice::new(4096))]).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A live one is not.
    assert!(matches!(
        NbdServer::bind(&path, vec![export("a", MemDevice::new(4096))]),
        Err(crate::Error::NbdConfig(_))
    ));
    let stop = Arc::new(ringbuf::Event::new().unwrap());
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || server.run(stop2));

    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    go(&mut s, "a");
    request(&mut s, CMD_READ, 0, 1, 0, 16);
    assert_eq!(reply(&mut s), (0, 1));
    let mut b = [0; 16];
    s.read_exact(&mut b).unwrap();

    // A connection idling in transmission does not hold up the stop.
    stop.signal().unwrap();
    t.join().unwrap().unwrap();
    assert!(closed(&mut s));
    assert!(!path.exists(), "the socket is removed");

    // Not a socket: refused, left alone.
    std::fs::write(&path, b"x").unwrap();
    assert!(NbdServer::bind(&path, vec![export("a", MemDevice::new(4096))]).is_err());
    assert!(path.exists());
    // Bad configurations.
    assert!(NbdServer::bind(&dir.join("t"), vec![]).is_err());
    let dup = vec![
        export("a", MemDevice::new(4096)),
        export("a", MemDevice::new(4096)),
    ];
    assert!(NbdServer::bind(&dir.join("t"), dup).is_err());
    let mut odd = MemDevice::new(4096);
    odd.bs = 3;
    assert!(NbdServer::bind(&dir.join("t"), vec![export("a", odd)]).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn connections_beyond_the_limit_are_closed() {
    let dir = temp_dir("limit");
    let path = dir.join("s");
    let server = NbdServer::bind(&path, vec![export("a", MemDevice::new(4096))])
        .unwrap()
        .with_limits(Limits {
            max_connections: 2,
            ..Limits::default()
        });
    let stop = Arc::new(ringbuf::Event::new().unwrap());
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || server.run(stop2));
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        go(&mut s, "a");
        held.push(s);
    }
    let mut third = UnixStream::connect(&path).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert!(closed(&mut third));
    // Once one goes, a new one is served.
    drop(held.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 8];
        if s.read_exact(&mut b).is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no slot freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.signal().unwrap();
    t.join().unwrap().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn magic_numbers_match_the_specification() {
    assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
    assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    assert_eq!(NBDMAGIC, 0x4e42444d41474943);
    assert_eq!(IHAVEOPT, 0x49484156454F5054);
    assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
    assert_eq!(REQUEST_MAGIC, 0x25609513);
    assert_eq!(SIMPLE_REPLY_MAGIC, 0x67446698);
}

#[test]
fn a_budget_blocks_takers_until_bytes_are_given_back() {
    let budget = Budget::new(10);
    let first = budget.acquire(8);
    // More than the whole budget takes all of it (else it could never be served).
    let taken = Arc::new(AtomicUsize::new(0));
    let waiter = {
        let (budget, taken) = (budget.clone(), taken.clone());
        std::thread::spawn(move || {
            let p = budget.acquire(5);
            taken.store(1, Ordering::SeqCst);
            drop(p);
            let all = budget.acquire(1 << 20);
            taken.store(2, Ordering::SeqCst);
            drop(all);
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        taken.load(Ordering::SeqCst),
        0,
        "8 + 5 bytes do not fit in 10"
    );
    // Zero bytes never wait.
    drop(budget.acquire(0));
    drop(first);
    waiter.join().unwrap();
    assert_eq!(taken.load(Ordering::SeqCst), 2);
    // Everything was given back.
    assert!(budget.try_take(10));
}

#[test]
fn an_event_loop_connection_waits_for_budget_and_keeps_every_write() {
    let dev = Arc::new(MemDevice::new(4 << 20).evented(true));
    let exports = vec![Export {
        name: "a".into(),
        description: String::new(),
        device: dev.clone(),
    }];
    // Two 4 KiB requests' worth of budget: the source has to wait for replies to go out.
    let limits = Limits {
        connection_budget: 8192,
        ..Limits::default()
    };
    let (mut s, t) = connect_with(exports, limits);
    go(&mut s, "a");
    let block = |i: u64| -> Vec<u8> { (0..4096u64).map(|j| (i * 31 + j * 7) as u8).collect() };
    // 64 pipelined writes, sent before any reply is read, in one stream.
    let mut out = Vec::new();
    for i in 0..64u64 {
        out.extend_from_slice(&Request::encode(&Request {
            flags: 0,
            kind: CMD_WRITE,
            cookie: i,
            offset: i * 4096,
            len: 4096,
        }));
        out.extend_from_slice(&block(i));
    }
    // A large write (over half the source's buffer: received straight into its buffer) and
    // larger than the budget (which it then takes whole).
    let big: Vec<u8> = (0..(1u32 << 20)).map(|j| (j % 253) as u8).collect();
    out.extend_from_slice(&Request::encode(&Request {
        flags: CMD_FLAG_FUA,
        kind: CMD_WRITE,
        cookie: 1000,
        offset: 2 << 20,
        len: big.len() as u32,
    }));
    out.extend_from_slice(&big);
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&out).unwrap());
    let mut cookies: Vec<u64> = (0..65)
        .map(|_| {
            let (err, cookie) = reply(&mut s);
            assert_eq!(err, 0, "write {cookie} failed");
            cookie
        })
        .collect();
    sender.join().unwrap();
    assert_eq!(dev.sources.load(Ordering::SeqCst), 1, "no event source");
    cookies.sort();
    let mut want: Vec<u64> = (0..64).collect();
    want.push(1000);
    assert_eq!(cookies, want);
    // Everything acknowledged is in the device.
    let d = dev.data.lock().unwrap();
    for i in 0..64u64 {
        assert_eq!(&d[i as usize * 4096..][..4096], &block(i)[..], "block {i}");
    }
    assert_eq!(&d[2 << 20..][..big.len()], &big[..]);
    drop(d);
    // Flushes go to the connection's workers; their replies come back in order here.
    request(&mut s, CMD_FLUSH, 0, 2000, 0, 0);
    assert_eq!(reply(&mut s), (0, 2000));
    request(&mut s, CMD_DISC, 0, 2001, 0, 0);
    assert!(closed(&mut s));
    t.join().unwrap().unwrap();
}

#[test]
fn an_async_read_whose_data_cannot_be_copied_is_answered_eio_alone() {
    let mut dev = MemDevice::new(1 << 20).evented(true);
    dev.uncopyable = Some(8192);
    let (mut s, t) = connect(vec![export("a", dev)]);
    go(&mut s, "a");
    // Pipelined: a good read, the one whose data cannot be copied, a good read.
    for (cookie, offset) in [(1, 4096), (2, 8192), (3, 12288)] {
        request(&mut s, CMD_READ, 0, cookie, offset, 4096);
    }
    let mut answered = Vec::new();
    for _ in 0..3 {
        let (error, cookie) = reply(&mut s);
        if error == 0 {
            let mut back = vec![0; 4096];
            s.read_exact(&mut back).unwrap();
            let offset = cookie as usize * 4096;
            let want: Vec<u8> = (offset..offset + 4096).map(|i| (i % 251) as u8).collect();
            assert_eq!(back, want, "read {cookie}");
        }
        answered.push((cookie, error));
    }
    answered.sort_unstable();
    // The failed copy left no partial data in the stream: the next reply parsed.
    assert_eq!(answered, [(1, 0), (2, EIO), (3, 0)]);
    request(&mut s, CMD_DISC, 0, 4, 0, 0);
    assert!(closed(&mut s));
    t.join().unwrap().unwrap();
}

#[test]
fn an_event_loop_connection_whose_client_stops_reading_is_closed_after_the_reply_timeout() {
    let dev = Arc::new(MemDevice::new(32 << 20).evented(true));
    let exports = vec![Export {
        name: "a".into(),
        description: String::new(),
        device: dev.clone(),
    }];
    let limits = Limits {
        reply_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let (mut s, t) = connect_with(exports, limits);
    go(&mut s, "a");
    // 32 MiB of reads, far more than the socket holds; no reply is read.
    for i in 0..32u64 {
        request(&mut s, CMD_READ, 0, i, i << 20, 1 << 20);
    }
    let started = std::time::Instant::now();
    // The connection ends by itself (its thread reports the broken reply stream)...
    let r = t.join().unwrap();
    assert!(r.is_err(), "the connection ended cleanly");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300), "closed after {took:?}");
    assert!(took < Duration::from_secs(15), "closed after {took:?}");
    // ...and the client finds the stream closed after what was sent.
    assert!(closed(&mut s));
}

/// Review finding: each connection refused for lack of room was a warning, with no limit, so
/// a client reconnecting in a loop at the limit flooded the log. Now at most 10 a minute.
#[test]
fn refused_connections_do_not_flood_the_log() {
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let dir = temp_dir("log-flood");
    let path = dir.join("s");
    let server = NbdServer::bind(&path, vec![export("a", MemDevice::new(4096))])
        .unwrap()
        .with_limits(Limits {
            max_connections: 1,
            ..Limits::default()
        });
    let log = Capture::default();
    let writer = log.clone();
    let stop = Arc::new(ringbuf::Event::new().unwrap());
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || server.run(stop2))
    });
    let mut held = UnixStream::connect(&path).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    go(&mut held, "a");
    for _ in 0..200 {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        assert!(closed(&mut s));
    }
    stop.signal().unwrap();
    t.join().unwrap().unwrap();
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let warnings = text.lines().filter(|l| l.contains("WARN")).count();
    assert!(warnings <= 10, "{warnings} warnings:\n{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
