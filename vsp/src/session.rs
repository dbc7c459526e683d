//! One partition's session: a front end connected to the daemon's socket.
//!
//! The session thread owns the partition's state: its guest memory, its SynIC, its VMBus
//! [`Server`] and one [`ChannelWorker`] per open channel. It reads partition messages from the
//! socket (see `docs/partition-socket.md`), feeds posted channel messages to the server, and
//! carries out the server's outputs. When the front end goes away (end of stream, garbage, a
//! socket error) or the daemon shuts down, every channel is stopped and joined and every
//! descriptor of the partition is closed: nothing outlives the session.
//!
//! Nothing a front end does can hold the session: replies are sent without blocking, and a
//! front end that leaves no room for one for [`SessionLimits::reply_timeout`] is dropped; the
//! irqfds it passes are written without blocking (see [`Synic`]). Changes from the daemon and
//! from devices (hot add and remove, subchannel requests) are state, not a queue: the latest
//! wanted offers and the wanted subchannel count per device, plus one wakeup, so a guest that
//! floods requests costs a compare, not memory.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ringbuf::guestmem::GuestMemory;
use ringbuf::socket::SeqPacket;
use ringbuf::Event;
use vmbus_proto::channel::Guid;
use vmbus_proto::partition::{self as wire, status, vp_flags, Kind};
use vmbus_proto::synic::{MESSAGE_PAYLOAD_SIZE, VMBUS_POST_MESSAGE_TYPE};
use zerocopy::IntoBytes;

use crate::channel::{ChannelSpec, ChannelWorker, Device, UnimplementedDevice};
use crate::server::{OfferSpec, Output, Server, ServerConfig};
use crate::synic::{peer_log_allowed, LogLimit, Synic};

/// Why a session ended.
#[derive(Debug)]
pub enum End {
    /// The front end closed the connection.
    Disconnected,
    /// The daemon is shutting down.
    Shutdown,
    /// The session failed; the connection was dropped.
    Failed(SessionError),
}

/// Why a session failed: the front end's socket, or the front end itself.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A socket operation on the connection failed.
    #[error("front end socket")]
    Io(#[source] ringbuf::Error),
    /// The front end left no room for a reply for this long: it does not read its replies.
    #[error("the front end read no reply for {0:?}")]
    Stalled(Duration),
    /// The front end sent something that is not the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl SessionError {
    fn protocol(why: impl std::fmt::Display) -> Self {
        Self::Protocol(why.to_string())
    }
}

/// Per-session limits on what a front end may make the session hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Most guest memory regions (default [`MAX_REGIONS`]).
    pub max_regions: usize,
    /// Most bytes of guest memory, all regions together (default [`MAX_MEMORY_BYTES`]). Each
    /// region is mapped whole into the daemon, and a sparse memfd costs its sender nothing: so
    /// this is what bounds the daemon's address space (sessions times this), which the front
    /// ends would otherwise share with no limit.
    pub max_memory_bytes: u64,
    /// Most kernel mappings the views of this guest's scattered rings may hold at once (default
    /// [`ringbuf::guestmem::DEFAULT_MAX_MAPPED_PIECES`]; see [`GuestMemory::with_map_limit`]).
    /// The daemon lowers it to its share of the process's budget
    /// ([`crate::daemon::DaemonConfig::effective`]), so that guests cannot starve each other.
    pub max_mapped_pieces: usize,
    /// Most channel messages queued per VP for a guest that does not take them (default
    /// [`crate::synic::MAX_QUEUED_MESSAGES`]); beyond, the oldest are dropped.
    pub max_queued_messages: usize,
    /// How long a reply may wait for room in the front end's receive queue before the front
    /// end is dropped (default 5 s).
    pub reply_timeout: Duration,
    /// How long a new connection may take to say HELLO (default 10 s): a connection that never
    /// does would otherwise hold one of the daemon's session slots for ever.
    pub hello_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_regions: MAX_REGIONS,
            max_memory_bytes: MAX_MEMORY_BYTES,
            max_mapped_pieces: ringbuf::guestmem::DEFAULT_MAX_MAPPED_PIECES,
            max_queued_messages: crate::synic::MAX_QUEUED_MESSAGES,
            reply_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(10),
        }
    }
}

