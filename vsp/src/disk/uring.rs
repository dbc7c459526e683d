//! The io_uring engine of a disk queue: an in-flight table of requests whose iovecs point into
//! guest memory.
//!
//! Each request owns one slot of the table from `queue` until its final completion is reaped;
//! the slot's index is the SQE's `user_data`. A slot's iovec array is not touched while the
//! kernel may read it, and is reused (not freed) for the slot's next request, so the fast path
//! allocates nothing. Short transfers are resubmitted for the remainder from the same slot.

// io_uring takes raw pointers (iovec arrays and the buffers they point at) that the kernel uses
// after the call that hands them over has returned; pushing such SQEs is unsafe, and this module
// is where the in-flight table keeps every one of those pointers valid until its completion.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use ringbuf::guestmem::GuestMemory;
use rustix::event::EventfdFlags;
use rustix::fs::FallocateFlags;
use rustix::io::{Errno, ReadWriteFlags};

use super::{Completion, DiskFile, IoOp, Segment};
use crate::Error;

/// Most iovecs one readv/writev takes (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;
/// Deepest queue accepted by [`DiskQueue::new`].
pub const MAX_DEPTH: u32 = 4096;
/// Source of the zeros written where the file system cannot zero a range itself.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
/// Bytes of zeros one SQE writes (as several iovecs over `ZEROS`).
const ZERO_FILL_CHUNK: u64 = 16 * ZEROS.len() as u64;
/// Bytes of a repeated block one iovec of a pattern fill covers.
const PATTERN_SPAN: usize = 64 * 1024;

/// One iovec as the kernel reads it: `struct iovec` (`void *iov_base; size_t iov_len`). The
/// address is kept as an integer: the kernel is the only one that dereferences it, and it keeps
/// the queue `Send` without an `unsafe impl`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RawIovec {
    base: usize,
    len: usize,
}

// `struct iovec` is a pointer and a `size_t` on every Linux target; checked because `pwritev`
// reinterprets a slice of these.
const _: () = assert!(
    size_of::<RawIovec>() == 2 * size_of::<usize>()
        && align_of::<RawIovec>() == align_of::<usize>()
);

/// Options of a [`DiskQueue`].
///
/// Guest memory is never registered with io_uring as fixed buffers: registration pins, and so
/// allocates, every page of it, per ring (a 1 GiB memfd took vspd from 4 MB to 1.05 GB of RSS
/// in 0.8 s, on the session thread), whatever the guest actually uses for I/O. Each request
/// pins only its own pages, for its duration.
#[derive(Debug, Clone, Copy)]
pub struct QueueOptions {
    /// Do buffered writes (not `O_DIRECT`, not FUA) at once with `pwritev` on the queue's
    /// thread (the default) instead of through io_uring. File systems that cannot write to the
    /// page cache without blocking (ext4 refuses `RWF_NOWAIT` buffered writes) make io_uring
    /// hand every such write to an io-wq worker thread, one at a time per file: a thread wakeup
    /// and two context switches per 4 KiB write, which cost more than the copy itself. The
    /// price: a write that must wait (dirty-page throttling) holds up this queue, as it would
    /// hold up that worker.
    pub inline_buffered_writes: bool,
    /// Register the disk's descriptors with the ring (the default), so that requests name
    /// them by index and the kernel takes no file reference per request (`fget`/`fput`, about
    /// 2% of the worker's time at 4 KiB page-cache reads). Off: plain descriptors, as when a
    /// kernel refuses the registration.
    pub register_files: bool,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            inline_buffered_writes: true,
            register_files: true,
        }
    }
}

/// A read or write in flight: what is left of it is `iovecs[first..]` at `offset`.
#[derive(Debug, Clone, Copy)]
struct Rw {
    write: bool,
    offset: u64,
    first: usize,
    done: u32,
    total: u32,
    flags: ReadWriteFlags,
    /// Whether the request may use the `O_DIRECT` descriptor (cleared when the file system
    /// refused a direct request with `EINVAL`).
    direct_allowed: bool,
    /// Whether the SQE in flight went through the `O_DIRECT` descriptor.
    submitted_direct: bool,
}

impl Rw {
    /// Accounts for `n` bytes transferred (at most what is left); returns whether the transfer
    /// is complete, else moves past them in `iovecs` for the rest.
    fn progress(&mut self, iovecs: &mut [RawIovec], n: u32) -> bool {
        let n = n.min(self.total - self.done);
        self.done += n;
        self.offset += u64::from(n);
        if self.done == self.total {
            return true;
        }
        advance(iovecs, &mut self.first, n as usize);
        false
    }
}

