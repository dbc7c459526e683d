use proptest::prelude::*;
use ringbuf::guestmem::GuestMemory;
use ringbuf::shmem::create_memfd;
use ringbuf::{IncomingRing, OutgoingRing, PacketKind, Ring};
use vmbus_proto::channel::{
    CloseChannel, GpadlBody, GpadlCreated, GpadlHeader, GpadlTeardown, GpadlTorndown,
    InitiateContact, ModifyChannel, ModifyChannelResponse, OfferChannel, OpenResult, RelIdReleased,
    RescindChannelOffer, VersionResponse, MAX_GPADL_BODY_PFNS, MAX_GPADL_HEADER_PFNS,
    MESSAGE_CONNECTION_ID_4,
};
use vmbus_proto::ring::GpaRangeHeader;
use zerocopy::FromBytes;

use super::*;

const MEM_BYTES: u64 = 4 << 20;
const MEM_PAGES: u64 = MEM_BYTES / 4096;

fn memory() -> GuestMemory {
    let mut mem = GuestMemory::new();
    let fd = create_memfd("guest", MEM_BYTES).unwrap();
    mem.add_region(0, MEM_BYTES, fd, 0).unwrap();
    mem
}

fn spec(n: u8) -> OfferSpec {
    OfferSpec {
        interface_type: Guid::SCSI,
        interface_instance: Guid([n; 16]),
        subchannel_index: 0,
        mmio_megabytes: 0,
        flags: 0,
        user_defined: [n; MAX_USER_DEFINED_BYTES],
    }
}

/// The server, guest memory, and the outputs of the last call.
struct Harness {
    server: Server,
    mem: GuestMemory,
}

impl Harness {
    fn new() -> Self {
        Self::with_config(ServerConfig::default())
    }

    fn with_config(config: ServerConfig) -> Self {
        Self {
            server: Server::new(config),
            mem: memory(),
        }
    }

    fn post_on(&mut self, connection_id: u32, bytes: &[u8]) -> Vec<Output> {
        let mut out = Vec::new();
        self.server
            .handle_message(&self.mem, connection_id, bytes, &mut out);
        for o in &out {
            if let Output::Message { bytes, .. } = o {
                assert!(bytes.len() <= MAX_MESSAGE_SIZE);
            }
        }
        out
    }

    fn post<T: IntoBytes + Immutable>(&mut self, msg: &T) -> Vec<Output> {
        self.post_on(MESSAGE_CONNECTION_ID, msg.as_bytes())
    }

    fn add(&mut self, n: u8) -> (u32, Vec<Output>) {
        let mut out = Vec::new();
        let relid = self.server.add_offer(spec(n), &mut out).unwrap();
        (relid, out)
    }

    /// Connects at `version` and requests offers.
    fn connect(&mut self, version: VmbusVersion) -> Vec<Output> {
        let out = self.post_on(
            version.initiate_contact_connection_id(),
            initiate(version, 0).as_bytes(),
        );
        assert_eq!(version_response(&out).version_supported, 1);
        self.post(&MessageHeader::new(MessageType::REQUEST_OFFERS))
    }

    /// Creates a GPADL on `relid` the way Linux does (header, then bodies) and returns the
    /// outputs of the last message.
    fn gpadl(&mut self, relid: u32, gpadl: u32, pfns: &[u64]) -> Vec<Output> {
        let mut last = Vec::new();
        for (i, m) in gpadl_messages(relid, gpadl, pfns).iter().enumerate() {
            last = self.post_on(MESSAGE_CONNECTION_ID, m);
            if i + 1 < gpadl_messages(relid, gpadl, pfns).len() {
                assert!(last.is_empty(), "no answer before the last body");
            }
        }
        last
    }

    fn open(&mut self, relid: u32, gpadl: u32, offset: u32) -> Vec<Output> {
        self.post(&open_msg(relid, gpadl, offset))
    }

    /// Opens `relid` on a fresh 8-page ring GPADL at pfn `first`; returns the Open output.
    fn open_ok(&mut self, relid: u32, gpadl: u32, first: u64) -> Output {
        let pfns: Vec<u64> = (first..first + 8).collect();
        assert_eq!(created(&self.gpadl(relid, gpadl, &pfns)).creation_status, 0);
        let mut out = self.open(relid, gpadl, 4);
        assert_eq!(out.len(), 1);
        let open = out.pop().unwrap();
        let mut out = Vec::new();
        self.server.open_complete(relid, true, &mut out);
        let r = only_message::<OpenResult>(&out);
        assert_eq!(
            (r.child_relid, r.open_id, r.status),
            (relid, relid + 100, 0)
        );
        open
    }
}

fn initiate(version: VmbusVersion, vp: u32) -> InitiateContact {
    let mut ic = InitiateContact {
        header: MessageHeader::new(MessageType::INITIATE_CONTACT),
        vmbus_version_requested: version.0,
        target_vcpu: vp,
        ..Default::default()
    };
    if version >= VmbusVersion::WIN10_V5 {
        ic.set_target_info(2, 0, 0);
    }
    ic
}

fn open_msg(relid: u32, gpadl: u32, offset: u32) -> OpenChannel {
    OpenChannel {
        header: MessageHeader::new(MessageType::OPEN_CHANNEL),
        child_relid: relid,
        open_id: relid + 100,
        ring_buffer_gpadl: gpadl,
        target_vp: 1,
        downstream_ring_buffer_page_offset: offset,
        user_data: [0xAB; MAX_USER_DEFINED_BYTES],
    }
}

/// A GpadlHeader message with an arbitrary range and the given page numbers in it.
fn gpadl_header(
    relid: u32,
    gpadl: u32,
    buflen: u16,
    count: u16,
    range: GpaRangeHeader,
    pfns: &[u64],
) -> Vec<u8> {
    let mut m = GpadlHeader {
        header: MessageHeader::new(MessageType::GPADL_HEADER),
        child_relid: relid,
        gpadl,
        range_buflen: buflen,
        range_count: count,
    }
    .as_bytes()
    .to_vec();
    m.extend_from_slice(range.as_bytes());
    for p in pfns {
        m.extend_from_slice(&p.to_le_bytes());
    }
    m
}

