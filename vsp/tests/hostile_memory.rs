//! Guest memory at the trust boundary, against the real `vspd`: a front end cannot hand over
//! memory that would fault under the daemon (SIGBUS), and a guest cannot exhaust the daemon's
//! kernel mappings with scattered ring pages; meanwhile a second guest keeps doing verified I/O.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use ringbuf::shmem::create_memfd;
use vmbus_proto::channel::{Guid, InitiateContact, MessageHeader, MessageType, VmbusVersion};
use vmbus_proto::partition::{self as wire, status, vp_flags, Kind};
use vsc::client::{Client, SUPPORTED_VERSIONS};
use vsc::loopback::Loopback;
use zerocopy::{FromZeros, IntoBytes};

mod common;
#[allow(dead_code)]
#[path = "common/hostile.rs"]
mod hostile;

use hostile::{good_guest, good_guest_with, verified_io, Raw};

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

/// What this suite adds to the shared raw front end.
trait RawExt {
    fn set_vp(&self, irq: BorrowedFd<'_>) -> u32;
    fn initiate_contact(&self);
}

impl RawExt for Raw {
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
        let m = wire::PostMessage::vmbus(0, 1, msg.as_bytes()).unwrap();
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
        attacker.add_memory(0, 1 << 20, empty.as_fd()),
        status::BAD_MEMORY
    );
    // A right-sized memfd the front end could truncate later: no F_SEAL_SHRINK.
    let loose = rustix::fs::memfd_create("loose", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&loose, 1 << 20).unwrap();
    assert_eq!(
        attacker.add_memory(0, 1 << 20, loose.as_fd()),
        status::BAD_MEMORY
    );
    // Not a memfd at all.
    let file = std::fs::File::open(d.dir.join("a.img")).unwrap();
    assert_eq!(
        attacker.add_memory(0, 1 << 20, file.as_fd()),
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
    assert_eq!(attacker.add_memory(0, 1 << 20, mem.as_fd()), status::OK);
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
    let good = good_guest_with(&d.socket, 48 << 20).unwrap();
    verified_io(&good, 1);
    assert!(d.try_wait().is_none(), "vspd died");
}
