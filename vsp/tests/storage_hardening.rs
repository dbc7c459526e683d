//! The storage device against hostile or unlucky guests, with the real `vspd`: durability
//! settings that hold for every queue of a controller, reloads that reach open channels, guest
//! memory that is not pinned, hostile buffer descriptors, large discards.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vmbus_proto::channel::Guid;
use vsc::channel::GuestChannel;
use vsc::client::{Client, Event, Offer, SUPPORTED_VERSIONS};
use vsc::loopback::Loopback;
use vsc::storvsc::{Controller, Disk, Storvsc};

mod common;

use common::{pattern, sense};

/// A guest that opened one controller's channels and drives each as its own queue: `queues[0]`
/// is the primary channel, the others its subchannels, each a single-queue `Disk` (LUN 0), so a
/// test chooses which queue a command goes to.
struct QueueGuest {
    front: Arc<Loopback>,
    client: Client,
    offer: Offer,
    /// The primary's storvsc until its queue starts (subchannels are created through it).
    primary: Option<Storvsc>,
    queues: Vec<Arc<Disk>>,
}

impl QueueGuest {
    /// Connects with `memory` bytes of guest RAM and opens the first SCSI controller's primary
    /// channel (not started as a queue yet: see [`QueueGuest::add_subchannels`] and
    /// [`QueueGuest::start`]).
    fn connect(socket: &Path, memory: u64) -> Self {
        let (front, messages) = Loopback::connect(socket, memory).unwrap();
        let front = Arc::new(front);
        let mut client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS).unwrap();
        let offer = client
            .request_offers()
            .unwrap()
            .into_iter()
            .find(|o| o.interface_type == Guid::SCSI && o.subchannel_index == 0)
            .expect("a SCSI controller");
        let ch = GuestChannel::open(&mut client, &front, &offer, 16).unwrap();
        let primary = Storvsc::init(ch).unwrap();
        Self {
            front,
            client,
            offer,
            primary: Some(primary),
            queues: Vec::new(),
        }
    }

    /// Starts the primary channel as queue 0.
    fn start(&mut self) {
        let st = self.primary.take().expect("started once");
        let ctl = Controller::start(st, self.front.clone()).unwrap();
        self.queues.insert(0, ctl.disk(0).unwrap());
    }

    /// Asks for `count` subchannels (through the primary, before `start`) and opens each as a
    /// queue of its own.
    fn add_subchannels(&mut self, count: u16) {
        let st = self.primary.as_mut().expect("before start");
        st.create_subchannels(count).unwrap();
        let mut subs = Vec::new();
        while subs.len() < usize::from(count) {
            match self.client.next_event(Duration::from_secs(10)).unwrap() {
                Some(Event::Offer(o)) if o.interface_instance == self.offer.interface_instance => {
                    subs.push(o)
                }
                Some(_) => {}
                None => panic!("no subchannel offer"),
            }
        }
        for o in subs {
            let ch = GuestChannel::open(&mut self.client, &self.front, &o, 16).unwrap();
            let sub = self.primary.as_ref().unwrap().subchannel(ch);
            let ctl = Controller::start(sub, self.front.clone()).unwrap();
            self.queues.push(ctl.disk(0).unwrap());
        }
    }
}

/// The caching mode page's WCE bit as `disk` (one queue) reports it.
fn wce(disk: &Disk) -> bool {
    // MODE SENSE (6), DBD, page 0x08, 64 bytes: header (4), page (20).
    let data = disk
        .command(vec![0x1a, 0x08, 0x08, 0, 64, 0], vec![], 64)
        .unwrap();
    assert_eq!(data[4] & 0x3f, 0x08, "caching page: {data:?}");
    data[6] & 0x04 != 0
}

/// Turns the write cache on or off through `disk` (one queue), with MODE SELECT (6).
fn set_wce(disk: &Disk, on: bool) {
    let sense = disk
        .command(vec![0x1a, 0x08, 0x08, 0, 64, 0], vec![], 64)
        .unwrap();
    let mut list = vec![0, 0, 0, 0];
    list.extend_from_slice(&sense[4..]);
    list[4] &= 0x7f; // PS is reserved in MODE SELECT
    list[6] = (list[6] & !0x04) | if on { 0x04 } else { 0 };
    let len = list.len() as u8;
    disk.command(vec![0x15, 0x10, 0, 0, len, 0], list, 0)
        .unwrap();
}