/// What a slot of the in-flight table is doing.
#[derive(Debug, Clone, Copy)]
enum Op {
    Free,
    /// An empty read or write, or a zero-length range: completes with 0.
    Nop,
    Flush,
    Rw(Rw),
    Fallocate {
        offset: u64,
        len: u64,
        mode: FallocateFlags,
        /// Write zeros if the file system cannot do `mode`.
        zero_fallback: bool,
        /// Follow with an `fdatasync` before completing.
        sync: bool,
    },
    /// Writing zeros from `ZEROS` over `offset .. end`.
    ZeroFill {
        offset: u64,
        end: u64,
        /// Follow with an `fdatasync` before completing.
        sync: bool,
    },
    /// Writing the slot's `pattern` (a block repeated) over `start .. end`; `offset` is how
    /// far it got.
    PatternFill {
        start: u64,
        offset: u64,
        end: u64,
        /// The block's length (a power of two, at most `PATTERN_SPAN`).
        block: u32,
        /// Follow with an `fdatasync` before completing.
        sync: bool,
    },
}

impl Op {
    /// Whether the operation's success would say data is durable: a flush, a synchronous
    /// write, or zeroing followed by a flush.
    fn is_durable(&self) -> bool {
        match self {
            Op::Fallocate { sync, .. }
            | Op::ZeroFill { sync, .. }
            | Op::PatternFill { sync, .. } => *sync,
            _ => self.syncs(),
        }
    }

    /// Whether the operation itself asks the kernel for durability (and may so consume a
    /// writeback error the kernel reports once): a flush or a synchronous write. Any failure
    /// of these is taken as a writeback error: the kernel does not say which part failed.
    fn syncs(&self) -> bool {
        match self {
            Op::Flush => true,
            Op::Rw(rw) => rw.write && rw.flags.contains(ReadWriteFlags::DSYNC),
            _ => false,
        }
    }
}

/// One entry of the in-flight table.
#[derive(Debug)]
struct Slot {
    tag: u64,
    op: Op,
    /// The request's iovecs; the kernel may read them (and the memory they point at) from the
    /// push of an SQE for this slot until its CQE is reaped.
    iovecs: Vec<RawIovec>,
    /// For a `PatternFill`: its block repeated over `PATTERN_SPAN` bytes and one block more
    /// (allocated once, on the slot's first one); the kernel reads it as `iovecs` say.
    pattern: Vec<u8>,
}

/// What a CQE leads to.
enum Step {
    Done(Result<u32, i32>),
    Resubmit,
}

/// One queue of a disk: an io_uring and its in-flight table, owned by one thread.
///
/// Dropping it waits for every request in flight: the kernel may still write into guest memory
/// and read the in-flight table until then.
pub struct DiskQueue {
    // Field order matters for drop: the ring (and its registered buffers) goes first.
    ring: IoUring,
    event: OwnedFd,
    disk: Arc<DiskFile>,
    /// Keeps the guest memory mapped while the kernel may access it.
    mem: Arc<GuestMemory>,
    slots: Vec<Slot>,
    /// Indexes of free slots.
    free: Vec<u32>,
    in_flight: usize,
    /// Completions not yet handed out by `reap`.
    done: Vec<Completion>,
    /// Scratch for draining the completion queue (reused, never shrunk).
    cqes: Vec<(u64, i32)>,
    /// See [`QueueOptions::inline_buffered_writes`].
    inline_writes: bool,
    /// The disk's descriptors are registered with the ring (`IORING_REGISTER_FILES`: the
    /// buffered one at index 0, the `O_DIRECT` one at 1), so SQEs name them by index and the
    /// kernel takes no file reference per request.
    fixed_files: bool,
    /// See [`DiskQueue::abandon`].
    abandoned: bool,
    /// Which paths the requests took, for the tests to check.
    #[cfg(test)]
    pub(super) stats: Stats,
}

/// Counts of the SQEs of each kind, and of resubmissions.
#[cfg(test)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Stats {
    pub direct: u64,
    pub buffered: u64,
    pub short_resubmits: u64,
    pub direct_refused: u64,
    pub inline_writes: u64,
    pub zero_fill: u64,
    /// Read and write SQEs that named a registered file.
    pub fixed_file: u64,
}

impl DiskQueue {
    /// A queue of `depth` requests (1 to 4096) on `disk`, with buffers in `mem`.
    pub fn new(disk: Arc<DiskFile>, mem: Arc<GuestMemory>, depth: u32) -> Result<Self, Error> {
        Self::with_options(disk, mem, depth, QueueOptions::default())
    }

