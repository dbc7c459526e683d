//! Fuzz target: a hostile front end's partition-socket messages, with descriptors, to a session.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbus_fuzz::partition_session(data));
