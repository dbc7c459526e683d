//! Fuzz target: a writer over a ring whose reader-owned control words come from the input and
//! change between writes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbus_fuzz::write_ring(data));