    /// As [`DiskQueue::new`], with options.
    pub fn with_options(
        disk: Arc<DiskFile>,
        mem: Arc<GuestMemory>,
        depth: u32,
        options: QueueOptions,
    ) -> Result<Self, Error> {
        if depth == 0 || depth > MAX_DEPTH {
            return Err(Error::DiskRequest("the queue depth must be 1 to 4096"));
        }
        // The SQ holds at most one SQE per slot and the CQ (twice the SQ) at most one CQE per
        // slot, so neither can overflow.
        let ring = IoUring::builder()
            .setup_submit_all()
            .build(depth)
            .or_else(|_| IoUring::new(depth))
            .map_err(Error::Uring)?;
        let event = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| Error::Uring(e.into()))?;
        ring.submitter()
            .register_eventfd(event.as_raw_fd())
            .map_err(Error::Uring)?;
        let mut files = vec![disk.fd(false).as_raw_fd()];
        if disk.direct.is_some() {
            files.push(disk.fd(true).as_raw_fd());
        }
        // An optimisation only: a kernel (or a limit) that refuses it gets plain descriptors.
        let fixed_files = options.register_files && ring.submitter().register_files(&files).is_ok();
        let slots = (0..depth)
            .map(|_| Slot {
                tag: 0,
                op: Op::Free,
                iovecs: Vec::with_capacity(8),
                pattern: Vec::new(),
            })
            .collect();
        Ok(Self {
            cqes: Vec::with_capacity(ring.params().cq_entries() as usize),
            ring,
            event,
            disk,
            mem,
            slots,
            free: (0..depth).rev().collect(),
            in_flight: 0,
            done: Vec::with_capacity(depth as usize),
            inline_writes: options.inline_buffered_writes,
            fixed_files,
            abandoned: false,
            #[cfg(test)]
            stats: Stats::default(),
        })
    }

    /// The disk.
    pub fn disk(&self) -> &Arc<DiskFile> {
        &self.disk
    }

    /// Nobody will answer the requests in flight (their channel closed): from now on a request
    /// that would go on with another step (the next piece of a fill, the rest of a short
    /// transfer, the flush after zeroing) ends with `ECANCELED` instead, which is not a
    /// writeback error. Waiting for the queue to empty then takes as long as the steps already
    /// in the kernel, not as long as a guest asked for: a WRITE SAME pattern may be 16 GiB,
    /// 64 KiB a step, and a guest could otherwise close its channel on 256 of them and open it
    /// again, leaving a thread and that much I/O behind each time.
    pub fn abandon(&mut self) {
        self.abandoned = true;
    }

    /// Requests queued and not yet completed (their completions not yet drained from the ring).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The most requests that can be in flight at once (the depth).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// An eventfd registered with the ring (`IORING_REGISTER_EVENTFD`): readable when
    /// completions may be ready, so a worker can `poll` it with its other wakeups. Only
    /// [`prepare_sleep`](Self::prepare_sleep) resets it: a worker that polls calls `reap` many
    /// times per sleep, and a reset there would cost a system call per batch of completions.
    pub fn completion_event(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }

    /// Before a worker sleeps on [`completion_event`](Self::completion_event): resets it, then
    /// says whether no completion is waiting (true: sleep; a completion posted from now on
    /// signals the event anew; false: `reap` first). Reset first, check second: a completion
    /// posted between a check and a reset would otherwise never wake the worker.
    pub fn prepare_sleep(&mut self) -> bool {
        // Non-blocking; nothing to read is fine.
        let _ = rustix::io::read(&self.event, &mut [0u8; 8]);
        self.done.is_empty() && self.ring.completion().is_empty()
    }

    /// Validates and queues an operation; [`DiskQueue::submit`] hands it to the kernel (many
    /// `queue` then one `submit`). Refused, without any I/O: a range outside the disk, a
    /// segment outside guest memory (or across the end of a region), a total length over
    /// `u32::MAX`, more than 1024 discontiguous segments, a change to a read-only disk, a
    /// discard the disk cannot do, a discard or write-zeroes range of a block device not aligned
    /// to its block size, and a full queue. Zero-length operations complete with 0. Nothing of
    /// `op` is kept: the segments of a read or write become the slot's own iovecs (an array
    /// reused from one request to the next), so queueing allocates nothing in the steady state.
    pub fn queue(&mut self, tag: u64, op: IoOp<'_>) -> Result<(), Error> {
        let Some(&idx) = self.free.last() else {
            return Err(Error::DiskQueueFull);
        };
        let idx = idx as usize;
        let (readonly, discard) = (self.disk.readonly, self.disk.discard);
        let op = match op {
            IoOp::Read { offset, segments } => self.prepare_rw(idx, false, offset, segments)?,
            IoOp::Write {
                offset,
                segments,
                fua,
            } => {
                if readonly {
                    return Err(Error::DiskReadOnly);
                }
                let mut op = self.prepare_rw(idx, true, offset, segments)?;
                if let Op::Rw(rw) = &mut op {
                    if fua {
                        rw.flags = ReadWriteFlags::DSYNC;
                    }
                }
                op
            }
            IoOp::Flush => Op::Flush,
            IoOp::Discard { offset, len } => {
                if readonly {
                    return Err(Error::DiskReadOnly);
                }
                if !discard {
                    return Err(Error::DiskRequest("the disk does not support discard"));
                }
                check_fallocate_range(&self.disk, offset, len)?;
                if len == 0 {
                    Op::Nop
                } else {
                    Op::Fallocate {
                        offset,
                        len,
                        mode: FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                        zero_fallback: false,
                        sync: false,
                    }
                }
            }
            IoOp::WriteZeroes {
                offset,
                len,
                unmap,
                sync,
            } => {
                if readonly {
                    return Err(Error::DiskReadOnly);
                }
                check_fallocate_range(&self.disk, offset, len)?;
                let mode = if unmap && discard {
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
                } else {
                    FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
                };
                if len == 0 {
                    Op::Nop
                } else {
                    Op::Fallocate {
                        offset,
                        len,
                        mode,
                        zero_fallback: true,
                        sync,
                    }
                }
            }
            IoOp::WriteSame {
                offset,
                len,
                block,
                sync,
            } => {
                if readonly {
                    return Err(Error::DiskReadOnly);
                }
                let n = block.len();
                if !n.is_power_of_two() || n > PATTERN_SPAN || !len.is_multiple_of(n as u64) {
                    return Err(Error::DiskRequest(
                        "a write-same block must be a power of two up to 64 KiB dividing the range",
                    ));
                }
                check_fallocate_range(&self.disk, offset, len)?;
                if len == 0 {
                    Op::Nop
                } else {
                    let pattern = &mut self.slots[idx].pattern;
                    pattern.clear();
                    pattern.reserve_exact(PATTERN_SPAN + n);
                    while pattern.len() < PATTERN_SPAN + n {
                        pattern.extend_from_slice(block);
                    }
                    Op::PatternFill {
                        start: offset,
                        offset,
                        end: offset + len,
                        block: n as u32,
                        sync,
                    }
                }
            }
        };
        // Once a writeback error is recorded, nothing can be made durable any more: refuse at
        // once what would claim it (the data of a synchronous write may be on the disk, but
        // the write must not be acknowledged as durable).
        let refused = self.disk.writeback_error().is_some() && op.is_durable();
        let inline = !refused
            && self.inline_writes
            && match &op {
                Op::Rw(rw) => {
                    rw.write
                        && rw.flags.is_empty()
                        && !(self.disk.direct.is_some()
                            && direct_aligned(&self.disk, rw.offset, &self.slots[idx].iovecs))
                }
                _ => false,
            };
        self.free.pop();
        self.in_flight += 1;
        let slot = &mut self.slots[idx];
        slot.tag = tag;
        slot.op = op;
        if refused {
            self.finish(idx, Err(Errno::IO.raw_os_error()));
            return Ok(());
        }
        if inline {
            let result = self.write_inline(idx);
            self.finish(idx, result);
            return Ok(());
        }
        if let Err(e) = self.push(idx) {
            self.release(idx);
            return Err(Error::Uring(e.into()));
        }
        Ok(())
    }

    /// Checks a read or write and fills slot `idx`'s iovecs (merging segments that are
    /// contiguous in host memory).
    #[inline]
    fn prepare_rw(
        &mut self,
        idx: usize,
        write: bool,
        offset: u64,
        segments: &[Segment],
    ) -> Result<Op, Error> {
        let iovecs = &mut self.slots[idx].iovecs;
        iovecs.clear();
        let mut total = 0u64;
        for s in segments.iter().filter(|s| s.len != 0) {
            let (ptr, len) = self
                .mem
                .host_iovec(s.gpa, s.len.into())
                .map_err(Error::DiskBuffer)?;
            total = total.saturating_add(s.len.into());
            let base = ptr.as_ptr() as usize;
            match iovecs.last_mut() {
                Some(last) if last.base + last.len == base => last.len += len,
                _ => {
                    if iovecs.len() == IOV_MAX {
                        return Err(Error::DiskRequest("more than 1024 discontiguous segments"));
                    }
                    iovecs.push(RawIovec { base, len });
                }
            }
        }
        let total32 =
            u32::try_from(total).map_err(|_| Error::DiskRequest("a transfer longer than 4 GiB"))?;
        check_range(&self.disk, offset, total)?;
        if total == 0 {
            return Ok(Op::Nop);
        }
        Ok(Op::Rw(Rw {
            write,
            offset,
            first: 0,
            done: 0,
            total: total32,
            flags: ReadWriteFlags::empty(),
            direct_allowed: true,
            submitted_direct: false,
        }))
    }

    /// Does slot `idx`'s buffered write now with `pwritev` (see
    /// [`QueueOptions::inline_buffered_writes`]); returns what its completion would say.
    fn write_inline(&mut self, idx: usize) -> Result<u32, i32> {
        #[cfg(test)]
        {
            self.stats.inline_writes += 1;
        }
        let fd = self.disk.fd(false).as_raw_fd();
        let slot = &mut self.slots[idx];
        let Op::Rw(rw) = &mut slot.op else {
            return Err(Errno::INVAL.raw_os_error());
        };
        while rw.done < rw.total {
            let iov = &slot.iovecs[rw.first.min(slot.iovecs.len())..];
            let offset =
                libc::off_t::try_from(rw.offset).map_err(|_| Errno::INVAL.raw_os_error())?;
            // At most IOV_MAX iovecs (checked by `prepare_rw`), so the count fits a c_int.
            let count = iov.len() as libc::c_int;
            // SAFETY: `RawIovec` has the layout of `struct iovec` (asserted above); each points
            // into guest memory, which `self.mem` keeps mapped for the whole call (or is empty),
            // and the kernel only reads from it: no Rust reference to that memory is formed.
            // The descriptor is kept open by `self.disk`.
            let n = unsafe { libc::pwritev(fd, iov.as_ptr().cast::<libc::iovec>(), count, offset) };
            if n < 0 {
                let e = Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO);
                if e == Errno::INTR {
                    continue;
                }
                return Err(e.raw_os_error());
            }
            if n == 0 {
                // As for a CQE of 0: the disk ended early; report what was done.
                return Ok(rw.done);
            }
            rw.progress(&mut slot.iovecs, u32::try_from(n).unwrap_or(u32::MAX));
        }
        Ok(rw.total)
    }

    /// Submits the queued operations to the kernel; returns how many SQEs were submitted.
    pub fn submit(&mut self) -> Result<usize, Error> {
        if self.ring.submission().is_empty() {
            return Ok(0);
        }
        loop {
            match self.ring.submit() {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Uring(e)),
            }
        }
    }

    /// Appends the completions that are ready to `out` without blocking; returns how many.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        self.drain();
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }

    /// Submits what is queued and blocks until at least `min` completions are ready for `reap`
    /// (or every request has completed, if fewer than `min` are in flight).
    pub fn wait(&mut self, min: usize) -> Result<(), Error> {
        let min = min.min(self.in_flight + self.done.len());
        loop {
            self.drain();
            if self.done.len() >= min {
                return Ok(());
            }
            self.submit_and_wait_one().map_err(Error::Uring)?;
        }
    }

    /// Submits what is queued and waits for a completion; a transient refusal (interrupted,
    /// or the CQ momentarily busy) is not an error: the caller drains and looks again.
    fn submit_and_wait_one(&mut self) -> std::io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Err(e)
                if !matches!(
                    Errno::from_io_error(&e),
                    Some(Errno::INTR | Errno::BUSY | Errno::AGAIN)
                ) =>
            {
                Err(e)
            }
            _ => Ok(()),
        }
    }

    /// Moves the ring's completions into `done`, resubmitting what is left of short transfers.
    fn drain(&mut self) {
        if self.ring.completion().is_empty() {
            return;
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        let mut resubmitted = false;
        for &(user_data, res) in &cqes {
            resubmitted |= self.complete(user_data, res);
        }
        cqes.clear();
        self.cqes = cqes;
        if resubmitted {
            // If this fails, the SQEs stay in the SQ for the next `submit` or `wait`.
            let _ = self.submit();
        }
    }

    /// Handles the CQE of slot `user_data`; returns whether an SQE was pushed for it again.
    fn complete(&mut self, user_data: u64, res: i32) -> bool {
        let Some(slot) = usize::try_from(user_data)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
        else {
            tracing::warn!(user_data, "a completion for no slot");
            return false;
        };
        let idx = user_data as usize;
        let errno = (res < 0).then(|| Errno::from_raw_os_error(-res));
        let transient = matches!(errno, Some(Errno::INTR | Errno::AGAIN));
        let step = match &mut slot.op {
            Op::Free => {
                tracing::warn!(idx, "a completion for a free slot");
                return false;
            }
            Op::Nop | Op::Flush => Step::Done(if res < 0 { Err(-res) } else { Ok(0) }),
            Op::Rw(rw) => {
                if transient {
                    Step::Resubmit
                } else if errno == Some(Errno::INVAL) && rw.submitted_direct {
                    // The file system wants more alignment than it told: go buffered.
                    rw.direct_allowed = false;
                    #[cfg(test)]
                    {
                        self.stats.direct_refused += 1;
                    }
                    Step::Resubmit
                } else if res < 0 {
                    Step::Done(Err(-res))
                } else if res == 0 {
                    // The disk ended early (shrunk behind our back): report what was done.
                    Step::Done(Ok(rw.done))
                } else {
                    if rw.progress(&mut slot.iovecs, res as u32) {
                        Step::Done(Ok(rw.total))
                    } else {
                        #[cfg(test)]
                        {
                            self.stats.short_resubmits += 1;
                        }
                        Step::Resubmit
                    }
                }
            }
            Op::Fallocate {
                offset,
                len,
                zero_fallback,
                sync,
                ..
            } => match errno {
                None if *sync => {
                    slot.op = Op::Flush;
                    Step::Resubmit
                }
                None => Step::Done(Ok(0)),
                Some(_) if transient => Step::Resubmit,
                Some(Errno::OPNOTSUPP) if *zero_fallback => {
                    slot.op = Op::ZeroFill {
                        offset: *offset,
                        end: *offset + *len,
                        sync: *sync,
                    };
                    #[cfg(test)]
                    {
                        self.stats.zero_fill += 1;
                    }
                    Step::Resubmit
                }
                Some(e) => Step::Done(Err(e.raw_os_error())),
            },
            Op::ZeroFill { offset, end, sync }
            | Op::PatternFill {
                offset, end, sync, ..
            } => match errno {
                Some(_) if transient => Step::Resubmit,
                Some(e) => Step::Done(Err(e.raw_os_error())),
                None if res == 0 => Step::Done(Err(Errno::IO.raw_os_error())),
                None => {
                    *offset += res as u64;
                    if *offset >= *end && *sync {
                        slot.op = Op::Flush;
                        Step::Resubmit
                    } else if *offset >= *end {
                        Step::Done(Ok(0))
                    } else {
                        Step::Resubmit
                    }
                }
            },
        };
        if self.abandoned && matches!(step, Step::Resubmit) {
            // No further step (see `abandon`); not a writeback error: nothing was acknowledged.
            let tag = self.slots[idx].tag;
            let result = Err(Errno::CANCELED.raw_os_error());
            self.done.push(Completion { tag, result });
            self.release(idx);
            return false;
        }
        match step {
            Step::Done(result) => {
                self.finish(idx, result);
                false
            }
            Step::Resubmit => match self.push(idx) {
                Ok(()) => true,
                Err(e) => {
                    self.finish(idx, Err(e.raw_os_error()));
                    false
                }
            },
        }
    }

    /// Completes slot `idx` with `result` and frees it. A failed flush or synchronous write
    /// records a writeback error on the disk.
    #[inline]
    fn finish(&mut self, idx: usize, result: Result<u32, i32>) {
        if let Err(e) = result {
            if self.slots[idx].op.syncs() {
                self.disk.record_writeback_error(e);
            }
        }
        let tag = self.slots[idx].tag;
        self.done.push(Completion { tag, result });
        self.release(idx);
    }

    /// Frees slot `idx` (the kernel is done with it).
    #[inline]
    fn release(&mut self, idx: usize) {
        let slot = &mut self.slots[idx];
        slot.op = Op::Free;
        slot.iovecs.clear();
        self.free.push(idx as u32);
        self.in_flight -= 1;
    }

    /// Pushes the SQE for the current state of slot `idx`.
    #[inline]
    fn push(&mut self, idx: usize) -> Result<(), Errno> {
        let entry =
            build_entry(&mut self.slots[idx], &self.disk, self.fixed_files).user_data(idx as u64);
        #[cfg(test)]
        self.count(idx);
        for _ in 0..2 {
            // SAFETY: every pointer in `entry` stays valid until its CQE is reaped, which is what
            // io_uring needs. The iovec array is slot `idx`'s, owned by the in-flight table: a
            // slot is neither cleared nor reused before `complete` handles the CQE of this SQE
            // (then, for a resubmission, a new SQE is pushed before anything else touches the
            // array), and `Drop` waits for every CQE before the table is freed. The buffers are
            // guest memory, kept mapped by `self.mem` (an `Arc` that this queue holds at least
            // as long as anything is in flight; its regions cannot be removed while shared), or
            // the `'static` `ZEROS`, or the slot's own `pattern` (filled when the request was
            // queued, not touched again before its final CQE; its `PATTERN_SPAN` bytes and one
            // block more cover every iovec built over it). The descriptors are kept open by
            // `self.disk`.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            // Cannot happen (the SQ has a place for every slot); make room anyway.
            let _ = self.ring.submit();
        }
        Err(Errno::BUSY)
    }
}

