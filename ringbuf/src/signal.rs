//! The signalling protocol of a VMBus ring, written once over an abstract control page so that
//! the same code runs on shared memory and under the loom model checker (`tests/loom_signal.rs`).
//!
//! Rules (Linux `drivers/hv/ring_buffer.c`, `hv_signal_on_write`, `hv_pkt_iter_close`,
//! `hv_begin_read`/`hv_end_read`):
//! - The writer signals the reader after publishing a batch only if the ring was empty before the
//!   batch (the reader's `read_index` equals the writer's old `write_index`) and the reader's
//!   `interrupt_mask` is 0.
//! - The reader, after publishing a new `read_index`, signals the writer only if the writer set
//!   `pending_send_size` and the free space crossed from at most that many bytes to more.
//! - A reader about to sleep unmasks, then re-checks for data (a writer that saw the mask set, or
//!   the ring not empty, did not signal).
//! - A writer about to sleep sets `pending_send_size`, then re-checks for space.
//!
//! Each pair "store my word; full fence; load the peer's word" on one side meets the mirror pair
//! on the other side (a Dekker pattern): at least one of the two sides sees the other's store, so
//! either the sleeper sees the new state or the other side signals it. That is what makes the
//! full fences below necessary; a release/acquire pair alone would allow both loads to miss.

use std::sync::atomic::Ordering;

use vmbus_proto::ring::control;

/// One of the words of a ring's control page.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Word {
    /// `write_index`, written by the writer. Range: `0 .. data_len`, a multiple of 8.
    WriteIndex,
    /// `read_index`, written by the reader. Range: `0 .. data_len`, a multiple of 8.
    ReadIndex,
    /// `interrupt_mask`, written by the reader: non-zero means "do not signal me".
    InterruptMask,
    /// `pending_send_sz`, written by the writer: bytes it waits for, 0 if not waiting.
    PendingSendSize,
    /// `feature_bits`, written by the ring's creator.
    FeatureBits,
}

impl Word {
    /// The word's byte offset in the control page.
    pub const fn offset(self) -> usize {
        match self {
            Word::WriteIndex => control::WRITE_INDEX,
            Word::ReadIndex => control::READ_INDEX,
            Word::InterruptMask => control::INTERRUPT_MASK,
            Word::PendingSendSize => control::PENDING_SEND_SIZE,
            Word::FeatureBits => control::FEATURE_BITS,
        }
    }
}

/// Access to a ring's control words. Implemented over shared memory by the ring, and over loom's
/// atomics by the model check.
pub trait Control {
    /// Loads a word.
    fn load(&self, word: Word, order: Ordering) -> u32;
    /// Stores a word.
    fn store(&self, word: Word, value: u32, order: Ordering);
    /// A sequentially consistent fence.
    fn fence(&self);
    /// The size of the data area in bytes.
    fn data_len(&self) -> u32;
}

/// Bytes in use between `read` and `write` (both already validated to lie in `0..data_len`).
#[inline]
pub fn used_bytes(write: u32, read: u32, data_len: u32) -> u32 {
    if write >= read {
        write - read
    } else {
        data_len - read + write
    }
}

/// Bytes a writer may still count as free (Linux's `hv_get_bytes_to_write`). A packet of `n`
/// bytes fits only if `n < writable`, so that a full ring never looks empty.
#[inline]
pub fn writable_bytes(write: u32, read: u32, data_len: u32) -> u32 {
    data_len - used_bytes(write, read, data_len)
}

/// Writer: publishes `new_write` (the end of a batch that started at `old_write`) and says
/// whether the reader must be signalled.
#[inline]
pub fn publish_write<C: Control>(c: &C, old_write: u32, new_write: u32) -> bool {
    // Release: the packet bytes written before are visible to a reader that acquires this index.
    c.store(Word::WriteIndex, new_write, Ordering::Release);
    // Pairs with the fence in `prepare_read_sleep` (and `publish_read`): either we see the
    // reader's unmask / new read index, or the reader sees our new write index.
    c.fence();
    if c.load(Word::InterruptMask, Ordering::Relaxed) != 0 {
        return false;
    }
    c.load(Word::ReadIndex, Ordering::Relaxed) == old_write
}

/// Reader: publishes `new_read` (after consuming from `old_read`) and says whether the writer,
/// waiting for space, must be signalled.
#[inline]
pub fn publish_read<C: Control>(c: &C, old_read: u32, new_read: u32) -> bool {
    // Release: our copies out of the consumed bytes are done before the writer may reuse them.
    c.store(Word::ReadIndex, new_read, Ordering::Release);
    // Pairs with the fence in `prepare_write_sleep`: either we see the writer's pending size, or
    // the writer sees our new read index.
    c.fence();
    if c.load(Word::FeatureBits, Ordering::Relaxed) & control::FEATURE_PENDING_SEND_SIZE == 0 {
        return false;
    }
    let pending = c.load(Word::PendingSendSize, Ordering::Relaxed);
    if pending == 0 {
        return false;
    }
    let len = c.data_len();
    let write = c.load(Word::WriteIndex, Ordering::Relaxed);
    if write >= len || !write.is_multiple_of(8) {
        // A corrupt peer index: wake the writer and let it find the error itself.
        return true;
    }
    let before = writable_bytes(write, old_read, len);
    let after = writable_bytes(write, new_read, len);
    before <= pending && after > pending
}

/// Reader about to sleep: unmasks interrupts and says whether the ring is still empty at
/// `read` (true: safe to sleep, the writer will signal; false: data arrived, keep reading).
#[inline]
pub fn prepare_read_sleep<C: Control>(c: &C, read: u32) -> bool {
    c.store(Word::InterruptMask, 0, Ordering::Relaxed);
    // Pairs with the fence in `publish_write`.
    c.fence();
    c.load(Word::WriteIndex, Ordering::Acquire) == read
}

/// Reader starting to drain: masks interrupts, so the writer does not signal for every batch.
#[inline]
pub fn mask<C: Control>(c: &C) {
    c.store(Word::InterruptMask, 1, Ordering::Relaxed);
}

/// Writer about to sleep for `needed` bytes at `write`: sets `pending_send_size` and says
/// whether it must still sleep (true) or space appeared meanwhile (false, pending cleared).
#[inline]
pub fn prepare_write_sleep<C: Control>(c: &C, write: u32, needed: u32) -> bool {
    c.store(Word::PendingSendSize, needed, Ordering::Relaxed);
    // Pairs with the fence in `publish_read`.
    c.fence();
    let len = c.data_len();
    let read = c.load(Word::ReadIndex, Ordering::Acquire);
    if read >= len || !read.is_multiple_of(8) {
        // Corrupt: do not sleep; the write path will report the error.
        c.store(Word::PendingSendSize, 0, Ordering::Relaxed);
        return false;
    }
    if writable_bytes(write, read, len) > needed {
        c.store(Word::PendingSendSize, 0, Ordering::Relaxed);
        false
    } else {
        true
    }
}

/// Writer woken (or giving up): clears `pending_send_size`.
#[inline]
pub fn clear_pending<C: Control>(c: &C) {
    c.store(Word::PendingSendSize, 0, Ordering::Relaxed);
}
