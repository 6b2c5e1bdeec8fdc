//! The lab: a bridge, one network namespace per node and one for a client,
//! generated configs and a cluster key, and `safekitd` in each node.
//!
//! Used by `cargo xtask lab up|down`, `cargo xtask run` and the privileged
//! cluster tests. Every name carries the lab's prefix; [`Lab`] removes what it
//! made when dropped (unless [`Lab::persist`] was called), and
//! [`Lab::up`] first removes leftovers of its own prefix.
//!
//! This file is self-contained (std, anyhow, libc): the integration tests of
//! `safekit-user` include it with `#[path]`.

use std::{
    fmt::Write as _,
    io::Read as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Directory of the built `safekitd`/`safekit` binaries: `SAFEKIT_BIN_DIR`,
/// else `target/debug` of this workspace.
#[must_use]
pub fn bin_dir() -> PathBuf {
    std::env::var_os("SAFEKIT_BIN_DIR").map_or_else(
        || {
            let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
            std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| ws.join("target"), PathBuf::from)
                .join("debug")
        },
        PathBuf::from,
    )
}

/// What to build.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Prefix of every namespace, link and directory (at most 6 characters:
    /// interface names are limited to 15).
    pub prefix: String,
    /// Number of node namespaces.
    pub nodes: usize,
    /// Third octet of the lab subnet 10.77.X.0/24.
    pub subnet: u8,
    /// Modules: (name, module.toml text, scripts (name, text)).
    pub modules: Vec<LabModule>,
    /// Extra text appended to cluster.toml.
    pub cluster_extra: String,
}

/// One module of the lab.
#[derive(Debug, Clone)]
pub struct LabModule {
    /// Module name.
    pub name: String,
    /// `module.toml`.
    pub toml: String,
    /// Scripts for `bin/`: (file name, contents).
    pub scripts: Vec<(String, String)>,
}

/// A running lab.
pub struct Lab {
    spec: LabSpec,
    dir: PathBuf,
    daemons: Vec<Option<Child>>,
    persist: bool,
}

impl LabSpec {
    /// Namespace of node `i` (1-based).
    #[must_use]
    pub fn node_ns(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    /// Namespace of the client.
    #[must_use]
    pub fn client_ns(&self) -> String {
        format!("{}cl", self.prefix)
    }

    /// Bridge name.
    #[must_use]
    pub fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    /// Address of node `i` (1-based).
    #[must_use]
    pub fn node_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, u8::try_from(i).unwrap_or(250))
    }

    /// Address of the client.
    #[must_use]
    pub fn client_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 250)
    }

    /// An address in the lab subnet for VIPs etc. (`host` in 100..=249).
    #[must_use]
    pub fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, host)
    }
}

/// Runs `ip` with these arguments, failing on error.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A bridge, up, with no STP delay (no multicast snooping surprises).
pub fn add_bridge(br: &str) -> Result<()> {
    ip(&["link", "add", br, "type", "bridge"])?;
    ip(&[
        "link",
        "set",
        br,
        "type",
        "bridge",
        "forward_delay",
        "0",
        "stp_state",
        "0",
    ])?;
    ip(&["link", "set", br, "up"])
}

/// Network namespace `ns` whose `eth0` has `addr`/24, the other end of a
/// veth (`host_if`) in bridge `br`.
pub fn add_host(ns: &str, addr: Ipv4Addr, host_if: &str, br: &str) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&[
        "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&["link", "set", host_if, "master", br])?;
    ip(&["link", "set", host_if, "up"])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ])
}

/// Runs `ip` ignoring failure (cleanup).
pub fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Removes every namespace and link named with `prefix`, and kills the pids
/// recorded in `dir/pids`.
pub fn cleanup(prefix: &str, dir: &Path) {
    if let Ok(pids) = std::fs::read_to_string(dir.join("pids")) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) with a pid we started and recorded; no memory
            // is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if !name.is_empty() && name.starts_with(prefix) {
                // Processes the lab's scripts started in the namespace (demo
                // services) die with it.
                if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
                    for pid in String::from_utf8_lossy(&pids.stdout)
                        .lines()
                        .filter_map(|l| l.trim().parse::<i32>().ok())
                    {
                        // SAFETY: kill(2) of a process inside our own lab
                        // namespace; no memory involved.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
                ip_quiet(&["netns", "del", name]);
            }
        }
    }
    remove_module_cgroups(dir);
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "12: skt1br: <...": the name may carry "@peer".
            let name = line
                .split(':')
                .nth(1)
                .map_or("", |s| s.trim().split('@').next().unwrap_or(""));
            if !name.is_empty() && name.starts_with(prefix) {
                ip_quiet(&["link", "del", name]);
            }
        }
    }
}

