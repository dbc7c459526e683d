//! The guest-side queue loop: one thread per channel that moves its ring, runs the I/O sources
//! that feed it (NBD connections, a TAP queue), polls for a while when it runs out of work and
//! then sleeps until the host interrupts, another thread hands it work, or a source's
//! descriptor is ready. storvsc's queues ([`crate::storvsc::Controller`]), netvsc's
//! ([`crate::netvsc`]) and, through them, the NBD export all run on it.
//!
//! It is built on mio: one [`mio::Poll`] per queue thread holds the channel's interrupt line
//! (an eventfd, through [`SourceFd`]), a [`mio::Waker`] for the threads that hand it work, the
//! descriptors of its [`QueueSource`]s and any other descriptor the queue's user registers (a
//! TAP queue). mio registers everything edge-triggered: a descriptor is reported once per
//! change, so the loop remembers what it was told ([`Woke`], the sources' `ready` flags) until
//! the work it stands for is done, and a source only says [`SourcePoll::Readable`] after a read
//! found nothing (`EAGAIN`). Measured against the raw epoll loop it replaces (the same calls:
//! one `epoll_wait` per sleep, one per poll of many sources), mio adds nothing on the path.
//!
//! The loop knows nothing of the protocol on the ring or of how the channel signals the host:
//! a [`QueueWork`] does one pass of its work, arms its wakeups before a sleep and says whether
//! other threads handed it work; [`EventLoop::run`] does the polling and sleeping around it.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::Error;

/// What a [`QueueSource`] needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePoll {
    /// It did some work: poll it again at once.
    Progress,
    /// Nothing to do until its file descriptor is readable (its last read found nothing: the
    /// loop's descriptors are edge-triggered).
    Readable,
    /// Waiting for something that has no file descriptor (memory budget, a full queue): poll
    /// it again within a millisecond.
    Soon,
    /// Finished: the queue thread drops it.
    Done,
}

/// Work a queue thread does between its batches, without a thread of its own: typically
/// reading requests from a client's socket and submitting them, so that they reach the ring
/// with no handoff between threads (see [`Doorbell::add_source`]).
pub trait QueueSource: Send {
    /// Does what can be done now. Must never block: the queue thread serves every device of
    /// its channel.
    fn poll(&mut self) -> SourcePoll;
    /// Whether it has work that does not wait for its descriptor (for example output to
    /// retry), though its last poll said [`SourcePoll::Readable`]: it is then polled anyway,
    /// and the queue thread sleeps at most a millisecond.
    fn busy(&self) -> bool {
        false
    }
    /// The descriptor whose readability [`SourcePoll::Readable`] waits for.
    fn fd(&self) -> BorrowedFd<'_>;
}

/// Wakes the queue thread running a source (see [`Doorbell::add_source`]): for work the
/// source has that its descriptor does not show ([`QueueSource::busy`]).
pub type SourceWaker = Arc<dyn Fn() + Send + Sync>;

/// Runs on a queue thread after each batch of completions (see [`Doorbell::add_hook`]).
pub type BatchHook = Arc<dyn Fn() + Send + Sync>;

/// Idle iterations of the loop between two polls of its sources (each poll is usually a
/// system call) while requests are in flight.
const SOURCE_POLL_EVERY: u32 = 32;
/// The same with nothing in flight: only a source (or a submitter) can bring work then, and
/// the time to notice a client's next request is the queue-depth-1 latency.
const SOURCE_POLL_EVERY_IDLE: u32 = 4;

/// How long a queue thread sleeps at most while a source waits for something other than its
/// descriptor.
pub const SOURCE_RETRY: Duration = Duration::from_millis(1);

/// The longest sleep: a queue wakes this often to look at its host and its stop flag.
pub const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Up to this many sources are read directly on each poll (the read is the readiness check);
/// with more, the poll is asked first which are readable, in one call.
const DIRECT_SOURCES: usize = 2;

/// The waker's token.
const WAKE: Token = Token(0);
/// The channel interrupt's token.
const INTERRUPT: Token = Token(1);
/// Tokens the loop's user registers ([`EventLoop::register`]) are below this; sources' above.
const FIRST_SOURCE: usize = 1 << 20;

