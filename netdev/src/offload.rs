//! A frame's offloads in a neutral form, and their conversions: to and from RNDIS per-packet
//! info (what netvsc and netvsp exchange) and to and from the virtio-net header (what the TAP
//! takes and gives).
//!
//! Sending toward a TAP ([`TxOffload::prepare_tx`]) also repairs what a Hyper-V guest leaves in
//! a large send: Linux's hv_netvsc zeroes the IPv4 total length and header checksum (the IPv6
//! payload length) and puts a pseudo-header checksum of length zero in TCP, as Hyper-V's
//! segmenter wants; the kernel's GSO instead adjusts a pseudo-header checksum that covers the
//! whole frame. The lengths and checksums are rebuilt from the frame's real length on a copy of
//! the headers, never in the guest's memory.

use vmbus_proto::rndis::{NdisPkt8021qInfo, NdisTcpIpChecksumInfo, NdisTcpLsoInfo};
use zerocopy::byteorder::little_endian::U16;

use crate::vnet::{gso, VirtioNetHdr, VnetFlags};
use crate::Error;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_CSUM_OFFSET: usize = 16;
const UDP_CSUM_OFFSET: usize = 6;
/// Bytes of a VLAN tag.
pub const VLAN_TAG_LEN: usize = 4;
/// Largest TCP header.
const MAX_TCP_HLEN: usize = 60;
/// Largest L4 offset RNDIS can express (10 bits).
const MAX_L4_OFFSET: usize = 1023;
/// Most header bytes a [`TxPlan`] holds: the largest L4 offset, the largest TCP header and a
/// VLAN tag.
pub const MAX_HEAD: usize = MAX_L4_OFFSET + MAX_TCP_HLEN + VLAN_TAG_LEN;

/// An 802.1Q tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vlan {
    /// VLAN id (12 bits).
    pub id: u16,
    /// User priority (3 bits).
    pub priority: u8,
}

impl Vlan {
    /// The tag control information (priority, DEI 0, id).
    pub fn tci(&self) -> u16 {
        (u16::from(self.priority) & 7) << 13 | (self.id & 0xfff)
    }

    /// From tag control information.
    pub fn from_tci(tci: u16) -> Self {
        Self {
            id: tci & 0xfff,
            priority: (tci >> 13) as u8,
        }
    }

    /// From RNDIS per-packet info.
    pub fn from_ppi(v: NdisPkt8021qInfo) -> Self {
        Self {
            id: v.vlan_id() as u16,
            priority: v.priority() as u8,
        }
    }

    /// To RNDIS per-packet info.
    pub fn to_ppi(&self) -> NdisPkt8021qInfo {
        NdisPkt8021qInfo::new(self.priority, false, self.id)
    }

    /// The tag as it sits in a frame after the addresses.
    pub fn tag_bytes(&self) -> [u8; VLAN_TAG_LEN] {
        let t = ETH_P_8021Q.to_be_bytes();
        let c = self.tci().to_be_bytes();
        [t[0], t[1], c[0], c[1]]
    }

    /// The tag of a frame whose first 16 bytes (at least) are `head`, if it has one.
    pub fn of_frame(head: &[u8]) -> Option<Self> {
        if head.len() < ETH_HLEN + 2 || be16(head, 12) != ETH_P_8021Q {
            return None;
        }
        Some(Self::from_tci(be16(head, 14)))
    }
}

/// The transport protocol of a checksum request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// Checksums the sender left for the other side to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChecksumRequest {
    /// The frame is IPv6 (else IPv4), as the sender says.
    pub ipv6: bool,
    /// Compute the IPv4 header checksum.
    pub ip_header: bool,
    /// Compute this transport checksum.
    pub l4: Option<L4Protocol>,
    /// Offset of the transport header from the frame's start.
    pub l4_offset: u16,
}

/// A TCP large send: segment the frame's payload into `mss`-byte segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lso {
    /// Maximum segment size.
    pub mss: u32,
    /// Offset of the TCP header from the frame's start.
    pub l4_offset: u16,
    /// The frame is IPv6 (else IPv4), as the sender says.
    pub ipv6: bool,
}

/// Offloads of a frame a guest sends (toward the host's TAP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxOffload {
    /// Checksums to compute.
    pub checksum: Option<ChecksumRequest>,
    /// Large send.
    pub lso: Option<Lso>,
    /// A tag to insert.
    pub vlan: Option<Vlan>,
}

