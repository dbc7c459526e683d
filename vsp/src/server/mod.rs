//! The VMBus server: the host side of the VMBus control plane, as a state machine.
//!
//! The server is transport-independent and does no I/O (sans-I/O). The daemon feeds it the
//! channel messages the guest posts ([`Server::handle_message`]) and its own decisions (offers,
//! hot removal, device start results); the server answers with [`Output`]s: messages to deliver
//! to the guest's VMBus message SINT, and instructions to start, stop or retarget a channel.
//! Outputs are in order: an instruction comes before the messages that depend on it (a channel
//! is stopped before its rescind is announced, and before the teardown of its ring is
//! confirmed), so the daemon must act on each before delivering the messages after it.
//!
//! The protocol, in brief (see `shared/reference/vmbus-protocol.md`):
//!
//! - InitiateContact -> VersionResponse. Every InitiateContact is answered (the guest waits for
//!   the answer without timeout). A new InitiateContact first drops the current connection, as
//!   Unload would, then negotiates afresh.
//! - RequestOffers -> one OfferChannel per offer, then AllOffersDelivered; offers added later
//!   are sent at once.
//! - GpadlHeader (+ GpadlBody messages) -> GpadlCreated; GpadlTeardown -> GpadlTorndown.
//! - OpenChannel -> [`Output::Open`]; the daemon's [`Server::open_complete`] -> OpenResult.
//! - CloseChannel -> [`Output::Close`] (the protocol has no answer).
//! - ModifyChannel -> [`Output::Retarget`], and ModifyChannelResponse from version 5.3.
//! - Unload -> [`Output::Close`] for every open channel, then UnloadResponse.
//! - [`Server::rescind`] -> [`Output::Close`], RescindChannelOffer; the guest answers with
//!   RelIdReleased, which frees the relid.
//!
//! Everything in a message is hostile input: malformed, unexpected or out-of-state messages are
//! dropped (logged at debug level, so a guest cannot flood the log) or answered with a failure
//! status; nothing panics, no arithmetic on guest values can overflow, and nothing the guest
//! sends makes the server allocate beyond the limits of [`ServerConfig`].

mod gpadl;
pub use gpadl::{GpadlIndex, SharedGpadl};
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ringbuf::guestmem::GuestMemory;
use ringbuf::Mapping;
use vmbus_proto::channel::{
    GpadlCreated, GpadlTorndown, Guid, InitiateContact, Message, MessageHeader, MessageType,
    ModifyChannelResponse, OfferChannel, OpenChannel, OpenResult, RescindChannelOffer,
    VersionResponse, VmbusVersion, MAX_MESSAGE_SIZE, MAX_USER_DEFINED_BYTES, MESSAGE_CONNECTION_ID,
};
use zerocopy::{FromZeros, Immutable, IntoBytes};

use crate::Error;

use gpadl::{BodyResult, Gpadls};

/// The versions the server accepts, newest first: the stack's ([`vmbus_proto::channel::STACK_VERSIONS`]).
pub const SUPPORTED_VERSIONS: [VmbusVersion; 9] = vmbus_proto::channel::STACK_VERSIONS;

/// Relids are below this: a relid is the channel's bit in the guest's 2048-bit SynIC event
/// flags of the VMBus SINT (Linux: `HV_EVENT_FLAGS_COUNT`, which bounds `MAX_CHANNEL_RELIDS`).
pub const RELID_LIMIT: u32 = 2048;

/// A channel's connection id (the id the guest signals it with through HvSignalEvent) is this
/// plus its relid: unique per channel, and clear of the message, event and monitor connection
/// ids 1 to 4.
pub const CHANNEL_CONNECTION_ID_BASE: u32 = 0x100;

/// NTSTATUS values the server answers with in GpadlCreated, OpenResult and
/// ModifyChannelResponse. Linux only tests them against zero (and prints them).
pub mod status {
    /// Success.
    pub const SUCCESS: u32 = 0;
    /// A generic failure (`STATUS_UNSUCCESSFUL`): the request does not fit the channel's state.
    pub const UNSUCCESSFUL: u32 = 0xC000_0001;
    /// A malformed request (`STATUS_INVALID_PARAMETER`): an unknown relid or GPADL, a bad range
    /// or ring layout, a page outside guest memory.
    pub const INVALID_PARAMETER: u32 = 0xC000_000D;
    /// A limit of [`ServerConfig`](super::ServerConfig) was reached
    /// (`STATUS_INSUFFICIENT_RESOURCES`).
    pub const INSUFFICIENT_RESOURCES: u32 = 0xC000_009A;
}