fn gpadl_body(gpadl: u32, pfns: &[u64]) -> Vec<u8> {
    let mut m = GpadlBody {
        header: MessageHeader::new(MessageType::GPADL_BODY),
        message_number: 0,
        gpadl,
    }
    .as_bytes()
    .to_vec();
    for p in pfns {
        m.extend_from_slice(&p.to_le_bytes());
    }
    m
}

/// The messages Linux's `create_gpadl_header` builds for a buffer of these pages.
fn gpadl_messages(relid: u32, gpadl: u32, pfns: &[u64]) -> Vec<Vec<u8>> {
    let range = GpaRangeHeader {
        byte_count: (pfns.len() * 4096) as u32,
        byte_offset: 0,
    };
    let first = pfns.len().min(MAX_GPADL_HEADER_PFNS);
    let buflen = (8 + 8 * pfns.len()) as u16;
    let mut msgs = vec![gpadl_header(relid, gpadl, buflen, 1, range, &pfns[..first])];
    for chunk in pfns[first..].chunks(MAX_GPADL_BODY_PFNS) {
        msgs.push(gpadl_body(gpadl, chunk));
    }
    msgs
}

fn messages(out: &[Output]) -> Vec<(u32, &[u8])> {
    out.iter()
        .filter_map(|o| match o {
            Output::Message { vp, bytes } => Some((*vp, bytes.as_slice())),
            _ => None,
        })
        .collect()
}

fn message_type(bytes: &[u8]) -> MessageType {
    MessageHeader::read_from_prefix(bytes)
        .unwrap()
        .0
        .message_type
}

fn read_msg<T: FromBytes>(bytes: &[u8]) -> T {
    T::read_from_prefix(bytes).unwrap().0
}

/// The one output, a message of type `T`.
fn only_message<T: FromBytes>(out: &[Output]) -> T {
    assert_eq!(out.len(), 1, "{out:?}");
    let m = messages(out);
    read_msg(m[0].1)
}

fn version_response(out: &[Output]) -> VersionResponse {
    let m = messages(out);
    assert_eq!(m.len(), 1);
    assert_eq!(message_type(m[0].1), MessageType::VERSION_RESPONSE);
    read_msg(m[0].1)
}

fn created(out: &[Output]) -> GpadlCreated {
    let g: GpadlCreated = only_message(out);
    assert_eq!(g.header.message_type, MessageType::GPADL_CREATED);
    g
}

#[test]
fn every_version_negotiates_on_its_connection_id_only() {
    for version in SUPPORTED_VERSIONS {
        let mut h = Harness::new();
        let right = version.initiate_contact_connection_id();
        let wrong = if right == 1 {
            MESSAGE_CONNECTION_ID_4
        } else {
            1
        };

        let out = h.post_on(wrong, initiate(version, 0).as_bytes());
        let r = version_response(&out);
        assert_eq!(r.version_supported, 0, "{version:?} on {wrong}");
        assert!(!h.server.is_connected());

        let out = h.post_on(right, initiate(version, 0).as_bytes());
        let m = messages(&out);
        let r: VersionResponse = read_msg(m[0].1);
        assert_eq!((r.version_supported, r.connection_state), (1, 0));
        if version >= VmbusVersion::WIN10_V5 {
            assert_eq!(r.msg_conn_id, 1, "later messages go to connection id 1");
        }
        let len = if version >= VmbusVersion::COPPER {
            20
        } else {
            16
        };
        assert_eq!(m[0].1.len(), len);
        assert_eq!(h.server.version(), Some(version));
    }
}

#[test]
fn unsupported_versions_are_answered_with_a_refusal() {
    for v in [
        0x1_0000,
        VmbusVersion::WIN7.0,
        VmbusVersion::WS2008.0,
        0x7_0000,
        0x5_0004,
        0,
    ] {
        for conn in [1, 4] {
            let mut h = Harness::new();
            let out = h.post_on(conn, initiate(VmbusVersion(v), 0).as_bytes());
            let r = version_response(&out);
            assert_eq!(r.version_supported, 0, "{v:#x}");
            assert!(!h.server.is_connected());
        }
    }
}

#[test]
fn messages_go_to_the_requested_vp_from_win8_1() {
    let mut h = Harness::new();
    let out = h.post_on(1, initiate(VmbusVersion::WIN8, 5).as_bytes());
    assert_eq!(messages(&out)[0].0, 0, "Win8: VP 0");
    assert_eq!(h.server.target_vp(), Some(0));

    let mut h = Harness::new();
    let out = h.post_on(4, initiate(VmbusVersion::IRON, 5).as_bytes());
    assert_eq!(messages(&out)[0].0, 5);
    assert_eq!(h.server.target_vp(), Some(5));
    let out = h.post(&MessageHeader::new(MessageType::REQUEST_OFFERS));
    assert!(messages(&out).iter().all(|(vp, _)| *vp == 5));
}

#[test]
fn messages_before_contact_or_on_other_ids_are_dropped() {
    let mut h = Harness::new();
    h.add(1);
    assert!(h
        .post(&MessageHeader::new(MessageType::REQUEST_OFFERS))
        .is_empty());
    assert!(h.post(&MessageHeader::new(MessageType::UNLOAD)).is_empty());
    h.post_on(4, initiate(VmbusVersion::IRON, 0).as_bytes());
    for conn in [0, 2, 3, 4, 0x101] {
        assert!(h
            .post_on(
                conn,
                MessageHeader::new(MessageType::REQUEST_OFFERS).as_bytes()
            )
            .is_empty());
    }
    assert_eq!(
        h.post(&MessageHeader::new(MessageType::REQUEST_OFFERS))
            .len(),
        2
    );
}

