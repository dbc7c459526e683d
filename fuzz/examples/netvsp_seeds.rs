//! Writes the `netvsp` fuzz target's seeds to `fuzz/seeds/netvsp/` from the same message
//! builders the netvsp tests use (so they stay valid as the protocol code changes), then runs
//! each through the target once. Run: `cargo run --example netvsp_seeds` in `fuzz/`.

use vmbus_proto::netvsp::{NvspInit, NvspMessageType, NvspVersion};
use vmbus_proto::rndis::{InitializeRequest, Oid, PpiType, RndisMessageType};
use vsp::netvsp::harness::guest::{data, nvsp, query, rndis, set, tcp_frame};
use zerocopy::IntoBytes;

fn record(out: &mut Vec<u8>, op: u8, body: &[u8]) {
    out.push(op);
    out.extend_from_slice(&(body.len() as u16).to_le_bytes());
    out.extend_from_slice(body);
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0, 0x45, 0, 0, 0];
    f.resize(len, 0x33);
    f
}


fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/netvsp");
    std::fs::create_dir_all(&dir).expect("seed directory");
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();

    let mut s = vec![1];
    record(&mut s, 1, &data(&frame(100), &[]));
    let mut host = vec![0u8; 12];
    host.extend_from_slice(&frame(60));
    record(&mut s, 4, &host);
    seeds.push(("data-both-ways", s));

    let mut s = vec![1 | 2 << 1];
    let mut batch = data(&frame(200), &[(PpiType::IEEE_8021Q, 7 << 4)]);
    batch.extend_from_slice(&data(
        &frame(64),
        &[(PpiType::TCPIP_CHKSUM, 1 | 1 << 2 | 34 << 16)],
    ));
    let mut body = vec![3];
    body.extend_from_slice(&batch);
    record(&mut s, 2, &body);
    let mut c = 0x1234_5678u64.to_le_bytes().to_vec();
    c.extend_from_slice(&nvsp(NvspMessageType::SEND_RNDIS_PACKET_COMPLETE, &1u32));
    record(&mut s, 3, &c);
    seeds.push(("section-batch-and-stray-completion", s));

    let mut s = vec![0];
    record(
        &mut s,
        0,
        &nvsp(
            NvspMessageType::INIT,
            &NvspInit {
                min_protocol_version: NvspVersion::V5,
                max_protocol_version: NvspVersion::V61,
            },
        ),
    );
    record(
        &mut s,
        1,
        &rndis(
            RndisMessageType::INITIALIZE,
            InitializeRequest {
                request_id: 1,
                major_version: 1,
                minor_version: 0,
                max_transfer_size: 4096,
            }
            .as_bytes(),
        ),
    );
    record(&mut s, 0, &[101, 0, 0, 0, 1, 1, 0, 0, 0xfe, 0xca]);
    seeds.push(("no-handshake", s));

    let mut s = vec![1 | 5 << 1];
    record(
        &mut s,
        1,
        &data(
            &tcp_frame(3000),
            &[(PpiType::TCP_LARGESEND, 1448 | 34 << 20 | 1 << 30)],
        ),
    );
    record(
        &mut s,
        1,
        &data(
            &tcp_frame(3000),
            &[(PpiType::TCP_LARGESEND, 34 << 20 | 1 << 30)],
        ),
    );
    record(
        &mut s,
        1,
        &query(50, Oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES, &[0; 156]),
    );
    let mut rss = vec![
        0x89, 2, 40, 0, 0, 0, 0, 0, 1, 2, 0, 0, 8, 0, 0, 0, 40, 0, 0, 0,
    ];
    rss.resize(40, 0);
    rss.extend_from_slice(&[9, 0, 0, 0, 0, 0, 0, 0]);
    record(&mut s, 1, &set(51, Oid::GEN_RECEIVE_SCALE_PARAMETERS, &rss));
    let mut sec = 99u32.to_le_bytes().to_vec();
    sec.extend_from_slice(&100u32.to_le_bytes());
    record(&mut s, 5, &sec);
    seeds.push(("lso-rss-sections", s));

    let mut s = vec![1 | 0x10];
    record(&mut s, 1, &data(&frame(1514), &[]));
    let mut host = vec![0u8; 12];
    let mut tagged = frame(100);
    tagged.splice(12..12, [0x81, 0, 0, 5]);
    host.extend_from_slice(&tagged);
    record(&mut s, 4, &host);
    seeds.push(("vlan", s));

    for (name, seed) in &seeds {
        std::fs::write(dir.join(name), seed).expect("write a seed");
        vmbus_fuzz::netvsp(seed);
        println!("{name}: {} bytes, ran", seed.len());
    }
}
