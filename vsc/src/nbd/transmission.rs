//! The transmission phase: requests decoded by the connection's thread, executed by a few worker
//! threads, simple replies written under a lock on the socket.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, Scope};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use super::proto::*;
use super::{BlockDevice, Export, IoError, Limits, ReadData};
use crate::queue::{QueueSource, SourcePoll};

/// Locks, ignoring poisoning (every critical section here leaves its data consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A byte budget: bounds the request data held in memory. Taking and giving back bytes is
/// lock-free (the reader takes, completions give back, on other threads); only a taker that
/// must wait for bytes to be freed takes the lock.
pub(crate) struct Budget {
    cap: u64,
    used: AtomicU64,
    /// Takers waiting (under `lock`) for bytes to be freed.
    waiters: AtomicU32,
    lock: Mutex<()>,
    freed: Condvar,
}

impl Budget {
    pub(crate) fn new(cap: u64) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            used: AtomicU64::new(0),
            waiters: AtomicU32::new(0),
            lock: Mutex::new(()),
            freed: Condvar::new(),
        })
    }

    /// Whether a request of `n` bytes fits in this budget at all.
    fn fits(&self, n: u64) -> bool {
        n <= self.cap
    }

    /// Takes `n` bytes if they are free now.
    pub(crate) fn try_take(&self, n: u64) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur + n > self.cap {
                return false;
            }
            match self
                .used
                .compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Takes `n` bytes (at most the whole budget) if they are free now.
    pub(crate) fn try_acquire(self: &Arc<Self>, n: u64) -> Option<Permit> {
        let n = n.min(self.cap);
        (n == 0 || self.try_take(n)).then(|| Permit {
            budget: Arc::clone(self),
            n,
        })
    }

    /// Waits until `n` bytes (at most the whole budget) are free and takes them.
    pub(crate) fn acquire(self: &Arc<Self>, n: u64) -> Permit {
        let n = n.min(self.cap);
        while n > 0 && !self.try_take(n) {
            let mut g = lock(&self.lock);
            // SeqCst: with the releaser's SeqCst subtraction and load of `waiters`, either it
            // sees this waiter (and notifies under the lock), or the load below sees its bytes.
            self.waiters.fetch_add(1, Ordering::SeqCst);
            while self.used.load(Ordering::SeqCst) + n > self.cap {
                g = self.freed.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            self.waiters.fetch_sub(1, Ordering::SeqCst);
        }
        Permit {
            budget: Arc::clone(self),
            n,
        }
    }
}

/// Bytes taken from a [`Budget`], given back on drop.
pub(crate) struct Permit {
    budget: Arc<Budget>,
    n: u64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.n > 0 {
            let b = &self.budget;
            b.used.fetch_sub(self.n, Ordering::SeqCst);
            // Waking is a system call: only when somebody waits (see `Budget::acquire`).
            if b.waiters.load(Ordering::SeqCst) > 0 {
                let _g = lock(&b.lock);
                b.freed.notify_all();
            }
        }
    }
}

/// What every connection of a server shares: the server-wide byte budget and the worker threads.
pub(crate) struct Pool {
    /// Request data held by all connections beyond their reserves ([`Limits::server_budget`]).
    pub(crate) budget: Arc<Budget>,
    /// Worker threads running, for all connections.
    workers: AtomicUsize,
    /// [`Limits::max_workers`].
    max_workers: usize,
}

impl Pool {
    pub(crate) fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            budget: Budget::new(limits.server_budget),
            workers: AtomicUsize::new(0),
            max_workers: limits.max_workers,
        })
    }

    /// Takes a worker thread's slot if the server has one free.
    fn take_worker(&self) -> Option<WorkerSlot<'_>> {
        let mut cur = self.workers.load(Ordering::Relaxed);
        loop {
            if cur >= self.max_workers {
                return None;
            }
            match self.workers.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(WorkerSlot(self)),
                Err(now) => cur = now,
            }
        }
    }
}

/// A worker thread's place in [`Pool::workers`], given back when the thread ends.
struct WorkerSlot<'a>(&'a Pool);