/// Offloads of a frame delivered to a guest (from the host's TAP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RxOffload {
    /// The IP and transport checksums are known good. (From a TAP that accepts `CSUM`, also a
    /// local sender's frame whose checksum is still to be done, which RNDIS cannot express:
    /// netvsp gives its TAP offloads only for a guest that takes coalesced (RSC) frames, whose
    /// checksums count as verified.)
    pub checksum_ok: bool,
    /// The tag the frame had (removed from its bytes).
    pub vlan: Option<Vlan>,
    /// The receive hash.
    pub hash: Option<u32>,
}

/// How to write a frame with offloads to the TAP: the header, then [`TxPlan::head`] in place of
/// the frame's first [`TxPlan::consumed`] bytes, then the rest of the frame.
#[derive(Clone)]
pub struct TxPlan {
    /// The virtio-net header.
    pub hdr: VirtioNetHdr,
    head: [u8; MAX_HEAD],
    head_len: usize,
    /// Bytes at the frame's start that [`TxPlan::head`] replaces.
    pub consumed: usize,
}

impl std::fmt::Debug for TxPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxPlan")
            .field("hdr", &self.hdr)
            .field("head_len", &self.head_len)
            .field("consumed", &self.consumed)
            .finish()
    }
}

impl TxPlan {
    /// The rewritten first bytes of the frame.
    pub fn head(&self) -> &[u8] {
        &self.head[..self.head_len]
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put_be16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Adds `bytes` as big-endian 16-bit words (an odd last byte padded with zero) to `acc`.
pub fn csum_add(mut acc: u64, bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a sum to 16 bits (one's complement addition).
pub fn csum_fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `bytes` (complemented fold).
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    !csum_fold(csum_add(0, bytes))
}

/// The pseudo-header sum (folded, not complemented) a partial transport checksum starts from.
fn pseudo_sum(ip: &IpHeader, proto: u8, l4_len: usize, head: &[u8]) -> u64 {
    let mut acc = csum_add(0, &head[ip.src.clone()]);
    acc = csum_add(acc, &head[ip.dst.clone()]);
    acc + u64::from(proto) + l4_len as u64
}

/// Where the IP header and its addresses are in a frame's head.
struct IpHeader {
    l3: usize,
    v6: bool,
    /// Header length (IPv4 IHL; 40 for IPv6).
    len: usize,
    /// IPv4 protocol or IPv6 next header.
    proto: u8,
    src: std::ops::Range<usize>,
    dst: std::ops::Range<usize>,
}

/// Finds the IP header in `head` (the frame's first bytes).
fn ip_header(head: &[u8]) -> Result<IpHeader, Error> {
    if head.len() < ETH_HLEN {
        return Err(Error::Runt(head.len()));
    }
    let (mut l3, mut ethertype) = (ETH_HLEN, be16(head, 12));
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        if head.len() < ETH_HLEN + VLAN_TAG_LEN {
            return Err(Error::NotIp);
        }
        l3 += VLAN_TAG_LEN;
        ethertype = be16(head, 16);
    }
    match ethertype {
        ETH_P_IP => {
            let b = *head.get(l3).ok_or(Error::NotIp)?;
            let len = usize::from(b & 0xf) * 4;
            if b >> 4 != 4 || len < 20 || l3 + len > head.len() {
                return Err(Error::NotIp);
            }
            Ok(IpHeader {
                l3,
                v6: false,
                len,
                proto: head[l3 + 9],
                src: l3 + 12..l3 + 16,
                dst: l3 + 16..l3 + 20,
            })
        }
        ETH_P_IPV6 => {
            if l3 + 40 > head.len() || head[l3] >> 4 != 6 {
                return Err(Error::NotIp);
            }
            Ok(IpHeader {
                l3,
                v6: true,
                len: 40,
                proto: head[l3 + 6],
                src: l3 + 8..l3 + 24,
                dst: l3 + 24..l3 + 40,
            })
        }
        _ => Err(Error::NotIp),
    }
}

/// Recomputes the IPv4 header checksum in place.
fn fix_ipv4_header_checksum(head: &mut [u8], ip: &IpHeader) {
    put_be16(head, ip.l3 + 10, 0);
    let c = internet_checksum(&head[ip.l3..ip.l3 + ip.len]);
    put_be16(head, ip.l3 + 10, c);
}

impl TxOffload {
    /// From the RNDIS per-packet info of a guest's packet (the entries it carried).
    pub fn from_ppi(
        checksum: Option<NdisTcpIpChecksumInfo>,
        lso: Option<NdisTcpLsoInfo>,
        vlan: Option<NdisPkt8021qInfo>,
    ) -> Self {
        let checksum = checksum.and_then(|c| {
            let l4 = if c.tx_tcp_checksum() != 0 {
                Some(L4Protocol::Tcp)
            } else if c.tx_udp_checksum() != 0 {
                Some(L4Protocol::Udp)
            } else {
                None
            };
            let ip_header = c.tx_ip_header_checksum() != 0;
            (l4.is_some() || ip_header).then_some(ChecksumRequest {
                ipv6: c.tx_is_ipv6() != 0,
                ip_header,
                l4,
                l4_offset: c.tx_tcp_header_offset() as u16,
            })
        });
        let lso = lso.map(|l| Lso {
            mss: l.mss(),
            l4_offset: l.tcp_header_offset() as u16,
            ipv6: l.ip_version() != 0,
        });
        Self {
            checksum,
            lso,
            vlan: vlan.map(Vlan::from_ppi),
        }
    }

    /// The RNDIS checksum entry for this frame, if it asks for checksums.
    pub fn checksum_ppi(&self) -> Option<NdisTcpIpChecksumInfo> {
        let c = self.checksum?;
        let mut v = if c.ipv6 { 2 } else { 1 };
        match c.l4 {
            Some(L4Protocol::Tcp) => v |= 1 << 2,
            Some(L4Protocol::Udp) => v |= 1 << 3,
            None => {}
        }
        if c.ip_header {
            v |= 1 << 4;
        }
        v |= (u32::from(c.l4_offset) & 0x3ff) << 16;
        Some(NdisTcpIpChecksumInfo(v))
    }

    /// The RNDIS large-send entry (LSO v2) for this frame, if it is a large send.
    pub fn lso_ppi(&self) -> Option<NdisTcpLsoInfo> {
        let l = self.lso?;
        Some(NdisTcpLsoInfo(
            (l.mss & 0xf_ffff)
                | (u32::from(l.l4_offset) & 0x3ff) << 20
                | 1 << 30
                | u32::from(l.ipv6) << 31,
        ))
    }

    /// From the virtio-net header of a frame read from a TAP whose first bytes are `head`
    /// (at least the Ethernet header).
    pub fn from_vnet(hdr: &VirtioNetHdr, head: &[u8]) -> Result<Self, Error> {
        let mut out = Self::default();
        let ipv6 = ip_header(head).map(|ip| ip.v6).unwrap_or(false);
        let start = hdr.csum_start.get();
        if hdr.flags().contains(VnetFlags::NEEDS_CSUM) {
            let l4 = match usize::from(hdr.csum_offset.get()) {
                TCP_CSUM_OFFSET => L4Protocol::Tcp,
                UDP_CSUM_OFFSET => L4Protocol::Udp,
                _ => return Err(Error::HeaderOffset(usize::from(start))),
            };
            if usize::from(start) > MAX_L4_OFFSET {
                return Err(Error::HeaderOffset(usize::from(start)));
            }
            out.checksum = Some(ChecksumRequest {
                ipv6,
                ip_header: !ipv6,
                l4: Some(l4),
                l4_offset: start,
            });
        }
        match hdr.gso_type & !gso::ECN {
            gso::NONE => {}
            t @ (gso::TCPV4 | gso::TCPV6) => {
                if !hdr.flags().contains(VnetFlags::NEEDS_CSUM) {
                    return Err(Error::HeaderOffset(usize::from(start)));
                }
                out.lso = Some(Lso {
                    mss: u32::from(hdr.gso_size.get()),
                    l4_offset: start,
                    ipv6: t == gso::TCPV6,
                });
            }
            t => return Err(Error::UnsupportedGso(t)),
        }
        Ok(out)
    }

    /// How many of the frame's first bytes [`TxOffload::prepare_tx`] needs.
    pub fn headers_wanted(&self, frame_len: usize) -> usize {
        let l4 = match (self.lso, self.checksum) {
            (Some(l), _) => Some(usize::from(l.l4_offset)),
            (None, Some(c)) if c.l4.is_some() => Some(usize::from(c.l4_offset)),
            // An IPv4 header checksum alone: the Ethernet, VLAN and longest IPv4 headers.
            (None, Some(_)) => Some(ETH_HLEN + VLAN_TAG_LEN + 60 - MAX_TCP_HLEN),
            (None, None) => None,
        };
        match l4 {
            Some(off) => (off.min(MAX_L4_OFFSET) + MAX_TCP_HLEN).min(frame_len),
            None if self.vlan.is_some() => 12.min(frame_len),
            None => 0,
        }
    }

    /// Plans the write of a `frame_len`-byte frame whose first bytes are `head_src` (at least
    /// [`TxOffload::headers_wanted`] of them) to a TAP: the virtio-net header for its checksum
    /// and large-send requests, and its rewritten headers (lengths and checksums restored, the
    /// VLAN tag inserted). Fails, without panicking, on whatever the frame does not support:
    /// an MSS of 0, a header offset outside the frame, a frame that is not IP or not TCP.
    pub fn prepare_tx(&self, frame_len: usize, head_src: &[u8]) -> Result<TxPlan, Error> {
        if frame_len < ETH_HLEN {
            return Err(Error::Runt(frame_len));
        }
        let want = self.headers_wanted(frame_len);
        if head_src.len() < want {
            return Err(Error::HeaderOffset(want));
        }
        let mut work = [0u8; MAX_HEAD];
        let w = &mut work[..want];
        w.copy_from_slice(&head_src[..want]);
        let mut hdr = VirtioNetHdr::default();
        if let Some(lso) = self.lso {
            hdr = prepare_lso(&lso, frame_len, w)?;
        } else if let Some(c) = self.checksum {
            hdr = prepare_checksum(&c, frame_len, w)?;
        }
        let mut plan = TxPlan {
            hdr,
            head: [0; MAX_HEAD],
            head_len: 0,
            consumed: want,
        };
        match self.vlan {
            Some(v) => {
                plan.head[..12].copy_from_slice(&work[..12]);
                plan.head[12..16].copy_from_slice(&v.tag_bytes());
                plan.head[16..want + VLAN_TAG_LEN].copy_from_slice(&work[12..want]);
                plan.head_len = want + VLAN_TAG_LEN;
                let tag = VLAN_TAG_LEN as u16;
                if plan.hdr.flags().contains(VnetFlags::NEEDS_CSUM) {
                    plan.hdr.csum_start = U16::new(plan.hdr.csum_start.get() + tag);
                }
                if plan.hdr.gso_type != gso::NONE {
                    plan.hdr.hdr_len = U16::new(plan.hdr.hdr_len.get() + tag);
                }
            }
            None => {
                plan.head[..want].copy_from_slice(&work[..want]);
                plan.head_len = want;
            }
        }
        Ok(plan)
    }
}

fn prepare_lso(lso: &Lso, frame_len: usize, w: &mut [u8]) -> Result<VirtioNetHdr, Error> {
    if lso.mss == 0 || lso.mss > u32::from(u16::MAX) {
        return Err(Error::BadMss(lso.mss));
    }
    let l4 = usize::from(lso.l4_offset);
    let ip = ip_header(w)?;
    if l4 < ip.l3 + ip.len || l4 + 20 > w.len() || l4 + 20 > frame_len {
        return Err(Error::HeaderOffset(l4));
    }
    let ip_len = u16::try_from(frame_len - ip.l3).map_err(|_| Error::TooLong(frame_len))?;
    if ip.v6 {
        if l4 == ip.l3 + ip.len && ip.proto != IPPROTO_TCP {
            return Err(Error::NotTcp);
        }
        put_be16(w, ip.l3 + 4, ip_len - 40);
    } else {
        if ip.proto != IPPROTO_TCP {
            return Err(Error::NotTcp);
        }
        put_be16(w, ip.l3 + 2, ip_len);
        fix_ipv4_header_checksum(w, &ip);
    }
    let thl = usize::from(w[l4 + 12] >> 4) * 4;
    if thl < 20 || l4 + thl > w.len() || l4 + thl > frame_len {
        return Err(Error::NotTcp);
    }
    let sum = pseudo_sum(&ip, IPPROTO_TCP, frame_len - l4, w);
    put_be16(w, l4 + TCP_CSUM_OFFSET, csum_fold(sum));
    let mut hdr = VirtioNetHdr {
        flags: VnetFlags::NEEDS_CSUM.bits(),
        csum_start: U16::new(l4 as u16),
        csum_offset: U16::new(TCP_CSUM_OFFSET as u16),
        ..Default::default()
    };
    // A "large" send that fits one segment goes as a plain frame.
    if frame_len - l4 - thl > lso.mss as usize {
        hdr.gso_type = if ip.v6 { gso::TCPV6 } else { gso::TCPV4 };
        hdr.gso_size = U16::new(lso.mss as u16);
        hdr.hdr_len = U16::new((l4 + thl) as u16);
    }
    Ok(hdr)
}

fn prepare_checksum(
    c: &ChecksumRequest,
    frame_len: usize,
    w: &mut [u8],
) -> Result<VirtioNetHdr, Error> {
    let ip = ip_header(w)?;
    if !ip.v6 && c.ip_header {
        fix_ipv4_header_checksum(w, &ip);
    }
    let Some(proto) = c.l4 else {
        return Ok(VirtioNetHdr::default());
    };
    let l4 = usize::from(c.l4_offset);
    let (number, field, min_len) = match proto {
        L4Protocol::Tcp => (IPPROTO_TCP, TCP_CSUM_OFFSET, 20),
        L4Protocol::Udp => (IPPROTO_UDP, UDP_CSUM_OFFSET, 8),
    };
    if l4 < ip.l3 + ip.len || l4 + min_len > w.len() || l4 + min_len > frame_len {
        return Err(Error::HeaderOffset(l4));
    }
    if !ip.v6 && u16::try_from(frame_len - l4).is_err() {
        return Err(Error::TooLong(frame_len));
    }
    let sum = pseudo_sum(&ip, number, frame_len - l4, w);
    put_be16(w, l4 + field, csum_fold(sum));
    Ok(VirtioNetHdr {
        flags: VnetFlags::NEEDS_CSUM.bits(),
        csum_start: U16::new(l4 as u16),
        csum_offset: U16::new(field as u16),
        ..Default::default()
    })
}

impl RxOffload {
    /// From the virtio-net header of a frame read from a TAP. GSO frames are refused: without
    /// RSC the TAP is not told to accept them (the kernel segments before they reach us), and
    /// with it netvsp delivers them as fragments and asks this of the header without its GSO
    /// part.
    pub fn from_vnet(hdr: &VirtioNetHdr) -> Result<Self, Error> {
        let t = hdr.gso_type & !gso::ECN;
        if t != gso::NONE {
            return Err(Error::UnsupportedGso(t));
        }
        Ok(Self {
            checksum_ok: hdr
                .flags()
                .intersects(VnetFlags::DATA_VALID | VnetFlags::NEEDS_CSUM),
            vlan: None,
            hash: None,
        })
    }

    /// The virtio-net header for writing this frame to a TAP. (The kernel's tun driver acts
    /// on `NEEDS_CSUM` and GSO only: `DATA_VALID` is informative on this side.)
    pub fn to_vnet(&self) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: if self.checksum_ok {
                VnetFlags::DATA_VALID.bits()
            } else {
                0
            },
            ..Default::default()
        }
    }

