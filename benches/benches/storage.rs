//! 4 KiB random reads and writes at queue depth 1 and 32 through the storage library path, and
//! as the baseline in the same criterion group (`storage`), raw io_uring on the same file, same
//! offsets, same queue depth. Criterion reports elements/s = IOPS; `benches/storage-ratio.sh`
//! turns the estimates into the ratios library IOPS ÷ io_uring IOPS.
//!
//! Benchmark ids: `storage/{vmbus,uring,pipe}_{randread,randwrite}_qd{1,32}`.
//!
//! - The library path (`vmbus_*`): a real `vspd` process (the release binary, see
//!   [`find_vspd`]) serving the image, the loopback guest
//!   (`vsc::guest::StorageGuest::attach`) and its storvsc `Disk`. Reads are
//!   `Disk::submit_read` with a callback that sees the data in place (a `ReadView` of the
//!   bounce pages `vspd` filled) and copies out only the 8 bytes it checks, as the baseline
//!   checks only those of its buffer; writes are `Disk::submit`ted with a fresh `Vec` each,
//!   which the queue thread copies into bounce pages (the baseline writes its buffer in
//!   place). The callback checks the result and submits the next request, so exactly `qd`
//!   requests are in flight and the bench thread only waits for the end of a measured run.
//!   Behind the library, `vspd` has io_uring read into (write from) guest memory: no copy.
//! - The baseline (`uring_*`): one thread, one io_uring with `qd` entries, `read`/`write`
//!   SQEs on the image file opened the same way `vspd` opens it (buffered, or `O_DIRECT` when
//!   `VMBUS_BENCH_STORAGE_DIRECT=1`); it refills as completions arrive (`submit_and_wait(1)`).
//! - The two-thread baseline (`pipe_*`, [`Pipe`]): the same io_uring work split over two
//!   spinning threads that hand requests and completions to each other over lock-free queues:
//!   what splitting the work between two cores costs here, with nothing else added.
//! - Both: request `i` of a benchmark function touches block [`block_of`]`(i)`, `i` counting
//!   from 0 for each function, so both contestants see the same offsets. Reads check that the
//!   block starts with its own number; writes write the block's number and a new version.
//! - The image: 1 GiB, every block stamped, on the target directory's file system (not tmpfs),
//!   read once before measuring so buffered reads hit the page cache. It is kept between runs
//!   (`<target>/storage-bench/image.raw`, or `$VMBUS_BENCH_STORAGE_DIR`).
//!
//! After each function, a fixed run of requests at the same queue depth measures what they cost
//! and prints a `cost ...` line ([`Cost`]): CPU time per request of the processes that carry
//! them (from `/proc/<pid>/stat`: `vspd` and this process, the guest side, for the library
//! path; this process for io_uring) and system calls per request (counted by `perf stat` on the
//! `raw_syscalls:sys_enter` tracepoint, where available). For the library path the same run
//! also counts wake-ups ([`measure_wakeups`]) and prints a `wakeups ...` line.
//! `VMBUS_BENCH_POLL_US=N` sets how long both sides poll before sleeping (`vspd --poll-us N`
//! and this process's pollers); `benches/storage-ratio.sh` runs with polling on and with 0.
//!
//! In criterion's test mode (`cargo test --benches`) the image is 16 MiB and each function runs
//! once; without a `vspd` binary the bench says so and skips everything.

// io_uring SQEs carry raw buffer pointers that the kernel uses after `push` returns: pushing
// them is unsafe. Each buffer is owned by the run and outlives its request (see `Uring::run`).
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use io_uring::{opcode, types, IoUring};
use vmbus_benches::storage::{
    block_of, check_block, check_block_head, cpu_seconds, prepare_image, stamp_block,
    thread_counters, PerfCount, PerfCounts, ThreadCounters, BLOCK, IMAGE_BYTES, TEST_IMAGE_BYTES,
};
use vsc::guest::StorageGuest;
use vsc::storvsc::{Disk, DiskOp};

