//! Tests of the disk backend against real files (on a file system that takes `O_DIRECT`) and
//! real guest memory (memfds).

use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use ringbuf::guestmem::GuestMemory;
use ringbuf::shmem::create_memfd;
use rustix::fs::{OFlags, SeekFrom};
use rustix::io::Errno;

use super::*;

/// Guest memory: two 2 MiB regions, at 0 and at 16 MiB (one memfd).
const REGION: u64 = 2 << 20;
const HIGH: u64 = 16 << 20;

fn guest_memory() -> Arc<GuestMemory> {
    let mut mem = GuestMemory::new();
    let fd = create_memfd("disk-test", 2 * REGION).unwrap();
    mem.add_region(0, REGION, fd.try_clone().unwrap(), 0)
        .unwrap();
    mem.add_region(HIGH, REGION, fd, REGION).unwrap();
    Arc::new(mem)
}

/// A directory on a file system that takes `O_DIRECT` (not tmpfs on older kernels).
fn test_dir() -> PathBuf {
    let candidates = [
        std::env::temp_dir(),
        PathBuf::from("/var/tmp"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp"),
    ];
    for dir in candidates {
        let _ = std::fs::create_dir_all(&dir);
        let probe = dir.join(format!("vsp-disk-probe-{}", std::process::id()));
        let ok = rustix::fs::open(
            &probe,
            OFlags::CREATE | OFlags::RDWR | OFlags::DIRECT | OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .is_ok();
        let _ = std::fs::remove_file(&probe);
        if ok {
            return dir;
        }
    }
    panic!("no directory here takes O_DIRECT");
}

/// A disk image file, removed on drop.
struct Image(PathBuf);

impl Image {
    /// A file of `len` bytes filled with a pattern (so zeros are meaningful), in `dir`.
    fn new_in(dir: &Path, len: u64) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = dir.join(format!(
            "vsp-disk-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
        std::fs::write(&path, data).unwrap();
        Image(path)
    }

    fn new(len: u64) -> Self {
        Self::new_in(&test_dir(), len)
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A deterministic pseudo-random sequence (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Runs one operation to completion.
fn run(q: &mut DiskQueue, op: IoOp<'_>) -> Result<u32, i32> {
    q.queue(7, op).unwrap();
    q.submit().unwrap();
    q.wait(1).unwrap();
    let mut out = Vec::new();
    assert_eq!(q.reap(&mut out), 1);
    assert_eq!(out[0].tag, 7);
    out[0].result
}

/// Copies the segments' bytes out of guest memory, in order.
fn gather(mem: &GuestMemory, segments: &[Segment]) -> Vec<u8> {
    let mut v = Vec::new();
    for s in segments {
        let mut b = vec![0u8; s.len as usize];
        mem.read(s.gpa, &mut b).unwrap();
        v.extend_from_slice(&b);
    }
    v
}

/// Fills the segments with `data`, in order.
fn scatter(mem: &GuestMemory, segments: &[Segment], data: &[u8]) {
    let mut at = 0;
    for s in segments {
        mem.write(s.gpa, &data[at..at + s.len as usize]).unwrap();
        at += s.len as usize;
    }
    assert_eq!(at, data.len());
}

/// Several segments of different sizes at non-contiguous addresses, in both regions, `total`
/// bytes in all, at odd or aligned addresses.
fn scattered_segments(total: u32, aligned: bool) -> Vec<Segment> {
    let unit = if aligned { 512 } else { 1 };
    let mut lens = vec![total / 3 / unit * unit, total / 5 / unit * unit];
    lens.push(total - lens[0] - lens[1]);
    let bases = if aligned {
        [HIGH + 8192, 4096, HIGH + (1 << 20)]
    } else {
        [HIGH + 8193, 4095, HIGH + (1 << 20) + 7]
    };
    bases
        .iter()
        .zip(lens)
        .map(|(&gpa, len)| Segment { gpa, len })
        .collect()
}

/// As [`scattered_segments`], all in the high region.
fn scattered_in_one_region(total: u32, aligned: bool) -> Vec<Segment> {
    let mut v = scattered_segments(total, aligned);
    v[1].gpa += HIGH + (512 << 10);
    v.swap(0, 2);
    v
}

/// Writes then reads back through guest memory at many offsets with scattered segments.
fn roundtrip(direct: bool, options: QueueOptions) {
    let img = Image::new(8 << 20);
    let disk = DiskFile::open(&img.0, false, direct).unwrap();
    assert_eq!(disk.size(), 8 << 20);
    assert_eq!(disk.block_size(), 512);
    assert_eq!(disk.is_direct(), direct);
    let mem = guest_memory();
    let mut q = DiskQueue::with_options(disk, mem.clone(), 64, options).unwrap();
    let mut rng = Rng(0x1234_5678);
    let mut expect = img.contents();
    let cases: &[(u64, u32, bool)] = &[
        (0, 4096, true),
        (512, 512 * 7, true),
        (4096 * 100, 128 * 1024, true),
        ((8 << 20) - 65536, 65536, true),
        (1, 1000, false),
        (3, 4096, false),
        (4096 * 33 + 17, 70_001, false),
        ((8 << 20) - 999, 999, false),
    ];
    for &(offset, len, aligned) in cases {
        for segments in [
            vec![Segment {
                gpa: if aligned { 8192 } else { 8193 },
                len,
            }],
            scattered_segments(len, aligned),
            scattered_in_one_region(len, aligned),
        ] {
            let data = rng.bytes(len as usize);
            scatter(&mem, &segments, &data);
            let w = IoOp::Write {
                offset,
                segments: &segments,
                fua: false,
            };
            assert_eq!(run(&mut q, w), Ok(len), "write {len} at {offset}");
            expect[offset as usize..][..len as usize].copy_from_slice(&data);
            assert!(img.contents() == expect, "file after write at {offset}");
            for s in &segments {
                mem.fill(s.gpa, s.len as usize, 0xee).unwrap();
            }
            let r = IoOp::Read {
                offset,
                segments: &segments,
            };
            assert_eq!(run(&mut q, r), Ok(len), "read {len} at {offset}");
            assert!(gather(&mem, &segments) == data, "read back at {offset}");
        }
    }
    assert_eq!(q.in_flight(), 0);
    let st = q.stats;
    eprintln!("direct={direct}: {st:?}");
    if direct {
        assert!(
            st.direct > 0 && st.buffered > 0,
            "both descriptors are used"
        );
        assert_eq!(
            st.direct_refused, 0,
            "the alignment rule matches the file system's"
        );
    } else {
        assert_eq!(st.direct, 0);
    }
    // Every SQE named the disk by its registered index, or none did.
    if options.register_files {
        assert_eq!(st.fixed_file, st.direct + st.buffered);
        assert!(st.fixed_file > 0);
    } else {
        assert_eq!(st.fixed_file, 0);
    }
    // Buffered writes (all of them, or the unaligned ones on a direct disk) are done inline
    // when the option says so, else through io_uring.
    assert_eq!(st.inline_writes > 0, options.inline_buffered_writes);
    if !options.inline_buffered_writes {
        assert_eq!(st.inline_writes, 0);
    }
}

#[test]
fn write_then_read_back_scattered() {
    roundtrip(false, QueueOptions::default());
}

#[test]
fn write_then_read_back_with_writes_through_io_uring() {
    roundtrip(
        false,
        QueueOptions {
            inline_buffered_writes: false,
            ..QueueOptions::default()
        },
    );
}

#[test]
fn write_then_read_back_through_plain_descriptors() {
    let plain = QueueOptions {
        register_files: false,
        ..QueueOptions::default()
    };
    roundtrip(false, plain);
    roundtrip(true, plain);
}

#[test]
fn direct_aligned_and_unaligned_requests() {
    roundtrip(true, QueueOptions::default());
    roundtrip(
        true,
        QueueOptions {
            inline_buffered_writes: false,
            ..QueueOptions::default()
        },
    );
}

/// A queue pins no guest memory: opening it over a large guest memory that was never touched
/// allocates none of it (fixed-buffer registration used to pin all of it, per queue).
#[test]
fn a_queue_does_not_pin_guest_memory() {
    const BIG: u64 = 1 << 30;
    let rss = || {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            << 10
    };
    let img = Image::new(1 << 20);
    let disk = DiskFile::open(&img.0, false, false).unwrap();
    let mut mem = GuestMemory::new();
    mem.add_region(0, BIG, create_memfd("disk-test-big", BIG).unwrap(), 0)
        .unwrap();
    let mem = Arc::new(mem);
    let before = rss();
    let queues: Vec<DiskQueue> = (0..4)
        .map(|_| DiskQueue::new(disk.clone(), mem.clone(), 64).unwrap())
        .collect();
    let grown = rss().saturating_sub(before);
    assert!(grown < 64 << 20, "4 queues took {grown} bytes of RSS");
    drop(queues);
}

/// 256 random 4 KiB writes in flight at once (distinct blocks), then 256 reads of them.
fn random_qd256(direct: bool) {
    const BLOCKS: u64 = 4096;
    let img = Image::new(BLOCKS * 4096);
    let disk = DiskFile::open(&img.0, false, direct).unwrap();
    let mem = guest_memory();
    // Writes through io_uring, so that 256 of them are in flight at once.
    let through_uring = QueueOptions {
        inline_buffered_writes: false,
        ..QueueOptions::default()
    };
    let mut q = DiskQueue::with_options(disk, mem.clone(), 256, through_uring).unwrap();
    assert_eq!(q.capacity(), 256);
    let mut rng = Rng(99);
    let mut expect = img.contents();
    for round in 0..4 {
        // 256 distinct blocks.
        let mut blocks = Vec::new();
        while blocks.len() < 256 {
            let b = rng.next() % BLOCKS;
            if !blocks.contains(&b) {
                blocks.push(b);
            }
        }
        for (i, &b) in blocks.iter().enumerate() {
            let gpa = i as u64 * 4096;
            let data = rng.bytes(4096);
            mem.write(gpa, &data).unwrap();
            expect[b as usize * 4096..][..4096].copy_from_slice(&data);
            let op = IoOp::Write {
                offset: b * 4096,
                segments: &[Segment { gpa, len: 4096 }],
                fua: false,
            };
            q.queue(i as u64, op).unwrap();
        }
        assert_eq!(q.in_flight(), 256);
        assert!(matches!(
            q.queue(999, IoOp::Flush),
            Err(Error::DiskQueueFull)
        ));
        assert_eq!(q.submit().unwrap(), 256);
        let mut out = Vec::new();
        while out.len() < 256 {
            q.wait(1).unwrap();
            q.reap(&mut out);
        }
        let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..256).collect::<Vec<_>>(), "round {round}");
        assert!(out.iter().all(|c| c.result == Ok(4096)));
        assert!(img.contents() == expect, "round {round}: file");
        // Read them back into the high region, in random order of tags.
        for (i, &b) in blocks.iter().enumerate() {
            let op = IoOp::Read {
                offset: b * 4096,
                segments: &[Segment {
                    gpa: HIGH + i as u64 * 4096,
                    len: 4096,
                }],
            };
            q.queue(i as u64, op).unwrap();
        }
        q.submit().unwrap();
        q.wait(256).unwrap();
        out.clear();
        assert_eq!(q.reap(&mut out), 256);
        assert!(out.iter().all(|c| c.result == Ok(4096)));
        for (i, &b) in blocks.iter().enumerate() {
            let mut got = vec![0u8; 4096];
            mem.read(HIGH + i as u64 * 4096, &mut got).unwrap();
            assert!(got == expect[b as usize * 4096..][..4096], "block {b}");
        }
    }
    let st = q.stats;
    if direct {
        assert_eq!((st.direct, st.buffered), (4 * 512, 0), "{st:?}");
    }
}

#[test]
fn random_4k_at_queue_depth_256() {
    random_qd256(false);
}

#[test]
fn random_4k_at_queue_depth_256_direct() {
    random_qd256(true);
}

#[test]
fn fua_write_and_flush() {
    let img = Image::new(1 << 20);
    let disk = DiskFile::open(&img.0, false, true).unwrap();
    let mem = guest_memory();
    let mut q = DiskQueue::new(disk, mem.clone(), 8).unwrap();
    mem.write(0, &[0x5a; 8192]).unwrap();
    let seg = [Segment { gpa: 0, len: 8192 }];
    for (offset, fua) in [(65536, true), (100, true), (200_000, false)] {
        let w = IoOp::Write {
            offset,
            segments: &seg,
            fua,
        };
        assert_eq!(run(&mut q, w), Ok(8192));
        assert!(img.contents()[offset as usize..][..8192] == [0x5a; 8192]);
    }
    assert_eq!(run(&mut q, IoOp::Flush), Ok(0));
}

fn allocated_blocks(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks()
}

#[test]
fn discard_punches_a_hole() {
    let img = Image::new(4 << 20);
    let disk = DiskFile::open(&img.0, false, false).unwrap();
    assert!(disk.supports_discard());
    let mut q = DiskQueue::new(disk, guest_memory(), 8).unwrap();
    let before = allocated_blocks(&img.0);
    let (offset, len) = (1 << 20, 1 << 20);
    assert_eq!(run(&mut q, IoOp::Discard { offset, len }), Ok(0));
    let after = allocated_blocks(&img.0);
    assert!(
        after + (len / 512) * 9 / 10 <= before,
        "{before} -> {after} blocks"
    );
    let f = std::fs::File::open(&img.0).unwrap();
    let hole = rustix::fs::seek(f.as_fd(), SeekFrom::Hole(0)).unwrap();
    assert_eq!(hole, offset, "the first hole is the discarded range");
    let data = img.contents();
    assert_eq!(data.len(), 4 << 20, "the size is kept");
    assert!(data[offset as usize..][..len as usize]
        .iter()
        .all(|&b| b == 0));
    assert!(data[..offset as usize].iter().all(|&b| b != 0));
    assert!(data[(offset + len) as usize..].iter().all(|&b| b != 0));
    assert_eq!(run(&mut q, IoOp::Discard { offset: 5, len: 0 }), Ok(0));
}

/// Zeroes ranges of an image in `dir` and checks the bytes around them are kept.
fn write_zeroes_in(dir: &Path) -> super::uring::Stats {
    let img = Image::new_in(dir, 8 << 20);
    let disk = DiskFile::open(&img.0, false, false).unwrap();
    let mem = guest_memory();
    let mut q = DiskQueue::new(disk, mem.clone(), 8).unwrap();
    let mut expect = img.contents();
    // Unaligned, aligned, larger than one zero-fill SQE (1 MiB), with and without unmap.
    for (offset, len, unmap) in [
        (1000, 3000, false),
        (65536, 65536, true),
        (4 << 20, (3 << 20) + 512, false),
        (123, 1_234_567, true),
    ] {
        let sync = unmap;
        let zero = IoOp::WriteZeroes {
            offset,
            len,
            unmap,
            sync,
        };
        assert_eq!(run(&mut q, zero), Ok(0));
        expect[offset as usize..][..len as usize].fill(0);
        assert!(img.contents() == expect, "zeroes at {offset}");
        // Read back through guest memory, 1 MiB at a time.
        for at in (offset..offset + len).step_by(1 << 20) {
            let n = (offset + len - at).min(1 << 20) as u32;
            mem.fill(0, n as usize, 0xee).unwrap();
            let read = IoOp::Read {
                offset: at,
                segments: &[Segment { gpa: 0, len: n }],
            };
            assert_eq!(run(&mut q, read), Ok(n));
            let mut got = vec![1u8; n as usize];
            mem.read(0, &mut got).unwrap();
            assert!(got.iter().all(|&b| b == 0));
        }
    }
    q.stats
}

#[test]
fn write_zeroes() {
    let st = write_zeroes_in(&test_dir());
    eprintln!("write zeroes on {}: {st:?}", test_dir().display());
}

/// tmpfs cannot `fallocate(ZERO_RANGE)`: zeros are written instead.
#[test]
fn write_zeroes_falls_back_to_writing_zeros() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm: skipped");
        return;
    }
    let st = write_zeroes_in(shm);
    assert_eq!(st.zero_fill, 2, "ZERO_RANGE is refused by tmpfs");
}

#[test]
fn readonly_refuses_writes() {
    let img = Image::new(1 << 20);
    let disk = DiskFile::open(&img.0, true, true).unwrap();
    assert!(disk.readonly() && !disk.supports_discard());
    let mem = guest_memory();
    let mut q = DiskQueue::new(disk, mem.clone(), 8).unwrap();
    let seg = [Segment { gpa: 0, len: 4096 }];
    let write = IoOp::Write {
        offset: 0,
        segments: &seg,
        fua: false,
    };
    assert!(matches!(q.queue(1, write), Err(Error::DiskReadOnly)));
    let discard = IoOp::Discard {
        offset: 0,
        len: 4096,
    };
    assert!(matches!(q.queue(1, discard), Err(Error::DiskReadOnly)));
    let zero = IoOp::WriteZeroes {
        offset: 0,
        len: 4096,
        unmap: false,
        sync: false,
    };
    assert!(matches!(q.queue(1, zero), Err(Error::DiskReadOnly)));
    assert_eq!(q.in_flight(), 0);
    let read = IoOp::Read {
        offset: 4096,
        segments: &seg,
    };
    assert_eq!(run(&mut q, read), Ok(4096));
    assert_eq!(run(&mut q, IoOp::Flush), Ok(0));
    let mut got = vec![0u8; 4096];
    mem.read(0, &mut got).unwrap();
    assert!(got == img.contents()[4096..8192]);
}

#[test]
fn bad_requests_are_refused_without_io() {
    let img = Image::new(1 << 20);
    let before = img.contents();
    let disk = DiskFile::open(&img.0, false, false).unwrap();
    let mem = guest_memory();
    let mut q = DiskQueue::new(disk, mem, 4).unwrap();
    let write = |offset, segments| IoOp::Write {
        offset,
        segments,
        fua: false,
    };
    let seg = |gpa, len| [Segment { gpa, len }];
    let (byte, page) = (seg(0, 1), seg(0, 4096));
    let across_low_end = seg(REGION - 100, 4096);
    let in_hole = seg(REGION, 4096);
    let overflowing = seg(u64::MAX - 1, 4096);
    let across_high_end = seg(HIGH + REGION - 1, 2);
    let apart = [
        Segment { gpa: 0, len: 512 },
        Segment {
            gpa: 1 << 40,
            len: 512,
        },
    ];
    let discontiguous: Vec<Segment> = (0..1025).map(|i| Segment { gpa: i * 2, len: 1 }).collect();
    let cases = [
        write(1 << 20, &byte),
        write((1 << 20) - 4095, &page),
        write(u64::MAX - 10, &page),
        write(0, &across_low_end),
        write(0, &in_hole),
        write(0, &overflowing),
        write(0, &apart),
        IoOp::Read {
            offset: 4096,
            segments: &across_high_end,
        },
        IoOp::Read {
            offset: (1 << 20) + 1,
            segments: &[],
        },
        IoOp::Discard {
            offset: 4096,
            len: 1 << 20,
        },
        IoOp::WriteZeroes {
            offset: u64::MAX,
            len: 2,
            unmap: true,
            sync: false,
        },
        // 1025 discontiguous segments.
        write(0, &discontiguous),
        // Over 4 GiB in all (2 GiB of it twice).
        IoOp::Read {
            offset: 0,
            segments: &[Segment {
                gpa: 0,
                len: 1 << 31,
            }; 3],
        },
    ];
    for (i, op) in cases.into_iter().enumerate() {
        let r = q.queue(i as u64, op);
        assert!(
            matches!(
                r,
                Err(Error::DiskRange { .. } | Error::DiskBuffer(_) | Error::DiskRequest(_))
            ),
            "case {i}: {r:?}"
        );
        assert_eq!(q.in_flight(), 0, "case {i}");
    }
    q.submit().unwrap();
    q.wait(1).unwrap();
    assert_eq!(q.reap(&mut Vec::new()), 0);
    assert!(img.contents() == before);
    // Adjacent segments are merged: 2048 contiguous ones are one iovec, and fine.
    let op = IoOp::Read {
        offset: 0,
        segments: &(0..2048)
            .map(|i| Segment { gpa: i * 2, len: 2 })
            .collect::<Vec<_>>(),
    };
    assert_eq!(run(&mut q, op), Ok(4096));
    // Zero-length operations complete at once.
    let empty = IoOp::Read {
        offset: 1 << 20,
        segments: &[Segment { gpa: 0, len: 0 }],
    };
    assert_eq!(run(&mut q, empty), Ok(0));
}

#[test]
fn a_disk_shrunk_behind_our_back_gives_short_reads() {
    let img = Image::new(1 << 20);
    let disk = DiskFile::open(&img.0, false, false).unwrap();
    let mem = guest_memory();
    let mut q = DiskQueue::new(disk, mem.clone(), 8).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img.0)
        .unwrap()
        .set_len(512 * 1024)
        .unwrap();
    // Straddles the new end: the first part comes back, the rest is reported short.
    let op = IoOp::Read {
        offset: 512 * 1024 - 4096,
        segments: &scattered_segments(8192, true),
    };
    assert_eq!(run(&mut q, op), Ok(4096));
    let op = IoOp::Read {
        offset: 600 * 1024,
        segments: &[Segment { gpa: 0, len: 4096 }],
    };
    assert_eq!(run(&mut q, op), Ok(0));
    assert_eq!(q.stats.short_resubmits, 1);
}

#[test]
fn advance_skips_transferred_bytes() {
    use super::uring::tests_support::advance_lens;
    assert_eq!(advance_lens(&[10, 20, 30], 0), (0, vec![10, 20, 30]));
    assert_eq!(advance_lens(&[10, 20, 30], 10), (1, vec![10, 20, 30]));
    assert_eq!(advance_lens(&[10, 20, 30], 15), (1, vec![10, 15, 30]));
    assert_eq!(advance_lens(&[10, 20, 30], 59), (2, vec![10, 20, 1]));
    assert_eq!(advance_lens(&[10, 20, 30], 60), (3, vec![10, 20, 30]));
    assert_eq!(advance_lens(&[10], 100), (1, vec![10]));
}

#[test]
fn completion_event_wakes_a_poller() {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let img = Image::new(1 << 20);
    let disk = DiskFile::open(&img.0, false, false).unwrap();
    let mut q = DiskQueue::new(disk, guest_memory(), 8).unwrap();
    let readable = |q: &DiskQueue, ms: i64| {
        let mut fds = [PollFd::from_borrowed_fd(
            q.completion_event(),
            PollFlags::IN,
        )];
        let t = Timespec {
            tv_sec: ms / 1000,
            tv_nsec: ms % 1000 * 1_000_000,
        };
        poll(&mut fds, Some(&t)).unwrap() == 1
    };
    assert!(!readable(&q, 0));
    let read = IoOp::Read {
        offset: 0,
        segments: &[Segment { gpa: 0, len: 4096 }],
    };
    q.queue(1, read).unwrap();
    q.submit().unwrap();
    assert!(readable(&q, 5000), "the event fires on completion");
    assert!(!q.prepare_sleep(), "a completion is waiting: no sleep");
    let mut out = Vec::new();
    assert_eq!(q.reap(&mut out), 1);
    assert_eq!(out[0].result, Ok(4096));
    assert!(q.prepare_sleep(), "nothing is waiting: sleep");
    assert!(!readable(&q, 0), "prepare_sleep re-arms the event");
    // Polling (reap) does not touch the event: a completion after the re-arm still wakes a
    // sleeper, however often the queue was reaped meanwhile.
    q.queue(
        2,
        IoOp::Read {
            offset: 0,
            segments: &[Segment { gpa: 0, len: 4096 }],
        },
    )
    .unwrap();
    q.submit().unwrap();
    assert!(readable(&q, 5000), "the event fires on completion");
    assert_eq!(q.reap(&mut out), 1);
    assert!(readable(&q, 0), "reap leaves the event set");
    assert!(q.prepare_sleep());
    assert!(!readable(&q, 0));
}

#[test]
fn dropping_a_queue_with_io_in_flight_is_safe() {
    let img = Image::new(16 << 20);
    for direct in [false, true] {
        let disk = DiskFile::open(&img.0, false, direct).unwrap();
        let mem = guest_memory();
        // Writes through io_uring, so that they are in flight when the queue is dropped.
        let through_uring = QueueOptions {
            inline_buffered_writes: false,
            ..QueueOptions::default()
        };
        let mut q = DiskQueue::with_options(disk.clone(), mem.clone(), 256, through_uring).unwrap();
        for i in 0..256u64 {
            let segments = [Segment {
                gpa: (i % 64) * 32768,
                len: 32768,
            }];
            let op = if i % 2 == 0 {
                IoOp::Read {
                    offset: i * 65536,
                    segments: &segments,
                }
            } else {
                IoOp::Write {
                    offset: i * 65536,
                    segments: &segments,
                    fua: i % 4 == 1,
                }
            };
            q.queue(i, op).unwrap();
            if i == 199 {
                q.submit().unwrap();
            }
        }
        // 200 submitted, 56 queued only.
        assert_eq!(q.in_flight(), 256);
        drop(q);
        assert_eq!(
            Arc::strong_count(&mem),
            1,
            "the queue let go of guest memory"
        );
        assert_eq!(Arc::strong_count(&disk), 1);
        // The memory is unmapped now; the disk is still fine.
        drop(mem);
        let f = std::fs::File::open(&img.0).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 0).unwrap();
    }
}

