//! Guest memory: the guest-physical address space as regions of shared files (memfds), mapped
//! into this process. Every access is checked against the regions, so no guest-provided address
//! can reach outside guest memory. Built on [`Mapping`]; no unsafe code here.

use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;

use crate::shmem::{MapBudget, Mapping};
use crate::Error;

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;

/// One region of guest memory: `len` bytes at guest-physical `gpa`, backed by `fd` from
/// `fd_offset`.
#[derive(Debug)]
struct Region {
    gpa: u64,
    len: u64,
    fd: Arc<OwnedFd>,
    fd_offset: u64,
    map: Mapping,
}

/// The most separate kernel mappings [`GuestMemory::map_pages`] may hold at once for one
/// guest, by default: a ring GPADL of contiguous pages costs one, a scattered one a mapping per
/// run of consecutive pages. Linux guests allocate their rings contiguously.
pub const DEFAULT_MAX_MAPPED_PIECES: usize = 4096;

/// A guest's memory, as the host (or the loopback guest itself) sees it.
#[derive(Debug)]
pub struct GuestMemory {
    /// Sorted by `gpa`, non-overlapping.
    regions: Vec<Region>,
    /// What the views made by `map_pages` may cost in kernel mappings.
    budget: Arc<MapBudget>,
}

impl Default for GuestMemory {
    fn default() -> Self {
        Self::with_map_limit(DEFAULT_MAX_MAPPED_PIECES)
    }
}

impl GuestMemory {
    /// No memory yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// No memory yet; the views [`GuestMemory::map_pages`] makes may hold at most `pieces`
    /// kernel mappings at once (besides the process-wide [`MapBudget::process`]).
    pub fn with_map_limit(pieces: usize) -> Self {
        Self {
            regions: Vec::new(),
            budget: MapBudget::new(pieces),
        }
    }

    /// The mapping budget of the views [`GuestMemory::map_pages`] makes.
    pub fn map_budget(&self) -> &Arc<MapBudget> {
        &self.budget
    }

    /// Adds `len` bytes at guest-physical `gpa`, backed by `fd` from `fd_offset`. Addresses,
    /// offsets and lengths must be page aligned; regions may not overlap. The file must be a
    /// memfd sealed against shrinking and long enough for the range (see
    /// [`Mapping::from_shared_file`]): the peer that handed it over can then never make an
    /// access to guest memory fault.
    pub fn add_region(
        &mut self,
        gpa: u64,
        len: u64,
        fd: OwnedFd,
        fd_offset: u64,
    ) -> Result<(), Error> {
        let bad = Error::GuestRegion { gpa, len };
        if len == 0
            || !gpa.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || !fd_offset.is_multiple_of(PAGE_SIZE)
            || gpa.checked_add(len).is_none()
            || fd_offset.checked_add(len).is_none()
            || usize::try_from(len).is_err()
        {
            return Err(bad);
        }
        let end = gpa + len;
        if self
            .regions
            .iter()
            .any(|r| gpa < r.gpa + r.len && r.gpa < end)
        {
            return Err(bad);
        }
        let map = Mapping::from_shared_file(fd.as_fd(), fd_offset, len as usize)?;
        let at = self.regions.partition_point(|r| r.gpa < gpa);
        self.regions.insert(
            at,
            Region {
                gpa,
                len,
                fd: Arc::new(fd),
                fd_offset,
                map,
            },
        );
        Ok(())
    }

    /// Number of regions.
    pub fn regions_len(&self) -> usize {
        self.regions.len()
    }

    /// Total bytes of guest memory.
    pub fn total_len(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// The region holding all of `gpa .. gpa + len`, and the offset of `gpa` in it.
    fn locate(&self, gpa: u64, len: u64) -> Result<(&Region, usize), Error> {
        let end = gpa
            .checked_add(len)
            .ok_or(Error::GuestAddress { gpa, len })?;
        let i = self.regions.partition_point(|r| r.gpa + r.len <= gpa);
        match self.regions.get(i) {
            Some(r) if r.gpa <= gpa && end <= r.gpa + r.len => Ok((r, (gpa - r.gpa) as usize)),
            _ => Err(Error::GuestAddress { gpa, len }),
        }
    }

    /// Whether page frame `pfn` is guest memory.
    pub fn contains_page(&self, pfn: u64) -> bool {
        pfn.checked_mul(PAGE_SIZE)
            .is_some_and(|gpa| self.locate(gpa, PAGE_SIZE).is_ok())
    }

    /// Copies guest memory at `gpa` into `dst`. The range must lie in one region.
    pub fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), Error> {
        let (r, off) = self.locate(gpa, dst.len() as u64)?;
        r.map.read(off, dst)
    }

