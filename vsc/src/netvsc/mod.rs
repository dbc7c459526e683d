//! The netvsc client: a synthetic NIC of `vspd` behind a TAP on the guest side.
//!
//! [`Nic::start`] attaches a loopback guest (its own session), opens the network channel, runs
//! Linux's handshake ([`handshake`]) and then serves every channel (the primary and its
//! subchannels) on a queue thread of its own ([`crate::queue::EventLoop`]): frames the guest
//! TAP's queues give (with their virtio-net header) go to the host as RNDIS PACKET messages in
//! send-buffer sections (GPA-direct pages for those larger than a section), their offloads as
//! per-packet info ([`netdev::TxOffload`]); frames the host writes in the receive buffer go to
//! the TAP straight from it, their checksum state as the virtio-net header
//! ([`netdev::RxOffload`]), and their ranges are completed back. With receive segment
//! coalescing (RSC, NVSP 6.1) the host sends a TCP super-frame as fragments in the ranges of
//! one transfer-page packet ([`wire::Coalescer`]), cut anywhere (Linux joins them byte for
//! byte); they go to the TAP as one GSO frame written from the receive buffer, its segment
//! size what the guest TAP's MTU leaves after the frame's IP and TCP headers. Media connect and disconnect
//! indications set the guest TAP's carrier.
//!
//! A supervisor thread keeps the NIC up: when the daemon goes away it reconnects (every
//! 100 ms) and redoes everything on the new session; when the guest TAP's MTU changes it
//! closes the channels and reopens them with the new MTU, as Linux does. The TAP stays open
//! throughout: frames written to it meanwhile are dropped.

pub mod handshake;
pub mod wire;

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netdev::{IoPiece, IoPieceMut, Shared, Tap, TunOffload, TxOffload, VirtioNetHdr};
use ringbuf::packet::{gpa_direct_header, OutgoingPacket, PacketKind};
use ringbuf::Mapping;
use vmbus_proto::channel::Guid;
use vmbus_proto::netvsp::{
    NvspMessage, NvspMessageType, NvspStatus, RevokeReceiveBuffer, RevokeSendBuffer,
    SendIndirectionTable, SendRndisPacket, SendRndisPacketComplete, CHANNEL_TYPE_CONTROL,
    CHANNEL_TYPE_DATA, INVALID_SECTION_INDEX, LINUX_RECEIVE_BUFFER_ID, LINUX_SEND_BUFFER_ID,
    SEND_INDIRECTION_TABLE_SIZE,
};
use vmbus_proto::ring::{PacketType, PACKET_FLAG_COMPLETION_REQUESTED};
use vmbus_proto::rndis::RndisStatus;
use zerocopy::IntoBytes;

use crate::channel::GuestChannel;
use crate::client::{Client, Event, Offer, SUPPORTED_VERSIONS};
use crate::loopback::Loopback;
use crate::queue::{EventLoop, QueueWork, Woke};
use crate::synic::HostInterface;
use crate::Error;
use handshake::{Action, Buffer, Handshake, Negotiated, Params, CONTROL_TX};
use wire::Received;

/// Ring pages each way of a network channel (control page included): 512 KiB of data, as
/// Linux's default ring.
pub const NET_RING_PAGES: usize = 129;

/// Transaction ids of data packets: the send section's index, or a large-send slot's with this
/// bit.
const LARGE_TX: u64 = 1 << 32;
/// The transaction id of RNDIS control messages.
const RNDIS_CONTROL_TX: u64 = CONTROL_TX | 1;

/// Large-send slots per queue (frames larger than a send section go in these, GPA-direct).
const LARGE_SLOTS: usize = 16;
/// Bytes of a large-send slot: the largest TSO frame with its RNDIS header.
const LARGE_BYTES: usize = 68 << 10;
/// Where a frame starts in a large-send slot: its RNDIS header (at most this long) goes right
/// before it, and the packet's GPA range starts at the header.
const HEAD_ROOM: usize = 128;
/// Bytes of a frame read into the local buffer when a large-send slot takes the rest: a frame
/// this long or shorter goes to a send section (copied), a longer one stays in the slot and only
/// these first bytes are copied after it was read (TSO frames cross without a copy of their
/// payload).
const LOCAL_PART: usize = 2048;
/// Largest frame read from the guest TAP (a 64 KiB GSO frame and its headers).
const MAX_FRAME: usize = 65_550;

/// Packets a queue reads from its ring, or frames from its TAP, per pass.
const BATCH: usize = 64;

/// Counters of a queue.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Frames sent to the host.
    pub tx_frames: AtomicU64,
    /// Bytes sent.
    pub tx_bytes: AtomicU64,
    /// Frames received from the host and written to the TAP.
    pub rx_frames: AtomicU64,
    /// Bytes received.
    pub rx_bytes: AtomicU64,
    /// Frames dropped: from the TAP (an offload the host cannot take), or toward it (the TAP
    /// could not take them, or the host's message was malformed).
    pub dropped: AtomicU64,
    /// Frames received coalesced (RSC, from several fragments), among `rx_frames`.
    pub rsc_frames: AtomicU64,
}

/// Counters of a NIC.
#[derive(Debug, Default)]
pub struct NicStats {
    /// One per queue.
    pub queues: Vec<QueueStats>,
    /// Sessions with the daemon (1 + reconnections + MTU changes).
    pub sessions: AtomicU64,
    /// Channels in use now.
    pub channels: AtomicU64,
    /// The host's link state as last indicated (1: connected).
    pub connected: AtomicU64,
    /// The counters of every channel opened (signals sent, interrupts taken), of this session
    /// and the earlier ones.
    pub channel_stats: Mutex<Vec<Arc<crate::channel::ChannelStats>>>,
}

impl NicStats {
    /// Guest signals sent and interrupts taken, over every channel so far.
    pub fn wakeups(&self) -> (u64, u64) {
        let l = self.channel_stats.lock().unwrap_or_else(|e| e.into_inner());
        l.iter().fold((0, 0), |(s, i), c| {
            (
                s + c.signals.load(Ordering::Relaxed),
                i + c.interrupts.load(Ordering::Relaxed),
            )
        })
    }