impl Drop for WorkerSlot<'_> {
    fn drop(&mut self) {
        self.0.workers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request's share of the server's memory: from the connection's own reserve where it fits
/// there and is free (so that a connection always makes progress, whatever the others hold),
/// else from the budget all connections share. `None`: neither has room now.
fn try_take_shared(reserve: Option<&Arc<Budget>>, shared: &Arc<Budget>, n: u64) -> Option<Permit> {
    if let Some(r) = reserve.filter(|r| r.fits(n)) {
        if let Some(p) = r.try_acquire(n) {
            return Some(p);
        }
    }
    shared.try_acquire(n)
}

/// [`try_take_shared`], waiting for room: for the reserve where the request fits there (it is
/// freed by this connection's own replies), else for the shared budget.
fn take_shared(reserve: Option<&Arc<Budget>>, shared: &Arc<Budget>, n: u64) -> Permit {
    if let Some(p) = try_take_shared(reserve, shared, n) {
        return p;
    }
    match reserve.filter(|r| r.fits(n)) {
        Some(r) => r.acquire(n),
        None => shared.acquire(n),
    }
}

/// What a worker does.
enum Op {
    Read,
    Write(Vec<u8>),
    Flush,
    Trim,
    WriteZeroes { may_trim: bool },
}

/// A validated request on its way to a worker.
struct Job {
    op: Op,
    cookie: u64,
    offset: u64,
    len: u32,
    fua: bool,
    _permits: (Permit, Permit),
}

/// Where replies go: the socket (an owned clone, so asynchronous completions can write after
/// the reader has moved on), written whole under a lock; with a batching device, the replies
/// of asynchronous completions wait in `pending` for the device's batch hook to send them
/// together.
struct Replies {
    /// The socket, held for writing.
    writer: Mutex<Output>,
    /// Replies of asynchronous completions not sent yet (never held during I/O, so a
    /// completion never waits for a socket write).
    pending: Mutex<Pending>,
    /// Whether `pending` may hold replies (see [`Replies::flush`]).
    has_pending: AtomicBool,
    /// Asynchronous completions queue their replies (set once, before the first request).
    batched: AtomicBool,
    /// Requests accepted and not yet answered.
    outstanding: AtomicUsize,
    /// A reply could not be written: the connection is over.
    broken: AtomicBool,
    /// Signalled when `outstanding` drops to zero, if `idle_waiters` says someone waits.
    idle: Condvar,
    idle_lock: Mutex<()>,
    /// Threads in [`wait_idle`](Self::wait_idle) (only at a connection's end).
    idle_waiters: AtomicUsize,
    /// Write buffers given back by completions, for the reader's next writes: a buffer freed
    /// on the completion's thread would take the allocator's lock against the reader's
    /// allocations.
    buffers: ArrayQueue<Vec<u8>>,
    /// Wakes the event loop running the connection's source (set once it is attached): a
    /// flush that leaves replies on a full socket calls it, so the source retries them.
    waker: std::sync::OnceLock<crate::queue::SourceWaker>,
    /// How long a reply may wait for a client that takes none of it ([`Limits::reply_timeout`]).
    reply_timeout: Duration,
    /// When the last batch of replies was written (with the latency breakdown).
    replied_at: Mutex<Option<std::time::Instant>>,
}

/// Write buffers kept for reuse per connection.
const POOLED_BUFFERS: usize = 128;
/// Largest write buffer kept for reuse.
const POOLED_BUFFER_MAX: usize = 128 * 1024;

struct Output {
    stream: UnixStream,
    /// The pending replies being written (swapped with `Replies::pending`, so both buffers
    /// keep their allocations); their permits are released once they are written.
    writing: Pending,
    /// Bytes of `writing` already sent (a flush stops where the socket is full).
    written: usize,
    /// Since when the client has taken none of `writing` (a flush found the socket full and
    /// it has not drained since): past the reply timeout the connection is ended.
    stalled_since: Option<std::time::Instant>,
}

impl Output {
    /// Drops what is being written (sent, or given up) and its budget.
    fn clear(&mut self) {
        self.writing.bytes.clear();
        self.writing.permits.clear();
        self.written = 0;
        self.stalled_since = None;
    }
}

/// Whole replies waiting to be written, and the budget bytes they hold: a client that does
/// not read its replies makes the reader wait for budget, not this buffer grow.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    permits: Vec<(Permit, Permit)>,
    /// When its first reply was queued (with the latency breakdown).
    since: Option<std::time::Instant>,
}

/// The NBD hop of the latency breakdown (`vscd --latency-breakdown`): from a batch's first
/// reply queued (its completion's callback) to the start of the batch's write to the socket.
pub static HOP_REPLY: ringbuf::latency::Hop =
    ringbuf::latency::Hop::new("vscd nbd: completion -> reply write starts");
/// From the last reply's write, with nothing outstanding, to the next request read: at QD1,
/// the client's turn, the socket both ways and how soon the queue thread looks at it.
pub static HOP_TURN: ringbuf::latency::Hop =
    ringbuf::latency::Hop::new("vscd nbd: reply write -> next request read (idle connection)");

impl Replies {
    /// Sends a reply (header, and data for a successful read) in one piece.
    fn send(&self, buf: &[u8]) -> io::Result<()> {
        self.send_parts(&mut [io::IoSlice::new(buf)])
    }

