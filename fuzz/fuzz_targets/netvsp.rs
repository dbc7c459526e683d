//! Fuzz target: a netvsp channel fed hostile NVSP and RNDIS messages, send sections, GPA-direct
//! pages, completions and host frames, against a TAP stand-in.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbus_fuzz::netvsp(data));
