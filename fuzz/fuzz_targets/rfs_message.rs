#![no_main]
//! Fuzz target `rfs_message`: see `safekit::fuzzing::rfs_message`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| safekit::fuzzing::rfs_message(data));
