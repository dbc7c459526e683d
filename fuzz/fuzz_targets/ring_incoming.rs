//! Fuzz target: a reader over a ring whose control words and data area are the input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbus_fuzz::read_ring(data));