    /// Sends a reply made of several parts (a header and the data it precedes) in one piece,
    /// with one `writev` where the socket takes it all; then the pending replies a batch hook
    /// left because this thread held the socket.
    fn send_parts(&self, parts: &mut [io::IoSlice<'_>]) -> io::Result<()> {
        let r = {
            let mut out = lock(&self.writer);
            // What a flush left goes first: the stream stays in order.
            self.write_out(&mut out, true);
            let r = write_all_within(&out.stream, parts, self.reply_timeout);
            self.check(&out.stream, r)
        };
        self.flush();
        r
    }

    /// The reply of an asynchronous completion (and the budget it holds): left for the batch
    /// hook when batched, else sent now.
    fn reply_async(&self, parts: &[&[u8]], permits: (Permit, Permit)) {
        if self.batched.load(Ordering::Relaxed) {
            self.pend(permits, |bytes| {
                for part in parts {
                    bytes.extend_from_slice(part);
                }
            });
        } else {
            let mut slices: Vec<io::IoSlice<'_>> =
                parts.iter().map(|p| io::IoSlice::new(p)).collect();
            let _ = self.send_parts(&mut slices);
            drop(permits);
        }
    }

    /// The reply of a successful asynchronous read, as [`reply_async`](Self::reply_async): the
    /// data is copied from where the device holds it straight into the pending replies (or
    /// the one buffer sent). If it cannot be copied, the reply is an error.
    fn reply_read_async(&self, cookie: u64, data: &dyn ReadData, permits: (Permit, Permit)) {
        let reply = |bytes: &mut Vec<u8>| {
            let start = bytes.len();
            bytes.resize(start + REPLY_LEN, 0);
            encode_simple_reply(&mut bytes[start..], 0, cookie);
            if let Err(e) = data.append_to(bytes) {
                bytes.truncate(start);
                bytes.extend_from_slice(&error_reply(e, cookie));
            }
        };
        if self.batched.load(Ordering::Relaxed) {
            self.pend(permits, reply);
        } else {
            let mut bytes = Vec::with_capacity(REPLY_LEN + data.len());
            reply(&mut bytes);
            let _ = self.send(&bytes);
            drop(permits);
        }
    }

    /// Appends a reply (written by `put`) to the pending ones, for the batch hook to send.
    fn pend(&self, permits: (Permit, Permit), put: impl FnOnce(&mut Vec<u8>)) {
        {
            let mut p = lock(&self.pending);
            if p.bytes.is_empty() {
                p.since = ringbuf::latency::now();
            }
            put(&mut p.bytes);
            p.permits.push(permits);
        }
        self.has_pending.store(true, Ordering::SeqCst);
    }

    /// A buffer of `len` bytes for a write's payload (a reused one where there is one).
    fn take_buffer(&self, len: u32) -> Vec<u8> {
        let mut data = self.buffers.pop().unwrap_or_default();
        data.clear();
        data.resize(len as usize, 0);
        data
    }

    /// Keeps a write's buffer for reuse (unless the pool is full or the buffer is big).
    fn recycle(&self, buffer: Vec<u8>) {
        if buffer.capacity() > 0 && buffer.capacity() <= POOLED_BUFFER_MAX {
            let _ = self.buffers.push(buffer);
        }
    }

    /// Sends the replies left by asynchronous completions, in one write. Never waits for the
    /// socket, so a storvsc queue thread running this (as a batch hook, or an event source) is
    /// never held up by one connection:
    /// - if another thread holds it (a worker's reply, possibly blocked by a client that does
    ///   not read), that thread sends them when it lets go (`send_parts` flushes after
    ///   unlocking);
    /// - if the socket is full (a client that does not read), the rest stays in `writing` with
    ///   its budget, `has_pending` stays set, and a later flush sends it (the event source
    ///   retries every millisecond meanwhile; see [`EventSource::run`]).
    ///
    /// SeqCst fences pair "set `has_pending`; try the lock" with "unlock; load `has_pending`":
    /// either the lock is free to the one, or the other sees the flag.
    fn flush(&self) {
        loop {
            fence(Ordering::SeqCst);
            if !self.has_pending.load(Ordering::SeqCst) {
                return;
            }
            let mut out = match self.writer.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            self.has_pending.store(false, Ordering::SeqCst);
            if self.write_pending(&mut out, false) {
                continue;
            }
            // The socket is full: keep the rest for a later flush, by the source (which may be
            // asleep if this is another thread).
            self.has_pending.store(true, Ordering::SeqCst);
            drop(out);
            if let Some(wake) = self.waker.get() {
                wake();
            }
            return;
        }
    }

    /// Writes what an earlier flush left, then the pending replies (see [`Self::write_out`]):
    /// true once they are all out.
    fn write_pending(&self, out: &mut Output, wait: bool) -> bool {
        if !self.write_out(out, wait) {
            return false;
        }
        std::mem::swap(&mut *lock(&self.pending), &mut out.writing);
        let since = out.writing.since.take();
        if since.is_some() {
            // Stamped before the write: once it returns, the client may already have had the
            // core (and sent its next request).
            let t = ringbuf::latency::now();
            HOP_REPLY.between(since, t);
            *lock(&self.replied_at) = t;
        }
        self.write_out(out, wait)
    }

    /// Writes the rest of `out.writing` (waiting for the socket with `wait`, else only what it
    /// takes now): true once it is all out (or the connection broke), and its permits are
    /// released.
    fn write_out(&self, out: &mut Output, wait: bool) -> bool {
        use rustix::net::{send, SendFlags};
        let Output {
            stream,
            writing,
            written,
            stalled_since,
        } = &mut *out;
        if wait {
            let rest = &writing.bytes[*written..];
            let r = write_all_within(stream, &mut [io::IoSlice::new(rest)], self.reply_timeout);
            let _ = self.check(stream, r);
            out.clear();
            return true;
        }
        let mut moved = false;
        while *written < writing.bytes.len() {
            let rest = &writing.bytes[*written..];
            let r = send(&*stream, rest, SendFlags::DONTWAIT | SendFlags::NOSIGNAL);
            match r.map_err(io::Error::from) {
                Ok(0) => {
                    let _ = self.check(stream, Err(io::ErrorKind::WriteZero.into()));
                    break;
                }
                Ok(n) => {
                    *written += n;
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The stall starts now, or starts again if the client took some.
                    if moved || stalled_since.is_none() {
                        *stalled_since = Some(std::time::Instant::now());
                    }
                    return false;
                }
                Err(e) => {
                    let _ = self.check(stream, Err(e));
                    break;
                }
            }
        }
        out.clear();
        true
    }

    /// Ends the connection if its replies have waited on a full socket for longer than
    /// `timeout` (a client that stopped reading: its budget is freed for the others). Never
    /// waits for the lock: whoever holds it is writing.
    fn expire_stall(&self, timeout: std::time::Duration) {
        let Ok(mut out) = self.writer.try_lock() else {
            return;
        };
        if out.stalled_since.is_some_and(|t| t.elapsed() >= timeout) {
            tracing::info!("NBD client took no reply for {timeout:?}: closing the connection");
            let _ = self.check(&out.stream, Err(io::ErrorKind::TimedOut.into()));
            out.clear();
            drop(out);
            // The replies queued since are for a closed connection too.
            *lock(&self.pending) = Pending::default();
            self.has_pending.store(false, Ordering::SeqCst);
        }
    }

    /// Sends every pending reply, waiting for the socket (at the end of a connection).
    fn flush_all(&self) {
        let mut out = lock(&self.writer);
        self.has_pending.store(false, Ordering::SeqCst);
        self.write_pending(&mut out, true);
    }

    /// A failed write ends the connection: the reader is woken by the shutdown.
    fn check(&self, stream: &UnixStream, r: io::Result<()>) -> io::Result<()> {
        if r.is_err() && !self.broken.swap(true, Ordering::SeqCst) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        r
    }

    /// One request answered.
    fn done(&self) {
        // Waking is a system call (a futex wake even with nobody waiting), and at queue depth
        // 1 every request ends here: only when someone waits. SeqCst: with the waiter's
        // SeqCst increment and load of `outstanding` (see `wait_idle`), either this load sees
        // the waiter (and notifies under the lock, which the waiter holds until it waits) or
        // the waiter's load sees this decrement.
        if self.outstanding.fetch_sub(1, Ordering::SeqCst) == 1
            && self.idle_waiters.load(Ordering::SeqCst) > 0
        {
            let _g = lock(&self.idle_lock);
            self.idle.notify_all();
        }
    }

    /// Waits until every accepted request is answered (or `timeout` passes).
    fn wait_idle(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = lock(&self.idle_lock);
        self.idle_waiters.fetch_add(1, Ordering::SeqCst);
        while self.outstanding.load(Ordering::SeqCst) != 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            g = self
                .idle
                .wait_timeout(g, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        self.idle_waiters.fetch_sub(1, Ordering::SeqCst);
        drop(g);
    }
}

/// State shared by the connection's reader (or event source) and its workers.
#[derive(Clone)]
struct Conn {
    replies: Arc<Replies>,
    device: Arc<dyn BlockDevice>,
}

impl Conn {
    /// Sends a reply (header, and data for a successful read) in one piece.
    fn send(&self, buf: &[u8]) -> io::Result<()> {
        self.replies.send(buf)
    }

    fn send_error(&self, errno: u32, cookie: u64) -> io::Result<()> {
        let mut b = [0u8; REPLY_LEN];
        encode_simple_reply(&mut b, errno, cookie);
        self.send(&b)
    }

    /// Executes a job and answers it.
    fn execute(&self, job: Job) {
        let dev = &*self.device;
        let (offset, len, fua) = (job.offset, job.len, job.fua);
        let reply = catch_unwind(AssertUnwindSafe(|| match job.op {
            Op::Read => {
                let mut buf = vec![0u8; REPLY_LEN + len as usize];
                match dev.read(offset, &mut buf[REPLY_LEN..]) {
                    Ok(()) => {
                        encode_simple_reply(&mut buf, 0, job.cookie);
                        buf
                    }
                    Err(e) => error_reply(e, job.cookie),
                }
            }
            Op::Write(ref data) => status_reply(dev.write(offset, data, fua), job.cookie),
            Op::Flush => status_reply(dev.flush(), job.cookie),
            Op::Trim => {
                let r = dev.trim(offset, u64::from(len));
                let r = r.and_then(|()| if fua { dev.flush() } else { Ok(()) });
                status_reply(r, job.cookie)
            }
            Op::WriteZeroes { may_trim } => status_reply(
                dev.write_zeroes(offset, u64::from(len), may_trim, fua),
                job.cookie,
            ),
        }))
        .unwrap_or_else(|_| {
            tracing::error!("NBD block device panicked; answering EIO");
            error_reply(IoError::Io, job.cookie)
        });
        // The permits are released once the reply is out.
        let _ = self.send(&reply);
        self.replies.done();
    }

    /// Starts a read or write on the device's asynchronous path; the completion writes the
    /// reply. Returns the job back if it does not qualify.
    fn start_async(&self, job: Job) -> Option<Job> {
        let limit = self.device.async_limit();
        if limit == 0 || job.len > limit || !matches!(job.op, Op::Read | Op::Write(_)) {
            return Some(job);
        }
        let replies = self.replies.clone();
        let Job {
            op,
            cookie,
            offset,
            len,
            fua,
            _permits,
        } = job;
        match op {
            Op::Read => self.device.read_async(
                offset,
                len,
                Box::new(move |r| {
                    match r {
                        Ok(data) if data.len() == len as usize => {
                            replies.reply_read_async(cookie, data, _permits);
                        }
                        Ok(_) => {
                            replies.reply_async(&[&error_reply(IoError::Io, cookie)], _permits)
                        }
                        Err(e) => replies.reply_async(&[&error_reply(e, cookie)], _permits),
                    }
                    replies.done();
                }),
            ),
            Op::Write(data) => self.device.write_async(
                offset,
                data,
                fua,
                Box::new(move |r, buffer| {
                    replies.recycle(buffer);
                    replies.reply_async(&[&status_reply(r, cookie)], _permits);
                    replies.done();
                }),
            ),
            _ => unreachable!("checked above"),
        }
        None
    }
}

/// `write_all` for several buffers on a socket: non-blocking `sendmsg` until every byte is out,
/// waiting for room in between. Fails with `TimedOut` once the socket has stayed full for
/// `timeout` (the client took none of it): the reply timeout bounds each stall, not the
/// whole reply, so a client that reads slowly is served and one that does not read is let go
/// after one timeout, whatever the size of the reply.
fn write_all_within(
    stream: &UnixStream,
    mut parts: &mut [io::IoSlice<'_>],
    timeout: Duration,
) -> io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendFlags};
    io::IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
        match sendmsg(stream, parts, &mut SendAncillaryBuffer::default(), flags) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut parts, n),
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => wait_writable(stream, timeout)?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Waits until `stream` has room (or is closed), for at most `timeout`.
fn wait_writable(stream: &UnixStream, timeout: Duration) -> io::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no reply within the reply timeout",
            ));
        }
        let ts = Timespec::try_from(left).unwrap_or(Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        });
        let mut fds = [PollFd::new(stream, PollFlags::OUT)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => {}
            Ok(_) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

fn status_reply(r: Result<(), IoError>, cookie: u64) -> Vec<u8> {
    match r {
        Ok(()) => {
            let mut b = vec![0u8; REPLY_LEN];
            encode_simple_reply(&mut b, 0, cookie);
            b
        }
        Err(e) => error_reply(e, cookie),
    }
}

fn error_reply(e: IoError, cookie: u64) -> Vec<u8> {
    let mut b = vec![0u8; REPLY_LEN];
    encode_simple_reply(&mut b, e.errno(), cookie);
    b
}

/// Checks a request against the export: `Err(errno)` is answered without touching the device.
fn check(req: &Request, dev: &dyn BlockDevice) -> Result<(), u32> {
    let ro = dev.read_only();
    let allowed = match req.kind {
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => return Err(EINVAL),
    };
    if req.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    match req.kind {
        // Offset and length of a flush are reserved: ignored.
        CMD_FLUSH => return Ok(()),
        CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM if ro => return Err(EPERM),
        CMD_TRIM if !dev.supports_trim() => return Err(EINVAL),
        _ => {}
    }
    if req.len == 0 {
        return Err(EINVAL);
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE) && req.len > MAX_REQUEST {
        return Err(EINVAL);
    }
    let writes = matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES);
    match req.offset.checked_add(u64::from(req.len)) {
        Some(end) if end <= dev.size() => {}
        _ => return Err(if writes { ENOSPC } else { EINVAL }),
    }
    let bs = u64::from(dev.block_size().max(1));
    if !req.offset.is_multiple_of(bs) || !u64::from(req.len).is_multiple_of(bs) {
        return Err(EINVAL);
    }
    Ok(())
}

