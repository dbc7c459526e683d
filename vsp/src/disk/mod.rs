//! The disk backend: an io_uring engine per queue over a disk image file or a block device,
//! moving data straight between the disk and guest memory (zero copy).
//!
//! - [`DiskFile`]: one open disk (image file or block device), shared by the queues of that disk.
//!   With `direct`, it keeps two descriptors: an `O_DIRECT` one, used for each request whose
//!   offset, length and buffers are all aligned, and a buffered one for the rest.
//! - [`DiskQueue`]: one per channel queue, owned by one thread: requests are validated and
//!   queued ([`DiskQueue::queue`]), submitted in a batch ([`DiskQueue::submit`]), and reaped
//!   ([`DiskQueue::reap`], [`DiskQueue::wait`]); an eventfd ([`DiskQueue::completion_event`])
//!   tells a worker's `poll` that completions are ready.
//!
//! The kernel reads and writes guest memory through iovecs that point into the guest memory
//! mappings (from [`GuestMemory::host_iovec`]); no Rust reference to guest memory is ever formed.
//! Guest memory is not registered as io_uring fixed buffers: that pins all of it, per ring
//! (see [`QueueOptions`]). The unsafe code lives in `uring.rs` alone.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use rustix::fs::{AtFlags, FallocateFlags, FileType, Mode, OFlags, SeekFrom, StatxFlags};

use crate::Error;

mod uring;

#[cfg(test)]
mod tests;

pub use uring::{DiskQueue, QueueOptions, MAX_DEPTH};

#[cfg(doc)]
use ringbuf::guestmem::GuestMemory;

/// The logical block size reported for regular files.
pub const FILE_BLOCK_SIZE: u32 = 512;

/// One open disk: an image file or a block device. Shared (in an `Arc`) by the queues of a disk.
#[derive(Debug)]
pub struct DiskFile {
    /// The buffered descriptor, used for every request that cannot go through `direct`.
    buffered: OwnedFd,
    /// The `O_DIRECT` descriptor, when direct I/O was asked for and the file system allows it.
    direct: Option<OwnedFd>,
    size: u64,
    block_size: u32,
    /// Alignment of file offsets and lengths for `O_DIRECT` (a power of two).
    dio_offset_align: u32,
    /// Alignment of buffer addresses for `O_DIRECT` (a power of two).
    dio_mem_align: u32,
    readonly: bool,
    block_device: bool,
    discard: bool,
    /// The first writeback error (an errno; 0: none) that a flush or a synchronous write
    /// reported. The kernel reports a writeback error once per open file description, and
    /// every queue and guest shares this one: the error is kept here so that every later
    /// flush and synchronous write fails too (as QEMU does), never again claiming durability
    /// for data the kernel dropped.
    writeback_error: AtomicI32,
}

