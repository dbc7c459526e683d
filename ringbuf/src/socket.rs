//! A `SOCK_SEQPACKET` Unix socket that carries file descriptors: the transport of the partition
//! socket (see `vmbus_proto::partition`). Each `send` is one datagram; `recv` returns one
//! datagram and the descriptors that came with it. Safe code over rustix.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::net::{
    accept_with, bind, connect, listen, recvmsg, sendmsg, socket_with, socketpair, AddressFamily,
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use crate::Error;

/// The most descriptors one datagram may carry; more are closed and the datagram refused.
pub const MAX_FDS: usize = 4;

/// One connected `SOCK_SEQPACKET` socket.
#[derive(Debug)]
pub struct SeqPacket(OwnedFd);

/// A datagram received by [`SeqPacket::recv`].
#[derive(Debug)]
pub struct Datagram {
    /// Bytes received.
    pub len: usize,
    /// Descriptors received with it.
    pub fds: Vec<OwnedFd>,
}

impl SeqPacket {
    /// A connected pair.
    pub fn pair() -> Result<(Self, Self), Error> {
        let (a, b) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(Error::Socket)?;
        Ok((Self(a), Self(b)))
    }

    /// Connects to a listening socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, Error> {
        let fd = socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(Error::Socket)?;
        let addr = SocketAddrUnix::new(path).map_err(Error::Socket)?;
        connect(&fd, &addr).map_err(Error::Socket)?;
        Ok(Self(fd))
    }

    /// Sends one datagram with `fds` attached; blocks while the peer's receive queue is full.
    pub fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        self.send_with(bytes, fds, SendFlags::NOSIGNAL).map(|_| ())
    }

    /// Sends one datagram with `fds` attached without blocking: `Ok(false)` if the peer's
    /// receive queue is full (nothing was sent; poll for `POLLOUT` and try again).
    pub fn try_send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<bool, Error> {
        match self.send_with(bytes, fds, SendFlags::NOSIGNAL | SendFlags::DONTWAIT) {
            Ok(()) => Ok(true),
            Err(Error::Socket(rustix::io::Errno::AGAIN)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The peer's credentials as the kernel recorded them at `connect` (`SO_PEERCRED`): who is
    /// at the other end, whatever the socket file's mode.
    pub fn peer_credentials(&self) -> Result<rustix::net::UCred, Error> {
        rustix::net::sockopt::socket_peercred(&self.0).map_err(Error::Socket)
    }

    fn send_with(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
        flags: SendFlags,
    ) -> Result<(), Error> {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if fds.len() > MAX_FDS
            || (!fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)))
        {
            return Err(Error::TooManyFds(fds.len()));
        }
        loop {
            match sendmsg(&self.0, &[IoSlice::new(bytes)], &mut control, flags) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::Socket(e)),
            }
        }
    }

    /// Receives one datagram into `buf`. Returns `None` when the peer closed the connection (or
    /// sent an empty datagram, which `SOCK_SEQPACKET` cannot tell apart).
    /// A datagram longer than `buf`, or with more than [`MAX_FDS`] descriptors, is an error
    /// ([`Error::Truncated`]); its descriptors are closed.
    pub fn recv(&self, buf: &mut [u8]) -> Result<Option<Datagram>, Error> {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = loop {
            match recvmsg(
                &self.0,
                &mut [IoSliceMut::new(buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(m) => break m,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::Socket(e)),
            }
        };
        let mut fds = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                fds.extend(rights);
            }
        }
        if msg
            .flags
            .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
        {
            return Err(Error::Truncated);
        }
        if msg.bytes == 0 && fds.is_empty() {
            return Ok(None);
        }
        Ok(Some(Datagram {
            len: msg.bytes,
            fds,
        }))
    }
}

impl AsFd for SeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A listening `SOCK_SEQPACKET` socket bound to a path (mode 0600).
#[derive(Debug)]
pub struct SeqPacketListener(OwnedFd);

