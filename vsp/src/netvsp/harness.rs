//! A netvsp channel without a daemon, for tests and fuzzing: guest memory in a memfd at
//! guest-physical 0, the channel's rings in one process, GPADLs put straight into the index,
//! and the caller playing the guest (as well-behaved as Linux's hv_netvsc, or as hostile as it
//! likes). The NIC's backend is a real TAP or [`StandIn`], a queue that keeps what the device
//! writes and hands out frames queued for it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use netdev::{IoPiece, IoPieceMut, VirtioNetHdr};
use ringbuf::guestmem::GuestMemory;
use ringbuf::packet::{gpa_direct_header, OutgoingPacket, PacketKind};
use ringbuf::pair::RingPair;
use ringbuf::{IncomingRing, OutgoingRing};
use vmbus_proto::netvsp::NvspMessage;
use vmbus_proto::ring::{PacketType, TransferPageRange};

use super::{Group, NetQueue, Netvsp, NetvspSpec, Nic};
use crate::channel::Device;
use crate::server::{GpadlIndex, SharedGpadl};
use crate::session::SubchannelRequest;
use crate::Error;

/// The virtio-net header, for callers without a netdev dependency (the fuzz targets).
pub use netdev::VirtioNetHdr as VnetHdr;

/// Bytes of each ring's data area.
const RING_BYTES: usize = 256 << 10;

/// Frames a [`StandIn`] queue holds each way.
#[derive(Debug, Default)]
pub struct StandInFrames {
    /// Frames the device wrote (to the host), with their headers.
    pub to_host: Vec<(VirtioNetHdr, Vec<u8>)>,
    /// Frames waiting for the device to read (to the guest).
    pub to_guest: VecDeque<(VirtioNetHdr, Vec<u8>)>,
    /// The offloads the device last set ([`netdev::TunOffload`] bits).
    pub offload: u32,
    /// Reads the device tried, frames or not.
    pub reads: u64,
}

/// A TAP stand-in: a queue in memory.
#[derive(Debug, Clone, Default)]
pub struct StandIn(pub Arc<Mutex<StandInFrames>>);

impl StandIn {
    fn frames(&self) -> std::sync::MutexGuard<'_, StandInFrames> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame for the guest.
    pub fn push_to_guest(&self, hdr: VirtioNetHdr, frame: Vec<u8>) {
        self.frames().to_guest.push_back((hdr, frame));
    }

    /// Takes the frames the device wrote.
    pub fn take_to_host(&self) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        std::mem::take(&mut self.frames().to_host)
    }
}

