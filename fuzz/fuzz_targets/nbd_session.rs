//! Fuzz target: a hostile NBD client's bytes to the NBD server (handshake and transmission).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbus_fuzz::nbd_session(data));
