//! A small NBD client (fixed newstyle, NBD_OPT_GO, simple replies, one request at a time per
//! connection): what the demo and the tests use to drive an export the way fio or qemu-img
//! would. For more requests in flight, open more connections.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::nbd::proto::*;
use crate::Error;

/// One connection to an export.
#[derive(Debug)]
pub struct NbdClient {
    sock: UnixStream,
    size: u64,
    flags: u16,
    next: u64,
}

fn io(e: std::io::Error) -> Error {
    Error::Protocol(format!("NBD connection: {e}"))
}

impl NbdClient {
    /// Connects to the server at `socket` and selects `export`.
    pub fn connect(socket: &Path, export: &str) -> Result<Self, Error> {
        let mut s = UnixStream::connect(socket).map_err(io)?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).map_err(io)?;
        if u64::from_be_bytes(hello[0..8].try_into().expect("8")) != NBDMAGIC
            || u64::from_be_bytes(hello[8..16].try_into().expect("8")) != IHAVEOPT
        {
            return Err(Error::Protocol("not a fixed-newstyle NBD server".into()));
        }
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .map_err(io)?;
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt).map_err(io)?;
        let (mut size, mut flags) = (None, 0u16);
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).map_err(io)?;
            let reply = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
            if u64::from_be_bytes(h[0..8].try_into().expect("8")) != OPTION_REPLY_MAGIC
                || len > 1 << 16
            {
                return Err(Error::Protocol("bad option reply".into()));
            }
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).map_err(io)?;
            match reply {
                REP_ACK => break,
                REP_INFO
                    if body.len() >= 12
                        && u16::from_be_bytes([body[0], body[1]]) == INFO_EXPORT =>
                {
                    size = Some(u64::from_be_bytes(body[2..10].try_into().expect("8")));
                    flags = u16::from_be_bytes([body[10], body[11]]);
                }
                REP_INFO => {}
                r => return Err(Error::Refused(format!("NBD_OPT_GO refused with {r:#x}"))),
            }
        }
        let size = size.ok_or_else(|| Error::Protocol("no export size".into()))?;
        Ok(Self {
            sock: s,
            size,
            flags,
            next: 1,
        })
    }

    /// The export's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The transmission flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u32, Error> {
        let handle = self.next;
        self.next += 1;
        let mut r = [0u8; 28];
        r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r[4..6].copy_from_slice(&flags.to_be_bytes());
        r[6..8].copy_from_slice(&cmd.to_be_bytes());
        r[8..16].copy_from_slice(&handle.to_be_bytes());
        r[16..24].copy_from_slice(&offset.to_be_bytes());
        r[24..28].copy_from_slice(&len.to_be_bytes());
        self.sock.write_all(&r).map_err(io)?;
        if !data.is_empty() {
            self.sock.write_all(data).map_err(io)?;
        }
        let mut h = [0u8; 16];
        self.sock.read_exact(&mut h).map_err(io)?;
        if u32::from_be_bytes(h[0..4].try_into().expect("4")) != SIMPLE_REPLY_MAGIC
            || u64::from_be_bytes(h[8..16].try_into().expect("8")) != handle
        {
            return Err(Error::Protocol("bad NBD reply".into()));
        }
        Ok(u32::from_be_bytes(h[4..8].try_into().expect("4")))
    }

    /// Reads `buf.len()` bytes at `offset`; `Ok(errno)` if the server failed it (0: success).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<u32, Error> {
        let e = self.request(CMD_READ, 0, offset, buf.len() as u32, &[])?;
        if e == 0 {
            self.sock.read_exact(buf).map_err(io)?;
        }
        Ok(e)
    }

    /// Writes `data` at `offset`; `Ok(errno)`.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<u32, Error> {
        self.request(
            CMD_WRITE,
            if fua { CMD_FLAG_FUA } else { 0 },
            offset,
            data.len() as u32,
            data,
        )
    }

    /// Flushes; `Ok(errno)`.
    pub fn flush(&mut self) -> Result<u32, Error> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])
    }

    /// Ends the session politely.
    pub fn disconnect(mut self) {
        let _ = self.request_no_reply();
    }

    fn request_no_reply(&mut self) -> std::io::Result<()> {
        let mut r = [0u8; 28];
        r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
        self.sock.write_all(&r)
    }
}
