//! Configuration: `cluster.toml` and `modules/<AM>/module.toml` (SPEC §4).