/// The batch hooks of a queue: changed rarely (under the lock), read by the queue thread
/// through a copy it refreshes when `version` moves.
#[derive(Default)]
pub struct Hooks {
    list: Mutex<Vec<(u64, BatchHook)>>,
    version: AtomicU64,
}

impl Hooks {
    fn add(&self, id: u64, hook: BatchHook) {
        let mut l = self.list.lock().unwrap_or_else(|e| e.into_inner());
        l.push((id, hook));
        // Release: the queue thread's acquire load of `version` then sees the new list (it
        // also takes the lock to copy it).
        self.version.fetch_add(1, Ordering::Release);
    }

    fn remove(&self, id: u64) {
        let mut l = self.list.lock().unwrap_or_else(|e| e.into_inner());
        l.retain(|(i, _)| *i != id);
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Runs every hook (after callbacks that ran outside a batch: failed requests).
    pub fn run_all(&self) {
        let list: Vec<BatchHook> = {
            let l = self.list.lock().unwrap_or_else(|e| e.into_inner());
            l.iter().map(|(_, h)| h.clone()).collect()
        };
        for h in list {
            h();
        }
    }

    /// Refreshes `copy` if the list changed since `seen`.
    pub fn refresh(&self, seen: &mut u64, copy: &mut Vec<BatchHook>) {
        let v = self.version.load(Ordering::Acquire);
        if v != *seen {
            let l = self.list.lock().unwrap_or_else(|e| e.into_inner());
            copy.clear();
            copy.extend(l.iter().map(|(_, h)| h.clone()));
            *seen = v;
        }
    }
}

/// What a queue thread shares with the threads that hand it work: the flag it sets before it
/// sleeps, the waker, the flag it sets when it has stopped, its batch hooks and the sources
/// handed to it.
pub struct Doorbell {
    /// Set before the queue thread sleeps, so that whoever hands it work wakes it.
    sleeping: AtomicBool,
    /// Set when the queue thread has stopped: whoever hands it work must fail that work.
    closed: AtomicBool,
    waker: Waker,
    hooks: Hooks,
    /// Sources added and not yet taken by the queue thread.
    new_sources: Mutex<Vec<Box<dyn QueueSource>>>,
    sources_added: AtomicBool,
}

impl std::fmt::Debug for Doorbell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doorbell")
            .field("sleeping", &self.sleeping)
            .field("closed", &self.closed)
            .finish()
    }
}

/// What [`Doorbell::handed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handed {
    /// The queue thread runs (or will find the work before it sleeps).
    Taken,
    /// The queue thread has stopped: the caller fails what it queued.
    Closed,
}

impl Doorbell {
    /// Wakes the queue thread (whether or not it sleeps).
    pub fn ring(&self) {
        let _ = self.waker.wake();
    }

    /// Call after queueing work for the thread (in a queue it looks at before sleeping): wakes
    /// it if it may be asleep, or says it has stopped.
    pub fn handed(&self) -> Handed {
        // SeqCst fence: pairs with the queue thread's fence between its `sleeping` (or
        // `closed`) store and its last look at its queue (a Dekker pair): either that look
        // finds the work, or this load sees the flag.
        fence(Ordering::SeqCst);
        if self.closed.load(Ordering::Relaxed) {
            Handed::Closed
        } else {
            if self.sleeping.load(Ordering::Relaxed) {
                self.ring();
            }
            Handed::Taken
        }
    }

    /// Whether the queue thread has stopped.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Registers `hook` under `id` (see [`BatchHookGuard`]).
    pub fn add_hook(&self, id: u64, hook: BatchHook) {
        self.hooks.add(id, hook);
    }

    /// Unregisters the hook `id` (the queue thread may still call it once, for a batch already
    /// under way).
    pub fn remove_hook(&self, id: u64) {
        self.hooks.remove(id);
    }

    /// The queue's batch hooks.
    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// Runs `source` on the queue thread, between its batches, until the source says it is
    /// done or the queue stops (then the source is dropped). Gives the source back if the
    /// queue has stopped.
    pub fn add_source(
        self: &Arc<Self>,
        source: Box<dyn QueueSource>,
    ) -> Result<SourceWaker, Box<dyn QueueSource>> {
        {
            let mut l = self.new_sources.lock().unwrap_or_else(|e| e.into_inner());
            // Under the lock: the queue thread sets `closed` before it takes the lock to drop
            // the sources left, so either this sees the flag or the thread sees the source.
            if self.closed.load(Ordering::Relaxed) {
                return Err(source);
            }
            l.push(source);
        }
        // Release: the queue thread's acquire swap then finds the list changed.
        self.sources_added.store(true, Ordering::Release);
        self.ring();
        let me = self.clone();
        Ok(Arc::new(move || me.ring()))
    }
}

