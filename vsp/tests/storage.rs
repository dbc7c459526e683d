//! The storage path end to end, across processes: the real `vspd` serving disk images through
//! storvsp and io_uring, a loopback guest's storvsc client reading and writing them.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbus_proto::channel::Guid;
use vsc::channel::GuestChannel;
use vsc::client::{Client, SUPPORTED_VERSIONS};
use vsc::loopback::Loopback;
use vsc::storvsc::{Disk, DiskOp, IoError, Storvsc};

mod common;

use common::{pattern, sense};

/// A running `vspd` serving images it creates in its directory, killed on drop.
struct Vspd(common::Daemon);

impl std::ops::Deref for Vspd {
    type Target = common::Daemon;
    fn deref(&self) -> &common::Daemon {
        &self.0
    }
}

impl Vspd {
    /// Starts `vspd` with a `--disk path=FILE,OPTS` per `(FILE, size, OPTS)`.
    fn start(name: &str, disks: &[(&str, u64, &str)]) -> Self {
        let dir = common::fresh_dir("vspd-storage", name);
        let mut args = Vec::new();
        for (file, size, opts) in disks {
            std::fs::File::create(dir.join(file))
                .unwrap()
                .set_len(*size)
                .unwrap();
            args.push("--disk".to_string());
            args.push(format!("path={file}{opts}"));
        }
        Self(common::Daemon::spawn(&dir, args).owning_dir())
    }

