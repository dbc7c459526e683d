//! Fuzz target: hostile channel messages from a connected guest to the VMBus server.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbus_fuzz::vmbus_server(data));