/// Limits on what the guest may make the server hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest GPADL, in bytes of guest memory described (default 1 GiB). A GpadlHeader
    /// announcing more fails before anything is allocated.
    pub max_gpadl_bytes: u64,
    /// Most GPADLs, complete or in progress, at a time (default 4096).
    pub max_gpadls: usize,
    /// Most GPADLs in progress (header received, bodies due) at a time (default 64). Linux
    /// builds one GPADL at a time per channel.
    pub max_pending_gpadls: usize,
    /// Most guest memory all GPADLs together may describe, in bytes (default 16 GiB). This
    /// bounds the page lists the server keeps: 8 bytes per 4 KiB page described.
    pub max_total_gpadl_bytes: u64,
    /// Most channels open (or opening) at a time (default 256): each is a worker thread and a
    /// ring mapping in the daemon. An OpenChannel beyond it fails with
    /// `STATUS_INSUFFICIENT_RESOURCES`.
    pub max_open_channels: usize,
    /// Most subchannels one primary channel may have (default 64); a device's request for more
    /// is cut to this. See [`Server::request_subchannels`].
    pub max_subchannels: u16,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_gpadl_bytes: 1 << 30,
            max_gpadls: 4096,
            max_pending_gpadls: 64,
            max_total_gpadl_bytes: 16 << 30,
            max_open_channels: 256,
            max_subchannels: 64,
        }
    }
}

/// A device the host offers to the guest: the fields of the OfferChannel message the host
/// chooses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfferSpec {
    /// The device class, e.g. [`Guid::SCSI`] or [`Guid::NETWORK`].
    pub interface_type: Guid,
    /// The device instance; subchannels share their primary channel's.
    pub interface_instance: Guid,
    /// 0 for a primary channel, the subchannel's index otherwise.
    pub subchannel_index: u16,
    /// MMIO space the device wants, in MiB (0 for storage and network).
    pub mmio_megabytes: u16,
    /// Offer flags (`vmbus_proto::channel::offer_flags`).
    pub flags: u16,
    /// Device-specific data.
    pub user_defined: [u8; MAX_USER_DEFINED_BYTES],
}

/// What the server asks of the daemon.
#[derive(Clone, Debug)]
pub enum Output {
    /// Deliver this channel message (at most 240 bytes, header included) to the guest's VMBus
    /// message SINT (2) on VP `vp`. `vp` is the guest's choice: the daemon checks it.
    Message {
        /// The VP.
        vp: u32,
        /// The whole message, header included.
        bytes: Vec<u8>,
    },
    /// The guest opened a channel: start serving it, then call [`Server::open_complete`] with
    /// the outcome, which answers the guest (so a device that fails to start fails the open).
    Open {
        /// The channel.
        relid: u32,
        /// The connection id the guest signals the channel with (HvSignalEvent).
        connection_id: u32,
        /// The VP to interrupt for this channel (the guest's choice: the daemon checks it).
        target_vp: u32,
        /// The offer's device class.
        interface_type: Guid,
        /// The offer's device instance.
        interface_instance: Guid,
        /// The offer's subchannel index.
        subchannel_index: u16,
        /// The ring GPADL's pages mapped contiguously, `ring_pages` pages. The first
        /// `downstream_offset` pages are the guest-to-host ring (the host reads it: an
        /// `IncomingRing`), the rest the host-to-guest ring (an `OutgoingRing`); each starts with
        /// its 4 KiB control page.
        ring: Arc<Mapping>,
        /// Pages of the guest-to-host ring; at least 2, and at least 2 pages follow.
        downstream_offset: u32,
        /// Pages in `ring`.
        ring_pages: u32,
        /// The OpenChannel's user data, for the device.
        user_data: [u8; MAX_USER_DEFINED_BYTES],
    },
    /// Stop serving a channel (closed by the guest, rescinded, unload, reset). After this the
    /// channel's ring and its other GPADLs must no longer be used.
    Close {
        /// The channel.
        relid: u32,
    },
    /// The channel's interrupts now go to `target_vp` (ModifyChannel).
    Retarget {
        /// The channel.
        relid: u32,
        /// The new VP (the guest's choice: the daemon checks it).
        target_vp: u32,
    },
}

/// A channel's state, as [`Server::channel_state`] reports it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ChannelState {
    /// Offered (or not yet) and not open.
    Closed,
    /// The guest asked to open it; [`Output::Open`] was emitted and the daemon's
    /// [`Server::open_complete`] is due.
    Opening,
    /// Open.
    Open,
    /// Rescinded; the guest has not yet released the relid.
    Rescinded,
}

/// A view of a complete GPADL, for devices that use GPADLs besides their ring (netvsp's
/// receive and send buffers).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GpadlView<'a> {
    /// The channel the guest created it on.
    pub relid: u32,
    /// Offset of the buffer in its first page.
    pub byte_offset: u32,
    /// Length of the buffer in bytes.
    pub byte_count: u32,
    /// The pages, in order; each was guest memory when the GPADL was created.
    pub pfns: &'a [u64],
}

/// An open (or opening) channel's parameters.
#[derive(Copy, Clone, Debug)]
struct OpenParams {
    open_id: u32,
    gpadl: u32,
    target_vp: u32,
}

#[derive(Copy, Clone, Debug)]
enum State {
    Closed,
    Opening(OpenParams),
    Open(OpenParams),
    Rescinded,
}

