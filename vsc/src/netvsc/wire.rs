//! RNDIS data messages as netvsc writes and reads them: a PACKET message for a frame with its
//! per-packet info, and what a message from the host says (a frame with its offloads, a status
//! indication, a control completion). Pure functions over bytes, unit-tested; the host is not
//! trusted, so every length and offset is checked against the message.

use netdev::{RxOffload, TxOffload};
use vmbus_proto::rndis::{
    IndicateStatus, NdisPkt8021qInfo, NdisTcpIpChecksumInfo, PerPacketInfo, PpiType,
    RndisMessageHeader, RndisMessageType, RndisPacket, RndisStatus,
};
use zerocopy::{FromBytes, IntoBytes};

/// Bytes of a PACKET message before its per-packet info.
pub const PACKET_HEADER: usize = size_of::<RndisMessageHeader>() + size_of::<RndisPacket>();

/// Most per-packet info a guest's packet carries (checksum or large send, and VLAN).
pub const MAX_TX_PPI: usize = 2 * (size_of::<PerPacketInfo>() + 4);

/// Most bytes of per-packet info read from a host's packet (more is ignored).
pub const MAX_RX_PPI: usize = 256;

/// Writes into `out` (cleared first) the head of a PACKET message for a `frame_len`-byte frame
/// with `offload`: the headers and per-packet info; the frame follows right after. Returns the
/// whole message's length.
pub fn packet_head(out: &mut Vec<u8>, frame_len: usize, offload: &TxOffload) -> usize {
    out.clear();
    let mut ppi = [0u8; MAX_TX_PPI];
    let mut n = 0;
    let mut add = |t: PpiType, v: u32| {
        ppi[n..n + 12].copy_from_slice(PerPacketInfo::new(t, false, 4).as_bytes());
        ppi[n + 12..n + 16].copy_from_slice(&v.to_le_bytes());
        n += 16;
    };
    // A large send carries only its LSO entry (the host computes the checksums); otherwise the
    // checksum request, if any.
    if let Some(l) = offload.lso_ppi() {
        add(PpiType::TCP_LARGESEND, l.0);
    } else if let Some(c) = offload.checksum_ppi() {
        add(PpiType::TCPIP_CHKSUM, c.0);
    }
    if let Some(v) = offload.vlan {
        add(PpiType::IEEE_8021Q, v.to_ppi().0);
    }
    let total = PACKET_HEADER + n + frame_len;
    out.extend_from_slice(
        RndisMessageHeader {
            message_type: RndisMessageType::PACKET,
            message_length: total as u32,
        }
        .as_bytes(),
    );
    let body = size_of::<RndisPacket>() as u32;
    out.extend_from_slice(
        RndisPacket {
            data_offset: body + n as u32,
            data_length: frame_len as u32,
            per_packet_info_offset: if n == 0 { 0 } else { body },
            per_packet_info_length: n as u32,
            ..Default::default()
        }
        .as_bytes(),
    );
    out.extend_from_slice(&ppi[..n]);
    total
}

/// What a message the host wrote in the receive buffer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A frame of `len` bytes at `offset` from the message's start, with its offloads.
    Frame {
        /// Offset of the frame from the message's start.
        offset: usize,
        /// Its length.
        len: usize,
        /// Checksum, VLAN and hash the host reported.
        offload: RxOffload,
    },
    /// A status indication (media connect or disconnect, ...).
    Status(RndisStatus),
    /// A control message (a completion): handled by the handshake.
    Control(RndisMessageType),
}

/// Why a message from the host was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Shorter than its headers.
    #[error("message too short")]
    Short,
    /// A length or offset outside the message.
    #[error("a length or offset outside the message")]
    Bounds,
}