#[test]
fn offers_are_delivered_with_stable_relids_and_unique_connection_ids() {
    let mut h = Harness::new();
    for n in 1..=2 {
        let (relid, out) = h.add(n);
        assert_eq!(relid, u32::from(n));
        assert!(out.is_empty());
    }
    let mut s = spec(3);
    s.subchannel_index = 2;
    s.mmio_megabytes = 8;
    s.flags = 0x4;
    let mut out = Vec::new();
    assert!(matches!(h.server.add_offer(s.clone(), &mut out), Ok(3)));
    assert!(out.is_empty(), "no connection: nothing sent");

    let out = h.connect(VmbusVersion::IRON);
    let m = messages(&out);
    assert_eq!(m.len(), 4);
    let mut ids = Vec::new();
    for (i, (_, bytes)) in m[..3].iter().enumerate() {
        assert_eq!(bytes.len(), 196);
        let o: OfferChannel = read_msg(bytes);
        assert_eq!({ o.header }.message_type, MessageType::OFFER_CHANNEL);
        assert_eq!({ o.child_relid }, i as u32 + 1);
        assert!(!o.monitor_allocated() && o.is_dedicated_interrupt());
        assert_eq!(o.monitor_id, 0);
        let conn = o.connection_id;
        assert!(!(1..=4).contains(&conn));
        assert_eq!(Some(conn), h.server.connection_id(o.child_relid));
        ids.push(conn);
    }
    ids.dedup();
    assert_eq!(ids.len(), 3);
    let o: OfferChannel = read_msg(m[2].1);
    assert_eq!(o.offer.interface_instance, Guid([3; 16]));
    assert_eq!(
        ({ o.offer.subchannel_index }, { o.offer.mmio_megabytes }, {
            o.offer.flags
        }),
        (2, 8, 4)
    );
    assert_eq!(o.offer.user_defined, [3; 120]);
    assert_eq!(message_type(m[3].1), MessageType::ALL_OFFERS_DELIVERED);

    // Hot add: sent at once.
    let (relid, out) = h.add(4);
    assert_eq!(relid, 4);
    let o: OfferChannel = only_message(&out);
    assert_eq!({ o.child_relid }, 4);
    // A repeated RequestOffers is dropped.
    assert!(h
        .post(&MessageHeader::new(MessageType::REQUEST_OFFERS))
        .is_empty());
    assert_eq!(h.server.offers().count(), 4);
}

#[test]
fn gpadl_in_one_message() {
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::WIN10);
    let pfns = [7, 3, 9, 100];
    let g = created(&h.gpadl(1, 0xE1E10, &pfns));
    assert_eq!((g.child_relid, g.gpadl, g.creation_status), (1, 0xE1E10, 0));
    assert_eq!(h.server.gpadl_count(), 1);
    let v = h.server.gpadl(0xE1E10).unwrap();
    assert_eq!((v.relid, v.byte_offset, v.byte_count), (1, 0, 4 * 4096));
    assert_eq!(v.pfns, &pfns);
    assert_eq!(h.server.gpadl_bytes(), 4 * 4096);
}

#[test]
fn large_gpadl_over_many_body_messages() {
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::IRON);
    let pfns: Vec<u64> = (0..1000).map(|i| (i * 7) % MEM_PAGES).collect();
    assert!(gpadl_messages(1, 5, &pfns).len() > 30);
    let g = created(&h.gpadl(1, 5, &pfns));
    assert_eq!((g.child_relid, g.gpadl, g.creation_status), (1, 5, 0));
    assert_eq!(h.server.gpadl(5).unwrap().pfns, pfns.as_slice());
    assert_eq!(h.server.pending_gpadl_count(), 0);
}

#[test]
fn padded_messages_carry_only_what_is_due() {
    // Senders that always post 240 bytes (UEFI) still describe their GPADL right.
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::IRON);
    let pfns: Vec<u64> = (10..40).collect();
    let msgs = gpadl_messages(1, 5, &pfns);
    assert_eq!(msgs.len(), 2);
    let mut header = msgs[0].clone();
    header.resize(240, 0);
    assert!(h.post_on(1, &header).is_empty());
    let mut body = msgs[1].clone();
    body.resize(240, 0xFF);
    assert_eq!(created(&h.post_on(1, &body)).creation_status, 0);
    assert_eq!(h.server.gpadl(5).unwrap().pfns, pfns.as_slice());
}

#[test]
fn gpadl_outside_guest_memory_fails() {
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::IRON);
    let mut pfns: Vec<u64> = (0..60).collect();
    pfns[45] = MEM_PAGES;
    let g = created(&h.gpadl(1, 5, &pfns));
    assert_ne!(g.creation_status, 0);
    assert_eq!((g.child_relid, g.gpadl), (1, 5));
    assert_eq!(h.server.gpadl_count(), 0);
    assert_eq!(h.server.gpadl_bytes(), 0);
    let g = created(&h.gpadl(1, 6, &[u64::MAX]));
    assert_ne!(g.creation_status, 0);
}

