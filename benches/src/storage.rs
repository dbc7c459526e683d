//! What the `storage` bench's contestants share: the image file and its contents, the request
//! sequence (which block request `i` touches), the check every read makes, the per-thread
//! counters read from `/proc` to count wake-ups, and the cost counters: CPU time per process
//! from `/proc` ([`cpu_seconds`]), or exact, with system calls, from `perf` ([`PerfCount`]).
//!
//! Every 4 KiB block of the image starts with its own block number (little endian) and a
//! version; the rest is filler. Reads check the first 8 bytes, writes keep the invariant (they
//! write the block's number and a new version), so any contestant can follow any other on the
//! same file, and a read that returns the wrong block fails the bench.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Request size, and the block the image is stamped in.
pub const BLOCK: usize = 4096;

/// Size of the bench's image file (1 GiB); the test mode of the bench uses [`TEST_IMAGE_BYTES`].
pub const IMAGE_BYTES: u64 = 1 << 30;

/// Size of the image when the bench runs in criterion's test mode (`cargo test --benches`).
pub const TEST_IMAGE_BYTES: u64 = 16 << 20;

/// The block request number `i` of a run touches, of `blocks`: a fixed pseudo-random sequence
/// (SplitMix64 of `i`), the same for every contestant.
#[inline]
pub fn block_of(i: u64, blocks: u64) -> u64 {
    let mut z = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) % blocks
}

/// Fills `buf` (one block) as block `block`, version `version`: block number, version, filler.
#[inline]
pub fn stamp_block(buf: &mut [u8], block: u64, version: u64) {
    buf[..8].copy_from_slice(&block.to_le_bytes());
    buf[8..16].copy_from_slice(&version.to_le_bytes());
}

/// Whether `buf` is a whole block that belongs to block `block`.
#[inline]
pub fn check_block(buf: &[u8], block: u64) -> bool {
    buf.first_chunk::<8>()
        .is_some_and(|head| check_block_head(buf.len(), *head, block))
}

/// Whether data of `len` bytes whose first 8 are `head` is a whole block that belongs to block
/// `block` (for data read in place: only those bytes are copied out).
#[inline]
pub fn check_block_head(len: usize, head: [u8; 8], block: u64) -> bool {
    len == BLOCK && head == block.to_le_bytes()
}

/// Makes `path` an image of `bytes` bytes with every block stamped (version 0), unless it
/// already is one (same size, first and last blocks stamped: kept from an earlier run), then
/// reads it whole once so that it sits in the page cache.
pub fn prepare_image(path: &Path, bytes: u64) -> std::io::Result<()> {
    let blocks = bytes / BLOCK as u64;
    let reusable = File::open(path).and_then(|f| {
        let mut ok = f.metadata()?.len() == bytes;
        let mut buf = vec![0u8; BLOCK];
        for b in [0, blocks / 2, blocks - 1] {
            if ok {
                f.read_exact_at(&mut buf, b * BLOCK as u64)?;
                ok = check_block(&buf, b);
            }
        }
        Ok(ok)
    });
    if !matches!(reusable, Ok(true)) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let mut chunk = vec![0x5au8; 1 << 20];
        let per_chunk = chunk.len() / BLOCK;
        for c in 0..bytes / chunk.len() as u64 {
            for (j, b) in chunk.chunks_mut(BLOCK).enumerate() {
                stamp_block(b, c * per_chunk as u64 + j as u64, 0);
            }
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
    }
    // Warm the page cache.
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// Counters of one thread (or the sum over several) from `/proc/<pid>/task/<tid>/`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ThreadCounters {
    /// `syscw` from `io`: write-like system calls; every eventfd signal is one `write(2)`.
    pub writes: u64,
    /// `voluntary_ctxt_switches` from `status`: how many times the thread blocked (slept),
    /// each of which someone had to wake it from.
    pub sleeps: u64,
    /// How many threads were summed.
    pub threads: usize,
}

impl std::ops::Sub for ThreadCounters {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            writes: self.writes.saturating_sub(o.writes),
            sleeps: self.sleeps.saturating_sub(o.sleeps),
            threads: self.threads,
        }
    }
}

/// Sums [`ThreadCounters`] over the threads of process `pid` whose name (`comm`) starts with
/// `prefix`.
pub fn thread_counters(pid: u32, prefix: &str) -> std::io::Result<ThreadCounters> {
    let mut sum = ThreadCounters::default();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir: PathBuf = e?.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread exited meanwhile
        };
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        let field = |file: &str, key: &str| -> u64 {
            std::fs::read_to_string(dir.join(file))
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix(key))
                        .and_then(|v| v.trim().parse().ok())
                })
                .unwrap_or(0)
        };
        sum.writes += field("io", "syscw:");
        sum.sleeps += field("status", "voluntary_ctxt_switches:");
        sum.threads += 1;
    }
    Ok(sum)
}

