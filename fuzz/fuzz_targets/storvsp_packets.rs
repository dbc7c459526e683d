//! Fuzz target: hostile storvsc packets (GPA ranges against real guest memory) to a storvsp
//! channel, through its packet handler.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbus_fuzz::storvsp_packets(data));