#[test]
fn malformed_gpadl_headers_fail_at_once() {
    let mut h = Harness::with_config(ServerConfig {
        max_gpadl_bytes: 256 << 10,
        ..ServerConfig::default()
    });
    h.add(1);
    h.connect(VmbusVersion::IRON);
    let range = |pages: u32| GpaRangeHeader {
        byte_count: pages * 4096,
        byte_offset: 0,
    };
    // Beyond the cap: refused from the header, nothing kept or reserved.
    let big = gpadl_header(1, 1, 8 + 8 * 8000, 1, range(8000), &[1; 26]);
    let g = created(&h.post_on(1, &big));
    assert_eq!(g.creation_status, status::INSUFFICIENT_RESOURCES);
    assert_eq!(
        (h.server.pending_gpadl_count(), h.server.gpadl_bytes()),
        (0, 0)
    );
    // Its bodies then belong to no GPADL.
    assert!(h.post_on(1, &gpadl_body(1, &[1; 28])).is_empty());
    // A huge byte count with a u16 range_buflen cannot match.
    let huge = GpaRangeHeader {
        byte_count: u32::MAX,
        byte_offset: u32::MAX,
    };
    assert_ne!(
        created(&h.post_on(1, &gpadl_header(1, 2, 0xFFF8, 1, huge, &[]))).creation_status,
        0
    );
    // range_buflen disagreeing with the range.
    assert_ne!(
        created(&h.post_on(1, &gpadl_header(1, 3, 32, 1, range(2), &[1, 2]))).creation_status,
        0
    );
    // Two ranges, zero ranges, an empty range.
    assert_ne!(
        created(&h.post_on(1, &gpadl_header(1, 4, 16, 2, range(1), &[1]))).creation_status,
        0
    );
    assert_ne!(
        created(&h.post_on(1, &gpadl_header(1, 4, 16, 0, range(1), &[1]))).creation_status,
        0
    );
    assert_ne!(
        created(&h.post_on(1, &gpadl_header(1, 4, 8, 1, range(0), &[]))).creation_status,
        0
    );
    // No range header at all.
    let mut bare = gpadl_header(1, 4, 16, 1, range(1), &[]);
    bare.truncate(20);
    assert_ne!(created(&h.post_on(1, &bare)).creation_status, 0);
    // An unknown channel.
    let g = created(&h.gpadl(9, 4, &[1]));
    assert_eq!((g.child_relid, g.gpadl), (9, 4));
    assert_ne!(g.creation_status, 0);
    // A GPADL id in use, complete or in progress.
    assert_eq!(created(&h.gpadl(1, 4, &[1])).creation_status, 0);
    assert_ne!(created(&h.gpadl(1, 4, &[2])).creation_status, 0);
    let msgs = gpadl_messages(1, 8, &(0..40).collect::<Vec<_>>());
    assert!(h.post_on(1, &msgs[0]).is_empty());
    assert_ne!(
        created(&h.post_on(1, &gpadl_messages(1, 8, &[1])[0])).creation_status,
        0
    );
    assert_eq!(created(&h.post_on(1, &msgs[1])).creation_status, 0);
    // A page with a byte offset is fine for a GPADL.
    let odd = GpaRangeHeader {
        byte_count: 4096,
        byte_offset: 100,
    };
    assert_eq!(
        created(&h.post_on(1, &gpadl_header(1, 10, 24, 1, odd, &[3, 4]))).creation_status,
        0
    );
    assert_eq!(h.server.gpadl(10).unwrap().pfns, &[3, 4]);
}

#[test]
fn pending_gpadls_are_bounded() {
    let mut h = Harness::with_config(ServerConfig {
        max_pending_gpadls: 2,
        max_gpadls: 4,
        ..ServerConfig::default()
    });
    h.add(1);
    h.connect(VmbusVersion::IRON);
    let pfns: Vec<u64> = (0..40).collect();
    for id in 0..2 {
        assert!(h.post_on(1, &gpadl_messages(1, id, &pfns)[0]).is_empty());
    }
    let g = created(&h.post_on(1, &gpadl_messages(1, 2, &pfns)[0]));
    assert_eq!(g.creation_status, status::INSUFFICIENT_RESOURCES);
    // One that needs no body is still fine, up to the total count.
    assert_eq!(created(&h.gpadl(1, 3, &[1])).creation_status, 0);
    assert_eq!(created(&h.gpadl(1, 4, &[1])).creation_status, 0);
    assert_ne!(created(&h.gpadl(1, 5, &[1])).creation_status, 0);
    assert_eq!(
        (h.server.pending_gpadl_count(), h.server.gpadl_count()),
        (2, 2)
    );
    // Tearing down one in progress answers at once.
    let out = h.post(&GpadlTeardown {
        header: MessageHeader::new(MessageType::GPADL_TEARDOWN),
        child_relid: 1,
        gpadl: 0,
    });
    let t: GpadlTorndown = only_message(&out);
    assert_eq!(t.gpadl, 0);
    assert_eq!(h.server.pending_gpadl_count(), 1);
}

#[test]
fn open_maps_the_ring_and_reports_the_result() {
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::IRON);
    // Scattered pages: the mapping must follow the GPADL's order.
    let pfns: Vec<u64> = vec![40, 41, 90, 91, 92, 20, 21, 22];
    assert_eq!(created(&h.gpadl(1, 7, &pfns)).creation_status, 0);
    let out = h.open(1, 7, 3);
    let [Output::Open {
        relid,
        connection_id,
        target_vp,
        interface_type,
        interface_instance,
        subchannel_index,
        ring,
        downstream_offset,
        ring_pages,
        user_data,
    }] = out.as_slice()
    else {
        panic!("{out:?}");
    };
    assert_eq!(
        (*relid, *target_vp, *downstream_offset, *ring_pages),
        (1, 1, 3, 8)
    );
    assert_eq!(Some(*connection_id), h.server.connection_id(1));
    assert_eq!(
        (*interface_type, *interface_instance),
        (Guid::SCSI, Guid([1; 16]))
    );
    assert_eq!(*subchannel_index, 0);
    assert_eq!(user_data, &[0xAB; 120]);
    assert_eq!(ring.len(), 8 * 4096);
    assert_eq!(h.server.channel_state(1), Some(ChannelState::Opening));

    // Bytes the guest writes at those pages are what the mapping sees.
    h.mem.write(91 * 4096 + 10, b"ring data").unwrap();
    let mut b = [0u8; 9];
    ring.read(3 * 4096 + 10, &mut b).unwrap();
    assert_eq!(&b, b"ring data");
    // And both rings can be built over it: the guest writes a packet into its ring
    // (guest-to-host, pages 0..3), the host reads it.
    let up = Ring::new(ring.clone(), 0, 3 * 4096).unwrap();
    let down = Ring::new(ring.clone(), 3 * 4096, 5 * 4096).unwrap();
    up.init().unwrap();
    down.init().unwrap();
    let packet = {
        // An in-band packet of 8 payload bytes, written through guest memory at pfn 41
        // (the up ring's first data page).
        let mut p = Vec::new();
        p.extend_from_slice(&6u16.to_le_bytes()); // in-band
        p.extend_from_slice(&2u16.to_le_bytes()); // data offset: 16 bytes
        p.extend_from_slice(&3u16.to_le_bytes()); // length: 24 bytes
        p.extend_from_slice(&0u16.to_le_bytes());
        p.extend_from_slice(&42u64.to_le_bytes());
        p.extend_from_slice(b"payload!");
        p.extend_from_slice(&0u64.to_le_bytes()); // trailer: start offset 0
        p
    };
    h.mem.write(41 * 4096, &packet).unwrap();
    h.mem
        .write(40 * 4096, &(packet.len() as u32).to_le_bytes())
        .unwrap();
    let mut incoming = IncomingRing::new(up).unwrap();
    let p = incoming.read().unwrap().expect("a packet");
    assert_eq!(p.transaction_id, 42);
    assert!(matches!(p.kind, PacketKind::InBand));
    assert_eq!(p.payload, b"payload!");
    OutgoingRing::new(down).unwrap();

    let mut out = Vec::new();
    h.server.open_complete(1, true, &mut out);
    let r: OpenResult = only_message(&out);
    assert_eq!((r.child_relid, r.open_id, r.status), (1, 101, 0));
    assert_eq!(h.server.channel_state(1), Some(ChannelState::Open));
    assert_eq!(h.server.open_channels().collect::<Vec<_>>(), [1]);
    // A second completion is ignored.
    let mut out = Vec::new();
    h.server.open_complete(1, true, &mut out);
    assert!(out.is_empty());
}

