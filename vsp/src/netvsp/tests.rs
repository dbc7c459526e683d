//! netvsp over real rings: a guest that speaks as Linux 6.1, and hostile ones. The backend is
//! the in-memory stand-in here; `tap_tests` below runs a real TAP in a network namespace.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use netdev::VirtioNetHdr;
use vmbus_proto::netvsp::{
    NvspInit, NvspInitComplete, NvspMessageType, NvspStatus, NvspSubchannelOperation, NvspVersion,
    SendReceiveBuffer, SendReceiveBufferComplete, SendRndisPacketComplete, SendSendBuffer,
    SendSendBufferComplete, SubchannelComplete, SubchannelRequest, LINUX_RECEIVE_BUFFER_ID,
};
use vmbus_proto::rndis::{
    NdisObjectHeader, NdisRecvScaleParam, Oid, PpiType, RndisMessageType, RndisStatus,
};
use zerocopy::IntoBytes;

use super::harness::guest::*;
use super::harness::{Harness, Received, Sent, StandIn};
use super::*;

fn settings(queues: u16) -> NicSettings {
    NicSettings {
        tap: "standin".into(),
        mac: [2, 0, 0, 0, 0, 0x10],
        mtu: 1500,
        vlan: None,
        queues,
    }
}

/// A NIC on stand-in queues, and those queues.
fn standin_nic(queues: u16) -> (Arc<Nic>, Vec<StandIn>) {
    let qs: Vec<StandIn> = (0..queues).map(|_| StandIn::default()).collect();
    let nic = Nic::with_queues(
        &settings(queues),
        qs.iter()
            .map(|q| Box::new(q.clone()) as Box<dyn NetQueue>)
            .collect(),
        None,
    );
    (nic, qs)
}

fn harness(nic: &Arc<Nic>) -> Harness {
    Harness::new(nic.clone(), MEM_BYTES, None).unwrap()
}

/// An Ethernet frame to `dst` of `len` bytes.
fn frame(dst: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[2, 0, 0, 0, 0, 0x99, 0x88, 0xb5]);
    f.resize(len, 0);
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    f
}

/// OID_GEN_RECEIVE_SCALE_PARAMETERS' body: `flags`, `hash_info`, a 128-entry indirection
/// table (`entry(i)`) and a 40-byte key.
fn rss_parameters(
    flags: u16,
    hash_info: u32,
    entry: impl Fn(u32) -> u32,
    key: &[u8; 40],
) -> Vec<u8> {
    let p = NdisRecvScaleParam {
        header: NdisObjectHeader {
            object_type: 0x89,
            revision: 2,
            size: 40,
        },
        flags,
        hash_info,
        indirection_table_size: 128 * 4,
        indirection_table_offset: 40,
        hash_key_size: 40,
        hash_key_offset: 40 + 512,
        ..Default::default()
    };
    let mut v = p.as_bytes().to_vec();
    for i in 0..128u32 {
        v.extend_from_slice(&entry(i).to_le_bytes());
    }
    v.extend_from_slice(key);
    v
}

fn status_of(h: &mut Harness, tx: u64) -> NvspStatus {
    completion(h, tx)
        .map(|m| m.body::<SendRndisPacketComplete>().status)
        .unwrap_or(NvspStatus(999))
}

#[test]
fn every_linux_version_completes_the_handshake() {
    for v in vmbus_proto::netvsp::LINUX_6_1_VERSIONS {
        let (nic, _) = standin_nic(1);
        let mut h = harness(&nic);
        let hs = handshake(&mut h, v, 0)
            .unwrap()
            .unwrap_or_else(|| panic!("handshake at {v:?}"));
        assert_eq!(hs.mac, nic.settings.mac);
        let s = hs.recv.sections[0];
        assert_eq!(s.sub_alloc_size, receive_section_size(1500));
        assert_eq!(s.num_sub_allocs, RECV_LEN / s.sub_alloc_size);
        assert_eq!(hs.send_section_size, SEND_SECTION_SIZE);
        assert_eq!(nic.stats.bad_nvsp.load(Ordering::Relaxed), 0, "{v:?}");
        assert_eq!(nic.stats.bad_rndis.load(Ordering::Relaxed), 0, "{v:?}");
    }
}

#[test]
fn other_versions_and_ranges_are_answered() {
    let (nic, _) = standin_nic(1);
    let mut h = harness(&nic);
    for (tx, min, max, want) in [
        (1, 0x30000, 0x30000, None),
        (2, 0x70000, 0x70000, None),
        (3, 0, 1, None),
        (4, 2, 0x60001, Some(NvspVersion::V61)),
        (5, 0x40000, 0x50001, Some(NvspVersion::V5)),
    ] {
        h.send(
            tx,
            &nvsp(
                NvspMessageType::INIT,
                &NvspInit {
                    min_protocol_version: NvspVersion(min),
                    max_protocol_version: NvspVersion(max),
                },
            ),
            Sent::InBand,
        )
        .unwrap();
        let c: NvspInitComplete = completion(&mut h, tx).unwrap().body();
        match want {
            Some(v) => assert_eq!(
                (c.status, c.negotiated_protocol_version),
                (NvspStatus::SUCCESS, v)
            ),
            None => assert_eq!(c.status, NvspStatus::FAIL, "{min:#x}..{max:#x}"),
        }
    }
}

