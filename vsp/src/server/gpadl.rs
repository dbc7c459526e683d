//! GPADLs (guest physical address descriptor lists): the page lists the guest describes with a
//! GpadlHeader message and as many GpadlBody messages as the list needs, and the table of the
//! complete ones.
//!
//! Every count and length here comes from the guest. The header announces the list's size; that
//! size is checked against the limits before anything proportional to it is allocated, and the
//! page numbers that follow are taken only up to the announced count.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use ringbuf::guestmem::{GuestMemory, PAGE_SIZE};
use vmbus_proto::ring::GpaRangeHeader;
use zerocopy::FromBytes;

use super::{status, ServerConfig};

/// A complete GPADL.
#[derive(Debug)]
pub(super) struct Gpadl {
    /// The channel it was created on.
    pub relid: u32,
    /// Offset of the buffer in its first page.
    pub byte_offset: u32,
    /// Length of the buffer in bytes.
    pub byte_count: u32,
    /// The pages, in order; every one is guest memory.
    pub pfns: Arc<[u64]>,
    /// The guest asked to tear it down while an open channel uses it as its ring: the
    /// GpadlTorndown is sent when that channel closes.
    pub teardown_pending: bool,
}

/// A GPADL whose header has arrived but not yet all of its page numbers.
#[derive(Debug)]
struct Partial {
    relid: u32,
    byte_offset: u32,
    byte_count: u32,
    /// Pages announced; `pfns.len() < expected` until complete.
    expected: usize,
    pfns: Vec<u64>,
}

/// What a GpadlBody message did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BodyResult {
    /// No GPADL in progress has that id: the message is dropped.
    Unknown,
    /// Page numbers added; more are due.
    Incomplete,
    /// The GPADL is complete (`status` 0, now in the table) or failed (removed); either way the
    /// guest is answered with GpadlCreated.
    Done {
        /// The channel the GPADL was created on.
        relid: u32,
        /// The creation status.
        status: u32,
    },
}

/// All GPADLs of the connection, complete and in progress, keyed by the guest's GPADL id.
///
/// Ids are unique across channels (Linux draws them from one counter): a header naming an id
/// in use, complete or not, fails.
#[derive(Debug, Default)]
pub(super) struct Gpadls {
    complete: BTreeMap<u32, Gpadl>,
    partial: BTreeMap<u32, Partial>,
    /// Bytes described by every GPADL in the table, complete or in progress (pages times 4096).
    total_bytes: u64,
    /// The complete GPADLs again, for channel threads (see [`GpadlIndex`]).
    index: GpadlIndex,
}

/// A complete GPADL as devices see it (netvsp's receive and send buffers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedGpadl {
    /// The channel the guest created it on.
    pub relid: u32,
    /// Offset of the buffer in its first page.
    pub byte_offset: u32,
    /// Length of the buffer in bytes.
    pub byte_count: u32,
    /// The pages, in order; each was guest memory when the GPADL was created.
    pub pfns: Arc<[u64]>,
}

/// The complete GPADLs of one connection, readable from channel threads: the server keeps it
/// equal to its own table (entries added when a GPADL completes, removed when it is torn
/// down). Its lock is taken only when a GPADL is created or torn down and when a device looks
/// one up, never per packet.
#[derive(Clone, Debug, Default)]
pub struct GpadlIndex(Arc<Mutex<HashMap<u32, SharedGpadl>>>);

impl GpadlIndex {
    /// The complete GPADL `gpadl`, if it exists now.
    pub fn get(&self, gpadl: u32) -> Option<SharedGpadl> {
        self.lock().get(&gpadl).cloned()
    }

    /// Adds (or replaces) a GPADL: the server's bookkeeping, and harnesses that run a device
    /// without a server.
    pub fn insert(&self, gpadl: u32, g: SharedGpadl) {
        self.lock().insert(gpadl, g);
    }

    fn remove(&self, gpadl: u32) {
        self.lock().remove(&gpadl);
    }

