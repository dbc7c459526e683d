//! Guest memory at the trust boundary, against the real `vspd`: a front end cannot hand over
//! memory that would fault under the daemon (SIGBUS), and a guest cannot exhaust the daemon's
//! kernel mappings with scattered ring pages; meanwhile a second guest keeps doing verified I/O.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;

use ringbuf::shmem::create_memfd;
use ringbuf::socket::SeqPacket;
use vmbus_proto::channel::{Guid, InitiateContact, MessageHeader, MessageType, VmbusVersion};
use vmbus_proto::partition::{self as wire, status, vp_flags, Kind};
use vmbus_proto::synic::{HvPostMessageInput, VMBUS_POST_MESSAGE_TYPE};
use vsc::channel::GuestChannel;
use vsc::client::{Client, SUPPORTED_VERSIONS};
use vsc::loopback::Loopback;
use vsc::storvsc::{Disk, Storvsc};
use zerocopy::{FromZeros, IntoBytes};

mod common;

fn daemon(name: &str) -> common::Daemon {
    let dir = common::fresh_dir("vspd-memory", name);
    for disk in ["a.img", "b.img"] {
        std::fs::File::create(dir.join(disk))
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
    }
    common::Daemon::spawn(&dir, ["--disk", "path=a.img", "--disk", "path=b.img"]).owning_dir()
}

/// A well-behaved guest with the first disk open.
struct Guest {
    _front: Arc<Loopback>,
    _client: Client,
    disk: Arc<Disk>,
}

fn good_guest(socket: &Path) -> Guest {
    good_guest_with(socket, 32 << 20)
}