#[test]
fn nvsp_before_init_and_bad_buffers_fail() {
    let (nic, _) = standin_nic(2);
    let mut h = harness(&nic);
    h.add_gpadl(RECV_GPADL, RECV_GPA, RECV_LEN);
    h.add_gpadl(SEND_GPADL, SEND_GPA, SEND_LEN);
    let recv = |g| {
        nvsp(
            NvspMessageType::SEND_RECEIVE_BUFFER,
            &SendReceiveBuffer {
                gpadl_handle: g,
                id: LINUX_RECEIVE_BUFFER_ID,
            },
        )
    };
    let send = |g| {
        nvsp(
            NvspMessageType::SEND_SEND_BUFFER,
            &SendSendBuffer {
                gpadl_handle: g,
                id: 0,
            },
        )
    };
    let recv_status = |h: &mut Harness, tx| {
        completion(h, tx)
            .unwrap()
            .body::<SendReceiveBufferComplete>()
            .status
    };
    // Before INIT.
    h.send(1, &recv(RECV_GPADL), Sent::InBand).unwrap();
    assert_eq!(recv_status(&mut h, 1), NvspStatus::FAIL);
    h.send(2, &send(SEND_GPADL), Sent::InBand).unwrap();
    assert_eq!(
        completion(&mut h, 2)
            .unwrap()
            .body::<SendSendBufferComplete>()
            .status,
        NvspStatus::FAIL
    );
    h.send(
        3,
        &nvsp(
            NvspMessageType::SUBCHANNEL,
            &SubchannelRequest {
                op: NvspSubchannelOperation::ALLOCATE,
                num_subchannels: 1,
            },
        ),
        Sent::InBand,
    )
    .unwrap();
    assert_eq!(
        completion(&mut h, 3)
            .unwrap()
            .body::<SubchannelComplete>()
            .status,
        NvspStatus::FAIL
    );
    h.send(
        4,
        &nvsp(
            NvspMessageType::INIT,
            &NvspInit {
                min_protocol_version: NvspVersion::V61,
                max_protocol_version: NvspVersion::V61,
            },
        ),
        Sent::InBand,
    )
    .unwrap();
    completion(&mut h, 4).unwrap();
    // An unknown GPADL; one of another channel; one too small for a section per queue.
    h.send(5, &recv(0xdead), Sent::InBand).unwrap();
    assert_eq!(recv_status(&mut h, 5), NvspStatus::FAIL);
    h.gpadls.insert(
        0x200,
        crate::server::SharedGpadl {
            relid: 99,
            byte_offset: 0,
            byte_count: 8192,
            pfns: vec![1, 2].into(),
        },
    );
    h.send(6, &recv(0x200), Sent::InBand).unwrap();
    assert_eq!(recv_status(&mut h, 6), NvspStatus::FAIL);
    h.add_gpadl(0x201, 0x20000, 2000);
    h.send(7, &recv(0x201), Sent::InBand).unwrap();
    assert_eq!(recv_status(&mut h, 7), NvspStatus::FAIL);
    // The real one, then again (reused), then as the send buffer (reused).
    h.send(8, &recv(RECV_GPADL), Sent::InBand).unwrap();
    assert_eq!(recv_status(&mut h, 8), NvspStatus::SUCCESS);
    h.send(9, &recv(RECV_GPADL), Sent::InBand).unwrap();
    assert_eq!(recv_status(&mut h, 9), NvspStatus::FAIL);
    h.send(10, &send(RECV_GPADL), Sent::InBand).unwrap();
    assert_eq!(
        completion(&mut h, 10)
            .unwrap()
            .body::<SendSendBufferComplete>()
            .status,
        NvspStatus::FAIL
    );
    // A completion for a transaction never sent.
    let before = nic.stats.bad_nvsp.load(Ordering::Relaxed);
    h.send(
        0x7777,
        &nvsp(
            NvspMessageType::SEND_RNDIS_PACKET_COMPLETE,
            &SendRndisPacketComplete {
                status: NvspStatus::SUCCESS,
            },
        ),
        Sent::Completion,
    )
    .unwrap();
    assert_eq!(nic.stats.bad_nvsp.load(Ordering::Relaxed), before + 1);
    // Garbage shorter than a header.
    h.send(11, &[1, 2], Sent::InBand).unwrap();
    assert!(nic.stats.bad_nvsp.load(Ordering::Relaxed) >= before + 2);
    // Revoke, then the buffer may be lent again.
    h.send(
        12,
        &nvsp(
            NvspMessageType::REVOKE_RECEIVE_BUFFER,
            &vmbus_proto::netvsp::RevokeReceiveBuffer {
                id: LINUX_RECEIVE_BUFFER_ID,
            },
        ),
        Sent::InBand,
    )
    .unwrap();
    h.send(13, &recv(RECV_GPADL), Sent::InBand).unwrap();
    assert_eq!(recv_status(&mut h, 13), NvspStatus::SUCCESS);
}

#[test]
fn frames_move_both_ways_with_their_offloads() {
    let (nic, qs) = standin_nic(1);
    let mut h = harness(&nic);
    let hs = handshake(&mut h, NvspVersion::V61, 0).unwrap().unwrap();
    // Guest to host: from a send section (two messages batched), and GPA-direct.
    let f1 = frame([2, 9, 9, 9, 9, 9], 100);
    let f2 = frame([0xff; 6], 1514);
    let mut batch = data(&f1, &[]);
    batch.resize(batch.len().next_multiple_of(8), 0);
    let first_len = batch.len() as u32;
    batch[4..8].copy_from_slice(&first_len.to_le_bytes());
    batch.extend_from_slice(&data(
        &f2,
        &[(
            PpiType::IEEE_8021Q,
            vmbus_proto::rndis::NdisPkt8021qInfo::new(3, false, 7).0,
        )],
    ));
    send_section(&mut h, 30, 3, hs.send_section_size, &batch).unwrap();
    assert_eq!(status_of(&mut h, 30), NvspStatus::SUCCESS);
    send_direct(&mut h, 31, &data(&f1, &[]), DATA_GPA + 4000).unwrap();
    assert_eq!(status_of(&mut h, 31), NvspStatus::SUCCESS);
    let out = qs[0].take_to_host();
    assert_eq!(out.len(), 3);
    assert_eq!(out[0].1, f1);
    // The guest's 802.1Q info becomes a tag.
    assert_eq!(
        netdev::offload::Vlan::of_frame(&out[1].1),
        Some(netdev::offload::Vlan { id: 7, priority: 3 })
    );
    assert_eq!(out[1].1.len(), f2.len() + 4);
    assert_eq!(out[2].1, f1);
    // Host to guest: one for us, one for another address (filtered), a broadcast.
    let valid = VirtioNetHdr {
        flags: netdev::VnetFlags::DATA_VALID.bits(),
        ..Default::default()
    };
    qs[0].push_to_guest(valid, frame(hs.mac, 60));
    qs[0].push_to_guest(VirtioNetHdr::default(), frame([2, 1, 1, 1, 1, 1], 60));
    qs[0].push_to_guest(VirtioNetHdr::default(), frame([0xff; 6], 1514));
    h.run().unwrap();
    let got = frames_of(&take_received(&mut h, false).unwrap());
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].2, frame(hs.mac, 60));
    // Checksum info: succeeded bits.
    assert_eq!(&got[0].1[4..8], &[0, 0, 0, 0]);
    assert_eq!(
        u32::from_le_bytes(got[0].1[12..16].try_into().unwrap()) & 0x38,
        0x38
    );
    assert_eq!(got[1].2, frame([0xff; 6], 1514));
    assert_eq!(nic.stats.rx_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(nic.stats.rx_frames.load(Ordering::Relaxed), 2);
}

#[test]
fn hostile_data_messages_are_refused_and_counted() {
    let (nic, qs) = standin_nic(1);
    let mut h = harness(&nic);
    let hs = handshake(&mut h, NvspVersion::V61, 0).unwrap().unwrap();
    let good = data(&frame([2; 6], 100), &[]);
    let cases = hostile_cases();
    for (i, (what, msg)) in cases.iter().enumerate() {
        let tx = 100 + i as u64;
        send_direct(&mut h, tx, msg, DATA_GPA).unwrap();
        assert_eq!(
            status_of(&mut h, tx),
            NvspStatus::INVALID_RNDIS_PACKET,
            "{what}"
        );
    }
    assert!(qs[0].take_to_host().is_empty());
    let s = &nic.stats;
    assert_eq!(
        s.tx_malformed.load(Ordering::Relaxed) + s.tx_over_mtu.load(Ordering::Relaxed),
        cases.len() as u64
    );
    // Sections out of range or oversized.
    let sections = SEND_LEN / hs.send_section_size;
    send_section(&mut h, 200, 0, hs.send_section_size, &good).unwrap();
    assert_eq!(status_of(&mut h, 200), NvspStatus::SUCCESS);
    for (tx, idx, size) in [
        (201, sections, 100),
        (202, u32::MAX - 1, 100),
        (203, 0, hs.send_section_size + 1),
        (204, 0, 0),
    ] {
        let m = nvsp(
            NvspMessageType::SEND_RNDIS_PACKET,
            &vmbus_proto::netvsp::SendRndisPacket {
                channel_type: 0,
                send_buffer_section_index: idx,
                send_buffer_section_size: size,
            },
        );
        h.send(tx, &m, Sent::InBand).unwrap();
        assert_eq!(
            status_of(&mut h, tx),
            NvspStatus::INVALID_RNDIS_PACKET,
            "section {idx} size {size}"
        );
    }
    // GPA-direct pages outside guest memory.
    let m = nvsp(
        NvspMessageType::SEND_RNDIS_PACKET,
        &vmbus_proto::netvsp::SendRndisPacket {
            channel_type: 0,
            send_buffer_section_index: u32::MAX,
            send_buffer_section_size: 0,
        },
    );
    assert!(h
        .send(205, &m, Sent::Direct(&[(0, 200, &[1 << 40])]))
        .unwrap());
    assert_eq!(status_of(&mut h, 205), NvspStatus::INVALID_RNDIS_PACKET);
    assert!(h
        .send(206, &m, Sent::Direct(&[(4095, 200, &[5, 1 << 40])]))
        .unwrap());
    assert_eq!(status_of(&mut h, 206), NvspStatus::INVALID_RNDIS_PACKET);
    // A well-formed one still passes afterwards.
    send_direct(&mut h, 207, &good, DATA_GPA).unwrap();
    assert_eq!(status_of(&mut h, 207), NvspStatus::SUCCESS);
    assert_eq!(qs[0].take_to_host().len(), 2);
}

