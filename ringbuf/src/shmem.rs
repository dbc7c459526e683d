//! The one audited primitive for memory shared with another party.
//!
//! A [`Mapping`] is a region of memory that a peer (another process, a guest) can read and write
//! at any moment. It is never handed out as `&[u8]` or `&T`: bytes move in and out only by
//! copying ([`Mapping::read`], [`Mapping::write`]), and the control words are reached only as
//! atomics ([`Mapping::atomic_u32`]). Every access is bounds-checked against the mapping, so no
//! caller, whatever offsets it computes from hostile input, can reach outside it.
//!
//! This is one of the two modules of the crate that contain `unsafe` code (the other wraps no
//! more than this one needs); every block names the invariant it relies on.

// The module exists to confine the unsafe code that mapping and accessing shared memory needs.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use rustix::fs::{fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create, FileType};
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

use crate::Error;

/// A shared, read-write memory mapping that a peer may change at any time.
///
/// Invariant: `ptr .. ptr + len` is a live `MAP_SHARED` read-write mapping owned by this value
/// (unmapped on drop), and `ptr` is page aligned.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// What this mapping took from mapping budgets, given back on drop.
    charge: Option<Charge>,
}

// SAFETY: the mapping is plain memory with no thread affinity; all access goes through copies
// and atomics, which are sound from any thread (racing with the peer is expected and harmless
// to us, since we never form references to the bytes).
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only permits copies and atomic accesses.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of fresh anonymous shared memory (zero-filled). Useful for two threads of
    /// one process, and for tests.
    pub fn anonymous(len: usize) -> Result<Self, Error> {
        if len == 0 {
            return Err(Error::EmptyMapping);
        }
        // SAFETY: a null hint lets the kernel choose the address, so no existing memory is
        // replaced; the result is owned by the returned value.
        let ptr = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
            )
        }
        .map_err(Error::Map)?;
        Ok(Self::from_raw(ptr, len))
    }

    /// Maps `len` bytes of `fd` from `offset`, shared and read-write.
    pub fn from_fd(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<Self, Error> {
        if len == 0 {
            return Err(Error::EmptyMapping);
        }
        // SAFETY: a null hint lets the kernel choose the address, so no existing memory is
        // replaced; the result is owned by the returned value. Accesses beyond the file's end
        // would fault: callers size the file first (see `create_memfd`).
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                offset,
            )
        }
        .map_err(Error::Map)?;
        Ok(Self::from_raw(ptr, len))
    }

    /// Maps `len` bytes of a file a peer handed us, from `offset`, after checking that the peer
    /// cannot make the mapping fault later: the file must be a regular file (a memfd) at least
    /// `offset + len` bytes long and sealed against shrinking (`F_SEAL_SHRINK`). Without the
    /// seal the peer could truncate it at any moment and every access to the missing pages
    /// would kill this process with SIGBUS; with it, the size checked here holds for as long as
    /// the file exists.
    pub fn from_shared_file(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<Self, Error> {
        check_shared_file(fd, offset, len)?;
        Self::from_fd(fd, offset, len)
    }

    /// Maps several pieces of files back to back into one contiguous mapping: piece `i` is
    /// `len` bytes of `fd` from `offset`, placed right after piece `i - 1`. This is how a ring
    /// whose pages are scattered through guest memory (a GPADL) becomes one contiguous view.
    /// Every offset and length must be a multiple of 4096. Each piece is a mapping of its own
    /// in the kernel: the pieces are charged to the process's budget (see [`MapBudget`]) and,
    /// if given, to `budget` too; both are given back when the mapping is dropped.
    pub fn from_pieces_charged(
        pieces: &[(BorrowedFd<'_>, u64, usize)],
        budget: Option<&Arc<MapBudget>>,
    ) -> Result<Self, Error> {
        let mut total = 0usize;
        for &(_, offset, len) in pieces {
            if len == 0 || len % 4096 != 0 || offset % 4096 != 0 {
                return Err(Error::OutOfBounds {
                    offset: offset as usize,
                    len,
                });
            }
            total = total
                .checked_add(len)
                .ok_or(Error::OutOfBounds { offset: total, len })?;
        }
        if total == 0 {
            return Err(Error::EmptyMapping);
        }
        // Pay before mapping anything: a refused charge costs the kernel nothing.
        let mut charge = Charge::default();
        charge.take(MapBudget::process(), pieces.len())?;
        if let Some(b) = budget {
            charge.take(b, pieces.len())?;
        }
        // Reserve the whole range first (inaccessible), so that the fixed mappings below replace
        // only memory this function owns.
        // SAFETY: a null hint lets the kernel choose a fresh range; nothing is replaced.
        let base = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                total,
                ProtFlags::empty(),
                MapFlags::PRIVATE,
            )
        }
        .map_err(Error::Map)?;
        let mut mapping = Self::from_raw(base, total);
        mapping.charge = Some(charge);
        let mut at = 0usize;
        for &(fd, offset, len) in pieces {
            // SAFETY: `at .. at + len` lies inside the reservation made above, which `mapping`
            // owns and which no reference points into yet; MAP_FIXED replaces exactly that part
            // of the reservation with the file's pages.
            unsafe {
                mmap(
                    mapping.ptr.as_ptr().add(at).cast(),
                    len,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::SHARED | MapFlags::FIXED,
                    fd,
                    offset,
                )
            }
            .map_err(Error::Map)?;
            at += len;
        }
        Ok(mapping)
    }

    fn from_raw(ptr: *mut std::ffi::c_void, len: usize) -> Self {
        let ptr = NonNull::new(ptr.cast::<u8>()).expect("mmap never returns null on success");
        Self {
            ptr,
            len,
            charge: None,
        }
    }

    /// The length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an empty mapping cannot be created.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), Error> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::OutOfBounds { offset, len }),
        }
    }

    /// Copies `dst.len()` bytes at `offset` out of the mapping.
    ///
    /// The peer may be writing the same bytes; the copy then holds some mix of old and new
    /// bytes, which callers treat as untrusted input and validate after the copy.
    #[inline]
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), Error> {
        self.check(offset, dst.len())?;
        // SAFETY: `check` proved `offset .. offset + dst.len()` lies inside the live mapping (the
        // struct invariant); `dst` is a distinct local buffer, so the ranges do not overlap. No
        // reference to the shared bytes is created, so concurrent writes by the peer cannot
        // invalidate a Rust reference; they only make the copied values arbitrary.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }

    /// Appends the `len` bytes at `offset` to `dst`, copied straight into its spare capacity
    /// (a buffer filled from the mapping need not be zeroed first). As with
    /// [`read`](Self::read), the peer may change the bytes meanwhile.
    #[inline]
    pub fn append_to(&self, offset: usize, len: usize, dst: &mut Vec<u8>) -> Result<(), Error> {
        self.check(offset, len)?;
        dst.reserve(len);
        // SAFETY: `check` proved `offset .. offset + len` lies inside the live mapping (the
        // struct invariant); `reserve` made `len` bytes of spare capacity after `dst.len()`, in
        // `dst`'s own allocation, distinct from the mapping. The copy initialises exactly those
        // bytes before `set_len` exposes them (u8 has no invalid values). No reference to the
        // shared bytes is created (see `read`).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                dst.as_mut_ptr().add(dst.len()),
                len,
            );
            dst.set_len(dst.len() + len);
        }
        Ok(())
    }

    /// Copies `src` into the mapping at `offset`.
    #[inline]
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), Error> {
        self.check(offset, src.len())?;
        // SAFETY: `check` proved the destination lies inside the live, writable mapping (the
        // struct invariant); `src` is our own memory, distinct from the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len())
        };
        Ok(())
    }

    /// A cursor for writing consecutive pieces into `offset .. offset + len`, bounds-checked
    /// once here; each [`Cursor::put`] then only checks its length against what is left.
    #[inline]
    pub fn cursor(&self, offset: usize, len: usize) -> Result<Cursor<'_>, Error> {
        self.check(offset, len)?;
        Ok(Cursor {
            mapping: self,
            at: offset,
            end: offset + len,
        })
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), Error> {
        self.check(offset, len)?;
        // SAFETY: `check` proved the range lies inside the live, writable mapping.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), byte, len) };
        Ok(())
    }

    /// Hint: starts fetching the cache lines of `offset .. offset + len` for writing (early
    /// reads-for-ownership), so that the stores which follow find them already owned instead of
    /// waiting, one line at a time at the head of the store buffer, for each line to be taken
    /// from the core that last read it. The part outside the mapping is ignored; nothing
    /// happens off x86-64.
    #[inline]
    pub fn prefetch_write(&self, offset: usize, len: usize) {
        let end = offset.saturating_add(len).min(self.len);
        #[cfg(target_arch = "x86_64")]
        let mut at = offset;
        #[cfg(target_arch = "x86_64")]
        while at < end {
            // SAFETY: `at < end <= self.len`, so the address lies inside the live mapping
            // (struct invariant). PREFETCHW neither faults nor changes memory (hence
            // `readonly`): it only moves the line into this core's cache in an exclusive state.
            // It touches no register but its address operand, no flags and no stack. On an
            // x86-64 CPU without PRFCHW the encoding (0F 0D /1) executes as a NOP.
            unsafe {
                std::arch::asm!(
                    "prefetchw [{p}]",
                    p = in(reg) self.ptr.as_ptr().add(at),
                    options(nostack, preserves_flags, readonly)
                );
            }
            at += 64;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = end;
    }

    /// The 64-bit word at `offset` as an atomic. `offset` must be 8-byte aligned.
    #[inline]
    pub fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64, Error> {
        self.check(offset, 8)?;
        if !offset.is_multiple_of(8) {
            return Err(Error::Misaligned { offset });
        }
        // SAFETY: as for `atomic_u32`: inside the live mapping, 8-byte aligned (page-aligned
        // base, offset a multiple of 8), borrowed from `self`, interior mutability.
        Ok(unsafe { &*self.ptr.as_ptr().add(offset).cast::<AtomicU64>() })
    }

    /// The 32-bit word at `offset` as an atomic. `offset` must be 4-byte aligned.
    #[inline]
    pub fn atomic_u32(&self, offset: usize) -> Result<&AtomicU32, Error> {
        self.check(offset, 4)?;
        if !offset.is_multiple_of(4) {
            return Err(Error::Misaligned { offset });
        }
        // SAFETY: the word lies inside the live mapping (`check`), is 4-byte aligned (the mapping
        // is page aligned and `offset` is a multiple of 4), and lives as long as `self`, which
        // the returned reference borrows. An `AtomicU32` has interior mutability, so the peer
        // writing the word concurrently is the documented use, not a violation of `&`.
        Ok(unsafe { &*self.ptr.as_ptr().add(offset).cast::<AtomicU32>() })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this value owns (struct invariant); no reference
        // into it outlives `self`, since `atomic_u32` borrows `self`.
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Consecutive writes into a range of a [`Mapping`] checked once ([`Mapping::cursor`]).
#[derive(Debug)]
pub struct Cursor<'a> {
    mapping: &'a Mapping,
    /// Where the next piece goes. Invariant: `at <= end <= mapping.len`.
    at: usize,
    end: usize,
}

impl Cursor<'_> {
    /// Copies `src` at the cursor and moves past it; fails, writing nothing, if fewer than
    /// `src.len()` bytes of the range are left.
    #[inline]
    pub fn put(&mut self, src: &[u8]) -> Result<(), Error> {
        if src.len() > self.end - self.at {
            return Err(Error::OutOfBounds {
                offset: self.at,
                len: src.len(),
            });
        }
        // SAFETY: `at + src.len() <= end <= mapping.len` (checked just above and by the
        // invariant, which `Mapping::cursor` established with `check`), so the destination lies
        // inside the live, writable mapping; `src` is our own memory, distinct from it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.mapping.ptr.as_ptr().add(self.at),
                src.len(),
            )
        };
        self.at += src.len();
        Ok(())
    }
}