#[cfg(test)]
impl DiskQueue {
    /// Counts the SQE just built for slot `idx`.
    fn count(&mut self, idx: usize) {
        if let Op::Rw(rw) = self.slots[idx].op {
            if self.fixed_files {
                self.stats.fixed_file += 1;
            }
            if rw.submitted_direct {
                self.stats.direct += 1;
            } else {
                self.stats.buffered += 1;
            }
        }
    }
}

impl std::fmt::Debug for DiskQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskQueue")
            .field("disk", &self.disk)
            .field("depth", &self.slots.len())
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl Drop for DiskQueue {
    fn drop(&mut self) {
        while self.in_flight > 0 {
            self.drain();
            if self.in_flight == 0 {
                break;
            }
            if let Err(e) = self.submit_and_wait_one() {
                // The kernel may still use the iovecs and guest memory: leak them rather
                // than free memory that it could write into.
                tracing::error!(error = %e, in_flight = self.in_flight, "cannot wait for disk I/O in flight; leaking its buffers");
                std::mem::forget(Arc::clone(&self.mem));
                std::mem::forget(std::mem::take(&mut self.slots));
                return;
            }
        }
    }
}

/// Refuses a range that is not inside the disk.
fn check_range(disk: &DiskFile, offset: u64, len: u64) -> Result<(), Error> {
    if offset.checked_add(len).is_some_and(|end| end <= disk.size) {
        Ok(())
    } else {
        Err(Error::DiskRange {
            offset,
            len,
            size: disk.size,
        })
    }
}