    /// The RNDIS checksum entry: IP, TCP and UDP checksums succeeded, if known good.
    pub fn checksum_ppi(&self) -> Option<NdisTcpIpChecksumInfo> {
        self.checksum_ok
            .then_some(NdisTcpIpChecksumInfo(1 << 3 | 1 << 4 | 1 << 5))
    }

    /// From the RNDIS per-packet info of a received packet.
    pub fn from_ppi(
        checksum: Option<NdisTcpIpChecksumInfo>,
        vlan: Option<NdisPkt8021qInfo>,
        hash: Option<u32>,
    ) -> Self {
        let checksum_ok = checksum.is_some_and(|c| {
            (c.rx_tcp_checksum_succeeded() != 0 || c.rx_udp_checksum_succeeded() != 0)
                && c.rx_tcp_checksum_failed() == 0
                && c.rx_udp_checksum_failed() == 0
                && c.rx_ip_checksum_failed() == 0
        });
        Self {
            checksum_ok,
            vlan: vlan.map(Vlan::from_ppi),
            hash,
        }
    }
}

/// Frame builders for tests (of this crate and of its users' tests through copies of the
/// frames they produce).
#[cfg(test)]
pub(crate) mod frames {
    use super::*;

    /// A TCP/IPv4 (or IPv6) frame with `payload` bytes, as hv_netvsc sends a large send: IP
    /// lengths zero, IPv4 header checksum zero, TCP checksum the pseudo-header sum of length 0.
    pub fn tcp(v6: bool, payload: usize, netvsc_lso: bool) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        let l3 = ETH_HLEN;
        let iplen = if v6 { 40 } else { 20 };
        let total = l3 + iplen + 20 + payload;
        f.extend_from_slice(&(if v6 { ETH_P_IPV6 } else { ETH_P_IP }).to_be_bytes());
        f.resize(total, 0);
        if v6 {
            f[l3] = 0x60;
            put_be16(
                &mut f,
                l3 + 4,
                if netvsc_lso { 0 } else { (20 + payload) as u16 },
            );
            f[l3 + 6] = IPPROTO_TCP;
            f[l3 + 7] = 64;
            f[l3 + 8..l3 + 24]
                .copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            f[l3 + 24..l3 + 40]
                .copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            f[l3] = 0x45;
            put_be16(
                &mut f,
                l3 + 2,
                if netvsc_lso { 0 } else { (total - l3) as u16 },
            );
            f[l3 + 8] = 64;
            f[l3 + 9] = IPPROTO_TCP;
            f[l3 + 12..l3 + 16].copy_from_slice(&[10, 0, 0, 1]);
            f[l3 + 16..l3 + 20].copy_from_slice(&[10, 0, 0, 2]);
            if !netvsc_lso {
                let ip = ip_header(&f).unwrap();
                fix_ipv4_header_checksum(&mut f, &ip);
            }
        }
        let l4 = l3 + iplen;
        put_be16(&mut f, l4, 40000);
        put_be16(&mut f, l4 + 2, 5201);
        f[l4 + 12] = 5 << 4;
        f[l4 + 13] = 0x18;
        for (i, b) in f[l4 + 20..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let ip = ip_header(&f).unwrap();
        let len = if netvsc_lso { 0 } else { total - l4 };
        let sum = pseudo_sum(&ip, IPPROTO_TCP, len, &f);
        put_be16(&mut f, l4 + 16, csum_fold(sum));
        f
    }

