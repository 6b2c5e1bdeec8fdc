#![no_main]
//! Fuzz target `heartbeat`: see `safekit::fuzzing::heartbeat`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| safekit::fuzzing::heartbeat(data));
