//! A buffer the guest lent through a GPADL (netvsc's receive or send buffer), reached page by
//! page through its page list: never mapped as a whole, so a buffer scattered over thousands of
//! guest pages (Linux vmallocs them) costs no kernel mappings. Every offset is checked against
//! the buffer's length; pieces for the TAP's readv/writev are guest-memory ranges, merged where
//! consecutive pages are contiguous.

use std::sync::Arc;

use netdev::Shared;
use ringbuf::guestmem::GuestMemory;

use crate::server::SharedGpadl;

const PAGE: u64 = 4096;

/// Most pieces one range of a buffer is split into.
pub const MAX_RANGE_PIECES: usize = 32;

/// A guest buffer: `len` bytes starting `byte_offset` into the first of `pfns`.
#[derive(Clone, Debug)]
pub struct GuestBuffer {
    mem: Arc<GuestMemory>,
    pfns: Arc<[u64]>,
    byte_offset: u32,
    len: u32,
}

/// An offset or length outside the buffer (or a range too scattered to describe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfBuffer;

impl GuestBuffer {
    /// The buffer a GPADL describes, if its length fits its pages.
    pub fn new(mem: Arc<GuestMemory>, g: &SharedGpadl) -> Option<Self> {
        let end = u64::from(g.byte_offset) + u64::from(g.byte_count);
        if g.byte_count == 0 || end > g.pfns.len() as u64 * PAGE {
            return None;
        }
        Some(Self {
            mem,
            pfns: g.pfns.clone(),
            byte_offset: g.byte_offset,
            len: g.byte_count,
        })
    }

    /// Bytes in the buffer (never 0).
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the buffer is empty (never: a GPADL of no bytes is refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f(gpa, len)` for each physically contiguous run of `off .. off + len`.
    fn runs(
        &self,
        off: u32,
        len: usize,
        mut f: impl FnMut(u64, usize) -> Result<(), OutOfBuffer>,
    ) -> Result<(), OutOfBuffer> {
        let end = u64::from(off) + len as u64;
        if end > u64::from(self.len) {
            return Err(OutOfBuffer);
        }
        let mut at = u64::from(self.byte_offset) + u64::from(off);
        let mut left = len as u64;
        let mut run: Option<(u64, u64)> = None;
        while left > 0 {
            let pfn = *self.pfns.get((at / PAGE) as usize).ok_or(OutOfBuffer)?;
            let in_page = at % PAGE;
            let n = (PAGE - in_page).min(left);
            let gpa = pfn.checked_mul(PAGE).ok_or(OutOfBuffer)? + in_page;
            run = match run {
                Some((start, l)) if start + l == gpa => Some((start, l + n)),
                Some((start, l)) => {
                    f(start, l as usize)?;
                    Some((gpa, n))
                }
                None => Some((gpa, n)),
            };
            at += n;
            left -= n;
        }
        if let Some((start, l)) = run {
            f(start, l as usize)?;
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes at `off` out of the buffer.
    pub fn read(&self, off: u32, dst: &mut [u8]) -> Result<(), OutOfBuffer> {
        let mut done = 0;
        self.runs(off, dst.len(), |gpa, n| {
            self.mem
                .read(gpa, &mut dst[done..done + n])
                .map_err(|_| OutOfBuffer)?;
            done += n;
            Ok(())
        })
    }

    /// Copies `src` into the buffer at `off`.
    pub fn write(&self, off: u32, src: &[u8]) -> Result<(), OutOfBuffer> {
        let mut done = 0;
        self.runs(off, src.len(), |gpa, n| {
            self.mem
                .write(gpa, &src[done..done + n])
                .map_err(|_| OutOfBuffer)?;
            done += n;
            Ok(())
        })
    }

    /// The guest's memory the buffer lies in.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Appends to `out` the guest-physical runs (address, length) of `off .. off + len`, at
    /// most [`MAX_RANGE_PIECES`] of them (on an error some may have been appended).
    pub fn gpa_runs(
        &self,
        off: u32,
        len: usize,
        out: &mut Vec<(u64, usize)>,
    ) -> Result<(), OutOfBuffer> {
        let start = out.len();
        self.runs(off, len, |gpa, n| {
            if out.len() - start >= MAX_RANGE_PIECES {
                return Err(OutOfBuffer);
            }
            out.push((gpa, n));
            Ok(())
        })
    }

    /// Appends to `out` the guest-memory pieces of `off .. off + len`.
    pub fn pieces<'a>(
        &'a self,
        off: u32,
        len: usize,
        out: &mut Vec<Shared<'a>>,
    ) -> Result<(), OutOfBuffer> {
        let mem = &*self.mem;
        let start = out.len();
        self.runs(off, len, |gpa, n| {
            if out.len() - start >= MAX_RANGE_PIECES {
                return Err(OutOfBuffer);
            }
            out.push(Shared::Guest { mem, gpa, len: n });
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer(pfns: &[u64], byte_offset: u32, byte_count: u32) -> Option<GuestBuffer> {
        let fd = ringbuf::shmem::create_memfd("buf", 16 * PAGE).unwrap();
        let mut mem = GuestMemory::new();
        mem.add_region(0, 16 * PAGE, fd, 0).unwrap();
        GuestBuffer::new(
            Arc::new(mem),
            &SharedGpadl {
                relid: 1,
                byte_offset,
                byte_count,
                pfns: pfns.into(),
            },
        )
    }

    #[test]
    fn ranges_follow_the_page_list_and_merge_contiguous_pages() {
        let b = buffer(&[3, 4, 9, 1], 100, 4 * 4096 - 100).unwrap();
        let data: Vec<u8> = (0..9000u32).map(|i| i as u8).collect();
        b.write(4000, &data).unwrap();
        let mut back = vec![0; 9000];
        b.read(4000, &mut back).unwrap();
        assert_eq!(back, data);
        let mut pieces = Vec::new();
        b.pieces(0, 13000, &mut pieces).unwrap();
        let runs: Vec<(u64, usize)> = pieces
            .iter()
            .map(|p| match *p {
                Shared::Guest { gpa, len, .. } => (gpa, len),
                _ => unreachable!(),
            })
            .collect();
        // Pages 3 and 4 are one run; 9 its own; 1 its own.
        assert_eq!(
            runs,
            [(3 * 4096 + 100, 8092), (9 * 4096, 4096), (4096, 812)]
        );
        assert_eq!(b.read(b.len() - 1, &mut [0; 2]), Err(OutOfBuffer));
        assert_eq!(b.write(u32::MAX, &[0]), Err(OutOfBuffer));
    }

    #[test]
    fn a_gpadl_shorter_than_its_length_is_refused() {
        assert!(buffer(&[1], 0, 4097).is_none());
        assert!(buffer(&[1], 1, 4096).is_none());
        assert!(buffer(&[1], 0, 0).is_none());
        // Page numbers beyond guest memory: the accesses fail, nothing panics.
        let b = buffer(&[u64::MAX / 4096, 1 << 40], 0, 8192).unwrap();
        assert_eq!(b.read(0, &mut [0; 10]), Err(OutOfBuffer));
        assert_eq!(b.write(4096, &[0; 10]), Err(OutOfBuffer));
    }
}
