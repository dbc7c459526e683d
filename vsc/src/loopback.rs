//! The loopback front end: a host process playing a guest on the partition socket.
//!
//! Its "guest RAM" is a memfd it shares with `vspd`; its SIMP and SIEFP pages live in that
//! memory (pages 0 and 1); its interrupt line is an eventfd passed as the VP's irqfd. A thread
//! waits on that line and on the socket: it copies each message out of the VMBus SINT's slot,
//! frees the slot and writes EOM when the host asked for one, hands the message to the client,
//! and dispatches channel interrupts from the event flags to the channels' events. The rest of
//! guest memory is a page allocator for rings and buffers.
//!
//! A channel's interrupts skip that thread: the front end declares [`DIRECT_VPS`] more VPs, and
//! each channel opened gets one of its own (its target VP), whose irqfd is the channel's
//! interrupt eventfd and whose SIEFP is a page nobody reads. The daemon then wakes the
//! channel's queue thread itself, one wakeup instead of two per interrupt. (The ring is the
//! truth of what there is to do, so the flags need no reading.) When the VPs run out, or the
//! daemon refuses one, the channel's interrupts go to VP 0 and its thread dispatches them.
//!
//! When the daemon goes away (restarted, killed) the guest does not: [`Loopback::reconnect`]
//! starts a new session on the same guest memory (HELLO, ADD_MEMORY of the same memfd, SET_VP),
//! so data in guest pages (bounce buffers of requests in flight) survives; channels then have
//! to be opened again on the new session. Each session has a number ([`Loopback::session`]):
//! a channel opened on an earlier one is dead.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ringbuf::guestmem::{GuestMemory, PAGE_SIZE};
use ringbuf::socket::SeqPacket;
use ringbuf::Event;
use vmbus_proto::partition::{self as wire, status, vp_flags, Kind};
use vmbus_proto::synic::{
    MESSAGE_FLAG_PENDING, MESSAGE_PAYLOAD_SIZE, MESSAGE_SLOT_SIZE, VMBUS_SINT,
};

use crate::synic::{HostInterface, MessageStream};
use crate::Error;

/// Guest-physical address of the SIMP page.
pub const SIMP_GPA: u64 = 0;
/// Guest-physical address of the SIEFP page.
pub const SIEFP_GPA: u64 = PAGE_SIZE;
/// First page the allocator hands out.
const FIRST_FREE_PAGE: u64 = 2;
/// VPs besides VP 0, each lent to one open channel as its own interrupt line.
pub const DIRECT_VPS: u32 = 63;
/// How long a channel's VP setup waits for the daemon's answer before it falls back to VP 0.
const SET_VP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const SINT_OFFSET: u64 = VMBUS_SINT as u64 * MESSAGE_SLOT_SIZE as u64;

/// Shared state of the front end.
struct Shared {
    /// The current session's socket.
    sock: Mutex<Arc<SeqPacket>>,
    mem: GuestMemory,
    /// The guest memory's memfd (sealed against shrinking and growing), handed to each session.
    memfd: OwnedFd,
    /// Eventfds the daemon handed over per connection id (HvSignalEvent fast path).
    signals: Mutex<HashMap<u32, Event>>,
    /// Where each channel's interrupts go, for channels dispatched by the front-end thread.
    interrupts: Mutex<HashMap<u32, Event>>,
    /// Channels with a VP of their own.
    direct: Mutex<DirectVps>,
    /// Where the front-end thread hands the daemon's answer to a SET_VP sent while it runs.
    set_vp_answer: Mutex<Option<Sender<u32>>>,
    /// Free guest pages.
    free: Mutex<Vec<u64>>,
    /// Cleared when the front-end thread ends (the daemon went away, or the front end stopped).
    alive: AtomicBool,
    /// Signalled when the daemon goes away (not when the front end stops its thread itself).
    lost: Event,
    /// The session number: 0 for the first, one more per reconnection.
    session: AtomicU64,
}