    /// Frames moved (both ways, every queue).
    pub fn frames(&self) -> u64 {
        self.queues
            .iter()
            .map(|q| q.tx_frames.load(Ordering::Relaxed) + q.rx_frames.load(Ordering::Relaxed))
            .sum()
    }

    /// A one-line summary (per queue: tx/rx frames).
    pub fn summary(&self) -> String {
        let q: Vec<String> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                format!(
                    "q{i} tx {} rx {} drop {} rsc {}",
                    q.tx_frames.load(Ordering::Relaxed),
                    q.rx_frames.load(Ordering::Relaxed),
                    q.dropped.load(Ordering::Relaxed),
                    q.rsc_frames.load(Ordering::Relaxed)
                )
            })
            .collect();
        let (signals, interrupts) = self.wakeups();
        format!(
            "sessions {} channels {} signals {signals} interrupts {interrupts} ({:.3} per frame); {}",
            self.sessions.load(Ordering::Relaxed),
            self.channels.load(Ordering::Relaxed),
            (signals + interrupts) as f64 / self.frames().max(1) as f64,
            q.join("; ")
        )
    }
}

/// How to attach a NIC.
#[derive(Debug, Clone)]
pub struct NicConfig {
    /// The guest-side TAP (created if missing).
    pub tap: String,
    /// Queues wanted (TAP queues and, as the host grants, channels).
    pub queues: u16,
    /// Guest memory of the NIC's loopback guest.
    pub memory_bytes: u64,
    /// The pause between reconnection attempts.
    pub retry: Duration,
}

impl NicConfig {
    /// `tap` with one queue, 64 MiB of guest memory, reconnecting every 100 ms.
    pub fn new(tap: &str) -> Self {
        Self {
            tap: tap.to_owned(),
            queues: 1,
            memory_bytes: 64 << 20,
            retry: Duration::from_millis(100),
        }
    }
}

/// The first handshake's outcome, for [`Nic::start`] to wait for.
type Ready = (
    Mutex<Option<Result<Negotiated, String>>>,
    std::sync::Condvar,
);

/// A running NIC: its supervisor thread.
pub struct Nic {
    stats: Arc<NicStats>,
    stop: Arc<ringbuf::Event>,
    ready: Arc<Ready>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nic").finish()
    }
}

impl Nic {
    /// Opens the TAP, attaches to the daemon at `socket` and brings the NIC up; returns once the
    /// first handshake is done (or failed).
    pub fn start(socket: &Path, config: NicConfig) -> Result<Self, Error> {
        let queues = usize::from(config.queues.max(1));
        let tap = Tap::open(&config.tap, queues)
            .map_err(|e| Error::Protocol(format!("guest TAP {}: {e}", config.tap)))?;
        let (front, messages) = Loopback::connect(socket, config.memory_bytes)?;
        let front = Arc::new(front);
        let client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS)?;
        let stats = Arc::new(NicStats {
            queues: (0..queues).map(|_| QueueStats::default()).collect(),
            ..Default::default()
        });
        let stop = Arc::new(ringbuf::Event::new()?);
        let ready = Arc::new((Mutex::new(None), std::sync::Condvar::new()));
        let sup = Supervisor {
            socket: socket.to_owned(),
            front,
            client: Some(client),
            tap: Arc::new(tap),
            config,
            stats: stats.clone(),
            stop: stop.clone(),
            ready: ready.clone(),
            instance: None,
            offer: None,
        };
        let thread = std::thread::Builder::new()
            .name("netvsc-sup".into())
            .spawn(move || sup.run())
            .map_err(Error::Thread)?;
        let nic = Self {
            stats,
            stop,
            ready,
            thread: Some(thread),
        };
        let (lock, cv) = &*nic.ready;
        let mut r = lock.lock().unwrap_or_else(|e| e.into_inner());
        while r.is_none() {
            r = cv.wait(r).unwrap_or_else(|e| e.into_inner());
        }
        match r.take().expect("set") {
            Ok(n) => {
                tracing::info!(
                    version = ?n.version,
                    channels = n.channels,
                    mac = ?n.mac,
                    "netvsc up"
                );
                drop(r);
                Ok(nic)
            }
            Err(e) => {
                drop(r);
                drop(nic);
                Err(Error::Refused(e))
            }
        }
    }

    /// The NIC's counters.
    pub fn stats(&self) -> &Arc<NicStats> {
        &self.stats
    }

    /// Stops the NIC: closes the channels (if the daemon is there) and disconnects.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.signal();
            let _ = t.join();
        }
    }
}

impl Drop for Nic {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A buffer given to the host: its pages, view and GPADL.
struct GuestBuffer {
    pages: Vec<u64>,
    map: Arc<Mapping>,
    gpadl: u32,
}

/// A session's NIC: its channels' queue threads and buffers.
struct Running {
    primary_relid: u32,
    queues: Vec<(
        Arc<AtomicBool>,
        Arc<crate::queue::Doorbell>,
        JoinHandle<NetQueue>,
    )>,
    recv: GuestBuffer,
    send: GuestBuffer,
    mtu: u32,
}

/// Why a session ended.
enum Ended {
    Stop,
    HostLost,
    MtuChanged,
}

struct Supervisor {
    socket: PathBuf,
    front: Arc<Loopback>,
    client: Option<Client>,
    tap: Arc<Tap>,
    config: NicConfig,
    stats: Arc<NicStats>,
    stop: Arc<ringbuf::Event>,
    ready: Arc<Ready>,
    /// The NIC's instance (the same one is looked for after a reconnection).
    instance: Option<Guid>,
    /// Its offer in the current session (offers are requested once per session).
    offer: Option<Offer>,
}

impl Supervisor {
    fn report(&self, r: Result<Negotiated, String>) {
        let (lock, cv) = &*self.ready;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(r);
            cv.notify_all();
        }
    }

    fn first(&self) -> bool {
        self.instance.is_none()
    }