/// Refuses a range for `fallocate` that is not inside the disk, or that a block device cannot
/// take (it wants whole logical blocks).
fn check_fallocate_range(disk: &DiskFile, offset: u64, len: u64) -> Result<(), Error> {
    check_range(disk, offset, len)?;
    let bs = u64::from(disk.block_size);
    if disk.block_device && !(offset.is_multiple_of(bs) && len.is_multiple_of(bs)) {
        return Err(Error::DiskRequest("not aligned to the block size"));
    }
    Ok(())
}

/// Skips `n` transferred bytes of `iovecs[*first..]`.
fn advance(iovecs: &mut [RawIovec], first: &mut usize, mut n: usize) {
    while n > 0 {
        let Some(v) = iovecs.get_mut(*first) else {
            return;
        };
        if n >= v.len {
            n -= v.len;
            *first += 1;
        } else {
            v.base += n;
            v.len -= n;
            n = 0;
        }
    }
}

/// Whether `O_DIRECT` can take this transfer.
fn direct_aligned(disk: &DiskFile, offset: u64, iovecs: &[RawIovec]) -> bool {
    let oa = disk.dio_offset_align as usize;
    let ma = disk.dio_mem_align as usize;
    offset.is_multiple_of(oa as u64)
        && iovecs
            .iter()
            .all(|v| v.base.is_multiple_of(ma) && v.len.is_multiple_of(oa))
}