impl DiskFile {
    /// Opens `path` (a regular file or a block device). `readonly` opens it `O_RDONLY`. With
    /// `direct`, requests whose offset, length and every buffer address and length are aligned
    /// (to the logical block size, or what `statx` reports for direct I/O) use an `O_DIRECT`
    /// descriptor, the others a buffered one; if the file system refuses `O_DIRECT`, every
    /// request is buffered (with a warning).
    pub fn open(path: &Path, readonly: bool, direct: bool) -> Result<Arc<DiskFile>, Error> {
        let open_err = |source: rustix::io::Errno| Error::DiskOpen {
            path: path.to_owned(),
            source: source.into(),
        };
        let access = if readonly {
            OFlags::RDONLY
        } else {
            OFlags::RDWR
        };
        let buffered =
            rustix::fs::open(path, access | OFlags::CLOEXEC, Mode::empty()).map_err(open_err)?;
        let st = rustix::fs::statx(
            &buffered,
            "",
            AtFlags::EMPTY_PATH,
            StatxFlags::TYPE | StatxFlags::SIZE | StatxFlags::DIOALIGN,
        )
        .map_err(open_err)?;
        let (size, block_size, block_device) = match FileType::from_raw_mode(st.stx_mode.into()) {
            FileType::RegularFile => (st.stx_size, FILE_BLOCK_SIZE, false),
            FileType::BlockDevice => {
                let size = rustix::fs::seek(&buffered, SeekFrom::End(0)).map_err(open_err)?;
                let bs = rustix::fs::ioctl_blksszget(&buffered).map_err(open_err)?;
                if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
                    return Err(open_err(rustix::io::Errno::NODEV));
                }
                (size, bs, true)
            }
            _ => return Err(open_err(rustix::io::Errno::NODEV)),
        };
        // What direct I/O needs, if the kernel says (Linux 6.1 on); else the logical block size
        // for both, and a request the file system still refuses is retried buffered.
        let known = StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::DIOALIGN);
        let (mut dio_offset_align, mut dio_mem_align) = (block_size, block_size);
        let mut direct_ok = direct;
        if known {
            if st.stx_dio_offset_align == 0 {
                direct_ok = false;
            } else {
                dio_offset_align = st.stx_dio_offset_align.max(block_size);
                dio_mem_align = st.stx_dio_mem_align.max(1);
            }
        }
        if !dio_offset_align.is_power_of_two() || !dio_mem_align.is_power_of_two() {
            direct_ok = false;
        }
        let direct_fd = if direct_ok {
            match rustix::fs::open(
                path,
                access | OFlags::CLOEXEC | OFlags::DIRECT,
                Mode::empty(),
            ) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "O_DIRECT refused; all I/O is buffered");
                    None
                }
            }
        } else {
            if direct {
                tracing::warn!(path = %path.display(), "the file system does not support direct I/O; all I/O is buffered");
            }
            None
        };
        let discard = !readonly
            && if block_device {
                block_device_discards(st.stx_rdev_major, st.stx_rdev_minor)
            } else {
                // Punching a hole past the end of the file changes nothing and tells whether
                // the file system can punch holes at all.
                rustix::fs::fallocate(
                    &buffered,
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                    size.next_multiple_of(4096),
                    4096,
                )
                .is_ok()
            };
        Ok(Arc::new(DiskFile {
            buffered,
            direct: direct_fd,
            size,
            block_size,
            dio_offset_align,
            dio_mem_align,
            readonly,
            block_device,
            discard,
            writeback_error: AtomicI32::new(0),
        }))
    }

    /// The size of the disk in bytes (as it was when opened).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The logical block size: the device's, or [`FILE_BLOCK_SIZE`] for an image file.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Whether the disk was opened read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whether [`IoOp::Discard`] is supported (holes can be punched in the file, or the device
    /// can zero with unmap).
    pub fn supports_discard(&self) -> bool {
        self.discard
    }

    /// Whether aligned requests go through an `O_DIRECT` descriptor.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The writeback error recorded on this disk, if any (an errno): from then on every flush
    /// and synchronous write fails (see [`DiskFile::record_writeback_error`]).
    pub fn writeback_error(&self) -> Option<i32> {
        // Acquire pairs with the Release of `record_writeback_error` (any queue's thread).
        match self.writeback_error.load(Ordering::Acquire) {
            0 => None,
            e => Some(e),
        }
    }

    /// Records that a flush or a synchronous write failed with `errno` (the first error is
    /// kept): acknowledged writes may have been dropped from the page cache, so no later flush
    /// of this disk can succeed (there is no way back but reopening the disk).
    pub fn record_writeback_error(&self, errno: i32) {
        let errno = if errno == 0 {
            rustix::io::Errno::IO.raw_os_error()
        } else {
            errno
        };
        // Release pairs with the Acquire of `writeback_error`.
        if self
            .writeback_error
            .compare_exchange(0, errno, Ordering::Release, Ordering::Relaxed)
            .is_ok()
        {
            tracing::error!(
                errno,
                "writeback error: every later flush of this disk fails"
            );
        }
    }

    /// Whether the disk is a block device (rather than an image file).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The descriptor for a request: direct if asked and available.
    fn fd(&self, direct: bool) -> BorrowedFd<'_> {
        match (&self.direct, direct) {
            (Some(fd), true) => fd.as_fd(),
            _ => self.buffered.as_fd(),
        }
    }
}

/// Whether block device `major:minor` can zero with unmap, which is what
/// `fallocate(PUNCH_HOLE)` on a block device needs (sysfs; a partition's queue is its disk's).
fn block_device_discards(major: u32, minor: u32) -> bool {
    ["queue", "../queue"].iter().any(|q| {
        std::fs::read_to_string(format!(
            "/sys/dev/block/{major}:{minor}/{q}/write_zeroes_max_bytes"
        ))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
    })
}