/// Environment variable: the `vspd` binary to run (default: see [`find_vspd`]).
const VSPD_ENV: &str = "VMBUS_BENCH_VSPD";
/// Environment variable: the directory for the image and the socket.
const DIR_ENV: &str = "VMBUS_BENCH_STORAGE_DIR";
/// Environment variable: `1` opens the image with `O_DIRECT` on both sides.
const DIRECT_ENV: &str = "VMBUS_BENCH_STORAGE_DIRECT";
/// Environment variable: how long (us) the library path's threads poll before they sleep, on
/// both sides (`vspd --poll-us` and this process's pollers); unset: their defaults.
const POLL_ENV: &str = "VMBUS_BENCH_POLL_US";
/// Guest memory of the loopback guest (storvsc's 32 MiB of bounce pages and the rings).
const GUEST_MEMORY: u64 = 64 << 20;
/// Requests of the wake-up and cost counts after each QD32 function (a tenth of it at QD1).
const COST_REQUESTS: u64 = 200_000;
/// Environment variable: the cases to run (`randread_qd32 randwrite_qd1`...: `<op>_qd<depth>`,
/// separated by spaces or commas); unset: all four. Both contestants of a case run, and its
/// cost and wake-up counts.
const CASES_ENV: &str = "VMBUS_BENCH_STORAGE_CASES";