#[test]
fn bad_opens_fail_with_a_status() {
    let mut h = Harness::new();
    h.add(1);
    h.add(2);
    h.connect(VmbusVersion::IRON);
    let pfns: Vec<u64> = (16..24).collect();
    assert_eq!(created(&h.gpadl(1, 7, &pfns)).creation_status, 0);
    assert_eq!(created(&h.gpadl(2, 8, &pfns)).creation_status, 0);
    let fails = |h: &mut Harness, relid, gpadl, offset| {
        let r: OpenResult = only_message(&h.open(relid, gpadl, offset));
        assert_eq!(r.header.message_type, MessageType::OPEN_CHANNEL_RESULT);
        assert_eq!((r.child_relid, r.open_id), (relid, relid + 100));
        assert_ne!(r.status, 0);
    };
    fails(&mut h, 99, 7, 4); // no such channel
    fails(&mut h, 1, 99, 4); // no such GPADL
    fails(&mut h, 1, 8, 4); // another channel's GPADL
    fails(&mut h, 1, 7, 1); // the guest-to-host ring has no data page
    fails(&mut h, 1, 7, 0);
    fails(&mut h, 1, 7, 7); // the host-to-guest ring has no data page
    fails(&mut h, 1, 7, 8);
    fails(&mut h, 1, 7, 9);
    fails(&mut h, 1, 7, u32::MAX);
    assert_eq!(h.server.channel_state(1), Some(ChannelState::Closed));
    // Opening twice.
    assert!(matches!(h.open(1, 7, 4).as_slice(), [Output::Open { .. }]));
    fails(&mut h, 1, 7, 4);
    // A device that fails to start fails the open.
    let mut out = Vec::new();
    h.server.open_complete(1, false, &mut out);
    let r: OpenResult = only_message(&out);
    assert_ne!(r.status, 0);
    assert_eq!(h.server.channel_state(1), Some(ChannelState::Closed));
    // A ring GPADL with a byte offset is refused.
    let odd = GpaRangeHeader {
        byte_count: 8 * 4096,
        byte_offset: 8,
    };
    let m = gpadl_header(2, 9, 8 + 8 * 9, 1, odd, &(30..39).collect::<Vec<_>>());
    assert_eq!(created(&h.post_on(1, &m)).creation_status, 0);
    fails(&mut h, 2, 9, 4);
}

#[test]
fn close_and_teardown() {
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::IRON);
    h.open_ok(1, 7, 16);
    assert_eq!(created(&h.gpadl(1, 8, &[50, 51])).creation_status, 0);
    let teardown = |gpadl| GpadlTeardown {
        header: MessageHeader::new(MessageType::GPADL_TEARDOWN),
        child_relid: 1,
        gpadl,
    };
    // A buffer GPADL goes at once.
    let t: GpadlTorndown = only_message(&h.post(&teardown(8)));
    assert_eq!(
        (t.header.message_type, t.gpadl),
        (MessageType::GPADL_TORNDOWN, 8)
    );
    // The ring of the open channel waits for the close.
    assert!(h.post(&teardown(7)).is_empty());
    assert_eq!(h.server.gpadl_count(), 1);
    let out = h.post(&CloseChannel {
        header: MessageHeader::new(MessageType::CLOSE_CHANNEL),
        child_relid: 1,
    });
    assert!(matches!(out[0], Output::Close { relid: 1 }));
    let t: GpadlTorndown = read_msg(messages(&out)[0].1);
    assert_eq!(t.gpadl, 7);
    assert_eq!(out.len(), 2);
    assert_eq!(h.server.gpadl_count(), 0);
    assert_eq!(h.server.channel_state(1), Some(ChannelState::Closed));
    // Closing again, or tearing down an unknown GPADL: nothing.
    assert!(h
        .post(&CloseChannel {
            header: MessageHeader::new(MessageType::CLOSE_CHANNEL),
            child_relid: 1,
        })
        .is_empty());
    assert!(h.post(&teardown(7)).is_empty());
    // Reopen after close, the usual Linux order: close, teardown, new GPADL, open.
    h.open_ok(1, 9, 30);
}