/// Keeps a [`BatchHook`] registered on some queues; dropping it unregisters the hook.
pub struct BatchHookGuard {
    queues: Vec<Arc<Doorbell>>,
    id: u64,
}

impl BatchHookGuard {
    /// Registers `hook` on every queue of `queues`.
    pub fn register(queues: Vec<Arc<Doorbell>>, hook: BatchHook) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        for q in &queues {
            q.add_hook(id, hook.clone());
        }
        Self { queues, id }
    }
}

impl Drop for BatchHookGuard {
    fn drop(&mut self) {
        for q in &self.queues {
            q.remove_hook(self.id);
        }
    }
}

impl std::fmt::Debug for BatchHookGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchHookGuard")
            .field("id", &self.id)
            .finish()
    }
}

/// A source on its queue thread.
struct SourceSlot {
    src: Box<dyn QueueSource>,
    /// What its last poll said.
    state: SourcePoll,
    token: Token,
    /// Its descriptor was reported readable (or hung up) since its last poll.
    ready: bool,
    /// The descriptor it was registered with.
    fd: RawFd,
}

/// What ended (or would have ended) a sleep, kept until the loop's user takes it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Woke {
    /// The channel's interrupt line fired.
    pub interrupt: bool,
    /// Another thread rang the doorbell.
    pub rung: bool,
    /// The tokens of registered descriptors ([`EventLoop::register`]) reported ready.
    pub ready: Vec<usize>,
    /// The sleep ended by its timeout.
    pub timed_out: bool,
}

/// One pass of a queue's work and what its sleep needs, for [`EventLoop::run`].
pub trait QueueWork {
    /// Whether the queue should stop now ([`EventLoop::run`] then returns `Ok`).
    fn stopped(&self) -> bool;
    /// Does what can be done now (takes work handed over, writes to the ring, reads what the
    /// host wrote, runs batch hooks): whether anything moved.
    fn pass(&mut self, lp: &mut EventLoop) -> Result<bool, Error>;
    /// Whether requests are in flight: their completions are due soon, so the loop polls
    /// longer before it sleeps.
    fn in_flight(&self) -> bool;
    /// Whether all the work is requests (a disk's): with none [`in_flight`](Self::in_flight),
    /// the next comes from a submitter or a source, which may be waiting for this core, so
    /// the loop yields it at every look while it polls
    /// ([`ringbuf::poller::Poller::set_serves_requests`]).
    fn serves_requests(&self) -> bool {
        false
    }
    /// Arms the wakeups a sleep needs (unmasks the ring's interrupt, asks for a signal when the
    /// outgoing ring has room): false if work turned up meanwhile, and then no sleep.
    fn prepare_sleep(&mut self) -> Result<bool, Error>;
    /// Undoes what [`prepare_sleep`](Self::prepare_sleep) armed that must not stay armed while
    /// the loop runs (called after a sleep, or when the loop did not sleep after all).
    fn cancel_sleep(&mut self);
    /// Whether other threads handed work over (looked at after the sleeping flag is set: see
    /// [`Doorbell::handed`]).
    fn handed_work(&self) -> bool;
    /// Called just before the thread blocks.
    fn before_sleep(&mut self) {}
    /// After a sleep: what woke it. An error ends the loop.
    fn woke(&mut self, woke: Woke) -> Result<(), Error>;
}

/// A queue thread's event loop: its mio poll, its sources and its doorbell.
pub struct EventLoop {
    poll: Poll,
    events: Events,
    doorbell: Arc<Doorbell>,
    sources: Vec<SourceSlot>,
    next_token: usize,
    /// The channel interrupt's descriptor, while registered.
    interrupt: Option<RawFd>,
    /// What the poll reported and the user has not taken yet.
    woke: Woke,
    poller: ringbuf::poller::Poller,
    /// Descriptors watched with [`EventLoop::register`].
    registered: usize,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("sources", &self.sources.len())
            .field("interrupt", &self.interrupt)
            .finish()
    }
}