impl SeqPacketListener {
    /// Binds to `path` (which must not exist: callers remove a stale socket file first) and
    /// listens. The socket file is made mode 0600 so that only its owner can connect.
    pub fn bind(path: &Path) -> Result<Self, Error> {
        let fd = socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(Error::Socket)?;
        // Bind and listen under a temporary name in the same directory, then rename it into
        // place (refusing to replace anything there): the path appears only once connections
        // are accepted, so a client that waits for it never meets a bound socket that refuses
        // connections, and two daemons racing for one path cannot both have it. A temporary
        // name too long for a socket address: bind in place instead.
        let tmp = {
            let mut t = path.as_os_str().to_owned();
            t.push(format!(".{}~", std::process::id()));
            std::path::PathBuf::from(t)
        };
        let staged = SocketAddrUnix::new(&tmp).is_ok();
        let at = if staged { tmp.as_path() } else { path };
        if staged {
            let _ = rustix::fs::unlink(&tmp);
        }
        let addr = SocketAddrUnix::new(at).map_err(Error::Socket)?;
        bind(&fd, &addr).map_err(Error::Socket)?;
        let placed = (|| {
            // Owner only: fchmod does not apply to sockets, so chmod the path, before anyone
            // can find it under its real name.
            rustix::fs::chmod(at, rustix::fs::Mode::from_raw_mode(0o600))?;
            listen(&fd, 64)?;
            if staged {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &tmp,
                    rustix::fs::CWD,
                    path,
                    rustix::fs::RenameFlags::NOREPLACE,
                )?;
            }
            Ok(())
        })();
        if let Err(e) = placed {
            let _ = rustix::fs::unlink(at);
            return Err(Error::Socket(e));
        }
        Ok(Self(fd))
    }

    /// Accepts one connection.
    pub fn accept(&self) -> Result<SeqPacket, Error> {
        loop {
            match accept_with(&self.0, SocketFlags::CLOEXEC) {
                Ok(fd) => return Ok(SeqPacket(fd)),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::Socket(e)),
            }
        }
    }
}

impl AsFd for SeqPacketListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Event;

    #[test]
    fn datagrams_carry_descriptors() {
        let (a, b) = SeqPacket::pair().unwrap();
        let ev = Event::new().unwrap();
        a.send(b"hello", &[ev.as_fd()]).unwrap();
        let mut buf = [0u8; 64];
        let d = b.recv(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..d.len], b"hello");
        assert_eq!(d.fds.len(), 1);
        // The received descriptor is the same eventfd.
        let got = Event::from_fd(d.fds.into_iter().next().unwrap());
        got.signal().unwrap();
        assert_eq!(ev.wait().unwrap(), 1);
        drop(a);
        // End of stream. (A zero-length datagram reads the same way: the partition protocol
        // never sends one, every message has a header.)
        assert!(b.recv(&mut buf).unwrap().is_none());
    }

    #[test]
    fn try_send_never_blocks_and_peers_are_known() {
        let (a, b) = SeqPacket::pair().unwrap();
        let mut sent = 0;
        while a.try_send(&[0u8; 1024], &[]).unwrap() {
            sent += 1;
            assert!(sent < 1_000_000, "the queue never filled");
        }
        let mut buf = [0u8; 2048];
        assert_eq!(b.recv(&mut buf).unwrap().unwrap().len, 1024);
        assert!(a.try_send(b"room again", &[]).unwrap());
        let cred = a.peer_credentials().unwrap();
        assert_eq!(cred.uid, rustix::process::geteuid());
        assert_eq!(cred.pid, rustix::process::getpid());
    }

    #[test]
    fn oversized_datagrams_are_refused() {
        let (a, b) = SeqPacket::pair().unwrap();
        a.send(&[7u8; 100], &[]).unwrap();
        let mut small = [0u8; 10];
        assert!(matches!(b.recv(&mut small), Err(Error::Truncated)));
        let evs: Vec<Event> = (0..=MAX_FDS).map(|_| Event::new().unwrap()).collect();
        let fds: Vec<_> = evs.iter().map(|e| e.as_fd()).collect();
        assert!(matches!(a.send(b"x", &fds), Err(Error::TooManyFds(_))));
    }

    #[test]
    fn listener_is_private_and_accepts() {
        let dir = std::env::temp_dir().join(format!("seqpacket-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let l = SeqPacketListener::bind(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let c = SeqPacket::connect(&dir).unwrap();
        let s = l.accept().unwrap();
        c.send(b"ping", &[]).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(s.recv(&mut buf).unwrap().unwrap().len, 4);
        // A second listener on the same path is refused, and the first keeps the path.
        assert!(SeqPacketListener::bind(&dir).is_err());
        let c2 = SeqPacket::connect(&dir).unwrap();
        let s2 = l.accept().unwrap();
        c2.send(b"pong", &[]).unwrap();
        assert_eq!(s2.recv(&mut buf).unwrap().unwrap().len, 4);
        // No temporary name is left behind.
        let leftovers = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with(&format!("seqpacket-test-{}.", std::process::id()))
            })
            .count();
        assert_eq!(leftovers, 0);
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn a_path_too_long_for_the_temporary_name_binds_in_place() {
        // 107 bytes is the longest socket path; leave no room for the temporary suffix.
        let base = std::env::temp_dir().join(format!("sp-{}-", std::process::id()));
        let mut name = base.into_os_string().into_string().unwrap();
        while name.len() < 105 {
            name.push('x');
        }
        let path = std::path::PathBuf::from(name);
        let _ = std::fs::remove_file(&path);
        let l = SeqPacketListener::bind(&path).unwrap();
        let c = SeqPacket::connect(&path).unwrap();
        let _s = l.accept().unwrap();
        drop(c);
        std::fs::remove_file(&path).unwrap();
    }
}