/// The VPs lent to channels as interrupt lines ([`DIRECT_VPS`]).
#[derive(Default)]
struct DirectVps {
    /// VPs free in this session.
    free: Vec<u32>,
    /// Channel relid -> its VP.
    by_relid: HashMap<u32, u32>,
    /// Each VP's SIEFP page (allocated when the VP is first lent, kept for the front end's
    /// life: the daemon may set a flag in it at any time).
    pages: HashMap<u32, u64>,
}

impl DirectVps {
    fn new() -> Self {
        Self {
            free: (1..=DIRECT_VPS).rev().collect(),
            ..Self::default()
        }
    }

    /// A new session: every VP is free again (the pages stay).
    fn reset(&mut self) {
        self.free = (1..=DIRECT_VPS).rev().collect();
        self.by_relid.clear();
    }
}

/// The front-end thread of the current session.
struct SessionThread {
    /// Stops it.
    stop: Arc<Event>,
    thread: Option<JoinHandle<()>>,
}

impl SessionThread {
    fn stop(&mut self) {
        let _ = self.stop.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A loopback guest attached to a `vspd`.
pub struct Loopback {
    shared: Arc<Shared>,
    thread: Mutex<SessionThread>,
}

impl std::fmt::Debug for Loopback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loopback")
            .field("memory", &self.shared.mem.total_len())
            .finish()
    }
}