#[test]
fn rescind_and_release() {
    let mut h = Harness::new();
    h.add(1);
    h.add(2);
    h.connect(VmbusVersion::IRON);
    h.open_ok(1, 7, 16);
    let mut out = Vec::new();
    h.server.rescind(1, &mut out).unwrap();
    assert!(matches!(out[0], Output::Close { relid: 1 }));
    let r: RescindChannelOffer = read_msg(messages(&out)[0].1);
    assert_eq!(
        (r.header.message_type, r.child_relid),
        (MessageType::RESCIND_CHANNEL_OFFER, 1)
    );
    assert_eq!(out.len(), 2);
    assert_eq!(h.server.channel_state(1), Some(ChannelState::Rescinded));
    assert!(matches!(
        h.server.rescind(1, &mut out),
        Err(Error::AlreadyRescinded(1))
    ));
    // The guest may still tear down the rescinded channel's GPADLs.
    let out = h.post(&GpadlTeardown {
        header: MessageHeader::new(MessageType::GPADL_TEARDOWN),
        child_relid: 1,
        gpadl: 7,
    });
    assert_eq!(messages(&out).len(), 1);
    // ...but not open it.
    let r: OpenResult = only_message(&h.open(1, 7, 4));
    assert_ne!(r.status, 0);
    assert!(h
        .post(&RelIdReleased {
            header: MessageHeader::new(MessageType::RELID_RELEASED),
            child_relid: 1,
        })
        .is_empty());
    assert_eq!(h.server.channel_state(1), None);
    assert!(matches!(
        h.server.rescind(1, &mut Vec::new()),
        Err(Error::UnknownRelid(1))
    ));
    assert!(matches!(
        h.server.rescind(77, &mut Vec::new()),
        Err(Error::UnknownRelid(77))
    ));
    // Relids are not reused while fresh ones remain.
    assert_eq!(h.add(3).0, 3);
    // RelIdReleased of a live channel does not free it.
    h.post(&RelIdReleased {
        header: MessageHeader::new(MessageType::RELID_RELEASED),
        child_relid: 77,
    });
    assert_eq!(h.server.channel_state(2), Some(ChannelState::Closed));
}

#[test]
fn rescind_of_an_offer_the_guest_never_saw_is_immediate() {
    let mut h = Harness::new();
    h.add(1);
    let mut out = Vec::new();
    h.server.rescind(1, &mut out).unwrap();
    assert!(out.is_empty());
    assert_eq!(h.server.offers().count(), 0);
}

#[test]
fn relids_stay_below_the_event_flag_limit() {
    let mut h = Harness::new();
    for i in 1..RELID_LIMIT {
        assert!(matches!(h.server.add_offer(spec(0), &mut Vec::new()), Ok(v) if v == i));
    }
    assert!(matches!(
        h.server.add_offer(spec(0), &mut Vec::new()),
        Err(Error::TooManyOffers)
    ));
    h.server.rescind(5, &mut Vec::new()).unwrap();
    h.server.rescind(3, &mut Vec::new()).unwrap();
    assert!(matches!(
        h.server.add_offer(spec(0), &mut Vec::new()),
        Ok(3)
    ));
    assert!(matches!(
        h.server.add_offer(spec(0), &mut Vec::new()),
        Ok(5)
    ));
    assert_eq!(
        h.server.connection_id(RELID_LIMIT - 1),
        Some(CHANNEL_CONNECTION_ID_BASE + RELID_LIMIT - 1)
    );
}

#[test]
fn unload_closes_everything_and_reconnect_works() {
    let mut h = Harness::new();
    h.add(1);
    h.add(2);
    h.add(3);
    h.connect(VmbusVersion::WIN10_RS5);
    h.open_ok(1, 7, 16);
    h.open_ok(3, 8, 32);
    assert_eq!(created(&h.gpadl(2, 9, &[5])).creation_status, 0);
    let mut out = Vec::new();
    h.server.rescind(2, &mut out).unwrap();
    let out = h.post(&MessageHeader::new(MessageType::UNLOAD));
    assert!(matches!(out[0], Output::Close { relid: 1 }));
    assert!(matches!(out[1], Output::Close { relid: 3 }));
    assert_eq!(out.len(), 3);
    assert_eq!(
        message_type(messages(&out)[0].1),
        MessageType::UNLOAD_RESPONSE
    );
    assert!(!h.server.is_connected());
    assert_eq!(h.server.gpadl_count(), 0);
    assert_eq!(h.server.open_channels().count(), 0);
    // The rescinded offer is gone with the connection; the others stay.
    assert_eq!(
        h.server.offers().map(|(r, _)| r).collect::<Vec<_>>(),
        [1, 3]
    );
    // Messages of the old connection are dropped.
    assert!(h.open(1, 7, 4).is_empty());

    let out = h.connect(VmbusVersion::IRON);
    assert_eq!(messages(&out).len(), 3);
    h.open_ok(1, 7, 16);
}

#[test]
fn a_new_initiate_contact_replaces_the_connection() {
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::IRON);
    h.open_ok(1, 7, 16);
    let out = h.post_on(4, initiate(VmbusVersion::IRON, 2).as_bytes());
    assert!(matches!(out[0], Output::Close { relid: 1 }));
    let r: VersionResponse = read_msg(messages(&out)[0].1);
    assert_eq!(r.version_supported, 1);
    assert_eq!(h.server.gpadl_count(), 0);
    assert_eq!(h.server.target_vp(), Some(2));
    // A refused one leaves the guest disconnected.
    let out = h.post_on(1, initiate(VmbusVersion::IRON, 0).as_bytes());
    assert_eq!(version_response(&out).version_supported, 0);
    assert!(!h.server.is_connected());
}

#[test]
fn reset_is_a_silent_unload() {
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::IRON);
    h.open_ok(1, 7, 16);
    let mut out = Vec::new();
    h.server.reset(&mut out);
    assert!(matches!(out.as_slice(), [Output::Close { relid: 1 }]));
    assert!(!h.server.is_connected());
    assert_eq!(h.server.gpadl_count(), 0);
}