    fn image(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

struct Guest {
    _front: Arc<Loopback>,
    _client: Client,
    disks: Vec<Arc<Disk>>,
}

fn guest(socket: &Path) -> Guest {
    let (front, messages) = Loopback::connect(socket, 128 << 20).unwrap();
    let front = Arc::new(front);
    let mut client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS).unwrap();
    let offers = client.request_offers().unwrap();
    let mut disks = Vec::new();
    for o in offers.iter().filter(|o| o.interface_type == Guid::SCSI) {
        let ch = GuestChannel::open(&mut client, &front, o, 64).unwrap();
        let st = Storvsc::init(ch).unwrap();
        disks.push(Disk::start(st, front.clone(), 0).unwrap());
    }
    Guest {
        _front: front,
        _client: client,
        disks,
    }
}

#[test]
fn data_written_through_the_whole_path_reads_back_and_reaches_the_image() {
    let d = Vspd::start("integrity", &[("a.img", 64 << 20, "")]);
    let g = guest(&d.socket);
    let disk = &g.disks[0];
    let geo = disk.geometry();
    assert_eq!(
        (geo.blocks, geo.block_size, geo.read_only),
        ((64 << 20) / 512, 512, false)
    );
    let mut rng = 0x1234_5678u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut written = Vec::new();
    for i in 0..200u64 {
        let blocks = 1 + next() % 256;
        let lba = next() % (geo.blocks - blocks);
        let data = pattern(i + 1, (blocks * 512) as usize);
        disk.write(lba * 512, &data, i % 7 == 0).unwrap();
        written.push((lba, data));
    }
    // Later writes win where ranges overlap: check against a model of the disk.
    let mut model = vec![0u8; 64 << 20];
    for (lba, data) in &written {
        model[(*lba * 512) as usize..][..data.len()].copy_from_slice(data);
    }
    for (lba, data) in &written {
        let mut back = vec![0u8; data.len()];
        disk.read(lba * 512, &mut back).unwrap();
        assert_eq!(
            back,
            model[(*lba * 512) as usize..][..data.len()],
            "read back at lba {lba}"
        );
    }
    disk.flush().unwrap();
    // The image file itself holds the data.
    let img = std::fs::read(d.image("a.img")).unwrap();
    assert!(img == model, "the image differs from what was written");
}

#[test]
fn many_requests_in_flight_complete_correctly() {
    let d = Vspd::start("qd", &[("a.img", 16 << 20, "")]);
    let g = guest(&d.socket);
    let disk = g.disks[0].clone();
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..512u64 {
        let tx = tx.clone();
        disk.submit(
            DiskOp::Write {
                offset: i * 4096,
                data: pattern(i + 7, 4096),
                fua: false,
            },
            Box::new(move |r| tx.send((i, r)).unwrap()),
        );
    }
    for _ in 0..512 {
        let (i, r) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(r.is_ok(), "write {i}: {r:?}");
    }
    for i in 0..512u64 {
        let tx = tx.clone();
        disk.submit(
            DiskOp::Read {
                offset: i * 4096,
                len: 4096,
            },
            Box::new(move |r| tx.send((i, r)).unwrap()),
        );
    }
    for _ in 0..512 {
        let (i, r) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(r.unwrap(), pattern(i + 7, 4096), "read {i}");
    }
}

#[test]
fn reads_completed_in_place_see_what_was_written() {
    let d = Vspd::start("view", &[("a.img", 16 << 20, "")]);
    let g = guest(&d.socket);
    let disk = g.disks[0].clone();
    let blocks = disk.geometry().blocks;
    // Several pages and a length that is not a multiple of the page size, at an offset that
    // is not page aligned; many in flight at once.
    let len = 3 * 4096 + 1536;
    let at = |i: u64| i * 20480 + 512;
    for i in 0..64u64 {
        disk.write(at(i), &pattern(i + 11, len), false).unwrap();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..64u64 {
        let tx = tx.clone();
        disk.submit_read(at(i), len as u32, move |r| {
            // Inside the callback the data is still in the bounce pages: copy out pieces.
            let r = r.and_then(|view| {
                let mut head = [0u8; 8];
                view.read_at(0, &mut head)?;
                let mut across = vec![0u8; 100];
                view.read_at(4096 - 50, &mut across)?;
                let mut reused = b"reply header".to_vec();
                view.append_to(&mut reused)?;
                let beyond = view.read_at(view.len() - 1, &mut [0; 2]);
                Ok((view.len(), head, across, reused, view.to_vec()?, beyond))
            });
            tx.send((i, r)).unwrap();
        });
    }
    for _ in 0..64 {
        let (i, r) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        let (n, head, across, reused, all, beyond) = r.unwrap();
        let want = pattern(i + 11, len);
        assert_eq!(n, len, "read {i}");
        assert_eq!(head, want[..8], "read {i}");
        assert_eq!(across, want[4096 - 50..4096 + 50], "read {i}");
        assert_eq!(reused[..12], b"reply header"[..]);
        assert_eq!(reused[12..], want[..], "read {i}");
        assert_eq!(all, want, "read {i}");
        assert_eq!(beyond, Err(IoError::Invalid));
    }
    // Errors reach the callback: beyond the disk (ILLEGAL REQUEST / LBA OUT OF RANGE), and a
    // read the client refuses itself (not block aligned).
    let (tx, rx) = std::sync::mpsc::channel();
    for (offset, len) in [(blocks * 512, 512), (100, 512)] {
        let tx = tx.clone();
        disk.submit_read(offset, len, move |r| tx.send(r.map(|v| v.len())).unwrap());
        let r = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        match offset {
            100 => assert_eq!(r, Err(IoError::Invalid)),
            _ => assert_eq!(sense(r.unwrap_err()), (0x05, 0x21)),
        }
    }
    // The slots and pages went back: the disk still reads (and through the `Vec` path too).
    let mut back = vec![0u8; len];
    disk.read(at(5), &mut back).unwrap();
    assert_eq!(back, pattern(16, len));
}

#[test]
fn errors_are_answered_with_the_right_sense_data() {
    let d = Vspd::start(
        "errors",
        &[("a.img", 8 << 20, ""), ("ro.img", 8 << 20, ",readonly=on")],
    );
    let g = guest(&d.socket);
    let (rw, ro) = (&g.disks[0], &g.disks[1]);
    assert!(ro.geometry().read_only && !rw.geometry().read_only);
    let blocks = rw.geometry().blocks;
    // LBA out of range: ILLEGAL REQUEST / LBA OUT OF RANGE.
    let e = rw
        .call(DiskOp::Read {
            offset: blocks * 512,
            len: 512,
        })
        .unwrap_err();
    assert_eq!(sense(e), (0x05, 0x21));
    let e = rw
        .call(DiskOp::Write {
            offset: (blocks - 1) * 512,
            data: vec![0; 1024],
            fua: false,
        })
        .unwrap_err();
    assert_eq!(sense(e), (0x05, 0x21));
    // Unknown opcode: ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
    let e = rw
        .command(vec![0xff, 0, 0, 0, 0, 0], vec![], 0)
        .unwrap_err();
    assert_eq!(sense(e), (0x05, 0x20));
    // Write to a read-only disk: DATA PROTECT / WRITE PROTECTED.
    let e = ro
        .call(DiskOp::Write {
            offset: 0,
            data: vec![1; 512],
            fua: false,
        })
        .unwrap_err();
    assert!(e.is_write_protected());
    assert_eq!(sense(e), (0x07, 0x27));
    let e = ro
        .call(DiskOp::WriteZeroes {
            offset: 0,
            len: 4096,
            unmap: false,
        })
        .unwrap_err();
    assert_eq!(sense(e), (0x07, 0x27));
    // A read-only image cannot deallocate: UNMAP is not offered at all (VPD 0xB2 says so).
    assert!(!ro.geometry().thin);
    // The channel keeps serving after every error.
    rw.write(0, &pattern(3, 4096), false).unwrap();
    let mut back = vec![0; 4096];
    rw.read(0, &mut back).unwrap();
    assert_eq!(back, pattern(3, 4096));
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    let d = Vspd::start("zeroes", &[("a.img", 8 << 20, "")]);
    let g = guest(&d.socket);
    let disk = &g.disks[0];
    disk.write(0, &pattern(9, 1 << 20), false).unwrap();
    disk.call(DiskOp::Discard {
        offset: 0,
        len: 256 << 10,
    })
    .unwrap();
    disk.call(DiskOp::WriteZeroes {
        offset: 512 << 10,
        len: 128 << 10,
        unmap: false,
    })
    .unwrap();
    let mut back = vec![0u8; 1 << 20];
    disk.read(0, &mut back).unwrap();
    assert!(
        back[..256 << 10].iter().all(|&b| b == 0),
        "discarded range reads as zeros"
    );
    assert_eq!(
        back[256 << 10..512 << 10],
        pattern(9, 1 << 20)[256 << 10..512 << 10]
    );
    assert!(
        back[512 << 10..640 << 10].iter().all(|&b| b == 0),
        "zeroed range"
    );
    let f = std::fs::File::open(d.image("a.img")).unwrap();
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, 600 << 10).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn several_disks_on_one_controller_are_luns() {
    let d = Vspd::start(
        "luns",
        &[
            ("l0.img", 8 << 20, ",controller=7"),
            ("l3.img", 4 << 20, ",controller=7,lun=3"),
            ("own.img", 2 << 20, ""),
        ],
    );
    let g = vsc::guest::StorageGuest::attach(&d.socket, 128 << 20).unwrap();
    // Two controllers: one with LUNs 0 and 3, one with LUN 0.
    let shape: Vec<(u8, u64)> = g
        .disks
        .iter()
        .map(|(_, d)| (d.lun(), d.geometry().blocks))
        .collect();
    assert_eq!(
        shape,
        [
            (0, (8 << 20) / 512),
            (3, (4 << 20) / 512),
            (0, (2 << 20) / 512)
        ]
    );
    assert_eq!(
        g.disks[0].0.interface_instance,
        g.disks[1].0.interface_instance
    );
    assert_ne!(
        g.disks[0].0.interface_instance,
        g.disks[2].0.interface_instance
    );
    // Each LUN reaches its own image.
    for (i, (_, d)) in g.disks.iter().enumerate() {
        d.write(4096, &pattern(100 + i as u64, 4096), true).unwrap();
    }
    for (i, f) in ["l0.img", "l3.img", "own.img"].iter().enumerate() {
        let img = std::fs::read(d.image(f)).unwrap();
        assert_eq!(img[4096..8192], pattern(100 + i as u64, 4096), "{f}");
    }
    // A LUN that does not exist is refused at the transport.
    let ctl = g.disks[0].1.controller().clone();
    assert_eq!(ctl.report_luns().unwrap(), [0, 3]);
    assert!(ctl.disk(1).is_err(), "LUN 1 does not exist");
    g.detach().unwrap();
}

#[test]
fn subchannels_give_a_controller_several_queues() {
    let d = Vspd::start("queues", &[("a.img", 16 << 20, ",queues=3")]);
    let g = vsc::guest::StorageGuest::attach_with_queues(&d.socket, 128 << 20, 3).unwrap();
    let disk = g.disks[0].1.clone();
    assert_eq!(
        disk.controller().queue_count(),
        3,
        "the primary channel and two subchannels"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..600u64 {
        let tx = tx.clone();
        disk.submit(
            DiskOp::Write {
                offset: i * 4096,
                data: pattern(i + 11, 4096),
                fua: false,
            },
            Box::new(move |r| tx.send((i, r)).unwrap()),
        );
    }
    for _ in 0..600 {
        let (i, r) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(r.is_ok(), "write {i}: {r:?}");
    }
    for i in (0..600u64).step_by(7) {
        let mut back = vec![0u8; 4096];
        disk.read(i * 4096, &mut back).unwrap();
        assert_eq!(back, pattern(i + 11, 4096), "block {i}");
    }
    assert!(disk.stats().completed >= 600);
    // Asking for more queues than the host offers gives what it offers.
    g.detach().unwrap();
    let g = vsc::guest::StorageGuest::attach_with_queues(&d.socket, 128 << 20, 8).unwrap();
    assert_eq!(g.disks[0].1.controller().queue_count(), 3);
    g.detach().unwrap();
}

#[test]
fn a_backend_error_is_a_medium_error() {
    let d = Vspd::start("medium", &[("a.img", 8 << 20, "")]);
    let g = guest(&d.socket);
    let disk = &g.disks[0];
    // The image shrinks behind the daemon's back: reads past the new end come up short.
    std::fs::File::options()
        .write(true)
        .open(d.image("a.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let e = disk
        .call(DiskOp::Read {
            offset: 4 << 20,
            len: 4096,
        })
        .unwrap_err();
    assert_eq!(
        sense(e),
        (0x03, 0x11),
        "MEDIUM ERROR / UNRECOVERED READ ERROR"
    );
    let mut ok = vec![0u8; 4096];
    disk.read(0, &mut ok).unwrap();
}

/// Hand-made SRBs: the requests a well-behaved client never sends.
#[test]
fn malformed_srbs_fail_alone() {
    use ringbuf::packet::{gpa_direct_header, OutgoingPacket, PacketKind};
    use vmbus_proto::storvsp::{
        srb_status, ScsiRequest, VstorOperation, VstorPacket, REQUEST_COMPLETION_FLAG,
    };
    use zerocopy::{FromBytes, FromZeros, IntoBytes};

    let d = Vspd::start("hostile-srb", &[("a.img", 8 << 20, "")]);
    let (front, messages) = Loopback::connect(&d.socket, 32 << 20).unwrap();
    let front = Arc::new(front);
    let mut client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS).unwrap();
    let offer = client.request_offers().unwrap().remove(0);
    let ch = GuestChannel::open(&mut client, &front, &offer, 16).unwrap();
    let mut ch = Storvsc::init(ch).unwrap().into_channel();
    let buf = front.alloc_pages(2).unwrap();
    // Sends one SRB (READ(10) of 8 blocks unless `cdb` says otherwise) and returns the
    // completion's SRB status.
    let mut send =
        |tx: u64, cdb: &[u8], transfer: u32, ranges: Option<(u32, u32, Vec<u64>)>| -> u8 {
            let mut srb = ScsiRequest::new_zeroed();
            srb.length = 52;
            srb.cdb_length = cdb.len() as u8;
            srb.cdb_or_sense[..cdb.len().min(20)].copy_from_slice(&cdb[..cdb.len().min(20)]);
            srb.sense_info_length = 20;
            srb.data_in = vmbus_proto::storvsp::DataDirection::READ;
            srb.data_transfer_length = transfer;
            let mut p = VstorPacket::new(VstorOperation::EXECUTE_SRB, REQUEST_COMPLETION_FLAG, 0);
            p.set_body(&srb);
            let parts = [p.as_bytes()];
            let mut header = Vec::new();
            match &ranges {
                Some((off, count, pfns)) => {
                    gpa_direct_header(&mut header, &[(*off, *count, &pfns[..])]);
                    ch.out
                        .write(&OutgoingPacket {
                            packet_type: vmbus_proto::ring::PacketType::DATA_USING_GPA_DIRECT,
                            flags: 1,
                            transaction_id: tx,
                            header: &header,
                            payload: &parts,
                        })
                        .unwrap();
                }
                None => ch
                    .out
                    .write(&OutgoingPacket::in_band(tx, true, &parts))
                    .unwrap(),
            }
            ch.commit_out().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(pkt) = ch.inc.read().unwrap() {
                    assert!(matches!(pkt.kind, PacketKind::Completion));
                    assert_eq!(pkt.transaction_id, tx);
                    let (v, _) = VstorPacket::read_from_prefix(pkt.payload).unwrap();
                    let s: ScsiRequest = v.body();
                    ch.commit_in().unwrap();
                    return s.srb_status & 0x3f;
                }
                assert!(Instant::now() < deadline, "no completion for {tx}");
                ch.wait_interrupt(Duration::from_millis(50)).unwrap();
            }
        };
    let read10 = [0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0];
    // A good one first.
    assert_eq!(
        send(1, &read10, 4096, Some((0, 4096, vec![buf[0]]))),
        srb_status::SUCCESS
    );
    // A buffer page outside guest memory.
    assert_eq!(
        send(2, &read10, 4096, Some((0, 4096, vec![1 << 30]))),
        srb_status::INVALID_REQUEST
    );
    // A transfer longer than its buffer.
    assert_eq!(
        send(3, &read10, 4096, Some((0, 2048, vec![buf[0]]))),
        srb_status::INVALID_REQUEST
    );
    // No buffer at all for a read.
    assert_eq!(send(4, &read10, 4096, None), srb_status::INVALID_REQUEST);
    // A CDB length of 0, and one over 16.
    assert_eq!(send(5, &[], 0, None), srb_status::INVALID_REQUEST);
    assert_eq!(send(6, &[0u8; 17], 0, None), srb_status::INVALID_REQUEST);
    // A range offset beyond its first page.
    assert_eq!(
        send(7, &read10, 4096, Some((5000, 4096, vec![buf[0], buf[1]]))),
        srb_status::INVALID_REQUEST
    );
    // INQUIRY into a buffer outside guest memory: the data cannot land, the SRB fails.
    assert_eq!(
        send(8, &[0x12, 0, 0, 0, 36, 0], 36, Some((0, 36, vec![1 << 30]))),
        srb_status::INVALID_REQUEST
    );
    // And the channel still serves.
    assert_eq!(
        send(9, &read10, 4096, Some((0, 4096, vec![buf[1]]))),
        srb_status::SUCCESS
    );
}

/// Subchannels live as long as their primary channel is open.
#[test]
fn closing_the_primary_rescinds_its_subchannels_and_reopening_creates_them_anew() {
    use vsc::client::Event;
    let d = Vspd::start("sub-lifecycle", &[("a.img", 8 << 20, ",queues=3")]);
    let (front, messages) = Loopback::connect(&d.socket, 64 << 20).unwrap();
    let front = Arc::new(front);
    let mut client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS).unwrap();
    let primary = client.request_offers().unwrap().remove(0);
    for round in 0..2 {
        let ch = GuestChannel::open(&mut client, &front, &primary, 16).unwrap();
        let mut st = Storvsc::init(ch).unwrap();
        st.create_subchannels(2).unwrap();
        let mut subs = Vec::new();
        while subs.len() < 2 {
            match client.next_event(Duration::from_secs(10)).unwrap() {
                Some(Event::Offer(o)) => subs.push(o),
                other => panic!("round {round}: expected a subchannel offer, got {other:?}"),
            }
        }
        assert!(subs
            .iter()
            .all(|o| o.interface_instance == primary.interface_instance));
        let mut idx: Vec<u16> = subs.iter().map(|o| o.subchannel_index).collect();
        idx.sort_unstable();
        assert_eq!(idx, [1, 2]);
        let chans: Vec<GuestChannel> = subs
            .iter()
            .map(|o| GuestChannel::open(&mut client, &front, o, 16).unwrap())
            .collect();
        for c in chans {
            c.close(&mut client, &front).unwrap();
        }
        st.into_channel().close(&mut client, &front).unwrap();
        let mut gone = Vec::new();
        while gone.len() < 2 {
            match client.next_event(Duration::from_secs(10)).unwrap() {
                Some(Event::Rescinded(r)) => gone.push(r),
                other => panic!("round {round}: expected a rescind, got {other:?}"),
            }
        }
        gone.sort_unstable();
        let mut want: Vec<u32> = subs.iter().map(|o| o.relid).collect();
        want.sort_unstable();
        assert_eq!(gone, want);
    }
    client.unload().unwrap();
}