/// Removes the module cgroups the lab's daemons made
/// (`<cgroup2>/safekit/<lab dir with / as ->-node<i>.<hash>/<module>`, see
/// `safekit::sys::cgroup`), once the processes in them are killed: a
/// daemon's guard killed by [`cleanup`] may not have removed them.
fn remove_module_cgroups(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let Some(mount) = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(point))
    }) else {
        return;
    };
    let lab = format!(
        "{}-node",
        dir.to_string_lossy().trim_matches('/').replace('/', "-")
    );
    let Ok(instances) = std::fs::read_dir(mount.join("safekit")) else {
        return;
    };
    for instance in instances.flatten() {
        if !instance.file_name().to_string_lossy().starts_with(&lab) {
            continue;
        }
        if let Ok(modules) = std::fs::read_dir(instance.path()) {
            for m in modules.flatten().filter(|m| m.path().is_dir()) {
                let _ = std::fs::write(m.path().join("cgroup.kill"), "1");
                let deadline = Instant::now() + Duration::from_secs(2);
                while std::fs::remove_dir(m.path()).is_err() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let _ = std::fs::remove_dir(instance.path());
    }
}

impl Lab {
    /// Builds the lab (no daemon started yet): namespaces, bridge, veths,
    /// addresses, configs, key.
    pub fn up(spec: LabSpec, dir: &Path) -> Result<Self> {
        if spec.prefix.len() > 6 {
            bail!("lab prefix {:?} longer than 6 characters", spec.prefix);
        }
        cleanup(&spec.prefix, dir);
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let lab = Self {
            dir: dir.to_path_buf(),
            daemons: (0..spec.nodes).map(|_| None).collect(),
            spec,
            persist: false,
        };
        lab.network().context("building the lab network")?;
        lab.configs().context("writing the lab configs")?;
        Ok(lab)
    }

    fn network(&self) -> Result<()> {
        let s = &self.spec;
        let br = s.bridge();
        add_bridge(&br)?;
        let mut hosts: Vec<(String, Ipv4Addr, String)> = (1..=s.nodes)
            .map(|i| (s.node_ns(i), s.node_addr(i), format!("{}{i}", s.prefix)))
            .collect();
        hosts.push((s.client_ns(), s.client_addr(), format!("{}c", s.prefix)));
        for (ns, addr, host_if) in &hosts {
            add_host(ns, *addr, host_if, &br)?;
        }
        Ok(())
    }

    fn configs(&self) -> Result<()> {
        let s = &self.spec;
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
        let mut cluster = format!(
            "name = \"{}\"\nkey_file = \"cluster.key\"\n\n[[lan]]\nname = \"default\"\nreplication = true\n",
            s.prefix
        );
        for i in 1..=s.nodes {
            let _ = write!(
                cluster,
                "\n[[node]]\nname = \"node{i}\"\naddrs = {{ default = \"{}\" }}\n",
                s.node_addr(i)
            );
        }
        // Lab clusters let tests and operators scrape /metrics without
        // credentials, unless the spec sets its own [api] table.
        if !s.cluster_extra.contains("[api]") {
            cluster.push_str("\n[api]\nmetrics_anonymous = true\n");
        }
        cluster.push_str(&s.cluster_extra);
        for i in 1..=s.nodes {
            let etc = self.root(i).join("etc/safekit");
            std::fs::create_dir_all(&etc)?;
            std::fs::write(etc.join("cluster.toml"), &cluster)?;
            write_private(&etc.join("cluster.key"), &key)?;
            for m in &s.modules {
                let mdir = etc.join("modules").join(&m.name);
                std::fs::create_dir_all(mdir.join("bin"))?;
                std::fs::write(mdir.join("module.toml"), &m.toml)?;
                for (name, text) in &m.scripts {
                    let p = mdir.join("bin").join(name);
                    std::fs::write(&p, text)?;
                    set_mode(&p, 0o755)?;
                }
            }
        }
        Ok(())
    }

    /// The spec.
    #[must_use]
    pub fn spec(&self) -> &LabSpec {
        &self.spec
    }

    /// Root directory of node `i` (1-based).
    #[must_use]
    pub fn root(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{i}"))
    }

    /// Starts safekitd on node `i`; its stderr goes to `<root>/safekitd.out`.
    pub fn start_daemon(&mut self, i: usize) -> Result<()> {
        self.start_daemon_with_env(i, &[])
    }

    /// [`Self::start_daemon`] with extra environment variables (e.g. the
    /// `NOTIFY_SOCKET` and `WATCHDOG_USEC` systemd would set).
    pub fn start_daemon_with_env(&mut self, i: usize, env: &[(&str, &str)]) -> Result<()> {
        let root = self.root(i);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("safekitd.out"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.spec.node_ns(i)])
            .arg(bin_dir().join("safekitd"))
            .arg("--root")
            .arg(&root)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning safekitd")?;
        let mut pids = std::fs::read_to_string(self.dir.join("pids")).unwrap_or_default();
        let _ = writeln!(pids, "{}", child.id());
        std::fs::write(self.dir.join("pids"), pids)?;
        self.daemons[i - 1] = Some(child);
        // Wait for its control socket to answer.
        let sock = root.join("run/safekit/safekitd.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                return Ok(());
            }
            if let Some(Some(c)) = self.daemons.get_mut(i - 1)
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "safekitd on node{i} exited ({status}): {}",
                    std::fs::read_to_string(root.join("safekitd.out")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("safekitd on node{i} did not open its control socket within 10 s");
    }

    /// `p` as node `i`'s daemon and its scripts see it: each daemon runs in
    /// a mount namespace of its own (`ip netns exec` gives it its
    /// network's /sys), so the replicated directories it mounts are visible
    /// through `/proc/<pid>/root` only. `None` while the daemon is not
    /// running.
    #[must_use]
    pub fn node_view(&self, i: usize, p: &Path) -> Option<PathBuf> {
        let pid = self.daemon_pid(i)?;
        Some(PathBuf::from(format!("/proc/{pid}/root")).join(p.strip_prefix("/").unwrap_or(p)))
    }

    /// `kill -9` of node `i`'s safekitd.
    pub fn kill_daemon(&mut self, i: usize) {
        if let Some(mut c) = self.daemons[i - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `limit` for node `i`'s safekitd to exit by itself (e.g.
    /// after `safekit shutdown`); its exit status, or `None` if it still
    /// runs (or was not started).
    pub fn wait_daemon(&mut self, i: usize, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.daemons.get_mut(i - 1)?.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.daemons[i - 1] = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// pid of node `i`'s safekitd.
    #[must_use]
    pub fn daemon_pid(&self, i: usize) -> Option<u32> {
        self.daemons[i - 1].as_ref().map(Child::id)
    }

    /// Runs `safekit --root <node i root> args...` in node `i`'s namespace.
    pub fn safekit(&self, i: usize, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.spec.node_ns(i)])
            .arg(bin_dir().join("safekit"))
            .arg("--root")
            .arg(self.root(i))
            .args(args)
            .output()
            .context("running safekit")
    }

    /// Runs a command in a namespace.
    #[allow(
        clippy::unused_self,
        reason = "a lab operation: called on the lab for readability"
    )]
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .output()
            .with_context(|| format!("running {cmd:?} in {ns}"))
    }

    /// Keeps everything after this value is dropped (for `lab up`).
    pub fn persist(mut self) {
        self.persist = true;
        for c in &mut self.daemons {
            // Dropping a Child does not kill it.
            c.take();
        }
    }

    /// Directory of the lab.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.persist {
            return;
        }
        for i in 1..=self.daemons.len() {
            self.kill_daemon(i);
        }
        cleanup(&self.spec.prefix, &self.dir);
    }
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write_private(p: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(p, bytes)?;
    set_mode(p, 0o600)
}
