//! The VMBus control plane end to end, across processes: the real `vspd` binary serves, real
//! loopback guests (the `vsc` front end and client) connect over the partition socket.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringbuf::packet::OutgoingPacket;
use ringbuf::socket::SeqPacket;
use vmbus_proto::channel::{
    Guid, InitiateContact, Message, MessageHeader, MessageType, VmbusVersion,
};
use vmbus_proto::storvsp::{VstorOperation, VstorPacket, REQUEST_COMPLETION_FLAG};
use vsc::client::{Client, Event, SUPPORTED_VERSIONS};
use vsc::loopback::Loopback;
use vsc::synic::{HostInterface, MessageStream};
use zerocopy::{FromZeros, IntoBytes};

mod common;

/// A running `vspd` with a TOML configuration (and two 16 MiB images, a.img and b.img, in its
/// directory), killed on drop.
struct Vspd(common::Daemon);

impl std::ops::Deref for Vspd {
    type Target = common::Daemon;
    fn deref(&self) -> &common::Daemon {
        &self.0
    }
}

impl Vspd {
    fn start(name: &str, config: &str) -> Self {
        let dir = common::fresh_dir("vspd-test", name);
        for disk in ["a.img", "b.img"] {
            std::fs::File::create(dir.join(disk))
                .unwrap()
                .set_len(16 << 20)
                .unwrap();
        }
        std::fs::write(dir.join("vspd.toml"), config).unwrap();
        Self(common::Daemon::spawn(&dir, ["--config", "vspd.toml"]).owning_dir())
    }

    fn reconfigure(&self, config: &str) {
        std::fs::write(self.dir.join("vspd.toml"), config).unwrap();
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.pid() as i32).unwrap(),
            rustix::process::Signal::HUP,
        )
        .unwrap();
    }
}

const TWO_DISKS_ONE_NIC: &str = "[[disk]]\npath = \"a.img\"\n[[disk]]\npath = \"b.img\"\nreadonly = true\n[[nic]]\ntap = \"tap-test0\"\n";

fn attach(socket: &Path) -> (Arc<Loopback>, MessageStream) {
    let (front, messages) = Loopback::connect(socket, 8 << 20).unwrap();
    (Arc::new(front), messages)
}

fn guest(socket: &Path) -> (Arc<Loopback>, Client) {
    let (front, messages) = attach(socket);
    let client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS).unwrap();
    (front, client)
}

/// Opens `relid` on a fresh ring GPADL of `pages` pages (half each way).
fn open(front: &Loopback, client: &mut Client, relid: u32, pages: usize) -> (u32, Vec<u64>) {
    let pfns = front.alloc_pages(pages).unwrap();
    let gpadl = client.create_gpadl(relid, &pfns).unwrap();
    client.open(relid, gpadl, pages as u32 / 2, 0, &[]).unwrap();
    (gpadl, pfns)
}

fn close(front: &Loopback, client: &mut Client, relid: u32, gpadl: u32, pfns: &[u64]) {
    client.close(relid).unwrap();
    client.teardown_gpadl(relid, gpadl).unwrap();
    front.free_pages(pfns);
}

#[test]
fn every_version_negotiates_and_a_refused_one_is_answered() {
    let d = Vspd::start("versions", TWO_DISKS_ONE_NIC);
    for v in SUPPORTED_VERSIONS {
        let (front, messages) = attach(&d.socket);
        let mut c = Client::connect(front, messages, 0, &[v]).unwrap();
        assert_eq!(c.version(), v);
        assert_eq!(c.request_offers().unwrap().len(), 3, "version {v:?}");
        c.unload().unwrap();
    }
    // A version the host does not speak, and a good version on the wrong connection id: each
    // gets a VersionResponse with supported = 0.
    let (front, messages) = attach(&d.socket);
    for (version, conn) in [
        (VmbusVersion::new(7, 0), 4),
        (VmbusVersion::new(1, 0), 1),
        (VmbusVersion::IRON, 1),
    ] {
        let mut m = InitiateContact::new_zeroed();
        m.header = MessageHeader::new(MessageType::INITIATE_CONTACT);
        m.vmbus_version_requested = version.0;
        front.post_message(conn, m.as_bytes()).unwrap();
        let reply = messages.recv_timeout(Duration::from_secs(10)).unwrap();
        match Message::parse(&reply).unwrap() {
            Message::VersionResponse(r) => {
                assert_eq!(r.version_supported, 0, "{version:?} on {conn}")
            }
            other => panic!("expected a VersionResponse, got {other:?}"),
        }
    }
    // The client falls back to the newest version the host accepts.
    let mut c = Client::connect(
        front,
        messages,
        0,
        &[VmbusVersion::new(7, 0), VmbusVersion::WIN10],
    )
    .unwrap();
    assert_eq!(c.version(), VmbusVersion::WIN10);
    c.unload().unwrap();
}

