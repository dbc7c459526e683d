//! The receive-side scaling hash of frames toward the guest: the Toeplitz hash, under the key
//! and over the hash types the guest set (OID_GEN_RECEIVE_SCALE_PARAMETERS), that rides in each
//! frame's `NBL_HASH_VALUE` per-packet info. A Linux guest takes it as the packet's flow hash
//! (no software hash for RPS, RFS or its socket steering).
//!
//! Input, as the NDIS specification orders it: source address, destination address, then for
//! TCP types source port and destination port, all in network byte order. A TCP 4-tuple where
//! the guest enabled the TCP type of that IP version and the packet is not a fragment; else the
//! address pair where it enabled the IP type; else no hash. IPv6 extension headers are not
//! walked (we do not offer the `_EX` types): a packet whose next header is not TCP gets the
//! address-pair hash.

use vmbus_proto::rndis::{rss_hash, RSS_HASH_KEY_SIZE};

/// What frames toward the guest are hashed with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RssHash {
    key: [u8; RSS_HASH_KEY_SIZE],
    /// The guest's `NDIS_HASH_*` type bits.
    types: u32,
}

/// Longest input: two IPv6 addresses and two ports.
const MAX_INPUT: usize = 16 + 16 + 2 + 2;
const _: () = assert!(MAX_INPUT + 4 <= RSS_HASH_KEY_SIZE);

/// Bytes of a frame [`RssHash::of_frame`] may look at: the Ethernet header, an IPv6 header (or
/// the longest IPv4 header) and the TCP ports.
pub const HEADER_BYTES: usize = 14 + 60 + 4;

/// The Toeplitz hash of `input` (at most 36 bytes: two IPv6 addresses and two ports) under
/// `key`: for every set bit of the input, counting from the most significant bit of its first
/// byte, the 32 key bits that start at that bit's position are XORed into the result.
pub fn toeplitz(key: &[u8; RSS_HASH_KEY_SIZE], input: &[u8]) -> u32 {
    let mut result = 0u32;
    let mut window = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    for (i, &byte) in input.iter().take(MAX_INPUT).enumerate() {
        let next = key[i + 4];
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                result ^= window;
            }
            window = (window << 1) | u32::from((next >> (7 - bit)) & 1);
        }
    }
    result
}

impl RssHash {
    /// The hash for a key of [`RSS_HASH_KEY_SIZE`] bytes and the guest's hash information
    /// (`NDIS_HASH_*` bits); `None` for a key of another size or when no type we hash is on.
    pub fn new(key: &[u8], hash_info: u32) -> Option<Self> {
        let key = <[u8; RSS_HASH_KEY_SIZE]>::try_from(key).ok()?;
        let types =
            hash_info & (rss_hash::IPV4 | rss_hash::TCP_IPV4 | rss_hash::IPV6 | rss_hash::TCP_IPV6);
        (types != 0).then_some(Self { key, types })
    }

    /// The hash of an untagged Ethernet frame from its first bytes (up to [`HEADER_BYTES`]);
    /// `None` where none of the guest's types applies. Malformed headers get no hash, never a
    /// panic: the frame is the host's, but this runs on every frame.
    pub fn of_frame(&self, head: &[u8]) -> Option<u32> {
        let ethertype = u16::from_be_bytes(head.get(12..14)?.try_into().ok()?);
        let ip = head.get(14..)?;
        let mut input = [0u8; MAX_INPUT];
        let (addrs, l4, tcp_on, ip_on) = match ethertype {
            0x0800 => {
                let ihl = usize::from(ip.first()? & 0x0f) * 4;
                if ip.first()? >> 4 != 4 || ihl < 20 {
                    return None;
                }
                input[..8].copy_from_slice(ip.get(12..20)?);
                // Fragment offset or more-fragments: no ports in this packet (or not the
                // same flow's in every fragment).
                let fragment = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x3fff != 0;
                let tcp = *ip.get(9)? == 6 && !fragment;
                (
                    8,
                    tcp.then(|| ip.get(ihl..ihl + 4)).flatten(),
                    rss_hash::TCP_IPV4,
                    rss_hash::IPV4,
                )
            }
            0x86dd => {
                if ip.first()? >> 4 != 6 {
                    return None;
                }
                input[..32].copy_from_slice(ip.get(8..40)?);
                let tcp = *ip.get(6)? == 6;
                (
                    32,
                    tcp.then(|| ip.get(40..44)).flatten(),
                    rss_hash::TCP_IPV6,
                    rss_hash::IPV6,
                )
            }
            _ => return None,
        };
        match l4 {
            Some(ports) if self.types & tcp_on != 0 => {
                input[addrs..addrs + 4].copy_from_slice(ports);
                Some(toeplitz(&self.key, &input[..addrs + 4]))
            }
            _ if self.types & ip_on != 0 => Some(toeplitz(&self.key, &input[..addrs])),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key of the published RSS verification suite (Microsoft's "Verifying the RSS Hash
    /// Calculation", also in Intel's 82599 datasheet).
    const KEY: [u8; 40] = [
        0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f,
        0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30,
        0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
    ];

    const ALL: u32 = rss_hash::FUNC_TOEPLITZ
        | rss_hash::IPV4
        | rss_hash::TCP_IPV4
        | rss_hash::IPV6
        | rss_hash::TCP_IPV6;

    fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags_frag: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[14 + 6..14 + 8].copy_from_slice(&flags_frag.to_be_bytes());
        f[14 + 9] = 6;
        f[14 + 12..14 + 16].copy_from_slice(&src);
        f[14 + 16..14 + 20].copy_from_slice(&dst);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f
    }

    fn tcp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, next: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 40 + 20];
        f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        f[14] = 0x60;
        f[14 + 6] = next;
        f[14 + 8..14 + 24].copy_from_slice(&src);
        f[14 + 24..14 + 40].copy_from_slice(&dst);
        f[54..56].copy_from_slice(&sport.to_be_bytes());
        f[56..58].copy_from_slice(&dport.to_be_bytes());
        f
    }