    /// Whether the TCP checksum of `f` (whose field holds a partial sum) completes to the
    /// checksum computed from scratch over pseudo-header and segment.
    pub fn partial_completes(f: &[u8], l4: usize) -> bool {
        let ip = ip_header(f).unwrap();
        // What the kernel does with NEEDS_CSUM: sum from csum_start to the end, field included.
        let done = !csum_fold(csum_add(0, &f[l4..]));
        let mut copy = f.to_vec();
        put_be16(&mut copy, l4 + 16, 0);
        let reference = !csum_fold(
            pseudo_sum(&ip, IPPROTO_TCP, f.len() - l4, &copy) + csum_add(0, &copy[l4..]),
        );
        done == reference
    }
}

#[cfg(test)]
mod tests {
    use super::frames::*;
    use super::*;

    fn lso(v6: bool, mss: u32, l4: usize) -> TxOffload {
        TxOffload {
            lso: Some(Lso {
                mss,
                l4_offset: l4 as u16,
                ipv6: v6,
            }),
            ..Default::default()
        }
    }

    fn apply(plan: &TxPlan, frame: &[u8]) -> Vec<u8> {
        let mut out = plan.head().to_vec();
        out.extend_from_slice(&frame[plan.consumed..]);
        out
    }

    #[test]
    fn a_netvsc_ipv4_large_send_gets_its_lengths_and_checksums_back() {
        let f = tcp(false, 6000, true);
        let plan = lso(false, 1448, 34).prepare_tx(f.len(), &f).unwrap();
        let out = apply(&plan, &f);
        assert_eq!(out.len(), f.len());
        assert_eq!(be16(&out, 16) as usize, f.len() - 14, "IPv4 total length");
        assert_eq!(internet_checksum(&out[14..34]), 0, "IPv4 header checksum");
        assert!(partial_completes(&out, 34));
        assert_eq!(out, tcp(false, 6000, false), "same as a kernel-built frame");
        let h = plan.hdr;
        assert_eq!(h.flags(), VnetFlags::NEEDS_CSUM);
        assert_eq!(h.gso_type, gso::TCPV4);
        assert_eq!((h.gso_size.get(), h.hdr_len.get()), (1448, 54));
        assert_eq!((h.csum_start.get(), h.csum_offset.get()), (34, 16));
        // The guest's copy is untouched.
        assert_eq!(be16(&f, 16), 0);
    }

