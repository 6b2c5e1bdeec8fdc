//! The embedded eBPF object (`safekit-ebpf`, built by build.rs) and its
//! loader.

/// The eBPF object bytes, aligned for aya's ELF parser.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/safekit-ebpf"));

/// Name of the XDP farm filter program in the object.
pub const FARM_PROGRAM: &str = "safekit_farm";

/// Benchmark baseline program (passes everything).
pub const NOOP_PROGRAM: &str = "safekit_noop";

/// Benchmark traffic generator (`XDP_TX` under live-frames test runs).
pub const BENCH_TX_PROGRAM: &str = "safekit_bench_tx";

/// Loads the object into the kernel's BPF subsystem (maps created, programs
/// not yet verified or attached).
pub fn load() -> Result<aya::Ebpf, aya::EbpfError> {
    aya::Ebpf::load(OBJECT)
}