#[test]
fn offers_match_the_configuration_and_are_stable() {
    let d = Vspd::start("offers", TWO_DISKS_ONE_NIC);
    let (_front, mut c) = guest(&d.socket);
    let offers = c.request_offers().unwrap();
    let classes: Vec<Guid> = offers.iter().map(|o| o.interface_type).collect();
    assert_eq!(classes, [Guid::SCSI, Guid::SCSI, Guid::NETWORK]);
    assert_eq!(
        offers.iter().map(|o| o.relid).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let mut conns: Vec<u32> = offers.iter().map(|o| o.connection_id).collect();
    conns.dedup();
    assert_eq!(conns.len(), 3);
    assert!(
        conns.iter().all(|&c| c > 4),
        "channel connection ids never collide with 1..=4"
    );
    assert!(offers
        .iter()
        .all(|o| o.dedicated_interrupt && o.subchannel_index == 0));
    c.unload().unwrap();
    drop(d);
    // A restarted daemon with the same configuration offers the same instances.
    let d2 = Vspd::start("offers", TWO_DISKS_ONE_NIC);
    let (_front, mut c) = guest(&d2.socket);
    let again = c.request_offers().unwrap();
    assert_eq!(offers, again);
}

#[test]
fn each_channel_gets_an_interrupt_line_of_its_own() {
    let d = Vspd::start("direct-vps", TWO_DISKS_ONE_NIC);
    let (front, mut c) = guest(&d.socket);
    let offers = c.request_offers().unwrap();
    assert!(offers.len() >= 2);
    let open = |c: &mut Client, i: usize| {
        vsc::channel::GuestChannel::open(c, front.as_ref(), &offers[i], 4).unwrap()
    };
    let (a, b) = (open(&mut c, 0), open(&mut c, 1));
    // Each channel's interrupts go to a VP of its own (whose irqfd is the channel's eventfd),
    // not to VP 0's dispatching thread.
    assert_ne!(a.target_vp, 0);
    assert_ne!(b.target_vp, 0);
    assert_ne!(a.target_vp, b.target_vp);
    let vp_of_b = b.target_vp;
    b.close(&mut c, front.as_ref()).unwrap();
    // A closed channel's VP is lent again.
    let b2 = open(&mut c, 1);
    assert_eq!(b2.target_vp, vp_of_b);
    // The daemon delivers to that line: the host's answer to a packet reaches the channel's
    // eventfd with no front-end thread in between (storvsc: BEGIN_INITIALIZATION).
    let mut ch = b2;
    let pkt = VstorPacket::new(
        VstorOperation::BEGIN_INITIALIZATION,
        REQUEST_COMPLETION_FLAG,
        0,
    );
    ch.out
        .write(&OutgoingPacket::in_band(1, true, &[pkt.as_bytes()]))
        .unwrap();
    ch.commit_out().unwrap();
    assert!(
        ch.wait_interrupt(Duration::from_secs(5)).unwrap(),
        "no interrupt on the channel's own line"
    );
    drop(a);
    c.unload().unwrap();
}

#[test]
fn open_and_close_a_thousand_times_leaks_nothing() {
    let d = Vspd::start("cycles", TWO_DISKS_ONE_NIC);
    let (front, mut c) = guest(&d.socket);
    c.request_offers().unwrap();
    let cycle = |c: &mut Client| {
        let (g, p) = open(&front, c, 1, 8);
        close(&front, c, 1, g, &p);
    };
    for _ in 0..50 {
        cycle(&mut c);
    }
    // Main, signal, eventfd watchdog and session threads; no channel worker.
    d.eventually("the warm-up's workers are gone", |d| d.threads() == 4);
    let (fds, rss, threads) = (d.fds(), d.status_field("VmRSS:"), d.threads());
    let start = Instant::now();
    for _ in 0..1000 {
        cycle(&mut c);
    }
    let elapsed = start.elapsed();
    d.eventually("worker threads joined", |d| d.threads() == threads);
    let (fds2, rss2) = (d.fds(), d.status_field("VmRSS:"));
    println!("1000 open/close cycles in {elapsed:?}; fds {fds} -> {fds2}, RSS {rss} -> {rss2} KiB");
    assert_eq!(fds2, fds, "descriptors leaked");
    assert!(rss2 <= rss + 2048, "RSS grew from {rss} to {rss2} KiB");
    assert_eq!(front.free_page_count(), (8 << 20) / 4096 - 2);
    c.unload().unwrap();
}

#[test]
fn hot_remove_rescinds_and_hot_add_offers() {
    let d = Vspd::start("rescind", TWO_DISKS_ONE_NIC);
    let (front, mut c) = guest(&d.socket);
    let offers = c.request_offers().unwrap();
    let (_gpadl, _pfns) = open(&front, &mut c, 2, 8);
    let threads_open = d.threads();
    // Remove disk b.img: its channel is closed and rescinded; the client releases the relid.
    d.reconfigure("[[disk]]\npath = \"a.img\"\n[[nic]]\ntap = \"tap-test0\"\n");
    let ev = c.next_event(Duration::from_secs(10)).unwrap();
    assert_eq!(ev, Some(Event::Rescinded(2)));
    d.eventually("the rescinded channel's worker stops", |d| {
        d.threads() == threads_open - 1
    });
    // Add it back: offered again, with the same instance GUID.
    d.reconfigure(TWO_DISKS_ONE_NIC);
    match c.next_event(Duration::from_secs(10)).unwrap() {
        Some(Event::Offer(o)) => {
            assert_eq!(o.interface_instance, offers[1].interface_instance);
            let (g, p) = open(&front, &mut c, o.relid, 8);
            close(&front, &mut c, o.relid, g, &p);
        }
        other => panic!("expected an offer, got {other:?}"),
    }
    c.unload().unwrap();
}

#[test]
fn unload_then_reconnect() {
    let d = Vspd::start("unload", TWO_DISKS_ONE_NIC);
    let (front, messages) = attach(&d.socket);
    // Keep a second handle on the message stream's sender side alive through the front end.
    let mut c = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS).unwrap();
    c.request_offers().unwrap();
    let threads = d.threads();
    let (_g, _p) = open(&front, &mut c, 1, 8);
    let (_g3, _p3) = open(&front, &mut c, 3, 8);
    assert_eq!(d.threads(), threads + 2);
    c.unload().unwrap();
    d.eventually("unload stops every channel", |d| d.threads() == threads);
    // The same guest connects again (as after a reboot) and everything works anew. Its old
    // pages are its own business: a rebooted guest reuses its memory.
    drop(c);
    let d2 = &d;
    let (front2, mut c2) = guest(&d2.socket);
    c2.request_offers().unwrap();
    let (g, p) = open(&front2, &mut c2, 1, 8);
    close(&front2, &mut c2, 1, g, &p);
    c2.unload().unwrap();
}

