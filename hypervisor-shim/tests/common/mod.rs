//! Helpers for the guest tests: the /dev/kvm check and a console buffer.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Whether KVM can be used here; prints why a test skips when not.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP {test}: /dev/kvm cannot be opened ({e})");
            false
        }
    }
}

/// A console that the test reads after the run.
#[derive(Clone, Default)]
pub struct Console(pub Arc<Mutex<Vec<u8>>>);

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub mod guests {
    //! Test guests, assembled here: flat 64-bit code for `Vm::load_flat`.
    use hypervisor_shim::vm::{DEBUG_EXIT_PORT, FLAT_LOAD_ADDR};
    use iced_x86::code_asm::*;

    /// Prints `text` on COM1, polling LSR.THRE before each byte.
    pub fn print(a: &mut CodeAssembler, text: &[u8]) -> Result<(), IcedError> {
        for &b in text {
            let mut wait = a.create_label();
            a.set_label(&mut wait)?;
            a.mov(dx, 0x3FDu32)?;
            a.in_(al, dx)?;
            a.test(al, 0x20u32)?;
            a.jz(wait)?;
            a.mov(dx, 0x3F8u32)?;
            a.mov(al, u32::from(b))?;
            a.out(dx, al)?;
        }
        Ok(())
    }

    /// Ends the VM through the debug-exit port with `code`.
    pub fn exit(a: &mut CodeAssembler, code: u32) -> Result<(), IcedError> {
        a.mov(dx, u32::from(DEBUG_EXIT_PORT))?;
        a.mov(eax, code)?;
        a.out(dx, eax)?;
        // Not reached: the VMM stops this vCPU at the OUT.
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.jmp(spin)
    }

    /// Assembles at the flat load address.
    pub fn assemble(mut a: CodeAssembler) -> Vec<u8> {
        a.assemble(FLAT_LOAD_ADDR).expect("assemble")
    }

    /// "hello\n", then exit `code`.
    pub fn hello(code: u32) -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        print(&mut a, b"hello\n").unwrap();
        exit(&mut a, code).unwrap();
        assemble(a)
    }
}
