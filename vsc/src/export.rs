//! The storvsc disks as NBD exports: [`crate::nbd::BlockDevice`] over [`Disk`].

use std::sync::mpsc::channel;

use crate::nbd::{BlockDevice, IoError as NbdError, ReadDone, WriteDone};
use crate::storvsc::{Disk, DiskOp, IoError, IoResult};

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

/// Runs `ops` concurrently on `disk` and returns their results in order.
fn all(disk: &Disk, ops: Vec<DiskOp>) -> Vec<IoResult> {
    let n = ops.len();
    let (tx, rx) = channel();
    for (i, op) in ops.into_iter().enumerate() {
        let tx = tx.clone();
        disk.submit(
            op,
            Box::new(move |r| {
                let _ = tx.send((i, r));
            }),
        );
    }
    let mut out: Vec<IoResult> = (0..n).map(|_| Err(IoError::Disconnected)).collect();
    for _ in 0..n {
        match rx.recv() {
            Ok((i, r)) => out[i] = r,
            Err(_) => break,
        }
    }
    out
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
        let step = self.max_transfer() as usize;
        let ops = (0..buf.len())
            .step_by(step)
            .map(|at| DiskOp::Read {
                offset: offset + at as u64,
                len: step.min(buf.len() - at) as u32,
            })
            .collect();
        for (chunk, r) in buf.chunks_mut(step).zip(all(self, ops)) {
            let data = r.map_err(nbd_error)?;
            if data.len() != chunk.len() {
                return Err(NbdError::Io);
            }
            chunk.copy_from_slice(&data);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        let step = self.max_transfer() as usize;
        let ops = data
            .chunks(step)
            .enumerate()
            .map(|(i, c)| DiskOp::Write {
                offset: offset + (i * step) as u64,
                data: c.to_vec(),
                fua,
            })
            .collect();
        all(self, ops)
            .into_iter()
            .try_for_each(|r| r.map(|_| ()).map_err(nbd_error))
    }

    fn async_limit(&self) -> u32 {
        self.max_transfer()
    }

    fn read_async(&self, offset: u64, len: u32, done: ReadDone) {
        self.submit(
            DiskOp::Read { offset, len },
            Box::new(move |r| done(r.map_err(nbd_error))),
        );
    }

    fn write_async(&self, offset: u64, data: Vec<u8>, fua: bool, done: WriteDone) {
        self.submit(
            DiskOp::Write { offset, data, fua },
            Box::new(move |r| done(r.map(|_| ()).map_err(nbd_error))),
        );
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
        all(self, ops)
            .into_iter()
            .try_for_each(|r| r.map(|_| ()).map_err(nbd_error))?;
        if fua {
            BlockDevice::flush(self)?;
        }
        Ok(())
    }
}