    #[test]
    fn a_netvsc_ipv6_large_send_gets_its_payload_length_back() {
        let f = tcp(true, 9000, true);
        let plan = lso(true, 1428, 54).prepare_tx(f.len(), &f).unwrap();
        let out = apply(&plan, &f);
        assert_eq!(be16(&out, 18) as usize, f.len() - 54, "IPv6 payload length");
        assert!(partial_completes(&out, 54));
        assert_eq!(out, tcp(true, 9000, false));
        assert_eq!(plan.hdr.gso_type, gso::TCPV6);
        assert_eq!(plan.hdr.hdr_len.get(), 74);
    }

    #[test]
    fn a_large_send_of_one_segment_is_a_plain_checksummed_frame() {
        let f = tcp(false, 1000, true);
        let plan = lso(false, 1448, 34).prepare_tx(f.len(), &f).unwrap();
        assert_eq!(plan.hdr.gso_type, gso::NONE);
        assert_eq!(plan.hdr.flags(), VnetFlags::NEEDS_CSUM);
        assert!(partial_completes(&apply(&plan, &f), 34));
    }

    #[test]
    fn bad_large_sends_are_errors() {
        let f = tcp(false, 6000, true);
        assert!(matches!(
            lso(false, 0, 34).prepare_tx(f.len(), &f),
            Err(Error::BadMss(0))
        ));
        assert!(matches!(
            lso(false, 1 << 19, 34).prepare_tx(f.len(), &f),
            Err(Error::BadMss(_))
        ));
        // Header offset past the frame, inside the IP header, past the copied headers.
        let short = &f[..40];
        assert!(matches!(
            lso(false, 1448, 34).prepare_tx(short.len(), short),
            Err(Error::HeaderOffset(34))
        ));
        assert!(matches!(
            lso(false, 1448, 20).prepare_tx(f.len(), &f),
            Err(Error::HeaderOffset(20))
        ));
        let small = &f[..1000];
        assert!(matches!(
            lso(false, 1448, 1023).prepare_tx(small.len(), small),
            Err(Error::HeaderOffset(1023))
        ));
        assert!(matches!(
            lso(false, 1448, 1023).prepare_tx(f.len(), &f[..100]),
            Err(Error::HeaderOffset(_))
        ));
        // Not IP, not TCP, a runt.
        let mut arp = f.clone();
        put_be16(&mut arp, 12, 0x0806);
        assert!(matches!(
            lso(false, 1448, 34).prepare_tx(arp.len(), &arp),
            Err(Error::NotIp)
        ));
        let mut udp = f.clone();
        udp[23] = IPPROTO_UDP;
        assert!(matches!(
            lso(false, 1448, 34).prepare_tx(udp.len(), &udp),
            Err(Error::NotTcp)
        ));
        assert!(matches!(
            lso(false, 1448, 34).prepare_tx(10, &f[..10]),
            Err(Error::Runt(10))
        ));
        // A frame longer than IPv4 can say.
        let big = tcp(false, 70000, true);
        assert!(matches!(
            lso(false, 1448, 34).prepare_tx(big.len(), &big),
            Err(Error::TooLong(_))
        ));
    }

