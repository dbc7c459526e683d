//! Findings of the trust-boundary review, each reproduced against the real `vspd`: the attacker
//! is refused or contained, and a second guest keeps doing verified I/O.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use ringbuf::shmem::create_memfd;
use ringbuf::socket::SeqPacket;
use vmbus_proto::channel::Guid;
use vmbus_proto::partition::{self as wire, status, Kind};
use vsc::client::{Client, SUPPORTED_VERSIONS};
use vsc::loopback::Loopback;

mod common;
#[allow(dead_code)]
#[path = "common/hostile.rs"]
mod hostile;

use hostile::{good_guest_with, verified_io, Raw};

fn good_guest(socket: &Path) -> Result<hostile::Guest, String> {
    good_guest_with(socket, 32 << 20)
}

fn daemon(name: &str, extra: &[&str]) -> common::Daemon {
    let dir = common::fresh_dir("vspd-review", name);
    std::fs::File::create(dir.join("a.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut args = vec!["--disk", "path=a.img"];
    args.extend_from_slice(extra);
    common::Daemon::spawn(&dir, args).owning_dir()
}

/// Finding: guest memory had no bound on its total size. Sparse memfds cost nothing, so a front
/// end could declare regions of terabytes until the daemon's address space was spent (64
/// regions of 2 TiB, then smaller ones from more connections); after that every mapping and
/// allocation of the daemon failed, for every guest. Now a session's regions together are
/// bounded (`max_memory_bytes`, default 1 TiB), so the daemon's guest memory is bounded by
/// sessions times that.
#[test]
fn guest_memory_cannot_spend_the_daemons_address_space() {
    let mut d = daemon("address-space", &[]);
    let good = good_guest(&d.socket).unwrap();
    verified_io(&good, 1);

    // Each attacker declares 2 TiB regions, halving the size at each refusal down to a page:
    // before the fix, two of them left no address space for a new session's thread.
    let mut attackers = Vec::new();
    let mut refused = 0;
    for _ in 0..4 {
        let a = Raw::connect(&d.socket);
        let (mut gpa, mut size, mut regions) = (0u64, 2u64 << 40, 0);
        while regions < 64 && size >= 4096 {
            let fd = create_memfd("huge", size).unwrap();
            if a.add_memory(gpa, size, fd.as_fd()) == status::OK {
                gpa += size;
                regions += 1;
            } else {
                refused += 1;
                size /= 2;
            }
        }
        attackers.push(a);
    }
    assert!(refused > 0, "some regions were refused");
    let vm_kib = d.status_field("VmSize:");
    eprintln!(
        "vspd VmSize with {} attacking front ends: {} GiB",
        attackers.len(),
        vm_kib >> 20
    );
    assert!(d.try_wait().is_none(), "vspd died");
    // The guest already connected, and a new one, are served while the attackers hold on.
    verified_io(&good, 2);
    let second = good_guest(&d.socket).expect("a new guest connects");
    verified_io(&second, 3);
    assert!(
        vm_kib < attackers.len() as u64 * (1 << 30) + (64 << 20),
        "each front end's memory is at most 1 TiB: VmSize {vm_kib} KiB"
    );
    drop(attackers);
}

/// Opens `relid` on a ring GPADL whose pages make exactly `pieces` runs (so it costs the daemon
/// `pieces` kernel mappings). Returns whether the open succeeded.
fn open_in_pieces(front: &Loopback, client: &mut Client, relid: u32, pieces: usize) -> bool {
    let n = pieces.max(4);
    let all = front.alloc_pages(2 * n).unwrap();
    let mut sorted = all.clone();
    sorted.sort_unstable();
    // One run of n - pieces + 1 pages, then pieces - 1 pages each on its own.
    let run = n - pieces + 1;
    let mut pfns: Vec<u64> = sorted[..run].to_vec();
    pfns.extend((0..pieces - 1).map(|i| sorted[run + 2 * i + 1]));
    assert_eq!(pfns.len(), n);
    let gpadl = client.create_gpadl(relid, &pfns).unwrap();
    client.open(relid, gpadl, n as u32 / 2, 0, &[]).is_ok()
}

/// Finding: the kernel mappings of scattered rings were bounded per guest (4096) and per
/// process (half of `vm.max_map_count`, 32765 here), but 4096 times 64 sessions is eight times
/// the process's share: eight guests with scattered rings spent it, and from then on no guest
/// could open any channel (even a contiguous ring costs one mapping). A guest's share is now
/// at most the process's divided by the sessions allowed, so guests cannot starve each other.
#[test]
fn scattered_rings_of_some_guests_leave_mappings_for_the_others() {
    let dir = common::fresh_dir("vspd-review", "map-share");
    for disk in ["a.img", "b.img"] {
        std::fs::File::create(dir.join(disk))
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
    }
    let mut d =
        common::Daemon::spawn(&dir, ["--disk", "path=a.img", "--disk", "path=b.img"]).owning_dir();
    let good = good_guest(&d.socket).unwrap();
    verified_io(&good, 1);

    // Each attacker opens both controllers on rings of as many pieces as it is allowed.
    let mut attackers = Vec::new();
    let mut spent = false;
    for _ in 0..16 {
        let (front, messages) = Loopback::connect(&d.socket, 128 << 20).unwrap();
        let front = Arc::new(front);
        let mut client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS).unwrap();
        let relids: Vec<u32> = client
            .request_offers()
            .unwrap()
            .iter()
            .filter(|o| o.interface_type == Guid::SCSI)
            .map(|o| o.relid)
            .collect();
        let mut opened = 0;
        for relid in relids {
            let mut pieces = 2040;
            while pieces >= 1 {
                if open_in_pieces(&front, &mut client, relid, pieces) {
                    opened += 1;
                    break;
                }
                pieces /= 2;
            }
        }
        attackers.push((front, client));
        if opened == 0 {
            spent = true;
            break;
        }
    }
    eprintln!(
        "{} attackers; the process's mapping budget spent: {spent}",
        attackers.len()
    );
    assert!(d.try_wait().is_none(), "vspd died");
    verified_io(&good, 2);
    let second = good_guest(&d.socket).expect("a new guest opens its channel");
    verified_io(&second, 3);
    assert!(!spent, "the attackers spent the whole process's budget");
}

/// Finding: the warnings a front end causes were rate-limited per session (10 a minute), so a
/// front end that reconnected got a fresh allowance each time: 200 connections of 10 refused
/// regions each wrote 2000 warnings. The limits are now the daemon's, across sessions.
#[test]
fn reconnecting_does_not_reset_the_warning_rate_limit() {
    let mut d = daemon("log-flood", &[]);
    let good = good_guest(&d.socket).unwrap();
    verified_io(&good, 1);
    for _ in 0..200 {
        let a = Raw::connect(&d.socket);
        let empty = create_memfd("empty", 0).unwrap();
        for i in 0..10 {
            assert_eq!(
                a.add_memory(i << 20, 1 << 20, empty.as_fd()),
                status::BAD_MEMORY
            );
        }
    }
    assert!(d.try_wait().is_none(), "vspd died");
    verified_io(&good, 2);
    let log = std::fs::read_to_string(d.dir.join("vspd.log")).unwrap();
    let lines = log.lines().filter(|l| l.contains("WARN")).count();
    eprintln!("{lines} warnings for 2000 refused regions");
    assert!(lines <= 20, "{lines} warnings");
}

/// Sets up a front end that makes the daemon hold as many descriptors as a session may before
/// opening a channel: `regions` memory regions (at most 64) and an irqfd for each of `vps`
/// VPs (at most 256). `None` if the daemon dropped it.
fn descriptor_hog(socket: &Path, regions: u64, vps: u32) -> Option<Raw> {
    let a = Raw(SeqPacket::connect(socket).ok()?);
    let hello = wire::Hello {
        version: wire::VERSION,
        vp_count: wire::MAX_VPS,
    };
    a.0.send(&wire::encode(Kind::HELLO, &hello), &[]).ok()?;
    let mut buf = [0u8; wire::MAX_MESSAGE_SIZE];
    a.0.recv(&mut buf).ok()??;
    for i in 0..regions {
        let fd = create_memfd("r", 4096).unwrap();
        let m = wire::AddMemory {
            gpa: i * 4096,
            len: 4096,
            fd_offset: 0,
        };
        a.try_request(Kind::ADD_MEMORY, &m, &[fd.as_fd()])?;
    }
    for vp in 0..vps {
        let irq = ringbuf::Event::new().unwrap();
        let v = wire::SetVp {
            vp,
            flags: 0,
            simp_gpa: 0,
            siefp_gpa: 0,
        };
        a.try_request(Kind::SET_VP, &v, &[irq.as_fd()])?;
    }
    Some(a)
}

/// Finding: front ends make the daemon hold descriptors (a region, an irqfd per VP, several
/// per channel), bounded per session, but vspd kept the soft limit it was started with: 1024
/// under systemd, which three front ends holding 322 each spend, after which no other front
/// end could get its own (a fourth was dropped). vspd now raises its soft limit to the hard
/// one at start (and warns if even that is short of `max_sessions` front ends). Started here
/// with a soft limit of 1024.
#[test]
fn a_few_front_ends_do_not_spend_the_descriptor_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.maximum.is_some_and(|hard| hard < 4096) {
        eprintln!("skipped: the hard limit of open files is below 4096");
        return;
    }
    // vspd inherits this process's soft limit, lowered only while it is spawned (and soft
    // only, so that it can be restored without privilege).
    let saved = limit;
    limit.current = Some(1024);
    setrlimit(Resource::Nofile, limit).unwrap();
    let d = std::panic::catch_unwind(|| daemon("fds", &[]));
    setrlimit(Resource::Nofile, saved).unwrap();
    let mut d = d.unwrap();
    let good = good_guest(&d.socket).unwrap();
    verified_io(&good, 1);
    let before = d.fds();
    // Three front ends with 256 VPs and a fourth with 32: about 1020 descriptors.
    let mut hogs = Vec::new();
    for vps in [256, 256, 256, 32] {
        if let Some(h) = descriptor_hog(&d.socket, 64, vps) {
            hogs.push(h);
        }
        if hogs.len() == 1 {
            eprintln!("one front end holds {} descriptors", d.fds() - before);
        }
    }
    eprintln!(
        "{} front ends: vspd holds {} descriptors",
        hogs.len(),
        d.fds()
    );
    assert!(d.try_wait().is_none(), "vspd died");
    verified_io(&good, 2);
    let second = good_guest(&d.socket).expect("a new guest connects");
    verified_io(&second, 3);
}

