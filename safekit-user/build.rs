//! Builds the `safekit-ebpf` object with the pinned nightly (aya-build) so the
//! binaries can embed it with `include_bytes_aligned!`.

use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("no workspace root above {}", manifest_dir.display()))?
        .join("safekit-ebpf");
    let pin_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", pin_file.display());
    let pin = std::fs::read_to_string(&pin_file)
        .with_context(|| format!("reading {}", pin_file.display()))?;
    let nightly = pin
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|v| v.trim_matches('"').to_owned())
        .ok_or_else(|| anyhow!("no channel in {}", pin_file.display()))?;

    // `cargo xtask setup` installs a bpf-linker built against this nightly's
    // own LLVM in a per-nightly directory; put it first in PATH for the
    // nested cargo that aya-build runs.
    if let Some(home) = env::var_os("HOME") {
        let linker_dir = PathBuf::from(home)
            .join(".local/safekit-tools")
            .join(&nightly)
            .join("bin");
        if linker_dir.join("bpf-linker").exists() {
            let mut paths = vec![linker_dir];
            paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
            let joined = env::join_paths(paths)?;
            // SAFETY: build scripts are single-threaded; nothing else reads
            // the environment concurrently.
            unsafe { env::set_var("PATH", joined) };
        }
    }
    println!("cargo::rerun-if-env-changed=HOME");

    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non UTF-8 path {}", ebpf_dir.display()))?;
    let package = aya_build::Package {
        name: "safekit-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&nightly)).context(
        "building safekit-ebpf (run `cargo xtask setup` if the nightly or bpf-linker is missing)",
    )
}