/// Malformed data messages (each with what is wrong), as the tests and the TAP test send them.
fn hostile_cases() -> Vec<(&'static str, Vec<u8>)> {
    let good = data(&frame([2; 6], 100), &[]);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut m = good.clone();
    m[4..8].copy_from_slice(&10_000u32.to_le_bytes());
    cases.push(("length past the message", m));
    let mut m = good.clone();
    m[8..12].copy_from_slice(&5000u32.to_le_bytes());
    cases.push(("data offset outside", m));
    let mut m = good.clone();
    m[12..16].copy_from_slice(&5000u32.to_le_bytes());
    cases.push(("data length outside", m));
    let mut m = data(&frame([2; 6], 100), &[(PpiType::TCPIP_CHKSUM, 0)]);
    m[44..48].copy_from_slice(&0u32.to_le_bytes());
    cases.push(("PPI of size 0", m));
    let mut m = data(&frame([2; 6], 100), &[(PpiType::TCPIP_CHKSUM, 0)]);
    m[44..48].copy_from_slice(&400u32.to_le_bytes());
    cases.push(("PPI past its end", m));
    let mut m = data(&frame([2; 6], 100), &[(PpiType::TCPIP_CHKSUM, 0)]);
    m[28..32].copy_from_slice(&1000u32.to_le_bytes());
    cases.push(("PPI area outside", m));
    let tcp = tcp_frame(3000);
    cases.push((
        "LSO with MSS 0",
        data(&tcp, &[(PpiType::TCP_LARGESEND, 34 << 20 | 1 << 30)]),
    ));
    cases.push((
        "LSO header offset past the frame",
        data(
            &tcp[..900],
            &[(PpiType::TCP_LARGESEND, 1400 | 1000 << 20 | 1 << 30)],
        ),
    ));
    cases.push(("frame over the MTU", data(&frame([2; 6], 1515), &[])));
    cases.push(("runt frame", data(&frame([2; 6], 100)[..10], &[])));
    cases
}

#[test]
fn rndis_control_is_answered_as_linux_expects() {
    let (nic, _) = standin_nic(4);
    let mut h = harness(&nic);
    handshake(&mut h, NvspVersion::V61, 0).unwrap().unwrap();
    // Unknown OIDs: NOT_SUPPORTED, both ways.
    let (st, info) = query_info(&mut h, 40, Oid::GEN_VENDOR_ID, &[]).unwrap();
    assert_eq!((st, info.len()), (RndisStatus::NOT_SUPPORTED.0, 0));
    assert_eq!(
        set_status(&mut h, 41, Oid::GEN_VENDOR_ID, &[0; 4]).unwrap(),
        RndisStatus::NOT_SUPPORTED.0
    );
    // RSS: a table naming channel 1 while only the primary exists is refused; within range
    // it is taken.
    let rss = |entry: u32| {
        rss_parameters(
            0,
            1 | 0x200,
            |i| if i == 5 { entry } else { 0 },
            &[0x6d; 40],
        )
    };
    assert_eq!(
        set_status(&mut h, 42, Oid::GEN_RECEIVE_SCALE_PARAMETERS, &rss(1)).unwrap(),
        RndisStatus::INVALID_DATA.0
    );
    assert_eq!(
        set_status(&mut h, 43, Oid::GEN_RECEIVE_SCALE_PARAMETERS, &rss(0)).unwrap(),
        0
    );
    // Lengths outside the message.
    let mut q = query(44, Oid::GEN_MAXIMUM_FRAME_SIZE, &[]);
    q[16..20].copy_from_slice(&100u32.to_le_bytes());
    let body = request(&mut h, 44, &q).unwrap();
    assert_eq!(
        u32::from_le_bytes(body[4..8].try_into().unwrap()),
        RndisStatus::INVALID_LENGTH.0
    );
    // A message whose length lies: dropped and counted, the channel keeps serving.
    let before = nic.stats.bad_rndis.load(Ordering::Relaxed);
    let mut lie = query(45, Oid::GEN_MAXIMUM_FRAME_SIZE, &[]);
    lie[4..8].copy_from_slice(&12u32.to_le_bytes());
    send_direct(&mut h, 45, &lie, SCRATCH_GPA).unwrap();
    assert!(completion(&mut h, 45).is_some());
    let (st, mtu) = query_info(&mut h, 46, Oid::GEN_MAXIMUM_FRAME_SIZE, &[]).unwrap();
    assert_eq!((st, mtu), (0, 1500u32.to_le_bytes().to_vec()));
    assert!(nic.stats.bad_rndis.load(Ordering::Relaxed) > before);
    // KEEPALIVE and RESET are answered; HALT is not, and after it QUERY fails.
    let body = request(
        &mut h,
        47,
        &rndis(RndisMessageType::KEEPALIVE, &47u32.to_le_bytes()),
    )
    .unwrap();
    assert_eq!(body[..8], [47, 0, 0, 0, 0, 0, 0, 0]);
    let body = request(&mut h, 48, &rndis(RndisMessageType::RESET, &[0; 4])).unwrap();
    assert_eq!(body[..4], [0; 4]);
    send_direct(
        &mut h,
        49,
        &rndis(RndisMessageType::HALT, &49u32.to_le_bytes()),
        SCRATCH_GPA,
    )
    .unwrap();
    assert!(take_received(&mut h, false).unwrap().is_empty());
    let (st, _) = query_info(&mut h, 50, Oid::GEN_MAXIMUM_FRAME_SIZE, &[]).unwrap();
    assert_eq!(st, RndisStatus::FAILURE.0);
}

