//! `cargo xtask package`: the Debian package `safekit` (cargo-deb).
//!
//! 1. `cargo build --release` of `safekitd` and `safekit`;
//! 2. man pages and shell completions generated from the clap definitions
//!    and `conf/README.md` (`safekit-user/examples/gen_assets.rs`) into
//!    `target/release/assets`, man pages gzipped (`gzip -9n`, reproducible);
//! 3. `cargo deb --no-build`: what to ship is `[package.metadata.deb]` of
//!    `safekit-user/Cargo.toml`, the unit and maintainer scripts are in
//!    `safekit-user/debian/`;
//! 4. lintian on the result: any error fails the task.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{run, setup, workspace_root};

/// `cargo +STABLE` in the workspace (through the rustup proxy).
#[must_use]
pub fn cargo() -> Command {
    let mut c = Command::new("cargo");
    c.arg(format!("+{}", setup::STABLE))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .current_dir(workspace_root());
    c
}

/// The workspace's target directory.
#[must_use]
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// Builds the package; returns the path of the `.deb`.
pub fn package(revision: Option<&str>) -> Result<PathBuf> {
    setup::setup()?;
    run(cargo().args(["build", "--release", "-p", "safekit-user", "--bins"]))?;
    let assets = target_dir().join("release/assets");
    let _ = std::fs::remove_dir_all(&assets);
    run(cargo()
        .args([
            "run",
            "-q",
            "-p",
            "safekit-user",
            "--example",
            "gen_assets",
            "--",
        ])
        .arg(&assets))?;
    for e in std::fs::read_dir(assets.join("man"))? {
        let p = e?.path();
        run(Command::new("gzip").args(["-9nf"]).arg(&p))?;
    }
    let out_dir = target_dir().join("debian");
    std::fs::create_dir_all(&out_dir)?;
    let mut deb = cargo();
    deb.args(["deb", "-p", "safekit-user", "--no-build", "--output"])
        .arg(&out_dir);
    if let Some(r) = revision {
        deb.args(["--deb-revision", r]);
    }
    let out = deb
        .output()
        .context("running cargo deb (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "cargo deb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find(|l| Path::new(l.trim()).extension().is_some_and(|e| e == "deb"))
        .map(|l| PathBuf::from(l.trim()))
        .context("cargo deb printed no .deb path")?;
    lintian(&path)?;
    eprintln!("package: {}", path.display());
    Ok(path)
}

/// lintian: errors fail, the rest is shown.
pub fn lintian(deb: &Path) -> Result<()> {
    setup::apt_packages(&["lintian"])?;
    let out = Command::new("lintian")
        .args(["--tag-display-limit", "0", "--fail-on", "error"])
        .arg(deb)
        .output()
        .context("running lintian")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text.lines() {
        eprintln!("lintian: {l}");
    }
    if !out.status.success() {
        bail!(
            "lintian found errors in {}: {}{}",
            deb.display(),
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