#[test]
fn hostile_guest_gets_failures_and_the_other_guest_is_served() {
    let d = Vspd::start("hostile", TWO_DISKS_ONE_NIC);
    let (fa, mut a) = guest(&d.socket);
    let (fb, mut b) = guest(&d.socket);
    a.request_offers().unwrap();
    b.request_offers().unwrap();
    let (gb, pb) = open(&fb, &mut b, 1, 8);

    // Malformed: shorter than a header; an unknown type; a known type cut short.
    fa.post_message(1, &[1, 2, 3]).unwrap();
    fa.post_message(1, MessageHeader::new(MessageType(99)).as_bytes())
        .unwrap();
    fa.post_message(
        1,
        &MessageHeader::new(MessageType::OPEN_CHANNEL).as_bytes()[..8],
    )
    .unwrap();
    // A GPADL naming a page outside guest memory.
    let e = a.create_gpadl(1, &[5, 1 << 40]).unwrap_err();
    assert!(
        matches!(
            e,
            vsc::Error::Status {
                what: "GPADL creation",
                ..
            }
        ),
        "{e}"
    );
    // A ring GPADL too small for its rings (3 pages: 2 down, 1 up).
    let pfns = fa.alloc_pages(3).unwrap();
    let g = a.create_gpadl(1, &pfns).unwrap();
    let e = a.open(1, g, 2, 0, &[]).unwrap_err();
    assert!(
        matches!(
            e,
            vsc::Error::Status {
                what: "channel open",
                ..
            }
        ),
        "{e}"
    );
    // An open of a relid that does not exist.
    let e = a.open(77, g, 2, 0, &[]).unwrap_err();
    assert!(
        matches!(
            e,
            vsc::Error::Status {
                what: "channel open",
                ..
            }
        ),
        "{e}"
    );
    // An unknown GPADL.
    let e = a.open(2, 0xdead, 2, 0, &[]).unwrap_err();
    assert!(matches!(e, vsc::Error::Status { .. }), "{e}");

    // Guest A still works, and guest B was served throughout.
    let (ga, pa) = open(&fa, &mut a, 2, 8);
    close(&fa, &mut a, 2, ga, &pa);
    close(&fb, &mut b, 1, gb, &pb);
    let (gb, pb) = open(&fb, &mut b, 3, 8);
    close(&fb, &mut b, 3, gb, &pb);
    a.unload().unwrap();
    b.unload().unwrap();
}