    /// Appends the `len` bytes of guest memory at `gpa` to `dst` (no zeroing of the new part
    /// first). The range must lie in one region.
    pub fn append_to(&self, gpa: u64, len: usize, dst: &mut Vec<u8>) -> Result<(), Error> {
        let (r, off) = self.locate(gpa, len as u64)?;
        r.map.append_to(off, len, dst)
    }

    /// Copies `src` into guest memory at `gpa`. The range must lie in one region.
    pub fn write(&self, gpa: u64, src: &[u8]) -> Result<(), Error> {
        let (r, off) = self.locate(gpa, src.len() as u64)?;
        r.map.write(off, src)
    }

    /// Fills `len` bytes of guest memory at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) -> Result<(), Error> {
        let (r, off) = self.locate(gpa, len as u64)?;
        r.map.fill(off, len, byte)
    }

    /// The 4-byte-aligned word at `gpa` as an atomic.
    pub fn atomic_u32(&self, gpa: u64) -> Result<&AtomicU32, Error> {
        let (r, off) = self.locate(gpa, 4)?;
        r.map.atomic_u32(off)
    }

    /// The 8-byte-aligned word at `gpa` as an atomic.
    pub fn atomic_u64(&self, gpa: u64) -> Result<&AtomicU64, Error> {
        let (r, off) = self.locate(gpa, 8)?;
        r.map.atomic_u64(off)
    }

    /// Maps the guest pages `pfns`, in order, as one contiguous view (runs of consecutive pages
    /// become one mapping each, charged to this memory's budget until the view is dropped).
    /// Fails if any page is not guest memory or the budget is spent.
    pub fn map_pages(&self, pfns: &[u64]) -> Result<Mapping, Error> {
        let mut runs: Vec<(&Region, u64, usize)> = Vec::new();
        for &pfn in pfns {
            let gpa = pfn.checked_mul(PAGE_SIZE).ok_or(Error::GuestAddress {
                gpa: u64::MAX,
                len: PAGE_SIZE,
            })?;
            let (r, off) = self.locate(gpa, PAGE_SIZE)?;
            let file_off = r.fd_offset + off as u64;
            if let Some(last) = runs.last_mut() {
                if Arc::ptr_eq(&last.0.fd, &r.fd) && last.1 + last.2 as u64 == file_off {
                    last.2 += PAGE_SIZE as usize;
                    continue;
                }
            }
            runs.push((r, file_off, PAGE_SIZE as usize));
        }
        let pieces: Vec<_> = runs
            .iter()
            .map(|(r, off, len)| (r.fd.as_fd(), *off, *len))
            .collect();
        Mapping::from_pieces_charged(&pieces, Some(&self.budget))
    }
}

impl GuestMemory {
    /// The host address and length of guest memory `gpa .. gpa + len`, which must lie in one
    /// region: an iovec for handing to the kernel (io_uring). The pointer stays valid while this
    /// `GuestMemory` lives (regions are never removed while it is shared); never turn it into a
    /// Rust reference, since the guest may change the bytes at any moment.
    pub fn host_iovec(&self, gpa: u64, len: u64) -> Result<(NonNull<u8>, usize), Error> {
        let (r, off) = self.locate(gpa, len)?;
        // `locate` proved the range lies in a mapping, whose length is a `usize`.
        let len = usize::try_from(len).map_err(|_| Error::GuestAddress { gpa, len })?;
        Ok((r.map.host_ptr(off, len)?, len))
    }