/// Everything a session is configured with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionConfig {
    /// The VMBus server's limits.
    pub server: ServerConfig,
    /// The session's own.
    pub limits: SessionLimits,
}

/// What a device factory knows about the channel being opened.
pub struct DeviceContext<'a> {
    /// Device class.
    pub interface_type: Guid,
    /// Device instance (which disk or NIC).
    pub interface_instance: Guid,
    /// Subchannel index (0: primary).
    pub subchannel_index: u16,
    /// The channel's relid.
    pub relid: u32,
    /// The partition's complete GPADLs (netvsp's receive and send buffers are GPADLs).
    pub gpadls: crate::server::GpadlIndex,
    /// The partition's memory.
    pub mem: &'a Arc<GuestMemory>,
    /// Asks the session to offer this many subchannels of the channel (storvsc's and netvsc's
    /// multi-queue); returns false if the session is gone. Cheap and never blocks: requests
    /// are coalesced (the largest count wanted is kept until the session applies it, through
    /// [`Server::request_subchannels`]).
    pub request_subchannels: SubchannelRequest,
}

/// See [`DeviceContext::request_subchannels`].
pub type SubchannelRequest = Arc<dyn Fn(u16) -> bool + Send + Sync>;

impl std::fmt::Debug for DeviceContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceContext")
            .field("interface_type", &self.interface_type)
            .field("interface_instance", &self.interface_instance)
            .field("subchannel_index", &self.subchannel_index)
            .finish_non_exhaustive()
    }
}

/// Makes the device that serves a newly opened channel; an error fails the open.
pub type DeviceFactory =
    Arc<dyn Fn(&DeviceContext<'_>) -> Result<Box<dyn Device>, crate::Error> + Send + Sync>;

/// A factory that serves no protocol: every channel opens and its packets are discarded.
pub fn unimplemented_devices() -> DeviceFactory {
    Arc::new(|ctx: &DeviceContext<'_>| {
        Ok(Box::new(UnimplementedDevice::new(ctx.interface_type)) as Box<dyn Device>)
    })
}

/// The partition's state before and after guest memory is complete.
struct Partition {
    vp_count: u32,
    /// Regions collect here until the guest starts running (first SET_VP or POST_MESSAGE).
    building: Option<GuestMemory>,
    mem: Arc<GuestMemory>,
    synic: Arc<Synic>,
}

/// A session over `sock`, offering `offers`.
pub struct Session {
    sock: SeqPacket,
    stop: Arc<Event>,
    /// What the daemon and the devices want changed, signalled by its event.
    wanted: Arc<Wanted>,
    server: Server,
    devices: DeviceFactory,
    partition: Option<Partition>,
    channels: HashMap<u32, (u32, ChannelWorker)>,
    limits: SessionLimits,
    /// A handle on this session, for devices that ask for subchannels.
    own: SessionHandle,
}

/// Changes wanted of a running session: state that later requests overwrite, so that the
/// memory it takes is bounded by the number of offers however many requests arrive.
#[derive(Debug)]
struct Wanted {
    state: Mutex<WantedState>,
    /// Signalled when `state` changed.
    event: Event,
}

#[derive(Debug, Default)]
struct WantedState {
    /// The offers the daemon's configuration now makes (hot add and remove), if changed.
    offers: Option<Vec<OfferSpec>>,
    /// Per device instance, the subchannel count its device asked for (the largest).
    subchannels: Vec<(Guid, u16)>,
}

/// The daemon's handle on a running session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// Weak, so the eventfd closes when the session ends even if the daemon has not yet
    /// reaped the handle.
    wanted: Weak<Wanted>,
}

impl SessionHandle {
    /// Makes `offers` the session's offers: the ones missing (by instance GUID) are rescinded
    /// with their subchannels, new ones offered. False if the session has ended.
    pub fn set_offers(&self, offers: Vec<OfferSpec>) -> bool {
        self.update(|w| w.offers = Some(offers))
    }

    /// Asks for subchannels 1 to `count` of the channel of `instance` (see
    /// [`Server::request_subchannels`]). False if the session has ended.
    pub fn request_subchannels(&self, instance: Guid, count: u16) -> bool {
        self.update(
            |w| match w.subchannels.iter_mut().find(|(i, _)| *i == instance) {
                Some((_, c)) => *c = (*c).max(count),
                None => w.subchannels.push((instance, count)),
            },
        )
    }