/// Reads a request header; `None` on a clean end of stream before it.
fn read_header<R: Read>(r: &mut R) -> io::Result<Option<[u8; REQUEST_LEN]>> {
    let mut b = [0u8; REQUEST_LEN];
    let mut got = 0;
    while got < REQUEST_LEN {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(b))
}

/// Spins between two attempts to read the socket while polling it.
const SOCKET_POLL_EVERY: u32 = 32;
/// The reader's buffer.
const READ_BUFFER: usize = 64 * 1024;

/// The connection's input: a buffer filled by non-blocking reads while the poller's window
/// lasts (each attempt that finds bytes is the read itself: no separate look), then by a
/// blocking read. With requests in flight the client's next one is due soon (it sends as
/// replies come), so polling saves a wakeup per request at high queue depths.
struct Input<'a> {
    stream: &'a UnixStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    poller: ringbuf::poller::Poller,
    /// Requests of this connection not yet answered (polling is longer while there are).
    outstanding: &'a AtomicUsize,
}

impl<'a> Input<'a> {
    fn new(stream: &'a UnixStream, outstanding: &'a AtomicUsize) -> Self {
        Self {
            stream,
            buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            poller: {
                // It serves requests: with none outstanding, it yields the core at every
                // clock read, to the client its last reply woke if that one waits for it (as
                // a queue thread serving a source does).
                let mut p = ringbuf::poller::Poller::default();
                p.set_serves_requests(true);
                p.set_clients_nearby(true);
                p
            },
            outstanding,
        }
    }

