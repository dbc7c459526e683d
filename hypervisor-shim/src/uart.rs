//! Enough of a 16550 UART for a guest to print: the transmit holding register goes to a writer,
//! the line status register always says the transmitter is empty, the other registers hold what
//! the guest writes so that a driver's probe reads its own values back. There is no input and
//! the UART raises no interrupts.

use std::io::Write;

/// The first port of COM1.
pub const COM1: u16 = 0x3F8;
/// Number of ports a 16550 decodes.
pub const PORTS: u16 = 8;

const LCR_DLAB: u8 = 0x80;
/// LSR: transmit holding register empty and transmitter empty.
const LSR_THRE_TEMT: u8 = 0x60;
const MCR_LOOP: u8 = 0x10;

/// A 16550 that writes what the guest transmits to `out`.
pub struct Uart<W: Write> {
    out: W,
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
}

impl<W: Write> Uart<W> {
    /// A UART in its reset state writing to `out`.
    pub fn new(out: W) -> Self {
        Uart {
            out,
            ier: 0,
            lcr: 0x03,
            mcr: 0,
            scr: 0,
            dll: 0x0C,
            dlm: 0,
        }
    }

    /// The writer, to take output back (tests).
    pub fn into_inner(self) -> W {
        self.out
    }

    /// A guest write of `value` to register `offset` (0..8). Transmitted bytes are written
    /// and flushed at once, so the output interleaves correctly with the VMM's own.
    pub fn write(&mut self, offset: u16, value: u8) -> std::io::Result<()> {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll = value,
            // In loopback mode the byte would go to the receiver, which this UART lacks.
            0 if self.mcr & MCR_LOOP == 0 => {
                self.out.write_all(&[value])?;
                if value == b'\n' {
                    self.out.flush()?;
                }
            }
            1 if dlab => self.dlm = value,
            1 => self.ier = value & 0x0F,
            3 => self.lcr = value,
            4 => self.mcr = value & 0x1F,
            7 => self.scr = value,
            // FCR (2), LSR (5) and MSR (6) writes have no effect here.
            _ => {}
        }
        Ok(())
    }

    /// A guest read of register `offset` (0..8).
    pub fn read(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll,
            0 => 0, // no input
            1 if dlab => self.dlm,
            1 => self.ier,
            2 => 0xC1, // FIFOs enabled, no interrupt pending
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_THRE_TEMT,
            // MSR: in loopback the modem outputs come back as inputs; otherwise CTS, DSR, DCD.
            6 if self.mcr & MCR_LOOP != 0 => (self.mcr & 0x0F) << 4,
            6 => 0xB0,
            7 => self.scr,
            _ => 0xFF,
        }
    }

    /// Flushes the writer.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmit_goes_to_the_writer_and_lsr_says_empty() {
        let mut u = Uart::new(Vec::new());
        assert_eq!(u.read(5) & 0x20, 0x20);
        for b in b"hi\n" {
            u.write(0, *b).unwrap();
        }
        assert_eq!(u.into_inner(), b"hi\n");
    }

    #[test]
    fn divisor_latch_and_scratch_read_back_and_do_not_transmit() {
        let mut u = Uart::new(Vec::new());
        u.write(3, 0x80).unwrap();
        u.write(0, 0x01).unwrap();
        u.write(1, 0x02).unwrap();
        assert_eq!((u.read(0), u.read(1)), (0x01, 0x02));
        u.write(3, 0x03).unwrap();
        u.write(7, 0x5A).unwrap();
        assert_eq!(u.read(7), 0x5A);
        assert_eq!(u.read(3), 0x03);
        // Loopback: transmitted bytes do not reach the output.
        u.write(4, 0x10).unwrap();
        u.write(0, b'x').unwrap();
        assert!(u.into_inner().is_empty());
    }
}