    fn run(mut self) {
        loop {
            let running = match self.bring_up() {
                Ok((running, n)) => {
                    self.stats.sessions.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .channels
                        .store(u64::from(n.channels), Ordering::Relaxed);
                    self.report(Ok(n));
                    running
                }
                Err(e) => {
                    if self.first() {
                        self.report(Err(e.to_string()));
                        return;
                    }
                    tracing::debug!("netvsc: bringing the NIC up failed: {e}");
                    if !self.front.host_alive() || self.client.is_none() {
                        if self.reconnect() {
                            continue;
                        }
                        return;
                    }
                    if self.sleep(self.config.retry) {
                        return;
                    }
                    continue;
                }
            };
            let ended = self.watch(&running);
            let alive = self.front.host_alive();
            self.tear_down(running, alive && !matches!(ended, Ended::HostLost));
            match ended {
                Ended::Stop => {
                    if let Some(mut c) = self.client.take().filter(|_| self.front.host_alive()) {
                        let _ = c.unload();
                    }
                    return;
                }
                Ended::MtuChanged if self.front.host_alive() => {
                    tracing::info!("netvsc: the guest MTU changed; reopening the channels");
                }
                _ => {
                    tracing::warn!("netvsc: the daemon went away; reconnecting");
                    if !self.reconnect() {
                        return;
                    }
                }
            }
        }
    }

    /// Sleeps `t` or until stopped (true).
    fn sleep(&self, t: Duration) -> bool {
        self.stop
            .wait_timeout(i32::try_from(t.as_millis()).unwrap_or(i32::MAX))
            .is_ok_and(|n| n > 0)
    }

    /// Connects a new session (retrying until it works or the NIC stops: false).
    fn reconnect(&mut self) -> bool {
        self.client = None;
        self.offer = None;
        loop {
            let attempt = self.front.reconnect(&self.socket).and_then(|messages| {
                Client::connect(self.front.clone(), messages, 0, &SUPPORTED_VERSIONS)
            });
            match attempt {
                Ok(c) => {
                    self.client = Some(c);
                    return true;
                }
                Err(e) => tracing::debug!("netvsc: reconnection failed: {e}"),
            }
            if self.sleep(self.config.retry) {
                return false;
            }
        }
    }

    /// Waits until the daemon goes away, the NIC stops, or the guest MTU changes.
    fn watch(&self, running: &Running) -> Ended {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        loop {
            let mut fds = [
                PollFd::new(self.front.lost_event(), PollFlags::IN),
                PollFd::new(&*self.stop, PollFlags::IN),
            ];
            let ts = Timespec {
                tv_sec: 0,
                tv_nsec: 200_000_000,
            };
            let _ = poll(&mut fds, Some(&ts));
            if !fds[1].revents().is_empty() {
                return Ended::Stop;
            }
            if !fds[0].revents().is_empty() || !self.front.host_alive() {
                return Ended::HostLost;
            }
            if self.tap.link().mtu().is_ok_and(|m| m != running.mtu) {
                return Ended::MtuChanged;
            }
        }
    }

    /// Opens the NIC on the current session: channel, handshake, buffers, queue threads.
    fn bring_up(&mut self) -> Result<(Running, Negotiated), Error> {
        let client = self.client.as_mut().ok_or(Error::Disconnected)?;
        let offer = match self.offer.clone() {
            Some(o) => o,
            None => {
                let instance = self.instance;
                let o = client
                    .request_offers()?
                    .into_iter()
                    .find(|o| {
                        o.interface_type == Guid::NETWORK
                            && o.subchannel_index == 0
                            && instance.is_none_or(|i| i == o.interface_instance)
                    })
                    .ok_or_else(|| Error::Refused("the daemon offers no network adapter".into()))?;
                self.offer = Some(o.clone());
                o
            }
        };
        self.instance = Some(offer.interface_instance);
        let mtu = self
            .tap
            .link()
            .mtu()
            .map_err(|e| Error::Protocol(format!("guest TAP MTU: {e}")))?;
        let mut opened = Opened::default();
        match bring_up_on(
            client,
            &self.front,
            &offer,
            mtu,
            self.config.queues,
            &mut opened,
        ) {
            Ok(n) => {
                let running = self.start_queues(&offer, opened, &n, mtu)?;
                Ok((running, n))
            }
            Err(e) => {
                opened.abandon(&self.front, client, self.front.host_alive());
                Err(e)
            }
        }
    }