#[derive(Debug)]
struct Offer {
    spec: OfferSpec,
    connection_id: u32,
    /// The guest has been sent this offer (and has not released it). Only then may it name the
    /// relid.
    offered: bool,
    state: State,
}

#[derive(Copy, Clone, Debug)]
struct Connection {
    version: VmbusVersion,
    /// The VP channel messages go to.
    message_vp: u32,
    /// RequestOffers has been received: new offers are sent at once.
    offers_requested: bool,
}

/// The VMBus server. See the [module documentation](self).
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    connection: Option<Connection>,
    offers: BTreeMap<u32, Offer>,
    /// The next never-used relid.
    next_relid: u32,
    /// Relids released (by the guest, or rescinded before the guest saw them), reused only once
    /// every relid has been used.
    released_relids: BTreeSet<u32>,
    gpadls: Gpadls,
    /// The partition's VPs: a VP the guest names (for messages or a channel's interrupts) must
    /// be below this.
    vp_count: u32,
}

/// A message for `vp` from a wire struct.
fn message<T: IntoBytes + Immutable>(vp: u32, msg: &T) -> Output {
    let bytes = msg.as_bytes().to_vec();
    debug_assert!(bytes.len() <= MAX_MESSAGE_SIZE);
    Output::Message { vp, bytes }
}

impl Server {
    /// A server with no offers and no connection.
    pub fn new(config: ServerConfig) -> Self {
        Self {
            config,
            connection: None,
            offers: BTreeMap::new(),
            next_relid: 1,
            released_relids: BTreeSet::new(),
            gpadls: Gpadls::default(),
            vp_count: u32::MAX,
        }
    }

    /// The partition's VP count, once the front end has told it: InitiateContact, OpenChannel
    /// and ModifyChannel naming a VP at or above it fail (until then any VP is taken).
    pub fn set_vp_count(&mut self, vp_count: u32) {
        self.vp_count = vp_count;
    }

    /// The subchannel policy: a device on the open primary channel of `instance` asks for
    /// subchannels 1 to `count` (storvsc's CREATE_SUB_CHANNELS, netvsc's subchannel request).
    /// The ones not yet offered are offered (emitted at once if the guest asked for offers);
    /// `count` is cut to [`ServerConfig::max_subchannels`]. Repeated or smaller requests add
    /// nothing, so a guest that floods requests costs nothing but the check. Subchannels live
    /// as long as their primary is open: when it closes they are rescinded. Returns the number
    /// of subchannels the channel now has, or `None` if the primary is not open.
    pub fn request_subchannels(
        &mut self,
        instance: Guid,
        count: u16,
        out: &mut Vec<Output>,
    ) -> Option<u16> {
        let primary = self.offers.values().find(|o| {
            o.spec.interface_instance == instance
                && o.spec.subchannel_index == 0
                && matches!(o.state, State::Open(_))
        })?;
        let spec = primary.spec.clone();
        let count = count.min(self.config.max_subchannels);
        let existing: BTreeSet<u16> = self
            .offers
            .values()
            .filter(|o| {
                o.spec.interface_instance == instance
                    && o.spec.subchannel_index != 0
                    && !matches!(o.state, State::Rescinded)
            })
            .map(|o| o.spec.subchannel_index)
            .collect();
        for index in 1..=count {
            if existing.contains(&index) {
                continue;
            }
            let sub = OfferSpec {
                subchannel_index: index,
                ..spec.clone()
            };
            if let Err(err) = self.add_offer(sub, out) {
                tracing::debug!(%err, "subchannel offer failed");
                break;
            }
        }
        Some(
            self.offers
                .values()
                .filter(|o| {
                    o.spec.interface_instance == instance
                        && o.spec.subchannel_index != 0
                        && !matches!(o.state, State::Rescinded)
                })
                .count() as u16,
        )
    }

    /// Hot removal of a device: rescinds its subchannels, then its primary channel.
    pub fn rescind_instance(&mut self, instance: Guid, out: &mut Vec<Output>) {
        let mut relids: Vec<(u16, u32)> = self
            .offers
            .iter()
            .filter(|(_, o)| {
                o.spec.interface_instance == instance && !matches!(o.state, State::Rescinded)
            })
            .map(|(&r, o)| (o.spec.subchannel_index, r))
            .collect();
        relids.sort_unstable_by(|a, b| b.cmp(a));
        for (_, relid) in relids {
            // Rescinding a primary rescinds the subchannels left (none here: they went first).
            let _ = self.rescind(relid, out);
        }
    }

    /// Rescinds the subchannels of `instance` (when its primary stops).
    fn rescind_subchannels(&mut self, instance: Guid, out: &mut Vec<Output>) {
        let subs: Vec<u32> = self
            .offers
            .iter()
            .filter(|(_, o)| {
                o.spec.interface_instance == instance
                    && o.spec.subchannel_index != 0
                    && !matches!(o.state, State::Rescinded)
            })
            .map(|(&r, _)| r)
            .collect();
        for sub in subs {
            let _ = self.rescind(sub, out);
        }
    }