#[test]
fn subchannels_are_granted_up_to_the_queue_count() {
    let (nic, qs) = standin_nic(3);
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let a = asked.clone();
    let mut h = Harness::new(
        nic.clone(),
        MEM_BYTES,
        Some(Arc::new(move |n| {
            a.lock().unwrap().push(n);
            true
        })),
    )
    .unwrap();
    let hs = handshake(&mut h, NvspVersion::V61, 8).unwrap().unwrap();
    assert_eq!(hs.subchannels, 2);
    assert_eq!(*asked.lock().unwrap(), [2]);
    // The send indirection table: 16 entries over 3 channels.
    let table = h.received.iter().find_map(|r| match r {
        Received::InBand(b) if b.len() >= 12 + 64 => Some(b.clone()),
        _ => None,
    });
    let table = table.expect("indirection table");
    assert_eq!(
        u32::from_le_bytes(table[0..4].try_into().unwrap()),
        NvspMessageType::SEND_INDIRECTION_TABLE.0
    );
    let entries: Vec<u32> = table[12..76]
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(entries, (0..16).map(|i| i % 3).collect::<Vec<_>>());
    // A subchannel moves data on its own queue with its own receive sections.
    let mut sub = h.subchannel(2).unwrap();
    sub.received.clear();
    qs[2].push_to_guest(VirtioNetHdr::default(), frame(hs.mac, 80));
    sub.run().unwrap();
    let got = frames_of(&take_received(&mut sub, false).unwrap());
    assert_eq!(got.len(), 1);
    send_direct(&mut sub, 60, &data(&frame([2; 6], 64), &[]), DATA_GPA).unwrap();
    assert_eq!(status_of(&mut sub, 60), NvspStatus::SUCCESS);
    assert_eq!(qs[2].take_to_host().len(), 1);
    assert_eq!(nic.stats.rx_queue[2].load(Ordering::Relaxed), 1);
    assert_eq!(nic.stats.tx_queue[2].load(Ordering::Relaxed), 1);
    // Control messages on a subchannel are refused.
    send_direct(
        &mut sub,
        61,
        &query(61, Oid::GEN_MAXIMUM_FRAME_SIZE, &[]),
        SCRATCH_GPA,
    )
    .unwrap();
    assert_eq!(status_of(&mut sub, 61), NvspStatus::INVALID_RNDIS_PACKET);
    // A queue cannot be taken twice.
    assert!(h.subchannel(2).is_err());
    drop(sub);
    assert!(h.subchannel(2).is_ok());
}

#[test]
fn a_guest_that_keeps_its_receive_sections_stalls_only_itself() {
    let (nic, qs) = standin_nic(1);
    let mut h = harness(&nic);
    let hs = handshake(&mut h, NvspVersion::V61, 0).unwrap().unwrap();
    let sections = hs.recv.sections[0].num_sub_allocs as usize;
    for _ in 0..sections + 100 {
        qs[0].push_to_guest(VirtioNetHdr::default(), frame(hs.mac, 60));
    }
    for _ in 0..(sections / RX_BATCH + 4) {
        h.run().unwrap();
        take_received(&mut h, true).unwrap();
    }
    // With RSC on a read needs room for the largest frame: the last one goes with that many
    // sections free.
    let need = gso_frame_sections(hs.recv.sections[0].sub_alloc_size - RX_DATA_OFFSET);
    let delivered = sections - need + 1;
    assert_eq!(
        nic.stats.rx_frames.load(Ordering::Relaxed) as usize,
        delivered
    );
    assert!(nic.stats.rx_no_section.load(Ordering::Relaxed) > 0);
    // The rest wait in the backend (the TAP's queue, bounded by the kernel).
    assert_eq!(
        qs[0].0.lock().unwrap().to_guest.len(),
        sections + 100 - delivered
    );
    // Sending still works.
    send_direct(&mut h, 70, &data(&frame([2; 6], 64), &[]), DATA_GPA).unwrap();
    assert_eq!(status_of(&mut h, 70), NvspStatus::SUCCESS);
}

#[test]
fn host_link_changes_reach_the_guest_spaced_two_seconds_apart() {
    let (nic, _) = standin_nic(1);
    let mut h = harness(&nic);
    handshake(&mut h, NvspVersion::V61, 0).unwrap().unwrap();
    let indications = |h: &mut Harness| -> Vec<u32> {
        take_received(h, false)
            .unwrap()
            .iter()
            .filter(|m| {
                m.len() >= 12 && m[0..4] == RndisMessageType::INDICATE_STATUS.0.to_le_bytes()
            })
            .map(|m| u32::from_le_bytes(m[8..12].try_into().unwrap()))
            .collect()
    };
    nic.set_stand_in_link(false);
    h.run().unwrap();
    // The handshake's query was the baseline just now: not yet.
    assert!(indications(&mut h).is_empty());
    std::thread::sleep(LINK_INDICATION_SPACING);
    h.run().unwrap();
    assert_eq!(indications(&mut h), [RndisStatus::MEDIA_DISCONNECT.0]);
    nic.set_stand_in_link(true);
    h.run().unwrap();
    assert!(indications(&mut h).is_empty(), "within 2 s of the last");
    std::thread::sleep(LINK_INDICATION_SPACING);
    h.run().unwrap();
    assert_eq!(indications(&mut h), [RndisStatus::MEDIA_CONNECT.0]);
}

#[test]
fn a_vlan_nic_tags_and_untags() {
    let qs = [StandIn::default()];
    let mut s = settings(1);
    s.vlan = Some(100);
    let nic = Nic::with_queues(&s, vec![Box::new(qs[0].clone())], None);
    let mut h = harness(&nic);
    let hs = handshake(&mut h, NvspVersion::V61, 0).unwrap().unwrap();
    let f = frame([2, 9, 9, 9, 9, 9], 1514);
    send_direct(&mut h, 90, &data(&f, &[]), DATA_GPA).unwrap();
    assert_eq!(status_of(&mut h, 90), NvspStatus::SUCCESS);
    let out = qs[0].take_to_host();
    assert_eq!(
        netdev::offload::Vlan::of_frame(&out[0].1).map(|v| v.id),
        Some(100)
    );
    assert_eq!([&out[0].1[..12], &out[0].1[16..]].concat(), f);
    // Toward the guest: our VLAN untagged; another VLAN and untagged frames dropped.
    let tagged = |id: u16| {
        let g = frame(hs.mac, 1514);
        let tag = netdev::offload::Vlan { id, priority: 0 }.tag_bytes();
        [&g[..12], &tag[..], &g[12..]].concat()
    };
    qs[0].push_to_guest(VirtioNetHdr::default(), tagged(100));
    qs[0].push_to_guest(VirtioNetHdr::default(), tagged(101));
    qs[0].push_to_guest(VirtioNetHdr::default(), frame(hs.mac, 100));
    h.run().unwrap();
    let got = frames_of(&take_received(&mut h, false).unwrap());
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].2, frame(hs.mac, 1514));
    assert_eq!(nic.stats.rx_dropped.load(Ordering::Relaxed), 2);
}

#[test]
fn the_channel_reopens_any_number_of_times() {
    let (nic, qs) = standin_nic(2);
    for round in 0..5 {
        let mut h = harness(&nic);
        let hs = handshake(&mut h, NvspVersion::V61, 0)
            .unwrap()
            .unwrap_or_else(|| panic!("round {round}"));
        send_direct(&mut h, 80, &data(&frame([2; 6], 64), &[]), DATA_GPA).unwrap();
        assert_eq!(status_of(&mut h, 80), NvspStatus::SUCCESS);
        qs[0].push_to_guest(VirtioNetHdr::default(), frame(hs.mac, 64));
        h.run().unwrap();
        assert_eq!(frames_of(&take_received(&mut h, false).unwrap()).len(), 1);
    }
    assert_eq!(qs[0].take_to_host().len(), 5);
}

