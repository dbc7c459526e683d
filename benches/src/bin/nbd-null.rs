//! An NBD export with nothing behind it, for `benches/latency-breakdown.sh`: vsc's NBD server
//! (the one `vscd --nbd` runs) serving a device whose reads return zeros and whose writes are
//! dropped, both answered at once on the connection's thread. fio's nbd engine against it
//! measures what the NBD client and the socket cost on this machine, both ways, with no VMBus
//! hop and no disk: the floor under any NBD export's latency here.
//!
//! Usage: `nbd-null SOCKET [SIZE_MIB]` (default 1024 MiB). Serves until killed; a stale socket
//! file at SOCKET is replaced.

use std::process::ExitCode;
use std::sync::Arc;

use vsc::nbd::IoError;
use vsc::nbd::{BlockDevice, Export, NbdServer, ReadData, ReadDone, WriteDone};

/// A read's data: `.0` zero bytes, appended to the reply as they are sent.
struct Zeros(usize);

impl ReadData for Zeros {
    fn len(&self) -> usize {
        self.0
    }
    fn append_to(&self, dst: &mut Vec<u8>) -> Result<(), IoError> {
        dst.resize(dst.len() + self.0, 0);
        Ok(())
    }
}

struct Null {
    size: u64,
}

impl BlockDevice for Null {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn read(&self, _offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        buf.fill(0);
        Ok(())
    }
    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<(), IoError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }
    // Every request "completes" inline, on the thread that read it from the socket.
    fn async_limit(&self) -> u32 {
        vsc::nbd::proto::MAX_REQUEST
    }
    fn read_async(&self, _offset: u64, len: u32, done: ReadDone) {
        done(Ok(&Zeros(len as usize)))
    }
    fn write_async(&self, _offset: u64, data: Vec<u8>, _fua: bool, done: WriteDone) {
        done(Ok(()), data)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: nbd-null SOCKET [SIZE_MIB]\n\
                 Serves an NBD export whose reads return zeros and whose writes are dropped\n\
                 (the NBD transport's latency floor); until killed.";
    if args.first().is_some_and(|a| a == "--help" || a == "-h") {
        println!("{usage}");
        return ExitCode::SUCCESS;
    }
    if args.is_empty() || args.len() > 2 {
        eprintln!("{usage}");
        return ExitCode::from(2);
    }
    let mib = match args.get(1).map(|s| s.parse::<u64>()) {
        None => 1024,
        Some(Ok(m)) if m > 0 && m <= 1 << 30 => m,
        Some(_) => {
            eprintln!("nbd-null: SIZE_MIB must be a number from 1 to 2^30\n{usage}");
            return ExitCode::from(2);
        }
    };
    let export = Export {
        name: "disk0".into(),
        description: "null device (nbd-null)".into(),
        device: Arc::new(Null { size: mib << 20 }),
    };
    let served = NbdServer::bind(std::path::Path::new(&args[0]), vec![export]).and_then(|s| {
        let never = Arc::new(ringbuf::Event::new()?);
        s.run(never)
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-null: {e}");
            ExitCode::FAILURE
        }
    }
}
