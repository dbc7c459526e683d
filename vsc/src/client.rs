//! The VMBus client: the guest side of the control plane, as Linux's hv_vmbus drives it.
//!
//! It negotiates the highest version both sides speak (InitiateContact to connection id 4 from
//! VMBus 5.0, 1 before; later messages to the id the host names), requests the offers, creates
//! GPADLs (split into a header and body messages), opens and closes channels, and handles
//! rescinds and unload. It talks to the host only through a [`HostInterface`] and a
//! [`MessageStream`], so it runs unchanged over the loopback front end or a real SynIC.

use std::collections::VecDeque;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbus_proto::channel::{
    CloseChannel, GpadlBody, GpadlHeader, GpadlTeardown, Guid, InitiateContact, Message,
    MessageHeader, MessageType, OfferChannel, OpenChannel, RelIdReleased, VmbusVersion,
    MAX_GPADL_BODY_PFNS, MAX_GPADL_HEADER_PFNS, MESSAGE_CONNECTION_ID,
};
use vmbus_proto::ring::GpaRangeHeader;
use zerocopy::{FromZeros, IntoBytes};

use crate::synic::{HostInterface, MessageStream};
use crate::Error;

/// The versions the client proposes, newest first: the stack's ([`vmbus_proto::channel::STACK_VERSIONS`]).
pub const SUPPORTED_VERSIONS: [VmbusVersion; 9] = vmbus_proto::channel::STACK_VERSIONS;

/// A channel the host offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The channel's relid.
    pub relid: u32,
    /// Device class.
    pub interface_type: Guid,
    /// Device instance.
    pub interface_instance: Guid,
    /// Subchannel index (0: primary).
    pub subchannel_index: u16,
    /// The connection id to signal the channel on.
    pub connection_id: u32,
    /// Whether the channel has a dedicated interrupt.
    pub dedicated_interrupt: bool,
}

impl Offer {
    fn from_wire(o: &OfferChannel) -> Self {
        let (child_relid, connection_id) = (o.child_relid, o.connection_id);
        Self {
            relid: child_relid,
            interface_type: o.offer.interface_type,
            interface_instance: o.offer.interface_instance,
            subchannel_index: o.offer.subchannel_index,
            connection_id,
            dedicated_interrupt: o.is_dedicated_interrupt(),
        }
    }

    /// A short name for the device class.
    pub fn class_name(&self) -> &'static str {
        match self.interface_type {
            Guid::SCSI => "scsi",
            Guid::NETWORK => "network",
            Guid::IDE => "ide",
            _ => "unknown",
        }
    }
}

/// Something the host did on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new channel offer (hot add).
    Offer(Offer),
    /// The host removed a channel; the client answered RelIdReleased.
    Rescinded(u32),
}

/// A connected VMBus client.
pub struct Client {
    host: Arc<dyn HostInterface>,
    messages: MessageStream,
    version: VmbusVersion,
    msg_conn_id: u32,
    next_gpadl: u32,
    timeout: Duration,
    events: VecDeque<Event>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("version", &self.version)
            .field("msg_conn_id", &self.msg_conn_id)
            .finish()
    }
}

