//! The NBD server against real NBD clients: qemu-img, qemu-io and qemu-nbd (Debian's qemu-utils)
//! and fio's nbd engine, over exports backed by real files.
//!
//! A missing tool fails the test when `CI=true`; elsewhere the test prints a SKIP line and returns.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::fs::{fallocate, FallocateFlags};
use vsc::nbd::{proto, BlockDevice, Export, IoError, NbdServer};

mod common {
    pub mod tools;
}
use common::tools::{have, have_qemu, run};

/// A block device over a file: positioned reads and writes, fdatasync, and hole punching.
struct FileDevice {
    file: File,
    size: u64,
    read_only: bool,
    block_size: u32,
}

impl FileDevice {
    fn open(path: &Path, read_only: bool, block_size: u32) -> Self {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .unwrap();
        let size = file.metadata().unwrap().len();
        Self {
            file,
            size,
            read_only,
            block_size,
        }
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        Ok(self.file.read_exact_at(buf, offset)?)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), IoError> {
        Ok(self.file.sync_data()?)
    }
    fn supports_trim(&self) -> bool {
        true
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        fallocate(&self.file, mode, offset, len).map_err(|e| IoError::from(std::io::Error::from(e)))
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), IoError> {
        let mode = if may_trim {
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        };
        if fallocate(&self.file, mode, offset, len).is_err() {
            self.write_zero_buffers(offset, len)?;
        }
        if fua {
            self.flush()?;
        }
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
            "nbdx-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server running in a thread; stopped (and checked to stop cleanly) on drop.
struct Running {
    socket: PathBuf,
    stop: Arc<ringbuf::Event>,
    thread: Option<JoinHandle<Result<(), vsc::Error>>>,
}

impl Running {
    fn start(socket: PathBuf, exports: Vec<Export>) -> Self {
        let server = NbdServer::bind(&socket, exports).unwrap();
        let stop = Arc::new(ringbuf::Event::new().unwrap());
        let s = stop.clone();
        let thread = Some(std::thread::spawn(move || server.run(s)));
        Self {
            socket,
            stop,
            thread,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.signal().unwrap();
        let r = self.thread.take().unwrap().join();
        if !std::thread::panicking() {
            r.expect("server thread panicked").expect("server failed");
            assert!(!self.socket.exists(), "socket left behind");
        }
    }
}

fn export(name: &str, dev: FileDevice) -> Export {
    Export {
        name: name.into(),
        description: format!("test disk {name}"),
        device: Arc::new(dev),
    }
}

/// Deterministic bytes: a xorshift stream with runs of zeroes (so writes of zeroes happen too).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    for chunk in v.chunks_mut(256 * 1024).skip(1).step_by(3) {
        chunk.fill(0);
    }
    v
}

fn make_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

#[test]
fn qemu_img_info_and_convert_round_trip() {
    if !have_qemu("qemu_img_info_and_convert_round_trip") {
        return;
    }
    let dir = TempDir::new("convert");
    let size = 8 << 20;
    let src = pattern(size, 1);
    make_file(&dir.path("disk.img"), &src);
    let srv = Running::start(
        dir.path("nbd.sock"),
        vec![export(
            "disk",
            FileDevice::open(&dir.path("disk.img"), false, 512),
        )],
    );

    let info = run(Command::new("qemu-img").args(["info", "--output=json", &srv.uri("disk")]));
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains(&format!("\"virtual-size\": {size}")),
        "qemu-img info: {info}"
    );

    // Out of the export (the empty name is the default export).
    let out = dir.path("out.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &srv.uri("")])
        .arg(&out));
    assert!(
        std::fs::read(&out).unwrap() == src,
        "export read back differs"
    );

    // Back in, with other contents.
    let src2 = pattern(size, 2);
    make_file(&dir.path("src2.img"), &src2);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(dir.path("src2.img"))
        .arg(srv.uri("disk")));
    assert!(
        std::fs::read(dir.path("disk.img")).unwrap() == src2,
        "export written differs"
    );
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(dir.path("src2.img"))
        .arg(srv.uri("disk")));
}