    /// Reads into `out`: polled non-blocking reads, then a blocking one.
    fn recv_into(&mut self, out: &mut [u8]) -> io::Result<usize> {
        use rustix::net::{recv, RecvFlags};
        let busy = self.outstanding.load(Ordering::Relaxed) > 0;
        let mut spins = 0u32;
        loop {
            if spins.is_multiple_of(SOCKET_POLL_EVERY) {
                match recv(self.stream, &mut *out, RecvFlags::DONTWAIT) {
                    Ok((n, _)) => {
                        self.poller.busy();
                        return Ok(n);
                    }
                    Err(rustix::io::Errno::AGAIN) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            spins = spins.wrapping_add(1);
            if !self.poller.idle(busy) {
                break;
            }
        }
        loop {
            match recv(self.stream, &mut *out, RecvFlags::empty()) {
                Ok((n, _)) => return Ok(n),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Read for Input<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            if out.len() >= self.buf.len() {
                // A large payload: straight into its buffer.
                return self.recv_into(out);
            }
            let mut buf = std::mem::take(&mut self.buf);
            let got = self.recv_into(&mut buf);
            self.buf = buf;
            self.start = 0;
            self.end = got?;
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

/// Reads and throws away `n` bytes (the payload of a refused write).
fn drain<R: Read>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Serves requests on `stream` for `export` until the client disconnects or breaks the protocol.
///
/// Where the device has an event loop (see [`BlockDevice::attach_source`]) the requests are read
/// and started there, by an [`EventSource`], and this thread only runs what cannot be started
/// without blocking (flushes, trims, zeroing, over-size requests) on its workers. Elsewhere this
/// thread reads the requests itself.
pub(crate) fn serve(
    stream: &UnixStream,
    export: &Export,
    limits: &Limits,
    pool: &Arc<Pool>,
) -> io::Result<()> {
    let global = &pool.budget;
    let replies = Arc::new(Replies {
        writer: Mutex::new(Output {
            stream: stream.try_clone()?,
            writing: Pending::default(),
            written: 0,
            stalled_since: None,
        }),
        pending: Mutex::new(Pending::default()),
        has_pending: AtomicBool::new(false),
        batched: AtomicBool::new(false),
        outstanding: AtomicUsize::new(0),
        broken: AtomicBool::new(false),
        idle: Condvar::new(),
        idle_lock: Mutex::new(()),
        idle_waiters: AtomicUsize::new(0),
        buffers: ArrayQueue::new(POOLED_BUFFERS),
        waker: std::sync::OnceLock::new(),
        reply_timeout: limits.reply_timeout,
        replied_at: Mutex::new(None),
    });
    let for_hook = replies.clone();
    let batch_guard = export.device.batch_hook(Arc::new(move || for_hook.flush()));
    replies
        .batched
        .store(batch_guard.is_some(), Ordering::Relaxed);
    let conn = Conn {
        replies: replies.clone(),
        device: export.device.clone(),
    };
    let local = Budget::new(limits.connection_budget);
    let reserve = (limits.connection_reserve > 0).then(|| Budget::new(limits.connection_reserve));
    let (tx, rx) = sync_channel::<Job>(limits.queue_per_connection.max(1));
    let rx = Mutex::new(rx);
    // The event loop: replies must be batched (an event source never writes to the socket
    // itself, it leaves its replies for the batch hook).
    let mut events = None;
    if batch_guard.is_some() {
        let (src_tx, src_rx) = sync_channel::<Job>(limits.queue_per_connection.max(1));
        let outcome = Arc::new(Mutex::new(None));
        let source = EventSource {
            conn: conn.clone(),
            stream: stream.try_clone()?,
            local: local.clone(),
            global: global.clone(),
            reserve: reserve.clone(),
            jobs: src_tx,
            buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            wait: Wait::Header,
            outcome: outcome.clone(),
            reply_timeout: limits.reply_timeout,
        };
        match export.device.attach_source(Box::new(source)) {
            Ok(waker) => {
                let _ = replies.waker.set(waker);
                events = Some((src_rx, outcome));
            }
            Err(_) => tracing::debug!("NBD: no event loop; reading on the connection thread"),
        }
    }
    let result = thread::scope(|scope| {
        let mut workers = Workers {
            scope,
            conn: &conn,
            rx: &rx,
            tx,
            count: 0,
            max: limits.workers_per_connection.max(1),
            pool,
        };
        let r = match &events {
            // Until the source is done (it drops its sender).
            Some((src_rx, outcome)) => {
                while let Ok(job) = src_rx.recv() {
                    if !workers.run(job) {
                        break;
                    }
                }
                lock(outcome).take().map_or(Ok(()), Err)
            }
            None => reader(&mut workers, stream, &local, reserve.as_ref(), global),
        };
        if r.is_err() {
            // A broken stream or protocol: answers still pending would be sent into the void.
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        r
        // Leaving the scope joins the workers: they finish what was queued.
    });
    // Asynchronous completions may still be on their way: let them answer.
    replies.wait_idle(std::time::Duration::from_secs(60));
    drop(batch_guard);
    // Replies a batch left after its queue thread dropped the hook, or left on a full socket.
    replies.flush_all();
    if replies.broken.load(Ordering::SeqCst) && result.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "cannot write replies",
        ));
    }
    result
}

fn worker(conn: &Conn, rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = lock(rx).recv();
        match job {
            Ok(job) => conn.execute(job),
            Err(_) => return,
        }
    }
}

/// The connection's worker threads, started on demand, for the requests that block.
struct Workers<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    conn: &'scope Conn,
    rx: &'scope Mutex<Receiver<Job>>,
    tx: SyncSender<Job>,
    count: usize,
    max: usize,
    /// The server's worker slots ([`Limits::max_workers`]).
    pool: &'scope Pool,
}

impl Workers<'_, '_> {
    /// Hands `job` (already counted in `outstanding`) to a worker, starting one if all may be
    /// busy; runs it here if none can be started. False if the workers are gone.
    fn run(&mut self, job: Job) -> bool {
        let n = self.conn.replies.outstanding.load(Ordering::SeqCst);
        let slot = (n > self.count && self.count < self.max)
            .then(|| self.pool.take_worker())
            .flatten();
        if let Some(slot) = slot {
            let (conn, rx) = (self.conn, self.rx);
            let spawned = thread::Builder::new()
                .name("nbd-worker".into())
                .spawn_scoped(self.scope, move || {
                    // The slot is the server's again when this thread ends.
                    let _slot = slot;
                    worker(conn, rx)
                });
            match spawned {
                Ok(_) => self.count += 1,
                Err(e) => tracing::warn!("cannot start an NBD worker thread: {e}"),
            }
        }
        if self.count == 0 {
            // No worker could be started (the server has none free, or threads cannot be
            // made): do it here, which holds up this connection's input meanwhile.
            self.conn.execute(job);
            return true;
        }
        self.tx.send(job).is_ok()
    }
}

fn reader(
    workers: &mut Workers<'_, '_>,
    stream: &UnixStream,
    local: &Arc<Budget>,
    reserve: Option<&Arc<Budget>>,
    global: &Arc<Budget>,
) -> io::Result<()> {
    let conn = workers.conn;
    let mut input = Input::new(stream, &conn.replies.outstanding);
    loop {
        if conn.replies.broken.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(hdr) = read_header(&mut input)? else {
            return Ok(());
        };
        let Some(req) = Request::decode(&hdr) else {
            return Err(bad_magic());
        };
        if req.kind == CMD_DISC {
            tracing::debug!("NBD client disconnects");
            return Ok(());
        }
        if let Err(errno) = check(&req, &*conn.device) {
            tracing::debug!(?req, errno, "NBD request refused");
            if req.kind == CMD_WRITE {
                drain(&mut input, u64::from(req.len))?;
            }
            conn.send_error(errno, req.cookie)?;
            continue;
        }
        let data_len = data_len(&req);
        // The connection's own budget first; the server-wide one only once a write's payload is
        // in, so that a client trickling its payload holds up no other connection.
        let local_permit = local.acquire(data_len);
        let data = if req.kind == CMD_WRITE {
            let mut data = conn.replies.take_buffer(req.len);
            input.read_exact(&mut data)?;
            data
        } else {
            Vec::new()
        };
        let shared = take_shared(reserve, global, data_len);
        let job = Job::new(&req, data, (local_permit, shared));
        conn.replies.outstanding.fetch_add(1, Ordering::SeqCst);
        let Some(job) = conn.start_async(job) else {
            continue;
        };
        if !workers.run(job) {
            return Ok(());
        }
    }
}

fn bad_magic() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "bad request magic")
}