/// The `vspd` binary: `$VMBUS_BENCH_VSPD`, else `vspd` beside the bench's profile directory
/// (`target/<profile>/vspd`), else `target/release/vspd`. `None` if none exists.
fn find_vspd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(VSPD_ENV) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let exe = std::env::current_exe().ok()?;
    let profile = exe.parent()?.parent()?; // target/<profile>/deps/storage-<hash>
    [
        profile.join("vspd"),
        profile.parent()?.join("release").join("vspd"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// The target directory, from the bench's own path (`target/<profile>/deps/...`).
fn target_dir() -> Option<PathBuf> {
    Some(
        std::env::current_exe()
            .ok()?
            .parent()?
            .parent()?
            .parent()?
            .to_owned(),
    )
}

/// The `vspd` child, stopped with SIGTERM and reaped on drop.
struct Vspd(Child);

impl Drop for Vspd {
    fn drop(&mut self) {
        let pid = i32::try_from(self.0.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.0.wait();
    }
}

/// The running library path: `vspd` serving the image, the guest attached to it.
struct Setup {
    image: PathBuf,
    /// Scratch file of the system call counts.
    perf_out: PathBuf,
    blocks: u64,
    direct: bool,
    disk: Arc<Disk>,
    // Dropped in this order: the guest detaches before the daemon stops.
    guest: Option<StorageGuest>,
    vspd: Vspd,
}

impl Setup {
    /// The image, opened read-write as `vspd` opens it (`O_DIRECT` with `direct`).
    fn open_image(&self) -> std::io::Result<File> {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if self.direct {
            o.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
        }
        o.open(&self.image)
    }

    fn start(test_mode: bool) -> Result<Self, String> {
        let vspd_bin = find_vspd().ok_or_else(|| {
            format!(
                "no vspd binary (looked for ${VSPD_ENV}, target/<profile>/vspd and \
                 target/release/vspd); build it with `cargo build --release --bins` \
                 (benches/storage-ratio.sh does)"
            )
        })?;
        let dir = match std::env::var_os(DIR_ENV) {
            Some(d) => PathBuf::from(d),
            None => target_dir()
                .ok_or("cannot tell the target directory")?
                .join("storage-bench"),
        };
        let direct = std::env::var(DIRECT_ENV).is_ok_and(|v| v == "1");
        let bytes = if test_mode {
            TEST_IMAGE_BYTES
        } else {
            IMAGE_BYTES
        };
        let image = dir.join(if test_mode {
            "image-test.raw"
        } else {
            "image.raw"
        });
        prepare_image(&image, bytes)
            .map_err(|e| format!("preparing the image {}: {e}", image.display()))?;
        let socket = dir.join(format!("vspd-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let disk_opt = format!(
            "path={}{}",
            image.display(),
            if direct { ",direct=on" } else { "" }
        );
        let poll_us = match std::env::var(POLL_ENV) {
            Ok(v) => Some(
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("{POLL_ENV}={v:?} is not a number of microseconds"))?,
            ),
            Err(_) => None,
        };
        if let Some(us) = poll_us {
            // The guest's pollers are created when it attaches, below.
            ringbuf::poller::set_default_limit(Duration::from_micros(us));
        }
        let mut cmd = Command::new(&vspd_bin);
        if let Some(us) = poll_us {
            cmd.arg(format!("--poll-us={us}"));
        }
        let child = cmd
            .arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(&disk_opt)
            .env(
                "VSPD_LOG",
                std::env::var("VSPD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", vspd_bin.display()))?;
        let mut vspd = Vspd(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = vspd.0.try_wait() {
                return Err(format!("{} exited: {status}", vspd_bin.display()));
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not listen in 10 s", vspd_bin.display()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let guest = StorageGuest::attach(&socket, GUEST_MEMORY)
            .map_err(|e| format!("attaching the loopback guest: {e}"))?;
        let _ = std::fs::remove_file(&socket);
        let disk = guest.disks.first().ok_or("vspd offered no disk")?.1.clone();
        let g = disk.geometry();
        if g.size() != bytes || !(BLOCK as u32).is_multiple_of(g.block_size) {
            return Err(format!("unexpected disk geometry {g:?}"));
        }
        eprintln!(
            "storage bench: vspd {} (pid {}) serving {} ({} MiB{}), page cache warm, polling {}",
            vspd_bin.display(),
            vspd.0.id(),
            image.display(),
            bytes >> 20,
            if direct { ", O_DIRECT" } else { ", buffered" },
            poll_us.map_or("as by default".to_owned(), |us| format!("{us} us")),
        );
        Ok(Self {
            image,
            perf_out: dir.join(format!("perf-{}.csv", std::process::id())),
            blocks: bytes / BLOCK as u64,
            direct,
            disk,
            guest: Some(guest),
            vspd,
        })
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(g) = self.guest.take() {
            if let Err(e) = g.detach() {
                eprintln!("storage bench: detaching the guest: {e}");
            }
        }
    }
}

/// One measured run of the library path: requests `first..end` with `qd` in flight, refilled
/// from the completion callbacks (which run on the storvsc queue thread).
struct Flight {
    disk: Arc<Disk>,
    write: bool,
    blocks: u64,
    end: u64,
    /// Next request number to submit.
    next: AtomicU64,
    /// Requests completed.
    completed: AtomicU64,
    total: u64,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
    waiter: Thread,
}

impl Flight {
    fn submit(self: &Arc<Self>, i: u64) {
        let block = block_of(i, self.blocks);
        let offset = block * BLOCK as u64;
        let me = Arc::clone(self);
        if self.write {
            let mut data = vec![0u8; BLOCK];
            stamp_block(&mut data, block, i + 1);
            let op = DiskOp::Write {
                offset,
                data,
                fua: false,
            };
            self.disk.submit(
                op,
                Box::new(move |r| {
                    let bad = r
                        .err()
                        .map(|e| format!("request {i} (block {block}): {e:?}"));
                    me.complete(bad)
                }),
            );
        } else {
            // The data stays in the bounce pages: only the bytes checked are read, as the
            // baseline reads only those of its buffer.
            self.disk.submit_read(offset, BLOCK as u32, move |r| {
                let mut head = [0u8; 8];
                let bad = match r.and_then(|view| view.read_at(0, &mut head).map(|()| view.len())) {
                    Ok(len) if check_block_head(len, head, block) => None,
                    Ok(_) => Some(format!("request {i}: block {block} read back wrong data")),
                    Err(e) => Some(format!("request {i} (block {block}): {e:?}")),
                };
                me.complete(bad)
            });
        }
    }

    /// A request completed; `bad` says what was wrong with it.
    fn complete(self: &Arc<Self>, bad: Option<String>) {
        if let Some(msg) = bad {
            self.error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(msg);
            self.failed.store(true, Ordering::Release);
        }
        if !self.failed.load(Ordering::Acquire) {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            if n < self.end {
                self.submit(n);
            }
        }
        if self.completed.fetch_add(1, Ordering::AcqRel) + 1 == self.total
            || self.failed.load(Ordering::Acquire)
        {
            self.waiter.unpark();
        }
    }
}

/// Runs requests `first..first + n` through the library path with `qd` in flight; returns
/// when all completed. Panics on a failed request or wrong data.
fn run_vmbus(setup: &Setup, write: bool, qd: u64, first: u64, n: u64) {
    let flight = Arc::new(Flight {
        disk: setup.disk.clone(),
        write,
        blocks: setup.blocks,
        end: first + n,
        next: AtomicU64::new(first + qd.min(n)),
        completed: AtomicU64::new(0),
        total: n,
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        waiter: std::thread::current(),
    });
    for i in first..first + qd.min(n) {
        flight.submit(i);
    }
    while flight.completed.load(Ordering::Acquire) < n && !flight.failed.load(Ordering::Acquire) {
        std::thread::park();
    }
    let error = flight
        .error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(e) = error {
        panic!("library path: {e}");
    }
}

/// The raw io_uring baseline on the image file, `qd` entries deep.
struct Uring {
    ring: IoUring,
    file: File,
    blocks: u64,
    /// One block-sized, 4 KiB-aligned buffer per slot (inside `arena`).
    arena: Vec<u8>,
    align: usize,
    qd: usize,
}

impl Uring {
    fn new(setup: &Setup, qd: usize) -> std::io::Result<Self> {
        let file = setup.open_image()?;
        let arena = vec![0u8; (qd + 1) * BLOCK];
        let align = arena.as_ptr().align_offset(BLOCK);
        Ok(Self {
            ring: IoUring::new(qd.next_power_of_two() as u32)?,
            file,
            blocks: setup.blocks,
            arena,
            align,
            qd,
        })
    }

    fn buf(&mut self, slot: usize) -> &mut [u8] {
        let at = self.align + slot * BLOCK;
        &mut self.arena[at..at + BLOCK]
    }

    /// Requests `first..first + n`, `qd` in flight. Panics on an error, a short transfer or
    /// wrong data.
    fn run(&mut self, write: bool, first: u64, n: u64) {
        let fd = types::Fd(self.file.as_raw_fd());
        let mut free: Vec<usize> = (0..self.qd).collect();
        let mut slot_req = vec![0u64; self.qd];
        let (mut next, end, mut done) = (first, first + n, 0u64);
        while done < n {
            while next < end {
                let Some(slot) = free.pop() else { break };
                let block = block_of(next, self.blocks);
                let buf = self.buf(slot);
                let ptr = buf.as_mut_ptr();
                let offset = block * BLOCK as u64;
                let sqe = if write {
                    stamp_block(buf, block, next + 1);
                    opcode::Write::new(fd, ptr, BLOCK as u32)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Read::new(fd, ptr, BLOCK as u32)
                        .offset(offset)
                        .build()
                }
                .user_data(slot as u64);
                slot_req[slot] = next;
                // SAFETY: the SQE points into `self.arena`, slot `slot`, which nothing else
                // touches until this slot's completion is reaped below (the slot is off the
                // free list until then), and the arena outlives the ring's use of it: `run`
                // returns only once every request it submitted has completed.
                unsafe { self.ring.submission().push(&sqe) }.expect("the ring has qd entries");
                next += 1;
            }
            self.ring.submit_and_wait(1).expect("io_uring_enter");
            let cqes: Vec<_> = self
                .ring
                .completion()
                .map(|c| (c.user_data() as usize, c.result()))
                .collect();
            for (slot, res) in cqes {
                let req = slot_req[slot];
                let block = block_of(req, self.blocks);
                assert_eq!(res, BLOCK as i32, "io_uring request {req} (block {block})");
                if !write {
                    assert!(
                        check_block(self.buf(slot), block),
                        "io_uring request {req}: block {block} read back wrong data"
                    );
                }
                free.push(slot);
                done += 1;
            }
        }
    }
}

/// Block-sized, 4 KiB-aligned buffers, one per slot, that the two threads of [`Pipe`] hand to
/// each other.
struct Arena {
    ptr: *mut u8,
    slots: usize,
    /// The allocation (`slots + 1` blocks, to align the first slot); only `ptr` is used.
    _mem: Vec<u8>,
}

// SAFETY: `Arena` is plain memory; who may touch a slot is decided by the queues of `Pipe`: a
// slot index is in exactly one place at a time (the client's free list, the request queue, the
// I/O thread's in-flight set, or the completion queue), and the queues' push/pop order the
// accesses (release on push, acquire on pop).
unsafe impl Send for Arena {}
// SAFETY: as for `Send`: shared references only hand out slot pointers, and each slot has one
// user at a time.
unsafe impl Sync for Arena {}

impl Arena {
    fn new(slots: usize) -> Self {
        let mut mem = vec![0u8; (slots + 1) * BLOCK];
        let align = mem.as_ptr().align_offset(BLOCK);
        // SAFETY: `align < BLOCK`, so the pointer stays inside the allocation of
        // `(slots + 1) * BLOCK` bytes and the `slots` blocks from it fit.
        let ptr = unsafe { mem.as_mut_ptr().add(align) };
        Self {
            ptr,
            slots,
            _mem: mem,
        }
    }

    /// The start of slot `slot`'s block.
    fn slot(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.slots);
        // SAFETY: in bounds: `slot < slots` and the arena holds `slots` blocks from `ptr`.
        unsafe { self.ptr.add(slot * BLOCK) }
    }
}

/// A request handed to [`Pipe`]'s I/O thread: its slot, block and whether it writes.
#[derive(Clone, Copy)]
struct PipeReq {
    slot: usize,
    block: u64,
    write: bool,
}

/// The two-thread baseline: raw io_uring on the image as [`Uring`] does it, but split over two
/// threads the way any VSP/VSC pair must split it. The calling thread (the client) stamps or
/// checks the data and hands requests over a lock-free queue to an I/O thread that owns the
/// io_uring, which hands completions back over another; both threads spin, so no wakeup is
/// ever needed. Against the single-thread [`Uring`], it measures what moving each request and
/// its data between two cores costs on this machine, with nothing else added: the ceiling of a
/// split design here, and what `benches/storage-ratio.sh` compares the library path with too.
struct Pipe {
    arena: Arc<Arena>,
    to_io: Arc<crossbeam_queue::ArrayQueue<PipeReq>>,
    from_io: Arc<crossbeam_queue::ArrayQueue<(usize, i32)>>,
    stop: Arc<AtomicBool>,
    io: Option<std::thread::JoinHandle<()>>,
    blocks: u64,
    qd: usize,
}

impl Pipe {
    fn new(setup: &Setup, qd: usize) -> std::io::Result<Self> {
        let file = setup.open_image()?;
        let mut ring = IoUring::new(qd.next_power_of_two() as u32)?;
        let arena = Arc::new(Arena::new(qd));
        let to_io = Arc::new(crossbeam_queue::ArrayQueue::<PipeReq>::new(qd));
        let from_io = Arc::new(crossbeam_queue::ArrayQueue::<(usize, i32)>::new(qd));
        let stop = Arc::new(AtomicBool::new(false));
        let io = {
            let (arena, to_io, from_io, stop) =
                (arena.clone(), to_io.clone(), from_io.clone(), stop.clone());
            std::thread::Builder::new()
                .name("pipe-io".into())
                .spawn(move || {
                    let fd = types::Fd(file.as_raw_fd());
                    let mut in_flight = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let mut queued = 0;
                        while let Some(r) = to_io.pop() {
                            let ptr = arena.slot(r.slot);
                            let offset = r.block * BLOCK as u64;
                            let sqe = if r.write {
                                opcode::Write::new(fd, ptr, BLOCK as u32)
                                    .offset(offset)
                                    .build()
                            } else {
                                opcode::Read::new(fd, ptr, BLOCK as u32)
                                    .offset(offset)
                                    .build()
                            }
                            .user_data(r.slot as u64);
                            // SAFETY: the SQE points into slot `r.slot` of the arena, which
                            // this thread owns from popping the request until it pushes the
                            // completion, after the CQE is reaped; the arena (an `Arc` held
                            // here) outlives the ring, which is dropped with this closure only
                            // after every request in flight completed (see the end).
                            unsafe { ring.submission().push(&sqe) }.expect("qd entries");
                            queued += 1;
                        }
                        if queued > 0 {
                            in_flight += queued;
                            ring.submit().expect("io_uring_enter");
                        }
                        for c in ring.completion() {
                            in_flight -= 1;
                            // Never full: at most `qd` requests exist.
                            let _ = from_io.push((c.user_data() as usize, c.result()));
                        }
                        if queued == 0 {
                            std::hint::spin_loop();
                        }
                    }
                    while in_flight > 0 {
                        ring.submit_and_wait(1).expect("io_uring_enter");
                        in_flight -= ring.completion().count();
                    }
                })?
        };
        Ok(Self {
            arena,
            to_io,
            from_io,
            stop,
            io: Some(io),
            blocks: setup.blocks,
            qd,
        })
    }

    /// Requests `first..first + n`, `qd` in flight. Panics on an error, a short transfer or
    /// wrong data.
    fn run(&mut self, write: bool, first: u64, n: u64) {
        let mut free: Vec<usize> = (0..self.qd).collect();
        let mut slot_req = vec![0u64; self.qd];
        let (mut next, end, mut done) = (first, first + n, 0u64);
        while done < n {
            while next < end {
                let Some(slot) = free.pop() else { break };
                let block = block_of(next, self.blocks);
                if write {
                    // SAFETY: the slot is on the free list: no one else touches its block.
                    let buf =
                        unsafe { std::slice::from_raw_parts_mut(self.arena.slot(slot), BLOCK) };
                    stamp_block(buf, block, next + 1);
                }
                slot_req[slot] = next;
                // Never full: at most `qd` requests exist.
                let _ = self.to_io.push(PipeReq { slot, block, write });
                next += 1;
            }
            let Some((slot, res)) = self.from_io.pop() else {
                std::hint::spin_loop();
                continue;
            };
            let req = slot_req[slot];
            let block = block_of(req, self.blocks);
            assert_eq!(
                res, BLOCK as i32,
                "two-thread io_uring request {req} (block {block})"
            );
            if !write {
                // SAFETY: the completion was popped: the I/O thread is done with the slot.
                let buf = unsafe { std::slice::from_raw_parts(self.arena.slot(slot), BLOCK) };
                assert!(
                    check_block(buf, block),
                    "two-thread io_uring request {req}: block {block} read back wrong data"
                );
            }
            free.push(slot);
            done += 1;
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(io) = self.io.take() {
            let _ = io.join();
        }
    }
}

/// Runs `n` requests at queue depth `qd` through the library path and reports the wakeups they
/// needed: the signals the guest sent the host and the interrupts it took, from
/// `Disk::stats()` (the storvsc channel's own counters), per completed request; and, from
/// `/proc`, how often the threads that carry the requests blocked (voluntary context switches,
/// each of which needed a wakeup): the storvsc queue threads (`storvsc-*`), `vspd`'s channel
/// workers (`vmbus-chan-*`) and its io_uring workers (`iou-*`, where the kernel punts I/O that
/// cannot complete inline, such as ext4 buffered writes).
fn measure_wakeups(setup: &Setup, id: &str, write: bool, qd: u64, n: u64) {
    let vspd = setup.vspd.0.id();
    let me = std::process::id();
    let snap = || -> [ThreadCounters; 3] {
        [
            thread_counters(me, "storvsc-"),
            thread_counters(vspd, "vmbus-chan-"),
            thread_counters(vspd, "iou-"),
        ]
        .map(|r| r.unwrap_or_default())
    };
    let cost = Cost::start(setup, &[vspd, me]);
    let (before, stats_before) = (snap(), setup.disk.stats());
    let start = Instant::now();
    run_vmbus(setup, write, qd, 1 << 40, n);
    let elapsed = start.elapsed();
    let (after, stats) = (snap(), setup.disk.stats());
    cost.stop(id, n, elapsed, &["vspd", "guest"]);
    let [q, chan, iou] = [0, 1, 2].map(|i| after[i] - before[i]);
    let done = stats
        .completed
        .saturating_sub(stats_before.completed)
        .max(1);
    let signals = stats.signals.saturating_sub(stats_before.signals);
    let interrupts = stats.interrupts.saturating_sub(stats_before.interrupts);
    let per = |x: u64| x as f64 / done as f64;
    println!(
        "wakeups {id}: {done} requests in {:.2} s ({:.0} IOPS); per request: signals {:.4} + \
         interrupts {:.4} = {:.4}; thread sleeps per request: storvsc queue {:.4}, vspd channel \
         worker {:.4}, vspd io_uring workers {:.4} ({} threads)",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        per(signals),
        per(interrupts),
        per(signals + interrupts),
        per(q.sleeps),
        per(chan.sleeps),
        per(iou.sleeps),
        iou.threads,
    );
}

/// What a run of requests cost the processes that carried it, per request: CPU time and
/// system calls, counted by `perf` where it can here; else CPU time from `/proc` (in 10 ms
/// ticks: coarse for short runs) and the system calls unknown.
struct Cost {
    pids: Vec<u32>,
    cpu: Vec<f64>,
    perf: Vec<Result<PerfCount, String>>,
}

impl Cost {
    /// Starts counting for `pids` (perf first: attaching it takes a while).
    fn start(setup: &Setup, pids: &[u32]) -> Self {
        let perf = pids
            .iter()
            .enumerate()
            .map(|(i, &p)| PerfCount::start(p, &setup.perf_out.with_extension(format!("{i}"))))
            .collect();
        let cpu = pids
            .iter()
            .map(|&p| cpu_seconds(p).unwrap_or(0.0))
            .collect();
        Self {
            pids: pids.to_vec(),
            cpu,
            perf,
        }
    }

    /// Stops counting after `n` requests that took `elapsed`, and prints one line for `id`:
    /// `cost <id>: iops X cpu_us_per_io T (<name> t ...) syscalls_per_io S (<name> s ...)`.
    fn stop(self, id: &str, n: u64, elapsed: Duration, names: &[&str]) {
        let ticks: Vec<f64> = self
            .pids
            .iter()
            .zip(&self.cpu)
            .map(|(&p, before)| cpu_seconds(p).unwrap_or(0.0) - before)
            .collect();
        let counted: Result<Vec<PerfCounts>, String> = self
            .perf
            .into_iter()
            .map(|c| c.and_then(PerfCount::stop))
            .collect();
        let per = |x: f64| x / n as f64;
        let (cpu, calls, how): (Vec<f64>, Option<Vec<f64>>, String) = match counted {
            Ok(c) => (
                c.iter().map(|c| per(c.cpu * 1e6)).collect(),
                Some(c.iter().map(|c| per(c.syscalls as f64)).collect()),
                "perf".into(),
            ),
            Err(e) => (
                ticks.iter().map(|t| per(t * 1e6)).collect(),
                None,
                format!("/proc ticks; syscalls unknown: {e}"),
            ),
        };
        let detail = |v: &[f64], prec: usize| -> String {
            if names.len() < 2 {
                return String::new();
            }
            let parts: Vec<String> = names
                .iter()
                .zip(v)
                .map(|(m, x)| format!("{m} {x:.prec$}"))
                .collect();
            format!(" ({})", parts.join(" "))
        };
        let mut line = format!(
            "cost {id}: iops {:.0} cpu_us_per_io {:.2}{}",
            n as f64 / elapsed.as_secs_f64(),
            cpu.iter().sum::<f64>(),
            detail(&cpu, 2)
        );
        if let Some(calls) = calls {
            line += &format!(
                " syscalls_per_io {:.4}{}",
                calls.iter().sum::<f64>(),
                detail(&calls, 4)
            );
        }
        println!("{line} [{how}]");
    }
}

/// Runs `n` requests at queue depth `qd` through raw io_uring and prints their [`Cost`].
fn measure_uring_cost(setup: &Setup, uring: &mut Uring, id: &str, write: bool, n: u64) {
    let cost = Cost::start(setup, &[std::process::id()]);
    let start = Instant::now();
    uring.run(write, 1 << 40, n);
    cost.stop(id, n, start.elapsed(), &["io_uring"]);
}

/// Benchmarks `run(first, n)`, which carries requests `first..first + n`: each of criterion's
/// runs takes the requests after the last one's, so every function numbers its requests from 0
/// and all see the same offsets.
fn bench_requests(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    mut run: impl FnMut(u64, u64),
) {
    let mut next = 0u64;
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            run(next, iters);
            next += iters;
            start.elapsed()
        })
    });
}