/// Creates a memfd of `len` bytes (zero-filled) for sharing with another process, sealed
/// against shrinking (`F_SEAL_SHRINK`), as [`Mapping::from_shared_file`] requires of memory a
/// peer hands over: neither side can truncate it under the other's mappings.
pub fn create_memfd(name: &str, len: u64) -> Result<OwnedFd, Error> {
    let fd =
        memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).map_err(Error::Map)?;
    ftruncate(fd.as_fd(), len).map_err(Error::Map)?;
    fcntl_add_seals(fd.as_fd(), SealFlags::SHRINK).map_err(Error::Map)?;
    Ok(fd)
}

/// Checks that `offset .. offset + len` of `fd` can be mapped without the peer being able to
/// make an access fault: see [`Mapping::from_shared_file`].
pub fn check_shared_file(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<(), Error> {
    // Seals first: once SHRINK is set, the size read afterwards can only grow.
    let seals = fcntl_get_seals(fd).map_err(|_| Error::UnsafeSharedFile("not a memfd"))?;
    if !seals.contains(SealFlags::SHRINK) {
        return Err(Error::UnsafeSharedFile(
            "memfd not sealed with F_SEAL_SHRINK",
        ));
    }
    let st = fstat(fd).map_err(Error::Map)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(Error::UnsafeSharedFile("not a regular file"));
    }
    // A sealed hugetlbfs file (MFD_HUGETLB) passes the checks above, yet its owner can punch
    // a hole in it and take the free huge pages: the next access here then finds no page to
    // fault in, and hugetlbfs answers with SIGBUS. Only shmem refills a hole with a fresh page.
    let fs = rustix::fs::fstatfs(fd).map_err(Error::Map)?;
    // `f_type`'s integer type varies by architecture.
    #[allow(clippy::unnecessary_cast)]
    let (magic, tmpfs) = (fs.f_type as i64, libc::TMPFS_MAGIC as i64);
    if magic != tmpfs {
        return Err(Error::UnsafeSharedFile(
            "not a plain memfd (hugetlbfs pages can vanish under the mapping)",
        ));
    }
    let size = u64::try_from(st.st_size).unwrap_or(0);
    if offset.checked_add(len as u64).is_none_or(|end| end > size) {
        return Err(Error::UnsafeSharedFile(
            "file shorter than the declared range",
        ));
    }
    Ok(())
}