/// Reads the message whose first bytes are `head` (at least [`PACKET_HEADER`] of them if the
/// message is that long, and its per-packet info if it lies within them) and whose whole
/// length is `len` (the transfer range's length).
pub fn parse(head: &[u8], len: usize) -> Result<Received, Malformed> {
    let (h, body) = RndisMessageHeader::read_from_prefix(head).map_err(|_| Malformed::Short)?;
    let msg_len = h.message_length as usize;
    if msg_len > len || msg_len < size_of::<RndisMessageHeader>() {
        return Err(Malformed::Bounds);
    }
    match h.message_type {
        RndisMessageType::PACKET => {
            let (p, _) = RndisPacket::read_from_prefix(body).map_err(|_| Malformed::Short)?;
            let base = size_of::<RndisMessageHeader>();
            let data = base
                .checked_add(p.data_offset as usize)
                .ok_or(Malformed::Bounds)?;
            let end = data
                .checked_add(p.data_length as usize)
                .ok_or(Malformed::Bounds)?;
            if end > msg_len || (p.data_offset as usize) < size_of::<RndisPacket>() {
                return Err(Malformed::Bounds);
            }
            let mut checksum = None;
            let mut vlan = None;
            let mut hash = None;
            let ppi_len = p.per_packet_info_length as usize;
            if ppi_len > 0 {
                let at = base
                    .checked_add(p.per_packet_info_offset as usize)
                    .ok_or(Malformed::Bounds)?;
                let ppi_end = at.checked_add(ppi_len).ok_or(Malformed::Bounds)?;
                if ppi_end > msg_len {
                    return Err(Malformed::Bounds);
                }
                // Info beyond what was read (more than `MAX_RX_PPI`) is ignored.
                let ppi = head.get(at..ppi_end.min(head.len())).unwrap_or(&[]);
                let mut off = 0;
                while let Ok((e, _)) = PerPacketInfo::read_from_prefix(&ppi[off..]) {
                    let size = e.size as usize;
                    let v_at = off + e.ppi_offset as usize;
                    if size < size_of::<PerPacketInfo>() || off + size > ppi.len() {
                        return Err(Malformed::Bounds);
                    }
                    let value = ppi
                        .get(v_at..v_at + 4)
                        .filter(|_| v_at + 4 <= off + size)
                        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
                    if let (Some(v), false) = (value, e.internal()) {
                        match e.ppi_type() {
                            PpiType::TCPIP_CHKSUM => checksum = Some(NdisTcpIpChecksumInfo(v)),
                            PpiType::IEEE_8021Q => vlan = Some(NdisPkt8021qInfo(v)),
                            PpiType::NBL_HASH_VALUE => hash = Some(v),
                            _ => {}
                        }
                    }
                    off += size;
                }
            }
            Ok(Received::Frame {
                offset: data,
                len: p.data_length as usize,
                offload: RxOffload::from_ppi(checksum, vlan, hash),
            })
        }
        RndisMessageType::INDICATE_STATUS => {
            let (s, _) = IndicateStatus::read_from_prefix(body).map_err(|_| Malformed::Short)?;
            Ok(Received::Status(s.status))
        }
        t => Ok(Received::Control(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netdev::{ChecksumRequest, L4Protocol, Lso, Vlan};

    #[test]
    fn a_packet_built_is_parsed_back() {
        let offload = TxOffload {
            checksum: Some(ChecksumRequest {
                ipv6: false,
                ip_header: true,
                l4: Some(L4Protocol::Tcp),
                l4_offset: 34,
            }),
            lso: None,
            vlan: None,
        };
        let mut head = Vec::new();
        let total = packet_head(&mut head, 100, &offload);
        assert_eq!(total, head.len() + 100);
        let mut msg = head.clone();
        msg.extend(std::iter::repeat_n(0xab, 100));
        let (h, body) = RndisMessageHeader::read_from_prefix(&msg).unwrap();
        assert_eq!(h.message_type, RndisMessageType::PACKET);
        let (p, _) = RndisPacket::read_from_prefix(body).unwrap();
        assert_eq!(p.per_packet_info_length, 16);
        let at = 8 + p.per_packet_info_offset as usize;
        let (e, _) = PerPacketInfo::read_from_prefix(&msg[at..]).unwrap();
        assert_eq!(e.ppi_type(), PpiType::TCPIP_CHKSUM);
        match parse(&msg, msg.len()).unwrap() {
            Received::Frame { offset, len, .. } => {
                assert_eq!((offset, len), (head.len(), 100));
                assert!(msg[offset..].iter().all(|&b| b == 0xab));
            }
            other => panic!("{other:?}"),
        }
        // A large send: its LSO entry only, and the VLAN tag.
        let lso = TxOffload {
            lso: Some(Lso {
                mss: 1448,
                l4_offset: 34,
                ipv6: false,
            }),
            vlan: Some(Vlan {
                id: 100,
                priority: 0,
            }),
            ..offload
        };
        packet_head(&mut head, 60000, &lso);
        let (p, _) = RndisPacket::read_from_prefix(&head[8..]).unwrap();
        assert_eq!(p.per_packet_info_length, 32);
        let (e, _) = PerPacketInfo::read_from_prefix(&head[8 + 36..]).unwrap();
        assert_eq!(e.ppi_type(), PpiType::TCP_LARGESEND);
    }

    #[test]
    fn a_hosts_lengths_and_offsets_are_checked() {
        let mut head = Vec::new();
        packet_head(&mut head, 64, &TxOffload::default());
        let mut msg = head.clone();
        msg.resize(head.len() + 64, 0);
        assert!(parse(&msg, msg.len()).is_ok());
        // The message says it is longer than its range.
        assert_eq!(parse(&msg, msg.len() - 1), Err(Malformed::Bounds));
        // The frame runs past the message.
        let mut bad = msg.clone();
        bad[12..16].copy_from_slice(&65u32.to_le_bytes());
        assert_eq!(parse(&bad, bad.len()), Err(Malformed::Bounds));
        // The data offset points inside the packet header, or wraps.
        let mut bad = msg.clone();
        bad[8..12].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(parse(&bad, bad.len()), Err(Malformed::Bounds));
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse(&bad, bad.len()), Err(Malformed::Bounds));
        // Per-packet info of size 0, and past its end.
        let with_ppi = |size: u32| {
            let mut m = msg.clone();
            let ppi = PerPacketInfo {
                size,
                type_internal: 0,
                ppi_offset: 12,
            };
            m.splice(PACKET_HEADER..PACKET_HEADER, ppi.as_bytes().iter().copied());
            m.splice(PACKET_HEADER + 12..PACKET_HEADER + 12, [7, 0, 0, 0]);
            let total = m.len() as u32;
            m[4..8].copy_from_slice(&total.to_le_bytes());
            m[8..12].copy_from_slice(&(36u32 + 16).to_le_bytes());
            m[28..32].copy_from_slice(&36u32.to_le_bytes());
            m[32..36].copy_from_slice(&16u32.to_le_bytes());
            m
        };
        let good = with_ppi(16);
        assert!(parse(&good, good.len()).is_ok());
        let zero = with_ppi(0);
        assert_eq!(parse(&zero, zero.len()), Err(Malformed::Bounds));
        let past = with_ppi(17);
        assert_eq!(parse(&past, past.len()), Err(Malformed::Bounds));
        assert_eq!(parse(&msg[..4], 4), Err(Malformed::Short));
    }

    #[test]
    fn status_indications_and_control_messages() {
        let mut m = RndisMessageHeader {
            message_type: RndisMessageType::INDICATE_STATUS,
            message_length: 20,
        }
        .as_bytes()
        .to_vec();
        m.extend_from_slice(
            IndicateStatus {
                status: RndisStatus::MEDIA_DISCONNECT,
                status_buffer_length: 0,
                status_buffer_offset: 0,
            }
            .as_bytes(),
        );
        assert_eq!(
            parse(&m, m.len()),
            Ok(Received::Status(RndisStatus::MEDIA_DISCONNECT))
        );
        m[0..4].copy_from_slice(&RndisMessageType::QUERY_COMPLETE.0.to_le_bytes());
        assert_eq!(
            parse(&m, m.len()),
            Ok(Received::Control(RndisMessageType::QUERY_COMPLETE))
        );
    }
}
