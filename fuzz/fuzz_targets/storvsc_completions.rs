//! Fuzz target: a hostile host's completions and disk answers to the storvsc client.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbus_fuzz::storvsc_completions(data));