/// Budget a request without data (flush, trim, write zeroes) holds while in flight: such
/// requests count against the connection's cap like the others, so that a client pipelining
/// thousands of them is held back by its budget (and then by its queue), not served by as many
/// threads.
const REQUEST_BUDGET: u64 = 4096;

/// Budget a request holds while in flight: its data for reads and writes, [`REQUEST_BUDGET`]
/// for the others.
fn data_len(req: &Request) -> u64 {
    match req.kind {
        CMD_READ | CMD_WRITE => u64::from(req.len),
        _ => REQUEST_BUDGET,
    }
}

impl Job {
    /// The job of a checked request (`data`: a write's payload).
    fn new(req: &Request, data: Vec<u8>, permits: (Permit, Permit)) -> Self {
        let op = match req.kind {
            CMD_READ => Op::Read,
            CMD_WRITE => Op::Write(data),
            CMD_FLUSH => Op::Flush,
            CMD_TRIM => Op::Trim,
            CMD_WRITE_ZEROES => Op::WriteZeroes {
                may_trim: req.flags & CMD_FLAG_NO_HOLE == 0,
            },
            _ => unreachable!("check() lets only known commands through"),
        };
        Job {
            op,
            cookie: req.cookie,
            offset: req.offset,
            len: req.len,
            fua: req.flags & CMD_FLAG_FUA != 0,
            _permits: permits,
        }
    }
}