/// CPU time (user plus system) process `pid` has used so far, all its threads (live or exited)
/// included, in seconds: `utime + stime` from `/proc/<pid>/stat`, in clock ticks (10 ms), so a
/// difference is exact to a few ticks: measure over a second or more.
pub fn cpu_seconds(pid: u32) -> std::io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces and parentheses): state is field 3,
    // utime and stime are fields 14 and 15 of the whole line.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| std::io::Error::other("malformed /proc/<pid>/stat"))?;
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Ok(ticks as f64 / hz)
}

/// What `perf stat` counted for one process (all its threads) between
/// [`PerfCount::start`] and [`PerfCount::stop`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerfCounts {
    /// System calls (`raw_syscalls:sys_enter` tracepoint).
    pub syscalls: u64,
    /// CPU time in seconds (`task-clock`, exact, unlike the ticks of [`cpu_seconds`]).
    pub cpu: f64,
}

/// A count, by `perf stat`, of the system calls and CPU time of one process (all its threads),
/// between [`start`](Self::start) and [`stop`](Self::stop). Needs `perf` (Debian: linux-perf)
/// and the tracepoint; without them `start` or `stop` says so and the count is unknown.
#[derive(Debug)]
pub struct PerfCount {
    perf: Child,
    out: PathBuf,
}

impl PerfCount {
    /// Starts counting for process `pid`; `out` is a scratch file. Waits until `perf` has had
    /// time to attach.
    pub fn start(pid: u32, out: &Path) -> Result<Self, String> {
        let _ = std::fs::remove_file(out);
        let perf = Command::new("perf")
            .args(["stat", "-e", "raw_syscalls:sys_enter,task-clock", "-x", ","])
            .arg("-o")
            .arg(out)
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("perf: {e}"))?;
        // perf attaches to every thread of the process before it counts and has no ready
        // signal: give it time (what the process does meanwhile is counted too).
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self {
            perf,
            out: out.to_owned(),
        })
    }

    /// Stops counting and returns the counts, or why there are none.
    pub fn stop(mut self) -> Result<PerfCounts, String> {
        let pid = i32::try_from(self.perf.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or("perf has no pid")?;
        // perf prints its counts when interrupted (and then exits with 130).
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        let _ = self.perf.wait();
        let text = std::fs::read_to_string(&self.out).map_err(|e| format!("perf output: {e}"))?;
        let _ = std::fs::remove_file(&self.out);
        parse_perf_csv(&text).ok_or_else(|| format!("perf counted nothing: {}", text.trim()))
    }
}

/// Parses `perf stat -x ,` output of the events `raw_syscalls:sys_enter` and `task-clock`:
/// lines "<count>,<unit>,<event>,..." ("<not counted>" where perf could not count).
fn parse_perf_csv(text: &str) -> Option<PerfCounts> {
    let value = |event: &str| -> Option<f64> {
        text.lines().find_map(|l| {
            let mut f = l.split(',');
            let v = f.next()?.trim();
            (f.nth(1)? == event).then(|| v.parse().ok())?
        })
    };
    Some(PerfCounts {
        syscalls: value("raw_syscalls:sys_enter")? as u64,
        cpu: value("task-clock")? / 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_in_range_and_spread() {
        let blocks = 1000;
        let mut seen = vec![false; blocks as usize];
        for i in 0..10_000 {
            let b = block_of(i, blocks);
            assert!(b < blocks);
            seen[b as usize] = true;
        }
        assert!(seen.iter().filter(|&&s| s).count() > 990);
    }

    #[test]
    fn cpu_time_grows_with_work() {
        let before = cpu_seconds(std::process::id()).unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = cpu_seconds(std::process::id()).unwrap();
        assert!(after >= before, "{before} -> {after}");
        assert!(cpu_seconds(u32::MAX).is_err(), "no such process");
    }

    #[test]
    fn perf_output_is_parsed() {
        let text = "# started on Sun Dec  6 07:00:37 2026\n\n\
                    1234,,raw_syscalls:sys_enter,322847,100.00,0.000,/sec\n\
                    250.5,msec,task-clock,322847,100.00,0.001,CPUs utilized\n";
        assert_eq!(
            parse_perf_csv(text),
            Some(PerfCounts {
                syscalls: 1234,
                cpu: 0.2505
            })
        );
        let not_counted = "<not counted>,,raw_syscalls:sys_enter,0,100.00,,\n\
                           <not counted>,msec,task-clock,0,100.00,,\n";
        assert_eq!(parse_perf_csv(not_counted), None);
    }

    #[test]
    fn stamp_then_check() {
        let mut b = vec![0u8; BLOCK];
        stamp_block(&mut b, 77, 3);
        assert!(check_block(&b, 77));
        assert!(!check_block(&b, 78));
        assert!(!check_block(&b[..512], 77));
    }

    #[test]
    fn counters_of_this_thread_see_an_eventfd_like_write() {
        let me = std::process::id();
        let before = thread_counters(me, "").unwrap();
        assert!(before.threads >= 1);
        let mut f = tempfile_in_target();
        f.write_all(b"x").unwrap();
        let after = thread_counters(me, "").unwrap();
        assert!(after.writes > before.writes);
    }

    fn tempfile_in_target() -> File {
        let p = std::env::temp_dir().join(format!("vmbus-benches-{}", std::process::id()));
        let f = File::create(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }
}