/// netvsp over a real TAP, in a network namespace each test thread makes (and that goes away
/// with the thread); skipped, with a message, where TAP or namespaces are missing.
mod tap_tests {
    use super::*;
    use netdev::offload::internet_checksum;
    use std::time::{Duration, Instant};

    const GUEST_MAC: [u8; 6] = [2, 0x22, 0, 0, 0, 2];

    /// Runs `f` on a thread in a fresh network namespace, or prints why not.
    fn in_netns(test: &str, f: impl FnOnce() + Send + 'static) {
        let test = test.to_string();
        std::thread::spawn(move || {
            if !std::path::Path::new("/dev/net/tun").exists() {
                println!("SKIP {test}: /dev/net/tun is missing");
                return;
            }
            if let Err(e) = netdev::enter_new_netns() {
                println!("SKIP {test}: cannot make a network namespace: {e}");
                return;
            }
            f();
        })
        .join()
        .unwrap();
    }

    fn ip(args: &str) -> bool {
        match std::process::Command::new("ip")
            .args(args.split_whitespace())
            .status()
        {
            Ok(s) => {
                assert!(s.success(), "ip {args}");
                true
            }
            Err(e) => {
                println!("SKIP: no ip command ({e})");
                false
            }
        }
    }

    fn tap_nic(name: &str, vlan: Option<u16>) -> Arc<Nic> {
        Nic::open_tap(&NicSettings {
            tap: name.into(),
            mac: GUEST_MAC,
            mtu: 1500,
            vlan,
            queues: 2,
        })
        .unwrap()
    }

    /// An ARP request from the guest for `target`.
    fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&sender);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target);
        f.resize(60, 0);
        f
    }

    /// An IPv4 frame from the guest to `dst_mac`/`dst`.
    fn ipv4(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = dst_mac.to_vec();
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[8, 0]);
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        h[8] = 64;
        h[9] = proto;
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        let c = internet_checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&h);
        f.extend_from_slice(l4);
        f
    }

    /// Runs the channel until a frame matching `want` reaches the guest (5 s at most).
    fn wait_frame(h: &mut Harness, mut want: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            h.run().unwrap();
            for (_, _, f) in frames_of(&take_received(h, false).unwrap()) {
                if want(&f) {
                    return f;
                }
            }
            assert!(Instant::now() < deadline, "no such frame reached the guest");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn arp_ping_and_checksum_offload_through_a_real_tap() {
        in_netns("arp_ping_and_checksum_offload_through_a_real_tap", || {
            let nic = tap_nic("nvt0", None);
            if !ip("addr add 10.8.0.1/24 dev nvt0") {
                return;
            }
            let mut h = harness(&nic);
            handshake(&mut h, NvspVersion::V61, 0).unwrap().unwrap();
            // ARP: the host answers the guest.
            send_direct(
                &mut h,
                1000,
                &data(&arp_request([10, 8, 0, 2], [10, 8, 0, 1]), &[]),
                DATA_GPA,
            )
            .unwrap();
            assert_eq!(status_of(&mut h, 1000), NvspStatus::SUCCESS);
            let reply = wait_frame(&mut h, |f| {
                f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2]
            });
            assert_eq!(reply[..6], GUEST_MAC);
            let host_mac: [u8; 6] = reply[6..12].try_into().unwrap();
            // Ping: an ICMP echo answered.
            let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
            icmp.extend_from_slice(&[0xab; 56]);
            let c = internet_checksum(&icmp);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            let ping = ipv4(host_mac, [10, 8, 0, 2], [10, 8, 0, 1], 1, &icmp);
            send_direct(&mut h, 1001, &data(&ping, &[]), DATA_GPA).unwrap();
            let pong = wait_frame(&mut h, |f| {
                f.len() >= 42 && f[12..14] == [8, 0] && f[23] == 1 && f[34] == 0
            });
            assert_eq!(pong[38..40], [0x12, 0x34]);
            // UDP with the checksum left to the host (a checksum PPI): a socket receives it.
            let sock = std::net::UdpSocket::bind("10.8.0.1:9999").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let payload = vec![0x42u8; 1000];
            let mut udp = vec![0u8; 8];
            udp[0..2].copy_from_slice(&4444u16.to_be_bytes());
            udp[2..4].copy_from_slice(&9999u16.to_be_bytes());
            udp[4..6].copy_from_slice(&1008u16.to_be_bytes());
            udp.extend_from_slice(&payload);
            let frame = ipv4(host_mac, [10, 8, 0, 2], [10, 8, 0, 1], 17, &udp);
            let csum = 1 | 1 << 3 | 34 << 16;
            send_direct(
                &mut h,
                1002,
                &data(&frame, &[(PpiType::TCPIP_CHKSUM, csum)]),
                DATA_GPA,
            )
            .unwrap();
            assert_eq!(status_of(&mut h, 1002), NvspStatus::SUCCESS);
            let mut got = [0u8; 2000];
            let (n, from) = sock.recv_from(&mut got).unwrap();
            assert_eq!((&got[..n], from.port()), (&payload[..], 4444));
            // Hostile messages are refused; the host still answers afterwards.
            for (i, (what, msg)) in hostile_cases().iter().enumerate() {
                let tx = 1100 + i as u64;
                send_direct(&mut h, tx, msg, DATA_GPA).unwrap();
                assert_eq!(
                    status_of(&mut h, tx),
                    NvspStatus::INVALID_RNDIS_PACKET,
                    "{what}"
                );
            }
            send_direct(&mut h, 1200, &data(&ping, &[]), DATA_GPA).unwrap();
            wait_frame(&mut h, |f| {
                f.len() >= 42 && f[12..14] == [8, 0] && f[23] == 1 && f[34] == 0
            });
            // The host link goes down: the NIC sees it.
            ip("link set nvt0 down");
            assert!(!nic.link_connected());
            assert_eq!(
                nic.stats.tx_malformed.load(Ordering::Relaxed)
                    + nic.stats.tx_over_mtu.load(Ordering::Relaxed),
                hostile_cases().len() as u64
            );
        });
    }

    #[test]
    fn a_vlan_nic_tags_toward_the_host_and_untags_toward_the_guest() {
        in_netns(
            "a_vlan_nic_tags_toward_the_host_and_untags_toward_the_guest",
            || {
                let nic = tap_nic("nvt1", Some(100));
                let vlan = std::process::Command::new("ip")
                    .args("link add link nvt1 name nvt1.100 type vlan id 100".split(' '))
                    .status();
                if !vlan.is_ok_and(|s| s.success()) {
                    println!(
                        "SKIP a_vlan_nic_tags...: this kernel cannot make VLAN devices (8021q)"
                    );
                    return;
                }
                ip("addr add 10.7.0.1/24 dev nvt1.100");
                ip("link set nvt1.100 up");
                let mut h = harness(&nic);
                handshake(&mut h, NvspVersion::V61, 0).unwrap().unwrap();
                send_direct(
                    &mut h,
                    2000,
                    &data(&arp_request([10, 7, 0, 2], [10, 7, 0, 1]), &[]),
                    DATA_GPA,
                )
                .unwrap();
                assert_eq!(status_of(&mut h, 2000), NvspStatus::SUCCESS);
                // Only the VLAN device answers, so the tag made it to the host; the guest sees
                // the answer untagged.
                let reply = wait_frame(&mut h, |f| {
                    f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2]
                });
                assert_eq!(reply[28..32], [10, 7, 0, 1]);
            },
        );
    }
}

