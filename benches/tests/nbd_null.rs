//! `nbd-null` (the latency floor of `benches/latency-breakdown.sh`) serves what it says: a
//! device of the size asked whose reads are zeros, whose writes succeed and leave nothing.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vsc::nbdclient::NbdClient;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serves_zeros_and_drops_writes() {
    let dir = std::env::temp_dir().join(format!("nbd-null-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("null.sock");
    let mut server = Killed(
        Command::new(env!("CARGO_BIN_EXE_nbd-null"))
            .arg(&sock)
            .arg("8")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    let mut c = loop {
        match NbdClient::connect(&sock, "disk0") {
            Ok(c) => break c,
            Err(e) => {
                assert!(server.0.try_wait().unwrap().is_none(), "nbd-null exited");
                assert!(start.elapsed() < Duration::from_secs(10), "no server: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert_eq!(c.size(), 8 << 20);
    let data = vec![0xa5u8; 8192];
    assert_eq!(c.write(4096, &data, false).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0);
    let mut buf = vec![0xffu8; 8192];
    assert_eq!(c.read(4096, &mut buf).unwrap(), 0);
    assert!(
        buf.iter().all(|&b| b == 0),
        "reads are zeros, writes left nothing"
    );
    // Past the end: refused, and the connection still serves.
    let mut one = [0u8; 512];
    assert_ne!(c.read(8 << 20, &mut one).unwrap(), 0);
    assert_eq!(c.read(0, &mut one).unwrap(), 0);
    c.disconnect();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