/// CPU time (user plus system, in clock ticks) of process `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name (which is in parentheses): utime is the 12th, stime
    // the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Finding: when vspd is out of descriptors, `accept` fails (EMFILE) while the connection
/// stays queued, so the listener stays readable and the accept loop spun at full speed until a
/// descriptor was freed. It now backs off (as the NBD server does). vspd's limits are set to
/// 1024 here, spent by front ends; then a connection waits in the backlog.
#[test]
fn out_of_descriptors_the_accept_loop_does_not_spin() {
    use rustix::process::{prlimit, Pid, Resource, Rlimit};
    let mut d = daemon("accept-spin", &[]);
    // vspd's limits only (it raised its soft limit at start): 1024 and no more.
    let pid = Pid::from_raw(d.pid() as i32);
    let limit = Rlimit {
        current: Some(1024),
        maximum: Some(1024),
    };
    prlimit(pid, Resource::Nofile, limit).unwrap();
    let mut hogs = Vec::new();
    for _ in 0..3 {
        hogs.push(descriptor_hog(&d.socket, 64, wire::MAX_VPS).unwrap());
    }
    // A fourth takes exactly the rest: a connection, its wakeup, regions and irqfds.
    let left = 1024 - d.fds();
    eprintln!("{left} descriptors left");
    let regions = (left - 2).min(64);
    let vps = left - 2 - regions;
    hogs.push(descriptor_hog(&d.socket, regions as u64, vps as u32).unwrap());
    let waiting = SeqPacket::connect(&d.socket).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = cpu_ticks(d.pid());
    std::thread::sleep(std::time::Duration::from_secs(1));
    let spent = cpu_ticks(d.pid()) - before;
    eprintln!(
        "vspd holds {} descriptors; {spent} ticks of CPU in one second",
        d.fds()
    );
    assert!(d.try_wait().is_none(), "vspd died");
    // 100 ticks a second is one core: a spinning loop takes most of one.
    assert!(spent < 30, "{spent} ticks in one second");
    drop((waiting, hogs));
}
