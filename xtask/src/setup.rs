//! `cargo xtask setup`: installs what a brand-new machine lacks, idempotently.
//!
//! 1. Debian packages (nftables libs, iproute2, ping, bpftool, ...).
//! 2. The workspace toolchain (`rust-toolchain.toml`) and the eBPF nightly
//!    (`safekit-ebpf/rust-toolchain.toml`) with `rust-src`.
//! 3. `bpf-linker`, built against that nightly's own libLLVM, installed in a
//!    per-nightly directory that `safekit-user/build.rs` puts first in PATH.
//! 4. `cargo-fuzz`, which builds the fuzz targets of `fuzz/` with that
//!    nightly (`cargo xtask fuzz`).
//! 5. `cargo-deb`, which `cargo xtask package` builds the Debian package
//!    with.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd_ok, run, workspace_root};

/// Debian packages the build, the lab and the tests need.
const DEBIAN_PACKAGES: &[&str] = &[
    "libnftnl-dev",
    "libmnl-dev",
    "nftables",
    "iproute2",
    "iputils-ping",
    "bpftool",
    "ethtool",
    "tcpdump",
    "iperf3",
    "pkg-config",
    "psmisc",
    "curl",
    // tests/docs.rs renders the generated man pages.
    "man-db",
    // libfuzzer-sys builds libFuzzer's C++ sources (`cargo xtask fuzz`).
    "g++",
    // The REST API tests: TLS versions offered by `openssl s_client`.
    "openssl",
    // The console's browser tests: headless Chromium driven by
    // playwright-core (never a browser downloaded by npm).
    "chromium",
    // The API fuzzing: schemathesis in a virtual environment.
    "python3-venv",
];

/// cargo-deb release that builds the Debian package (`cargo xtask package`).
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Virtual environment of schemathesis, under the workspace's target dir.
const SCHEMATHESIS_VENV: &str = "target/schemathesis-venv";
/// Its pinned requirements (schemathesis and every dependency).
const SCHEMATHESIS_REQUIREMENTS: &str = "xtask/schemathesis-requirements.txt";

/// Directory of the console's browser tests and their npm lockfile.
const CONSOLE_TESTS: &str = "safekit-user/tests/console";

/// The Rust toolchain that builds the workspace: current aya needs rustc >=
/// 1.98. Not a rust-toolchain.toml: rustup does not install those by itself,
/// and `cargo xtask` has to run on a brand-new machine's default toolchain
/// first. `setup` also sets a rustup directory override so that a plain
/// `cargo build` in the workspace uses it.
pub const STABLE: &str = "1.99.1";

/// bpf-linker release that works with the pinned nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Reads `channel = "..."` from a rust-toolchain.toml.
pub fn toolchain_channel(file: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|v| v.trim_matches('"').to_owned())
        .with_context(|| format!("no channel in {}", file.display()))
}

/// Directory holding the bpf-linker built for `nightly`.
pub fn bpf_linker_root(nightly: &str) -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home)
        .join(".local/safekit-tools")
        .join(nightly))
}

pub fn setup() -> Result<()> {
    let root = workspace_root();
    apt()?;
    console_test_modules(&root)?;
    schemathesis(&root)?;
    let stable = STABLE;
    let nightly = toolchain_channel(&root.join("safekit-ebpf/rust-toolchain.toml"))?;
    toolchain(stable, &["clippy", "rustfmt"])?;
    toolchain(&nightly, &["rust-src"])?;
    bpf_linker(stable, &nightly)?;
    crate::fuzz::install_cargo_fuzz(stable)?;
    cargo_deb(stable)?;
    override_workspace(&root, stable)?;
    eprintln!(
        "setup: ok (toolchains {stable} and {nightly}, bpf-linker {BPF_LINKER_VERSION}, cargo-fuzz {})",
        crate::fuzz::CARGO_FUZZ_VERSION
    );
    Ok(())
}

/// `rustup override set STABLE` for the workspace directory (plain `cargo`
/// there then builds with the pinned toolchain).
fn override_workspace(root: &Path, stable: &str) -> Result<()> {
    let out = Command::new("rustup")
        .args(["override", "list"])
        .output()
        .context("running rustup")?;
    let list = String::from_utf8_lossy(&out.stdout);
    let want = format!("{}", root.display());
    if list
        .lines()
        .any(|l| l.split_whitespace().next() == Some(want.as_str()) && l.contains(stable))
    {
        return Ok(());
    }
    run(Command::new("rustup")
        .args(["override", "set", stable, "--path"])
        .arg(root))
}

