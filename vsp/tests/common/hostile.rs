//! What the trust-boundary suites share: a well-behaved guest doing verified I/O beside the
//! attacker, and a front end that speaks the partition protocol by hand.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;

use ringbuf::socket::SeqPacket;
use vmbus_proto::channel::Guid;
use vmbus_proto::partition::{self as wire, status, Kind};
use vsc::channel::GuestChannel;
use vsc::client::{Client, SUPPORTED_VERSIONS};
use vsc::loopback::Loopback;
use vsc::storvsc::{Disk, Storvsc};
use zerocopy::IntoBytes;

/// A well-behaved guest with the first disk open.
pub struct Guest {
    _front: Arc<Loopback>,
    _client: Client,
    pub disk: Arc<Disk>,
}

/// A guest of `memory` bytes with the daemon's first SCSI disk open.
pub fn good_guest_with(socket: &Path, memory: u64) -> Result<Guest, String> {
    let (front, messages) = Loopback::connect(socket, memory).map_err(|e| e.to_string())?;
    let front = Arc::new(front);
    let mut client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS)
        .map_err(|e| e.to_string())?;
    let offers = client.request_offers().map_err(|e| e.to_string())?;
    let o = offers
        .iter()
        .find(|o| o.interface_type == Guid::SCSI)
        .ok_or("no SCSI offer")?;
    let ch = GuestChannel::open(&mut client, &front, o, 16).map_err(|e| e.to_string())?;
    let st = Storvsc::init(ch).map_err(|e| e.to_string())?;
    let disk = Disk::start(st, front.clone(), 0).map_err(|e| e.to_string())?;
    Ok(Guest {
        _front: front,
        _client: client,
        disk,
    })
}

/// A 32 MiB guest with the first disk open.
pub fn good_guest(socket: &Path) -> Guest {
    good_guest_with(socket, 32 << 20).unwrap()
}

/// Writes a fresh 64 KiB pattern through `g` at `seed`'s place and reads it back.
pub fn verified_io(g: &Guest, seed: u8) {
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
pub struct Raw(pub SeqPacket);

impl Raw {
    /// Connects and says HELLO (one VP).
    pub fn connect(socket: &Path) -> Self {
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
    pub fn request<T: IntoBytes + zerocopy::Immutable>(
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

    /// As [`Raw::request`], `None` if the daemon dropped the connection.
    pub fn try_request<T: IntoBytes + zerocopy::Immutable>(
        &self,
        kind: Kind,
        body: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Option<u32> {
        self.0.send(&wire::encode(kind, body), fds).ok()?;
        let mut buf = [0u8; wire::MAX_MESSAGE_SIZE];
        let d = self.0.recv(&mut buf).ok()??;
        let (_, body) = wire::split(&buf[..d.len]).ok()?;
        wire::body::<wire::Status>(Kind::STATUS, body)
            .ok()
            .map(|s| s.status)
    }

    /// ADD_MEMORY of `len` bytes of `fd` at `gpa`.
    pub fn add_memory(&self, gpa: u64, len: u64, fd: BorrowedFd<'_>) -> u32 {
        let m = wire::AddMemory {
            gpa,
            len,
            fd_offset: 0,
        };
        self.request(Kind::ADD_MEMORY, &m, &[fd])
    }
}