/// A budget of kernel mappings. Every separate mapping costs one of the process's
/// `vm.max_map_count` entries, and when they run out every allocation in the process fails; so
/// a peer that describes memory as many scattered pieces (a ring GPADL of discontiguous pages)
/// pays for them from a budget and is refused once it is spent, instead of exhausting the
/// kernel's limit for everyone. There is one budget for the whole process
/// ([`MapBudget::process`]) and callers may add their own (one per guest, for example).
#[derive(Debug)]
pub struct MapBudget {
    used: AtomicUsize,
    limit: usize,
}

impl MapBudget {
    /// A budget of `limit` pieces.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// The process-wide budget: half the kernel's `vm.max_map_count` (the other half is left for
    /// the allocator, thread stacks, io_uring rings, libraries and whole-region mappings).
    pub fn process() -> &'static Arc<MapBudget> {
        static PROCESS: OnceLock<Arc<MapBudget>> = OnceLock::new();
        PROCESS.get_or_init(|| {
            let max = std::fs::read_to_string("/proc/sys/vm/max_map_count")
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .unwrap_or(65530);
            MapBudget::new(max / 2)
        })
    }

    /// Pieces in use.
    pub fn used(&self) -> usize {
        // Relaxed: a statistic; the budget's correctness rests on the CAS in `try_take`.
        self.used.load(Ordering::Relaxed)
    }

    /// The most pieces this budget allows.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn try_take(&self, n: usize) -> Result<(), Error> {
        // Relaxed throughout: the counter guards no other memory, only its own value, and the
        // compare-exchange makes concurrent takers agree on it.
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let available = self.limit.saturating_sub(used);
            if n > available {
                return Err(Error::MapBudget {
                    wanted: n,
                    available,
                });
            }
            match self.used.compare_exchange_weak(
                used,
                used + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }
}