/// True when `cmd --version` runs.
fn has_command(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The console tests' npm packages (playwright-core, pinned by
/// `package-lock.json`), installed with `npm ci` when missing or older
/// than the lockfile.
fn console_test_modules(root: &Path) -> Result<()> {
    let dir = root.join(CONSOLE_TESTS);
    let lock = dir.join("package-lock.json");
    // npm ci writes node_modules/.package-lock.json after a complete install.
    let installed = dir.join("node_modules/.package-lock.json");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if dir
        .join("node_modules/playwright-core/package.json")
        .exists()
        && modified(&installed) >= modified(&lock)
    {
        return Ok(());
    }
    eprintln!("setup: npm ci in {}", dir.display());
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .current_dir(&dir))
}

/// schemathesis (from `PyPI`) in `target/schemathesis-venv`, from the pinned
/// requirements, when missing or older than them.
fn schemathesis(root: &Path) -> Result<()> {
    let venv = root.join(SCHEMATHESIS_VENV);
    let reqs = root.join(SCHEMATHESIS_REQUIREMENTS);
    let stamp = venv.join("installed-requirements.txt");
    if venv.join("bin/schemathesis").exists()
        && std::fs::read(&stamp).ok() == std::fs::read(&reqs).ok()
    {
        return Ok(());
    }
    eprintln!("setup: schemathesis in {}", venv.display());
    // Debian's python3 (python3-venv is installed above).
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    run(Command::new(python).args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check", "-r"])
        .arg(&reqs))?;
    std::fs::copy(&reqs, &stamp).context("recording the installed requirements")?;
    Ok(())
}

fn apt() -> Result<()> {
    // Node.js from Debian unless a node (and its npm) is there already.
    let mut wanted: Vec<&str> = DEBIAN_PACKAGES.to_vec();
    if !has_command("node") {
        wanted.push("nodejs");
    }
    if !has_command("npm") {
        wanted.push("npm");
    }
    apt_packages(&wanted)
}

/// `cargo deb`, installed with cargo when missing or of another version.
fn cargo_deb(stable: &str) -> Result<()> {
    let version = Command::new("cargo")
        .args([&format!("+{stable}"), "deb", "--version"])
        .output();
    if version.is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION)
    }) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-deb {CARGO_DEB_VERSION}");
    run(Command::new("cargo").args([
        &format!("+{stable}"),
        "install",
        &format!("cargo-deb@{CARGO_DEB_VERSION}"),
        "--locked",
    ]))
}

/// Installs those of `packages` that are missing (apt-get).
pub fn apt_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {missing:?}");
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
}

fn toolchain(channel: &str, components: &[&str]) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup")?;
    let list = String::from_utf8_lossy(&installed.stdout);
    if !list.lines().any(|l| l.starts_with(&format!("{channel}-"))) {
        eprintln!("setup: installing toolchain {channel}");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            channel,
            "--profile",
            "minimal",
        ]))?;
    }
    let have = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", channel])
        .output()
        .context("running rustup")?;
    let have = String::from_utf8_lossy(&have.stdout);
    for c in components {
        if !have.lines().any(|l| l.starts_with(c)) {
            eprintln!("setup: adding {c} to {channel}");
            run(Command::new("rustup").args(["component", "add", c, "--toolchain", channel]))?;
        }
    }
    Ok(())
}

fn bpf_linker(stable: &str, nightly: &str) -> Result<()> {
    let dest = bpf_linker_root(nightly)?;
    let bin = dest.join("bin/bpf-linker");
    if bin.exists() && cmd_ok(Command::new(&bin).arg("--version")) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against {nightly}'s LLVM");
    let sysroot = Command::new("rustc")
        .arg(format!("+{nightly}"))
        .args(["--print", "sysroot"])
        .output()
        .context("rustc --print sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8(sysroot.stdout)?.trim());
    let lib = sysroot.join("lib");
    let so = std::fs::read_dir(&lib)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let llvm_major: u32 = so
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("cannot read the LLVM version of {so}"))?;
    // An LLVM_PREFIX whose lib/libLLVM.so is the nightly's own library.
    let prefix = std::env::temp_dir().join(format!("safekit-llvm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&prefix);
    std::fs::create_dir_all(prefix.join("lib"))?;
    std::os::unix::fs::symlink(lib.join(&so), prefix.join("lib/libLLVM.so"))?;
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{stable}"))
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--root",
        ])
        .arg(&dest)
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
        );
    if llvm_major != 23 {
        // bpf-linker's default feature is llvm-23.
        cmd.args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ]);
    }
    let result = run(&mut cmd);
    let _ = std::fs::remove_dir_all(&prefix);
    result?;
    if !cmd_ok(Command::new(&bin).arg("--version")) {
        bail!("{} was installed but does not run", bin.display());
    }
    Ok(())
}
