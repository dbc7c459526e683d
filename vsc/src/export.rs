//! The storvsc disks as NBD exports: [`crate::nbd::BlockDevice`] over [`Disk`].

use crate::nbd::{BatchFlush, BlockDevice, IoError as NbdError, ReadData, ReadDone, WriteDone};
use crate::storvsc::{Disk, DiskOp, IoError, ReadView};

/// How a SCSI failure reads to an NBD client.
fn nbd_error(e: IoError) -> NbdError {
    match e {
        // DATA PROTECT.
        IoError::Sense {
            key: 0x07,
            asc: 0x27,
            ascq: 0x07,
        } => NbdError::NoSpace,
        IoError::Sense { key: 0x07, .. } => NbdError::ReadOnly,
        // ILLEGAL REQUEST.
        IoError::Sense { key: 0x05, .. } | IoError::Invalid => NbdError::Invalid,
        _ => NbdError::Io,
    }
}

impl ReadData for ReadView<'_> {
    fn len(&self) -> usize {
        ReadView::len(self)
    }
    fn append_to(&self, dst: &mut Vec<u8>) -> Result<(), NbdError> {
        ReadView::append_to(self, dst).map_err(nbd_error)
    }
}

impl BlockDevice for Disk {
    fn size(&self) -> u64 {
        self.geometry().size()
    }

    fn read_only(&self) -> bool {
        self.geometry().read_only
    }

    fn block_size(&self) -> u32 {
        self.geometry().block_size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        Disk::read(self, offset, buf).map_err(nbd_error)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        Disk::write(self, offset, data, fua).map_err(nbd_error)
    }

    fn async_limit(&self) -> u32 {
        self.max_transfer()
    }

    fn read_async(&self, offset: u64, len: u32, done: ReadDone) {
        // The reply copies the data from the bounce pages into the bytes it sends.
        self.submit_read(offset, len, move |r| match r {
            Ok(view) => done(Ok(&view)),
            Err(e) => done(Err(nbd_error(e))),
        });
    }

    fn write_async(&self, offset: u64, data: Vec<u8>, fua: bool, done: WriteDone) {
        self.submit(
            DiskOp::Write { offset, data, fua },
            Box::new(move |r| match r {
                Ok(buffer) => done(Ok(()), buffer),
                Err(e) => done(Err(nbd_error(e)), Vec::new()),
            }),
        );
    }

    fn batch_hook(&self, flush: BatchFlush) -> Option<Box<dyn std::any::Any + Send>> {
        Some(Box::new(self.controller().add_batch_hook(flush)))
    }

    fn attach_source(
        &self,
        source: Box<dyn crate::queue::QueueSource>,
    ) -> Result<crate::queue::SourceWaker, Box<dyn crate::queue::QueueSource>> {
        self.controller().add_source(source)
    }

    fn flush(&self) -> Result<(), NbdError> {
        self.call(DiskOp::Flush).map(|_| ()).map_err(nbd_error)
    }

    fn supports_trim(&self) -> bool {
        self.geometry().thin
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        // UNMAP descriptors carry at most 2^32 - 1 blocks; NBD lengths are 32-bit anyway.
        self.call(DiskOp::Discard { offset, len })
            .map(|_| ())
            .map_err(nbd_error)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), NbdError> {
        // WRITE SAME covers at most 4 Mi blocks per command.
        let step = (4u64 << 20) * u64::from(self.geometry().block_size);
        let ops = (0..len)
            .step_by(step as usize)
            .map(|at| DiskOp::WriteZeroes {
                offset: offset + at,
                len: step.min(len - at),
                unmap: may_trim && self.geometry().thin,
            })
            .collect();
        self.call_all(ops)
            .into_iter()
            .try_for_each(|r| r.map(|_| ()).map_err(nbd_error))?;
        if fua {
            BlockDevice::flush(self)?;
        }
        Ok(())
    }
}
