//! An NBD server: exports block devices (for `vscd`, the VMBus SCSI disks it sees) on a Unix
//! socket, so that NBD clients — qemu-img/qemu-io, fio's `nbd` engine, libnbd and nbdkit's tools —
//! can use them.
//!
//! Protocol coverage (see [`proto`] for the constants):
//! - fixed newstyle handshake only, with `NBD_FLAG_NO_ZEROES`;
//! - options `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`, `NBD_OPT_LIST`, `NBD_OPT_INFO` and
//!   `NBD_OPT_GO` (with `NBD_INFO_EXPORT`, `NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION` and
//!   `NBD_INFO_BLOCK_SIZE`); every other option (`NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_STARTTLS`,
//!   meta contexts, extended headers...) is answered `NBD_REP_ERR_UNSUP`, so replies are simple
//!   replies;
//! - commands `READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM` (when the device supports it) and
//!   `WRITE_ZEROES`, with `FUA` and `NO_HOLE`; anything else is answered `EINVAL`.
//!
//! Within a connection requests are pipelined. On a device with an event loop
//! ([`BlockDevice::attach_source`]) the connection's requests are read without blocking on that
//! loop's thread and reads and writes are started there; elsewhere the connection's thread decodes
//! them. Reads and writes the device takes asynchronously are answered from its completions, in
//! batches; the rest go to a few worker threads (started on demand, capped per connection and
//! for the server) which call the [`BlockDevice`] and write their replies, out of order, under a
//! lock on the socket. Everything a client sends is bounded: option data 64 KiB, names 4096
//! bytes, requests 32 MiB, the handshake's duration, in-flight request data per connection
//! and for the whole server with a reserve per connection, replies left untaken (see
//! [`Limits`]). A client that breaks the framing (bad magic, oversized option) is
//! disconnected; nothing else is affected.

mod handshake;
pub mod proto;
mod server;
mod transmission;

use std::sync::Arc;

pub use server::{serve_stream, Limits, NbdServer};
pub use transmission::{HOP_REPLY, HOP_TURN};

/// What a device operation can fail with; each maps to one NBD error value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// The device failed the I/O (`EIO`).
    #[error("I/O error")]
    Io,
    /// No space left, or a write beyond the end (`ENOSPC`).
    #[error("no space left on the device")]
    NoSpace,
    /// The request is not valid for this device (`EINVAL`).
    #[error("invalid request")]
    Invalid,
    /// The device does not support this operation (`ENOTSUP`).
    #[error("operation not supported")]
    Unsupported,
    /// The device is read-only or refuses the write (`EPERM`).
    #[error("read-only device")]
    ReadOnly,
    /// Out of memory (`ENOMEM`).
    #[error("out of memory")]
    NoMemory,
    /// A value too large (`EOVERFLOW`).
    #[error("value too large")]
    Overflow,
    /// The device is going away (`ESHUTDOWN`).
    #[error("device shutting down")]
    Shutdown,
}

impl IoError {
    /// The NBD error value sent to the client.
    pub fn errno(self) -> u32 {
        match self {
            Self::Io => proto::EIO,
            Self::NoSpace => proto::ENOSPC,
            Self::Invalid => proto::EINVAL,
            Self::Unsupported => proto::ENOTSUP,
            Self::ReadOnly => proto::EPERM,
            Self::NoMemory => proto::ENOMEM,
            Self::Overflow => proto::EOVERFLOW,
            Self::Shutdown => proto::ESHUTDOWN,
        }
    }
}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> Self {
        use rustix::io::Errno;
        match Errno::from_io_error(&e) {
            Some(Errno::NOSPC | Errno::DQUOT | Errno::FBIG) => Self::NoSpace,
            Some(Errno::ROFS | Errno::PERM | Errno::ACCESS) => Self::ReadOnly,
            Some(Errno::INVAL) => Self::Invalid,
            Some(Errno::OPNOTSUPP) => Self::Unsupported,
            Some(Errno::NOMEM) => Self::NoMemory,
            Some(Errno::OVERFLOW) => Self::Overflow,
            _ => Self::Io,
        }
    }
}

/// The data of a read that completed, where the device holds it: the reply copies it out
/// once, straight into the bytes it writes to the socket.
pub trait ReadData {
    /// Bytes of data.
    fn len(&self) -> usize;
    /// Whether there is no data.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends all the data to `dst`.
    fn append_to(&self, dst: &mut Vec<u8>) -> Result<(), IoError>;
}

impl ReadData for Vec<u8> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn append_to(&self, dst: &mut Vec<u8>) -> Result<(), IoError> {
        dst.extend_from_slice(self);
        Ok(())
    }
}

/// Completion of [`BlockDevice::read_async`]: the data (valid only while it runs), or the
/// error.
pub type ReadDone = Box<dyn for<'a> FnOnce(Result<&'a dyn ReadData, IoError>) + Send>;
/// Completion of [`BlockDevice::write_async`].
/// The write's data buffer comes back with the result, for reuse (or empty if the device kept it).
pub type WriteDone = Box<dyn FnOnce(Result<(), IoError>, Vec<u8>) + Send>;
/// What a device calls after a batch of asynchronous completions (see
/// [`BlockDevice::batch_hook`]).
pub type BatchFlush = std::sync::Arc<dyn Fn() + Send + Sync>;

