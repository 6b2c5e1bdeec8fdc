//! Mirror module (SPEC §5).