#[test]
fn close_or_rescind_while_opening() {
    let mut h = Harness::new();
    h.add(1);
    h.add(2);
    h.connect(VmbusVersion::IRON);
    assert_eq!(
        created(&h.gpadl(1, 7, &(16..24).collect::<Vec<_>>())).creation_status,
        0
    );
    assert_eq!(
        created(&h.gpadl(2, 8, &(16..24).collect::<Vec<_>>())).creation_status,
        0
    );
    h.open(1, 7, 4);
    h.open(2, 8, 4);
    let out = h.post(&CloseChannel {
        header: MessageHeader::new(MessageType::CLOSE_CHANNEL),
        child_relid: 1,
    });
    assert!(matches!(out.as_slice(), [Output::Close { relid: 1 }]));
    let mut out = Vec::new();
    h.server.rescind(2, &mut out).unwrap();
    assert!(matches!(out[0], Output::Close { relid: 2 }));
    // The late completions are ignored.
    let mut out = Vec::new();
    h.server.open_complete(1, true, &mut out);
    h.server.open_complete(2, true, &mut out);
    assert!(out.is_empty());
}

#[test]
fn modify_channel() {
    let modify = |relid| ModifyChannel {
        header: MessageHeader::new(MessageType::MODIFY_CHANNEL),
        child_relid: relid,
        target_vp: 3,
    };
    // 5.3: retarget, then the answer.
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::IRON);
    h.open_ok(1, 7, 16);
    let out = h.post(&modify(1));
    assert!(matches!(
        out[0],
        Output::Retarget {
            relid: 1,
            target_vp: 3
        }
    ));
    let r: ModifyChannelResponse = read_msg(messages(&out)[0].1);
    assert_eq!(r.header.message_type, MessageType::MODIFY_CHANNEL_RESPONSE);
    assert_eq!((r.child_relid, r.status), (1, 0));
    // Not open: a failure, still answered (the guest waits for it).
    let r: ModifyChannelResponse = only_message(&h.post(&modify(9)));
    assert_ne!(r.status, 0);

    // 4.1 to 5.2: no answer.
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::WIN10_RS5);
    h.open_ok(1, 7, 16);
    let out = h.post(&modify(1));
    assert!(matches!(
        out.as_slice(),
        [Output::Retarget {
            relid: 1,
            target_vp: 3
        }]
    ));
    assert!(h.post(&modify(9)).is_empty());

    // Before 4.1 the message does not exist.
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::WIN10);
    h.open_ok(1, 7, 16);
    assert!(h.post(&modify(1)).is_empty());
}

#[test]
fn short_and_unknown_messages_are_dropped() {
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::IRON);
    for t in 0..40u32 {
        let m = MessageHeader::new(MessageType(t));
        let out = h.post_on(1, m.as_bytes());
        // Only header-only requests may answer.
        if !out.is_empty() {
            assert!(matches!(t, 16), "type {t}: {out:?}");
            h.connect(VmbusVersion::IRON);
        }
    }
    assert!(h.post_on(1, &[]).is_empty());
    assert!(h.post_on(1, &[0; 241]).is_empty());
    assert!(h
        .post_on(4, &initiate(VmbusVersion::IRON, 0).as_bytes()[..39])
        .is_empty());
}

fn connected_harness() -> Harness {
    let mut h = Harness::new();
    h.add(1);
    h.add(2);
    h.connect(VmbusVersion::IRON);
    h.open_ok(1, 7, 16);
    h
}