    #[test]
    fn no_input_panics() {
        // Every offset and every truncation of a few frames, with every kind of request.
        let frames = [tcp(false, 200, true), tcp(true, 200, false)];
        for f in &frames {
            for cut in [0, 1, 13, 14, 17, 30, 34, 40, 53, 54, 60, 73, 74, f.len()] {
                let f = &f[..cut.min(f.len())];
                for off in [0u16, 1, 13, 14, 33, 34, 53, 54, 60, 200, 1023] {
                    for t in [
                        lso(false, 1, off.into()),
                        TxOffload {
                            checksum: Some(ChecksumRequest {
                                ipv6: false,
                                ip_header: true,
                                l4: Some(L4Protocol::Udp),
                                l4_offset: off,
                            }),
                            vlan: Some(Vlan { id: 5, priority: 1 }),
                            ..Default::default()
                        },
                        TxOffload {
                            checksum: Some(ChecksumRequest {
                                ipv6: true,
                                ip_header: true,
                                l4: None,
                                l4_offset: off,
                            }),
                            ..Default::default()
                        },
                    ] {
                        let _ = t.prepare_tx(f.len(), f);
                        let _ = t.prepare_tx(f.len() + 5000, f);
                    }
                }
            }
        }
    }

    #[test]
    fn checksum_requests_become_needs_csum_with_a_fresh_pseudo_header() {
        let mut f = tcp(false, 500, false);
        put_be16(&mut f, 50, 0xdead); // whatever the guest left in the field
        put_be16(&mut f, 24, 0xbeef); // and in the IP header checksum
        let t = TxOffload::from_ppi(
            Some(NdisTcpIpChecksumInfo(1 | 1 << 2 | 1 << 4 | 34 << 16)),
            None,
            None,
        );
        assert_eq!(
            t.checksum,
            Some(ChecksumRequest {
                ipv6: false,
                ip_header: true,
                l4: Some(L4Protocol::Tcp),
                l4_offset: 34
            })
        );
        let plan = t
            .prepare_tx(f.len(), &f[..t.headers_wanted(f.len())])
            .unwrap();
        let out = apply(&plan, &f);
        assert_eq!(out, tcp(false, 500, false));
        assert_eq!(
            (plan.hdr.csum_start.get(), plan.hdr.csum_offset.get()),
            (34, 16)
        );
        assert_eq!(plan.hdr.gso_type, gso::NONE);
    }

