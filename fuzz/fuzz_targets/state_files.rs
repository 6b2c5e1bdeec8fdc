#![no_main]
//! Fuzz target `state_files`: see `safekit::fuzzing::state_files`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| safekit::fuzzing::state_files(data));