    /// Adds an offer, at start-up or as a hot add, and returns its relid. If the guest is
    /// connected and has asked for offers, the OfferChannel message is emitted at once.
    ///
    /// Relids are assigned in order from 1 and stay the channel's until the offer is rescinded
    /// and released. They are not reused while unused ones remain; once all 2047 have been
    /// used, released ones are reused, lowest first (relids must stay below [`RELID_LIMIT`]).
    /// The connection id is [`CHANNEL_CONNECTION_ID_BASE`] + relid.
    pub fn add_offer(&mut self, spec: OfferSpec, out: &mut Vec<Output>) -> Result<u32, Error> {
        let relid = if self.next_relid < RELID_LIMIT {
            self.next_relid += 1;
            self.next_relid - 1
        } else {
            self.released_relids
                .pop_first()
                .ok_or(Error::TooManyOffers)?
        };
        let mut offer = Offer {
            spec,
            connection_id: CHANNEL_CONNECTION_ID_BASE + relid,
            offered: false,
            state: State::Closed,
        };
        if let Some(conn) = self.connection.filter(|c| c.offers_requested) {
            out.push(offer_message(conn.message_vp, relid, &offer));
            offer.offered = true;
        }
        self.offers.insert(relid, offer);
        Ok(relid)
    }

    /// Hot removal. If the guest knows the offer, an open channel is stopped
    /// ([`Output::Close`]) and RescindChannelOffer emitted; the relid is freed when the guest
    /// answers RelIdReleased. An offer the guest was never sent is forgotten at once.
    pub fn rescind(&mut self, relid: u32, out: &mut Vec<Output>) -> Result<(), Error> {
        let offer = self.offers.get(&relid).ok_or(Error::UnknownRelid(relid))?;
        if matches!(offer.state, State::Rescinded) {
            return Err(Error::AlreadyRescinded(relid));
        }
        let Some(conn) = self.connection.filter(|_| offer.offered) else {
            self.forget_offer(relid);
            return Ok(());
        };
        self.stop_channel(relid, out);
        if let Some(offer) = self.offers.get_mut(&relid) {
            offer.state = State::Rescinded;
        }
        out.push(message(
            conn.message_vp,
            &RescindChannelOffer {
                header: MessageHeader::new(MessageType::RESCIND_CHANNEL_OFFER),
                child_relid: relid,
            },
        ));
        Ok(())
    }

    /// Handles a channel message the guest posted (HvPostMessage) to `connection_id`.
    /// `payload` is the message as posted, header included. Anything malformed or out of
    /// place is dropped or answered with a failure; this never panics.
    pub fn handle_message(
        &mut self,
        mem: &GuestMemory,
        connection_id: u32,
        payload: &[u8],
        out: &mut Vec<Output>,
    ) {
        let msg = match Message::parse(payload) {
            Ok(msg) => msg,
            Err(err) => {
                tracing::debug!(connection_id, %err, "dropping malformed channel message");
                return;
            }
        };
        if let Message::InitiateContact(ic) = msg {
            self.initiate_contact(connection_id, &ic, out);
            return;
        }
        let Some(conn) = self.connection else {
            tracing::debug!(?msg, "dropping channel message before InitiateContact");
            return;
        };
        // Below 5.0 every message goes to connection id 1; from 5.0 to the VersionResponse's
        // msg_conn_id, which is 1 here too.
        if connection_id != MESSAGE_CONNECTION_ID {
            tracing::debug!(
                connection_id,
                ?msg,
                "dropping message on a wrong connection id"
            );
            return;
        }
        match msg {
            Message::RequestOffers => self.request_offers(out),
            Message::GpadlHeader(h, rest) => {
                let (relid, gpadl) = (h.child_relid, h.gpadl);
                let status = if !self.is_known(relid) {
                    Some(status::INVALID_PARAMETER)
                } else {
                    match self.gpadls.header(
                        &self.config,
                        mem,
                        relid,
                        gpadl,
                        h.range_buflen,
                        h.range_count,
                        rest,
                    ) {
                        Ok(true) => Some(status::SUCCESS),
                        Ok(false) => None,
                        Err(status) => Some(status),
                    }
                };
                if let Some(status) = status {
                    out.push(gpadl_created(conn.message_vp, relid, gpadl, status));
                }
            }
            Message::GpadlBody(b, rest) => match self.gpadls.body(mem, b.gpadl, rest) {
                BodyResult::Unknown => {
                    tracing::debug!(
                        gpadl = b.gpadl,
                        "dropping GpadlBody of no GPADL in progress"
                    );
                }
                BodyResult::Incomplete => {}
                BodyResult::Done { relid, status } => {
                    out.push(gpadl_created(conn.message_vp, relid, b.gpadl, status));
                }
            },
            Message::GpadlTeardown(t) => self.gpadl_teardown(conn, t.child_relid, t.gpadl, out),
            Message::OpenChannel(o) => self.open_channel(mem, conn, &o, out),
            Message::CloseChannel(c) => {
                let relid = c.child_relid;
                if self.is_known(relid) {
                    self.stop_channel(relid, out);
                } else {
                    tracing::debug!(relid, "dropping CloseChannel of an unknown channel");
                }
            }
            Message::RelIdReleased(r) => self.relid_released(r.child_relid),
            Message::Unload => {
                tracing::debug!("guest unloaded VMBus");
                self.disconnect(out);
                out.push(message(
                    conn.message_vp,
                    &MessageHeader::new(MessageType::UNLOAD_RESPONSE),
                ));
            }
            Message::ModifyChannel(m) => self.modify_channel(conn, m.child_relid, m.target_vp, out),
            other => tracing::debug!(?other, "dropping unexpected channel message"),
        }
    }

