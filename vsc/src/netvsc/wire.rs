//! RNDIS data messages as netvsc writes and reads them: a PACKET message for a frame with its
//! per-packet info, and what a message from the host says (a frame with its offloads, a status
//! indication, a control completion). Pure functions over bytes, unit-tested; the host is not
//! trusted, so every length and offset is checked against the message.

use netdev::{ChecksumRequest, L4Protocol, RxOffload, TxOffload};
use vmbus_proto::netvsp::RSC_MAX_FRAGMENTS;
use vmbus_proto::rndis::{
    IndicateStatus, InternalPpiType, NdisPkt8021qInfo, NdisTcpIpChecksumInfo, PerPacketInfo,
    PktInfoFlags, PktInfoId, PpiType, RndisMessageHeader, RndisMessageType, RndisPacket,
    RndisStatus,
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
        /// The packet-id flags of a fragment of a coalesced (RSC) frame (`SUBALLOC` set).
        fragment: Option<PktInfoFlags>,
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

/// How many of a message's first bytes [`parse`] needs, given its first [`PACKET_HEADER`]
/// bytes (fewer if the message is shorter) and its length `len`: a PACKET's headers and
/// per-packet info (at most [`MAX_RX_PPI`] of it), other messages' first bytes. A frame's
/// bytes are not read this way, so a fragment of a coalesced frame costs its 36 bytes of
/// headers and the few of its per-packet info, not a fixed 292.
pub fn head_len(first: &[u8], len: usize) -> usize {
    let cap = len.min(PACKET_HEADER + MAX_RX_PPI);
    let Ok((h, body)) = RndisMessageHeader::read_from_prefix(first) else {
        return first.len();
    };
    let Ok((p, _)) = RndisPacket::read_from_prefix(body) else {
        return first.len();
    };
    if h.message_type != RndisMessageType::PACKET || p.per_packet_info_length == 0 {
        return first.len();
    }
    let ppi_end = size_of::<RndisMessageHeader>()
        .saturating_add(p.per_packet_info_offset as usize)
        .saturating_add(p.per_packet_info_length as usize);
    ppi_end.clamp(first.len(), cap.max(first.len()))
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
            let mut fragment = None;
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
                    match (value, e.internal()) {
                        (Some(v), false) => match e.ppi_type() {
                            PpiType::TCPIP_CHKSUM => checksum = Some(NdisTcpIpChecksumInfo(v)),
                            PpiType::IEEE_8021Q => vlan = Some(NdisPkt8021qInfo(v)),
                            PpiType::NBL_HASH_VALUE => hash = Some(v),
                            _ => {}
                        },
                        (Some(v), true) if e.ppi_type().0 == InternalPpiType::PKTINFO_ID.0 => {
                            let id = PktInfoId::read_from_bytes(&v.to_le_bytes()).expect("4 bytes");
                            fragment =
                                Some(id.flags()).filter(|f| f.contains(PktInfoFlags::SUBALLOC));
                        }
                        _ => {}
                    }
                    off += size;
                }
            }
            Ok(Received::Frame {
                offset: data,
                len: p.data_length as usize,
                offload: RxOffload::from_ppi(checksum, vlan, hash),
                fragment,
            })
        }
        RndisMessageType::INDICATE_STATUS => {
            let (s, _) = IndicateStatus::read_from_prefix(body).map_err(|_| Malformed::Short)?;
            Ok(Received::Status(s.status))
        }
        t => Ok(Received::Control(t)),
    }
}

/// Largest frame put together from fragments: IP's 64 KiB, the Ethernet header and a tag.
pub const MAX_COALESCED: usize = 65535 + 14 + 4;

/// Why the fragments of a coalesced frame were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RscError {
    /// A middle or last fragment without a first.
    #[error("RSC fragment without a first")]
    NoFirst,
    /// The transfer ended before a last fragment (or a plain packet came between).
    #[error("RSC frame without a last fragment")]
    NoLast,
    /// More than [`RSC_MAX_FRAGMENTS`] fragments.
    #[error("RSC frame of too many fragments")]
    TooMany,
    /// Longer than [`MAX_COALESCED`].
    #[error("RSC frame too long")]
    TooLong,
}

/// What a message did to the frame being coalesced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coalesced {
    /// Not a fragment: a frame of its own.
    Whole,
    /// A fragment, more to come.
    Pending,
    /// The last fragment: [`Coalescer::fragments`] hold the frame.
    Complete,
}

