//! Findings of the trust-boundary review, each reproduced against the real `vspd`: the attacker
//! is refused or contained, and a second guest keeps doing verified I/O.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;

use ringbuf::shmem::create_memfd;
use ringbuf::socket::SeqPacket;
use vmbus_proto::channel::Guid;
use vmbus_proto::partition::{self as wire, status, Kind};
use vsc::channel::GuestChannel;
use vsc::client::{Client, SUPPORTED_VERSIONS};
use vsc::loopback::Loopback;
use vsc::storvsc::{Disk, Storvsc};
use zerocopy::IntoBytes;

mod common;

fn daemon(name: &str, extra: &[&str]) -> common::Daemon {
    let dir = common::fresh_dir("vspd-review", name);
    std::fs::File::create(dir.join("a.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut args = vec!["--disk", "path=a.img"];
    args.extend_from_slice(extra);
    common::Daemon::spawn(&dir, args).owning_dir()
}

/// A well-behaved guest with the disk open.
struct Guest {
    _front: Arc<Loopback>,
    _client: Client,
    disk: Arc<Disk>,
}

fn good_guest(socket: &Path) -> Result<Guest, String> {
    let (front, messages) = Loopback::connect(socket, 32 << 20).map_err(|e| e.to_string())?;
    let front = Arc::new(front);
    let mut client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS)
        .map_err(|e| e.to_string())?;
    let offers = client.request_offers().map_err(|e| e.to_string())?;
    let o = offers
        .iter()
        .find(|o| o.interface_type == Guid::SCSI)
        .ok_or("no SCSI offer")?;
    let ch = GuestChannel::open(&mut client, &front, o, 16).map_err(|e| e.to_string())?;
    let disk = Disk::start(
        Storvsc::init(ch).map_err(|e| e.to_string())?,
        front.clone(),
        0,
    )
    .map_err(|e| e.to_string())?;
    Ok(Guest {
        _front: front,
        _client: client,
        disk,
    })
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

    fn add_memory(&self, gpa: u64, len: u64, fd: BorrowedFd<'_>) -> u32 {
        let m = wire::AddMemory {
            gpa,
            len,
            fd_offset: 0,
        };
        self.request(Kind::ADD_MEMORY, &m, &[fd])
    }
}

/// Finding: guest memory had no bound on its total size. Sparse memfds cost nothing, so a front
/// end could declare regions of terabytes until the daemon's address space was spent (64
/// regions of 2 TiB, then smaller ones from more connections); after that every mapping and
/// allocation of the daemon failed, for every guest. Now a session's regions together are
/// bounded (`max_memory_bytes`, default 1 TiB), so the daemon's guest memory is bounded by
/// sessions times that.
#[test]
fn guest_memory_cannot_spend_the_daemons_address_space() {
    let mut d = daemon("address-space", &[]);
    let good = good_guest(&d.socket).unwrap();
    verified_io(&good, 1);

    // Each attacker declares 2 TiB regions, halving the size at each refusal down to a page:
    // before the fix, two of them left no address space for a new session's thread.
    let mut attackers = Vec::new();
    let mut refused = 0;
    for _ in 0..4 {
        let a = Raw::connect(&d.socket);
        let (mut gpa, mut size, mut regions) = (0u64, 2u64 << 40, 0);
        while regions < 64 && size >= 4096 {
            let fd = create_memfd("huge", size).unwrap();
            if a.add_memory(gpa, size, fd.as_fd()) == status::OK {
                gpa += size;
                regions += 1;
            } else {
                refused += 1;
                size /= 2;
            }
        }
        attackers.push(a);
    }
    assert!(refused > 0, "some regions were refused");
    let vm_kib = d.status_field("VmSize:");
    eprintln!(
        "vspd VmSize with {} attacking front ends: {} GiB",
        attackers.len(),
        vm_kib >> 20
    );
    assert!(d.try_wait().is_none(), "vspd died");
    // The guest already connected, and a new one, are served while the attackers hold on.
    verified_io(&good, 2);
    let second = good_guest(&d.socket).expect("a new guest connects");
    verified_io(&second, 3);
    assert!(
        vm_kib < attackers.len() as u64 * (1 << 30) + (64 << 20),
        "each front end's memory is at most 1 TiB: VmSize {vm_kib} KiB"
    );
    drop(attackers);
}