#[test]
fn qemu_io_write_read_flush_discard() {
    if !have_qemu("qemu_io_write_read_flush_discard") {
        return;
    }
    let dir = TempDir::new("io");
    make_file(&dir.path("disk.img"), &pattern(4 << 20, 3));
    let srv = Running::start(
        dir.path("nbd.sock"),
        vec![export(
            "d",
            FileDevice::open(&dir.path("disk.img"), false, 1),
        )],
    );
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "flush",
        "-c",
        "discard 0 64k",
        "-c",
        "write -z 1M 64k",
        "-c",
        "read -P 0 1M 64k",
        "-c",
        "write -f -P 0xcd 2M 4k",
        &srv.uri("d"),
    ]));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("fail") && !text.contains("error") && !text.contains("Pattern verification"),
        "{text}"
    );
    let disk = std::fs::read(dir.path("disk.img")).unwrap();
    assert!(disk[64 << 10..1 << 20].iter().all(|&b| b == 0xab));
    // The discard punched a hole: it reads back as zeroes.
    assert!(disk[..64 << 10].iter().all(|&b| b == 0));
    assert!(disk[1 << 20..(1 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0));
    assert!(disk[2 << 20..(2 << 20) + 4096].iter().all(|&b| b == 0xcd));
}

#[test]
fn several_clients_at_once() {
    if !have_qemu("several_clients_at_once") {
        return;
    }
    let dir = TempDir::new("multi");
    make_file(&dir.path("disk.img"), &vec![0u8; 8 << 20]);
    let srv = Running::start(
        dir.path("nbd.sock"),
        vec![export(
            "d",
            FileDevice::open(&dir.path("disk.img"), false, 512),
        )],
    );
    let clients: Vec<_> = (0..6u8)
        .map(|i| {
            let uri = srv.uri("d");
            std::thread::spawn(move || {
                let off = format!("{}M", i);
                let pat = format!("{:#x}", 0x10 + i);
                let w = format!("write -P {pat} {off} 1M");
                let r = format!("read -P {pat} {off} 1M");
                let out = run(Command::new("qemu-io")
                    .args(["-f", "raw", "-c", &w, "-c", "flush", "-c", &r, &uri]));
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                assert!(!text.contains("Pattern verification failed"), "{text}");
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let disk = std::fs::read(dir.path("disk.img")).unwrap();
    for i in 0..6usize {
        let region = &disk[i << 20..(i + 1) << 20];
        assert!(region.iter().all(|&b| b == 0x10 + i as u8), "region {i}");
    }
    assert!(disk[6 << 20..].iter().all(|&b| b == 0));
}

/// Reads until the server closes; false if it is still open after a few seconds.
fn server_closes(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 512];
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
fn garbage_client_is_dropped_while_another_works() {
    if !have_qemu("garbage_client_is_dropped_while_another_works") {
        return;
    }
    let dir = TempDir::new("garbage");
    make_file(&dir.path("disk.img"), &vec![0u8; 4 << 20]);
    let srv = Running::start(
        dir.path("nbd.sock"),
        vec![export(
            "d",
            FileDevice::open(&dir.path("disk.img"), false, 512),
        )],
    );
    // Connected and mid-handshake while a real client works.
    let mut bad = UnixStream::connect(&srv.socket).unwrap();
    let mut greeting = [0u8; 18];
    bad.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let mut idle = UnixStream::connect(&srv.socket).unwrap();

    let uri = srv.uri("d");
    let worker = std::thread::spawn(move || {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for i in 0..32 {
            cmd.args(["-c", &format!("write -P 0x5a {}k 64k", i * 64)]);
        }
        cmd.args(["-c", "read -P 0x5a 0 2M", &uri]);
        run(&mut cmd)
    });
    bad.write_all(&1u32.to_be_bytes()).unwrap();
    bad.write_all(b"this is not an NBD option header at all")
        .unwrap();
    assert!(server_closes(&mut bad), "garbage client not disconnected");

    // A transmission-phase client sending a bad request magic is dropped too.
    let mut bad2 = UnixStream::connect(&srv.socket).unwrap();
    bad2.read_exact(&mut greeting).unwrap();
    bad2.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut opt = proto::IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.push(b'd');
    bad2.write_all(&opt).unwrap();
    let mut hello = [0u8; 10];
    bad2.read_exact(&mut hello).unwrap();
    assert_eq!(u64::from_be_bytes(hello[..8].try_into().unwrap()), 4 << 20);
    bad2.write_all(&[0xff; 28]).unwrap();
    assert!(server_closes(&mut bad2), "bad request not disconnected");

    let out = worker.join().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
    let disk = std::fs::read(dir.path("disk.img")).unwrap();
    assert!(disk[..2 << 20].iter().all(|&b| b == 0x5a));
    // The idle connection never sent anything; it is still served (its greeting is there).
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    idle.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
}

#[test]
fn read_only_export_refuses_writes() {
    if !have_qemu("read_only_export_refuses_writes") {
        return;
    }
    let dir = TempDir::new("ro");
    let data = pattern(2 << 20, 4);
    make_file(&dir.path("ro.img"), &data);
    let srv = Running::start(
        dir.path("nbd.sock"),
        vec![export(
            "ro",
            FileDevice::open(&dir.path("ro.img"), true, 512),
        )],
    );
    let info = run(Command::new("qemu-img").args(["info", "--output=json", &srv.uri("ro")]));
    assert!(String::from_utf8_lossy(&info.stdout).contains("\"virtual-size\": 2097152"));
    // Reading works.
    let out = dir.path("copy.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &srv.uri("ro")])
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == data);
    // Writing does not: qemu refuses to open it read-write, or the write fails.
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 0 64k", &srv.uri("ro")])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&w.stdout).into_owned() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        !w.status.success() || text.contains("fail") || text.contains("read-only"),
        "write to a read-only export went through: {text}"
    );
    // Even a client that ignores the read-only flag gets EPERM.
    let mut s = UnixStream::connect(&srv.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut opt = proto::IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&2u32.to_be_bytes());
    opt.extend_from_slice(b"ro");
    s.write_all(&opt).unwrap();
    let mut hello = [0u8; 10];
    s.read_exact(&mut hello).unwrap();
    let flags = u16::from_be_bytes([hello[8], hello[9]]);
    assert_ne!(flags & proto::FLAG_READ_ONLY, 0);
    let req = proto::Request {
        flags: 0,
        kind: proto::CMD_WRITE,
        cookie: 42,
        offset: 0,
        len: 512,
    };
    s.write_all(&req.encode()).unwrap();
    s.write_all(&[0x11; 512]).unwrap();
    let mut rep = [0u8; 16];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(
        u32::from_be_bytes(rep[4..8].try_into().unwrap()),
        proto::EPERM
    );
    assert_eq!(u64::from_be_bytes(rep[8..16].try_into().unwrap()), 42);
    drop(s);
    assert!(
        std::fs::read(dir.path("ro.img")).unwrap() == data,
        "read-only file changed"
    );
}

#[test]
fn qemu_nbd_lists_exports() {
    if !have("qemu-nbd", &["--version"], "qemu_nbd_lists_exports") {
        return;
    }
    let dir = TempDir::new("list");
    make_file(&dir.path("a.img"), &vec![0u8; 1 << 20]);
    make_file(&dir.path("b.img"), &vec![0u8; 2 << 20]);
    let srv = Running::start(
        dir.path("nbd.sock"),
        vec![
            export("alpha", FileDevice::open(&dir.path("a.img"), false, 512)),
            export("beta", FileDevice::open(&dir.path("b.img"), true, 4096)),
        ],
    );
    let out = run(Command::new("qemu-nbd")
        .arg("--list")
        .arg("-k")
        .arg(&srv.socket));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "export: 'alpha'",
        "description: test disk alpha",
        "size:  1048576",
        "export: 'beta'",
        "size:  2097152",
        "min block: 4096",
        "max block: 33554432",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }
}

#[test]
fn fio_randrw_verify() {
    if !have("fio", &["--enghelp=nbd"], "fio_randrw_verify") {
        return;
    }
    let dir = TempDir::new("fio");
    make_file(&dir.path("disk.img"), &vec![0u8; 64 << 20]);
    let srv = Running::start(
        dir.path("nbd.sock"),
        vec![export(
            "f",
            FileDevice::open(&dir.path("disk.img"), false, 512),
        )],
    );
    let out = run(Command::new("fio")
        .args([
            "--name=nbdtest",
            "--ioengine=nbd",
            &format!("--uri={}", srv.uri("f")),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--verify=crc32c",
            "--size=32M",
            "--output-format=normal",
            // fio would leave its verify state file in the working directory.
            "--verify_state_save=0",
        ])
        .current_dir(&dir.0));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("err= 0"), "{text}");
    assert!(
        !text.contains("verify: bad") && !text.contains("verify failed"),
        "{text}"
    );
    // Every block written was read back and checked (on top of randrw's own reads).
    let issued = text
        .split("issued rwts: total=")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .expect("no issued counts");
    let mut counts = issued.split(',').map(|n| n.parse::<u64>().unwrap());
    let (reads, writes) = (counts.next().unwrap(), counts.next().unwrap());
    assert!(
        writes > 0 && reads >= writes,
        "{reads} reads, {writes} writes"
    );
}