/// What a mapping took from budgets; given back on drop.
#[derive(Debug, Default)]
struct Charge(Vec<(Arc<MapBudget>, usize)>);

impl Charge {
    fn take(&mut self, budget: &Arc<MapBudget>, n: usize) -> Result<(), Error> {
        budget.try_take(n)?;
        self.0.push((budget.clone(), n));
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        for (b, n) in self.0.drain(..) {
            // Relaxed: see `MapBudget::try_take`.
            b.used.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// Takes ownership of file descriptor `raw`, inherited from a parent process (for example mapped
/// into a child by `command-fds`), after checking that it is open.
///
/// # Safety
///
/// `raw` must not be owned by anything else in this process: the caller names a descriptor that
/// its parent placed there for it and that no other code has wrapped. The returned `OwnedFd`
/// closes it on drop.
pub unsafe fn inherited_fd(raw: RawFd) -> Result<OwnedFd, Error> {
    // SAFETY: `fcntl(F_GETFD)` only queries flags; the borrow does not outlive this statement,
    // and the caller guarantees `raw` names a descriptor of this process.
    let open = rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(raw) });
    open.map_err(Error::Map)?;
    // SAFETY: the descriptor is open (checked above) and, by the caller's contract, owned by
    // nothing else, so the new `OwnedFd` is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

impl Mapping {
    /// The address of `offset .. offset + len` of the mapping in this process, for handing to
    /// the kernel (io_uring reads and writes, buffer registration), which moves bytes in and out
    /// of shared memory without forming Rust references.
    ///
    /// The pointer is bounds-checked like every other access and stays valid while this mapping
    /// lives; the caller must keep the mapping alive until the kernel is done with it, and must
    /// never turn the pointer into a Rust reference (`&[u8]`, `&T`): the peer may change the
    /// bytes at any moment. Obtaining the pointer is safe; using it is the caller's unsafe code.
    pub fn host_ptr(&self, offset: usize, len: usize) -> Result<NonNull<u8>, Error> {
        self.check(offset, len)?;
        // SAFETY: `check` proved `offset <= self.len`, so the result lies inside the live mapping
        // or one past its end (struct invariant), which `NonNull::add` permits; an in-bounds
        // offset of a non-null pointer is non-null.
        Ok(unsafe { self.ptr.add(offset) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn bounds_are_enforced() {
        let m = Mapping::anonymous(4096).unwrap();
        let mut buf = [0u8; 8];
        assert!(m.read(4088, &mut buf).is_ok());
        assert!(matches!(
            m.read(4089, &mut buf),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            m.read(usize::MAX, &mut buf),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(m.write(4096, &[]).is_ok());
        assert!(m.write(4096, &[1]).is_err());
        // Appending: in bounds it adds exactly the bytes; out of bounds it adds nothing.
        m.fill(4090, 6, 7).unwrap();
        let mut v = vec![1u8];
        m.append_to(4090, 6, &mut v).unwrap();
        assert_eq!(v, [1, 7, 7, 7, 7, 7, 7]);
        assert!(m.append_to(4091, 6, &mut v).is_err());
        assert!(m.append_to(usize::MAX, 1, &mut v).is_err());
        assert_eq!(v.len(), 7);
        assert!(matches!(m.atomic_u32(2), Err(Error::Misaligned { .. })));
        assert!(m.atomic_u32(4096).is_err());
    }

    #[test]
    fn pieces_of_a_memfd_become_one_contiguous_view() {
        let fd = create_memfd("pieces", 4 * 4096).unwrap();
        let whole = Mapping::from_fd(fd.as_fd(), 0, 4 * 4096).unwrap();
        for page in 0..4u8 {
            whole
                .fill(usize::from(page) * 4096, 4096, page + 1)
                .unwrap();
        }
        // Pages 3, 1 and 2 (twice), in that order.
        let view = Mapping::from_pieces_charged(
            &[
                (fd.as_fd(), 3 * 4096, 4096),
                (fd.as_fd(), 4096, 2 * 4096),
                (fd.as_fd(), 2 * 4096, 4096),
            ],
            None,
        )
        .unwrap();
        assert_eq!(view.len(), 4 * 4096);
        let mut b = [0u8; 1];
        for (i, want) in [4u8, 2, 3, 3].into_iter().enumerate() {
            view.read(i * 4096 + 17, &mut b).unwrap();
            assert_eq!(b[0], want, "page {i}");
        }
        view.write(3 * 4096, &[9]).unwrap();
        whole.read(2 * 4096, &mut b).unwrap();
        assert_eq!(b[0], 9, "writes through the view reach the file");
        assert!(Mapping::from_pieces_charged(&[(fd.as_fd(), 100, 4096)], None).is_err());
        assert!(Mapping::from_pieces_charged(&[], None).is_err());
    }

    #[test]
    fn only_sealed_long_enough_memfds_are_mapped_from_a_peer() {
        // Sealed and long enough: mapped, and the peer can no longer shrink it.
        let fd = create_memfd("sealed", 8192).unwrap();
        let m = Mapping::from_shared_file(fd.as_fd(), 4096, 4096).unwrap();
        assert!(
            ftruncate(fd.as_fd(), 0).is_err(),
            "the seal forbids shrinking"
        );
        m.write(4095, &[1]).unwrap();
        // Declared longer than the file: the access past its end would be a SIGBUS.
        assert!(matches!(
            Mapping::from_shared_file(fd.as_fd(), 4096, 8192),
            Err(Error::UnsafeSharedFile(_))
        ));
        assert!(Mapping::from_shared_file(fd.as_fd(), u64::MAX - 4095, 8192).is_err());
        // A memfd without the seal (the peer could truncate it later), and a zero-length one.
        let loose = memfd_create("loose", MemfdFlags::CLOEXEC).unwrap();
        ftruncate(loose.as_fd(), 8192).unwrap();
        assert!(matches!(
            Mapping::from_shared_file(loose.as_fd(), 0, 8192),
            Err(Error::UnsafeSharedFile(_))
        ));
        let empty = create_memfd("empty", 0).unwrap();
        assert!(Mapping::from_shared_file(empty.as_fd(), 0, 4096).is_err());
        // Not a memfd at all: an eventfd, and a regular file on disk (it cannot be sealed).
        let ev = crate::Event::new().unwrap();
        assert!(Mapping::from_shared_file(ev.as_fd(), 0, 4096).is_err());
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(Mapping::from_shared_file(file.as_fd(), 0, 4096).is_err());
    }

    /// A sealed hugetlbfs memfd: its owner could punch a hole and take the free huge pages,
    /// and the mapper's next access would be a SIGBUS (seen with 2 huge pages: the owner
    /// touched the page, punched it out and took both pages; the mapper died of SIGBUS).
    #[test]
    fn sealed_hugetlb_memfds_are_refused() {
        let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING | MemfdFlags::HUGETLB;
        let Ok(fd) = memfd_create("huge", flags) else {
            eprintln!("skipped: no hugetlbfs memfds here");
            return;
        };
        let huge = 2 << 20;
        if ftruncate(fd.as_fd(), huge).is_err()
            || fcntl_add_seals(fd.as_fd(), SealFlags::SHRINK).is_err()
        {
            eprintln!("skipped: this hugetlbfs memfd cannot be sized and sealed");
            return;
        }
        assert!(matches!(
            check_shared_file(fd.as_fd(), 0, huge as usize),
            Err(Error::UnsafeSharedFile(_))
        ));
    }

    #[test]
    fn scattered_pieces_are_paid_from_budgets() {
        let fd = create_memfd("budget", 8 * 4096).unwrap();
        let budget = MapBudget::new(5);
        let pieces: Vec<_> = (0..4u64)
            .map(|i| (fd.as_fd(), i * 2 * 4096, 4096))
            .collect();
        let a = Mapping::from_pieces_charged(&pieces, Some(&budget)).unwrap();
        assert_eq!(budget.used(), 4);
        let e = Mapping::from_pieces_charged(&pieces[..2], Some(&budget)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::MapBudget {
                    wanted: 2,
                    available: 1
                }
            ),
            "{e}"
        );
        assert_eq!(budget.used(), 4, "a refused charge takes nothing");
        drop(a);
        assert_eq!(budget.used(), 0, "dropping the view gives its pieces back");
        Mapping::from_pieces_charged(&pieces, Some(&budget)).unwrap();
    }

    #[test]
    fn two_mappings_of_one_memfd_share_bytes() {
        let fd = create_memfd("test", 8192).unwrap();
        let a = Mapping::from_fd(fd.as_fd(), 0, 8192).unwrap();
        let b = Mapping::from_fd(fd.as_fd(), 4096, 4096).unwrap();
        a.write(4100, b"hello").unwrap();
        let mut got = [0u8; 5];
        b.read(4, &mut got).unwrap();
        assert_eq!(&got, b"hello");
        b.atomic_u32(8)
            .unwrap()
            .store(0xdead_beef, Ordering::Relaxed);
        let mut word = [0u8; 4];
        a.read(4096 + 8, &mut word).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0xdead_beef);
    }

    #[test]
    fn cursors_write_consecutive_pieces_inside_their_range_only() {
        let m = Mapping::anonymous(4096).unwrap();
        let mut c = m.cursor(4000, 16).unwrap();
        c.put(b"abc").unwrap();
        c.put(&[]).unwrap();
        c.put(b"defghijklmnop").unwrap();
        assert!(
            matches!(
                c.put(b"q"),
                Err(Error::OutOfBounds {
                    offset: 4016,
                    len: 1
                })
            ),
            "the range is full"
        );
        let mut got = [0u8; 17];
        m.read(4000, &mut got).unwrap();
        assert_eq!(&got, b"abcdefghijklmnop\0");
        let mut c = m.cursor(4090, 6).unwrap();
        assert!(
            c.put(b"1234567").is_err(),
            "longer than the range: nothing written"
        );
        m.read(4090, &mut got[..6]).unwrap();
        assert_eq!(&got[..6], &[0; 6]);
        assert!(m.cursor(4090, 7).is_err());
        assert!(m.cursor(usize::MAX, 2).is_err());
        // Prefetching is a hint: anywhere, even outside the mapping, it changes nothing.
        m.prefetch_write(0, 4096);
        m.prefetch_write(4090, 1 << 20);
        m.prefetch_write(usize::MAX, usize::MAX);
        m.read(4000, &mut got).unwrap();
        assert_eq!(&got, b"abcdefghijklmnop\0");
    }

    #[test]
    fn host_pointers_are_bounds_checked() {
        let m = Mapping::anonymous(8192).unwrap();
        let base = m.host_ptr(0, 8192).unwrap();
        let mid = m.host_ptr(4096, 16).unwrap();
        assert_eq!(mid.as_ptr() as usize - base.as_ptr() as usize, 4096);
        assert!(m.host_ptr(8192, 0).is_ok());
        assert!(m.host_ptr(8190, 4).is_err());
        assert!(m.host_ptr(usize::MAX, 2).is_err());
    }
}
