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
use vsc::storvsc::{Controller, Disk, IoError, Storvsc};

mod common;

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

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sense(e: IoError) -> (u8, u8) {
    match e {
        IoError::Sense { key, asc, .. } => (key, asc),
        other => panic!("expected CHECK CONDITION, got {other:?}"),
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