    fn update(&self, f: impl FnOnce(&mut WantedState)) -> bool {
        let Some(w) = self.wanted.upgrade() else {
            return false;
        };
        f(&mut w.state.lock().unwrap_or_else(|e| e.into_inner()));
        w.event.signal().is_ok()
    }
}

/// Rate limit of the "front end dropped" warnings, across the daemon.
static DROPPED_LOG: Mutex<LogLimit> = Mutex::new(LogLimit::new(10, Duration::from_secs(60)));

/// Most guest memory regions a partition may register.
pub const MAX_REGIONS: usize = 64;

/// Most guest memory a partition may register, by default: 1 TiB, so that the default 64
/// sessions map at most half of the 128 TiB a process can address on x86-64.
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;

impl Session {
    /// A session for a newly accepted connection, and the daemon's handle on it. `stop` is
    /// signalled when the daemon shuts down.
    pub fn new(
        sock: SeqPacket,
        stop: Arc<Event>,
        config: SessionConfig,
        offers: &[OfferSpec],
        devices: DeviceFactory,
    ) -> Result<(Self, SessionHandle), crate::Error> {
        let wanted = Arc::new(Wanted {
            state: Mutex::new(WantedState::default()),
            event: Event::new()?,
        });
        let mut server = Server::new(config.server);
        let mut out = Vec::new();
        for o in offers {
            if let Err(e) = server.add_offer(o.clone(), &mut out) {
                tracing::warn!(error = %e, offer = %o.interface_instance, "offer dropped");
            }
        }
        let handle = SessionHandle {
            wanted: Arc::downgrade(&wanted),
        };
        let session = Self {
            sock,
            stop,
            wanted,
            server,
            devices,
            partition: None,
            channels: HashMap::new(),
            limits: config.limits,
            own: handle.clone(),
        };
        Ok((session, handle))
    }

    /// Serves the connection until it ends; then releases everything.
    pub fn run(mut self) -> End {
        let mut end = self.serve();
        if matches!(end, End::Failed(_)) && self.stop.is_signalled() {
            // Failed while the daemon was stopping (a reply cut short): that is the shutdown.
            end = End::Shutdown;
        }
        let mut out = Vec::new();
        self.server.reset(&mut out);
        self.channels.clear();
        match &end {
            End::Failed(e) => {
                // A front end can fail its session in a loop: rate-limited across the daemon.
                let allowed = DROPPED_LOG
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .allow();
                if let Some(suppressed) = allowed {
                    tracing::warn!(error = %e, suppressed, "front end dropped");
                }
            }
            e => tracing::info!(end = ?e, "session ended"),
        }
        end
    }

