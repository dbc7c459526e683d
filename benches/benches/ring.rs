//! Two-thread throughput of the VMBus ring against crossbeam's `ArrayQueue`, in one criterion
//! group (`ring`), for in-band packets with 64-byte and 4 KiB payloads. Criterion reports
//! packets/s and bytes/s of payload; `benches/ring-ratio.sh` turns the estimates into the ratios
//! ring packets/s ÷ `ArrayQueue` packets/s.
//!
//! Method, the same for both contestants:
//! - One persistent consumer thread per benchmark function (spawned before criterion starts
//!   measuring it, stopped after), so no thread start-up is measured.
//! - Each measured run (`iter_custom(iters)`) sends `iters` packets from the bench thread; the
//!   clock stops only once the consumer has taken and validated all of them
//!   ([`Handoff::wait_consumed`]).
//! - The producer stamps every payload with its sequence number; the consumer checks the first 8
//!   bytes and the last byte ([`check`]), which also proves order and that nothing was lost.
//! - Both threads spin ([`Spinner`]): the producer when the ring or queue is full, the consumer
//!   when it is empty. Nobody sleeps and nobody signals: the ring's reader masks interrupts once
//!   and the writer ignores `commit`'s "signal the reader" answer. After a few hundred fruitless
//!   polls a spinner also calls `sched_yield`, so that on a busy two-core machine a descheduled
//!   peer gets the core back. What is measured is the data path (copies, index updates, cache
//!   lines moving between the two cores), not wake-up latency.
//!
//! The ring: [`RingPair::anonymous`] with a data area of [`data_len`] bytes (default
//! [`vmbus_benches::DEFAULT_DATA_LEN`]). The producer writes until the ring is full or it has
//! [`batch_len`] packets pending, then commits (one index update per batch); the consumer reads
//! up to [`batch_len`] packets (each is copied into the reader's private buffer and validated
//! there, as the ring's hardening requires) and commits once per drain. The baseline's consumer
//! drains in batches of the same length.
//!
//! The baseline: `ArrayQueue<[u8; N]>`, with the same capacity in packets as the ring
//! ([`ring_capacity`]). The payload moves by value, so `push` copies it in and `pop` copies it
//! out, exactly the two copies the ring makes (into shared memory, then into the reader's
//! buffer); `black_box` keeps the compiler from eliding the copy out, which it otherwise does
//! (the consumer checks only 9 bytes of the payload). `Box<[u8]>` would have moved only a pointer and instead measured the allocator
//! (allocate on one thread, free on the other), which is neither what the ring does nor what a
//! fair comparison of payload transport needs. `ArrayQueue` publishes every element on its own;
//! that per-packet cost, against the ring's per-batch commit, is part of what is compared.
//!
//! The physical limit, at 4 KiB only (`memcpy/4096`): the same bytes moved between the same two
//! threads by two plain `memcpy`s and nothing else: a shared mapping of the ring's size cut into
//! fixed `N`-byte slots, the producer copying each payload into the next slot and publishing a
//! count per batch, the consumer copying each slot out and checking it as above, publishing its
//! count per drain. No descriptor, no trailer, no validation: what the ring's bytes/s is held
//! against (`benches/ring-ratio.sh` prints ring bytes/s ÷ memcpy bytes/s).

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, ScopedJoinHandle};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use crossbeam_queue::ArrayQueue;
use ringbuf::pair::RingPair;
use ringbuf::shmem::Mapping;
use ringbuf::{Error, OutgoingPacket};
use vmbus_benches::{
    batch_len, check, data_len, pin, ring_capacity, stamp, CachePadded, Handoff, Side, Spinner,
};

/// Criterion function `id` of a contestant: each measured run sends `iters` packets with
/// `produce(sent, end)` (which sends packets `sent..end`), then waits
/// until the consumer thread has taken and validated all of them.
fn measure(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: BenchmarkId,
    handoff: &Handoff,
    consumer: &ScopedJoinHandle<'_, ()>,
    mut produce: impl FnMut(u64, u64),
) {
    let mut sent = 0u64;
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let end = sent + iters;
            let start = Instant::now();
            produce(sent, end);
            sent = end;
            handoff.wait_consumed(end, || consumer.is_finished());
            start.elapsed()
        })
    });
}

/// The VMBus ring with `N`-byte payloads and a `data_len`-byte data area.
fn bench_ring<const N: usize>(group: &mut BenchmarkGroup<'_, WallTime>, data_len: usize) {
    let pair = RingPair::anonymous(data_len).expect("mapping the ring pair");
    let (mut out, _) = pair.side_a().expect("the writer's half");
    let (_, mut inc) = pair.side_b().expect("the reader's half");
    let batch_len = batch_len(data_len, N);
    let handoff = Handoff::new();
    let handoff = &handoff;
    thread::scope(|s| {
        let consumer = s.spawn(move || {
            inc.mask();
            handoff.consume(|next| {
                let mut n = 0;
                while n < batch_len {
                    match inc.read() {
                        Ok(Some(p)) => {
                            assert!(check(p.payload, *next, N), "packet {next} is corrupt");
                            *next += 1;
                            n += 1;
                        }
                        Ok(None) => break,
                        Err(e) => panic!("reading the ring: {e}"),
                    }
                }
                if n > 0 {
                    inc.commit();
                }
                n
            })
        });
        let mut payload = [0u8; N];
        measure(
            group,
            BenchmarkId::new("vmbus_ring", N),
            handoff,
            &consumer,
            |mut sent, end| {
                let mut spinner = Spinner::default();
                while sent < end {
                    let mut batch = 0;
                    while batch < batch_len && sent < end {
                        stamp(&mut payload, sent);
                        match out.write(&OutgoingPacket::in_band(sent, false, &[&payload])) {
                            Ok(()) => {
                                sent += 1;
                                batch += 1;
                            }
                            Err(Error::Full { .. }) => break,
                            Err(e) => panic!("writing the ring: {e}"),
                        }
                    }
                    if batch > 0 {
                        out.commit();
                        spinner.reset();
                    } else {
                        spinner.spin();
                    }
                }
            },
        );
        handoff.stop();
    });
}