impl NetQueue for StandIn {
    fn write(
        &mut self,
        hdr: &VirtioNetHdr,
        pieces: &[IoPiece<'_>],
    ) -> Result<Option<usize>, netdev::Error> {
        let mut frame = Vec::new();
        for p in pieces {
            match p {
                IoPiece::Local(b) => frame.extend_from_slice(b),
                IoPiece::Shared(s) => {
                    let at = frame.len();
                    frame.resize(at + s.len(), 0);
                    s.read(&mut frame[at..])?;
                }
            }
        }
        let n = frame.len();
        self.frames().to_host.push((*hdr, frame));
        Ok(Some(n))
    }

    fn read(
        &mut self,
        hdr: &mut VirtioNetHdr,
        pieces: &mut [IoPieceMut<'_>],
    ) -> Result<Option<usize>, netdev::Error> {
        let mut frames = self.frames();
        frames.reads += 1;
        let Some((h, frame)) = frames.to_guest.pop_front() else {
            return Ok(None);
        };
        drop(frames);
        *hdr = h;
        let mut at = 0;
        for p in pieces.iter_mut() {
            let left = frame.len() - at.min(frame.len());
            match p {
                IoPieceMut::Local(b) => {
                    let n = b.len().min(left);
                    b[..n].copy_from_slice(&frame[at..at + n]);
                    at += n;
                }
                IoPieceMut::Shared(s) => {
                    let n = s.len().min(left);
                    let part = netdev::Shared::Guest {
                        mem: match s {
                            netdev::Shared::Guest { mem, .. } => mem,
                            netdev::Shared::Mapped { .. } => {
                                return Err(netdev::Error::PieceOutOfBounds)
                            }
                        },
                        gpa: match s {
                            netdev::Shared::Guest { gpa, .. } => *gpa,
                            netdev::Shared::Mapped { .. } => 0,
                        },
                        len: n,
                    };
                    part.write(&frame[at..at + n])?;
                    at += n;
                }
            }
        }
        Ok(Some(frame.len()))
    }

    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    fn set_attached(&mut self, _attached: bool) -> Result<(), netdev::Error> {
        Ok(())
    }

    fn set_offload(&mut self, offload: netdev::TunOffload) -> Result<(), netdev::Error> {
        self.frames().offload = offload.bits();
        Ok(())
    }
}

/// What the guest read from the host-to-guest ring.
#[derive(Debug, Clone)]
pub enum Received {
    /// A completion: transaction id and NVSP message.
    Completion(u64, NvspMessage),
    /// An in-band packet (the indirection table): its payload.
    InBand(Vec<u8>),
    /// A transfer-page packet: transaction id, set id, ranges, the NVSP message, and the
    /// bytes of each range (read from the receive buffer at once).
    Transfer {
        /// Transaction id (to complete).
        tx: u64,
        /// Transfer page set id.
        set_id: u16,
        /// The ranges.
        ranges: Vec<TransferPageRange>,
        /// The NVSP message.
        msg: NvspMessage,
    },
}

/// One channel's device and its guest's view.
pub struct Harness {
    /// The device.
    pub device: Netvsp,
    /// Guest memory.
    pub mem: Arc<GuestMemory>,
    /// The guest's GPADLs.
    pub gpadls: GpadlIndex,
    guest_out: OutgoingRing,
    guest_in: IncomingRing,
    host_out: OutgoingRing,
    host_in: IncomingRing,
    _pair: RingPair,
    header: Vec<u8>,
    /// Everything the host sent, in order, not yet taken.
    pub received: VecDeque<Received>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// The relid of the harness's primary channel.
pub const RELID: u32 = 5;

impl Harness {
    /// A primary channel of `nic` with `mem_bytes` of guest memory.
    pub fn new(
        nic: Arc<Nic>,
        mem_bytes: u64,
        request_subchannels: Option<SubchannelRequest>,
    ) -> Result<Self, Error> {
        let fd = ringbuf::shmem::create_memfd("netvsp-harness", mem_bytes)?;
        let mut mem = GuestMemory::new();
        mem.add_region(0, mem_bytes, fd, 0)?;
        Self::channel(
            Group::new(nic),
            0,
            Arc::new(mem),
            GpadlIndex::default(),
            request_subchannels,
        )
    }

    /// Subchannel `index` of this channel's NIC in the same guest.
    pub fn subchannel(&self, index: u16) -> Result<Self, Error> {
        Self::channel(
            self.device.group().clone(),
            index,
            self.mem.clone(),
            self.gpadls.clone(),
            None,
        )
    }

    fn channel(
        group: Arc<Group>,
        index: u16,
        mem: Arc<GuestMemory>,
        gpadls: GpadlIndex,
        request_subchannels: Option<SubchannelRequest>,
    ) -> Result<Self, Error> {
        let device = Netvsp::new(NetvspSpec {
            group,
            index,
            relid: RELID + u32::from(index),
            mem: mem.clone(),
            gpadls: gpadls.clone(),
            request_subchannels,
        })?;
        let pair = RingPair::anonymous(RING_BYTES)?;
        let (guest_out, guest_in) = pair.side_a()?;
        let (host_out, host_in) = pair.side_b()?;
        Ok(Self {
            device,
            mem,
            gpadls,
            guest_out,
            guest_in,
            host_out,
            host_in,
            _pair: pair,
            header: Vec::new(),
            received: VecDeque::new(),
        })
    }

    /// Makes GPADL `id` of the primary channel over the contiguous guest pages at `gpa`.
    pub fn add_gpadl(&self, id: u32, gpa: u64, len: u32) {
        let pages = u64::from(len).div_ceil(4096);
        self.gpadls.insert(
            id,
            SharedGpadl {
                relid: RELID,
                byte_offset: 0,
                byte_count: len,
                pfns: (gpa / 4096..gpa / 4096 + pages).collect(),
            },
        );
    }

    /// Sends one packet: in-band, GPA-direct (`ranges`: byte offset, byte count, page
    /// numbers), or a completion; then lets the device run. `Ok(false)` if the ring refused it.
    pub fn send(&mut self, tx: u64, payload: &[u8], kind: Sent<'_>) -> Result<bool, Error> {
        let parts = [payload];
        let written = match kind {
            Sent::Direct(r) => {
                gpa_direct_header(&mut self.header, r);
                self.guest_out.write(&OutgoingPacket {
                    packet_type: PacketType::DATA_USING_GPA_DIRECT,
                    flags: 1,
                    transaction_id: tx,
                    header: &self.header,
                    payload: &parts,
                })
            }
            Sent::InBand => self
                .guest_out
                .write(&OutgoingPacket::in_band(tx, true, &parts)),
            Sent::Completion => self
                .guest_out
                .write(&OutgoingPacket::completion(tx, &parts)),
        };
        if written.is_err() {
            self.guest_out.rollback();
            return Ok(false);
        }
        self.guest_out.commit();
        self.run()?;
        Ok(true)
    }

    /// Lets the device take every packet and move until it is idle; reads what it sent. The
    /// TAP is looked at on the first turn (a worker does within `TAP_BACKOFF_MAX`).
    pub fn run(&mut self) -> Result<(), Error> {
        self.device.tap_backoff = std::time::Duration::ZERO;
        for _ in 0..1000 {
            if !self.turn()? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// One turn of a worker's loop: the device takes every packet and moves; reads what it
    /// sent. Whether anything moved.
    pub fn turn(&mut self) -> Result<bool, Error> {
        let mut moved = false;
        loop {
            match self.host_in.read() {
                Ok(Some(p)) => {
                    moved = true;
                    self.device.handle(&p, &mut self.host_out)?
                }
                Ok(None) => break,
                Err(_) => {
                    self.host_in.rollback();
                    break;
                }
            }
        }
        self.host_in.commit();
        moved |= self.device.poll(&mut self.host_out)?;
        self.host_out.commit();
        self.drain();
        Ok(moved)
    }

    fn drain(&mut self) {
        while let Ok(Some(p)) = self.guest_in.read() {
            let msg = NvspMessage::read_from_payload(p.payload);
            let r = match (p.kind, msg) {
                (PacketKind::Completion, Some(m)) => Received::Completion(p.transaction_id, m),
                (PacketKind::TransferPages { set_id, ranges }, Some(m)) => Received::Transfer {
                    tx: p.transaction_id,
                    set_id,
                    ranges: ranges.to_vec(),
                    msg: m,
                },
                _ => Received::InBand(p.payload.to_vec()),
            };
            self.received.push_back(r);
        }
        self.guest_in.commit();
    }
}

/// How [`Harness::send`] sends.
#[derive(Debug, Clone, Copy)]
pub enum Sent<'a> {
    /// In-band, completion requested.
    InBand,
    /// GPA-direct with these ranges, completion requested.
    Direct(&'a [(u32, u32, &'a [u64])]),
    /// A completion packet.
    Completion,
}

/// A guest driver that speaks as Linux 6.1's hv_netvsc: message builders and the handshake in
/// Linux's order, over a [`Harness`]. Guest memory layout: a scratch page for control messages
/// at [`guest::SCRATCH_GPA`], GPA-direct data at [`guest::DATA_GPA`], the send buffer at
/// [`guest::SEND_GPA`] and the receive buffer at [`guest::RECV_GPA`].
pub mod guest {
    use super::*;
    use vmbus_proto::netvsp::{
        NvspInit, NvspMessageType, NvspStatus, NvspSubchannelOperation, NvspVersion,
        SendNdisConfig, SendNdisVersion, SendReceiveBuffer, SendReceiveBufferComplete,
        SendSendBuffer, SendSendBufferComplete, SubchannelComplete,
        SubchannelRequest as NvspSubchannelRequest, LINUX_RECEIVE_BUFFER_ID, LINUX_SEND_BUFFER_ID,
    };
    use vmbus_proto::rndis::{
        InitializeRequest, Oid, PacketFilter, PerPacketInfo, PpiType, QueryComplete, QueryRequest,
        RndisMessageHeader, RndisMessageType, RndisPacket, SetComplete, SetRequest,
    };
    use zerocopy::{FromBytes, Immutable, IntoBytes};

    /// Guest memory the layout needs.
    pub const MEM_BYTES: u64 = 8 << 20;
    /// Where control messages are written (GPA-direct).
    pub const SCRATCH_GPA: u64 = 0x10000;
    /// Where GPA-direct data messages are written.
    pub const DATA_GPA: u64 = 0x40000;
    /// The send buffer.
    pub const SEND_GPA: u64 = 1 << 20;
    /// Its length.
    pub const SEND_LEN: u32 = 1 << 20;
    /// The receive buffer.
    pub const RECV_GPA: u64 = 2 << 20;
    /// Its length.
    pub const RECV_LEN: u32 = 4 << 20;
    /// GPADL ids.
    pub const SEND_GPADL: u32 = 0x100;
    /// GPADL ids.
    pub const RECV_GPADL: u32 = 0x101;

    /// An NVSP message.
    pub fn nvsp<T: IntoBytes + Immutable>(kind: NvspMessageType, body: &T) -> Vec<u8> {
        NvspMessage::new(kind, body).as_bytes().to_vec()
    }

    /// An RNDIS message of `kind` with `body`.
    pub fn rndis(kind: RndisMessageType, body: &[u8]) -> Vec<u8> {
        let mut v = RndisMessageHeader {
            message_type: kind,
            message_length: (8 + body.len()) as u32,
        }
        .as_bytes()
        .to_vec();
        v.extend_from_slice(body);
        v
    }

    /// An RNDIS QUERY.
    pub fn query(request_id: u32, oid: Oid, info: &[u8]) -> Vec<u8> {
        let mut b = QueryRequest {
            request_id,
            oid,
            info_buffer_length: info.len() as u32,
            info_buffer_offset: size_of::<QueryRequest>() as u32,
            device_vc_handle: 0,
        }
        .as_bytes()
        .to_vec();
        b.extend_from_slice(info);
        rndis(RndisMessageType::QUERY, &b)
    }

    /// An RNDIS SET.
    pub fn set(request_id: u32, oid: Oid, info: &[u8]) -> Vec<u8> {
        let mut b = SetRequest {
            request_id,
            oid,
            info_buffer_length: info.len() as u32,
            info_buffer_offset: size_of::<SetRequest>() as u32,
            device_vc_handle: 0,
        }
        .as_bytes()
        .to_vec();
        b.extend_from_slice(info);
        rndis(RndisMessageType::SET, &b)
    }

    /// An RNDIS data message carrying `frame` with per-packet info entries `ppis`.
    pub fn data(frame: &[u8], ppis: &[(PpiType, u32)]) -> Vec<u8> {
        let ppi_len = ppis.len() * 16;
        let p = RndisPacket {
            data_offset: (36 + ppi_len) as u32,
            data_length: frame.len() as u32,
            per_packet_info_offset: if ppis.is_empty() { 0 } else { 36 },
            per_packet_info_length: ppi_len as u32,
            ..Default::default()
        };
        let mut b = p.as_bytes().to_vec();
        for &(t, v) in ppis {
            b.extend_from_slice(PerPacketInfo::new(t, false, 4).as_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(frame);
        rndis(RndisMessageType::PACKET, &b)
    }

    /// A TCP/IPv4 frame (02:..:02 to 02:..:01) with `payload` bytes, its IPv4 total length
    /// set, checksums left zero.
    pub fn tcp_frame(payload: usize) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0];
        let total = 20 + 20 + payload;
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total.min(65535) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        f.extend_from_slice(&ip);
        let mut tcp = [0u8; 20];
        tcp[12] = 5 << 4;
        f.extend_from_slice(&tcp);
        f.resize(14 + total, 0x5a);
        f
    }

    /// Page ranges of `len` bytes at `gpa` (contiguous pages), as one GPA-direct range.
    pub fn pages(gpa: u64, len: usize) -> Vec<u64> {
        let first = gpa / 4096;
        let last = (gpa + len as u64).div_ceil(4096);
        (first..last).collect()
    }

    /// Sends RNDIS message(s) `msg` GPA-direct from `at` (SCRATCH_GPA or DATA_GPA).
    pub fn send_direct(h: &mut Harness, tx: u64, msg: &[u8], at: u64) -> Result<bool, Error> {
        h.mem.write(at, msg)?;
        let pfns = pages(at, msg.len());
        let control = RndisMessageHeader::read_from_prefix(msg)
            .is_ok_and(|(m, _)| m.message_type != RndisMessageType::PACKET);
        let m = super::super::protocol::send_rndis_message(control, None)
            .as_bytes()
            .to_vec();
        h.send(
            tx,
            &m,
            Sent::Direct(&[((at % 4096) as u32, msg.len() as u32, &pfns)]),
        )
    }

    /// Sends RNDIS message(s) `msgs` from send-buffer section `section` (of `section_size`).
    pub fn send_section(
        h: &mut Harness,
        tx: u64,
        section: u32,
        section_size: u32,
        msgs: &[u8],
    ) -> Result<bool, Error> {
        h.mem.write(
            SEND_GPA + u64::from(section) * u64::from(section_size),
            msgs,
        )?;
        let m =
            super::super::protocol::send_rndis_message(false, Some((section, msgs.len() as u32)))
                .as_bytes()
                .to_vec();
        h.send(tx, &m, Sent::InBand)
    }

    /// Takes the completion of transaction `tx`, if the host sent it.
    pub fn completion(h: &mut Harness, tx: u64) -> Option<NvspMessage> {
        let i = h
            .received
            .iter()
            .position(|r| matches!(r, Received::Completion(t, _) if *t == tx))?;
        match h.received.remove(i) {
            Some(Received::Completion(_, m)) => Some(m),
            _ => None,
        }
    }

    /// Takes every transfer-page packet received: the bytes of its first range (read from
    /// the receive buffer), completing each (unless `keep`).
    pub fn take_received(h: &mut Harness, keep: bool) -> Result<Vec<Vec<u8>>, Error> {
        let mut out = Vec::new();
        let items: Vec<Received> = h.received.drain(..).collect();
        for r in items {
            match r {
                Received::Transfer { tx, ranges, .. } => {
                    for range in &ranges {
                        let mut b = vec![0u8; range.byte_count as usize];
                        h.mem
                            .read(RECV_GPA + u64::from(range.byte_offset), &mut b)?;
                        out.push(b);
                    }
                    if !keep {
                        let c = nvsp(
                            NvspMessageType::SEND_RNDIS_PACKET_COMPLETE,
                            &vmbus_proto::netvsp::SendRndisPacketComplete {
                                status: NvspStatus::SUCCESS,
                            },
                        );
                        h.send(tx, &c, Sent::Completion)?;
                    }
                }
                other => h.received.push_back(other),
            }
        }
        Ok(out)
    }

    /// The frames among received messages: (RNDIS packet header, per-packet info bytes,
    /// frame).
    pub fn frames_of(msgs: &[Vec<u8>]) -> Vec<(RndisPacket, Vec<u8>, Vec<u8>)> {
        msgs.iter()
            .filter_map(|m| {
                let (h, rest) = RndisMessageHeader::read_from_prefix(m).ok()?;
                if h.message_type != RndisMessageType::PACKET {
                    return None;
                }
                let (p, _) = RndisPacket::read_from_prefix(rest).ok()?;
                let d = 8 + p.data_offset as usize;
                let ppi_at = 8 + p.per_packet_info_offset as usize;
                Some((
                    p,
                    m.get(ppi_at..ppi_at + p.per_packet_info_length as usize)?
                        .to_vec(),
                    m.get(d..d + p.data_length as usize)?.to_vec(),
                ))
            })
            .collect()
    }

    /// One control request and its answer's body (after the RNDIS header).
    pub fn request(h: &mut Harness, tx: u64, msg: &[u8]) -> Result<Vec<u8>, Error> {
        send_direct(h, tx, msg, SCRATCH_GPA)?;
        let done = completion(h, tx);
        assert!(done.is_some(), "no completion for the control message");
        let answers = take_received(h, false)?;
        let a = answers.into_iter().next().unwrap_or_default();
        Ok(a.get(8..).map(|b| b.to_vec()).unwrap_or_default())
    }

    /// A QUERY's status and info buffer.
    pub fn query_info(
        h: &mut Harness,
        tx: u64,
        oid: Oid,
        info: &[u8],
    ) -> Result<(u32, Vec<u8>), Error> {
        let body = request(h, tx, &query(tx as u32, oid, info))?;
        let (c, _) = QueryComplete::read_from_prefix(&body)
            .map_err(|_| Error::Config("short QUERY_C".into()))?;
        let at = c.info_buffer_offset as usize;
        let info = body
            .get(at..at + c.info_buffer_length as usize)
            .unwrap_or_default()
            .to_vec();
        Ok((c.status.0, info))
    }

    /// A SET's status.
    pub fn set_status(h: &mut Harness, tx: u64, oid: Oid, info: &[u8]) -> Result<u32, Error> {
        let body = request(h, tx, &set(tx as u32, oid, info))?;
        Ok(SetComplete::read_from_prefix(&body)
            .map(|(c, _)| c.status.0)
            .unwrap_or(u32::MAX))
    }

    /// What the handshake learnt.
    #[derive(Debug, Clone, Default)]
    pub struct Handshake {
        /// The receive buffer completion.
        pub recv: SendReceiveBufferComplete,
        /// The send section size.
        pub send_section_size: u32,
        /// The address.
        pub mac: [u8; 6],
        /// Subchannels granted.
        pub subchannels: u32,
    }

    /// Linux 6.1's bring-up: INIT at `version`, NDIS config and version, receive then send
    /// buffer, RNDIS INITIALIZE, the OIDs in Linux's order, subchannels (asking `subchannels`),
    /// the packet filter. Returns `None` where the host refused a step Linux needs.
    pub fn handshake(
        h: &mut Harness,
        version: NvspVersion,
        subchannels: u32,
    ) -> Result<Option<Handshake>, Error> {
        let mut out = Handshake::default();
        h.add_gpadl(RECV_GPADL, RECV_GPA, RECV_LEN);
        h.add_gpadl(SEND_GPADL, SEND_GPA, SEND_LEN);
        h.send(
            1,
            &nvsp(
                NvspMessageType::INIT,
                &NvspInit {
                    min_protocol_version: version,
                    max_protocol_version: version,
                },
            ),
            Sent::InBand,
        )?;
        let Some(init) = completion(h, 1) else {
            return Ok(None);
        };
        let ic: vmbus_proto::netvsp::NvspInitComplete = init.body();
        if ic.status != NvspStatus::SUCCESS || ic.negotiated_protocol_version != version {
            return Ok(None);
        }
        if version.0 >= NvspVersion::V2.0 {
            h.send(
                2,
                &nvsp(
                    NvspMessageType::SEND_NDIS_CONFIG,
                    &SendNdisConfig {
                        mtu: 1500 + 14,
                        reserved: 0,
                        capabilities: vmbus_proto::netvsp::NvspCapabilities::default()
                            .with_ieee8021q(true)
                            .with_rsc(version.0 >= NvspVersion::V61.0),
                    },
                ),
                Sent::InBand,
            )?;
        }
        let (major, minor) = if version.0 > NvspVersion::V4.0 {
            (6, 30)
        } else {
            (6, 1)
        };
        h.send(
            3,
            &nvsp(
                NvspMessageType::SEND_NDIS_VERSION,
                &SendNdisVersion {
                    ndis_major_version: major,
                    ndis_minor_version: minor,
                },
            ),
            Sent::InBand,
        )?;
        h.send(
            4,
            &nvsp(
                NvspMessageType::SEND_RECEIVE_BUFFER,
                &SendReceiveBuffer {
                    gpadl_handle: RECV_GPADL,
                    id: LINUX_RECEIVE_BUFFER_ID,
                },
            ),
            Sent::InBand,
        )?;
        let Some(r) = completion(h, 4) else {
            return Ok(None);
        };
        out.recv = r.body();
        // Linux's checks.
        let s = out.recv.sections[0];
        if out.recv.status != NvspStatus::SUCCESS
            || out.recv.num_sections != 1
            || s.offset != 0
            || s.sub_alloc_size < 68
            || u64::from(s.sub_alloc_size) * u64::from(s.num_sub_allocs) > u64::from(RECV_LEN)
        {
            return Ok(None);
        }
        h.send(
            5,
            &nvsp(
                NvspMessageType::SEND_SEND_BUFFER,
                &SendSendBuffer {
                    gpadl_handle: SEND_GPADL,
                    id: LINUX_SEND_BUFFER_ID,
                },
            ),
            Sent::InBand,
        )?;
        let Some(r) = completion(h, 5) else {
            return Ok(None);
        };
        let sc: SendSendBufferComplete = r.body();
        if sc.status != NvspStatus::SUCCESS || sc.section_size < 68 {
            return Ok(None);
        }
        out.send_section_size = sc.section_size;
        let init = rndis(
            RndisMessageType::INITIALIZE,
            InitializeRequest {
                request_id: 10,
                major_version: 1,
                minor_version: 0,
                max_transfer_size: 0x4000,
            }
            .as_bytes(),
        );
        let body = request(h, 10, &init)?;
        let ic = vmbus_proto::rndis::InitializeComplete::read_from_prefix(&body)
            .map(|(c, _)| c)
            .unwrap_or_default();
        if ic.status != vmbus_proto::rndis::RndisStatus::SUCCESS || ic.max_packets_per_message == 0
        {
            return Ok(None);
        }
        let (_, mtu) = query_info(h, 11, Oid::GEN_MAXIMUM_FRAME_SIZE, &[])?;
        if mtu.len() != 4 {
            return Ok(None);
        }
        let (st, mac) = query_info(h, 12, Oid::E802_3_PERMANENT_ADDRESS, &[])?;
        if st != 0 || mac.len() != 6 {
            return Ok(None);
        }
        out.mac.copy_from_slice(&mac);
        query_info(h, 13, super::super::protocol::OID_GEN_FRIENDLY_NAME, &[])?;
        let (st, caps) = query_info(h, 14, Oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES, &[0; 156])?;
        if st != 0
            || caps.len() < 112
            || caps.len() > 156
            || caps[0] != 0xA7
            || caps[1] == 0
            || usize::from(u16::from_le_bytes([caps[2], caps[3]])) > caps.len()
        {
            return Ok(None);
        }
        // Linux offers LRO (and then enables RSC) only when the host does RSC both ways.
        let rsc = if caps.len() >= 146 && caps[144] == 1 && caps[145] == 1 {
            vmbus_proto::rndis::offload_param::RSC_ENABLED
        } else {
            0
        };
        let params = vmbus_proto::rndis::NdisOffloadParams {
            header: vmbus_proto::rndis::NdisObjectHeader {
                object_type: 0x80,
                revision: 3,
                size: if version.0 <= NvspVersion::V4.0 {
                    22
                } else {
                    28
                },
            },
            ip_v4_csum: 1,
            tcp_ip_v4_csum: 4,
            tcp_ip_v6_csum: 4,
            lso_v2_ipv4: 2,
            lso_v2_ipv6: 2,
            rsc_ip_v4: rsc,
            rsc_ip_v6: rsc,
            ..Default::default()
        };
        let size = usize::from(params.header.size);
        if set_status(
            h,
            15,
            Oid::TCP_OFFLOAD_PARAMETERS,
            &params.as_bytes()[..size],
        )? != 0
        {
            return Ok(None);
        }
        query_info(h, 16, Oid::GEN_MEDIA_CONNECT_STATUS, &[])?;
        if version.0 >= NvspVersion::V5.0 {
            query_info(h, 17, Oid::GEN_LINK_SPEED, &[])?;
            let (_, cap) = query_info(h, 18, Oid::GEN_RECEIVE_SCALE_CAPABILITIES, &[0; 18])?;
            let queues = vmbus_proto::rndis::NdisRecvScaleCap::read_from_prefix(&cap)
                .map(|(c, _)| c.num_recv_queues)
                .unwrap_or(0);
            let want = subchannels.min(queues.saturating_sub(1));
            if queues >= 2 && want > 0 {
                h.send(
                    19,
                    &nvsp(
                        NvspMessageType::SUBCHANNEL,
                        &NvspSubchannelRequest {
                            op: NvspSubchannelOperation::ALLOCATE,
                            num_subchannels: want,
                        },
                    ),
                    Sent::InBand,
                )?;
                let Some(c) = completion(h, 19) else {
                    return Ok(None);
                };
                let sc: SubchannelComplete = c.body();
                if sc.status != NvspStatus::SUCCESS || sc.num_subchannels > want {
                    return Ok(None);
                }
                out.subchannels = sc.num_subchannels;
            }
        }
        let filter =
            (PacketFilter::DIRECTED | PacketFilter::BROADCAST | PacketFilter::ALL_MULTICAST).bits();
        if set_status(h, 20, Oid::GEN_CURRENT_PACKET_FILTER, &filter.to_le_bytes())? != 0 {
            return Ok(None);
        }
        Ok(Some(out))
    }
}