    #[test]
    fn a_vlan_tag_is_inserted_and_offsets_follow() {
        let f = tcp(false, 6000, true);
        let mut t = lso(false, 1448, 34);
        t.vlan = Some(Vlan {
            id: 100,
            priority: 3,
        });
        let plan = t.prepare_tx(f.len(), &f).unwrap();
        let out = apply(&plan, &f);
        assert_eq!(out.len(), f.len() + 4);
        assert_eq!(
            Vlan::of_frame(&out),
            Some(Vlan {
                id: 100,
                priority: 3
            })
        );
        let mut untagged = out[..12].to_vec();
        untagged.extend_from_slice(&out[16..]);
        assert_eq!(untagged, tcp(false, 6000, false));
        assert_eq!(
            (plan.hdr.csum_start.get(), plan.hdr.hdr_len.get()),
            (38, 58)
        );
        assert!(partial_completes(&out, 38));
        // A tag alone copies only the addresses.
        let t = TxOffload {
            vlan: Some(Vlan { id: 7, priority: 0 }),
            ..Default::default()
        };
        let plan = t.prepare_tx(f.len(), &f).unwrap();
        assert_eq!((plan.consumed, plan.head().len()), (12, 16));
        assert_eq!(plan.hdr, VirtioNetHdr::default());
    }