/// A TCP/IPv4 GSO frame to `dst` as a TAP with segmentation offloads hands it over: `payload`
/// bytes in `mss`-byte segments, the checksum partial.
fn gso_frame(dst: [u8; 6], payload: usize, mss: u16) -> (VirtioNetHdr, Vec<u8>) {
    let mut f = tcp_frame(payload);
    f[..6].copy_from_slice(&dst);
    for (i, b) in f[54..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let hdr = VirtioNetHdr {
        flags: netdev::VnetFlags::NEEDS_CSUM.bits(),
        gso_type: netdev::vnet::gso::TCPV4,
        hdr_len: 128.into(),
        gso_size: mss.into(),
        csum_start: 34.into(),
        csum_offset: 16.into(),
        num_buffers: 0.into(),
    };
    (hdr, f)
}

/// The packet-id flags of a received message's per-packet info, if it has that entry.
fn fragment_flags(ppi: &[u8]) -> Option<vmbus_proto::rndis::PktInfoFlags> {
    let mut at = 0;
    while at + 16 <= ppi.len() {
        let size = u32::from_le_bytes(ppi[at..at + 4].try_into().unwrap()) as usize;
        let kind = u32::from_le_bytes(ppi[at + 4..at + 8].try_into().unwrap());
        if kind == 0x8000_0001 {
            assert_eq!(ppi[at + 12], vmbus_proto::rndis::PKTINFO_ID_V1);
            return Some(vmbus_proto::rndis::PktInfoFlags::from_bits_retain(
                ppi[at + 13],
            ));
        }
        at += size.max(16);
    }
    None
}

#[test]
fn a_large_host_frame_reaches_an_rsc_guest_in_fragments_of_one_transfer() {
    use vmbus_proto::rndis::PktInfoFlags as F;
    let (nic, qs) = standin_nic(1);
    let mut h = harness(&nic);
    let hs = handshake(&mut h, NvspVersion::V61, 0).unwrap().unwrap();
    // The guest enabled RSC: the TAP hands over TCP super-frames with partial checksums.
    let tso = netdev::TunOffload::CSUM | netdev::TunOffload::TSO4 | netdev::TunOffload::TSO6;
    assert_eq!(qs[0].0.lock().unwrap().offload, tso.bits());
    let (hdr, big) = gso_frame(hs.mac, 60_000, 1448);
    qs[0].push_to_guest(hdr, big.clone());
    qs[0].push_to_guest(VirtioNetHdr::default(), frame(hs.mac, 200));
    h.run().unwrap();
    let transfers: Vec<(u64, usize)> = h
        .received
        .iter()
        .filter_map(|r| match r {
            Received::Transfer { tx, ranges, .. } => Some((*tx, ranges.len())),
            _ => None,
        })
        .collect();
    // One packet for the super-frame (cut at each section's end, wherever the segments
    // end), one for the small frame.
    let size = hs.recv.sections[0].sub_alloc_size;
    let capacity = (size - RX_DATA_OFFSET) as usize;
    let fragments = big.len().div_ceil(capacity);
    assert!(fragments > 30);
    assert_eq!(
        transfers.iter().map(|t| t.1).collect::<Vec<_>>(),
        [fragments, 1]
    );
    let msgs = take_received(&mut h, false).unwrap();
    let got = frames_of(&msgs);
    assert_eq!(got.len(), fragments + 1);
    let mut whole = Vec::new();
    for (i, (_, ppi, data)) in got[..fragments].iter().enumerate() {
        let flags = fragment_flags(ppi).expect("a packet-id entry");
        let want = match i {
            0 => F::SUBALLOC | F::FIRST_FRAGMENT,
            _ if i + 1 == fragments => F::SUBALLOC | F::LAST_FRAGMENT,
            _ => F::SUBALLOC,
        };
        assert_eq!(flags, want, "fragment {i}");
        // The checksum entry (TCP, UDP, IP succeeded) on the first only.
        let csum = ppi
            .chunks_exact(16)
            .find(|e| e[4..8] == [0, 0, 0, 0])
            .map(|e| u32::from_le_bytes(e[12..16].try_into().unwrap()));
        assert_eq!(csum.map(|c| c & 0x38), (i == 0).then_some(0x38), "{i}");
        assert_eq!(data.len(), capacity.min(big.len() - whole.len()));
        whole.extend_from_slice(data);
    }
    assert_eq!(whole, big);
    assert_eq!(fragment_flags(&got[fragments].1), None);
    assert_eq!(got[fragments].2, frame(hs.mac, 200));
    assert_eq!(nic.stats.rx_rsc_frames.load(Ordering::Relaxed), 1);
    assert_eq!(
        nic.stats.rx_rsc_fragments.load(Ordering::Relaxed),
        fragments as u64
    );
    assert_eq!(nic.stats.rx_frames.load(Ordering::Relaxed), 2);
    // The completions gave every section back: as many super-frames as the channel's share
    // holds all go through, again and again. A read needs room for the largest frame: the
    // last one goes while that many sections are free.
    let sections = hs.recv.sections[0].num_sub_allocs as usize;
    let need = gso_frame_sections(size - RX_DATA_OFFSET);
    let fit = (sections - need) / fragments + 1;
    for _ in 0..3 {
        for _ in 0..fit {
            qs[0].push_to_guest(hdr, big.clone());
        }
        h.run().unwrap();
        assert_eq!(
            frames_of(&take_received(&mut h, false).unwrap()).len(),
            fit * fragments
        );
    }
    assert_eq!(nic.stats.rx_dropped.load(Ordering::Relaxed), 0);
    assert_eq!(nic.stats.bad_nvsp.load(Ordering::Relaxed), 0);
    // Held back without sections: nothing is lost, the frame stays in the TAP until they
    // come back.
    for _ in 0..fit + 1 {
        qs[0].push_to_guest(hdr, big.clone());
    }
    h.run().unwrap();
    assert_eq!(qs[0].0.lock().unwrap().to_guest.len(), 1);
    let pending = |h: &Harness| -> Vec<(u64, Vec<vmbus_proto::ring::TransferPageRange>)> {
        h.received
            .iter()
            .filter_map(|r| match r {
                Received::Transfer { tx, ranges, .. } => Some((*tx, ranges.clone())),
                _ => None,
            })
            .collect()
    };
    let waiting = pending(&h);
    assert_eq!(waiting.len(), fit);
    assert!(nic.stats.rx_no_section.load(Ordering::Relaxed) > 0);
    // A completion naming a section that is not a packet's first frees nothing.
    let before = nic.stats.bad_nvsp.load(Ordering::Relaxed);
    let done = nvsp(
        NvspMessageType::SEND_RNDIS_PACKET_COMPLETE,
        &SendRndisPacketComplete {
            status: NvspStatus::SUCCESS,
        },
    );
    let forged = 1 + u64::from(waiting[0].1[1].byte_offset / size);
    h.send(forged, &done, Sent::Completion).unwrap();
    h.run().unwrap();
    assert_eq!(nic.stats.bad_nvsp.load(Ordering::Relaxed), before + 1);
    assert_eq!(pending(&h).len(), fit);
    assert_eq!(
        frames_of(&take_received(&mut h, false).unwrap()).len(),
        fit * fragments
    );
    h.run().unwrap();
    assert_eq!(
        frames_of(&take_received(&mut h, false).unwrap()).len(),
        fragments
    );
    assert!(qs[0].0.lock().unwrap().to_guest.is_empty());
    // Frames it cannot deliver coalesced are dropped and counted: a segment too large for a
    // section (the guest's MTU), a GSO kind it did not ask for, a frame over the MTU without
    // GSO.
    let (mut bad, f) = gso_frame(hs.mac, 20_000, 1600);
    qs[0].push_to_guest(bad, f.clone());
    bad.gso_size = 1448.into();
    bad.gso_type = netdev::vnet::gso::UDP_L4;
    qs[0].push_to_guest(bad, f.clone());
    qs[0].push_to_guest(VirtioNetHdr::default(), f);
    h.run().unwrap();
    assert!(take_received(&mut h, false).unwrap().is_empty());
    assert_eq!(nic.stats.rx_dropped.load(Ordering::Relaxed), 3);
    // The guest goes away: the TAP gets no offloads again.
    drop(h);
    assert_eq!(qs[0].0.lock().unwrap().offload, 0);
}

#[test]
fn without_rsc_the_tap_keeps_no_offloads_and_gso_frames_are_dropped() {
    for version in [NvspVersion::V6, NvspVersion::V5, NvspVersion::V4] {
        let (nic, qs) = standin_nic(1);
        let mut h = harness(&nic);
        let hs = handshake(&mut h, version, 0).unwrap().unwrap();
        assert_eq!(qs[0].0.lock().unwrap().offload, 0, "{version:?}");
        let (hdr, big) = gso_frame(hs.mac, 10_000, 1448);
        qs[0].push_to_guest(hdr, big);
        qs[0].push_to_guest(VirtioNetHdr::default(), frame(hs.mac, 1514));
        h.run().unwrap();
        let got = frames_of(&take_received(&mut h, false).unwrap());
        assert_eq!(got.len(), 1, "{version:?}");
        assert_eq!(got[0].2, frame(hs.mac, 1514));
        assert_eq!(nic.stats.rx_dropped.load(Ordering::Relaxed), 1);
    }
    // A 6.1 guest that turns RSC off again (LRO off): the offloads go with it.
    let (nic, qs) = standin_nic(1);
    let mut h = harness(&nic);
    handshake(&mut h, NvspVersion::V61, 0).unwrap().unwrap();
    assert_ne!(qs[0].0.lock().unwrap().offload, 0);
    let off = vmbus_proto::rndis::NdisOffloadParams {
        header: NdisObjectHeader {
            object_type: 0x80,
            revision: 3,
            size: 28,
        },
        rsc_ip_v4: vmbus_proto::rndis::offload_param::RSC_DISABLED,
        rsc_ip_v6: vmbus_proto::rndis::offload_param::RSC_DISABLED,
        ..Default::default()
    };
    assert_eq!(
        set_status(&mut h, 900, Oid::TCP_OFFLOAD_PARAMETERS, off.as_bytes()).unwrap(),
        0
    );
    assert_eq!(qs[0].0.lock().unwrap().offload, 0);
    let _ = nic;
}

/// The frames of one RSC transfer (after `h.run()`): each fragment's packet-id flags and
/// bytes, the guest's completion sent.
fn rsc_transfer(h: &mut Harness) -> Vec<(Option<vmbus_proto::rndis::PktInfoFlags>, Vec<u8>)> {
    frames_of(&take_received(h, false).unwrap())
        .into_iter()
        .map(|(_, ppi, data)| (fragment_flags(&ppi), data))
        .collect()
}

#[test]
fn rsc_frames_are_cut_at_section_ends_whatever_their_length() {
    use vmbus_proto::rndis::PktInfoFlags as F;
    let (nic, qs) = standin_nic(1);
    let mut h = harness(&nic);
    let hs = handshake(&mut h, NvspVersion::V61, 0).unwrap().unwrap();
    let capacity = (hs.recv.sections[0].sub_alloc_size - RX_DATA_OFFSET) as usize;
    // Odd lengths across sections, exactly one and exactly two sections, one byte more.
    for len in [
        3 * capacity + 7,
        capacity,
        2 * capacity,
        capacity + 1,
        MAX_GSO_FRAME - 4,
    ] {
        let (hdr, f) = gso_frame(hs.mac, len - 54, 1448);
        assert_eq!(f.len(), len);
        qs[0].push_to_guest(hdr, f.clone());
        h.run().unwrap();
        let got = rsc_transfer(&mut h);
        let n = len.div_ceil(capacity);
        assert_eq!(got.len(), n, "{len}");
        if n == 1 {
            // One section: a plain packet, no fragment.
            assert_eq!(got[0], (None, f), "{len}");
            continue;
        }
        for (i, (flags, data)) in got.iter().enumerate() {
            let want = match i {
                0 => F::SUBALLOC | F::FIRST_FRAGMENT,
                _ if i + 1 == n => F::SUBALLOC | F::LAST_FRAGMENT,
                _ => F::SUBALLOC,
            };
            assert_eq!(*flags, Some(want), "{len} fragment {i}");
            let end = ((i + 1) * capacity).min(len);
            assert_eq!(data[..], f[i * capacity..end], "{len} fragment {i}");
        }
    }
    assert_eq!(nic.stats.rx_dropped.load(Ordering::Relaxed), 0);
    // Longer than the largest frame: the read is cut short, and the frame dropped.
    let (hdr, f) = gso_frame(hs.mac, MAX_GSO_FRAME + 2000, 1448);
    qs[0].push_to_guest(hdr, f);
    h.run().unwrap();
    assert!(rsc_transfer(&mut h).is_empty());
    assert_eq!(nic.stats.rx_dropped.load(Ordering::Relaxed), 1);
}

#[test]
fn rsc_reads_wait_for_room_for_the_largest_frame() {
    let (nic, qs) = standin_nic(1);
    let mut h = harness(&nic);
    let hs = handshake(&mut h, NvspVersion::V61, 0).unwrap().unwrap();
    let size = hs.recv.sections[0].sub_alloc_size;
    let sections = hs.recv.sections[0].num_sub_allocs as usize;
    let need = gso_frame_sections(size - RX_DATA_OFFSET);
    // Small frames, one section each, kept by the guest until fewer than `need` are free.
    let small = sections - need + 1;
    for _ in 0..small + 3 {
        qs[0].push_to_guest(VirtioNetHdr::default(), frame(hs.mac, 60));
    }
    h.run().unwrap();
    let kept = take_received(&mut h, true).unwrap();
    assert_eq!(kept.len(), small);
    // The rest wait in the TAP: nothing dropped, no copy held.
    assert_eq!(qs[0].0.lock().unwrap().to_guest.len(), 3);
    assert_eq!(nic.stats.rx_dropped.load(Ordering::Relaxed), 0);
    assert!(nic.stats.rx_no_section.load(Ordering::Relaxed) > 0);
    // The guest returns one (section 0, the first announced): room for one more read.
    let done = nvsp(
        NvspMessageType::SEND_RNDIS_PACKET_COMPLETE,
        &SendRndisPacketComplete {
            status: NvspStatus::SUCCESS,
        },
    );
    h.send(1, &done, Sent::Completion).unwrap();
    h.run().unwrap();
    assert_eq!(qs[0].0.lock().unwrap().to_guest.len(), 2);
    assert_eq!(frames_of(&take_received(&mut h, false).unwrap()).len(), 1);
}

#[test]
fn a_vlan_nic_strips_the_tag_of_rsc_frames_without_a_copy() {
    use vmbus_proto::rndis::PktInfoFlags as F;
    let qs = [StandIn::default()];
    let mut s = settings(1);
    s.vlan = Some(100);
    let nic = Nic::with_queues(&s, vec![Box::new(qs[0].clone())], None);
    let mut h = harness(&nic);
    let hs = handshake(&mut h, NvspVersion::V61, 0).unwrap().unwrap();
    let capacity = (hs.recv.sections[0].sub_alloc_size - RX_DATA_OFFSET) as usize;
    let tag = |f: &[u8], id: u16| {
        let t = netdev::offload::Vlan { id, priority: 0 }.tag_bytes();
        [&f[..12], &t[..], &f[12..]].concat()
    };
    let (mut hdr, f) = gso_frame(hs.mac, 5 * capacity, 1448);
    hdr.csum_start = (34 + 4).into();
    qs[0].push_to_guest(hdr, tag(&f, 100));
    // Another VLAN's, and a partial checksum starting inside the tag: dropped.
    qs[0].push_to_guest(hdr, tag(&f, 101));
    let mut bad = hdr;
    bad.csum_start = 16.into();
    qs[0].push_to_guest(bad, tag(&f, 100));
    h.run().unwrap();
    let got = rsc_transfer(&mut h);
    assert_eq!(got.len(), f.len().div_ceil(capacity));
    assert_eq!(got[0].0, Some(F::SUBALLOC | F::FIRST_FRAGMENT));
    assert_eq!(
        got.iter()
            .flat_map(|g| g.1.iter().copied())
            .collect::<Vec<u8>>(),
        f
    );
    assert_eq!(nic.stats.rx_dropped.load(Ordering::Relaxed), 2);
    // A small tagged frame: one section, untagged.
    qs[0].push_to_guest(VirtioNetHdr::default(), tag(&frame(hs.mac, 100), 100));
    h.run().unwrap();
    assert_eq!(rsc_transfer(&mut h), [(None, frame(hs.mac, 100))]);
}

/// A polling worker looks at an empty TAP less and less often (a failed `readv` on every turn
/// was most of a core), and a frame that arrives meanwhile still waits at most
/// `TAP_BACKOFF_MAX`.
#[test]
fn an_empty_tap_is_looked_at_less_often_and_a_frame_still_comes_soon() {
    let (nic, qs) = standin_nic(1);
    let mut h = harness(&nic);
    let hs = handshake(&mut h, NvspVersion::V61, 0).unwrap().unwrap();
    let reads = |q: &StandIn| q.0.lock().unwrap().reads;
    let before = reads(&qs[0]);
    let start = Instant::now();
    let mut turns = 0u64;
    while start.elapsed() < Duration::from_millis(2) {
        assert!(!h.turn().unwrap());
        turns += 1;
    }
    let looked = reads(&qs[0]) - before;
    assert!(
        looked > 0 && looked * 2 < turns,
        "{looked} looks at the TAP in {turns} turns"
    );
    assert_eq!(h.device.tap_backoff, TAP_BACKOFF_MAX);
    qs[0].push_to_guest(VirtioNetHdr::default(), frame(hs.mac, 64));
    std::thread::sleep(TAP_BACKOFF_MAX);
    assert!(h.turn().unwrap());
    assert!(h.device.tap_backoff.is_zero());
    assert_eq!(frames_of(&take_received(&mut h, false).unwrap()).len(), 1);
}

/// The hash value of frames toward the guest: the Toeplitz hash under the guest's key and
/// types (here the verification suite's key and first TCP/IPv4 flow), on the plain path (NVSP
/// 5) and the coalescing one (6.1); none for a frame no type covers, none once RSS is off.
#[test]
fn frames_toward_the_guest_carry_the_rss_hash_the_guest_set_up() {
    const KEY: [u8; 40] = [
        0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f,
        0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30,
        0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
    ];
    // Toeplitz over IPv4 and TCP/IPv4 (what Linux sets, with the IPv6 types).
    let rss = |flags: u16| rss_parameters(flags, 1 | 0x100 | 0x200, |_| 0, &KEY);
    // The hash-value entry among a packet's per-packet info, if any.
    let hash_of = |ppi: &[u8]| {
        let mut at = 0;
        while let Some(e) = ppi.get(at..at + 12) {
            let word = |i: usize| u32::from_le_bytes(e[i..i + 4].try_into().unwrap());
            if word(4) == PpiType::NBL_HASH_VALUE.0 {
                let v = at + word(8) as usize;
                return Some(u32::from_le_bytes(ppi[v..v + 4].try_into().unwrap()));
            }
            at += (word(0) as usize).max(12);
        }
        None
    };
    for version in [NvspVersion::V5, NvspVersion::V61] {
        let (nic, qs) = standin_nic(1);
        let mut h = harness(&nic);
        let hs = handshake(&mut h, version, 0).unwrap().unwrap();
        // 66.9.149.187:2794 -> 161.142.100.80:1766.
        let mut tcp = frame(hs.mac, 60);
        tcp[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        tcp[14..34].copy_from_slice(&[
            0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 6, 0, 0, 66, 9, 149, 187, 161, 142, 100, 80,
        ]);
        tcp[34..38].copy_from_slice(&[0x0a, 0xea, 0x06, 0xe6]);
        let send = |h: &mut Harness| {
            qs[0].push_to_guest(VirtioNetHdr::default(), tcp.clone());
            qs[0].push_to_guest(VirtioNetHdr::default(), frame(hs.mac, 60));
            h.run().unwrap();
            frames_of(&take_received(h, false).unwrap())
                .iter()
                .map(|(_, ppi, _)| hash_of(ppi))
                .collect::<Vec<_>>()
        };
        assert_eq!(send(&mut h), [None, None], "{version:?}: before RSS");
        assert_eq!(
            set_status(&mut h, 50, Oid::GEN_RECEIVE_SCALE_PARAMETERS, &rss(0)).unwrap(),
            0
        );
        assert_eq!(send(&mut h), [Some(0x51cc_c178), None], "{version:?}");
        let disable = vmbus_proto::rndis::rss_param_flag::DISABLE_RSS;
        assert_eq!(
            set_status(&mut h, 51, Oid::GEN_RECEIVE_SCALE_PARAMETERS, &rss(disable)).unwrap(),
            0
        );
        assert_eq!(send(&mut h), [None, None], "{version:?}: RSS off");
    }
}