/// Puts a coalesced (RSC) frame together from the fragments of one transfer-page packet, as
/// Linux's hv_netvsc does: a fragment marked first starts a frame (dropping any unfinished
/// one), one marked last ends it, and it must end within the packet; at most
/// [`RSC_MAX_FRAGMENTS`] fragments and [`MAX_COALESCED`] bytes. Holds the fragments'
/// places only (offset and length, in the receive buffer), bounded.
#[derive(Debug, Default)]
pub struct Coalescer {
    fragments: Vec<(usize, usize)>,
    total: usize,
    offload: RxOffload,
    /// Unfinished frames dropped because a first fragment or a plain packet came before
    /// their last fragment.
    pub abandoned: u64,
}

impl Coalescer {
    /// Takes the message at `at` (`len` frame bytes, `offload`, its packet-id flags if a
    /// fragment) of a transfer-page packet, `last_range` if it is the packet's last. An error
    /// drops the frame being put together with this fragment.
    pub fn push(
        &mut self,
        fragment: Option<PktInfoFlags>,
        last_range: bool,
        at: usize,
        len: usize,
        offload: RxOffload,
    ) -> Result<Coalesced, RscError> {
        let Some(flags) = fragment else {
            if self.reset() {
                self.abandoned += 1;
            }
            return Ok(Coalesced::Whole);
        };
        if flags.contains(PktInfoFlags::FIRST_FRAGMENT) {
            if self.reset() {
                self.abandoned += 1;
            }
            self.offload = offload;
        } else if self.fragments.is_empty() {
            return Err(RscError::NoFirst);
        }
        let more = !flags.contains(PktInfoFlags::LAST_FRAGMENT);
        let error = if more && last_range {
            Some(RscError::NoLast)
        } else if self.fragments.len() >= RSC_MAX_FRAGMENTS {
            Some(RscError::TooMany)
        } else if self.total + len > MAX_COALESCED {
            Some(RscError::TooLong)
        } else {
            None
        };
        if let Some(e) = error {
            self.reset();
            return Err(e);
        }
        self.fragments.push((at, len));
        self.total += len;
        Ok(if more {
            Coalesced::Pending
        } else {
            Coalesced::Complete
        })
    }

    /// The fragments of the frame completed (offset and length of each), its length, and
    /// the first fragment's offloads.
    pub fn fragments(&self) -> (&[(usize, usize)], usize, RxOffload) {
        (&self.fragments, self.total, self.offload)
    }

    /// Forgets the frame; true if one was unfinished.
    pub fn reset(&mut self) -> bool {
        let unfinished = !self.fragments.is_empty();
        self.fragments.clear();
        self.total = 0;
        unfinished
    }
}

/// How to write a coalesced frame of `total` bytes whose first bytes are `head` to a guest
/// TAP of MTU `mtu`: as a TCP GSO frame whose segment size is what the MTU leaves after the
/// frame's IP and TCP headers (the host may cut fragments anywhere, so they say nothing of
/// the segments; segments of that size are the largest the guest could have received one
/// by one, so the guest kernel, should it forward the frame, segments it within its MTU), its IP
/// lengths and pseudo-header checksum rebuilt for the whole; a frame that is not TCP as a
/// frame with a partial checksum. `None` if the host did not vouch for the checksums, or the
/// headers do not hold together (or leave no room for a segment).
pub fn coalesced_offload(
    head: &[u8],
    total: usize,
    mtu: u32,
    offload: &RxOffload,
) -> Option<TxOffload> {
    if !offload.checksum_ok {
        return None;
    }
    let mut o = rx_checksum(head)?;
    let c = o.checksum?;
    if c.l4 == Some(L4Protocol::Tcp) {
        let l3 = if head.get(12..14)? == [0x81, 0x00] {
            18
        } else {
            14
        };
        let l4 = usize::from(c.l4_offset);
        let thl = usize::from(*head.get(l4 + 12)? >> 4) * 4;
        let mss = (mtu as usize)
            .checked_sub(l4 - l3 + thl)
            .filter(|&m| m > 0)?;
        if thl < 20 || mss > usize::from(u16::MAX) || l4 + thl > total {
            return None;
        }
        o.lso = Some(netdev::Lso {
            mss: mss as u32,
            l4_offset: c.l4_offset,
            ipv6: c.ipv6,
        });
        o.checksum = None;
    }
    Some(o)
}