/// Requests an [`EventSource`] handles in one poll at most (the queue thread has other work).
const EVENT_REQUESTS_PER_POLL: usize = 64;

/// Reads of the socket an [`EventSource`] makes in one poll at most (each up to its 64 KiB
/// buffer, or a large payload's rest).
const EVENT_READS_PER_POLL: u32 = 8;

/// Budget an error reply holds until it is written: a client that sends refused requests and
/// reads no replies is stopped by its budget, as one sending writes is.
const ERROR_REPLY_BUDGET: u64 = 512;

/// What an [`EventSource`] is in the middle of.
enum Wait {
    /// Between requests.
    Header,
    /// A checked request whose connection budget is not free yet.
    Budget(Request),
    /// A write's payload coming in.
    Payload {
        req: Request,
        data: Vec<u8>,
        got: usize,
        local: Permit,
    },
    /// A request (with its payload) waiting for the server-wide budget.
    Global {
        req: Request,
        data: Vec<u8>,
        local: Permit,
    },
    /// A job for the connection's workers, whose queue is full.
    Blocking(Job),
    /// The payload of a refused write, thrown away before its error reply.
    Drain { left: u64, errno: u32, cookie: u64 },
    /// An error reply waiting for budget.
    Error { errno: u32, cookie: u64 },
}

/// What one step of an [`EventSource`] came to.
enum Step {
    /// Something was done; go on.
    Again,
    /// More bytes from the client are needed.
    Input,
    /// Waiting for budget or the workers' queue.
    Blocked,
}

/// A connection's requests read, checked and started on the device's event loop (a storvsc
/// queue thread): non-blocking reads of many requests at once, reads and writes submitted to
/// the device from the thread that issues them to the host, replies sent by its batch hook.
/// What would block goes to the connection's thread (`jobs`).
struct EventSource {
    conn: Conn,
    stream: UnixStream,
    local: Arc<Budget>,
    global: Arc<Budget>,
    /// The connection's own share of the server's memory (see [`try_take_shared`]).
    reserve: Option<Arc<Budget>>,
    jobs: SyncSender<Job>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    wait: Wait,
    /// Why the source ended, if not a clean end (read by the connection's thread).
    outcome: Arc<Mutex<Option<io::Error>>>,
    /// How long replies may wait for a client that does not read.
    reply_timeout: std::time::Duration,
}

impl EventSource {
    /// Reads what the socket has (without waiting) after the buffered bytes: whether any came.
    /// A clean end of stream between requests is `Ok(None)`.
    fn fill(&mut self) -> io::Result<Option<bool>> {
        use rustix::net::{recv, RecvFlags};
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        loop {
            return match recv(&self.stream, &mut self.buf[self.end..], RecvFlags::DONTWAIT) {
                Ok((0, _)) if self.start == self.end && matches!(self.wait, Wait::Header) => {
                    Ok(None)
                }
                Ok((0, _)) => Err(io::ErrorKind::UnexpectedEof.into()),
                Ok((n, _)) => {
                    self.end += n;
                    Ok(Some(true))
                }
                Err(rustix::io::Errno::AGAIN) => Ok(Some(false)),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => Err(e.into()),
            };
        }
    }