/// How long the client waits for each answer before giving up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    /// Negotiates the newest of `versions` the host accepts (each proposed in turn, as Linux
    /// does), with messages delivered to `target_vp`.
    pub fn connect(
        host: Arc<dyn HostInterface>,
        messages: MessageStream,
        target_vp: u32,
        versions: &[VmbusVersion],
    ) -> Result<Self, Error> {
        let mut c = Self {
            host,
            messages,
            version: VmbusVersion(0),
            msg_conn_id: MESSAGE_CONNECTION_ID,
            next_gpadl: 0x1000,
            timeout: DEFAULT_TIMEOUT,
            events: VecDeque::new(),
        };
        for &v in versions {
            let mut m = InitiateContact::new_zeroed();
            m.header = MessageHeader::new(MessageType::INITIATE_CONTACT);
            m.vmbus_version_requested = v.0;
            m.target_vcpu = target_vp;
            if v.0 >= VmbusVersion::WIN10_V5.0 {
                m.set_target_info(vmbus_proto::synic::VMBUS_SINT, 0, 0);
            }
            c.host
                .post_message(v.initiate_contact_connection_id(), m.as_bytes())?;
            let r = c.wait(|m| match m {
                Message::VersionResponse(r) => Some(*r),
                _ => None,
            })?;
            if r.version_supported != 0 {
                c.version = v;
                if v.0 >= VmbusVersion::WIN10_V5.0 {
                    c.msg_conn_id = r.msg_conn_id;
                }
                tracing::info!(version = ?v, msg_conn_id = c.msg_conn_id, "VMBus connected");
                return Ok(c);
            }
            tracing::debug!(version = ?v, "version refused");
        }
        Err(Error::Refused(
            "the host accepted none of the proposed versions".into(),
        ))
    }

    /// The negotiated version.
    pub fn version(&self) -> VmbusVersion {
        self.version
    }

    /// The connection id later messages go to.
    pub fn message_connection_id(&self) -> u32 {
        self.msg_conn_id
    }

    /// Sets how long to wait for each answer.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    fn post(&self, bytes: &[u8]) -> Result<(), Error> {
        self.host.post_message(self.msg_conn_id, bytes)
    }

    /// Waits for a message `want` accepts; handles unsolicited ones (offers, rescinds) meanwhile.
    fn wait<T>(&mut self, mut want: impl FnMut(&Message<'_>) -> Option<T>) -> Result<T, Error> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let bytes = match self.messages.recv_timeout(left) {
                Ok(b) => b,
                Err(RecvTimeoutError::Timeout) => return Err(Error::Timeout),
                Err(RecvTimeoutError::Disconnected) => return Err(Error::Disconnected),
            };
            let msg = match Message::parse(&bytes) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "malformed message from the host ignored");
                    continue;
                }
            };
            if let Some(t) = want(&msg) {
                return Ok(t);
            }
            self.unsolicited(&msg)?;
        }
    }

    fn unsolicited(&mut self, msg: &Message<'_>) -> Result<(), Error> {
        match msg {
            Message::OfferChannel(o) => self.events.push_back(Event::Offer(Offer::from_wire(o))),
            Message::RescindChannelOffer(r) => {
                let relid = r.child_relid;
                self.host.set_channel_interrupt(relid, None);
                let mut m = RelIdReleased::new_zeroed();
                m.header = MessageHeader::new(MessageType::RELID_RELEASED);
                m.child_relid = relid;
                self.post(m.as_bytes())?;
                self.events.push_back(Event::Rescinded(relid));
            }
            other => tracing::debug!(?other, "unexpected message ignored"),
        }
        Ok(())
    }

    /// Requests the offers and returns them (in the host's order) once all are delivered.
    pub fn request_offers(&mut self) -> Result<Vec<Offer>, Error> {
        self.post(MessageHeader::new(MessageType::REQUEST_OFFERS).as_bytes())?;
        let mut offers = Vec::new();
        loop {
            let done = self.wait(|m| match m {
                Message::OfferChannel(o) => Some(Some(Offer::from_wire(o))),
                Message::AllOffersDelivered => Some(None),
                _ => None,
            })?;
            match done {
                Some(o) => offers.push(o),
                None => return Ok(offers),
            }
        }
    }

    /// Creates a GPADL over `pfns` for channel `relid`; returns its id.
    pub fn create_gpadl(&mut self, relid: u32, pfns: &[u64]) -> Result<u32, Error> {
        let count = pfns.len();
        let bytes = count
            .checked_mul(4096)
            .filter(|&b| b <= u32::MAX as usize && count > 0)
            .ok_or(Error::GpadlTooLarge)?;
        let range_buflen = 8 + 8 * count;
        let range_buflen = u16::try_from(range_buflen).map_err(|_| Error::GpadlTooLarge)?;
        let gpadl = self.next_gpadl;
        self.next_gpadl = self.next_gpadl.wrapping_add(1).max(0x1000);
        let mut h = GpadlHeader::new_zeroed();
        h.header = MessageHeader::new(MessageType::GPADL_HEADER);
        h.child_relid = relid;
        h.gpadl = gpadl;
        h.range_buflen = range_buflen;
        h.range_count = 1;
        let first = count.min(MAX_GPADL_HEADER_PFNS);
        let mut msg = Vec::with_capacity(240);
        msg.extend_from_slice(h.as_bytes());
        msg.extend_from_slice(
            GpaRangeHeader {
                byte_count: bytes as u32,
                byte_offset: 0,
            }
            .as_bytes(),
        );
        for p in &pfns[..first] {
            msg.extend_from_slice(&p.to_le_bytes());
        }
        self.post(&msg)?;
        for (n, chunk) in pfns[first..].chunks(MAX_GPADL_BODY_PFNS).enumerate() {
            let mut b = GpadlBody::new_zeroed();
            b.header = MessageHeader::new(MessageType::GPADL_BODY);
            b.message_number = n as u32 + 1;
            b.gpadl = gpadl;
            msg.clear();
            msg.extend_from_slice(b.as_bytes());
            for p in chunk {
                msg.extend_from_slice(&p.to_le_bytes());
            }
            self.post(&msg)?;
        }
        let status = self.wait(|m| match m {
            Message::GpadlCreated(c) if c.gpadl == gpadl => Some(c.creation_status),
            _ => None,
        })?;
        if status != 0 {
            return Err(Error::Status {
                what: "GPADL creation",
                status,
            });
        }
        Ok(gpadl)
    }

    /// Tears down a GPADL.
    pub fn teardown_gpadl(&mut self, relid: u32, gpadl: u32) -> Result<(), Error> {
        let mut t = GpadlTeardown::new_zeroed();
        t.header = MessageHeader::new(MessageType::GPADL_TEARDOWN);
        t.child_relid = relid;
        t.gpadl = gpadl;
        self.post(t.as_bytes())?;
        self.wait(|m| match m {
            Message::GpadlTorndown(t) if t.gpadl == gpadl => Some(()),
            _ => None,
        })
    }

    /// Opens channel `relid` on ring GPADL `gpadl` whose first `downstream_pages` pages are the
    /// guest-to-host ring; interrupts go to `target_vp`.
    pub fn open(
        &mut self,
        relid: u32,
        gpadl: u32,
        downstream_pages: u32,
        target_vp: u32,
        user_data: &[u8],
    ) -> Result<(), Error> {
        let mut o = OpenChannel::new_zeroed();
        o.header = MessageHeader::new(MessageType::OPEN_CHANNEL);
        o.child_relid = relid;
        o.open_id = relid;
        o.ring_buffer_gpadl = gpadl;
        o.target_vp = target_vp;
        o.downstream_ring_buffer_page_offset = downstream_pages;
        let n = user_data.len().min(o.user_data.len());
        o.user_data[..n].copy_from_slice(&user_data[..n]);
        self.post(o.as_bytes())?;
        let status = self.wait(|m| match m {
            Message::OpenResult(r) if r.child_relid == relid => Some(r.status),
            _ => None,
        })?;
        if status != 0 {
            return Err(Error::Status {
                what: "channel open",
                status,
            });
        }
        Ok(())
    }

    /// Closes channel `relid` (no answer in the protocol).
    pub fn close(&mut self, relid: u32) -> Result<(), Error> {
        let mut c = CloseChannel::new_zeroed();
        c.header = MessageHeader::new(MessageType::CLOSE_CHANNEL);
        c.child_relid = relid;
        self.host.set_channel_interrupt(relid, None);
        self.post(c.as_bytes())
    }

    /// Disconnects (guest reboot or kexec): the host closes everything and answers.
    pub fn unload(&mut self) -> Result<(), Error> {
        self.post(MessageHeader::new(MessageType::UNLOAD).as_bytes())?;
        self.wait(|m| matches!(m, Message::UnloadResponse).then_some(()))
    }

    /// The next unsolicited event, waiting up to `timeout` for one.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let bytes = match self.messages.recv_timeout(left) {
                Ok(b) => b,
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => return Err(Error::Disconnected),
            };
            match Message::parse(&bytes) {
                Ok(m) => self.unsolicited(&m)?,
                Err(e) => tracing::warn!(error = %e, "malformed message from the host ignored"),
            }
        }
    }

    /// The host interface (for channel signalling).
    pub fn host(&self) -> &Arc<dyn HostInterface> {
        &self.host
    }
}