fn good_guest_with(socket: &Path, memory: u64) -> Guest {
    let (front, messages) = Loopback::connect(socket, memory).unwrap();
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

/// Writes a fresh pattern through `g` and reads it back.
fn verified_io(g: &Guest, seed: u8) {
    let data: Vec<u8> = (0..65536u32)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    let offset = u64::from(seed) * 65536;
    g.disk.write(offset, &data, false).unwrap();
    let mut back = vec![0u8; data.len()];
    g.disk.read(offset, &mut back).unwrap();
    assert!(back == data, "read back differs (seed {seed})");
}

/// A front end speaking the partition protocol by hand.
struct Raw(SeqPacket);

impl Raw {
    fn connect(socket: &Path) -> Self {
        let raw = Self(SeqPacket::connect(socket).unwrap());
        let hello = wire::Hello {
            version: wire::VERSION,
            vp_count: 1,
        };
        raw.0.send(&wire::encode(Kind::HELLO, &hello), &[]).unwrap();
        let mut buf = [0u8; wire::MAX_MESSAGE_SIZE];
        let d = raw.0.recv(&mut buf).unwrap().expect("HELLO answered");
        let (k, body) = wire::split(&buf[..d.len]).unwrap();
        assert_eq!(k, Kind::HELLO_REPLY);
        let r: wire::HelloReply = wire::body(k, body).unwrap();
        assert_eq!(r.status, status::OK);
        raw
    }

    /// Sends a request and returns the status it is answered with.
    fn request<T: IntoBytes + zerocopy::Immutable>(
        &self,
        kind: Kind,
        body: &T,
        fds: &[BorrowedFd<'_>],
    ) -> u32 {
        self.0.send(&wire::encode(kind, body), fds).unwrap();
        let mut buf = [0u8; wire::MAX_MESSAGE_SIZE];
        let d = self.0.recv(&mut buf).unwrap().expect("answered");
        let (k, body) = wire::split(&buf[..d.len]).unwrap();
        assert_eq!(k, Kind::STATUS);
        let s: wire::Status = wire::body(k, body).unwrap();
        assert_eq!(s.request, kind);
        s.status
    }

    fn add_memory(&self, len: u64, fd: BorrowedFd<'_>) -> u32 {
        let m = wire::AddMemory {
            gpa: 0,
            len,
            fd_offset: 0,
        };
        self.request(Kind::ADD_MEMORY, &m, &[fd])
    }

    fn set_vp(&self, irq: BorrowedFd<'_>) -> u32 {
        let v = wire::SetVp {
            vp: 0,
            flags: vp_flags::SIMP_ENABLED | vp_flags::SIEFP_ENABLED,
            simp_gpa: 0,
            siefp_gpa: 4096,
        };
        self.request(Kind::SET_VP, &v, &[irq])
    }

    /// Posts InitiateContact: the daemon answers by writing into the SIMP page.
    fn initiate_contact(&self) {
        let mut msg = InitiateContact::new_zeroed();
        msg.header = MessageHeader::new(MessageType::INITIATE_CONTACT);
        msg.vmbus_version_requested = VmbusVersion::WIN10.0;
        let bytes = msg.as_bytes();
        let mut input = HvPostMessageInput::new_zeroed();
        input.connection_id = 1;
        input.message_type = VMBUS_POST_MESSAGE_TYPE;
        input.payload_size = bytes.len() as u32;
        input.payload[..bytes.len()].copy_from_slice(bytes);
        let m = wire::PostMessage {
            vp: 0,
            reserved: 0,
            input,
        };
        self.0
            .send(&wire::encode(Kind::POST_MESSAGE, &m), &[])
            .unwrap();
    }
}

#[test]
fn memory_that_could_fault_is_refused_and_the_other_guest_is_served() {
    let mut d = daemon("sigbus");
    let good = good_guest(&d.socket);
    verified_io(&good, 1);

    // The first reproduction: a 0-byte memfd declared as 1 MiB, then SET_VP and InitiateContact
    // (the daemon's first message write used to kill it with SIGBUS).
    let attacker = Raw::connect(&d.socket);
    let empty = create_memfd("empty", 0).unwrap();
    assert_eq!(
        attacker.add_memory(1 << 20, empty.as_fd()),
        status::BAD_MEMORY
    );
    // A right-sized memfd the front end could truncate later: no F_SEAL_SHRINK.
    let loose = rustix::fs::memfd_create("loose", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&loose, 1 << 20).unwrap();
    assert_eq!(
        attacker.add_memory(1 << 20, loose.as_fd()),
        status::BAD_MEMORY
    );
    // Not a memfd at all.
    let file = std::fs::File::open(d.dir.join("a.img")).unwrap();
    assert_eq!(
        attacker.add_memory(1 << 20, file.as_fd()),
        status::BAD_MEMORY
    );
    let irq = ringbuf::Event::new().unwrap();
    assert_eq!(
        attacker.set_vp(irq.as_fd()),
        status::BAD_VP,
        "no guest memory holds the SynIC pages"
    );
    attacker.initiate_contact();
    verified_io(&good, 2);
    assert!(d.try_wait().is_none(), "vspd died");

    // The second reproduction: a right-sized, sealed memfd (accepted), which the front end then
    // tries to truncate while another guest is connected: the seal refuses it.
    let attacker = Raw::connect(&d.socket);
    let mem = create_memfd("sealed", 1 << 20).unwrap();
    assert_eq!(attacker.add_memory(1 << 20, mem.as_fd()), status::OK);
    assert_eq!(attacker.set_vp(irq.as_fd()), status::OK);
    assert!(
        rustix::fs::ftruncate(&mem, 0).is_err(),
        "a sealed memfd cannot shrink under the daemon"
    );
    attacker.initiate_contact();
    // The answer lands in the SIMP page and the irqfd fires.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while irq.wait_timeout(100).unwrap() == 0 {
        assert!(std::time::Instant::now() < deadline, "no answer delivered");
    }
    verified_io(&good, 3);
    assert!(d.try_wait().is_none(), "vspd died");
}

/// Opens `relid` on a ring GPADL of `pages` pages, every other page of a run (so each page
/// is a mapping of its own in the daemon). Returns whether the open succeeded.
fn open_scattered(front: &Loopback, client: &mut Client, relid: u32, pages: usize) -> bool {
    let all = front.alloc_pages(2 * pages).unwrap();
    let mut sorted = all.clone();
    sorted.sort_unstable();
    let scattered: Vec<u64> = sorted.iter().copied().step_by(2).collect();
    assert_eq!(scattered.len(), pages);
    let gpadl = client.create_gpadl(relid, &scattered).unwrap();
    match client.open(relid, gpadl, pages as u32 / 2, 0, &[]) {
        Ok(()) => true,
        Err(e) => {
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
            false
        }
    }
}

fn map_count(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .count()
}

#[test]
fn scattered_rings_are_paid_from_a_bounded_budget() {
    let mut d = daemon("mappings");
    let good = good_guest(&d.socket);
    verified_io(&good, 1);
    let before = map_count(d.pid());

    let (front, messages) = Loopback::connect(&d.socket, 128 << 20).unwrap();
    let front = Arc::new(front);
    let mut client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS).unwrap();
    let offers = client.request_offers().unwrap();
    let relids: Vec<u32> = offers
        .iter()
        .filter(|o| o.interface_type == Guid::SCSI)
        .map(|o| o.relid)
        .collect();
    assert_eq!(relids.len(), 2);
    // A guest's budget: 4096 pieces, or less, its share of the process's (half of
    // vm.max_map_count, for 64 sessions by default: 511 with the usual 65530).
    let budget = (ringbuf::shmem::MapBudget::process().limit() / 64).min(4096);
    // Rings of three quarters of that in scattered pages: the first fits the guest's budget,
    // the second does not and its open fails; the daemon's mappings grow by the first only.
    let pages = (budget * 3 / 4) & !1;
    assert!(open_scattered(&front, &mut client, relids[0], pages));
    assert!(!open_scattered(&front, &mut client, relids[1], pages));
    let during = map_count(d.pid());
    assert!(
        during < before + budget + 64,
        "mappings grew from {before} to {during}"
    );
    verified_io(&good, 2);
    assert!(d.try_wait().is_none(), "vspd died");

    // The guest goes away: its views are unmapped and the budget is whole again.
    drop(client);
    drop(front);
    d.eventually("the guest's mappings are gone", |d| {
        map_count(d.pid()) < before + 64
    });
    verified_io(&good, 3);
}