    /// The daemon's answer to [`Output::Open`]: whether the device started. Answers the guest
    /// with OpenResult (status 0, or a failure that leaves the channel closed). Ignored if the
    /// channel is no longer opening (closed, rescinded or disconnected meanwhile: an
    /// [`Output::Close`] has then already been emitted for it).
    pub fn open_complete(&mut self, relid: u32, ok: bool, out: &mut Vec<Output>) {
        let Some(conn) = self.connection else {
            return;
        };
        let Some(offer) = self.offers.get_mut(&relid) else {
            return;
        };
        let State::Opening(params) = offer.state else {
            tracing::debug!(relid, "open completion for a channel that is not opening");
            return;
        };
        let status = if ok {
            offer.state = State::Open(params);
            status::SUCCESS
        } else {
            offer.state = State::Closed;
            status::UNSUCCESSFUL
        };
        out.push(message(
            conn.message_vp,
            &OpenResult {
                header: MessageHeader::new(MessageType::OPEN_CHANNEL_RESULT),
                child_relid: relid,
                open_id: params.open_id,
                status,
            },
        ));
        if !ok {
            self.finish_deferred_teardown(conn, params.gpadl, out);
        }
    }

    /// The front end went away: stop every channel and drop every GPADL and the connection, as
    /// Unload does, but send no message. Offers stay; rescinded ones are forgotten.
    pub fn reset(&mut self, out: &mut Vec<Output>) {
        self.disconnect(out);
    }

    /// The negotiated version, if connected.
    pub fn version(&self) -> Option<VmbusVersion> {
        self.connection.map(|c| c.version)
    }

    /// Whether a guest is connected (a version was accepted and no Unload followed).
    pub fn is_connected(&self) -> bool {
        self.connection.is_some()
    }

    /// The VP channel messages go to, if connected: InitiateContact's `target_vcpu` from
    /// version 3.0 (Win8.1); VP 0 at 2.4 (Win8), as Hyper-V has it.
    pub fn target_vp(&self) -> Option<u32> {
        self.connection.map(|c| c.message_vp)
    }