    fn serve(&mut self) -> End {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut buf = [0u8; wire::MAX_MESSAGE_SIZE];
        let hello_by = Instant::now() + self.limits.hello_timeout;
        loop {
            let mut fds = [
                PollFd::new(&self.sock, PollFlags::IN),
                PollFd::new(self.stop.as_ref(), PollFlags::IN),
                PollFd::new(&self.wanted.event, PollFlags::IN),
            ];
            // Until HELLO, the wait is bounded: a silent connection gives its slot back.
            let left = self.partition.is_none().then(|| {
                let left = hello_by.saturating_duration_since(Instant::now());
                rustix::event::Timespec {
                    tv_sec: left.as_secs() as i64,
                    tv_nsec: i64::from(left.subsec_nanos()),
                }
            });
            if left.is_some_and(|t| t.tv_sec == 0 && t.tv_nsec == 0) {
                return End::Failed(SessionError::protocol(format!(
                    "no HELLO within {:?}",
                    self.limits.hello_timeout
                )));
            }
            match poll(&mut fds, left.as_ref()) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return End::Failed(SessionError::Io(ringbuf::Error::Socket(e))),
            }
            let ready = [0, 1, 2].map(|i| !fds[i].revents().is_empty());
            if ready[1] {
                return End::Shutdown;
            }
            if ready[2] {
                let _ = self.wanted.event.try_wait();
                if let Err(e) = self.apply_wanted() {
                    return End::Failed(e);
                }
            }
            if !ready[0] {
                continue;
            }
            let d = match self.sock.recv(&mut buf) {
                Ok(Some(d)) => d,
                Ok(None) => return End::Disconnected,
                Err(e @ ringbuf::Error::Socket(_)) => return End::Failed(SessionError::Io(e)),
                Err(e) => return End::Failed(SessionError::protocol(e)),
            };
            if let Err(e) = self.dispatch(&buf[..d.len], d.fds) {
                return End::Failed(e);
            }
        }
    }

    /// Sends a datagram to the front end without ever blocking for long: waits for room at
    /// most [`SessionLimits::reply_timeout`] (or until the daemon stops), then gives up on the
    /// front end.
    fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), SessionError> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let deadline = Instant::now() + self.limits.reply_timeout;
        loop {
            if self.sock.try_send(bytes, fds).map_err(SessionError::Io)? {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SessionError::Stalled(self.limits.reply_timeout));
            }
            let ts = Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut pfds = [
                PollFd::new(&self.sock, PollFlags::OUT),
                PollFd::new(self.stop.as_ref(), PollFlags::IN),
            ];
            match poll(&mut pfds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(SessionError::Io(ringbuf::Error::Socket(e))),
            }
            if !pfds[1].revents().is_empty() {
                // Stopping: run() sees the stop event and ends the session as a shutdown.
                return Err(SessionError::Stalled(self.limits.reply_timeout));
            }
        }
    }

    fn reply<T: IntoBytes + zerocopy::Immutable>(
        &self,
        kind: Kind,
        body: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), SessionError> {
        self.send(&wire::encode(kind, body), fds)
    }

    fn status(&self, request: Kind, status: u32) -> Result<(), SessionError> {
        self.reply(Kind::STATUS, &wire::Status { request, status }, &[])
    }

    /// Handles one datagram. An `Err` drops the connection.
    fn dispatch(&mut self, datagram: &[u8], mut fds: Vec<OwnedFd>) -> Result<(), SessionError> {
        let (kind, body) = wire::split(datagram).map_err(SessionError::protocol)?;
        let expect_fds = |n: usize, fds: &Vec<OwnedFd>| -> Result<(), SessionError> {
            if fds.len() > n {
                Err(SessionError::Protocol(format!(
                    "{kind:?} carries {} descriptors",
                    fds.len()
                )))
            } else {
                Ok(())
            }
        };
        match kind {
            Kind::HELLO => {
                expect_fds(0, &fds)?;
                let h: wire::Hello = wire::body(kind, body).map_err(SessionError::protocol)?;
                if self.partition.is_some() {
                    return Err(SessionError::protocol("second HELLO"));
                }
                if h.version != wire::VERSION || h.vp_count == 0 || h.vp_count > wire::MAX_VPS {
                    let st = if h.version != wire::VERSION {
                        status::BAD_VERSION
                    } else {
                        status::BAD_VP
                    };
                    self.reply(
                        Kind::HELLO_REPLY,
                        &wire::HelloReply {
                            version: 0,
                            status: st,
                        },
                        &[],
                    )?;
                    return Err(SessionError::Protocol(format!("refused HELLO {h:?}")));
                }
                self.partition = Some(Partition {
                    vp_count: h.vp_count,
                    building: Some(GuestMemory::with_map_limit(self.limits.max_mapped_pieces)),
                    mem: Arc::new(GuestMemory::new()),
                    synic: Arc::new(Synic::with_queue_limit(
                        h.vp_count,
                        self.limits.max_queued_messages,
                    )),
                });
                self.server.set_vp_count(h.vp_count);
                tracing::info!(vps = h.vp_count, "front end connected");
                self.reply(
                    Kind::HELLO_REPLY,
                    &wire::HelloReply {
                        version: wire::VERSION,
                        status: status::OK,
                    },
                    &[],
                )
            }
            Kind::ADD_MEMORY => {
                let m: wire::AddMemory = wire::body(kind, body).map_err(SessionError::protocol)?;
                let (max_regions, max_bytes) =
                    (self.limits.max_regions, self.limits.max_memory_bytes);
                let Some(p) = self.partition.as_mut() else {
                    return self.status(kind, status::BAD_STATE);
                };
                let (Some(building), [_]) = (p.building.as_mut(), fds.as_slice()) else {
                    let st = if fds.len() != 1 {
                        status::MALFORMED
                    } else {
                        status::BAD_STATE
                    };
                    return self.status(kind, st);
                };
                let fd = fds.pop().expect("one descriptor");
                let too_much = building
                    .total_len()
                    .checked_add(m.len)
                    .is_none_or(|total| total > max_bytes);
                let st = if building.regions_len() >= max_regions || too_much {
                    status::BAD_MEMORY
                } else {
                    match building.add_region(m.gpa, m.len, fd, m.fd_offset) {
                        Ok(()) => status::OK,
                        Err(e) => {
                            if let Some(suppressed) = peer_log_allowed() {
                                tracing::warn!(error = %e, ?m, suppressed,
                                    "guest memory region refused");
                            }
                            status::BAD_MEMORY
                        }
                    }
                };
                self.status(kind, st)
            }
            Kind::SET_VP => {
                expect_fds(1, &fds)?;
                let v: wire::SetVp = wire::body(kind, body).map_err(SessionError::protocol)?;
                let Some(p) = self.partition.as_mut() else {
                    return self.status(kind, status::BAD_STATE);
                };
                p.freeze();
                let page_ok =
                    |gpa: u64| gpa.is_multiple_of(4096) && p.mem.contains_page(gpa / 4096);
                let simp = (v.flags & vp_flags::SIMP_ENABLED != 0).then_some(v.simp_gpa);
                let siefp = (v.flags & vp_flags::SIEFP_ENABLED != 0).then_some(v.siefp_gpa);
                if v.vp >= p.vp_count || !simp.is_none_or(page_ok) || !siefp.is_none_or(page_ok) {
                    return self.status(kind, status::BAD_VP);
                }
                // The irqfd must be an eventfd; it is written without blocking from now on.
                let irq = match fds.pop().map(Event::from_untrusted_fd).transpose() {
                    Ok(irq) => irq,
                    Err(_) => return self.status(kind, status::MALFORMED),
                };
                p.synic.set_vp(
                    &p.mem,
                    v.vp,
                    simp,
                    siefp,
                    v.flags & vp_flags::SINT_MASKED != 0,
                    irq,
                );
                self.status(kind, status::OK)
            }
            Kind::POST_MESSAGE => {
                expect_fds(0, &fds)?;
                let m: wire::PostMessage =
                    wire::body(kind, body).map_err(SessionError::protocol)?;
                let Some(p) = self.partition.as_mut() else {
                    return Err(SessionError::protocol("POST_MESSAGE before HELLO"));
                };
                p.freeze();
                let size = m.input.payload_size as usize;
                if m.input.message_type != VMBUS_POST_MESSAGE_TYPE
                    || size > MESSAGE_PAYLOAD_SIZE
                    || m.vp >= p.vp_count
                {
                    // The front end should have failed the hypercall; drop the message.
                    tracing::debug!(vp = m.vp, size, "invalid posted message dropped");
                    return Ok(());
                }
                let mem = p.mem.clone();
                let mut out = Vec::new();
                self.server.handle_message(
                    &mem,
                    m.input.connection_id & 0x00FF_FFFF,
                    &m.input.payload[..size],
                    &mut out,
                );
                self.apply(out)
            }
            Kind::EOM => {
                expect_fds(0, &fds)?;
                let e: wire::Eom = wire::body(kind, body).map_err(SessionError::protocol)?;
                if let Some(p) = &self.partition {
                    p.synic.eom(&p.mem, e.vp);
                }
                Ok(())
            }
            Kind::SIGNAL_EVENT => {
                expect_fds(0, &fds)?;
                let s: wire::SignalEvent =
                    wire::body(kind, body).map_err(SessionError::protocol)?;
                if let Some((_, w)) = self
                    .channels
                    .values()
                    .find(|(conn, _)| *conn == s.connection_id)
                {
                    let _ = w.wake_event().signal();
                }
                Ok(())
            }
            other => Err(SessionError::Protocol(format!(
                "unknown message kind {other:?}"
            ))),
        }
    }

    /// Applies what the daemon and the devices asked for since the last time: the offers of a
    /// new configuration, and subchannels.
    fn apply_wanted(&mut self) -> Result<(), SessionError> {
        let WantedState {
            offers,
            subchannels,
        } = std::mem::take(&mut *self.wanted.state.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out = Vec::new();
        if let Some(new) = offers {
            let current: Vec<(u32, OfferSpec)> = self
                .server
                .offers()
                .filter(|(_, o)| o.subchannel_index == 0)
                .map(|(r, o)| (r, o.clone()))
                .collect();
            let live = |relid: u32| {
                self.server.channel_state(relid) != Some(crate::server::ChannelState::Rescinded)
            };
            let gone: Vec<Guid> = current
                .iter()
                .filter(|(r, o)| {
                    live(*r)
                        && !new
                            .iter()
                            .any(|n| n.interface_instance == o.interface_instance)
                })
                .map(|(_, o)| o.interface_instance)
                .collect();
            let added: Vec<OfferSpec> = new
                .into_iter()
                .filter(|n| {
                    !current
                        .iter()
                        .any(|(r, o)| live(*r) && o.interface_instance == n.interface_instance)
                })
                .collect();
            tracing::info!(
                removed = gone.len(),
                added = added.len(),
                "applying a new configuration"
            );
            for instance in gone {
                self.server.rescind_instance(instance, &mut out);
            }
            for spec in added {
                if let Err(e) = self.server.add_offer(spec, &mut out) {
                    tracing::warn!(error = %e, "hot add failed");
                }
            }
        }
        for (instance, count) in subchannels {
            if self
                .server
                .request_subchannels(instance, count, &mut out)
                .is_none()
            {
                tracing::debug!(%instance, count, "subchannels asked of a channel not open");
            }
        }
        if self.partition.is_some() {
            self.apply(out)
        } else {
            Ok(())
        }
    }

    /// Carries out the server's outputs, in order.
    fn apply(&mut self, outputs: Vec<Output>) -> Result<(), SessionError> {
        let mut queue = std::collections::VecDeque::from(outputs);
        while let Some(o) = queue.pop_front() {
            let p = self.partition.as_ref().expect("outputs only after HELLO");
            match o {
                Output::Message { vp, bytes } => p.synic.post(&p.mem, vp, &bytes),
                Output::Open {
                    relid,
                    connection_id,
                    target_vp,
                    interface_type,
                    interface_instance,
                    subchannel_index,
                    ring,
                    downstream_offset,
                    ..
                } => {
                    let own = self.own.clone();
                    let request_subchannels: SubchannelRequest =
                        Arc::new(move |count| own.request_subchannels(interface_instance, count));
                    let ctx = DeviceContext {
                        request_subchannels,
                        interface_type,
                        interface_instance,
                        subchannel_index,
                        relid,
                        gpadls: self.server.gpadl_index(),
                        mem: &p.mem,
                    };
                    let started = (self.devices)(&ctx).and_then(|device| {
                        let spec = ChannelSpec {
                            relid,
                            ring,
                            downstream_pages: downstream_offset,
                            target_vp,
                            device,
                        };
                        ChannelWorker::start(spec, p.mem.clone(), p.synic.clone())
                    });
                    let mut more = Vec::new();
                    match started {
                        Ok(w) => {
                            let sig = wire::ChannelSignal {
                                connection_id,
                                relid,
                            };
                            self.reply(Kind::CHANNEL_SIGNAL, &sig, &[w.wake_event().as_fd()])?;
                            self.channels.insert(relid, (connection_id, w));
                            self.server.open_complete(relid, true, &mut more);
                        }
                        Err(e) => {
                            if let Some(suppressed) = peer_log_allowed() {
                                tracing::warn!(relid, error = %e, suppressed,
                                    "channel failed to start");
                            }
                            self.server.open_complete(relid, false, &mut more);
                        }
                    }
                    queue.extend(more);
                }
                Output::Close { relid } => {
                    if let Some((connection_id, worker)) = self.channels.remove(&relid) {
                        drop(worker);
                        self.reply(
                            Kind::CHANNEL_SIGNAL_REMOVED,
                            &wire::ChannelSignal {
                                connection_id,
                                relid,
                            },
                            &[],
                        )?;
                    }
                    // Its subchannels (if a primary) were rescinded by the server.
                }
                Output::Retarget { relid, target_vp } => {
                    if let Some((_, w)) = self.channels.get(&relid) {
                        w.retarget(target_vp);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Partition {
    /// Ends the memory-building phase: from now on the regions are fixed.
    fn freeze(&mut self) {
        if let Some(m) = self.building.take() {
            self.mem = Arc::new(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(limits: SessionLimits) -> (Session, SessionHandle, SeqPacket, Arc<Event>) {
        let (ours, theirs) = SeqPacket::pair().unwrap();
        let stop = Arc::new(Event::new().unwrap());
        let config = SessionConfig {
            server: ServerConfig::default(),
            limits,
        };
        let (s, h) =
            Session::new(ours, stop.clone(), config, &[], unimplemented_devices()).unwrap();
        (s, h, theirs, stop)
    }

    #[test]
    fn a_connection_that_never_says_hello_ends() {
        let limits = SessionLimits {
            hello_timeout: Duration::from_millis(100),
            ..SessionLimits::default()
        };
        // Silent: the session ends by itself, giving its slot back.
        let (s, _h, _front, _stop) = session(limits.clone());
        let t = Instant::now();
        assert!(matches!(s.run(), End::Failed(SessionError::Protocol(_))));
        assert!(t.elapsed() >= Duration::from_millis(100));
        // HELLO in time: the deadline no longer applies.
        let (s, _h, front, stop) = session(limits);
        let hello = wire::Hello {
            version: wire::VERSION,
            vp_count: 1,
        };
        front.send(&wire::encode(Kind::HELLO, &hello), &[]).unwrap();
        let run = std::thread::spawn(move || s.run());
        std::thread::sleep(Duration::from_millis(300));
        assert!(!run.is_finished(), "a session past HELLO has no deadline");
        stop.signal().unwrap();
        assert!(matches!(run.join().unwrap(), End::Shutdown));
    }

    #[test]
    fn requests_are_state_not_a_queue() {
        let (s, h, _front, _stop) = session(SessionLimits::default());
        let (a, b) = (Guid([1; 16]), Guid([2; 16]));
        for i in 0..100_000u32 {
            assert!(h.request_subchannels(a, (i % 3) as u16 + 1));
        }
        assert!(h.request_subchannels(b, 1));
        for _ in 0..1000 {
            assert!(h.set_offers(Vec::new()));
        }
        {
            let w = s.wanted.state.lock().unwrap();
            assert_eq!(w.subchannels, [(a, 3), (b, 1)]);
            assert_eq!(w.offers.as_deref(), Some(&[][..]));
        }
        assert!(s.wanted.event.is_signalled());
        drop(s);
        assert!(!h.request_subchannels(a, 1), "the session is gone");
        assert!(!h.set_offers(Vec::new()));
    }

    /// Sends HELLO, then requests that each get a reply, reading none, until the socket is
    /// full; returns when the daemon's side stops reading.
    fn flood_without_reading(front: &SeqPacket) {
        let hello = wire::encode(
            Kind::HELLO,
            &wire::Hello {
                version: wire::VERSION,
                vp_count: 1,
            },
        );
        front.send(&hello, &[]).unwrap();
        let req = wire::encode(Kind::ADD_MEMORY, &wire::AddMemory::default());
        let mut full = 0;
        while full < 100 {
            match front.try_send(&req, &[]) {
                Ok(true) => full = 0,
                Ok(false) => {
                    full += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return,
            }
        }
    }

    #[test]
    fn a_front_end_that_reads_no_replies_is_dropped() {
        let (s, _h, front, _stop) = session(SessionLimits {
            reply_timeout: Duration::from_millis(200),
            ..SessionLimits::default()
        });
        let t = std::thread::spawn(move || s.run());
        flood_without_reading(&front);
        let end = t.join().unwrap();
        assert!(
            matches!(end, End::Failed(SessionError::Stalled(_))),
            "{end:?}"
        );
    }

    #[test]
    fn shutdown_ends_a_session_waiting_for_room() {
        let (s, _h, front, stop) = session(SessionLimits {
            reply_timeout: Duration::from_secs(3600),
            ..SessionLimits::default()
        });
        let t = std::thread::spawn(move || s.run());
        flood_without_reading(&front);
        stop.signal().unwrap();
        assert!(matches!(t.join().unwrap(), End::Shutdown));
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let (s, _h, front, _stop) = session(SessionLimits::default());
        let t = std::thread::spawn(move || s.run());
        front.send(b"\xff\xff\xff\xff\0\0\0\0", &[]).unwrap();
        assert!(matches!(
            t.join().unwrap(),
            End::Failed(SessionError::Protocol(_))
        ));
    }
}