#[test]
fn guest_memory_beyond_the_limit_is_refused() {
    let dir = common::fresh_dir("vspd-memory", "limit");
    std::fs::File::create(dir.join("a.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    std::fs::write(
        dir.join("vspd.toml"),
        "max_memory_bytes = 50331648\n[[disk]]\npath = \"a.img\"\n",
    )
    .unwrap();
    let mut d = common::Daemon::spawn(&dir, ["--config", "vspd.toml"]).owning_dir();
    let attacker = Raw::connect(&d.socket);
    let add = |gpa: u64, len: u64| {
        let fd = create_memfd("region", len.min(32 << 20)).unwrap();
        let m = wire::AddMemory {
            gpa,
            len,
            fd_offset: 0,
        };
        attacker.request(Kind::ADD_MEMORY, &m, &[fd.as_fd()])
    };
    assert_eq!(add(0, 24 << 20), status::OK);
    assert_eq!(add(32 << 20, 24 << 20), status::OK);
    assert_eq!(add(64 << 20, 4096), status::BAD_MEMORY, "48 MiB in all");
    // A length that would overflow the running total.
    assert_eq!(add(128 << 20, !4095), status::BAD_MEMORY);
    // Each front end has its own allowance: a good guest with all of it is served.
    let good = good_guest_with(&d.socket, 48 << 20);
    verified_io(&good, 1);
    assert!(d.try_wait().is_none(), "vspd died");
}