#[test]
fn garbage_on_the_socket_closes_that_connection_only() {
    let d = Vspd::start("garbage", TWO_DISKS_ONE_NIC);
    let (fb, mut b) = guest(&d.socket);
    b.request_offers().unwrap();
    let fds = d.fds();
    for garbage in [
        &b"\xff\xff\xff\xff\x00\x00\x00\x00"[..],
        b"short",
        &[0u8; 400][..],
    ] {
        let s = SeqPacket::connect(&d.socket).unwrap();
        s.send(garbage, &[]).unwrap();
        let mut buf = [0u8; 600];
        // The daemon answers garbage by closing the connection.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match s.recv(&mut buf) {
                Ok(None) | Err(_) => break,
                Ok(Some(_)) => assert!(Instant::now() < deadline, "connection stayed open"),
            }
        }
    }
    // Descriptors passed with a message that carries none are closed too.
    let s = SeqPacket::connect(&d.socket).unwrap();
    let ev = ringbuf::Event::new().unwrap();
    s.send(
        &vmbus_proto::partition::encode(
            vmbus_proto::partition::Kind::EOM,
            &vmbus_proto::partition::Eom::default(),
        ),
        &[ev.as_fd()],
    )
    .unwrap();
    let mut buf = [0u8; 64];
    assert!(s.recv(&mut buf).unwrap().is_none());
    d.eventually("every garbage connection released", |d| d.fds() == fds);
    let (g, p) = open(&fb, &mut b, 1, 8);
    close(&fb, &mut b, 1, g, &p);
    b.unload().unwrap();
}

#[test]
fn a_vanished_front_end_releases_everything() {
    let d = Vspd::start("crash", TWO_DISKS_ONE_NIC);
    let baseline = (d.fds(), d.threads());
    {
        let (front, mut c) = guest(&d.socket);
        c.request_offers().unwrap();
        for relid in [1, 2, 3] {
            let _ = open(&front, &mut c, relid, 8);
        }
        assert!(
            d.threads() >= baseline.1 + 4,
            "a session and three channel workers"
        );
        // No unload, no close: the front end just goes away, as a crashed VMM would.
    }
    d.eventually("the session and its channels are gone", |d| {
        (d.fds(), d.threads()) == baseline
    });
}
