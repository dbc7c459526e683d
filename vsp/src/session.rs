//! One partition's session: a front end connected to the daemon's socket.
//!
//! The session thread owns the partition's state: its guest memory, its SynIC, its VMBus
//! [`Server`] and one [`ChannelWorker`] per open channel. It reads partition messages from the
//! socket (see `docs/partition-socket.md`), feeds posted channel messages to the server, and
//! carries out the server's outputs. When the front end goes away (end of stream, garbage, a
//! socket error) or the daemon shuts down, every channel is stopped and joined and every
//! descriptor of the partition is closed: nothing outlives the session.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Weak};

use ringbuf::guestmem::GuestMemory;
use ringbuf::socket::SeqPacket;
use ringbuf::Event;
use vmbus_proto::channel::Guid;
use vmbus_proto::partition::{self as wire, status, vp_flags, Kind};
use vmbus_proto::synic::{MESSAGE_PAYLOAD_SIZE, VMBUS_POST_MESSAGE_TYPE};
use zerocopy::IntoBytes;

use crate::channel::{ChannelSpec, ChannelWorker, Device, UnimplementedDevice};
use crate::server::{OfferSpec, Output, Server, ServerConfig};
use crate::synic::Synic;

/// Why a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The front end closed the connection.
    Disconnected,
    /// The daemon is shutting down.
    Shutdown,
    /// The front end sent something that is not the protocol; the connection was dropped.
    ProtocolViolation(String),
}

/// What a device factory knows about the channel being opened.
pub struct DeviceContext<'a> {
    /// Device class.
    pub interface_type: Guid,
    /// Device instance (which disk or NIC).
    pub interface_instance: Guid,
    /// Subchannel index (0: primary).
    pub subchannel_index: u16,
    /// The partition's memory.
    pub mem: &'a Arc<GuestMemory>,
    /// Asks the session to offer this many subchannels of the channel (storvsc's and netvsc's
    /// multi-queue); returns false if the session is gone.
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
    /// Offer changes from the daemon (hot add and remove), signalled by `control_event`.
    control: Receiver<Control>,
    control_event: Arc<Event>,
    server: Server,
    devices: DeviceFactory,
    partition: Option<Partition>,
    channels: HashMap<u32, (u32, ChannelWorker)>,
    /// Limits on guest memory regions.
    max_regions: usize,
    /// A handle on this session, for devices that ask for subchannels.
    own: SessionHandle,
}

/// A change the daemon asks of a running session.
#[derive(Debug, Clone)]
pub enum Control {
    /// Hot add: offer a new channel.
    Add(OfferSpec),
    /// Hot remove: rescind the channels (primary and subchannels) with this instance GUID.
    Remove(Guid),
    /// A device asks for subchannels 1..=count of its channel.
    OfferSubchannels {
        /// Device class.
        interface_type: Guid,
        /// Device instance.
        interface_instance: Guid,
        /// How many.
        count: u16,
    },
}

/// The daemon's handle on a running session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    tx: Sender<Control>,
    /// Weak, so the eventfd closes when the session ends even if the daemon has not yet
    /// reaped the handle.
    event: Weak<Event>,
}

impl SessionHandle {
    /// Sends a change; false if the session has ended.
    pub fn send(&self, c: Control) -> bool {
        match self.event.upgrade() {
            Some(e) => self.tx.send(c).is_ok() && e.signal().is_ok(),
            None => false,
        }
    }
}

/// Most guest memory regions a partition may register.
pub const MAX_REGIONS: usize = 64;

impl Session {
    /// A session for a newly accepted connection, and the daemon's handle on it. `stop` is
    /// signalled when the daemon shuts down.
    pub fn new(
        sock: SeqPacket,
        stop: Arc<Event>,
        config: ServerConfig,
        offers: &[OfferSpec],
        devices: DeviceFactory,
    ) -> Result<(Self, SessionHandle), crate::Error> {
        let (tx, control) = channel();
        let control_event = Arc::new(Event::new()?);
        let mut server = Server::new(config);
        let mut out = Vec::new();
        for o in offers {
            if let Err(e) = server.add_offer(o.clone(), &mut out) {
                tracing::warn!(error = %e, offer = %o.interface_instance, "offer dropped");
            }
        }
        let handle = SessionHandle {
            tx,
            event: Arc::downgrade(&control_event),
        };
        let session = Self {
            sock,
            stop,
            control,
            control_event,
            server,
            devices,
            partition: None,
            channels: HashMap::new(),
            max_regions: MAX_REGIONS,
            own: handle.clone(),
        };
        Ok((session, handle))
    }