/// Issue 9, item 5: MODE SELECT on one queue of a multi-queue controller turns the write cache
/// off for the whole disk: every queue reports it off, so every write on any queue is made
/// durable (FUA) before it is acknowledged, WRITE SAME included.
#[test]
fn write_cache_off_on_one_queue_holds_for_every_queue() {
    let dir = common::fresh_dir("vspd-hardening", "wce");
    std::fs::File::create(dir.join("a.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let d = common::Daemon::spawn(&dir, ["--disk", "path=a.img,queues=3"]).owning_dir();
    let mut g = QueueGuest::connect(&d.socket, 64 << 20);
    g.add_subchannels(2);
    g.start();
    assert_eq!(g.queues.len(), 3);
    assert!(g.queues.iter().all(|q| wce(q)), "cache on by default");
    set_wce(&g.queues[1], false);
    for (i, q) in g.queues.iter().enumerate() {
        assert!(!wce(q), "queue {i} still reports the write cache on");
    }
    // Writes and WRITE SAME still work on every queue (now durable each).
    for (i, q) in g.queues.iter().enumerate() {
        let data = pattern(i as u64 + 1, 8192);
        q.write(i as u64 * 8192, &data, false).unwrap();
        let mut back = vec![0; 8192];
        q.read(i as u64 * 8192, &mut back).unwrap();
        assert_eq!(back, data);
        // WRITE SAME (10) of a pattern over 4 blocks at LBA 1000.
        let block = pattern(77, 512);
        q.command(vec![0x41, 0, 0, 0, 0x03, 0xe8, 0, 0, 4, 0], block, 0)
            .unwrap();
    }
    set_wce(&g.queues[2], true);
    assert!(g.queues.iter().all(|q| wce(q)));
    // Another guest's channels of the same controller have their own setting.
    let mut other = QueueGuest::connect(&d.socket, 64 << 20);
    other.start();
    set_wce(&g.queues[0], false);
    assert!(
        wce(&other.queues[0]),
        "one guest's MODE SELECT changed another's"
    );
    let _ = sense;
}

/// A `vspd` with a TOML configuration and images a.img and b.img (16 MiB each) in its
/// directory; `reconfigure` rewrites the file and sends SIGHUP.
fn start_with_config(name: &str, config: &str) -> common::Daemon {
    let dir = common::fresh_dir("vspd-hardening", name);
    for f in ["a.img", "b.img"] {
        std::fs::File::create(dir.join(f))
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
    }
    std::fs::write(dir.join("vspd.toml"), config).unwrap();
    common::Daemon::spawn(&dir, ["--config", "vspd.toml"]).owning_dir()
}

fn reconfigure(d: &common::Daemon, config: &str) {
    std::fs::write(d.dir.join("vspd.toml"), config).unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(d.pid() as i32).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
}

fn image_at(d: &common::Daemon, file: &str, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    std::fs::File::open(d.dir.join(file))
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

/// Waits (up to 10 s) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 9, item 7: a SIGHUP that makes a disk read-only reaches the channels already open:
/// every queue of the open controller refuses writes from then on (DATA PROTECT / WRITE
/// PROTECTED, and MODE SENSE says WP), and nothing more reaches the image.
#[test]
fn a_disk_made_read_only_on_reload_refuses_writes_on_open_channels() {
    let d = start_with_config("reload-ro", "[[disk]]\npath = \"a.img\"\nqueues = 3\n");
    let mut g = QueueGuest::connect(&d.socket, 64 << 20);
    g.add_subchannels(2);
    g.start();
    for (i, q) in g.queues.iter().enumerate() {
        q.write(i as u64 * 4096, &pattern(i as u64 + 1, 4096), false)
            .unwrap();
    }
    reconfigure(
        &d,
        "[[disk]]\npath = \"a.img\"\nqueues = 3\nreadonly = true\n",
    );
    eventually("the open channel refuses writes", || {
        g.queues[0]
            .write(1 << 20, &pattern(9, 4096), false)
            .is_err()
    });
    for (i, q) in g.queues.iter().enumerate() {
        let e = q
            .write(i as u64 * 4096, &pattern(100, 4096), true)
            .unwrap_err();
        assert_eq!(sense(e), (0x07, 0x27), "queue {i}");
        let ms = q
            .command(vec![0x1a, 0x08, 0x08, 0, 64, 0], vec![], 64)
            .unwrap();
        assert_eq!(ms[2] & 0x80, 0x80, "queue {i}: MODE SENSE WP");
        // Reads still work, and the image holds what was written before.
        let mut back = vec![0; 4096];
        q.read(i as u64 * 4096, &mut back).unwrap();
        assert_eq!(back, pattern(i as u64 + 1, 4096));
        assert_eq!(
            image_at(&d, "a.img", i as u64 * 4096, 4096),
            pattern(i as u64 + 1, 4096)
        );
    }
    // A new guest gets the disk read-only from the start.
    let fresh = vsc::guest::StorageGuest::attach(&d.socket, 64 << 20).unwrap();
    assert!(fresh.disks[0].1.geometry().read_only);
}

/// Issue 9, item 7: a disk swapped behind the same controller on reload does not split one
/// guest's controller across two images: subchannels created after the reload serve the disk
/// their primary channel was opened with, while a guest that opens the controller afterwards
/// gets the new one.
#[test]
fn subchannels_opened_after_a_reload_serve_their_primarys_disk() {
    let d = start_with_config(
        "reload-swap",
        "[[disk]]\npath = \"a.img\"\ncontroller = 1\nqueues = 3\n",
    );
    let mut g = QueueGuest::connect(&d.socket, 64 << 20);
    reconfigure(
        &d,
        "[[disk]]\npath = \"b.img\"\ncontroller = 1\nqueues = 3\n",
    );
    // The reload is done once a new guest's writes land in b.img.
    let marker = pattern(4242, 4096);
    eventually("a new guest sees b.img", || {
        let other = QueueGuest::connect(&d.socket, 16 << 20);
        let mut other = other;
        other.start();
        other.queues[0].write(8 << 20, &marker, true).unwrap();
        image_at(&d, "b.img", 8 << 20, 4096) == marker
    });
    g.add_subchannels(2);
    g.start();
    for (i, q) in g.queues.iter().enumerate() {
        q.write(i as u64 * 4096, &pattern(i as u64 + 1, 4096), true)
            .unwrap();
    }
    for i in 0..3u64 {
        assert_eq!(
            image_at(&d, "a.img", i * 4096, 4096),
            pattern(i + 1, 4096),
            "queue {i}'s write is in a.img"
        );
        assert!(
            image_at(&d, "b.img", i * 4096, 4096)
                .iter()
                .all(|&b| b == 0),
            "queue {i}'s write reached b.img"
        );
    }
}

/// Issue 9, item 8: guest memory is not pinned per channel. A guest with 2 GiB of (sparse,
/// never touched) memory opens a four-queue controller and does I/O on every queue: vspd's
/// resident memory stays small (registering guest memory as io_uring fixed buffers pinned all
/// of it for every queue's ring: 1 GiB took vspd from 4 MB to 1.05 GB). A second guest is
/// served meanwhile.
#[test]
fn a_large_guest_memory_is_not_pinned_by_its_queues() {
    let dir = common::fresh_dir("vspd-hardening", "pin");
    std::fs::File::create(dir.join("a.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let d = common::Daemon::spawn(&dir, ["--disk", "path=a.img,queues=4"]).owning_dir();
    let rss_before = d.status_field("VmRSS:");
    let mut g = QueueGuest::connect(&d.socket, 2 << 30);
    g.add_subchannels(3);
    g.start();
    assert_eq!(g.queues.len(), 4);
    for (i, q) in g.queues.iter().enumerate() {
        let data = pattern(i as u64 + 5, 64 << 10);
        q.write(i as u64 * (64 << 10), &data, false).unwrap();
        let mut back = vec![0; 64 << 10];
        q.read(i as u64 * (64 << 10), &mut back).unwrap();
        assert_eq!(back, data);
    }
    let rss = d.status_field("VmRSS:");
    eprintln!("vspd VmRSS: {rss_before} kB before, {rss} kB with a 2 GiB guest on 4 queues");
    assert!(
        rss < rss_before + (128 << 10),
        "vspd RSS grew from {rss_before} kB to {rss} kB"
    );
    // Another guest is served meanwhile.
    let other = vsc::guest::StorageGuest::attach(&d.socket, 64 << 20).unwrap();
    let disk = &other.disks[0].1;
    disk.write(1 << 20, &pattern(99, 4096), true).unwrap();
    let mut back = vec![0; 4096];
    disk.read(1 << 20, &mut back).unwrap();
    assert_eq!(back, pattern(99, 4096));
}

/// A loop device over a sparse file on a tiny tmpfs: writes land in the device's page cache,
/// and writing them back fails once the tmpfs is full (a real writeback error). Torn down on
/// drop. `None` (the test skips) without root, loop devices or tmpfs mounts.
struct FailingDevice {
    mount: std::path::PathBuf,
    device: String,
}

impl FailingDevice {
    fn new(dir: &Path) -> Option<Self> {
        let run = |cmd: &str, args: &[&str]| -> Option<String> {
            let out = std::process::Command::new(cmd).args(args).output().ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let mount = dir.join("tiny");
        std::fs::create_dir_all(&mount).ok()?;
        let m = mount.to_str()?;
        run("mount", &["-t", "tmpfs", "-o", "size=256k", "tmpfs", m])?;
        let backing = mount.join("backing");
        let made = std::fs::File::create(&backing).and_then(|f| f.set_len(16 << 20));
        let device = made
            .ok()
            .and_then(|_| run("losetup", &["-f", "--show", backing.to_str()?]));
        let Some(device) = device else {
            let _ = run("umount", &[m]);
            return None;
        };
        Some(Self { mount, device })
    }
}

impl Drop for FailingDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.device])
            .status();
        let _ = std::process::Command::new("umount")
            .arg(&self.mount)
            .status();
    }
}

/// Issue 9, item 6, with a real writeback error: acknowledged writes that the kernel then
/// fails to write back make the next flush fail, and every flush after it too (the kernel
/// reports the error once per open file, and all queues share one); a second guest on the same
/// disk cannot be told its writes are durable either.
#[test]
fn loop_device_writeback_error() {
    let dir = common::fresh_dir("vspd-hardening", "wb-error");
    let Some(dev) = FailingDevice::new(&dir) else {
        eprintln!("SKIP: needs root, a loop device and a tmpfs mount");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    let disk_arg = format!("path={},queues=2", dev.device);
    let d = common::Daemon::spawn(&dir, ["--disk", disk_arg.as_str()]);
    let mut g = QueueGuest::connect(&d.socket, 64 << 20);
    g.add_subchannels(1);
    g.start();
    // 4 MiB acknowledged into the page cache; the tmpfs below holds 256 KiB.
    for i in 0..4u64 {
        g.queues[(i % 2) as usize]
            .write(i << 20, &pattern(i + 1, 1 << 20), false)
            .unwrap();
    }
    let first = g.queues[0].flush().unwrap_err();
    eprintln!("first flush: {first:?}");
    for (i, q) in g.queues.iter().enumerate() {
        for _ in 0..2 {
            let e = q.flush().unwrap_err();
            assert_eq!(
                sense(e),
                (0x03, 0x0c),
                "queue {i}: MEDIUM ERROR / WRITE ERROR"
            );
        }
        let e = q.write(0, &pattern(7, 4096), true).unwrap_err();
        assert_eq!(sense(e), (0x03, 0x0c), "queue {i}: a FUA write");
    }
    let mut other = QueueGuest::connect(&d.socket, 16 << 20);
    other.start();
    assert!(other.queues[0].flush().is_err(), "another guest's flush");
    drop((g, other));
    drop(d);
    drop(dev);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 9, item 12: a TRIM over 2 GiB (one UNMAP descriptor of 6 Mi blocks, as the NBD
/// export sends a 3 GiB NBD_CMD_TRIM) is done, not refused with EINVAL: the block limits page
/// says there is no maximum unmap LBA count, since the backend punches a hole of any length.
#[test]
fn a_discard_over_2_gib_is_done() {
    use vsc::storvsc::DiskOp;
    const GIB: u64 = 1 << 30;
    let dir = common::fresh_dir("vspd-hardening", "big-trim");
    let img = dir.join("big.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 * GIB)
        .unwrap();
    let d = common::Daemon::spawn(&dir, ["--disk", "path=big.img"]).owning_dir();
    let g = vsc::guest::StorageGuest::attach(&d.socket, 64 << 20).unwrap();
    let disk = &g.disks[0].1;
    if !disk.geometry().thin {
        eprintln!("SKIP: the file system here cannot punch holes");
        return;
    }
    // VPD page 0xB0: MAXIMUM UNMAP LBA COUNT is FFFFFFFFh.
    let b0 = disk
        .command(vec![0x12, 1, 0xb0, 0, 64, 0], vec![], 64)
        .unwrap();
    assert_eq!(b0[20..24], [0xff; 4]);
    let at = [0, 2 * GIB + GIB / 2, 3 * GIB + GIB / 2];
    for (i, &o) in at.iter().enumerate() {
        disk.write(o, &pattern(i as u64 + 1, 4096), false).unwrap();
    }
    disk.call(DiskOp::Discard {
        offset: 0,
        len: 3 * GIB,
    })
    .unwrap();
    let mut back = vec![0; 4096];
    for &o in &at[..2] {
        disk.read(o, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0), "discarded at {o}");
    }
    disk.read(at[2], &mut back).unwrap();
    assert_eq!(back, pattern(3, 4096), "beyond the discard");
    g.detach().unwrap();
}