    /// One step of the request at hand. `Ok(None)`: the client disconnects.
    fn step(&mut self) -> io::Result<Option<Step>> {
        let avail = self.end - self.start;
        let step = match std::mem::replace(&mut self.wait, Wait::Header) {
            Wait::Header => {
                if avail < REQUEST_LEN {
                    return Ok(Some(Step::Input));
                }
                let hdr: &[u8; REQUEST_LEN] = self.buf[self.start..self.start + REQUEST_LEN]
                    .try_into()
                    .expect("REQUEST_LEN bytes");
                self.start += REQUEST_LEN;
                let req = Request::decode(hdr).ok_or_else(bad_magic)?;
                if req.kind == CMD_DISC {
                    tracing::debug!("NBD client disconnects");
                    return Ok(None);
                }
                self.wait = match check(&req, &*self.conn.device) {
                    Err(errno) => {
                        tracing::debug!(?req, errno, "NBD request refused");
                        let left = if req.kind == CMD_WRITE {
                            u64::from(req.len)
                        } else {
                            0
                        };
                        Wait::Drain {
                            left,
                            errno,
                            cookie: req.cookie,
                        }
                    }
                    Ok(()) => Wait::Budget(req),
                };
                Step::Again
            }
            Wait::Budget(req) => match self.local.try_acquire(data_len(&req)) {
                None => {
                    self.wait = Wait::Budget(req);
                    Step::Blocked
                }
                Some(local) if req.kind == CMD_WRITE => {
                    let data = self.conn.replies.take_buffer(req.len);
                    self.wait = Wait::Payload {
                        req,
                        data,
                        got: 0,
                        local,
                    };
                    Step::Again
                }
                Some(local) => {
                    self.wait = Wait::Global {
                        req,
                        data: Vec::new(),
                        local,
                    };
                    Step::Again
                }
            },
            Wait::Payload {
                req,
                mut data,
                mut got,
                local,
            } => {
                let n = avail.min(data.len() - got);
                data[got..got + n].copy_from_slice(&self.buf[self.start..self.start + n]);
                (self.start, got) = (self.start + n, got + n);
                let left = data.len() - got;
                if left > 0 && left >= self.buf.len() / 2 {
                    // A large payload: straight into its buffer.
                    use rustix::net::{recv, RecvFlags};
                    match recv(&self.stream, &mut data[got..], RecvFlags::DONTWAIT) {
                        Ok((0, _)) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok((n, _)) => got += n,
                        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                let done = got == data.len();
                let step = if done { Step::Again } else { Step::Input };
                self.wait = if done {
                    Wait::Global { req, data, local }
                } else {
                    Wait::Payload {
                        req,
                        data,
                        got,
                        local,
                    }
                };
                step
            }
            Wait::Global { req, data, local } => {
                match try_take_shared(self.reserve.as_ref(), &self.global, data_len(&req)) {
                    None => {
                        self.wait = Wait::Global { req, data, local };
                        Step::Blocked
                    }
                    Some(global) => {
                        let job = Job::new(&req, data, (local, global));
                        let replies = &self.conn.replies;
                        if ringbuf::latency::enabled()
                            && replies.outstanding.load(Ordering::SeqCst) == 0
                        {
                            HOP_TURN.since(lock(&replies.replied_at).take());
                        }
                        replies.outstanding.fetch_add(1, Ordering::SeqCst);
                        if let Some(job) = self.conn.start_async(job) {
                            // Counted again when it is queued.
                            replies.outstanding.fetch_sub(1, Ordering::SeqCst);
                            self.wait = Wait::Blocking(job);
                        }
                        Step::Again
                    }
                }
            }
            Wait::Blocking(job) => {
                let replies = &self.conn.replies;
                replies.outstanding.fetch_add(1, Ordering::SeqCst);
                match self.jobs.try_send(job) {
                    Ok(()) => Step::Again,
                    Err(std::sync::mpsc::TrySendError::Full(job)) => {
                        replies.outstanding.fetch_sub(1, Ordering::SeqCst);
                        self.wait = Wait::Blocking(job);
                        Step::Blocked
                    }
                    // The connection's thread is gone.
                    Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                        replies.outstanding.fetch_sub(1, Ordering::SeqCst);
                        return Ok(None);
                    }
                }
            }
            Wait::Drain {
                left,
                errno,
                cookie,
            } => {
                let n = (avail as u64).min(left);
                self.start += n as usize;
                if n < left {
                    self.wait = Wait::Drain {
                        left: left - n,
                        errno,
                        cookie,
                    };
                    Step::Input
                } else {
                    self.wait = Wait::Error { errno, cookie };
                    Step::Again
                }
            }
            Wait::Error { errno, cookie } => match self.local.try_acquire(ERROR_REPLY_BUDGET) {
                None => {
                    self.wait = Wait::Error { errno, cookie };
                    Step::Blocked
                }
                Some(permit) => {
                    let mut b = [0u8; REPLY_LEN];
                    encode_simple_reply(&mut b, errno, cookie);
                    let none = self.local.try_acquire(0).expect("0 bytes are always free");
                    self.conn.replies.reply_async(&[&b], (permit, none));
                    self.conn.replies.flush();
                    Step::Again
                }
            },
        };
        Ok(Some(step))
    }

    /// Whether the client has closed its end (or the server shut the connection down), seen
    /// without taking any bytes: for a source that reads nothing while it waits for budget.
    fn hung_up(&self) -> bool {
        use rustix::net::{recv, RecvFlags};
        let mut b = [0u8; 1];
        matches!(
            recv(&self.stream, &mut b, RecvFlags::PEEK | RecvFlags::DONTWAIT),
            Ok((0, _))
        )
    }

    fn run(&mut self) -> io::Result<SourcePoll> {
        let replies = &self.conn.replies;
        if replies.has_pending.load(Ordering::SeqCst) {
            // Replies left on a full socket (or by a batch that found the socket taken).
            replies.flush();
            replies.expire_stall(self.reply_timeout);
        }
        // Still some: the client is not reading; look again soon rather than wait for input.
        let waiting = if replies.has_pending.load(Ordering::SeqCst) {
            SourcePoll::Soon
        } else {
            SourcePoll::Readable
        };
        let mut progress = false;
        let mut requests = 0;
        let mut reads = 0;
        loop {
            if self.conn.replies.broken.load(Ordering::SeqCst) {
                return Ok(SourcePoll::Done);
            }
            let step = match self.step()? {
                None => return Ok(SourcePoll::Done),
                Some(s) => s,
            };
            match step {
                Step::Again => {
                    progress = true;
                    if matches!(self.wait, Wait::Header) {
                        requests += 1;
                        if requests == EVENT_REQUESTS_PER_POLL {
                            return Ok(SourcePoll::Progress);
                        }
                    }
                }
                Step::Blocked if progress => return Ok(SourcePoll::Progress),
                // Waiting for budget reads nothing: notice a hang-up (or the server's stop)
                // another way.
                Step::Blocked if self.hung_up() => return Ok(SourcePoll::Done),
                Step::Blocked => return Ok(SourcePoll::Soon),
                // A bound on what one poll reads (a refused write's payload takes no budget):
                // the queue thread has other work.
                Step::Input if reads == EVENT_READS_PER_POLL => return Ok(SourcePoll::Progress),
                Step::Input => {
                    reads += 1;
                    match self.fill()? {
                        None => return Ok(SourcePoll::Done),
                        Some(true) => progress = true,
                        Some(false) if progress => return Ok(SourcePoll::Progress),
                        Some(false) => return Ok(waiting),
                    }
                }
            }
        }
    }
}

impl QueueSource for EventSource {
    fn poll(&mut self) -> SourcePoll {
        match self.run() {
            Ok(p) => p,
            Err(e) => {
                // A broken stream or protocol: end the connection (its thread reports it).
                let _ = self.stream.shutdown(std::net::Shutdown::Both);
                *lock(&self.outcome) = Some(e);
                SourcePoll::Done
            }
        }
    }

    fn busy(&self) -> bool {
        // Replies waiting on a full socket: retried, whatever the input does.
        self.conn.replies.has_pending.load(Ordering::SeqCst)
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.stream.as_fd()
    }
}