/// Whether criterion runs in test mode (`cargo test --benches`: no `--bench` argument).
fn test_mode() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

fn storage(c: &mut Criterion) {
    let test_mode = test_mode();
    let setup = match Setup::start(test_mode) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("storage bench skipped: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group("storage");
    group.throughput(Throughput::Elements(1));
    let cases = std::env::var(CASES_ENV).ok();
    let wanted = |case: &str| {
        cases
            .as_deref()
            .is_none_or(|l| l.split([' ', ',']).any(|c| c == case))
    };
    for (op, write) in [("randread", false), ("randwrite", true)] {
        for qd in [1u64, 32] {
            if !wanted(&format!("{op}_qd{qd}")) {
                continue;
            }
            let mut uring = Uring::new(&setup, qd as usize).expect("io_uring on the image");
            bench_requests(&mut group, &format!("uring_{op}_qd{qd}"), |first, n| {
                uring.run(write, first, n)
            });
            let n = match (test_mode, qd) {
                (true, _) => 1000,
                (false, 1) => COST_REQUESTS / 10,
                (false, _) => COST_REQUESTS,
            };
            measure_uring_cost(
                &setup,
                &mut uring,
                &format!("storage/uring_{op}_qd{qd}"),
                write,
                n,
            );
            drop(uring);
            let mut pipe = Pipe::new(&setup, qd as usize).expect("two-thread io_uring");
            bench_requests(&mut group, &format!("pipe_{op}_qd{qd}"), |first, n| {
                pipe.run(write, first, n)
            });
            // No cost line: its two threads spin even between runs, so CPU per request says
            // nothing but "two cores".
            drop(pipe);
            let id = format!("vmbus_{op}_qd{qd}");
            bench_requests(&mut group, &id, |first, n| {
                run_vmbus(&setup, write, qd, first, n)
            });
            measure_wakeups(&setup, &format!("storage/{id}"), write, qd, n);
        }
    }
    group.finish();
    drop(setup);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(4))
        .sample_size(50);
    targets = storage
}
criterion_main!(benches);