/// For a frame the host says has good checksums: the checksum request that makes the guest
/// TAP take it as such, if it is TCP or UDP over IPv4 (not a fragment) or IPv6 (no extension
/// header). A TAP ignores `DATA_VALID` on write, and the host may have left the transport
/// checksum partial (the host kernel's own frames), so such a frame is written with
/// `NEEDS_CSUM` and the pseudo-header sum in its checksum field (`TxOffload::prepare_tx`): the
/// guest kernel then trusts it, and finishes it if it forwards the frame.
pub fn rx_checksum(head: &[u8]) -> Option<TxOffload> {
    let mut l3 = 14;
    let mut ethertype = u16::from_be_bytes([*head.get(12)?, *head.get(13)?]);
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes([*head.get(16)?, *head.get(17)?]);
        l3 += 4;
    }
    let (ipv6, proto, l4) = match ethertype {
        0x0800 => {
            let ihl = usize::from(head.get(l3)? & 0x0f) * 4;
            let frag = u16::from_be_bytes([*head.get(l3 + 6)?, *head.get(l3 + 7)?]);
            if ihl < 20 || frag & 0x3fff != 0 {
                return None;
            }
            (false, *head.get(l3 + 9)?, l3 + ihl)
        }
        0x86dd => (true, *head.get(l3 + 6)?, l3 + 40),
        _ => return None,
    };
    let l4p = match proto {
        6 => L4Protocol::Tcp,
        17 => L4Protocol::Udp,
        _ => return None,
    };
    Some(TxOffload {
        checksum: Some(ChecksumRequest {
            ipv6,
            ip_header: false,
            l4: Some(l4p),
            l4_offset: u16::try_from(l4).ok()?,
        }),
        lso: None,
        vlan: None,
    })
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
    fn the_head_read_covers_the_per_packet_info_only() {
        let m = fragment_message(PktInfoFlags::SUBALLOC, 1000);
        let n = head_len(&m[..PACKET_HEADER], m.len());
        // The packet-id and checksum entries (16 bytes each) after the headers.
        assert_eq!(n, PACKET_HEADER + 32);
        assert_eq!(parse(&m[..n], m.len()), parse(&m, m.len()));
        // No per-packet info, a short message, info claimed past the cap: bounded.
        let mut plain = Vec::new();
        packet_head(&mut plain, 64, &TxOffload::default());
        assert_eq!(head_len(&plain, 100), PACKET_HEADER);
        assert_eq!(head_len(&m[..10], 10), 10);
        let mut huge = m.clone();
        huge[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            head_len(&huge[..PACKET_HEADER], huge.len()),
            PACKET_HEADER + MAX_RX_PPI
        );
        assert_eq!(head_len(&huge[..PACKET_HEADER], 60), 60);
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
    fn checksums_the_host_vouches_for_become_a_partial_checksum_request() {
        // Ethernet + IPv4 (IHL 5) + TCP.
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[23] = 6;
        let c = rx_checksum(&f).unwrap().checksum.unwrap();
        assert_eq!(
            (c.ipv6, c.l4, c.l4_offset),
            (false, Some(L4Protocol::Tcp), 34)
        );
        // IPv4 options move the transport header.
        f[14] = 0x46;
        assert_eq!(rx_checksum(&f).unwrap().checksum.unwrap().l4_offset, 38);
        // A fragment, ICMP, ARP, a short frame: left alone.
        f[14] = 0x45;
        f[20] = 0x20;
        assert!(rx_checksum(&f).is_none());
        f[20] = 0;
        f[23] = 1;
        assert!(rx_checksum(&f).is_none());
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(rx_checksum(&f).is_none());
        assert!(rx_checksum(&f[..13]).is_none());
        // IPv6 UDP behind a VLAN tag.
        let mut f = vec![0u8; 18 + 40 + 8];
        f[12..14].copy_from_slice(&[0x81, 0x00]);
        f[16..18].copy_from_slice(&[0x86, 0xdd]);
        f[18 + 6] = 17;
        let c = rx_checksum(&f).unwrap().checksum.unwrap();
        assert_eq!(
            (c.ipv6, c.l4, c.l4_offset),
            (true, Some(L4Protocol::Udp), 58)
        );
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

    /// A packet of `frame_len` bytes whose per-packet info is the packet-id entry with
    /// `flags` and a "checksums succeeded" entry.
    fn fragment_message(flags: PktInfoFlags, frame_len: usize) -> Vec<u8> {
        let mut ppi = PerPacketInfo::new(PpiType(InternalPpiType::PKTINFO_ID.0), true, 4)
            .as_bytes()
            .to_vec();
        ppi.extend_from_slice(PktInfoId::new(flags).as_bytes());
        ppi.extend_from_slice(PerPacketInfo::new(PpiType::TCPIP_CHKSUM, false, 4).as_bytes());
        ppi.extend_from_slice(&0x38u32.to_le_bytes());
        let total = PACKET_HEADER + ppi.len() + frame_len;
        let mut m = RndisMessageHeader {
            message_type: RndisMessageType::PACKET,
            message_length: total as u32,
        }
        .as_bytes()
        .to_vec();
        m.extend_from_slice(
            RndisPacket {
                data_offset: (36 + ppi.len()) as u32,
                data_length: frame_len as u32,
                per_packet_info_offset: 36,
                per_packet_info_length: ppi.len() as u32,
                ..Default::default()
            }
            .as_bytes(),
        );
        m.extend_from_slice(&ppi);
        m.resize(total, 0x11);
        m
    }

    #[test]
    fn fragments_are_recognised_by_their_packet_id() {
        use PktInfoFlags as F;
        for (flags, want) in [
            (
                F::SUBALLOC | F::FIRST_FRAGMENT,
                Some(F::SUBALLOC | F::FIRST_FRAGMENT),
            ),
            (F::SUBALLOC, Some(F::SUBALLOC)),
            (
                F::SUBALLOC | F::LAST_FRAGMENT,
                Some(F::SUBALLOC | F::LAST_FRAGMENT),
            ),
            // Without SUBALLOC the flags mean nothing (Linux ignores them).
            (F::FIRST_FRAGMENT, None),
        ] {
            let m = fragment_message(flags, 100);
            match parse(&m, m.len()).unwrap() {
                Received::Frame {
                    fragment, offload, ..
                } => {
                    assert_eq!(fragment, want);
                    assert!(offload.checksum_ok);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn coalescing_follows_linux_and_refuses_hostile_sequences() {
        use PktInfoFlags as F;
        let ok = RxOffload {
            checksum_ok: true,
            ..Default::default()
        };
        let first = Some(F::SUBALLOC | F::FIRST_FRAGMENT);
        let mid = Some(F::SUBALLOC);
        let last = Some(F::SUBALLOC | F::LAST_FRAGMENT);
        let mut c = Coalescer::default();
        // First, middle, last: complete, with the first's offloads.
        assert_eq!(c.push(first, false, 0, 100, ok), Ok(Coalesced::Pending));
        assert_eq!(
            c.push(mid, false, 200, 50, RxOffload::default()),
            Ok(Coalesced::Pending)
        );
        assert_eq!(
            c.push(last, true, 400, 10, RxOffload::default()),
            Ok(Coalesced::Complete)
        );
        let (f, total, o) = c.fragments();
        assert_eq!(
            (f, total, o),
            (&[(0, 100), (200, 50), (400, 10)][..], 160, ok)
        );
        c.reset();
        // A plain packet is whole.
        assert_eq!(c.push(None, true, 0, 60, ok), Ok(Coalesced::Whole));
        // Middle or last without a first.
        assert_eq!(c.push(mid, false, 0, 10, ok), Err(RscError::NoFirst));
        assert_eq!(c.push(last, true, 0, 10, ok), Err(RscError::NoFirst));
        // No last fragment before the packet's end.
        assert_eq!(c.push(first, false, 0, 10, ok), Ok(Coalesced::Pending));
        assert_eq!(c.push(mid, true, 0, 10, ok), Err(RscError::NoLast));
        assert!(!c.reset());
        assert_eq!(c.push(first, true, 0, 10, ok), Err(RscError::NoLast));
        // A first and last at once is a frame of one fragment.
        assert_eq!(
            c.push(
                Some(F::SUBALLOC | F::FIRST_FRAGMENT | F::LAST_FRAGMENT),
                true,
                0,
                10,
                ok
            ),
            Ok(Coalesced::Complete)
        );
        c.reset();
        // An unfinished frame is abandoned (counted) for a new first, or a plain packet.
        assert_eq!(c.push(first, false, 0, 10, ok), Ok(Coalesced::Pending));
        assert_eq!(c.push(first, false, 0, 10, ok), Ok(Coalesced::Pending));
        assert_eq!(c.abandoned, 1);
        assert_eq!(c.push(None, false, 0, 10, ok), Ok(Coalesced::Whole));
        assert_eq!(c.abandoned, 2);
        assert!(!c.reset());
        // Too many fragments: the one past the limit drops the frame.
        assert_eq!(c.push(first, false, 0, 1, ok), Ok(Coalesced::Pending));
        for _ in 1..RSC_MAX_FRAGMENTS {
            assert_eq!(c.push(mid, false, 0, 1, ok), Ok(Coalesced::Pending));
        }
        assert_eq!(c.push(last, true, 0, 1, ok), Err(RscError::TooMany));
        assert!(!c.reset());
        // Too long.
        assert_eq!(c.push(first, false, 0, 60_000, ok), Ok(Coalesced::Pending));
        assert_eq!(c.push(last, true, 0, 6_000, ok), Err(RscError::TooLong));
        assert!(!c.reset());
        assert_eq!(c.fragments().0.len(), 0);
    }

    /// Ethernet, IPv4 (IHL 5) and TCP (20 bytes) headers of a frame of `total` bytes.
    fn tcp_head(total: usize) -> Vec<u8> {
        let mut f = vec![0u8; 54];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((total - 14) as u16).to_be_bytes());
        f[22] = 64;
        f[23] = 6;
        f[46] = 5 << 4;
        f
    }

    #[test]
    fn a_coalesced_tcp_frame_becomes_gso_with_the_segment_size_of_the_mtu() {
        let ok = RxOffload {
            checksum_ok: true,
            ..Default::default()
        };
        let head = tcp_head(54 + 4 * 1448);
        let o = coalesced_offload(&head, 54 + 4 * 1448, 1500, &ok).unwrap();
        let l = o.lso.unwrap();
        // 1500 less 20 bytes of IP and 20 of TCP.
        assert_eq!((l.mss, l.l4_offset, l.ipv6), (1460, 34, false));
        assert!(o.checksum.is_none());
        let mut full = head.clone();
        full.resize(54 + 4 * 1448, 0);
        let plan = o.prepare_tx(full.len(), &full).unwrap();
        assert_eq!(plan.hdr.gso_type, netdev::vnet::gso::TCPV4);
        assert_eq!(plan.hdr.gso_size.get(), 1460);
        assert_eq!(plan.hdr.hdr_len.get(), 54);
        assert!(plan.hdr.flags().contains(netdev::VnetFlags::NEEDS_CSUM));
        // TCP options (timestamps) and IPv4 options shorten the segments.
        let mut opts = tcp_head(6000);
        opts[46] = 8 << 4;
        opts.resize(66, 0);
        let o = coalesced_offload(&opts, 6000, 1500, &ok).unwrap();
        assert_eq!(o.lso.unwrap().mss, 1448);
        let mut ipopt = vec![0u8; 58];
        ipopt[..34].copy_from_slice(&head[..34]);
        ipopt[14] = 0x46;
        ipopt[50] = 5 << 4;
        let o = coalesced_offload(&ipopt, 6000, 9000, &ok).unwrap();
        assert_eq!((o.lso.unwrap().mss, o.lso.unwrap().l4_offset), (8956, 38));
        // IPv6 behind a VLAN tag: 40 bytes of IP.
        let mut v6 = vec![0u8; 18 + 40 + 20];
        v6[12..14].copy_from_slice(&[0x81, 0x00]);
        v6[16..18].copy_from_slice(&[0x86, 0xdd]);
        v6[18 + 6] = 6;
        v6[58 + 12] = 5 << 4;
        let o = coalesced_offload(&v6, 6000, 1500, &ok).unwrap();
        let l = o.lso.unwrap();
        assert_eq!((l.mss, l.l4_offset, l.ipv6), (1440, 58, true));
        // Unvouched checksums, an MTU that leaves no segment, headers past the frame's end,
        // a non-IP frame: refused.
        assert!(coalesced_offload(&head, 6000, 1500, &RxOffload::default()).is_none());
        assert!(coalesced_offload(&head, 6000, 40, &ok).is_none());
        assert!(coalesced_offload(&head, 50, 1500, &ok).is_none());
        assert!(coalesced_offload(&head[..40], 6000, 1500, &ok).is_none());
        let mut arp = head.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(coalesced_offload(&arp, 6000, 1500, &ok).is_none());
        // UDP keeps a partial checksum, no GSO.
        let mut udp = head.clone();
        udp[23] = 17;
        let o = coalesced_offload(&udp, 3000, 1500, &ok).unwrap();
        assert!(o.lso.is_none() && o.checksum.is_some());
    }
}