fn request(
    sock: &SeqPacket,
    kind: Kind,
    bytes: Vec<u8>,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<u32, Error> {
    sock.send(&bytes, fds)?;
    let mut buf = [0u8; wire::MAX_MESSAGE_SIZE];
    let d = sock.recv(&mut buf)?.ok_or(Error::Disconnected)?;
    let (k, body) = wire::split(&buf[..d.len]).map_err(|e| Error::Protocol(e.to_string()))?;
    match k {
        Kind::STATUS => {
            let s: wire::Status =
                wire::body(k, body).map_err(|e| Error::Protocol(e.to_string()))?;
            if s.request != kind {
                return Err(Error::Protocol(format!(
                    "status for {:?}, expected {kind:?}",
                    s.request
                )));
            }
            Ok(s.status)
        }
        Kind::HELLO_REPLY => {
            let r: wire::HelloReply =
                wire::body(k, body).map_err(|e| Error::Protocol(e.to_string()))?;
            if r.version == 0 {
                Ok(r.status.max(1))
            } else {
                Ok(r.status)
            }
        }
        other => Err(Error::Protocol(format!(
            "unexpected {other:?} while waiting for {kind:?}"
        ))),
    }
}

impl Loopback {
    /// Connects to the daemon at `socket` with `memory_bytes` of guest memory (a multiple of
    /// 4 KiB, at least 16 KiB). Returns the front end and the stream of channel messages.
    pub fn connect(socket: &Path, memory_bytes: u64) -> Result<(Self, MessageStream), Error> {
        if memory_bytes < 4 * PAGE_SIZE || !memory_bytes.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Protocol(
                "guest memory must be a multiple of 4 KiB, at least 16 KiB".into(),
            ));
        }
        let memfd = sealed_memfd("loopback-guest-ram", memory_bytes)?;
        let (sock, irq) = handshake(socket, &memfd, memory_bytes)?;
        let mut mem = GuestMemory::new();
        let mapped = rustix::io::fcntl_dupfd_cloexec(&memfd, 0)
            .map_err(|e| Error::Ring(ringbuf::Error::Map(e)))?;
        mem.add_region(0, memory_bytes, mapped, 0)?;
        let pages = memory_bytes / PAGE_SIZE;
        let sock = Arc::new(sock);
        let shared = Arc::new(Shared {
            sock: Mutex::new(sock.clone()),
            mem,
            memfd,
            signals: Mutex::new(HashMap::new()),
            interrupts: Mutex::new(HashMap::new()),
            direct: Mutex::new(DirectVps::new()),
            set_vp_answer: Mutex::new(None),
            free: Mutex::new((FIRST_FREE_PAGE..pages).rev().collect()),
            alive: AtomicBool::new(true),
            lost: Event::new()?,
            session: AtomicU64::new(0),
        });
        let (thread, rx) = Shared::start(&shared, sock, irq)?;
        Ok((
            Self {
                shared,
                thread: Mutex::new(thread),
            },
            rx,
        ))
    }

    /// Starts a new session with the daemon at `socket` (after the last one's daemon went
    /// away, or to leave it): the same guest memory, a new SynIC setup, no channel. Channels of
    /// earlier sessions are dead (see [`session`](Self::session)); the client has to connect
    /// again over the returned message stream and reopen them. Pages stay allocated: their
    /// owners free them.
    pub fn reconnect(&self, socket: &Path) -> Result<MessageStream, Error> {
        let mut thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        thread.stop();
        // Channels and message slots of the old session are gone with it.
        self.shared
            .signals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.shared
            .interrupts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.shared
            .direct
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reset();
        self.shared.mem.fill(SIMP_GPA, 2 * PAGE_SIZE as usize, 0)?;
        // A new session number first: a channel of the old one never looks alive again.
        self.shared.session.fetch_add(1, Ordering::AcqRel);
        let _ = self.shared.lost.wait_timeout(0);
        let (sock, irq) = handshake(socket, &self.shared.memfd, self.shared.mem.total_len())?;
        let sock = Arc::new(sock);
        *self.shared.sock.lock().unwrap_or_else(|e| e.into_inner()) = sock.clone();
        let (t, rx) = Shared::start(&self.shared, sock, irq)?;
        *thread = t;
        Ok(rx)
    }

    /// The current session's number (0 for the first, one more per
    /// [`reconnect`](Self::reconnect)).
    pub fn session(&self) -> u64 {
        self.shared.session.load(Ordering::Acquire)
    }

    /// Signalled (an eventfd) when the daemon of the current session goes away.
    pub fn lost_event(&self) -> &Event {
        &self.shared.lost
    }

    /// The guest's memory, as the guest sees it.
    pub fn memory(&self) -> &GuestMemory {
        &self.shared.mem
    }

    /// Allocates `n` zeroed guest pages (not necessarily contiguous); returns their frame numbers.
    pub fn alloc_pages(&self, n: usize) -> Result<Vec<u64>, Error> {
        let mut free = self.shared.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < n {
            return Err(Error::OutOfGuestMemory(n));
        }
        let at = free.len() - n;
        let pages: Vec<u64> = free.drain(at..).rev().collect();
        drop(free);
        for &p in &pages {
            self.shared.mem.fill(p * PAGE_SIZE, PAGE_SIZE as usize, 0)?;
        }
        Ok(pages)
    }

    /// Returns pages to the allocator.
    pub fn free_pages(&self, pages: &[u64]) {
        let mut free = self.shared.free.lock().unwrap_or_else(|e| e.into_inner());
        free.extend(pages.iter().rev());
    }

    /// Free guest pages.
    pub fn free_page_count(&self) -> usize {
        self.shared
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.thread
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .stop();
    }
}

/// A memfd of `len` bytes for guest memory, sealed against shrinking (the daemon maps it: a
/// file that shrank under its mapping would kill it with SIGBUS, so it insists on that seal)
/// and growing (its size is the guest's memory, for every session).
fn sealed_memfd(name: &str, len: u64) -> Result<OwnedFd, Error> {
    let fd = ringbuf::shmem::create_memfd(name, len)?;
    rustix::fs::fcntl_add_seals(&fd, rustix::fs::SealFlags::GROW)
        .map_err(|e| Error::Ring(ringbuf::Error::Map(e)))?;
    Ok(fd)
}

