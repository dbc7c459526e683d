//! The TAP device: one file descriptor per queue (`IFF_MULTI_QUEUE`), frames with a
//! [`VirtioNetHdr`] in front (`IFF_VNET_HDR`), no packet-info prefix (`IFF_NO_PI`), and the link
//! settings (MTU, MAC, up/down, carrier) a backend needs.
//!
//! The few ioctls are made here directly through `libc` rather than through a crate: tun-tap
//! cannot set `IFF_VNET_HDR` or `IFF_MULTI_QUEUE`, and the crates that can (tun-rs and the like)
//! read and write only `&[u8]` buffers, while our frames move straight between the TAP and
//! memory a guest shares with us, which must never become a Rust reference. So this module hands
//! the kernel iovecs built from bounds-checked pointers ([`ringbuf::Mapping::host_ptr`],
//! [`ringbuf::guestmem::GuestMemory::host_iovec`]). It is the crate's only module with `unsafe`
//! code; every block names its invariant.

// The module exists to confine the ioctl/readv/writev calls the TAP needs.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use ringbuf::guestmem::GuestMemory;
use ringbuf::Mapping;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::vnet::{VirtioNetHdr, VNET_HDR_SIZE};
use crate::Error;

/// Most queues a TAP may have (the kernel's `MAX_TAP_QUEUES`).
pub const MAX_TAP_QUEUES: usize = 256;
/// Most pieces one frame may be read into or written from (beyond the header): with it, the
/// kernel's limit of iovecs per call (`UIO_MAXIOV`, 1024).
pub const MAX_PIECES: usize = 1023;
/// Longest interface name (`IFNAMSIZ` minus the terminating NUL).
pub const MAX_NAME_LEN: usize = 15;

bitflags::bitflags! {
    /// Offloads the reader of a TAP accepts (`TUNSETOFFLOAD`): what the kernel may hand it
    /// unfinished.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct TunOffload: u32 {
        /// Frames with a partial checksum (`NEEDS_CSUM`).
        const CSUM = libc::TUN_F_CSUM;
        /// TCP over IPv4 GSO frames.
        const TSO4 = libc::TUN_F_TSO4;
        /// TCP over IPv6 GSO frames.
        const TSO6 = libc::TUN_F_TSO6;
        /// TCP GSO frames with ECN.
        const TSO_ECN = libc::TUN_F_TSO_ECN;
        /// UDP segmentation offload over IPv4.
        const USO4 = libc::TUN_F_USO4;
        /// UDP segmentation offload over IPv6.
        const USO6 = libc::TUN_F_USO6;
    }
}

/// `struct ifreq`: the name and a 24-byte union, read by field below.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}
const _: () = assert!(size_of::<IfReq>() == 40);