proptest! {
    #[test]
    fn arbitrary_messages_never_panic(
        msgs in proptest::collection::vec(
            (prop_oneof![4 => Just(1u32), 1 => Just(4u32), 1 => any::<u32>()],
             0u32..30,
             proptest::option::of((0u32..4, 0u32..10)),
             proptest::collection::vec(any::<u8>(), 0..260)),
            1..24)
    ) {
        let mut h = connected_harness();
        for (conn, t, ids, tail) in msgs {
            let mut bytes = MessageHeader::new(MessageType(t)).as_bytes().to_vec();
            bytes.extend_from_slice(&tail);
            // Mostly plausible relids and GPADL ids (bytes 8, 12 and 16 of most messages),
            // so the handlers get past their first checks.
            if let Some((relid, gpadl)) = ids {
                for (at, v) in [(8, relid), (12, gpadl), (16, gpadl)] {
                    if let Some(b) = bytes.get_mut(at..at + 4) {
                        b.copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
            let out = h.post_on(conn, &bytes);
            let mut late = Vec::new();
            for o in &out {
                if let Output::Open { relid, .. } = o {
                    h.server.open_complete(*relid, tail.first().is_some_and(|b| b & 1 == 0), &mut late);
                }
            }
            for o in late.iter().chain(&out) {
                if let Output::Message { bytes, .. } = o {
                    prop_assert!(bytes.len() <= MAX_MESSAGE_SIZE);
                }
            }
            prop_assert!(h.server.gpadl_bytes() <= ServerConfig::default().max_total_gpadl_bytes);
            prop_assert!(h.server.pending_gpadl_count() <= ServerConfig::default().max_pending_gpadls);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        msgs in proptest::collection::vec(
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300)), 1..16)
    ) {
        let mut h = connected_harness();
        for (conn, bytes) in msgs {
            for o in h.post_on(conn % 6, &bytes) {
                if let Output::Message { bytes, .. } = o {
                    prop_assert!(bytes.len() <= MAX_MESSAGE_SIZE);
                }
            }
        }
    }
}

/// The relids of the OfferChannel messages in `out`, with their subchannel indexes.
fn offered(out: &[Output]) -> Vec<(u32, u16)> {
    messages(out)
        .iter()
        .filter(|(_, b)| message_type(b) == MessageType::OFFER_CHANNEL)
        .map(|(_, b)| {
            let o: OfferChannel = read_msg(b);
            (o.child_relid, o.offer.subchannel_index)
        })
        .collect()
}

#[test]
fn subchannel_requests_are_coalesced_capped_and_need_an_open_primary() {
    let mut h = Harness::with_config(ServerConfig {
        max_subchannels: 3,
        ..ServerConfig::default()
    });
    h.add(1);
    h.add(2);
    h.connect(VmbusVersion::IRON);
    let mut out = Vec::new();
    // The primary is not open: nothing.
    assert_eq!(
        h.server.request_subchannels(Guid([1; 16]), 2, &mut out),
        None
    );
    assert!(out.is_empty());
    h.open_ok(1, 7, 16);
    assert_eq!(
        h.server.request_subchannels(Guid([1; 16]), 2, &mut out),
        Some(2)
    );
    assert_eq!(offered(&out), [(3, 1), (4, 2)]);
    // A flood of the same request, or smaller ones, adds nothing.
    out.clear();
    for _ in 0..100_000 {
        h.server.request_subchannels(Guid([1; 16]), 2, &mut out);
        h.server.request_subchannels(Guid([1; 16]), 1, &mut out);
    }
    assert!(out.is_empty());
    // More than the limit: cut to it.
    assert_eq!(
        h.server
            .request_subchannels(Guid([1; 16]), u16::MAX, &mut out),
        Some(3)
    );
    assert_eq!(offered(&out), [(5, 3)]);
    assert_eq!(h.server.offers().count(), 5);
    // Another device's instance is not touched; an unknown instance does nothing.
    assert_eq!(
        h.server.request_subchannels(Guid([9; 16]), 2, &mut out),
        None
    );
}

#[test]
fn closing_a_primary_rescinds_its_subchannels_and_hot_remove_takes_both() {
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::IRON);
    h.open_ok(1, 7, 16);
    let mut out = Vec::new();
    h.server.request_subchannels(Guid([1; 16]), 2, &mut out);
    // Open subchannel 2 (relid 2), then close the primary.
    h.open_ok(2, 8, 40);
    let out = h.post(&CloseChannel {
        header: MessageHeader::new(MessageType::CLOSE_CHANNEL),
        child_relid: 1,
    });
    let closes: Vec<u32> = out
        .iter()
        .filter_map(|o| match o {
            Output::Close { relid } => Some(*relid),
            _ => None,
        })
        .collect();
    assert_eq!(closes, [1, 2], "the primary, then the open subchannel");
    let rescinded: Vec<u32> = messages(&out)
        .iter()
        .filter(|(_, b)| message_type(b) == MessageType::RESCIND_CHANNEL_OFFER)
        .map(|(_, b)| read_msg::<RescindChannelOffer>(b).child_relid)
        .collect();
    assert_eq!(rescinded, [2, 3]);
    // Hot removal of the device with subchannels open: subchannels first, then the primary.
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::IRON);
    h.open_ok(1, 7, 16);
    let mut out = Vec::new();
    h.server.request_subchannels(Guid([1; 16]), 1, &mut out);
    let mut out = Vec::new();
    h.server.rescind_instance(Guid([1; 16]), &mut out);
    let rescinded: Vec<u32> = messages(&out)
        .iter()
        .filter(|(_, b)| message_type(b) == MessageType::RESCIND_CHANNEL_OFFER)
        .map(|(_, b)| read_msg::<RescindChannelOffer>(b).child_relid)
        .collect();
    assert_eq!(rescinded, [2, 1]);
    // Unload forgets subchannels: a reconnecting guest sees only the primary.
    let mut h = Harness::new();
    h.add(1);
    h.connect(VmbusVersion::IRON);
    h.open_ok(1, 7, 16);
    let mut out = Vec::new();
    h.server.request_subchannels(Guid([1; 16]), 2, &mut out);
    h.post(&MessageHeader::new(MessageType::UNLOAD));
    assert_eq!(offered(&h.connect(VmbusVersion::IRON)), [(1, 0)]);
}

#[test]
fn vps_the_partition_lacks_are_refused() {
    let mut h = Harness::new();
    h.server.set_vp_count(2);
    h.add(1);
    // InitiateContact naming VP 7: refused, answered on VP 0.
    let out = h.post_on(1, initiate(VmbusVersion::IRON, 7).as_bytes());
    assert_eq!(messages(&out)[0].0, 0);
    assert_eq!(version_response(&out).version_supported, 0);
    assert!(!h.server.is_connected());
    h.connect(VmbusVersion::IRON);
    // OpenChannel naming VP 2.
    let pfns: Vec<u64> = (16..24).collect();
    assert_eq!(created(&h.gpadl(1, 7, &pfns)).creation_status, 0);
    let mut o = open_msg(1, 7, 4);
    o.target_vp = 2;
    let r: OpenResult = only_message(&h.post(&o));
    assert_eq!(r.status, status::INVALID_PARAMETER);
    // ModifyChannel to VP 5 of an open channel: refused, no retarget.
    o.target_vp = 1;
    assert_eq!(h.post(&o).len(), 1);
    h.server.open_complete(1, true, &mut Vec::new());
    let out = h.post(&ModifyChannel {
        header: MessageHeader::new(MessageType::MODIFY_CHANNEL),
        child_relid: 1,
        target_vp: 5,
    });
    let r: ModifyChannelResponse = only_message(&out);
    assert_eq!(r.status, status::INVALID_PARAMETER);
}

#[test]
fn open_channels_are_capped() {
    let mut h = Harness::with_config(ServerConfig {
        max_open_channels: 1,
        ..ServerConfig::default()
    });
    h.add(1);
    h.add(2);
    h.connect(VmbusVersion::IRON);
    h.open_ok(1, 7, 16);
    let pfns: Vec<u64> = (40..48).collect();
    assert_eq!(created(&h.gpadl(2, 8, &pfns)).creation_status, 0);
    let r: OpenResult = only_message(&h.open(2, 8, 4));
    assert_eq!(r.status, status::INSUFFICIENT_RESOURCES);
}