    #[test]
    fn ppi_round_trips() {
        let t = TxOffload {
            checksum: Some(ChecksumRequest {
                ipv6: true,
                ip_header: false,
                l4: Some(L4Protocol::Udp),
                l4_offset: 58,
            }),
            lso: Some(Lso {
                mss: 8948,
                l4_offset: 58,
                ipv6: true,
            }),
            vlan: Some(Vlan {
                id: 4095,
                priority: 7,
            }),
        };
        let back = TxOffload::from_ppi(t.checksum_ppi(), t.lso_ppi(), t.vlan.map(|v| v.to_ppi()));
        assert_eq!(back, t);
        assert_eq!(t.lso_ppi().unwrap().lso_type(), 1);
        let r = RxOffload {
            checksum_ok: true,
            vlan: Some(Vlan { id: 9, priority: 2 }),
            hash: Some(77),
        };
        assert_eq!(
            RxOffload::from_ppi(r.checksum_ppi(), r.vlan.map(|v| v.to_ppi()), r.hash),
            r
        );
        // A failure bit wins over a success bit.
        assert!(
            !RxOffload::from_ppi(Some(NdisTcpIpChecksumInfo(1 << 3 | 1)), None, None).checksum_ok
        );
    }

    #[test]
    fn vnet_headers_convert_both_ways() {
        let f = tcp(true, 3000, false);
        let hdr = VirtioNetHdr {
            flags: VnetFlags::NEEDS_CSUM.bits(),
            gso_type: gso::TCPV6,
            gso_size: U16::new(1400),
            hdr_len: U16::new(74),
            csum_start: U16::new(54),
            csum_offset: U16::new(16),
            num_buffers: U16::new(0),
        };
        let t = TxOffload::from_vnet(&hdr, &f).unwrap();
        assert_eq!(
            t.lso,
            Some(Lso {
                mss: 1400,
                l4_offset: 54,
                ipv6: true
            })
        );
        assert_eq!(t.checksum.unwrap().l4, Some(L4Protocol::Tcp));
        // And back through the planner: the same header.
        assert_eq!(t.prepare_tx(f.len(), &f).unwrap().hdr, hdr);
        let udp4 = VirtioNetHdr {
            gso_type: gso::UDP_L4,
            ..hdr
        };
        assert!(matches!(
            TxOffload::from_vnet(&udp4, &f),
            Err(Error::UnsupportedGso(5))
        ));
        let bad = VirtioNetHdr {
            gso_type: 0,
            csum_offset: U16::new(3),
            ..hdr
        };
        assert!(TxOffload::from_vnet(&bad, &f).is_err());
        // Receive side.
        let valid = VirtioNetHdr {
            flags: VnetFlags::DATA_VALID.bits(),
            ..Default::default()
        };
        assert!(RxOffload::from_vnet(&valid).unwrap().checksum_ok);
        assert!(
            !RxOffload::from_vnet(&VirtioNetHdr::default())
                .unwrap()
                .checksum_ok
        );
        assert!(RxOffload::from_vnet(&hdr).is_err());
        assert_eq!(RxOffload::from_vnet(&valid).unwrap().to_vnet(), valid);
    }
}