impl IfReq {
    fn new(name: &str) -> Result<Self, Error> {
        let bytes = name.as_bytes();
        if bytes.is_empty()
            || bytes.len() > MAX_NAME_LEN
            || bytes
                .iter()
                .any(|&b| b == 0 || b == b'/' || b.is_ascii_whitespace())
        {
            return Err(Error::BadName(name.to_owned()));
        }
        let mut req = IfReq {
            name: [0; 16],
            data: [0; 24],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        Ok(req)
    }

    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

/// Makes an ioctl whose argument is an `IfReq`.
fn ioctl_ifreq(
    fd: BorrowedFd<'_>,
    request: libc::Ioctl,
    req: &mut IfReq,
    what: &'static str,
) -> Result<(), Error> {
    // SAFETY: every request passed here (TUNSETIFF, SIOC[GS]IF*) reads and/or writes at most
    // one `struct ifreq` (40 bytes) at the pointer, which points to an owned, writable `IfReq`
    // of exactly that size; `fd` is open for the call's duration (borrowed).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, req as *mut IfReq as *mut c_void) };
    if r < 0 {
        return Err(Error::Ioctl(what, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes an ioctl whose argument is an `int` passed by pointer or by value.
fn ioctl_int(
    fd: BorrowedFd<'_>,
    request: libc::Ioctl,
    by_pointer: bool,
    value: i32,
    what: &'static str,
) -> Result<(), Error> {
    let mut v = value;
    let r = if by_pointer {
        // SAFETY: the request (TUNSETVNETHDRSZ, TUNSETCARRIER) reads one `int` at the pointer,
        // which points to a live local `i32`; `fd` is open for the call (borrowed).
        unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut v as *mut i32) }
    } else {
        // SAFETY: the request (TUNSETOFFLOAD) takes its argument by value and dereferences no
        // pointer; `fd` is open for the call (borrowed).
        unsafe { libc::ioctl(fd.as_raw_fd(), request, value as libc::c_ulong) }
    };
    if r < 0 {
        return Err(Error::Ioctl(what, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Link state as the host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Up with carrier (`IFF_RUNNING`: the kernel's operational state is up).
    pub running: bool,
}

impl LinkState {
    /// Whether a guest should see the medium connected.
    pub fn connected(&self) -> bool {
        self.up && self.running
    }
}

/// The link-level settings of a network interface by name, in the network namespace this value
/// was made in (through a Unix datagram socket it keeps for the ioctls: the kernel answers
/// interface ioctls on any socket, and a Unix one is what the daemons' seccomp filter allows).
#[derive(Debug)]
pub struct Link {
    name: String,
    sock: OwnedFd,
}

impl Link {
    /// Control of the interface `name` (which need not exist yet).
    pub fn new(name: &str) -> Result<Self, Error> {
        IfReq::new(name)?;
        // SAFETY: plain syscall with constant arguments; no pointers.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(Error::Ioctl("socket", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by socket(2), is open, and nothing else owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            name: name.to_owned(),
            sock,
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn get(&self, request: libc::Ioctl, what: &'static str) -> Result<IfReq, Error> {
        let mut req = IfReq::new(&self.name)?;
        ioctl_ifreq(self.sock.as_fd(), request, &mut req, what)?;
        Ok(req)
    }

    /// The MTU.
    pub fn mtu(&self) -> Result<u32, Error> {
        Ok(self
            .get(libc::SIOCGIFMTU as libc::Ioctl, "SIOCGIFMTU")?
            .int() as u32)
    }

    /// Sets the MTU.
    pub fn set_mtu(&self, mtu: u32) -> Result<(), Error> {
        let mut req = IfReq::new(&self.name)?;
        let v = i32::try_from(mtu).map_err(|_| Error::BadMtu(mtu))?;
        req.data[..4].copy_from_slice(&v.to_ne_bytes());
        ioctl_ifreq(
            self.sock.as_fd(),
            libc::SIOCSIFMTU as libc::Ioctl,
            &mut req,
            "SIOCSIFMTU",
        )
    }

    /// The Ethernet address.
    pub fn mac(&self) -> Result<[u8; 6], Error> {
        let req = self.get(libc::SIOCGIFHWADDR as libc::Ioctl, "SIOCGIFHWADDR")?;
        let mut mac = [0; 6];
        mac.copy_from_slice(&req.data[2..8]);
        Ok(mac)
    }

    /// Sets the Ethernet address.
    pub fn set_mac(&self, mac: [u8; 6]) -> Result<(), Error> {
        let mut req = IfReq::new(&self.name)?;
        req.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        req.data[2..8].copy_from_slice(&mac);
        ioctl_ifreq(
            self.sock.as_fd(),
            libc::SIOCSIFHWADDR as libc::Ioctl,
            &mut req,
            "SIOCSIFHWADDR",
        )
    }

    /// Up/down and carrier.
    pub fn state(&self) -> Result<LinkState, Error> {
        let flags = self
            .get(libc::SIOCGIFFLAGS as libc::Ioctl, "SIOCGIFFLAGS")?
            .short() as i32;
        Ok(LinkState {
            up: flags & libc::IFF_UP != 0,
            running: flags & libc::IFF_RUNNING != 0,
        })
    }

    /// Brings the interface up or down.
    pub fn set_up(&self, up: bool) -> Result<(), Error> {
        let mut req = self.get(libc::SIOCGIFFLAGS as libc::Ioctl, "SIOCGIFFLAGS")?;
        let mut flags = req.short() as i32;
        if up {
            flags |= libc::IFF_UP;
        } else {
            flags &= !libc::IFF_UP;
        }
        req.data[..2].copy_from_slice(&(flags as i16).to_ne_bytes());
        ioctl_ifreq(
            self.sock.as_fd(),
            libc::SIOCSIFFLAGS as libc::Ioctl,
            &mut req,
            "SIOCSIFFLAGS",
        )
    }
}

/// A TAP device: its queues and its link settings.
#[derive(Debug)]
pub struct Tap {
    link: Link,
    queues: Vec<TapQueue>,
}

impl Tap {
    /// Opens the TAP `name` with `queues` queues, creating it if it does not exist (a created
    /// TAP is not persistent: it goes away when the last queue is closed). Every queue is
    /// non-blocking, carries a 12-byte [`VirtioNetHdr`] and accepts no offloads until
    /// [`TapQueue::set_offload`].
    pub fn open(name: &str, queues: usize) -> Result<Self, Error> {
        if queues == 0 || queues > MAX_TAP_QUEUES {
            return Err(Error::BadQueueCount(queues));
        }
        let link = Link::new(name)?;
        let mut qs = Vec::with_capacity(queues);
        for _ in 0..queues {
            qs.push(TapQueue::open(name)?);
        }
        Ok(Self { link, queues: qs })
    }

    /// The link settings.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        self.link.name()
    }

    /// The queues.
    pub fn queues(&self) -> &[TapQueue] {
        &self.queues
    }

    /// Splits into link control and queues (each queue can go to its own thread).
    pub fn into_parts(self) -> (Link, Vec<TapQueue>) {
        (self.link, self.queues)
    }
}

/// Memory shared with a guest (or another process) that a frame piece lies in.
#[derive(Debug, Clone, Copy)]
pub enum Shared<'a> {
    /// `len` bytes at `offset` of a shared mapping.
    Mapped {
        /// The mapping.
        map: &'a Mapping,
        /// Offset in it.
        offset: usize,
        /// Length.
        len: usize,
    },
    /// `len` bytes of guest memory at a guest-physical address (within one region).
    Guest {
        /// The guest's memory.
        mem: &'a GuestMemory,
        /// Guest-physical address.
        gpa: u64,
        /// Length.
        len: usize,
    },
}

impl Shared<'_> {
    /// An iovec for the kernel, bounds-checked against the memory.
    fn iovec(&self) -> Result<libc::iovec, Error> {
        let (ptr, len) = match *self {
            Shared::Mapped { map, offset, len } => (map.host_ptr(offset, len), len),
            Shared::Guest { mem, gpa, len } => (mem.host_iovec(gpa, len as u64).map(|p| p.0), len),
        };
        Ok(libc::iovec {
            iov_base: ptr.map_err(|_| Error::PieceOutOfBounds)?.as_ptr() as *mut c_void,
            iov_len: len,
        })
    }
}

impl Shared<'_> {
    /// Bytes in the piece.
    pub fn len(&self) -> usize {
        match *self {
            Shared::Mapped { len, .. } | Shared::Guest { len, .. } => len,
        }
    }

    /// Whether the piece is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the piece's bytes to `dst` (exactly [`Shared::len`] long).
    pub fn read(&self, dst: &mut [u8]) -> Result<(), Error> {
        match *self {
            Shared::Mapped { map, offset, .. } => map.read(offset, dst),
            Shared::Guest { mem, gpa, .. } => mem.read(gpa, dst),
        }
        .map_err(|_| Error::PieceOutOfBounds)
    }

    /// Copies `src` (exactly [`Shared::len`] long) into the piece.
    pub fn write(&self, src: &[u8]) -> Result<(), Error> {
        match *self {
            Shared::Mapped { map, offset, .. } => map.write(offset, src),
            Shared::Guest { mem, gpa, .. } => mem.write(gpa, src),
        }
        .map_err(|_| Error::PieceOutOfBounds)
    }
}

/// A piece of memory a frame is written from.
#[derive(Debug, Clone, Copy)]
pub enum IoPiece<'a> {
    /// Local bytes.
    Local(&'a [u8]),
    /// Shared memory.
    Shared(Shared<'a>),
}

/// A piece of memory a frame is read into.
#[derive(Debug)]
pub enum IoPieceMut<'a> {
    /// Local bytes.
    Local(&'a mut [u8]),
    /// Shared memory.
    Shared(Shared<'a>),
}

/// One queue of a TAP: a non-blocking file descriptor that reads and writes whole frames.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
}

impl TapQueue {
    fn open(name: &str) -> Result<Self, Error> {
        let path = c"/dev/net/tun";
        // SAFETY: `path` is a NUL-terminated string that lives across the call.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(Error::OpenTun(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by open(2), is open, and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq::new(name)?;
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;
        req.data[..2].copy_from_slice(&(flags as i16).to_ne_bytes());
        ioctl_ifreq(fd.as_fd(), libc::TUNSETIFF, &mut req, "TUNSETIFF")?;
        ioctl_int(
            fd.as_fd(),
            libc::TUNSETVNETHDRSZ,
            true,
            VNET_HDR_SIZE as i32,
            "TUNSETVNETHDRSZ",
        )?;
        let q = Self { fd };
        q.set_offload(TunOffload::empty())?;
        Ok(q)
    }

    /// Tells the TAP which offloads this reader accepts (the kernel finishes the others before
    /// a frame reaches us).
    pub fn set_offload(&self, offload: TunOffload) -> Result<(), Error> {
        ioctl_int(
            self.fd.as_fd(),
            libc::TUNSETOFFLOAD,
            false,
            offload.bits() as i32,
            "TUNSETOFFLOAD",
        )
    }

    /// Attaches this queue to its TAP or detaches it (`TUNSETQUEUE`): the kernel spreads the
    /// frames it sends to the TAP over the attached queues only, so a queue nobody serves
    /// should be detached. A queue starts attached.
    pub fn set_attached(&self, attached: bool) -> Result<(), Error> {
        let mut req = IfReq {
            name: [0; 16],
            data: [0; 24],
        };
        let flags = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        req.data[..2].copy_from_slice(&(flags as i16).to_ne_bytes());
        ioctl_ifreq(self.fd.as_fd(), libc::TUNSETQUEUE, &mut req, "TUNSETQUEUE")
    }

    /// Sets the TAP's carrier (seen by the host as the link's operational state).
    pub fn set_carrier(&self, on: bool) -> Result<(), Error> {
        ioctl_int(
            self.fd.as_fd(),
            libc::TUNSETCARRIER,
            true,
            on as i32,
            "TUNSETCARRIER",
        )
    }

    /// Writes one frame: `hdr`, then `pieces` in order. Returns the frame's length (without
    /// the header), or `None` if the TAP cannot take it now.
    pub fn write(
        &self,
        hdr: &VirtioNetHdr,
        pieces: &[IoPiece<'_>],
    ) -> Result<Option<usize>, Error> {
        let mut iov = IovArray::new(pieces.len(), hdr as *const VirtioNetHdr as *mut c_void)?;
        for p in pieces {
            iov.push(match *p {
                IoPiece::Local(b) => libc::iovec {
                    iov_base: b.as_ptr() as *mut c_void,
                    iov_len: b.len(),
                },
                IoPiece::Shared(m) => m.iovec()?,
            });
        }
        // SAFETY: each of the `iov.count()` iovecs pushed points to memory that stays valid
        // for the call: `hdr` and `Local` slices are borrowed; `Shared` pointers were
        // bounds-checked by `host_ptr`/`host_iovec` against mappings borrowed for the call.
        // The kernel only reads them (writev) and reads no entry past the count.
        let r = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.count()) };
        frame_len(r)
    }

    /// Reads one frame: its header into `hdr`, its bytes into `pieces` in order. Returns the
    /// frame's length (without the header; more than the pieces hold if it was truncated), or
    /// `None` if no frame is waiting.
    pub fn read(
        &self,
        hdr: &mut VirtioNetHdr,
        pieces: &mut [IoPieceMut<'_>],
    ) -> Result<Option<usize>, Error> {
        let mut iov = IovArray::new(pieces.len(), hdr as *mut VirtioNetHdr as *mut c_void)?;
        for p in pieces.iter_mut() {
            iov.push(match p {
                IoPieceMut::Local(b) => libc::iovec {
                    iov_base: b.as_mut_ptr() as *mut c_void,
                    iov_len: b.len(),
                },
                IoPieceMut::Shared(m) => m.iovec()?,
            });
        }
        // SAFETY: each of the `iov.count()` iovecs pushed points to writable memory valid for
        // the call: `hdr` and `Local` slices are exclusively borrowed (any byte pattern is
        // valid for them: `VirtioNetHdr` is `FromBytes`); `Shared` pointers were
        // bounds-checked against writable shared mappings borrowed for the call, never
        // referenced as Rust memory. The kernel reads no entry past the count.
        let r = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), iov.count()) };
        frame_len(r)
    }

    /// Reads one frame straight into guest memory: its header into `hdr`, its first bytes
    /// into `lead`, the rest into the guest-physical ranges `runs` (address, length), in
    /// order, each within one region of `mem`. Returns as [`TapQueue::read`]. Builds the
    /// iovecs on the stack: no allocation per frame.
    pub fn read_guest(
        &self,
        hdr: &mut VirtioNetHdr,
        lead: &mut [u8],
        mem: &GuestMemory,
        runs: &[(u64, usize)],
    ) -> Result<Option<usize>, Error> {
        let mut iov = IovArray::new(runs.len() + 1, hdr as *mut VirtioNetHdr as *mut c_void)?;
        iov.push(libc::iovec {
            iov_base: lead.as_mut_ptr() as *mut c_void,
            iov_len: lead.len(),
        });
        for &(gpa, len) in runs {
            let (p, n) = mem
                .host_iovec(gpa, len as u64)
                .map_err(|_| Error::PieceOutOfBounds)?;
            iov.push(libc::iovec {
                iov_base: p.as_ptr() as *mut c_void,
                iov_len: n,
            });
        }
        // SAFETY: the iovecs point to writable memory valid for the call: `hdr` and `lead`
        // are exclusively borrowed (any byte pattern is valid for both); each run was
        // bounds-checked by `host_iovec` against a region of `mem`, borrowed for the call, and
        // is never referenced as Rust memory. The kernel reads no entry past the count.
        let r = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), iov.count()) };
        frame_len(r)
    }
}

