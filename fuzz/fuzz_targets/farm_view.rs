#![no_main]
//! Fuzz target `farm_view`: see `safekit::fuzzing::farm_view`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| safekit::fuzzing::farm_view(data));