    /// Serves the connection until it ends; then releases everything.
    pub fn run(mut self) -> End {
        let end = self.serve();
        let mut out = Vec::new();
        self.server.reset(&mut out);
        self.channels.clear();
        match &end {
            End::ProtocolViolation(why) => tracing::warn!(reason = %why, "front end dropped"),
            e => tracing::info!(end = ?e, "session ended"),
        }
        end
    }

    fn serve(&mut self) -> End {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut buf = [0u8; wire::MAX_MESSAGE_SIZE];
        loop {
            let mut fds = [
                PollFd::new(&self.sock, PollFlags::IN),
                PollFd::new(self.stop.as_ref(), PollFlags::IN),
                PollFd::new(self.control_event.as_ref(), PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return End::ProtocolViolation(format!("poll failed: {e}")),
            }
            let ready = [0, 1, 2].map(|i| !fds[i].revents().is_empty());
            if ready[1] {
                return End::Shutdown;
            }
            if ready[2] {
                let _ = self.control_event.wait();
                if let Err(why) = self.control_changes() {
                    return End::ProtocolViolation(why);
                }
            }
            if !ready[0] {
                continue;
            }
            let d = match self.sock.recv(&mut buf) {
                Ok(Some(d)) => d,
                Ok(None) => return End::Disconnected,
                Err(e) => return End::ProtocolViolation(format!("receive failed: {e}")),
            };
            if let Err(why) = self.dispatch(&buf[..d.len], d.fds) {
                return End::ProtocolViolation(why);
            }
        }
    }

    fn reply<T: IntoBytes + zerocopy::Immutable>(
        &self,
        kind: Kind,
        body: &T,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), String> {
        self.sock
            .send(&wire::encode(kind, body), fds)
            .map_err(|e| format!("send failed: {e}"))
    }

    fn status(&self, request: Kind, status: u32) -> Result<(), String> {
        self.reply(Kind::STATUS, &wire::Status { request, status }, &[])
    }

    /// Handles one datagram. An `Err` drops the connection.
    fn dispatch(&mut self, datagram: &[u8], mut fds: Vec<OwnedFd>) -> Result<(), String> {
        let (kind, body) = wire::split(datagram).map_err(|e| e.to_string())?;
        let expect_fds = |n: usize, fds: &Vec<OwnedFd>| -> Result<(), String> {
            if fds.len() > n {
                Err(format!("{kind:?} carries {} descriptors", fds.len()))
            } else {
                Ok(())
            }
        };
        match kind {
            Kind::HELLO => {
                expect_fds(0, &fds)?;
                let h: wire::Hello = wire::body(kind, body).map_err(|e| e.to_string())?;
                if self.partition.is_some() {
                    return Err("second HELLO".into());
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
                    return Err(format!("refused HELLO {h:?}"));
                }
                self.partition = Some(Partition {
                    vp_count: h.vp_count,
                    building: Some(GuestMemory::new()),
                    mem: Arc::new(GuestMemory::new()),
                    synic: Arc::new(Synic::new(h.vp_count)),
                });
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
                let m: wire::AddMemory = wire::body(kind, body).map_err(|e| e.to_string())?;
                let max_regions = self.max_regions;
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
                let st = if building.regions_len() >= max_regions {
                    status::BAD_MEMORY
                } else {
                    match building.add_region(m.gpa, m.len, fd, m.fd_offset) {
                        Ok(()) => status::OK,
                        Err(e) => {
                            tracing::warn!(error = %e, ?m, "guest memory region refused");
                            status::BAD_MEMORY
                        }
                    }
                };
                self.status(kind, st)
            }
            Kind::SET_VP => {
                expect_fds(1, &fds)?;
                let v: wire::SetVp = wire::body(kind, body).map_err(|e| e.to_string())?;
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
                let irq = fds.pop().map(Event::from_fd);
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
                let m: wire::PostMessage = wire::body(kind, body).map_err(|e| e.to_string())?;
                let Some(p) = self.partition.as_mut() else {
                    return Err("POST_MESSAGE before HELLO".into());
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
                let e: wire::Eom = wire::body(kind, body).map_err(|e| e.to_string())?;
                if let Some(p) = &self.partition {
                    p.synic.eom(&p.mem, e.vp);
                }
                Ok(())
            }
            Kind::SIGNAL_EVENT => {
                expect_fds(0, &fds)?;
                let s: wire::SignalEvent = wire::body(kind, body).map_err(|e| e.to_string())?;
                if let Some((_, w)) = self
                    .channels
                    .values()
                    .find(|(conn, _)| *conn == s.connection_id)
                {
                    let _ = w.wake_event().signal();
                }
                Ok(())
            }
            other => Err(format!("unknown message kind {other:?}")),
        }
    }

    /// Applies the offer changes the daemon sent.
    fn control_changes(&mut self) -> Result<(), String> {
        let mut out = Vec::new();
        while let Ok(c) = self.control.try_recv() {
            match c {
                Control::Add(spec) => {
                    if let Err(e) = self.server.add_offer(spec, &mut out) {
                        tracing::warn!(error = %e, "hot add failed");
                    }
                }
                Control::Remove(instance) => {
                    // Subchannels first, then the primary.
                    let mut relids: Vec<(u16, u32)> = self
                        .server
                        .offers()
                        .filter(|(_, o)| o.interface_instance == instance)
                        .map(|(r, o)| (o.subchannel_index, r))
                        .collect();
                    relids.sort_unstable_by(|a, b| b.cmp(a));
                    for (_, relid) in relids {
                        if let Err(e) = self.server.rescind(relid, &mut out) {
                            tracing::warn!(relid, error = %e, "hot remove failed");
                        }
                    }
                }
                Control::OfferSubchannels {
                    interface_type,
                    interface_instance,
                    count,
                } => {
                    let primary = self
                        .server
                        .offers()
                        .find(|(_, o)| {
                            o.interface_instance == interface_instance && o.subchannel_index == 0
                        })
                        .map(|(_, o)| o.clone());
                    let Some(primary) = primary else { continue };
                    for index in 1..=count {
                        let exists = self.server.offers().any(|(_, o)| {
                            o.interface_instance == interface_instance
                                && o.subchannel_index == index
                        });
                        if exists {
                            continue;
                        }
                        let spec = OfferSpec {
                            interface_type,
                            subchannel_index: index,
                            ..primary.clone()
                        };
                        if let Err(e) = self.server.add_offer(spec, &mut out) {
                            tracing::warn!(error = %e, "subchannel offer failed");
                            break;
                        }
                    }
                }
            }
        }
        if self.partition.is_some() {
            self.apply(out)
        } else {
            Ok(())
        }
    }

    /// Carries out the server's outputs, in order.
    fn apply(&mut self, outputs: Vec<Output>) -> Result<(), String> {
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
                    let request_subchannels: SubchannelRequest = Arc::new(move |count| {
                        own.send(Control::OfferSubchannels {
                            interface_type,
                            interface_instance,
                            count,
                        })
                    });
                    let ctx = DeviceContext {
                        request_subchannels,
                        interface_type,
                        interface_instance,
                        subchannel_index,
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
                            tracing::warn!(relid, error = %e, "channel failed to start");
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
                    // Subchannels live as long as their primary channel is open: when it
                    // closes, they are rescinded (a new open creates them anew).
                    let primary = self
                        .server
                        .offers()
                        .find(|(r, _)| *r == relid)
                        .map(|(_, o)| o.clone());
                    if let Some(p) = primary.filter(|p| p.subchannel_index == 0) {
                        let subs: Vec<u32> = self
                            .server
                            .offers()
                            .filter(|(_, o)| {
                                o.interface_instance == p.interface_instance
                                    && o.subchannel_index != 0
                            })
                            .map(|(r, _)| r)
                            .collect();
                        let mut more = Vec::new();
                        for sub in subs {
                            // An offer already rescinded (waiting for RelIdReleased) is fine.
                            let _ = self.server.rescind(sub, &mut more);
                        }
                        queue.extend(more);
                    }
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