#[test]
fn queues_are_send() {
    fn send<T: Send>() {}
    send::<DiskQueue>();
    send::<Arc<DiskFile>>();
}

#[test]
fn depth_and_paths_are_checked() {
    let img = Image::new(1 << 20);
    let disk = DiskFile::open(&img.0, false, false).unwrap();
    assert!(DiskQueue::new(disk.clone(), guest_memory(), 0).is_err());
    assert!(DiskQueue::new(disk, guest_memory(), 4097).is_err());
    assert!(matches!(
        DiskFile::open(Path::new("/nonexistent/disk.img"), false, false),
        Err(Error::DiskOpen { .. })
    ));
    assert!(matches!(
        DiskFile::open(Path::new("/dev/shm"), true, false),
        Err(Error::DiskOpen { .. })
    ));
}

/// A loop device over an image file, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    /// Attaches `image` with logical blocks of `sector` bytes; `None` where loop devices cannot
    /// be set up (not root, no loop driver, no losetup).
    fn attach(image: &Path, sector: u32) -> Option<Self> {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--sector-size", &sector.to_string()])
            .arg(image)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("losetup: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        let dev = String::from_utf8(out.stdout).ok()?;
        Some(LoopDevice(PathBuf::from(dev.trim())))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn block_device_with_4k_logical_blocks() {
    let img = Image::new(8 << 20);
    let Some(dev) = LoopDevice::attach(&img.0, 4096) else {
        eprintln!("no loop device: skipped");
        return;
    };
    let disk = DiskFile::open(&dev.0, false, true).unwrap();
    assert!(disk.is_block_device());
    assert_eq!((disk.size(), disk.block_size()), (8 << 20, 4096));
    let mem = guest_memory();
    let mut q = DiskQueue::new(disk.clone(), mem.clone(), 32).unwrap();
    let mut rng = Rng(5);
    let mut expect = img.contents();
    // Aligned (direct) and unaligned (buffered) requests both work on a block device.
    for (offset, segments) in [
        (4096 * 7, scattered_segments(3 * 4096, true)),
        (
            4096 * 9,
            vec![Segment {
                gpa: 4096,
                len: 8192,
            }],
        ),
        (1000, scattered_segments(5000, false)),
    ] {
        let len: u32 = segments.iter().map(|s| s.len).sum();
        let data = rng.bytes(len as usize);
        scatter(&mem, &segments, &data);
        let w = IoOp::Write {
            offset,
            segments: &segments,
            fua: true,
        };
        assert_eq!(run(&mut q, w), Ok(len));
        expect[offset as usize..][..len as usize].copy_from_slice(&data);
        for s in &segments {
            mem.fill(s.gpa, s.len as usize, 0).unwrap();
        }
        let r = IoOp::Read {
            offset,
            segments: &segments,
        };
        assert_eq!(run(&mut q, r), Ok(len));
        assert!(gather(&mem, &segments) == data);
    }
    let st = q.stats;
    assert!(st.direct > 0 && st.buffered > 0, "{st:?}");
    assert_eq!(st.direct_refused, 0, "{st:?}");
    // Zeroing and discarding take whole logical blocks.
    let zero = |offset, len| IoOp::WriteZeroes {
        offset,
        len,
        unmap: false,
        sync: false,
    };
    assert!(matches!(
        q.queue(1, zero(512, 4096)),
        Err(Error::DiskRequest(_))
    ));
    assert_eq!(run(&mut q, zero(4096 * 100, 4096 * 3)), Ok(0));
    expect[4096 * 100..][..4096 * 3].fill(0);
    if disk.supports_discard() {
        assert!(matches!(
            q.queue(
                1,
                IoOp::Discard {
                    offset: 4096,
                    len: 512
                }
            ),
            Err(Error::DiskRequest(_))
        ));
        let discard = IoOp::Discard {
            offset: 4096 * 200,
            len: 4096 * 16,
        };
        assert_eq!(run(&mut q, discard), Ok(0));
        expect[4096 * 200..][..4096 * 16].fill(0);
    } else {
        eprintln!("the loop device does not discard");
    }
    assert_eq!(run(&mut q, IoOp::Flush), Ok(0));
    drop(q);
    drop(disk);
    drop(dev);
    assert!(img.contents() == expect, "the image behind the device");
}

/// Issue 9, item 6: a writeback error is reported by the kernel once per open file, and every
/// queue of a disk shares one. Once a flush or synchronous write failed, the disk keeps the
/// error: every later flush, FUA write and synchronous zeroing fails on every queue (the data
/// they would vouch for may be gone), while plain writes and reads go on.
#[test]
fn a_writeback_error_fails_every_later_flush_on_every_queue() {
    let img = Image::new(1 << 20);
    let disk = DiskFile::open(&img.0, false, false).unwrap();
    let mem = guest_memory();
    let mut q0 = DiskQueue::new(disk.clone(), mem.clone(), 8).unwrap();
    let mut q1 = DiskQueue::new(disk.clone(), mem.clone(), 8).unwrap();
    let seg = [Segment {
        gpa: 8192,
        len: 4096,
    }];
    let write = |fua| IoOp::Write {
        offset: 0,
        segments: &seg,
        fua,
    };
    assert_eq!(run(&mut q0, IoOp::Flush), Ok(0));
    assert_eq!(disk.writeback_error(), None);
    // What a failed fdatasync records (see `loop_device_writeback_error` in
    // tests/storage_hardening.rs for the kernel doing it).
    disk.record_writeback_error(Errno::IO.raw_os_error());
    disk.record_writeback_error(Errno::NOSPC.raw_os_error());
    assert_eq!(
        disk.writeback_error(),
        Some(Errno::IO.raw_os_error()),
        "the first is kept"
    );
    let eio = Err(Errno::IO.raw_os_error());
    for q in [&mut q0, &mut q1] {
        for _ in 0..3 {
            assert_eq!(run(q, IoOp::Flush), eio);
        }
        assert_eq!(run(q, write(true)), eio);
        let zero = IoOp::WriteZeroes {
            offset: 0,
            len: 4096,
            unmap: false,
            sync: true,
        };
        assert_eq!(run(q, zero), eio);
        assert_eq!(run(q, write(false)), Ok(4096));
        let read = IoOp::Read {
            offset: 0,
            segments: &seg,
        };
        assert_eq!(run(q, read), Ok(4096));
    }
    // A queue opened later on the same disk sees it too.
    let mut q2 = DiskQueue::new(disk.clone(), mem, 8).unwrap();
    assert_eq!(run(&mut q2, IoOp::Flush), eio);
}

/// WRITE SAME's engine: a block repeated over a range (longer than one SQE's worth), on a
/// buffered and on a direct disk, with 512-byte and 4 KiB blocks; then synchronously.
#[test]
fn write_same_repeats_its_block() {
    for direct in [false, true] {
        let img = Image::new(8 << 20);
        let disk = DiskFile::open(&img.0, false, direct).unwrap();
        let mut q = DiskQueue::new(disk, guest_memory(), 8).unwrap();
        let mut expect = img.contents();
        for (offset, len, bs, sync) in [
            (4096u64, (3 << 20) + 4096, 4096usize, false),
            (512 * 7, 512 * 3001, 512, true),
        ] {
            let block: Vec<u8> = (0..bs).map(|i| (i * 31 + bs) as u8).collect();
            let op = IoOp::WriteSame {
                offset,
                len,
                block: &block,
                sync,
            };
            assert_eq!(run(&mut q, op), Ok(0));
            for at in (offset..offset + len).step_by(bs) {
                expect[at as usize..][..bs].copy_from_slice(&block);
            }
            assert!(img.contents() == expect, "direct={direct} bs={bs}");
        }
        // A block that does not divide the range, or is not a power of two, is refused.
        for (len, n) in [(1000u64, 512usize), (1536, 768)] {
            let block = vec![1u8; n];
            let op = IoOp::WriteSame {
                offset: 0,
                len,
                block: &block,
                sync: false,
            };
            assert!(matches!(q.queue(1, op), Err(Error::DiskRequest(_))));
        }
    }
}

/// A queue whose requests nobody will answer (their channel closed) stops a long request at
/// its next step: a 32 MiB pattern fill ends after the piece in the kernel, with ECANCELED,
/// and records no writeback error (a later flush succeeds).
#[test]
fn an_abandoned_queue_stops_long_requests_at_their_next_step() {
    for sync in [false, true] {
        let len = 32u64 << 20;
        let img = Image::new(len);
        let before = img.contents();
        let disk = DiskFile::open(&img.0, false, false).unwrap();
        let mut q = DiskQueue::new(disk, guest_memory(), 8).unwrap();
        let block = vec![0xABu8; 4096];
        let op = IoOp::WriteSame {
            offset: 0,
            len,
            block: &block,
            sync,
        };
        q.queue(7, op).unwrap();
        q.submit().unwrap();
        q.abandon();
        q.wait(1).unwrap();
        let mut out = Vec::new();
        assert_eq!(q.reap(&mut out), 1);
        assert_eq!(
            out[0].result,
            Err(rustix::io::Errno::CANCELED.raw_os_error())
        );
        let after = img.contents();
        assert!(after[..4096] == block[..], "the first piece was written");
        assert!(
            after[len as usize - (1 << 20)..] == before[len as usize - (1 << 20)..],
            "the rest was not"
        );
        assert_eq!(run(&mut q, IoOp::Flush), Ok(0), "no writeback error");
    }
}