/// Opens a session: HELLO, the guest memory (`memfd`), and the SynIC of VP 0 with a new
/// interrupt line, which it returns with the socket.
fn handshake(
    socket: &Path,
    memfd: &OwnedFd,
    memory_bytes: u64,
) -> Result<(SeqPacket, Event), Error> {
    let sock = SeqPacket::connect(socket)?;
    let st = request(
        &sock,
        Kind::HELLO,
        wire::encode(
            Kind::HELLO,
            &wire::Hello {
                version: wire::VERSION,
                vp_count: 1 + DIRECT_VPS,
            },
        ),
        &[],
    )?;
    if st != status::OK {
        return Err(Error::Refused(format!("HELLO refused with status {st}")));
    }
    let add = wire::AddMemory {
        gpa: 0,
        len: memory_bytes,
        fd_offset: 0,
    };
    let st = request(
        &sock,
        Kind::ADD_MEMORY,
        wire::encode(Kind::ADD_MEMORY, &add),
        &[memfd.as_fd()],
    )?;
    if st != status::OK {
        return Err(Error::Refused(format!(
            "guest memory refused with status {st}"
        )));
    }
    let irq = Event::new()?;
    let vp = wire::SetVp {
        vp: 0,
        flags: vp_flags::SIMP_ENABLED | vp_flags::SIEFP_ENABLED,
        simp_gpa: SIMP_GPA,
        siefp_gpa: SIEFP_GPA,
    };
    let st = request(
        &sock,
        Kind::SET_VP,
        wire::encode(Kind::SET_VP, &vp),
        &[irq.as_fd()],
    )?;
    if st != status::OK {
        return Err(Error::Refused(format!(
            "SynIC setup refused with status {st}"
        )));
    }
    Ok((sock, irq))
}

impl crate::channel::FrontEnd for Loopback {
    fn memory(&self) -> &GuestMemory {
        Loopback::memory(self)
    }
    fn alloc_pages(&self, n: usize) -> Result<Vec<u64>, Error> {
        Loopback::alloc_pages(self, n)
    }
    fn free_pages(&self, pages: &[u64]) {
        Loopback::free_pages(self, pages)
    }
}

impl HostInterface for Loopback {
    fn post_message(&self, connection_id: u32, payload: &[u8]) -> Result<(), Error> {
        let m = wire::PostMessage::vmbus(0, connection_id, payload)
            .ok_or_else(|| Error::Protocol("message longer than 240 bytes".into()))?;
        self.shared
            .socket()
            .send(&wire::encode(Kind::POST_MESSAGE, &m), &[])?;
        Ok(())
    }

    fn signal_event(&self, connection_id: u32) -> Result<(), Error> {
        if let Some(e) = self
            .shared
            .signals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&connection_id)
        {
            return Ok(e.signal()?);
        }
        let s = wire::SignalEvent {
            connection_id,
            flag_number: 0,
        };
        self.shared
            .socket()
            .send(&wire::encode(Kind::SIGNAL_EVENT, &s), &[])?;
        Ok(())
    }

    fn host_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    fn session(&self) -> u64 {
        Loopback::session(self)
    }

    fn set_channel_interrupt(&self, relid: u32, event: Option<Event>) -> u32 {
        self.shared
            .interrupts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&relid);
        let mut direct = self.shared.direct.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(vp) = direct.by_relid.remove(&relid) {
            // The daemon keeps the VP's old line until the VP is lent again: a late signal
            // finds a channel that no longer waits, which is harmless.
            direct.free.push(vp);
        }
        let Some(event) = event else { return 0 };
        match self.shared.lend_vp(&mut direct, &event) {
            Ok(vp) => {
                direct.by_relid.insert(relid, vp);
                vp
            }
            Err(why) => {
                tracing::debug!(relid, why, "channel interrupts dispatched from VP 0");
                drop(direct);
                self.shared
                    .interrupts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(relid, event);
                0
            }
        }
    }
}