    fn start_queues(
        &self,
        offer: &Offer,
        opened: Opened,
        n: &Negotiated,
        mtu: u32,
    ) -> Result<Running, Error> {
        let recv = opened.recv.expect("the handshake made it");
        let send = opened.send.expect("the handshake made it");
        let channels = opened.channels;
        let k = channels.len();
        // What the guest TAP may hand us unfinished: what the host finishes.
        let mut offload = TunOffload::empty();
        if n.csum_tcp4 && n.csum_tcp6 && n.csum_udp4 && n.csum_udp6 {
            offload |= TunOffload::CSUM;
            if n.lso4.is_some() {
                offload |= TunOffload::TSO4;
            }
            if n.lso6.is_some() {
                offload |= TunOffload::TSO6;
            }
        }
        for q in self.tap.queues() {
            if let Err(e) = q.set_offload(offload) {
                tracing::warn!("guest TAP offloads: {e}");
            }
        }
        // The guest's address is the one the host gave (its packet filter passes frames to
        // it), as Linux sets it on the interface.
        if let Err(e) = self.tap.link().set_mac(n.mac) {
            tracing::warn!("guest TAP address {:02x?}: {e}", n.mac);
        }
        if let Some(q) = self.tap.queues().first() {
            let _ = q.set_carrier(n.connected);
        }
        self.stats
            .connected
            .store(u64::from(n.connected), Ordering::Relaxed);
        let per = (n.send_sections as usize / k).max(1);
        let mut queues = Vec::new();
        self.stats
            .channel_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(channels.iter().map(|c| c.stats().clone()));
        for (j, ch) in channels.into_iter().enumerate() {
            let taps: Vec<usize> = (0..self.tap.queues().len())
                .filter(|i| i % k == j)
                .collect();
            let large = (0..LARGE_SLOTS)
                .map(|_| {
                    let pages = self.front.alloc_pages(LARGE_BYTES / 4096)?;
                    let map = self.front.memory().map_pages(&pages)?;
                    Ok((pages, map))
                })
                .collect::<Result<Vec<_>, Error>>()?;
            let (mut lp, bell) = EventLoop::new()?;
            lp.set_interrupt(ch.interrupt().as_fd())?;
            for (t, &i) in taps.iter().enumerate() {
                lp.register(self.tap.queues()[i].as_fd(), 2 + t, false)?;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let range = (j * per) as u32..(((j + 1) * per) as u32).min(n.send_sections);
            let sections: Vec<u32> = range.clone().rev().collect();
            let q = NetQueue {
                index: j,
                ch,
                tap: self.tap.clone(),
                taps: taps.clone(),
                tap_ready: vec![true; taps.len()],
                next_tap: 0,
                recv: recv.map.clone(),
                send: send.map.clone(),
                section_size: n.send_section_size,
                free_sections: sections,
                busy: vec![false; range.len()],
                sections: range,
                free_large: (0..large.len()).rev().collect(),
                large_busy: vec![false; large.len()],
                large,
                completions: VecDeque::new(),
                held: None,
                blocked: None,
                buf: vec![0u8; MAX_FRAME],
                coalescer: wire::Coalescer::default(),
                rsc_buf: Vec::new(),
                head: Vec::with_capacity(128),
                header: Vec::new(),
                mtu,
                stop: stop.clone(),
                stats: self.stats.clone(),
                primary: j == 0,
                table: Vec::new(),
                front: self.front.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("netvsc-{}", q.ch.relid))
                .spawn(move || q.run(lp))
                .map_err(Error::Thread)?;
            queues.push((stop, bell, t));
        }
        Ok(Running {
            primary_relid: offer.relid,
            queues,
            recv,
            send,
            mtu,
        })
    }

    /// Stops the queue threads; with the host there (`close`), revokes the buffers and closes
    /// the channels as Linux does, else abandons them.
    fn tear_down(&mut self, running: Running, close: bool) {
        let mut channels = Vec::new();
        for (stop, bell, t) in running.queues {
            stop.store(true, Ordering::Release);
            bell.ring();
            match t.join() {
                Ok(q) => {
                    for (pages, _) in &q.large {
                        self.front.free_pages(pages);
                    }
                    channels.push(q.ch);
                }
                Err(_) => tracing::error!("a netvsc queue thread panicked"),
            }
        }
        let client = self.client.as_mut();
        match client.filter(|_| close) {
            Some(client) => {
                if let Some(primary) = channels.first_mut() {
                    let revoke = [
                        NvspMessage::new(
                            NvspMessageType::REVOKE_RECEIVE_BUFFER,
                            &RevokeReceiveBuffer {
                                id: LINUX_RECEIVE_BUFFER_ID,
                            },
                        ),
                        NvspMessage::new(
                            NvspMessageType::REVOKE_SEND_BUFFER,
                            &RevokeSendBuffer {
                                id: LINUX_SEND_BUFFER_ID,
                            },
                        ),
                    ];
                    for m in revoke {
                        let _ =
                            primary
                                .out
                                .write(&OutgoingPacket::in_band(0, false, &[m.as_bytes()]));
                    }
                    let _ = primary.commit_out();
                }
                // Subchannels first, then the primary.
                for ch in channels.into_iter().rev() {
                    if let Err(e) = ch.close(client, &self.front) {
                        tracing::debug!("netvsc: closing a channel: {e}");
                    }
                }
                for b in [&running.recv, &running.send] {
                    let _ = client.teardown_gpadl(running.primary_relid, b.gpadl);
                    self.front.free_pages(&b.pages);
                }
            }
            None => {
                for ch in channels {
                    ch.abandon(&self.front);
                }
                self.front.free_pages(&running.recv.pages);
                self.front.free_pages(&running.send.pages);
            }
        }
    }
}

/// What a handshake in progress opened (to undo on failure).
#[derive(Default)]
struct Opened {
    channels: Vec<GuestChannel>,
    recv: Option<GuestBuffer>,
    send: Option<GuestBuffer>,
}

impl Opened {
    fn abandon(self, front: &Loopback, client: &mut Client, alive: bool) {
        for ch in self.channels.into_iter().rev() {
            if alive {
                let relid = ch.relid;
                if ch.close(client, front).is_err() {
                    tracing::debug!(relid, "netvsc: closing a channel failed");
                }
            } else {
                ch.abandon(front);
            }
        }
        for b in [self.recv, self.send].into_iter().flatten() {
            front.free_pages(&b.pages);
        }
    }
}

/// Runs the handshake on `offer`'s channel (opened here, with its subchannels, into `opened`).
fn bring_up_on(
    client: &mut Client,
    front: &Arc<Loopback>,
    offer: &Offer,
    mtu: u32,
    queues: u16,
    opened: &mut Opened,
) -> Result<Negotiated, Error> {
    let ch = GuestChannel::open(client, front, offer, NET_RING_PAGES)?;
    opened.channels.push(ch);
    let (mut h, first) = Handshake::start(Params { mtu, queues });
    let mut todo: VecDeque<Action> = first.into();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        while let Some(a) = todo.pop_front() {
            let ch = &mut opened.channels[0];
            match a {
                Action::Nvsp { msg, completion } => {
                    let tx = if completion { CONTROL_TX } else { 0 };
                    ch.out
                        .write(&OutgoingPacket::in_band(tx, completion, &[msg.as_bytes()]))?;
                    ch.commit_out()?;
                }
                Action::CreateBuffer(which, bytes) => {
                    let pages = front.alloc_pages(bytes as usize / 4096)?;
                    let map = match front.memory().map_pages(&pages) {
                        Ok(m) => Arc::new(m),
                        Err(e) => {
                            front.free_pages(&pages);
                            return Err(e.into());
                        }
                    };
                    let gpadl = match client.create_gpadl(offer.relid, &pages) {
                        Ok(g) => g,
                        Err(e) => {
                            front.free_pages(&pages);
                            return Err(e);
                        }
                    };
                    let b = GuestBuffer { pages, map, gpadl };
                    match which {
                        Buffer::Receive => opened.recv = Some(b),
                        Buffer::Send => opened.send = Some(b),
                    }
                    todo.extend(h.buffer_ready(which, gpadl)?);
                }
                Action::Rndis(bytes) => {
                    let send = opened
                        .send
                        .as_ref()
                        .ok_or_else(|| Error::Protocol("RNDIS before the send buffer".into()))?;
                    send.map.write(0, &bytes)?;
                    let m = NvspMessage::new(
                        NvspMessageType::SEND_RNDIS_PACKET,
                        &SendRndisPacket {
                            channel_type: CHANNEL_TYPE_CONTROL,
                            send_buffer_section_index: 0,
                            send_buffer_section_size: bytes.len() as u32,
                        },
                    );
                    ch.out.write(&OutgoingPacket::in_band(
                        RNDIS_CONTROL_TX,
                        true,
                        &[m.as_bytes()],
                    ))?;
                    ch.commit_out()?;
                }
                Action::OpenSubchannels(n) => {
                    let mut subs = Vec::new();
                    while subs.len() < usize::from(n) {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match client.next_event(left)? {
                            Some(Event::Offer(sub))
                                if sub.interface_instance == offer.interface_instance
                                    && sub.subchannel_index != 0 =>
                            {
                                subs.push(sub)
                            }
                            Some(other) => {
                                tracing::debug!(?other, "event while opening subchannels")
                            }
                            None => return Err(Error::Timeout),
                        }
                    }
                    subs.sort_by_key(|s| s.subchannel_index);
                    for sub in subs {
                        let ch = GuestChannel::open(client, front, &sub, NET_RING_PAGES)?;
                        opened.channels.push(ch);
                    }
                    todo.extend(h.subchannels_open()?);
                }
                Action::Done => return Ok(h.negotiated().clone()),
            }
        }
        // Wait for the host's next answer.
        let ch = &mut opened.channels[0];
        let mut more = Vec::new();
        loop {
            ch.inc.mask();
            let mut got = false;
            while let Some(pkt) = ch.inc.read()? {
                got = true;
                match pkt.kind {
                    PacketKind::Completion if pkt.transaction_id == CONTROL_TX => {
                        if let Some(m) = NvspMessage::read_from_payload(pkt.payload) {
                            more.push(Reply::Nvsp(m));
                        }
                    }
                    PacketKind::TransferPages { ranges, .. } => {
                        let recv = opened.recv.as_ref().map(|b| b.map.clone());
                        for r in ranges {
                            let (off, len) = (r.byte_offset as usize, r.byte_count as usize);
                            let mut bytes = vec![0u8; len.min(4096)];
                            if let Some(m) = &recv {
                                if off.checked_add(bytes.len()).is_some_and(|e| e <= m.len()) {
                                    m.read(off, &mut bytes)?;
                                    more.push(Reply::Rndis(bytes));
                                }
                            }
                        }
                        more.push(Reply::Complete(pkt.transaction_id));
                    }
                    _ => {}
                }
            }
            ch.commit_in()?;
            if got && !more.is_empty() {
                break;
            }
            ch.await_incoming(deadline)?;
        }
        for r in more {
            match r {
                Reply::Nvsp(m) => todo.extend(h.on_nvsp(&m)?),
                Reply::Rndis(b) => todo.extend(h.on_rndis(&b)?),
                Reply::Complete(tx) => {
                    let c = rndis_complete();
                    ch.out
                        .write(&OutgoingPacket::completion(tx, &[c.as_bytes()]))?;
                    ch.commit_out()?;
                }
            }
        }
    }
}

