#![no_main]
//! Fuzz target `journal`: see `safekit::fuzzing::journal`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| safekit::fuzzing::journal(data));