/// The iovecs of one frame, the virtio-net header's first. Only the entries pushed are
/// initialized, so a call fills what it uses, not the whole array (16 KiB at the limit).
struct IovArray {
    iov: [MaybeUninit<libc::iovec>; MAX_PIECES + 1],
    len: usize,
}

impl IovArray {
    /// Room for `pieces` pieces after the header at `hdr` (refused over [`MAX_PIECES`]).
    fn new(pieces: usize, hdr: *mut c_void) -> Result<Self, Error> {
        if pieces > MAX_PIECES {
            return Err(Error::TooManyPieces(pieces));
        }
        let mut a = Self {
            iov: [MaybeUninit::uninit(); MAX_PIECES + 1],
            len: 0,
        };
        a.push(libc::iovec {
            iov_base: hdr,
            iov_len: VNET_HDR_SIZE,
        });
        Ok(a)
    }

    /// Appends one iovec (callers push at most the pieces they asked room for; any more are
    /// dropped and the call then fails with a short frame rather than reading past the array).
    fn push(&mut self, v: libc::iovec) {
        if let Some(slot) = self.iov.get_mut(self.len) {
            slot.write(v);
            self.len += 1;
        }
    }

    fn as_ptr(&self) -> *const libc::iovec {
        self.iov.as_ptr().cast()
    }