enum Reply {
    Nvsp(NvspMessage),
    Rndis(Vec<u8>),
    Complete(u64),
}

/// The completion of a transfer-page packet (its receive sections given back).
fn rndis_complete() -> NvspMessage {
    NvspMessage::new(
        NvspMessageType::SEND_RNDIS_PACKET_COMPLETE,
        &SendRndisPacketComplete {
            status: NvspStatus::SUCCESS,
        },
    )
}

/// A frame read from the TAP that did not fit yet (no section, slot or ring room).
struct Held {
    len: usize,
    offload: TxOffload,
    /// The large-send slot holding the frame's bytes past [`LOCAL_PART`] (at `HEAD_ROOM +
    /// LOCAL_PART`); `None`: the whole frame is in `buf`.
    slot: Option<usize>,
}

/// One channel's queue: its ring, its TAP queues, its share of the send buffer.
struct NetQueue {
    index: usize,
    ch: GuestChannel,
    tap: Arc<Tap>,
    /// The TAP queues this channel serves, and whether each may have frames.
    taps: Vec<usize>,
    tap_ready: Vec<bool>,
    next_tap: usize,
    recv: Arc<Mapping>,
    send: Arc<Mapping>,
    section_size: u32,
    free_sections: Vec<u32>,
    /// This queue's sections, and which are in flight.
    sections: std::ops::Range<u32>,
    busy: Vec<bool>,
    large: Vec<(Vec<u64>, Mapping)>,
    free_large: Vec<usize>,
    large_busy: Vec<bool>,
    /// Transfer-page packets to complete (the ring had no room).
    completions: VecDeque<u64>,
    held: Option<Held>,
    /// Ring bytes a write waits for.
    blocked: Option<u32>,
    buf: Vec<u8>,
    /// The coalesced frame being received (RSC), and a buffer for one too scattered to be
    /// written from the receive buffer (empty until needed).
    coalescer: wire::Coalescer,
    rsc_buf: Vec<u8>,
    head: Vec<u8>,
    header: Vec<u8>,
    /// The guest TAP's MTU (the queues restart when it changes): a coalesced TCP frame's
    /// segment size follows from it.
    mtu: u32,
    stop: Arc<AtomicBool>,
    stats: Arc<NicStats>,
    primary: bool,
    /// The host's send indirection table (channel numbers).
    table: Vec<u32>,
    front: Arc<Loopback>,
}

impl NetQueue {
    fn run(mut self, mut lp: EventLoop) -> NetQueue {
        if let Err(e) = lp.run(&mut self) {
            if self.ch.host_alive() {
                tracing::warn!(queue = self.index, "netvsc queue stopped: {e}");
            }
            // Wait to be stopped (the supervisor sees the host gone, or ends).
            while !self.stop.load(Ordering::Acquire) {
                let _ = lp.sleep(Duration::from_millis(200));
            }
        }
        lp.close();
        self
    }

    fn qstats(&self, tap: usize) -> &QueueStats {
        &self.stats.queues[tap.min(self.stats.queues.len() - 1)]
    }

