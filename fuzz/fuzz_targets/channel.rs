#![no_main]
//! Fuzz target `channel`: see `safekit::fuzzing::channel`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| safekit::fuzzing::channel(data));
