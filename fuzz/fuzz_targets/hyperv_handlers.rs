//! Fuzz target: a hostile guest's synthetic-MSR accesses and hypercalls to the shim's handlers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbus_fuzz::hyperv_handlers(data));