    /// Entries pushed (the array holds at most 1 + [`MAX_PIECES`] = `UIO_MAXIOV`).
    fn count(&self) -> i32 {
        self.len as i32
    }
}

/// The frame length from a readv/writev result (`None` for EAGAIN).
fn frame_len(r: isize) -> Result<Option<usize>, Error> {
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(Error::Io(e));
    }
    Ok(Some((r as usize).saturating_sub(VNET_HDR_SIZE)))
}

impl AsFd for TapQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Moves the calling thread (only it: a network namespace belongs to a thread) into a new,
/// empty network namespace, which goes away with every interface in it when the thread and
/// the descriptors it opened there are gone. Processes the thread starts inherit it. For tests
/// and demonstrations that must not touch the host's interfaces.
pub fn enter_new_netns() -> Result<(), Error> {
    // SAFETY: unshare(2) with a flag constant and no pointers; CLONE_NEWNET changes only the
    // calling thread's network namespace, which no Rust invariant depends on.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(Error::Ioctl(
            "unshare(CLONE_NEWNET)",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Test helpers that need a TAP: a fresh network namespace for the calling thread.
#[cfg(test)]
pub(crate) mod testns {
    /// Moves the calling thread into a new network namespace (gone when the thread ends, with
    /// every interface made in it), or says why it cannot and returns false.
    pub fn enter_fresh_netns(test: &str) -> bool {
        if !std::path::Path::new("/dev/net/tun").exists() {
            println!("SKIP {test}: /dev/net/tun is missing");
            return false;
        }
        if let Err(e) = super::enter_new_netns() {
            println!("SKIP {test}: cannot make a network namespace ({e:?})");
            return false;
        }
        true
    }

    /// Runs `ip ARGS` (inside the thread's namespace); false, with a message, if `ip` is missing.
    pub fn ip(args: &str) -> bool {
        match std::process::Command::new("ip")
            .args(args.split_whitespace())
            .status()
        {
            Ok(s) => {
                assert!(s.success(), "ip {args}: {s}");
                true
            }
            Err(e) => {
                println!("SKIP: cannot run ip: {e}");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testns::*;
    use super::*;
    use crate::offload::{csum_add, csum_fold, ChecksumRequest, L4Protocol, Lso, TxOffload};
    use std::io::Read;
    use std::time::{Duration, Instant};

    const TAP_MAC: [u8; 6] = [2, 0x11, 0, 0, 0, 1];
    const PEER_MAC: [u8; 6] = [2, 0x11, 0, 0, 0, 2];
    const HOST_IP: [u8; 4] = [10, 9, 0, 1];
    const PEER_IP: [u8; 4] = [10, 9, 0, 2];

    /// An Ethernet/IPv4 frame from the peer to the TAP's host with `l4` as payload; the IP
    /// header complete, the transport checksum left to the caller.
    fn ipv4_frame(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&TAP_MAC);
        f.extend_from_slice(&PEER_MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + l4.len()) as u16;
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&PEER_IP);
        ip[16..20].copy_from_slice(&HOST_IP);
        let c = crate::offload::internet_checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(l4);
        f
    }

    fn tcp_segment(
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&65535u16.to_be_bytes());
        t.extend_from_slice(payload);
        t
    }

    /// Completes the TCP checksum of an IPv4 frame by hand.
    fn finish_tcp_checksum(f: &mut [u8]) {
        let len = f.len() - 34;
        let mut acc = csum_add(0, &f[26..34]) + 6 + len as u64;
        f[50..52].fill(0);
        acc = csum_add(acc, &f[34..]);
        let c = !csum_fold(acc);
        f[50..52].copy_from_slice(&c.to_be_bytes());
    }

    fn write_all(q: &TapQueue, hdr: &VirtioNetHdr, f: &[u8]) {
        assert_eq!(q.write(hdr, &[IoPiece::Local(f)]).unwrap(), Some(f.len()));
    }

    /// Reads frames from any queue until one matches, for up to 5 s.
    fn read_until(tap: &Tap, mut want: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65536];
        loop {
            for q in tap.queues() {
                let mut hdr = VirtioNetHdr::default();
                if let Some(n) = q
                    .read(&mut hdr, &mut [IoPieceMut::Local(&mut buf)])
                    .unwrap()
                {
                    if want(&buf[..n]) {
                        return buf[..n].to_vec();
                    }
                }
            }
            assert!(Instant::now() < deadline, "no matching frame from the TAP");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn names_and_queue_counts_are_checked() {
        assert!(matches!(Tap::open("", 1), Err(Error::BadName(_))));
        assert!(matches!(
            Tap::open("a-name-far-too-long", 1),
            Err(Error::BadName(_))
        ));
        assert!(matches!(Tap::open("a/b", 1), Err(Error::BadName(_))));
        assert!(matches!(Tap::open("ok", 0), Err(Error::BadQueueCount(0))));
        assert!(matches!(
            Tap::open("ok", 257),
            Err(Error::BadQueueCount(257))
        ));
    }

    /// A real multi-queue TAP in a namespace of its own: link settings, carrier, a UDP datagram
    /// with a checksum left to the kernel from shared memory, and a TCP large send as hv_netvsc
    /// builds it (IP length zeroed) fixed up and taken by the kernel's TCP as one GSO frame.
    #[test]
    fn a_real_tap_takes_settings_checksum_offload_and_a_fixed_up_large_send() {
        std::thread::spawn(|| {
            if !enter_fresh_netns("a_real_tap_takes_settings...") {
                return;
            }
            let tap = Tap::open("ndtest0", 2).unwrap();
            // Opening it again attaches more queues to the same device.
            let again = Tap::open("ndtest0", 1).unwrap();
            drop(again);
            let link = tap.link();
            link.set_mtu(9000).unwrap();
            assert_eq!(link.mtu().unwrap(), 9000);
            link.set_mac(TAP_MAC).unwrap();
            assert_eq!(link.mac().unwrap(), TAP_MAC);
            assert!(!link.state().unwrap().up);
            link.set_up(true).unwrap();
            assert!(link.state().unwrap().connected());
            // The operational state follows the carrier through the kernel's link watch, soon.
            let settles_to = |want: LinkState| {
                let deadline = Instant::now() + Duration::from_secs(5);
                while link.state().unwrap() != want {
                    assert!(
                        Instant::now() < deadline,
                        "link state stays {:?}",
                        link.state()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            };
            tap.queues()[0].set_carrier(false).unwrap();
            settles_to(LinkState {
                up: true,
                running: false,
            });
            tap.queues()[0].set_carrier(true).unwrap();
            settles_to(LinkState {
                up: true,
                running: true,
            });
            if !ip("addr add 10.9.0.1/24 dev ndtest0")
                || !ip("neigh add 10.9.0.2 lladdr 02:11:00:00:00:02 dev ndtest0")
            {
                return;
            }
            for q in tap.queues() {
                q.set_offload(TunOffload::CSUM).unwrap();
            }

            // UDP with the checksum left to compute, the payload from shared memory.
            let sock = std::net::UdpSocket::bind("10.9.0.1:7777").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let payload: Vec<u8> = (0..1000u32).map(|i| (i * 13) as u8).collect();
            let mut udp = vec![0u8; 8];
            udp[0..2].copy_from_slice(&5555u16.to_be_bytes());
            udp[2..4].copy_from_slice(&7777u16.to_be_bytes());
            udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            udp[6..8].copy_from_slice(&0x1234u16.to_be_bytes());
            udp.extend_from_slice(&payload);
            let frame = ipv4_frame(17, &udp);
            let t = TxOffload {
                checksum: Some(ChecksumRequest {
                    ipv6: false,
                    ip_header: false,
                    l4: Some(L4Protocol::Udp),
                    l4_offset: 34,
                }),
                ..Default::default()
            };
            let plan = t.prepare_tx(frame.len(), &frame).unwrap();
            let shared = Mapping::anonymous(4096).unwrap();
            shared.write(100, &frame[plan.consumed..]).unwrap();
            let rest = frame.len() - plan.consumed;
            let pieces = [
                IoPiece::Local(plan.head()),
                IoPiece::Shared(Shared::Mapped {
                    map: &shared,
                    offset: 100,
                    len: rest,
                }),
            ];
            assert_eq!(
                tap.queues()[1].write(&plan.hdr, &pieces).unwrap(),
                Some(frame.len())
            );
            let mut got = [0u8; 2000];
            let (n, from) = sock.recv_from(&mut got).unwrap();
            assert_eq!(&got[..n], &payload[..]);
            assert_eq!(from.port(), 5555);
            // A piece outside its mapping is refused before any I/O.
            let outside = [IoPiece::Shared(Shared::Mapped {
                map: &shared,
                offset: 4000,
                len: 200,
            })];
            assert!(matches!(
                tap.queues()[1].write(&plan.hdr, &outside),
                Err(Error::PieceOutOfBounds)
            ));

            // TCP: handshake by hand, then one 5000-byte large send as hv_netvsc leaves it.
            let listener = std::net::TcpListener::bind("10.9.0.1:7778").unwrap();
            let mut syn = ipv4_frame(6, &tcp_segment(40000, 7778, 1000, 0, 0x02, &[]));
            finish_tcp_checksum(&mut syn);
            write_all(&tap.queues()[0], &VirtioNetHdr::default(), &syn);
            let synack = read_until(&tap, |f| {
                f.len() >= 54
                    && f[12..14] == [8, 0]
                    && f[23] == 6
                    && f[34..36] == 7778u16.to_be_bytes()
                    && f[47] == 0x12
            });
            let isn = u32::from_be_bytes(synack[38..42].try_into().unwrap());
            let mut ack = ipv4_frame(6, &tcp_segment(40000, 7778, 1001, isn + 1, 0x10, &[]));
            finish_tcp_checksum(&mut ack);
            write_all(&tap.queues()[0], &VirtioNetHdr::default(), &ack);
            let data: Vec<u8> = (0..5000u32).map(|i| (i * 31 + 7) as u8).collect();
            let mut big = ipv4_frame(6, &tcp_segment(40000, 7778, 1001, isn + 1, 0x18, &data));
            // What hv_netvsc does to a large send.
            big[16..18].fill(0);
            big[24..26].fill(0);
            let pseudo = csum_fold(csum_add(0, &big[26..34]) + 6);
            big[50..52].copy_from_slice(&pseudo.to_be_bytes());
            let lso = TxOffload {
                lso: Some(Lso {
                    mss: 1448,
                    l4_offset: 34,
                    ipv6: false,
                }),
                ..Default::default()
            };
            let plan = lso.prepare_tx(big.len(), &big).unwrap();
            assert_eq!(plan.hdr.gso_type, crate::vnet::gso::TCPV4);
            let pieces = [
                IoPiece::Local(plan.head()),
                IoPiece::Local(&big[plan.consumed..]),
            ];
            assert_eq!(
                tap.queues()[0].write(&plan.hdr, &pieces).unwrap(),
                Some(big.len())
            );
            listener.set_nonblocking(false).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = vec![0u8; data.len()];
            conn.read_exact(&mut got).unwrap();
            assert_eq!(got, data);
        })
        .join()
        .unwrap();
    }
}