/// Which of the disk's descriptors an SQE names, and how.
#[derive(Clone, Copy)]
enum FileRef {
    /// A descriptor number.
    Plain(std::os::fd::RawFd),
    /// An index into the ring's registered files.
    Fixed(u32),
}

impl FileRef {
    fn of(disk: &DiskFile, direct: bool, fixed: bool) -> Self {
        let direct = direct && disk.direct.is_some();
        if fixed {
            Self::Fixed(u32::from(direct))
        } else {
            Self::Plain(disk.fd(direct).as_raw_fd())
        }
    }
}

/// `$build` with `$fd` bound to `$file` as the opcode builders take it (`types::Fd` or
/// `types::Fixed`, two types).
macro_rules! with_file {
    ($file:expr, |$fd:ident| $build:expr) => {
        match $file {
            FileRef::Plain(raw) => {
                let $fd = types::Fd(raw);
                $build
            }
            FileRef::Fixed(index) => {
                let $fd = types::Fixed(index);
                $build
            }
        }
    };
}

/// The SQE for the current state of `slot` (without its `user_data`), naming the disk's
/// descriptors by their registered index if `fixed`. Records in the slot which descriptor a
/// read or write goes through.
fn build_entry(slot: &mut Slot, disk: &DiskFile, fixed: bool) -> squeue::Entry {
    let buffered = FileRef::of(disk, false, fixed);
    match &mut slot.op {
        Op::Free | Op::Nop => opcode::Nop::new().build(),
        Op::Flush => with_file!(buffered, |fd| opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()),
        Op::Fallocate {
            offset, len, mode, ..
        } => with_file!(buffered, |fd| opcode::Fallocate::new(fd, *len)
            .offset(*offset)
            .mode(mode.bits() as i32)
            .build()),
        Op::PatternFill {
            start,
            offset,
            end,
            block,
            ..
        } => {
            // Resume mid-block after a short write: start that far into the pattern.
            let phase = ((*offset - *start) % u64::from(*block)) as usize;
            let base = slot.pattern.as_ptr() as usize + phase;
            let iovecs = &mut slot.iovecs;
            iovecs.clear();
            let mut left = (*end - *offset).min(ZERO_FILL_CHUNK) as usize;
            while left > 0 {
                let n = left.min(PATTERN_SPAN);
                iovecs.push(RawIovec { base, len: n });
                left -= n;
            }
            vectored(buffered, true, iovecs, *offset, 0)
        }
        Op::ZeroFill { offset, end, .. } => {
            let iovecs = &mut slot.iovecs;
            iovecs.clear();
            let mut left = (*end - *offset).min(ZERO_FILL_CHUNK) as usize;
            while left > 0 {
                let n = left.min(ZEROS.len());
                iovecs.push(RawIovec {
                    base: ZEROS.as_ptr() as usize,
                    len: n,
                });
                left -= n;
            }
            vectored(buffered, true, iovecs, *offset, 0)
        }
        Op::Rw(rw) => {
            let iov = &slot.iovecs[rw.first.min(slot.iovecs.len())..];
            let direct =
                rw.direct_allowed && disk.direct.is_some() && direct_aligned(disk, rw.offset, iov);
            rw.submitted_direct = direct;
            let file = FileRef::of(disk, direct, fixed);
            let flags = rw.flags.bits() as i32;
            // One segment (a 4 KiB request, say): a plain read or write, which spares the
            // kernel copying and importing an iovec array.
            if let [one] = iov {
                if let Ok(len) = u32::try_from(one.len) {
                    let buf = one.base as *mut u8;
                    return with_file!(file, |fd| if rw.write {
                        opcode::Write::new(fd, buf.cast_const(), len)
                            .offset(rw.offset)
                            .rw_flags(flags)
                            .build()
                    } else {
                        opcode::Read::new(fd, buf, len)
                            .offset(rw.offset)
                            .rw_flags(flags)
                            .build()
                    });
                }
            }
            vectored(file, rw.write, iov, rw.offset, flags)
        }
    }
}

/// A `writev` (or `readv`) SQE of `iov` at `offset` with `RWF_*` flags `flags` (0: none).
fn vectored(
    file: FileRef,
    write: bool,
    iov: &[RawIovec],
    offset: u64,
    flags: i32,
) -> squeue::Entry {
    let (ptr, n) = (iov.as_ptr().cast(), iov.len() as u32);
    with_file!(file, |fd| if write {
        opcode::Writev::new(fd, ptr, n)
            .offset(offset)
            .rw_flags(flags)
            .build()
    } else {
        opcode::Readv::new(fd, ptr, n)
            .offset(offset)
            .rw_flags(flags)
            .build()
    })
}

#[cfg(test)]
pub(super) mod tests_support {
    use super::{advance, RawIovec};

    /// Runs `advance` over iovecs of lengths `lens`; returns the first iovec left and the
    /// lengths after.
    pub fn advance_lens(lens: &[usize], n: usize) -> (usize, Vec<usize>) {
        let mut iovecs: Vec<RawIovec> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| RawIovec {
                base: 4096 * (i + 1),
                len,
            })
            .collect();
        let mut first = 0;
        advance(&mut iovecs, &mut first, n);
        (first, iovecs.iter().map(|v| v.len).collect())
    }
}