    /// Every offer, by relid (rescinded ones until the guest releases them).
    pub fn offers(&self) -> impl Iterator<Item = (u32, &OfferSpec)> + '_ {
        self.offers.iter().map(|(&relid, o)| (relid, &o.spec))
    }

    /// The connection id of channel `relid`.
    pub fn connection_id(&self, relid: u32) -> Option<u32> {
        self.offers.get(&relid).map(|o| o.connection_id)
    }

    /// The state of channel `relid`.
    pub fn channel_state(&self, relid: u32) -> Option<ChannelState> {
        self.offers.get(&relid).map(|o| match o.state {
            State::Closed => ChannelState::Closed,
            State::Opening(_) => ChannelState::Opening,
            State::Open(_) => ChannelState::Open,
            State::Rescinded => ChannelState::Rescinded,
        })
    }

    /// The relids of the channels being served: opening or open.
    pub fn open_channels(&self) -> impl Iterator<Item = u32> + '_ {
        self.offers
            .iter()
            .filter(|(_, o)| matches!(o.state, State::Opening(_) | State::Open(_)))
            .map(|(&relid, _)| relid)
    }

    /// The complete GPADL `gpadl`.
    ///
    /// Only an open channel's ring is protected from teardown (its GpadlTorndown waits for the
    /// close). Any other GPADL is torn down at the guest's request at once, with no output:
    /// Linux below Win10 tears netvsc's receive buffer down before closing the channel and
    /// waits for the answer. A device that mapped such a GPADL keeps a memory-safe mapping of
    /// guest memory, but the guest may reuse the pages.
    pub fn gpadl(&self, gpadl: u32) -> Option<GpadlView<'_>> {
        self.gpadls.get(gpadl).map(|g| GpadlView {
            relid: g.relid,
            byte_offset: g.byte_offset,
            byte_count: g.byte_count,
            pfns: &g.pfns,
        })
    }

    /// The complete GPADLs, readable from channel threads (kept current by this server).
    pub fn gpadl_index(&self) -> GpadlIndex {
        self.gpadls.index().clone()
    }

    /// Number of complete GPADLs.
    pub fn gpadl_count(&self) -> usize {
        self.gpadls.complete_len()
    }

    /// Number of GPADLs in progress (header received, body messages due).
    pub fn pending_gpadl_count(&self) -> usize {
        self.gpadls.partial_len()
    }

    /// Bytes of guest memory all GPADLs describe, complete or in progress.
    pub fn gpadl_bytes(&self) -> u64 {
        self.gpadls.total_bytes()
    }

    /// Whether the guest may name `relid`: offered to it and not rescinded.
    fn is_known(&self, relid: u32) -> bool {
        self.offers
            .get(&relid)
            .is_some_and(|o| o.offered && !matches!(o.state, State::Rescinded))
    }

    fn initiate_contact(
        &mut self,
        connection_id: u32,
        ic: &InitiateContact,
        out: &mut Vec<Output>,
    ) {
        let version = VmbusVersion(ic.vmbus_version_requested);
        // A new InitiateContact ends the current connection, as OpenVMM's vmbus_server does:
        // a kexec'd or crash kernel whose predecessor could not unload (Linux sends no Unload
        // below Win8.1) must still be able to connect.
        if self.connection.is_some() {
            tracing::debug!("InitiateContact while connected: dropping the old connection");
            self.disconnect(out);
        }
        // Before Win8.1 messages went to VP 0 whatever the guest asked (OpenVMM does the same).
        let vp = if version >= VmbusVersion::WIN8_1 {
            ic.target_vcpu
        } else {
            0
        };
        let mut response = VersionResponse {
            header: MessageHeader::new(MessageType::VERSION_RESPONSE),
            ..Default::default()
        };
        // A VP the partition does not have: refuse, answering on VP 0 (which every partition
        // has) rather than on the VP the guest named.
        if vp >= self.vp_count {
            tracing::debug!(vp, "InitiateContact names a VP the partition does not have");
            out.push(message(0, &response));
            return;
        }
        let accepted = SUPPORTED_VERSIONS.contains(&version)
            && connection_id == version.initiate_contact_connection_id();
        if !accepted {
            tracing::debug!(
                connection_id,
                version = format_args!("{:#x}", version.0),
                "refusing VMBus version"
            );
            out.push(message(vp, &response));
            return;
        }
        tracing::debug!(
            version = format_args!("{}.{}", version.major(), version.minor()),
            vp,
            "guest connected"
        );
        response.version_supported = 1;
        response.connection_state = 0;
        // From 5.0 the field is the connection id of the guest's later messages; below, Hyper-V
        // echoes the version there (OpenVMM: `selected_version_or_connection_id`) and Linux
        // ignores it.
        response.msg_conn_id = if version >= VmbusVersion::WIN10_V5 {
            MESSAGE_CONNECTION_ID
        } else {
            version.0
        };
        let mut bytes = response.as_bytes().to_vec();
        if version >= VmbusVersion::COPPER {
            // 6.0's answer carries the feature flags the host grants: none.
            bytes.extend_from_slice(&0u32.to_le_bytes());
        }
        out.push(Output::Message { vp, bytes });
        self.connection = Some(Connection {
            version,
            message_vp: vp,
            offers_requested: false,
        });
    }

    fn request_offers(&mut self, out: &mut Vec<Output>) {
        let Some(conn) = self.connection.as_mut() else {
            return;
        };
        if conn.offers_requested {
            tracing::debug!("dropping a repeated RequestOffers");
            return;
        }
        conn.offers_requested = true;
        let vp = conn.message_vp;
        for (&relid, offer) in &mut self.offers {
            if matches!(offer.state, State::Rescinded) {
                continue;
            }
            out.push(offer_message(vp, relid, offer));
            offer.offered = true;
        }
        out.push(message(
            vp,
            &MessageHeader::new(MessageType::ALL_OFFERS_DELIVERED),
        ));
    }

    fn open_channel(
        &mut self,
        mem: &GuestMemory,
        conn: Connection,
        o: &OpenChannel,
        out: &mut Vec<Output>,
    ) {
        let relid = o.child_relid;
        let fail = |status| {
            message(
                conn.message_vp,
                &OpenResult {
                    header: MessageHeader::new(MessageType::OPEN_CHANNEL_RESULT),
                    child_relid: relid,
                    open_id: o.open_id,
                    status,
                },
            )
        };
        if !self.is_known(relid) {
            tracing::debug!(relid, "OpenChannel of an unknown channel");
            out.push(fail(status::INVALID_PARAMETER));
            return;
        }
        if !self
            .offers
            .get(&relid)
            .is_some_and(|o| matches!(o.state, State::Closed))
        {
            tracing::debug!(relid, "OpenChannel of a channel that is not closed");
            out.push(fail(status::UNSUCCESSFUL));
            return;
        }
        if o.target_vp >= self.vp_count {
            tracing::debug!(
                relid,
                vp = o.target_vp,
                "OpenChannel names a VP that does not exist"
            );
            out.push(fail(status::INVALID_PARAMETER));
            return;
        }
        if self.open_channels().count() >= self.config.max_open_channels {
            tracing::debug!(relid, "OpenChannel beyond the open channel limit");
            out.push(fail(status::INSUFFICIENT_RESOURCES));
            return;
        }
        // The ring GPADL: complete, created on this channel (Linux creates it on the channel it
        // opens), not being torn down, starting at the start of its first page.
        let Some(gpadl) = self
            .gpadls
            .get(o.ring_buffer_gpadl)
            .filter(|g| g.relid == relid && !g.teardown_pending && g.byte_offset == 0)
        else {
            tracing::debug!(
                relid,
                gpadl = o.ring_buffer_gpadl,
                "OpenChannel with a bad ring GPADL"
            );
            out.push(fail(status::INVALID_PARAMETER));
            return;
        };
        // Each ring needs its control page and at least one data page; the whole must fit the
        // ring's u32 sizes.
        let offset = o.downstream_ring_buffer_page_offset;
        let pages = u32::try_from(gpadl.pfns.len()).ok();
        let layout_ok = pages.is_some_and(|pages| {
            offset >= 2
                && pages.checked_sub(offset).is_some_and(|up| up >= 2)
                && u64::from(pages) * 4096 <= u64::from(u32::MAX)
        });
        let (true, Some(pages)) = (layout_ok, pages) else {
            tracing::debug!(relid, offset, "OpenChannel with a bad ring layout");
            out.push(fail(status::INVALID_PARAMETER));
            return;
        };
        let ring = match mem.map_pages(&gpadl.pfns) {
            Ok(map) => Arc::new(map),
            Err(err) => {
                // The guest's choice of pages can cause this: not worth a warning.
                tracing::debug!(relid, %err, "mapping a ring failed");
                out.push(fail(status::INSUFFICIENT_RESOURCES));
                return;
            }
        };
        let params = OpenParams {
            open_id: o.open_id,
            gpadl: o.ring_buffer_gpadl,
            target_vp: o.target_vp,
        };
        let Some(offer) = self.offers.get_mut(&relid) else {
            return;
        };
        offer.state = State::Opening(params);
        out.push(Output::Open {
            relid,
            connection_id: offer.connection_id,
            target_vp: o.target_vp,
            interface_type: offer.spec.interface_type,
            interface_instance: offer.spec.interface_instance,
            subchannel_index: offer.spec.subchannel_index,
            ring,
            downstream_offset: offset,
            ring_pages: pages,
            user_data: o.user_data,
        });
    }

    fn gpadl_teardown(&mut self, conn: Connection, relid: u32, gpadl: u32, out: &mut Vec<Output>) {
        let torndown = message(
            conn.message_vp,
            &GpadlTorndown {
                header: MessageHeader::new(MessageType::GPADL_TORNDOWN),
                gpadl,
            },
        );
        if self.gpadls.remove_partial(relid, gpadl) {
            out.push(torndown);
            return;
        }
        if self.gpadls.get(gpadl).is_none_or(|g| g.relid != relid) {
            tracing::debug!(relid, gpadl, "dropping GpadlTeardown of an unknown GPADL");
            return;
        }
        // The ring of a channel being served is torn down when the channel closes: Linux closes
        // first, and answering now would let the guest reuse pages the device still uses.
        let in_use = self.offers.get(&relid).is_some_and(
            |o| matches!(o.state, State::Opening(p) | State::Open(p) if p.gpadl == gpadl),
        );
        if in_use {
            tracing::debug!(relid, gpadl, "deferring teardown of an open channel's ring");
            if let Some(g) = self.gpadls.get_mut(gpadl) {
                g.teardown_pending = true;
            }
            return;
        }
        // Other GPADLs (netvsp's buffers) go at once: Linux below Win10 tears its receive
        // buffer down before closing the channel and waits for the answer.
        self.gpadls.remove(gpadl);
        out.push(torndown);
    }

    /// After a channel stopped using `gpadl` as its ring: completes a teardown the guest asked
    /// for meanwhile.
    fn finish_deferred_teardown(&mut self, conn: Connection, gpadl: u32, out: &mut Vec<Output>) {
        if self.gpadls.get(gpadl).is_some_and(|g| g.teardown_pending) {
            self.gpadls.remove(gpadl);
            out.push(message(
                conn.message_vp,
                &GpadlTorndown {
                    header: MessageHeader::new(MessageType::GPADL_TORNDOWN),
                    gpadl,
                },
            ));
        }
    }

    /// Stops channel `relid` if it is opening or open: [`Output::Close`], then any deferred
    /// teardown of its ring.
    fn stop_channel(&mut self, relid: u32, out: &mut Vec<Output>) {
        let Some(offer) = self.offers.get_mut(&relid) else {
            return;
        };
        let (State::Opening(params) | State::Open(params)) = offer.state else {
            return;
        };
        offer.state = State::Closed;
        let primary = (offer.spec.subchannel_index == 0).then_some(offer.spec.interface_instance);
        out.push(Output::Close { relid });
        if let Some(conn) = self.connection {
            self.finish_deferred_teardown(conn, params.gpadl, out);
        }
        // Subchannels live as long as their primary channel is open (a new open creates them
        // anew).
        if let Some(instance) = primary {
            self.rescind_subchannels(instance, out);
        }
    }

    fn relid_released(&mut self, relid: u32) {
        let Some(offer) = self.offers.get_mut(&relid) else {
            tracing::debug!(relid, "dropping RelIdReleased of an unknown relid");
            return;
        };
        match offer.state {
            State::Rescinded => self.forget_offer(relid),
            // Linux releases a relid it could not set up a channel for: the guest no longer
            // knows the offer.
            State::Closed if offer.offered => {
                offer.offered = false;
                self.gpadls.remove_channel(relid);
            }
            _ => tracing::debug!(relid, "dropping RelIdReleased of a channel in use"),
        }
    }

    fn modify_channel(
        &mut self,
        conn: Connection,
        relid: u32,
        target_vp: u32,
        out: &mut Vec<Output>,
    ) {
        // ModifyChannel exists from 4.1 (Linux: VERSION_WIN10_V4_1); its answer from 5.3
        // (Linux: send_modifychannel_with_ack waits for it only then).
        if conn.version < VmbusVersion::WIN10_RS3 {
            tracing::debug!(relid, "dropping ModifyChannel below version 4.1");
            return;
        }
        let mut status = status::SUCCESS;
        let vp_ok = target_vp < self.vp_count;
        match self.offers.get_mut(&relid) {
            Some(Offer {
                offered: true,
                state: State::Open(params),
                ..
            }) if vp_ok => {
                params.target_vp = target_vp;
                out.push(Output::Retarget { relid, target_vp });
            }
            _ => {
                tracing::debug!(
                    relid,
                    target_vp,
                    "ModifyChannel of a closed channel or to no VP"
                );
                status = status::INVALID_PARAMETER;
            }
        }
        if conn.version >= VmbusVersion::IRON {
            out.push(message(
                conn.message_vp,
                &ModifyChannelResponse {
                    header: MessageHeader::new(MessageType::MODIFY_CHANNEL_RESPONSE),
                    child_relid: relid,
                    status,
                },
            ));
        }
    }

    /// Ends the connection: stops every channel, drops every GPADL, forgets rescinded offers
    /// (the guest's view of them is gone) and marks the rest not offered.
    fn disconnect(&mut self, out: &mut Vec<Output>) {
        let mut rescinded = Vec::new();
        for (&relid, offer) in &mut self.offers {
            match offer.state {
                State::Opening(_) | State::Open(_) => out.push(Output::Close { relid }),
                State::Rescinded => rescinded.push(relid),
                State::Closed => {}
            }
            // Subchannels go with their primary's connection.
            if offer.spec.subchannel_index != 0 && !matches!(offer.state, State::Rescinded) {
                rescinded.push(relid);
            }
            offer.state = State::Closed;
            offer.offered = false;
        }
        for relid in rescinded {
            self.forget_offer(relid);
        }
        self.gpadls.clear();
        self.connection = None;
    }

    /// Removes an offer and its GPADLs; its relid becomes reusable.
    fn forget_offer(&mut self, relid: u32) {
        if self.offers.remove(&relid).is_some() {
            self.gpadls.remove_channel(relid);
            self.released_relids.insert(relid);
        }
    }
}