    fn retain(&self, keep: impl FnMut(&u32, &mut SharedGpadl) -> bool) {
        self.lock().retain(keep);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, SharedGpadl>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Gpadls {
    /// Handles a GpadlHeader for channel `relid` (the caller has checked the channel) carrying
    /// `rest`, the bytes after the fixed header. Returns `Ok(true)` if the GPADL is complete and
    /// in the table, `Ok(false)` if body messages are due, or `Err(status)` if it failed
    /// (nothing is kept).
    #[allow(clippy::too_many_arguments)]
    pub fn header(
        &mut self,
        config: &ServerConfig,
        mem: &GuestMemory,
        relid: u32,
        gpadl: u32,
        range_buflen: u16,
        range_count: u16,
        rest: &[u8],
    ) -> Result<bool, u32> {
        // Linux always describes one range (create_gpadl_header); more are not supported.
        if range_count != 1 {
            return Err(status::INVALID_PARAMETER);
        }
        let Ok((range, pfn_bytes)) = GpaRangeHeader::read_from_prefix(rest) else {
            return Err(status::INVALID_PARAMETER);
        };
        // At most about 2^20 pages (byte_count is a u32), so the arithmetic below cannot
        // overflow.
        let pages = range.page_count();
        if pages == 0 || u64::from(range_buflen) != 8 + 8 * pages {
            return Err(status::INVALID_PARAMETER);
        }
        let bytes = pages * PAGE_SIZE;
        if self.complete.contains_key(&gpadl) || self.partial.contains_key(&gpadl) {
            return Err(status::INVALID_PARAMETER);
        }
        // The limits, before allocating anything proportional to the announced size.
        if bytes > config.max_gpadl_bytes
            || self.complete.len() + self.partial.len() >= config.max_gpadls
            || self.total_bytes.saturating_add(bytes) > config.max_total_gpadl_bytes
        {
            return Err(status::INSUFFICIENT_RESOURCES);
        }
        // Bodies are needed: the GPADL waits in the table of partial ones, which is bounded.
        let expected = pages as usize;
        let mut partial = Partial {
            relid,
            byte_offset: range.byte_offset,
            byte_count: range.byte_count,
            expected,
            pfns: Vec::new(),
        };
        partial.append(pfn_bytes);
        if partial.pfns.len() == expected {
            self.insert_complete(mem, gpadl, partial, bytes)?;
            return Ok(true);
        }
        if self.partial.len() >= config.max_pending_gpadls {
            return Err(status::INSUFFICIENT_RESOURCES);
        }
        partial.pfns.reserve_exact(expected - partial.pfns.len());
        self.partial.insert(gpadl, partial);
        self.total_bytes += bytes;
        Ok(false)
    }

    /// Handles a GpadlBody for `gpadl` carrying the page-number bytes `data`.
    pub fn body(&mut self, mem: &GuestMemory, gpadl: u32, data: &[u8]) -> BodyResult {
        let Some(partial) = self.partial.get_mut(&gpadl) else {
            return BodyResult::Unknown;
        };
        partial.append(data);
        if partial.pfns.len() < partial.expected {
            return BodyResult::Incomplete;
        }
        let partial = self.partial.remove(&gpadl).expect("present above");
        let relid = partial.relid;
        let bytes = partial.expected as u64 * PAGE_SIZE;
        self.total_bytes = self.total_bytes.saturating_sub(bytes);
        let status = match self.insert_complete(mem, gpadl, partial, bytes) {
            Ok(()) => status::SUCCESS,
            Err(status) => status,
        };
        BodyResult::Done { relid, status }
    }

    /// Checks a fully described GPADL and puts it in the table.
    fn insert_complete(
        &mut self,
        mem: &GuestMemory,
        gpadl: u32,
        partial: Partial,
        bytes: u64,
    ) -> Result<(), u32> {
        if !partial.pfns.iter().all(|&pfn| mem.contains_page(pfn)) {
            return Err(status::INVALID_PARAMETER);
        }
        self.total_bytes += bytes;
        let pfns: Arc<[u64]> = partial.pfns.into();
        self.index.insert(
            gpadl,
            SharedGpadl {
                relid: partial.relid,
                byte_offset: partial.byte_offset,
                byte_count: partial.byte_count,
                pfns: pfns.clone(),
            },
        );
        self.complete.insert(
            gpadl,
            Gpadl {
                relid: partial.relid,
                byte_offset: partial.byte_offset,
                byte_count: partial.byte_count,
                pfns,
                teardown_pending: false,
            },
        );
        Ok(())
    }

    /// The complete GPADL `gpadl`.
    pub fn get(&self, gpadl: u32) -> Option<&Gpadl> {
        self.complete.get(&gpadl)
    }

    /// The complete GPADL `gpadl`, mutably.
    pub fn get_mut(&mut self, gpadl: u32) -> Option<&mut Gpadl> {
        self.complete.get_mut(&gpadl)
    }

    /// Removes the complete GPADL `gpadl`.
    pub fn remove(&mut self, gpadl: u32) -> Option<Gpadl> {
        let g = self.complete.remove(&gpadl)?;
        self.index.remove(gpadl);
        self.total_bytes = self
            .total_bytes
            .saturating_sub(g.pfns.len() as u64 * PAGE_SIZE);
        Some(g)
    }

    /// Removes the GPADL in progress `gpadl` if it belongs to `relid`; returns whether it did.
    pub fn remove_partial(&mut self, relid: u32, gpadl: u32) -> bool {
        match self.partial.get(&gpadl) {
            Some(p) if p.relid == relid => {
                self.total_bytes = self
                    .total_bytes
                    .saturating_sub(p.expected as u64 * PAGE_SIZE);
                self.partial.remove(&gpadl);
                true
            }
            _ => false,
        }
    }

    /// Removes every GPADL, complete or not, of channel `relid`.
    pub fn remove_channel(&mut self, relid: u32) {
        let mut freed = 0;
        self.index.retain(|_, g| g.relid != relid);
        self.complete.retain(|_, g| {
            let keep = g.relid != relid;
            if !keep {
                freed += g.pfns.len() as u64 * PAGE_SIZE;
            }
            keep
        });
        self.partial.retain(|_, p| {
            let keep = p.relid != relid;
            if !keep {
                freed += p.expected as u64 * PAGE_SIZE;
            }
            keep
        });
        self.total_bytes = self.total_bytes.saturating_sub(freed);
    }

    /// Removes every GPADL.
    pub fn clear(&mut self) {
        self.index.retain(|_, _| false);
        self.complete.clear();
        self.partial.clear();
        self.total_bytes = 0;
    }

    /// The index channel threads read.
    pub fn index(&self) -> &GpadlIndex {
        &self.index
    }

    /// Number of complete GPADLs.
    pub fn complete_len(&self) -> usize {
        self.complete.len()
    }

    /// Number of GPADLs in progress.
    pub fn partial_len(&self) -> usize {
        self.partial.len()
    }

    /// Bytes described by all GPADLs, complete or in progress.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
}

impl Partial {
    /// Appends the page numbers in `data`, up to the announced count. Bytes past what the GPADL
    /// still needs are ignored: some senders (UEFI, per OpenVMM's vmbus_server) always post a
    /// message of the maximum length, so a message's length does not bound its content.
    fn append(&mut self, data: &[u8]) {
        let want = self.expected - self.pfns.len();
        self.pfns.extend(
            data.chunks_exact(8)
                .take(want)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
        );
    }
}