/// The `ArrayQueue` baseline with `N`-byte payloads, as many in flight as the ring holds.
fn bench_arrayqueue<const N: usize>(group: &mut BenchmarkGroup<'_, WallTime>, data_len: usize) {
    let queue = ArrayQueue::<[u8; N]>::new(ring_capacity(data_len, N));
    let queue = &queue;
    let batch_len = batch_len(data_len, N);
    let handoff = Handoff::new();
    let handoff = &handoff;
    thread::scope(|s| {
        let consumer = s.spawn(move || {
            handoff.consume(|next| {
                let mut n = 0;
                while n < batch_len {
                    match queue.pop() {
                        Some(payload) => {
                            // The copy out of the queue, as the ring's reader makes it: without
                            // this, the compiler reads the checked bytes straight from the slot
                            // and drops the rest of the copy (the consumer would then touch 2
                            // of a 4 KiB payload's 64 cache lines, where the ring's reader and
                            // `memcpy` move all of them).
                            let payload = std::hint::black_box(payload);
                            assert!(check(&payload, *next, N), "packet {next} is corrupt");
                            *next += 1;
                            n += 1;
                        }
                        None => break,
                    }
                }
                n
            })
        });
        let mut payload = [0u8; N];
        measure(
            group,
            BenchmarkId::new("arrayqueue", N),
            handoff,
            &consumer,
            |mut sent, end| {
                let mut spinner = Spinner::default();
                while sent < end {
                    stamp(&mut payload, sent);
                    match queue.push(payload) {
                        Ok(()) => {
                            sent += 1;
                            spinner.reset();
                        }
                        Err(_) => spinner.spin(),
                    }
                }
            },
        );
        handoff.stop();
    });
}

/// The physical limit: `N`-byte payloads copied into fixed slots of a shared mapping of
/// `data_len` bytes and copied out by the consumer, with the same batching as the ring.
fn bench_memcpy<const N: usize>(group: &mut BenchmarkGroup<'_, WallTime>, data_len: usize) {
    let slots = (data_len / N) as u64;
    let mem = Mapping::anonymous(data_len).expect("mapping the slots");
    let mem = &mem;
    // Slots written and published by the producer; `Handoff::consumed` is the consumer's count.
    let written = CachePadded(AtomicU64::new(0));
    let written = &written;
    let batch_len = batch_len(data_len, N) as u64;
    let handoff = Handoff::new();
    let handoff = &handoff;
    let slot = |seq: u64| (seq % slots) as usize * N;
    thread::scope(|s| {
        let consumer = s.spawn(move || {
            let mut buf = [0u8; N];
            handoff.consume(|next| {
                // Acquire: pairs with the producer's release store; the slots are written.
                let avail = written.0.load(Ordering::Acquire) - *next;
                let n = avail.min(batch_len);
                for _ in 0..n {
                    mem.read(slot(*next), &mut buf).expect("inside the mapping");
                    assert!(check(&buf, *next, N), "packet {next} is corrupt");
                    *next += 1;
                }
                n as usize
            })
        });
        let mut payload = [0u8; N];
        measure(
            group,
            BenchmarkId::new("memcpy", N),
            handoff,
            &consumer,
            |mut sent, end| {
                let mut spinner = Spinner::default();
                let mut free = 0u64;
                while sent < end {
                    if free == 0 {
                        free = slots - (sent - handoff.consumed());
                        if free == 0 {
                            spinner.spin();
                            continue;
                        }
                        spinner.reset();
                    }
                    let n = free.min(batch_len).min(end - sent);
                    for _ in 0..n {
                        stamp(&mut payload, sent);
                        mem.write(slot(sent), &payload).expect("inside the mapping");
                        sent += 1;
                    }
                    free -= n;
                    // Release: the slots' bytes are visible before the count that covers them.
                    written.0.store(sent, Ordering::Release);
                }
            },
        );
        handoff.stop();
    });
}

/// Both contestants for `N`-byte payloads, ring first.
fn bench_size<const N: usize>(group: &mut BenchmarkGroup<'_, WallTime>, data_len: usize) {
    group.throughput(Throughput::ElementsAndBytes {
        elements: 1,
        bytes: N as u64,
    });
    bench_ring::<N>(group, data_len);
    bench_arrayqueue::<N>(group, data_len);
}

/// The `ring` group: 64-byte and 4 KiB payloads.
fn ring(c: &mut Criterion) {
    pin(Side::Producer);
    let data_len = data_len();
    eprintln!(
        "ring data area: {} KiB; queue capacity: {} packets of 64 B, {} of 4 KiB",
        data_len / 1024,
        ring_capacity(data_len, 64),
        ring_capacity(data_len, 4096)
    );
    let mut group = c.benchmark_group("ring");
    bench_size::<64>(&mut group, data_len);
    bench_size::<4096>(&mut group, data_len);
    bench_memcpy::<4096>(&mut group, data_len);
    group.finish();
}

criterion_group! {
    name = benches;
    // Command-line options (--warm-up-time, --measurement-time, ...) override these.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = ring
}
criterion_main!(benches);