fn io_error(e: std::io::Error) -> Error {
    Error::Ring(ringbuf::Error::Event(
        rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO),
    ))
}

impl EventLoop {
    /// A new loop (to move to its thread), and its doorbell for the others.
    pub fn new() -> Result<(Self, Arc<Doorbell>), Error> {
        let poll = Poll::new().map_err(io_error)?;
        let waker = Waker::new(poll.registry(), WAKE).map_err(io_error)?;
        let doorbell = Arc::new(Doorbell {
            sleeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            waker,
            hooks: Hooks::default(),
            new_sources: Mutex::new(Vec::new()),
            sources_added: AtomicBool::new(false),
        });
        Ok((
            Self {
                poll,
                events: Events::with_capacity(64),
                doorbell: doorbell.clone(),
                sources: Vec::new(),
                next_token: FIRST_SOURCE,
                interrupt: None,
                woke: Woke::default(),
                poller: {
                    // With no polling asked for, a queue thread sleeps as soon as it is idle:
                    // the host's worker is the slower side, and its spins catch our requests.
                    let mut p = ringbuf::poller::Poller::default();
                    p.set_sleep_at_once(true);
                    p
                },
                registered: 0,
            },
            doorbell,
        ))
    }

    /// The loop's doorbell.
    pub fn doorbell(&self) -> &Arc<Doorbell> {
        &self.doorbell
    }