/// The OfferChannel message for `offer`: no monitor page, a dedicated interrupt (signalled by
/// HvSignalEvent on the offer's connection id), as the Linux guest expects of kernel-driver
/// channels on a host without monitor pages.
fn offer_message(vp: u32, relid: u32, offer: &Offer) -> Output {
    let mut m = OfferChannel::new_zeroed();
    m.header = MessageHeader::new(MessageType::OFFER_CHANNEL);
    m.offer.interface_type = offer.spec.interface_type;
    m.offer.interface_instance = offer.spec.interface_instance;
    m.offer.flags = offer.spec.flags;
    m.offer.mmio_megabytes = offer.spec.mmio_megabytes;
    m.offer.user_defined = offer.spec.user_defined;
    m.offer.subchannel_index = offer.spec.subchannel_index;
    m.child_relid = relid;
    m.monitor_id = 0;
    m.set_monitor_allocated(false);
    m.set_dedicated_interrupt(true);
    m.connection_id = offer.connection_id;
    message(vp, &m)
}

fn gpadl_created(vp: u32, relid: u32, gpadl: u32, creation_status: u32) -> Output {
    message(
        vp,
        &GpadlCreated {
            header: MessageHeader::new(MessageType::GPADL_CREATED),
            child_relid: relid,
            gpadl,
            creation_status,
        },
    )
}
