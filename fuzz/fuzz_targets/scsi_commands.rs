//! Fuzz target: arbitrary SCSI commands to the disk emulation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbus_fuzz::scsi_commands(data));