/// The I/O engine of one queue of a disk, as a device drives it: validate and queue
/// operations, submit them in a batch, reap their completions. [`DiskQueue`] (io_uring) is the
/// one vspd uses; a stand-in (a scripted engine in tests) lets a device's protocol be tested
/// without the kernel's I/O.
pub trait IoQueue: Send {
    /// Validates and queues `op` under `tag`; see [`DiskQueue::queue`].
    fn queue(&mut self, tag: u64, op: IoOp<'_>) -> Result<(), Error>;
    /// Hands what was queued to the engine; returns how many operations were submitted.
    fn submit(&mut self) -> Result<usize, Error>;
    /// Appends the completions that are ready to `out` without blocking; returns how many.
    fn reap(&mut self, out: &mut Vec<Completion>) -> usize;
    /// Blocks until at least `min` completions are ready (or nothing is in flight).
    fn wait(&mut self, min: usize) -> Result<(), Error>;
    /// Operations queued and not yet reaped.
    fn in_flight(&self) -> usize;
    /// How many more operations [`IoQueue::queue`] takes now. By default no limit.
    fn room(&self) -> usize {
        usize::MAX
    }
    /// Nobody will answer the operations in flight: cut the long ones short (see
    /// [`DiskQueue::abandon`]). By default nothing.
    fn abandon(&mut self) {}
    /// Readable when completions may be ready (for the worker's epoll set).
    fn completion_event(&self) -> BorrowedFd<'_>;
    /// Before the worker sleeps on [`completion_event`](IoQueue::completion_event): re-arms it
    /// and says whether no completion is ready (true: sleep). See [`DiskQueue::prepare_sleep`].
    /// By default always true (an engine whose event needs no re-arming).
    fn prepare_sleep(&mut self) -> bool {
        true
    }
}

impl IoQueue for DiskQueue {
    fn queue(&mut self, tag: u64, op: IoOp<'_>) -> Result<(), Error> {
        DiskQueue::queue(self, tag, op)
    }
    fn submit(&mut self) -> Result<usize, Error> {
        DiskQueue::submit(self)
    }
    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        DiskQueue::reap(self, out)
    }
    fn wait(&mut self, min: usize) -> Result<(), Error> {
        DiskQueue::wait(self, min)
    }
    fn in_flight(&self) -> usize {
        DiskQueue::in_flight(self)
    }
    fn room(&self) -> usize {
        DiskQueue::capacity(self).saturating_sub(DiskQueue::in_flight(self))
    }
    fn abandon(&mut self) {
        DiskQueue::abandon(self)
    }
    fn completion_event(&self) -> BorrowedFd<'_> {
        DiskQueue::completion_event(self)
    }
    fn prepare_sleep(&mut self) -> bool {
        DiskQueue::prepare_sleep(self)
    }
}

/// A guest-memory buffer segment of an I/O: `len` bytes at guest-physical `gpa`, inside one
/// region of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
}

/// An operation on a disk. A read or write borrows its segments: [`DiskQueue::queue`] turns
/// them into the request's own iovecs at once, so the caller may reuse its segment buffer as
/// soon as `queue` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp<'a> {
    /// Reads the disk from `offset` into the segments, in order.
    Read {
        /// Byte offset in the disk.
        offset: u64,
        /// Where the bytes go; their lengths add up to the length of the read.
        segments: &'a [Segment],
    },
    /// Writes the segments, in order, to the disk from `offset`.
    Write {
        /// Byte offset in the disk.
        offset: u64,
        /// Where the bytes come from; their lengths add up to the length of the write.
        segments: &'a [Segment],
        /// Force unit access: the write is durable when it completes (`RWF_DSYNC`).
        fua: bool,
    },
    /// Makes every completed write durable (`fdatasync`). Fails (EIO) without trying once a
    /// flush or synchronous write of the disk has failed ([`DiskFile::writeback_error`]).
    Flush,
    /// Deallocates a range (`fallocate(PUNCH_HOLE | KEEP_SIZE)`): it reads as zeros afterwards.
    Discard {
        /// Byte offset in the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Zeroes a range: `fallocate(ZERO_RANGE)` (or `PUNCH_HOLE` with `unmap`), falling back to
    /// writing zeros where the file system cannot.
    WriteZeroes {
        /// Byte offset in the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Deallocate the range if possible.
        unmap: bool,
        /// The zeros must be durable before completion (the write cache is off): the range is
        /// followed by an `fdatasync`.
        sync: bool,
    },
    /// Writes `block` over and over, from `offset` for `len` bytes (WRITE SAME of a pattern):
    /// `block`'s length is a power of two of at most 64 KiB that divides `len`. The queue keeps
    /// its own copy, so the caller's buffer may go when `queue` returns.
    WriteSame {
        /// Byte offset in the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The block repeated.
        block: &'a [u8],
        /// Durable before completion: followed by an `fdatasync`.
        sync: bool,
    },
}

/// The completion of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The tag given to [`DiskQueue::queue`].
    pub tag: u64,
    /// Bytes transferred for a read or write (fewer than asked only if the disk ended early, for
    /// example a file truncated behind our back); 0 for the other operations. Or the errno.
    pub result: Result<u32, i32>,
}