    /// Every region as (guest-physical address, host address, length), in guest address order:
    /// for registering guest memory with the kernel (io_uring fixed buffers). The same rules as
    /// for [`GuestMemory::host_iovec`] apply to the pointers.
    pub fn host_regions(&self) -> impl Iterator<Item = (u64, NonNull<u8>, usize)> + '_ {
        self.regions.iter().filter_map(|r| {
            let ptr = r.map.host_ptr(0, r.map.len()).ok()?;
            Some((r.gpa, ptr, r.map.len()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shmem::create_memfd;

    fn memory() -> GuestMemory {
        let mut m = GuestMemory::new();
        // 0..64 KiB and 1 MiB..1 MiB+64 KiB, both from one memfd.
        let fd = create_memfd("guest", 128 * 1024).unwrap();
        m.add_region(0, 65536, fd.try_clone().unwrap(), 0).unwrap();
        m.add_region(1 << 20, 65536, fd, 65536).unwrap();
        m
    }

    #[test]
    fn accesses_are_confined_to_regions() {
        let m = memory();
        assert_eq!(m.total_len(), 131072);
        m.write(65536 - 4, b"abcd").unwrap();
        assert!(
            m.write(65536 - 3, b"abcd").is_err(),
            "crosses the end of a region"
        );
        assert!(m.write(65536, b"x").is_err(), "a hole");
        assert!(m.read(u64::MAX - 1, &mut [0; 4]).is_err());
        m.write((1 << 20) + 8, b"hi").unwrap();
        let mut b = [0u8; 2];
        m.read((1 << 20) + 8, &mut b).unwrap();
        assert_eq!(&b, b"hi");
        assert!(m.contains_page(15) && !m.contains_page(16) && m.contains_page(256));
        assert!(!m.contains_page(u64::MAX));
    }

    #[test]
    fn regions_are_checked() {
        let mut m = memory();
        let fd = create_memfd("more", 8192).unwrap();
        assert!(
            m.add_region(4096, 4096, fd.try_clone().unwrap(), 0)
                .is_err(),
            "overlap"
        );
        assert!(
            m.add_region(70000, 4096, fd.try_clone().unwrap(), 0)
                .is_err(),
            "unaligned"
        );
        assert!(m
            .add_region(!4095, 8192, fd.try_clone().unwrap(), 0)
            .is_err());
        m.add_region(2 << 20, 8192, fd, 0).unwrap();
    }

    #[test]
    fn scattered_pages_map_contiguously() {
        let m = memory();
        m.fill(5 * 4096, 4096, 5).unwrap();
        m.fill(6 * 4096, 4096, 6).unwrap();
        m.fill((1 << 20) + 4096, 4096, 7).unwrap();
        let view = m.map_pages(&[6, 257, 5, 6]).unwrap();
        let mut b = [0u8; 1];
        for (i, want) in [6u8, 7, 5, 6].into_iter().enumerate() {
            view.read(i * 4096 + 100, &mut b).unwrap();
            assert_eq!(b[0], want);
        }
        assert!(m.map_pages(&[5, 16]).is_err(), "page 16 is a hole");
        assert!(m.map_pages(&[u64::MAX]).is_err());
    }

    #[test]
    fn scattered_views_are_bounded_by_the_budget() {
        let mut m = GuestMemory::with_map_limit(10);
        let fd = create_memfd("guest", 64 * 4096).unwrap();
        m.add_region(0, 64 * 4096, fd, 0).unwrap();
        // Every other page: eight runs of one page each.
        let scattered: Vec<u64> = (0..8).map(|i| i * 2).collect();
        let view = m.map_pages(&scattered).unwrap();
        assert_eq!(m.map_budget().used(), 8);
        assert!(matches!(
            m.map_pages(&scattered),
            Err(Error::MapBudget { .. })
        ));
        // Contiguous pages are one run, whatever their number.
        let contiguous: Vec<u64> = (20..60).collect();
        let ring = m.map_pages(&contiguous).unwrap();
        assert_eq!(m.map_budget().used(), 9);
        drop((view, ring));
        assert_eq!(m.map_budget().used(), 0);
    }

    #[test]
    fn unsealed_or_short_files_are_not_guest_memory() {
        let mut m = GuestMemory::new();
        let short = create_memfd("short", 4096).unwrap();
        assert!(matches!(
            m.add_region(0, 1 << 20, short, 0),
            Err(Error::UnsafeSharedFile(_))
        ));
        let loose = rustix::fs::memfd_create("loose", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&loose, 1 << 20).unwrap();
        assert!(m.add_region(0, 1 << 20, loose, 0).is_err());
        assert_eq!(m.regions_len(), 0);
    }

    #[test]
    fn host_iovecs_are_confined_to_regions() {
        let m = memory();
        let (p, len) = m.host_iovec((1 << 20) + 100, 200).unwrap();
        assert_eq!(len, 200);
        let regions: Vec<_> = m.host_regions().collect();
        assert_eq!(regions.len(), 2);
        assert_eq!((regions[1].0, regions[1].2), (1 << 20, 65536));
        assert_eq!(p.as_ptr() as usize - regions[1].1.as_ptr() as usize, 100);
        assert!(
            m.host_iovec(65536 - 4, 8).is_err(),
            "crosses the end of a region"
        );
        assert!(m.host_iovec(65536, 1).is_err(), "a hole");
        assert!(m.host_iovec(u64::MAX, 2).is_err());
    }
}