    fn count_dropped(&self) {
        self.qstats(self.taps[0])
            .dropped
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Writes the coalesced frame whose fragments the coalescer holds to the TAP as one frame
    /// (GSO for TCP).
    fn deliver_coalesced(&mut self) {
        let tap_i = self.taps[0];
        let (fragments, total, offload) = self.coalescer.fragments();
        let mut head = [0u8; netdev::offload::MAX_HEAD];
        let hn = total.min(head.len());
        // The head may span fragments.
        let mut got = 0;
        for &(at, len) in fragments {
            if got == hn {
                break;
            }
            let n = len.min(hn - got);
            if self.recv.read(at, &mut head[got..got + n]).is_err() {
                break;
            }
            got += n;
        }
        let plan = (got == hn)
            .then(|| wire::coalesced_offload(&head[..hn], total, self.mtu, &offload))
            .flatten()
            .and_then(|o| o.prepare_tx(total, &head[..hn]).ok());
        let Some(plan) = plan else {
            tracing::debug!(total, "netvsc: coalesced frame dropped (headers)");
            self.coalescer.reset();
            self.count_dropped();
            return;
        };
        // The fragments after the planned head, straight from the receive buffer (copied
        // when more than a write takes).
        let mut pieces: Vec<IoPiece<'_>> = Vec::with_capacity(fragments.len() + 1);
        pieces.push(IoPiece::Local(plan.head()));
        let mut skip = plan.consumed;
        for &(at, len) in fragments {
            if skip >= len {
                skip -= len;
                continue;
            }
            pieces.push(IoPiece::Shared(Shared::Mapped {
                map: &self.recv,
                offset: at + skip,
                len: len - skip,
            }));
            skip = 0;
        }
        let written = if pieces.len() <= netdev::tap::MAX_PIECES {
            self.tap.queues()[tap_i].write(&plan.hdr, &pieces)
        } else {
            if self.rsc_buf.is_empty() {
                self.rsc_buf = vec![0; wire::MAX_COALESCED];
            }
            let mut n = 0;
            let mut ok = true;
            for p in &pieces[1..] {
                if let IoPiece::Shared(s) = p {
                    ok &= s.read(&mut self.rsc_buf[n..n + s.len()]).is_ok();
                    n += s.len();
                }
            }
            if ok {
                self.tap.queues()[tap_i].write(
                    &plan.hdr,
                    &[
                        IoPiece::Local(plan.head()),
                        IoPiece::Local(&self.rsc_buf[..n]),
                    ],
                )
            } else {
                Ok(None)
            }
        };
        drop(pieces);
        self.coalescer.reset();
        let s = self.qstats(tap_i);
        match written {
            Ok(Some(_)) => {
                s.rx_frames.fetch_add(1, Ordering::Relaxed);
                s.rx_bytes.fetch_add(total as u64, Ordering::Relaxed);
                s.rsc_frames.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                s.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Delivers the message at `off` (`len` bytes) of the receive buffer, the last range of
    /// its transfer-page packet if `last_range`.
    fn deliver(&mut self, off: usize, len: usize, last_range: bool) {
        let tap_i = self.taps[0];
        let mut head = [0u8; wire::PACKET_HEADER + wire::MAX_RX_PPI];
        let first = len.min(wire::PACKET_HEADER);
        let mut n = first;
        let ok = off
            .checked_add(len)
            .is_some_and(|end| end <= self.recv.len())
            && self.recv.read(off, &mut head[..first]).is_ok()
            && {
                // Then the per-packet info, not the frame's bytes.
                n = wire::head_len(&head[..first], len);
                self.recv.read(off + first, &mut head[first..n]).is_ok()
            };
        let parsed = if ok {
            wire::parse(&head[..n], len).map_err(|e| e.to_string())
        } else {
            Err("range outside the receive buffer".into())
        };
        match parsed {
            Ok(Received::Frame {
                offset,
                len: flen,
                offload,
                fragment,
            }) => {
                tracing::trace!(len = flen, ?offload, ?fragment, "frame from the host");
                let at = off + offset;
                let abandoned = self.coalescer.abandoned;
                let step = self.coalescer.push(fragment, last_range, at, flen, offload);
                for _ in abandoned..self.coalescer.abandoned {
                    self.count_dropped();
                }
                match step {
                    Ok(wire::Coalesced::Whole) => {}
                    Ok(wire::Coalesced::Pending) => return,
                    Ok(wire::Coalesced::Complete) => return self.deliver_coalesced(),
                    Err(e) => {
                        tracing::debug!("netvsc: {e}");
                        return self.count_dropped();
                    }
                }
                // Checksums the host vouches for: the frame's head rewritten so that the TAP
                // takes them as good (see `wire::rx_checksum`); else as it is.
                let mut fhead = [0u8; netdev::offload::MAX_HEAD];
                let fh = &mut fhead[..flen.min(netdev::offload::MAX_HEAD)];
                let plan = offload
                    .checksum_ok
                    .then(|| self.recv.read(at, fh).ok())
                    .flatten()
                    .and_then(|()| wire::rx_checksum(fh))
                    .and_then(|c| c.prepare_tx(flen, fh).ok());
                let written = match &plan {
                    Some(p) => self.tap.queues()[tap_i].write(
                        &p.hdr,
                        &[
                            IoPiece::Local(p.head()),
                            IoPiece::Shared(Shared::Mapped {
                                map: &self.recv,
                                offset: at + p.consumed,
                                len: flen - p.consumed,
                            }),
                        ],
                    ),
                    None => self.tap.queues()[tap_i].write(
                        &offload.to_vnet(),
                        &[IoPiece::Shared(Shared::Mapped {
                            map: &self.recv,
                            offset: at,
                            len: flen,
                        })],
                    ),
                };
                let s = self.qstats(tap_i);
                match written {
                    Ok(Some(_)) => {
                        s.rx_frames.fetch_add(1, Ordering::Relaxed);
                        s.rx_bytes.fetch_add(flen as u64, Ordering::Relaxed);
                    }
                    _ => {
                        s.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(Received::Status(st)) => {
                let up = match st {
                    RndisStatus::MEDIA_CONNECT => true,
                    RndisStatus::MEDIA_DISCONNECT => false,
                    _ => return,
                };
                tracing::info!(up, "netvsc: link state from the host");
                self.stats.connected.store(u64::from(up), Ordering::Relaxed);
                if let Some(q) = self.tap.queues().first() {
                    let _ = q.set_carrier(up);
                }
            }
            Ok(Received::Control(t)) => tracing::debug!(?t, "late RNDIS control message"),
            Err(e) => {
                tracing::debug!("netvsc: message from the host dropped: {e}");
                self.qstats(tap_i).dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Handles an NVSP message from the host outside a transfer (a completion of ours, or the
    /// indirection table).
    fn nvsp(&mut self, tx: u64, completion: bool, payload: &[u8]) {
        let Some(m) = NvspMessage::read_from_payload(payload) else {
            return;
        };
        match m.header.message_type {
            NvspMessageType::SEND_RNDIS_PACKET_COMPLETE if completion => {
                if tx >> 32 == LARGE_TX >> 32 {
                    // Only a slot in flight (a forged or repeated completion frees nothing).
                    let slot = (tx & 0xffff_ffff) as usize;
                    if let Some(b @ true) = self.large_busy.get_mut(slot) {
                        *b = false;
                        self.free_large.push(slot);
                    }
                } else if tx < u64::from(INVALID_SECTION_INDEX) {
                    let s = tx as u32;
                    // Only a section of this queue that is in flight (a forged or repeated
                    // completion frees nothing).
                    if self.take_in_flight(s) {
                        self.free_sections.push(s);
                    }
                }
            }
            NvspMessageType::SEND_INDIRECTION_TABLE => {
                let t: SendIndirectionTable = m.body();
                let at = t.offset as usize;
                let n = (t.count as usize).min(SEND_INDIRECTION_TABLE_SIZE);
                if let Some(b) = payload.get(at..at + 4 * n) {
                    self.table = b
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect();
                    tracing::debug!(table = ?self.table, "send indirection table");
                }
            }
            other => tracing::debug!(?other, "NVSP message ignored"),
        }
    }

    /// Whether `section` is one of this queue's and in flight (then it is marked free).
    fn take_in_flight(&mut self, section: u32) -> bool {
        let Some(i) = section.checked_sub(self.sections.start) else {
            return false;
        };
        match self.busy.get_mut(i as usize) {
            Some(b) if *b && self.sections.contains(&section) => {
                *b = false;
                true
            }
            _ => false,
        }
    }

    /// Sends the frame held in `buf`: false if it must wait (no room).
    fn send_held(&mut self) -> Result<bool, Error> {
        let Some(h) = self.held.as_ref() else {
            return Ok(true);
        };
        let len = h.len;
        let total = wire::packet_head(&mut self.head, len, &h.offload);
        // A frame partly in a large-send slot is sent from there.
        if total <= self.section_size as usize && h.slot.is_none() {
            let Some(&s) = self.free_sections.last() else {
                return Ok(false);
            };
            let at = s as usize * self.section_size as usize;
            self.send.write(at, &self.head)?;
            self.send.write(at + self.head.len(), &self.buf[..len])?;
            let m = NvspMessage::new(
                NvspMessageType::SEND_RNDIS_PACKET,
                &SendRndisPacket {
                    channel_type: CHANNEL_TYPE_DATA,
                    send_buffer_section_index: s,
                    send_buffer_section_size: total as u32,
                },
            );
            match self.ch.out.write(&OutgoingPacket::in_band(
                u64::from(s),
                true,
                &[m.as_bytes()],
            )) {
                Ok(()) => {
                    self.free_sections.pop();
                    self.busy[(s - self.sections.start) as usize] = true;
                }
                Err(ringbuf::Error::Full { needed, .. }) => {
                    self.blocked = Some(needed);
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            if HEAD_ROOM + len > LARGE_BYTES || self.head.len() > HEAD_ROOM {
                self.held = None;
                self.qstats(self.taps[0])
                    .dropped
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(true);
            }
            // The slot the frame was read into, else any free one.
            let Some(at) = (match h.slot {
                Some(slot) => self.free_large.iter().position(|&s| s == slot),
                None => self.free_large.len().checked_sub(1),
            }) else {
                return Ok(false);
            };
            let slot = self.free_large[at];
            let (pages, map) = &self.large[slot];
            map.write(HEAD_ROOM, &self.buf[..len.min(LOCAL_PART)])?;
            if h.slot.is_none() && len > LOCAL_PART {
                map.write(HEAD_ROOM + LOCAL_PART, &self.buf[LOCAL_PART..len])?;
            }
            let start = HEAD_ROOM - self.head.len();
            map.write(start, &self.head)?;
            let npages = (start + total).div_ceil(4096);
            gpa_direct_header(
                &mut self.header,
                &[(start as u32, total as u32, &pages[..npages])],
            );
            let m = NvspMessage::new(
                NvspMessageType::SEND_RNDIS_PACKET,
                &SendRndisPacket {
                    channel_type: CHANNEL_TYPE_DATA,
                    send_buffer_section_index: INVALID_SECTION_INDEX,
                    send_buffer_section_size: 0,
                },
            );
            let parts = [m.as_bytes()];
            match self.ch.out.write(&OutgoingPacket {
                packet_type: PacketType::DATA_USING_GPA_DIRECT,
                flags: PACKET_FLAG_COMPLETION_REQUESTED,
                transaction_id: LARGE_TX | slot as u64,
                header: &self.header,
                payload: &parts,
            }) {
                Ok(()) => {
                    self.free_large.swap_remove(at);
                    self.large_busy[slot] = true;
                }
                Err(ringbuf::Error::Full { needed, .. }) => {
                    self.blocked = Some(needed);
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let tap_i = self.taps[self.next_tap % self.taps.len()];
        let s = self.qstats(tap_i);
        s.tx_frames.fetch_add(1, Ordering::Relaxed);
        s.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.held = None;
        Ok(true)
    }

    /// Writes the completions owed (transfer pages given back): false if the ring had no room
    /// for all of them.
    fn flush_completions(&mut self) -> Result<bool, Error> {
        let c = rndis_complete();
        while let Some(&tx) = self.completions.front() {
            match self
                .ch
                .out
                .write(&OutgoingPacket::completion(tx, &[c.as_bytes()]))
            {
                Ok(()) => {
                    self.completions.pop_front();
                }
                Err(ringbuf::Error::Full { needed, .. }) => {
                    self.blocked = Some(needed);
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Reads a frame from one of the ready TAP queues into `buf` (held): false if none.
    fn read_tap(&mut self) -> Result<bool, Error> {
        for _ in 0..self.taps.len() {
            let t = self.next_tap % self.taps.len();
            if !self.tap_ready[t] {
                self.next_tap += 1;
                continue;
            }
            let mut hdr = VirtioNetHdr::default();
            // With a large-send slot free, a frame's bytes past LOCAL_PART go straight into
            // it (guest memory), where the packet will send them from.
            let slot = self.free_large.last().copied();
            let queue = &self.tap.queues()[self.taps[t]];
            let (r, room) = match slot {
                Some(slot) => {
                    let (local, _) = self.buf.split_at_mut(LOCAL_PART);
                    let rest = Shared::Mapped {
                        map: &self.large[slot].1,
                        offset: HEAD_ROOM + LOCAL_PART,
                        len: LARGE_BYTES - HEAD_ROOM - LOCAL_PART,
                    };
                    let r = queue.read(
                        &mut hdr,
                        &mut [IoPieceMut::Local(local), IoPieceMut::Shared(rest)],
                    );
                    (r, LARGE_BYTES - HEAD_ROOM)
                }
                None => (
                    queue.read(&mut hdr, &mut [IoPieceMut::Local(&mut self.buf[..])]),
                    self.buf.len(),
                ),
            };
            match r {
                Ok(Some(n)) if n <= room => {
                    let head = &self.buf[..n.min(netdev::offload::MAX_HEAD)];
                    match TxOffload::from_vnet(&hdr, head) {
                        Ok(offload) => {
                            self.held = Some(Held {
                                len: n,
                                offload,
                                slot: slot.filter(|_| n > LOCAL_PART),
                            });
                            return Ok(true);
                        }
                        Err(e) => {
                            tracing::debug!("netvsc: frame from the TAP dropped: {e}");
                            self.qstats(self.taps[t])
                                .dropped
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(Some(_)) => {
                    self.qstats(self.taps[t])
                        .dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(None) => {
                    self.tap_ready[t] = false;
                    self.next_tap += 1;
                }
                Err(e) => {
                    tracing::debug!("netvsc: TAP read: {e}");
                    self.tap_ready[t] = false;
                    self.next_tap += 1;
                }
            }
        }
        Ok(false)
    }
}

impl QueueWork for NetQueue {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn pass(&mut self, lp: &mut EventLoop) -> Result<bool, Error> {
        let mut moved = false;
        self.blocked = None;
        for t in lp.take_ready() {
            if let Some(r) = self.tap_ready.get_mut(t - 2) {
                *r = true;
            }
        }
        // Completions owed first.
        moved |= !self.completions.is_empty();
        self.flush_completions()?;
        // From the host.
        if self.completions.is_empty() {
            self.ch.inc.mask();
            for _ in 0..BATCH {
                let Some(pkt) = self.ch.inc.read()? else {
                    break;
                };
                moved = true;
                let tx = pkt.transaction_id;
                match pkt.kind {
                    PacketKind::TransferPages { set_id, ranges } => {
                        let ranges: Vec<(usize, usize)> = if set_id == LINUX_RECEIVE_BUFFER_ID {
                            ranges
                                .iter()
                                .map(|r| (r.byte_offset as usize, r.byte_count as usize))
                                .collect()
                        } else {
                            Vec::new()
                        };
                        let n = ranges.len();
                        for (i, (off, len)) in ranges.into_iter().enumerate() {
                            self.deliver(off, len, i + 1 == n);
                        }
                        // A frame must end in its packet.
                        if self.coalescer.reset() {
                            self.count_dropped();
                        }
                        self.completions.push_back(tx);
                    }
                    PacketKind::Completion => {
                        let payload = pkt.payload.to_vec();
                        self.nvsp(tx, true, &payload);
                    }
                    PacketKind::InBand => {
                        let payload = pkt.payload.to_vec();
                        self.nvsp(tx, false, &payload);
                    }
                    _ => {}
                }
                // Completed now, or by the next pass if the ring is full (no more read then).
                if !self.flush_completions()? {
                    break;
                }
            }
            self.ch.commit_in()?;
        }
        // To the host.
        for _ in 0..BATCH {
            if self.held.is_none() && !self.read_tap()? {
                break;
            }
            if !self.send_held()? {
                break;
            }
            moved = true;
        }
        self.ch.commit_out()?;
        Ok(moved)
    }

    /// Frames sent and not completed yet: the host's answer (its completion, and often the
    /// peer's reply to the frame) is due soon, so the loop polls at least its in-flight floor
    /// rather than sleeping and paying a wakeup for it (an idle ping's reply).
    fn in_flight(&self) -> bool {
        self.free_sections.len() < self.sections.len() || self.free_large.len() < self.large.len()
    }

    fn prepare_sleep(&mut self) -> Result<bool, Error> {
        let (empty, signal) = self.ch.inc.prepare_sleep();
        if signal {
            self.ch.signal_host()?;
        }
        let room = match self.blocked {
            Some(n) => self.ch.out.prepare_sleep(n),
            None => true,
        };
        // A TAP that may have frames and somewhere to put them: no sleep.
        let can_send = self.held.is_none()
            && self.tap_ready.iter().any(|&r| r)
            && (!self.free_sections.is_empty() || !self.free_large.is_empty());
        Ok(empty && room && !can_send)
    }

    fn cancel_sleep(&mut self) {
        self.ch.out.clear_pending();
    }

    fn handed_work(&self) -> bool {
        false
    }

    fn woke(&mut self, woke: Woke) -> Result<(), Error> {
        if woke.interrupt {
            self.ch.take_interrupt()?;
        }
        for t in woke.ready {
            if let Some(r) = self.tap_ready.get_mut(t - 2) {
                *r = true;
            }
        }
        if !self.ch.host_alive() {
            return Err(Error::Disconnected);
        }
        let _ = &self.front;
        let _ = self.primary;
        Ok(())
    }
}
