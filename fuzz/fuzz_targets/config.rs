#![no_main]
//! Fuzz target `config`: see `safekit::fuzzing::config`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| safekit::fuzzing::config(data));