impl Shared {
    fn socket(&self) -> Arc<SeqPacket> {
        self.sock.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Lends a free VP to a channel: SET_VP with its SIEFP page and `event` as its irqfd,
    /// answered by the daemon (through the front-end thread). Returns the VP, or why not.
    fn lend_vp(&self, direct: &mut DirectVps, event: &Event) -> Result<u32, &'static str> {
        let vp = *direct.free.last().ok_or("no VP left")?;
        let page = match direct.pages.get(&vp) {
            Some(&p) => p,
            None => {
                let p = self
                    .free
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop()
                    .ok_or("no guest page for the VP's event flags")?;
                direct.pages.insert(vp, p);
                p
            }
        };
        // The flags of an earlier channel on this VP mean nothing now.
        self.mem
            .fill(page * PAGE_SIZE, PAGE_SIZE as usize, 0)
            .map_err(|_| "VP page outside guest memory")?;
        let (tx, rx) = channel();
        *self.set_vp_answer.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        let set = wire::SetVp {
            vp,
            flags: vp_flags::SIEFP_ENABLED,
            simp_gpa: 0,
            siefp_gpa: page * PAGE_SIZE,
        };
        let sent = self
            .socket()
            .send(&wire::encode(Kind::SET_VP, &set), &[event.as_fd()]);
        let answer = sent
            .ok()
            .and_then(|()| rx.recv_timeout(SET_VP_TIMEOUT).ok());
        *self.set_vp_answer.lock().unwrap_or_else(|e| e.into_inner()) = None;
        match answer {
            Some(status::OK) => {
                direct.free.pop();
                Ok(vp)
            }
            Some(_) => Err("the daemon refused the VP"),
            None => Err("no answer from the daemon"),
        }
    }

    /// Starts the front-end thread of a session on `sock` with interrupt line `irq`.
    fn start(
        shared: &Arc<Self>,
        sock: Arc<SeqPacket>,
        irq: Event,
    ) -> Result<(SessionThread, MessageStream), Error> {
        let (tx, rx) = channel();
        let stop = Arc::new(Event::new()?);
        let (s, st) = (shared.clone(), stop.clone());
        // Release: pairs with the acquire load in `host_alive`.
        shared.alive.store(true, Ordering::Release);
        let thread = std::thread::Builder::new()
            .name("loopback-vp0".into())
            .spawn(move || {
                let lost = s.run(&sock, &irq, &st, tx);
                // Release: pairs with the acquire load in `host_alive`.
                s.alive.store(false, Ordering::Release);
                if lost {
                    let _ = s.lost.signal();
                }
            })
            .map_err(Error::Thread)?;
        Ok((
            SessionThread {
                stop,
                thread: Some(thread),
            },
            rx,
        ))
    }

