#![no_main]
//! Fuzz target `control`: see `safekit::fuzzing::control`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| safekit::fuzzing::control(data));