/// What an export serves. Implementations are called from several connection threads at once.
///
/// Offsets and lengths handed to the methods are already checked: within [`size`](Self::size),
/// aligned to [`block_size`](Self::block_size), at most [`proto::MAX_REQUEST`] bytes for reads and
/// writes; writes never reach a [`read_only`](Self::read_only) device.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether the device refuses writes.
    fn read_only(&self) -> bool;
    /// The minimum I/O granularity in bytes: a power of two from 1 to 64 KiB (1: any byte range).
    /// Advertised as the minimum block size; requests not aligned to it are refused with `EINVAL`.
    /// The preferred size advertised is this or 4096, whichever is larger.
    fn block_size(&self) -> u32;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError>;
    /// Writes `data` at `offset`; with `fua`, the data is on stable storage before this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), IoError>;
    /// Puts every completed write on stable storage. Covers writes from all connections.
    fn flush(&self) -> Result<(), IoError>;
    /// The largest read or write the device takes through [`read_async`](Self::read_async) and
    /// [`write_async`](Self::write_async); 0 (the default) means the device has no asynchronous
    /// path and every request goes to a worker thread.
    fn async_limit(&self) -> u32 {
        0
    }
    /// Starts a read of `len` bytes at `offset`; `done` runs when it completes, on any thread.
    /// Only called for requests of at most [`async_limit`](Self::async_limit) bytes.
    fn read_async(&self, offset: u64, len: u32, done: ReadDone) {
        let mut buf = vec![0u8; len as usize];
        match self.read(offset, &mut buf) {
            Ok(()) => done(Ok(&buf)),
            Err(e) => done(Err(e)),
        }
    }
    /// Starts a write; `done` runs when it completes, on any thread. Only called for requests
    /// of at most [`async_limit`](Self::async_limit) bytes.
    fn write_async(&self, offset: u64, data: Vec<u8>, fua: bool, done: WriteDone) {
        let r = self.write(offset, &data, fua);
        done(r, data)
    }
    /// Asks the device to call `flush` after each batch of asynchronous completions, on the
    /// thread that ran them, for as long as the returned guard lives: completions then leave
    /// their replies for `flush` to send together. `None` (the default): no batches, each
    /// completion sends its own reply.
    fn batch_hook(&self, flush: BatchFlush) -> Option<Box<dyn std::any::Any + Send>> {
        let _ = flush;
        None
    }
    /// Runs `source` on the thread that issues and completes this device's asynchronous
    /// requests (an event loop), for as long as it wants; requests it submits from there skip
    /// a handoff between threads. Returns what wakes that thread for the source's sake; gives
    /// the source back if the device has no such thread (the default). Only used together
    /// with [`batch_hook`](Self::batch_hook).
    fn attach_source(
        &self,
        source: Box<dyn crate::queue::QueueSource>,
    ) -> Result<crate::queue::SourceWaker, Box<dyn crate::queue::QueueSource>> {
        Err(source)
    }
    /// Whether [`trim`](Self::trim) does anything (advertised as `NBD_FLAG_SEND_TRIM`).
    fn supports_trim(&self) -> bool {
        false
    }
    /// Discards `len` bytes at `offset` (a hint: the contents become unspecified).
    fn trim(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let _ = (offset, len);
        Err(IoError::Unsupported)
    }
    /// Writes `len` zero bytes at `offset`; `may_trim`: the range may be deallocated instead.
    /// The default writes zero buffers (at most 1 MiB at a time) through [`write`](Self::write).
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), IoError> {
        let _ = may_trim;
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; len.min(CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write(offset + done, &zeroes[..n as usize], false)?;
            done += n;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }
    /// Whether a flush (or FUA) on one connection covers writes made through all connections to
    /// this device, so clients may spread I/O over several connections
    /// (`NBD_FLAG_CAN_MULTI_CONN`). True unless the device caches per connection.
    fn can_multi_conn(&self) -> bool {
        true
    }
}

/// One export: a named device.
#[derive(Clone)]
pub struct Export {
    /// The export name (at most 4096 bytes; unique within a server).
    pub name: String,
    /// A human-readable description (at most 4096 bytes; may be empty).
    pub description: String,
    /// The device served.
    pub device: Arc<dyn BlockDevice>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.device.size())
            .field("read_only", &self.device.read_only())
            .finish()
    }
}

impl Export {
    /// The transmission flags advertised for this export.
    pub(crate) fn transmission_flags(&self) -> u16 {
        let dev = &self.device;
        let mut flags = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH | proto::FLAG_SEND_FUA;
        if dev.read_only() {
            flags |= proto::FLAG_READ_ONLY;
        } else {
            flags |= proto::FLAG_SEND_WRITE_ZEROES;
            if dev.supports_trim() {
                flags |= proto::FLAG_SEND_TRIM;
            }
        }
        if dev.can_multi_conn() {
            flags |= proto::FLAG_CAN_MULTI_CONN;
        }
        flags
    }

    /// Minimum, preferred and maximum block sizes (`NBD_INFO_BLOCK_SIZE`).
    pub(crate) fn block_sizes(&self) -> (u32, u32, u32) {
        let min = self.device.block_size().max(1);
        (min, min.max(4096), proto::MAX_REQUEST)
    }
}

#[cfg(test)]
mod tests;