    /// Serves a session until its daemon goes away (true) or `stop` (false).
    fn run(&self, sock: &SeqPacket, irq: &Event, stop: &Event, messages: Sender<Vec<u8>>) -> bool {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut buf = [0u8; wire::MAX_MESSAGE_SIZE];
        loop {
            let mut fds = [
                PollFd::new(irq, PollFlags::IN),
                PollFd::new(sock, PollFlags::IN),
                PollFd::new(stop, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return true,
            }
            let (irq_fired, readable, stopped) = (
                !fds[0].revents().is_empty(),
                !fds[1].revents().is_empty(),
                !fds[2].revents().is_empty(),
            );
            if stopped {
                return false;
            }
            if irq_fired {
                let _ = irq.wait();
                if self.take_messages(sock, &messages).is_err() {
                    return true;
                }
                self.dispatch_events();
            }
            if readable {
                match sock.recv(&mut buf) {
                    Ok(Some(d)) => self.daemon_message(&buf[..d.len], d.fds),
                    // The daemon went away: the guest's messages stop; the client sees the
                    // stream end.
                    Ok(None) | Err(_) => return true,
                }
            }
        }
    }

    /// Copies out the message in the VMBus slot, if any, frees the slot and sends EOM when the
    /// host has more (Linux `vmbus_signal_eom`).
    fn take_messages(&self, sock: &SeqPacket, messages: &Sender<Vec<u8>>) -> Result<(), Error> {
        let slot = SIMP_GPA + SINT_OFFSET;
        let ty = self.mem.atomic_u32(slot)?;
        loop {
            // Acquire: pairs with the host's release store of the type after the payload.
            if ty.load(Ordering::Acquire) == 0 {
                return Ok(());
            }
            let mut hdr = [0u8; 8];
            self.mem.read(slot, &mut hdr)?;
            let size = usize::from(hdr[4]).min(MESSAGE_PAYLOAD_SIZE);
            let mut msg = vec![0u8; size];
            self.mem.read(slot + 16, &mut msg)?;
            // Release: our copy is done before the host may reuse the slot.
            ty.store(0, Ordering::Release);
            // Pairs with the host's fence between setting message_pending and re-checking.
            fence(Ordering::SeqCst);
            let mut flags = [0u8; 1];
            self.mem.read(slot + 5, &mut flags)?;
            if messages.send(msg).is_err() {
                return Err(Error::Disconnected);
            }
            if flags[0] & MESSAGE_FLAG_PENDING != 0 {
                sock.send(
                    &wire::encode(Kind::EOM, &wire::Eom { vp: 0, reserved: 0 }),
                    &[],
                )?;
                // The host delivers the next one and raises the line again.
                return Ok(());
            }
        }
    }

    /// Hands each channel whose event flag is set to its event.
    fn dispatch_events(&self) {
        let base = SIEFP_GPA + SINT_OFFSET;
        let handlers = self.interrupts.lock().unwrap_or_else(|e| e.into_inner());
        for word in 0..(MESSAGE_SLOT_SIZE as u64 / 4) {
            let Ok(w) = self.mem.atomic_u32(base + word * 4) else {
                return;
            };
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            // Acquire: pairs with the host's release fetch_or.
            let mut bits = w.swap(0, Ordering::Acquire);
            while bits != 0 {
                let relid = word as u32 * 32 + bits.trailing_zeros();
                bits &= bits - 1;
                if let Some(e) = handlers.get(&relid) {
                    let _ = e.signal();
                }
            }
        }
    }

    fn daemon_message(&self, datagram: &[u8], mut fds: Vec<std::os::fd::OwnedFd>) {
        let Ok((kind, body)) = wire::split(datagram) else {
            return;
        };
        match kind {
            Kind::CHANNEL_SIGNAL => {
                if let (Ok(s), Some(fd)) =
                    (wire::body::<wire::ChannelSignal>(kind, body), fds.pop())
                {
                    self.signals
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(s.connection_id, Event::from_fd(fd));
                }
            }
            Kind::CHANNEL_SIGNAL_REMOVED => {
                if let Ok(s) = wire::body::<wire::ChannelSignal>(kind, body) {
                    self.signals
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&s.connection_id);
                }
            }
            Kind::STATUS => {
                if let Ok(s) = wire::body::<wire::Status>(kind, body) {
                    let waiter = self.set_vp_answer.lock().unwrap_or_else(|e| e.into_inner());
                    match waiter.as_ref() {
                        Some(tx) if s.request == Kind::SET_VP => {
                            let _ = tx.send(s.status);
                        }
                        _ => tracing::debug!(?s, "unexpected status from the daemon ignored"),
                    }
                }
            }
            other => tracing::debug!(?other, "unexpected message from the daemon ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use rustix::fs::{fcntl_get_seals, ftruncate, SealFlags};

    #[test]
    fn guest_memory_cannot_shrink_or_grow() {
        let fd = super::sealed_memfd("test-guest-ram", 1 << 20).unwrap();
        let seals = fcntl_get_seals(&fd).unwrap();
        assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW));
        assert!(ftruncate(&fd, 4096).is_err(), "shrunk");
        assert!(ftruncate(&fd, 2 << 20).is_err(), "grown");
        assert!(ftruncate(&fd, 1 << 20).is_ok(), "same size");
    }
}