    #[test]
    fn ipv4_matches_the_verification_suite() {
        // (source, destination, source port, destination port, address pair, TCP 4-tuple)
        let suite = [
            (
                [66, 9, 149, 187],
                [161, 142, 100, 80],
                2794,
                1766,
                0x323e8fc2,
                0x51ccc178,
            ),
            (
                [199, 92, 111, 2],
                [65, 69, 140, 83],
                14230,
                4739,
                0xd718262a,
                0xc626b0ea,
            ),
            (
                [24, 19, 198, 95],
                [12, 22, 207, 184],
                12898,
                38024,
                0xd2d0a5de,
                0x5c2b394a,
            ),
            (
                [38, 27, 205, 30],
                [209, 142, 163, 6],
                48228,
                2217,
                0x82989176,
                0xafc7327f,
            ),
            (
                [153, 39, 163, 191],
                [202, 188, 127, 2],
                44251,
                1303,
                0x5d1809c5,
                0x10e828a2,
            ),
        ];
        let all = RssHash::new(&KEY, ALL).unwrap();
        let ip_only = RssHash::new(&KEY, rss_hash::FUNC_TOEPLITZ | rss_hash::IPV4).unwrap();
        for (src, dst, sp, dp, l3, l4) in suite {
            let f = tcp4(src, dst, sp, dp, 0x4000);
            assert_eq!(all.of_frame(&f), Some(l4), "{src:?}");
            assert_eq!(ip_only.of_frame(&f), Some(l3), "{src:?}");
            // A fragment carries no ports: the address pair, whatever the types.
            let frag = tcp4(src, dst, sp, dp, 0x2000);
            assert_eq!(all.of_frame(&frag), Some(l3));
        }
    }

    #[test]
    fn ipv6_matches_the_verification_suite() {
        let a = |s: [u16; 8]| {
            let mut b = [0u8; 16];
            for (i, w) in s.iter().enumerate() {
                b[2 * i..2 * i + 2].copy_from_slice(&w.to_be_bytes());
            }
            b
        };
        let suite = [
            (
                a([0x3ffe, 0x2501, 0x200, 0x1fff, 0, 0, 0, 7]),
                a([0x3ffe, 0x2501, 0x200, 3, 0, 0, 0, 1]),
                2794,
                1766,
                0x2cc18cd5,
                0x40207d3d,
            ),
            (
                a([0x3ffe, 0x501, 8, 0, 0x260, 0x97ff, 0xfe40, 0xefab]),
                a([0xff02, 0, 0, 0, 0, 0, 0, 1]),
                14230,
                4739,
                0x0f0c461c,
                0xdde51bbf,
            ),
            (
                a([0x3ffe, 0x1900, 0x4545, 3, 0x200, 0xf8ff, 0xfe21, 0x67cf]),
                a([0xfe80, 0, 0, 0, 0x200, 0xf8ff, 0xfe21, 0x67cf]),
                44251,
                38024,
                0x4b61e985,
                0x02d1feef,
            ),
        ];
        let all = RssHash::new(&KEY, ALL).unwrap();
        for (src, dst, sp, dp, l3, l4) in suite {
            assert_eq!(all.of_frame(&tcp6(src, dst, sp, dp, 6)), Some(l4));
            // UDP (or an extension header): the address pair.
            assert_eq!(all.of_frame(&tcp6(src, dst, sp, dp, 17)), Some(l3));
        }
    }

    #[test]
    fn types_the_guest_left_off_and_malformed_headers_get_no_hash() {
        let v4 = tcp4([1, 2, 3, 4], [5, 6, 7, 8], 1, 2, 0);
        let v6_only = RssHash::new(&KEY, rss_hash::IPV6 | rss_hash::TCP_IPV6).unwrap();
        assert_eq!(v6_only.of_frame(&v4), None);
        assert!(RssHash::new(&KEY, rss_hash::FUNC_TOEPLITZ).is_none());
        assert!(RssHash::new(&KEY[..39], ALL).is_none());
        let all = RssHash::new(&KEY, ALL).unwrap();
        // Every truncation and a few corruptions: no panic, and no hash from a bad header.
        for n in 0..v4.len() {
            let _ = all.of_frame(&v4[..n]);
        }
        let mut bad = v4.clone();
        bad[14] = 0x44; // IHL 4 words
        assert_eq!(all.of_frame(&bad), None);
        bad[14] = 0x65; // version 6 in an IPv4 frame
        assert_eq!(all.of_frame(&bad), None);
        let mut arp = v4;
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(all.of_frame(&arp), None);
        let v6 = tcp6([1; 16], [2; 16], 1, 2, 6);
        for n in 0..v6.len() {
            let _ = all.of_frame(&v6[..n]);
        }
    }
}
