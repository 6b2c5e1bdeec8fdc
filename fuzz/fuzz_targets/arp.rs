#![no_main]
//! Fuzz target `arp`: see `safekit::fuzzing::arp`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| safekit::fuzzing::arp(data));
