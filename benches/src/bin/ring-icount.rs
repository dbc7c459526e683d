//! Instruction counts of the ring's data path, for `valgrind --tool=callgrind` (see
//! `benches/ring-icount.sh`): one thread writes `PACKETS` in-band packets of `SIZE` bytes into a
//! ring in batches (as the `ring` bench's producer does: up to [`batch_len`] packets, then one
//! commit), reads each batch back (copy out, validation, payload check) and commits the reads.
//! Run once with 0 packets and once with many: the difference of the two instruction totals,
//! divided by the packet count, is the ring's cost per packet on both sides, free of start-up
//! and of any timing noise. Cross-core cache traffic is not in it (one thread); this measures
//! only the instructions.
//!
//! Usage: `ring-icount SIZE PACKETS` (SIZE: payload bytes, at least 8).

use ringbuf::pair::RingPair;
use ringbuf::OutgoingPacket;
use vmbus_benches::{batch_len, check, data_len, stamp};

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("usage: ring-icount SIZE PACKETS"))
        .collect();
    let [size, packets] = args[..] else {
        panic!("usage: ring-icount SIZE PACKETS")
    };
    let size = size as usize;
    assert!(size >= 8, "SIZE is at least 8 bytes");
    let data_len = data_len();
    let pair = RingPair::anonymous(data_len).expect("mapping the ring pair");
    let (mut out, _) = pair.side_a().expect("the writer's half");
    let (_, mut inc) = pair.side_b().expect("the reader's half");
    let batch = batch_len(data_len, size) as u64;
    let mut payload = vec![0u8; size];
    let (mut sent, mut got) = (0u64, 0u64);
    while sent < packets {
        let end = (sent + batch).min(packets);
        while sent < end {
            stamp(&mut payload, sent);
            out.write(&OutgoingPacket::in_band(sent, false, &[&payload]))
                .expect("the batch fits");
            sent += 1;
        }
        out.commit();
        while let Some(p) = inc.read().expect("reading the ring") {
            assert!(check(p.payload, got, size), "packet {got} is corrupt");
            got += 1;
        }
        inc.commit();
    }
    assert_eq!(got, packets);
}
