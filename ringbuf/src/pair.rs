//! Two rings in one shared memory object, the way a VMBus channel's ring GPADL holds them: ring 0
//! carries host-to-guest... here simply "A to B", ring 1 "B to A". Used by the ring demo, the
//! cross-process test and the benches; the VSP builds its rings from GPADLs instead.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::ring::{Ring, CONTROL_SIZE};
use crate::shmem::{create_memfd, Mapping};
use crate::{Error, IncomingRing, OutgoingRing};

/// Two rings of equal size, back to back in one mapping.
#[derive(Debug, Clone)]
pub struct RingPair {
    mem: Arc<Mapping>,
    ring_len: usize,
}

impl RingPair {
    /// Bytes of shared memory two rings with `data_len`-byte data areas take.
    pub fn memory_len(data_len: usize) -> usize {
        2 * (CONTROL_SIZE + data_len)
    }

    /// Creates a memfd holding two freshly initialised rings; returns the pair and the memfd to
    /// hand to the other process.
    pub fn create_memfd(data_len: usize) -> Result<(Self, OwnedFd), Error> {
        let fd = create_memfd("vmbus-ring-pair", Self::memory_len(data_len) as u64)?;
        let pair = Self::open(fd.as_fd(), data_len)?;
        pair.init()?;
        Ok((pair, fd))
    }

    /// Two freshly initialised rings in anonymous shared memory (for threads of one process).
    pub fn anonymous(data_len: usize) -> Result<Self, Error> {
        let mem = Arc::new(Mapping::anonymous(Self::memory_len(data_len))?);
        let pair = Self {
            mem,
            ring_len: CONTROL_SIZE + data_len,
        };
        pair.ring(0)?;
        pair.init()?;
        Ok(pair)
    }

    /// Maps the two rings another process created in `fd`.
    pub fn open(fd: BorrowedFd<'_>, data_len: usize) -> Result<Self, Error> {
        let mem = Arc::new(Mapping::from_shared_file(
            fd,
            0,
            Self::memory_len(data_len),
        )?);
        let pair = Self {
            mem,
            ring_len: CONTROL_SIZE + data_len,
        };
        pair.ring(0)?;
        Ok(pair)
    }

    fn init(&self) -> Result<(), Error> {
        self.ring(0)?.init()?;
        self.ring(1)?.init()
    }

    /// Ring `i` (0 or 1).
    pub fn ring(&self, i: usize) -> Result<Ring, Error> {
        Ring::new(self.mem.clone(), i * self.ring_len, self.ring_len)
    }

    /// Side A's halves: it writes ring 0 and reads ring 1.
    pub fn side_a(&self) -> Result<(OutgoingRing, IncomingRing), Error> {
        Ok((
            OutgoingRing::new(self.ring(0)?)?,
            IncomingRing::new(self.ring(1)?)?,
        ))
    }

    /// Side B's halves: it writes ring 1 and reads ring 0.
    pub fn side_b(&self) -> Result<(OutgoingRing, IncomingRing), Error> {
        Ok((
            OutgoingRing::new(self.ring(1)?)?,
            IncomingRing::new(self.ring(0)?)?,
        ))
    }
}