    /// Watches `fd` as the channel's interrupt line, instead of the one watched before (which
    /// must still be open: call this before dropping the old channel).
    pub fn set_interrupt(&mut self, fd: BorrowedFd<'_>) -> Result<(), Error> {
        if let Some(old) = self.interrupt.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&old));
        }
        let raw = fd.as_raw_fd();
        self.poll
            .registry()
            .register(&mut SourceFd(&raw), INTERRUPT, Interest::READABLE)
            .map_err(io_error)?;
        self.interrupt = Some(raw);
        // It may have fired before it was watched.
        self.woke.interrupt = true;
        Ok(())
    }

    /// Watches `fd` (for reading, and for writing too if `writable`) under `token` (below
    /// 2^20, above 1): its readiness comes back in [`Woke::ready`]. The descriptor must stay
    /// open until [`deregister`](Self::deregister).
    pub fn register(
        &mut self,
        fd: BorrowedFd<'_>,
        token: usize,
        writable: bool,
    ) -> Result<(), Error> {
        assert!(
            token > INTERRUPT.0 && token < FIRST_SOURCE,
            "token out of range"
        );
        let interest = if writable {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        self.poll
            .registry()
            .register(&mut SourceFd(&fd.as_raw_fd()), Token(token), interest)
            .map_err(io_error)?;
        // Edge-triggered: whatever is there already was not reported.
        self.woke.ready.push(token);
        self.registered += 1;
        Ok(())
    }

    /// Stops watching `fd`.
    pub fn deregister(&mut self, fd: BorrowedFd<'_>) {
        if self
            .poll
            .registry()
            .deregister(&mut SourceFd(&fd.as_raw_fd()))
            .is_ok()
        {
            self.registered = self.registered.saturating_sub(1);
        }
    }

    /// Takes what the poll reported since the last call.
    pub fn take_woke(&mut self) -> Woke {
        std::mem::take(&mut self.woke)
    }

    /// Takes the tokens of registered descriptors reported ready since the last call, and
    /// leaves the rest of what was reported for the next sleep.
    pub fn take_ready(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.woke.ready)
    }

    /// Looks, without sleeping, at what is ready (one system call): while the loop polls, the
    /// registered descriptors' readiness would otherwise be seen only when it sleeps, so a
    /// frame arriving in the polling window would wait out the whole window.
    fn peek(&mut self) {
        if self
            .poll
            .poll(&mut self.events, Some(Duration::ZERO))
            .is_ok()
        {
            self.record();
        }
    }

    /// Whether the loop has sources.
    pub fn has_sources(&self) -> bool {
        !self.sources.is_empty() || self.doorbell.sources_added.load(Ordering::Relaxed)
    }

    fn add_source(&mut self, src: Box<dyn QueueSource>) {
        let token = Token(self.next_token);
        self.next_token += 1;
        let fd = src.fd().as_raw_fd();
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut SourceFd(&fd), token, Interest::READABLE)
        {
            // Dropping it ends it (its connection is closed).
            tracing::warn!("cannot watch an I/O source: {e}");
            return;
        }
        self.sources.push(SourceSlot {
            src,
            state: SourcePoll::Progress,
            token,
            ready: true,
            fd,
        });
    }

    /// Records what the poll reported.
    fn record(&mut self) {
        for ev in self.events.iter() {
            match ev.token() {
                WAKE => self.woke.rung = true,
                INTERRUPT => self.woke.interrupt = true,
                Token(t) if t < FIRST_SOURCE => {
                    if !self.woke.ready.contains(&t) {
                        self.woke.ready.push(t);
                    }
                }
                t => {
                    if let Some(s) = self.sources.iter_mut().find(|s| s.token == t) {
                        s.ready = true;
                    }
                }
            }
        }
    }

    /// Polls the sources that may have work: whether any did some.
    pub fn poll_sources(&mut self) -> bool {
        if self.doorbell.sources_added.swap(false, Ordering::Acquire) {
            let new = std::mem::take(
                &mut *self
                    .doorbell
                    .new_sources
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            );
            for src in new {
                self.add_source(src);
            }
        }
        let ask = self.sources.len() > DIRECT_SOURCES;
        if ask {
            // Which are readable, in one call (edge-triggered: what was reported before is in
            // the sources' `ready` flags).
            if self
                .poll
                .poll(&mut self.events, Some(Duration::ZERO))
                .is_ok()
            {
                self.record();
            }
        }
        let mut moved = false;
        let mut list = std::mem::take(&mut self.sources);
        list.retain_mut(|slot| {
            if ask && slot.state == SourcePoll::Readable && !slot.src.busy() && !slot.ready {
                return true;
            }
            slot.ready = false;
            slot.state = slot.src.poll();
            moved |= slot.state == SourcePoll::Progress;
            if slot.state == SourcePoll::Done {
                let _ = self.poll.registry().deregister(&mut SourceFd(&slot.fd));
                return false;
            }
            true
        });
        // Sources added by the polls above are in `self.sources` (none: the list is only
        // extended from the doorbell, above).
        list.append(&mut self.sources);
        self.sources = list;
        moved
    }

    /// Whether a source waits for something other than its descriptor (a sleep is then at
    /// most [`SOURCE_RETRY`]).
    pub fn retry_soon(&self) -> bool {
        self.sources
            .iter()
            .any(|s| s.state != SourcePoll::Readable || s.src.busy())
    }

    /// Whether something was reported that the loop's user has not taken, or a source is
    /// ready: a sleep would end at once.
    fn pending(&self) -> bool {
        self.woke.interrupt
            || self.woke.rung
            || !self.woke.ready.is_empty()
            || self.sources.iter().any(|s| s.ready)
    }

    /// Sleeps until something is reported or `max` passes ([`SOURCE_RETRY`] at most while a
    /// source waits for something else). Returns what woke it, and takes it.
    pub fn sleep(&mut self, max: Duration) -> Result<Woke, Error> {
        if !self.pending() {
            let t = if self.retry_soon() {
                max.min(SOURCE_RETRY)
            } else {
                max
            };
            match self.poll.poll(&mut self.events, Some(t)) {
                Ok(()) => {
                    if self.events.is_empty() {
                        self.woke.timed_out = true;
                    }
                    self.record();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(e)),
            }
        }
        Ok(self.take_woke())
    }

    /// Announces the sleep on the doorbell, then sleeps as [`sleep`](Self::sleep) unless
    /// `handed` (a last look at the work other threads hand over) finds some: whoever hands
    /// work either sees the announcement (and rings) or its work is found by that look (see
    /// [`Doorbell::handed`]). `None`: no sleep.
    pub fn sleep_unless(
        &mut self,
        max: Duration,
        handed: impl FnOnce() -> bool,
    ) -> Result<Option<Woke>, Error> {
        self.doorbell.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let woke = if handed() {
            Ok(None)
        } else {
            self.sleep(max).map(Some)
        };
        self.doorbell.sleeping.store(false, Ordering::Relaxed);
        woke
    }

    /// Runs `work` until it stops or fails: passes while work moves, polling for a while
    /// (adaptively, see [`ringbuf::poller::Poller`]) when it does not, then sleeping with the
    /// sleep protocol of the ring and of the doorbell.
    pub fn run(&mut self, work: &mut impl QueueWork) -> Result<(), Error> {
        self.poller.set_serves_requests(work.serves_requests());
        let (mut last_moved, mut idle_spins) = (true, 0u32);
        loop {
            if work.stopped() {
                return Ok(());
            }
            let mut moved = false;
            // Sources: after work, and every few idle spins (more often with nothing in
            // flight).
            idle_spins = if last_moved { 0 } else { idle_spins + 1 };
            if self.has_sources() {
                let every = if work.in_flight() {
                    SOURCE_POLL_EVERY
                } else {
                    SOURCE_POLL_EVERY_IDLE
                };
                if last_moved || idle_spins.is_multiple_of(every) {
                    moved |= self.poll_sources();
                }
            }
            // Registered descriptors: every few idle spins.
            if !last_moved && self.registered > 0 && idle_spins.is_multiple_of(SOURCE_POLL_EVERY) {
                self.peek();
            }
            last_moved = false;
            moved |= work.pass(self)?;
            if moved {
                self.poller.busy();
                last_moved = true;
                continue;
            }
            // Poll before sleeping: a wakeup costs more. A source's client (an NBD client) may
            // be waiting for this core.
            self.poller.set_clients_nearby(self.has_sources());
            if self.poller.idle(work.in_flight()) {
                continue;
            }
            if !work.prepare_sleep()? {
                work.cancel_sleep();
                continue;
            }
            // The sources once more (before the flag: their requests then need no signal).
            if self.has_sources() && self.poll_sources() {
                work.cancel_sleep();
                last_moved = true;
                continue;
            }
            work.before_sleep();
            self.poller.sleeping();
            let Some(woke) = self.sleep_unless(MAX_SLEEP, || work.handed_work())? else {
                work.cancel_sleep();
                last_moved = true;
                continue;
            };
            if woke.timed_out && self.retry_soon() {
                // A source's retry timer, not a wakeup that polling would have saved.
                self.poller.retried();
            } else {
                self.poller.woke();
            }
            last_moved = true;
            work.cancel_sleep();
            work.woke(woke)?;
        }
    }

    /// Ends the loop's service: marks the doorbell closed (whoever hands work from now on
    /// fails it) and drops the sources, those handed over and not yet taken too.
    pub fn close(&mut self) {
        self.doorbell.closed.store(true, Ordering::Relaxed);
        // SeqCst fence: see `Doorbell::handed`.
        fence(Ordering::SeqCst);
        for s in self.sources.drain(..) {
            let _ = self.poll.registry().deregister(&mut SourceFd(&s.fd));
        }
        drop(std::mem::take(
            &mut *self
                .doorbell
                .new_sources
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    /// A source over one end of a socketpair: it reads what is there, and counts its polls.
    struct Probe {
        sock: UnixStream,
        polls: Arc<AtomicU64>,
        busy: Arc<AtomicBool>,
    }

    impl QueueSource for Probe {
        fn poll(&mut self) -> SourcePoll {
            use std::io::Read;
            self.polls.fetch_add(1, Ordering::SeqCst);
            self.sock.set_nonblocking(true).unwrap();
            let mut b = [0u8; 64];
            match self.sock.read(&mut b) {
                Ok(0) => SourcePoll::Done,
                Ok(_) => SourcePoll::Progress,
                Err(_) => SourcePoll::Readable,
            }
        }
        fn busy(&self) -> bool {
            self.busy.load(Ordering::SeqCst)
        }
        fn fd(&self) -> BorrowedFd<'_> {
            self.sock.as_fd()
        }
    }

    type Probes = Vec<(UnixStream, Arc<AtomicU64>, Arc<AtomicBool>)>;

    fn counts(p: &Probes) -> Vec<u64> {
        p.iter().map(|(_, n, _)| n.load(Ordering::SeqCst)).collect()
    }

    #[test]
    fn sources_are_polled_when_readable_or_busy_and_dropped_when_done() {
        let (mut lp, bell) = EventLoop::new().unwrap();
        let mut probes: Probes = Vec::new();
        for _ in 0..4 {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let (polls, busy) = (
                Arc::new(AtomicU64::new(0)),
                Arc::new(AtomicBool::new(false)),
            );
            assert!(bell
                .add_source(Box::new(Probe {
                    sock: ours,
                    polls: polls.clone(),
                    busy: busy.clone(),
                }))
                .is_ok());
            probes.push((theirs, polls, busy));
        }
        // New sources are polled once; then, all quiet, none is (more than two: the poll
        // decides).
        assert!(!lp.poll_sources());
        assert!(!lp.poll_sources());
        assert_eq!(counts(&probes), [1, 1, 1, 1]);
        assert!(!lp.retry_soon(), "nothing to retry");
        // The doorbell rang when the sources were handed over: the first sleep ends at once.
        assert!(lp.sleep(Duration::from_secs(5)).unwrap().rung);
        assert!(lp.sleep(Duration::from_millis(10)).unwrap().timed_out);
        // Input on one: that one is polled (and again, having made progress).
        std::io::Write::write_all(&mut probes[2].0, b"x").unwrap();
        assert!(lp.poll_sources());
        assert!(!lp.poll_sources());
        assert_eq!(counts(&probes), [1, 1, 3, 1]);
        // Input while asleep ends the sleep.
        std::io::Write::write_all(&mut probes[0].0, b"y").unwrap();
        let w = lp.sleep(Duration::from_secs(5)).unwrap();
        assert!(!w.timed_out);
        assert!(lp.poll_sources());
        assert_eq!(counts(&probes), [2, 1, 3, 1]);
        // Busy with no input (replies waiting, say): polled anyway, and the sleep is short.
        probes[1].2.store(true, Ordering::SeqCst);
        assert!(lp.retry_soon(), "a busy source makes the sleep short");
        lp.poll_sources();
        lp.poll_sources();
        assert_eq!(counts(&probes)[1], 3);
        probes[1].2.store(false, Ordering::SeqCst);
        // A hang-up ends that source, and the others stay.
        drop(probes.remove(3).0);
        lp.poll_sources();
        lp.poll_sources();
        assert_eq!(lp.sources.len(), 3);
        // Closed: sources handed over later are given back.
        lp.close();
        let (ours, _theirs) = UnixStream::pair().unwrap();
        assert!(bell
            .add_source(Box::new(Probe {
                sock: ours,
                polls: Arc::default(),
                busy: Arc::default(),
            }))
            .is_err());
        assert_eq!(bell.handed(), Handed::Closed);
    }

    #[test]
    fn interrupts_rings_and_registered_descriptors_wake_the_loop() {
        let (mut lp, bell) = EventLoop::new().unwrap();
        let irq = ringbuf::Event::new().unwrap();
        lp.set_interrupt(irq.as_fd()).unwrap();
        // Set on registration: it may have fired before.
        assert!(lp.sleep(Duration::from_secs(5)).unwrap().interrupt);
        assert!(lp.sleep(Duration::from_millis(5)).unwrap().timed_out);
        irq.signal().unwrap();
        let w = lp.sleep(Duration::from_secs(5)).unwrap();
        assert!(w.interrupt && !w.rung);
        // An edge per signal, even with the counter not reset.
        irq.signal().unwrap();
        assert!(lp.sleep(Duration::from_secs(5)).unwrap().interrupt);
        let t = std::thread::spawn({
            let bell = bell.clone();
            move || {
                std::thread::sleep(Duration::from_millis(20));
                bell.ring();
            }
        });
        assert!(lp.sleep(Duration::from_secs(5)).unwrap().rung);
        t.join().unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        lp.register(a.as_fd(), 7, false).unwrap();
        assert_eq!(lp.sleep(Duration::from_secs(5)).unwrap().ready, [7]);
        std::io::Write::write_all(&mut b, b"z").unwrap();
        assert_eq!(lp.sleep(Duration::from_secs(5)).unwrap().ready, [7]);
        lp.deregister(a.as_fd());
        std::io::Write::write_all(&mut b, b"z").unwrap();
        assert!(lp.sleep(Duration::from_millis(5)).unwrap().timed_out);
    }
}
