//! `cargo xtask test --all` (or `cargo xtask system-test`): the Debian
//! package on two fresh Debian 12 systems booted with systemd.
//!
//! A Debian 12 root made once with debootstrap (cached in
//! `target/system-test/rootfs`), two nodes made of it with overlayfs, each
//! booted with `systemd-nspawn -b` on the bridge `skpkbr0` (10.77.113.0/24),
//! a client namespace `skpk3cl` on the same bridge. The package is installed
//! with dpkg in the booted systems; then, as an operator would:
//!
//! - the unit is enabled and waits for a configuration (inactive);
//!   `systemd-analyze verify` finds nothing; `man safekit` renders and the
//!   bash completion loads;
//! - configured with a `boot = true` replicated mirror module and rebooted:
//!   `safekitd.service` is active (Type=notify: only after READY=1), its
//!   status text shows the module, the module is PRIM/SECOND, the client
//!   reaches the VIP on the primary's MAC;
//! - `kill -9` of the primary's safekitd: systemd restarts it and the module
//!   is PRIM/SECOND again with the VIP on the primary only;
//! - a wedged engine (SIGSTOP): the watchdog kills it and systemd restarts
//!   it; PRIM/SECOND again;
//! - `systemctl stop safekitd` on the primary: `stop_prim` ran, the VIP left
//!   that node, the peer is ALONE and answers the client;
//! - upgrade (another revision), remove and purge on the stopped node: a
//!   changed conffile survives the upgrade, the examples survive remove and
//!   are gone after purge, with the state and logs.
//!
//! Everything is named `skpk*`; leftovers are removed first, and a guard
//! powers the machines off, unmounts and deletes what the test made.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    lab::{add_bridge, add_host, ip_quiet},
    package, run, setup,
};

const BRIDGE: &str = "skpkbr0";
const CLIENT_NS: &str = "skpk3cl";
const SUBNET: u8 = 113;
const MODULE: &str = "web";

fn addr(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, SUBNET, host)
}

fn vip() -> Ipv4Addr {
    addr(100)
}

fn machine(i: usize) -> String {
    format!("skpk3n{i}")
}

fn work_dir() -> PathBuf {
    package::target_dir().join("system-test")
}

/// Runs and returns the output, failing only if it cannot be spawned.
fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Polls `cond` every 200 ms for up to `limit`.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The apt source of this machine (the Debian mirror debootstrap uses).
fn debian_mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.filter_map(Result::ok).map(|e| e.path()));
    }
    for f in files {
        let Ok(t) = std::fs::read_to_string(&f) else {
            continue;
        };
        for l in t.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            let uri = l.strip_prefix("URIs:").map(str::trim).or_else(|| {
                l.strip_prefix("deb ")
                    .and_then(|r| r.split_whitespace().next())
            });
            if let Some(u) = uri.and_then(|u| u.split_whitespace().next())
                && u.ends_with("/debian")
            {
                return u.to_owned();
            }
        }
    }
    "http://deb.debian.org/debian".to_owned()
}

/// The cached Debian 12 root (made once).
fn rootfs() -> Result<PathBuf> {
    let root = work_dir().join("rootfs");
    let done = work_dir().join("rootfs.complete");
    if done.exists() {
        return Ok(root);
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(work_dir())?;
    let mirror = debian_mirror();
    eprintln!("system-test: debootstrap bookworm from {mirror} (cached afterwards)");
    run(Command::new("debootstrap").args([
        "--variant=minbase",
        "--include=systemd,systemd-sysv,dbus,iproute2,iputils-ping,procps,libnftnl11,libmnl0,logrotate,man-db,bash-completion,kmod",
        "bookworm",
    ])
    .arg(&root)
    .arg(&mirror))?;
    std::fs::write(&done, b"")?;
    Ok(root)
}

/// One booted node.
struct Node {
    i: usize,
    dir: PathBuf,
    nspawn: Option<Child>,
}

impl Node {
    fn merged(&self) -> PathBuf {
        self.dir.join("merged")
    }

    /// A path of the node's file system, from the host.
    fn file(&self, p: &str) -> PathBuf {
        self.merged().join(p.trim_start_matches('/'))
    }

    /// The container's PID 1 (systemd): the child of systemd-nspawn.
    fn init_pid(&self) -> Option<u32> {
        let nspawn = self.nspawn.as_ref()?.id();
        children(nspawn).into_iter().next()
    }

    /// Runs a command inside the node (every namespace of its PID 1).
    fn sh(&self, script: &str) -> Result<Output> {
        let pid = self.init_pid().context("node not running")?;
        output(
            Command::new("nsenter")
                .args(["-t", &pid.to_string(), "-a", "--", "sh", "-c", script])
                .stdin(Stdio::null()),
        )
    }

    fn sh_ok(&self, script: &str) -> Result<String> {
        let o = self.sh(script)?;
        ensure!(
            o.status.success(),
            "node{}: `{script}` failed: {}",
            self.i,
            text(&o)
        );
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
    }

    fn boot(&mut self, log: &Path) -> Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(self.merged())
            .args([
                "-M",
                &machine(self.i),
                // No systemd on the host to register with or to make a
                // scope: run in our own cgroup.
                "--register=no",
                "--keep-unit",
                "--network-bridge",
                BRIDGE,
                // A real server: FUSE for the replicated directories and
                // every capability for netlink, BPF, the scripts.
                "--bind=/dev/fuse",
                "--capability=all",
                "--console=passive",
                "-b",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("systemd-nspawn (Debian package systemd-container)")?;
        record_pid(child.id())?;
        self.nspawn = Some(child);
        ensure!(
            wait_until(Duration::from_secs(60), || self
                .sh("systemctl is-system-running")
                .is_ok_and(|o| {
                    let s = String::from_utf8_lossy(&o.stdout);
                    s.contains("running") || s.contains("degraded")
                })),
            "node{} did not boot: {}",
            self.i,
            std::fs::read_to_string(log).unwrap_or_default()
        );
        Ok(())
    }

    /// `systemctl poweroff` and wait for systemd-nspawn to exit.
    fn poweroff(&mut self) {
        let _ = self.sh("systemctl poweroff");
        if let Some(mut c) = self.nspawn.take() {
            let end = Instant::now() + Duration::from_secs(30);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `safekit state -m web -lq`: the local state's exit code.
    fn state(&self) -> Option<i32> {
        self.sh(&format!("safekit state -m {MODULE} -lq"))
            .ok()
            .and_then(|o| o.status.code())
    }

    /// `systemctl show safekitd -p P --value`.
    fn unit(&self, prop: &str) -> String {
        self.sh(&format!("systemctl show safekitd -p {prop} --value"))
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }

    fn has_vip(&self) -> bool {
        self.sh("ip -4 -o addr show dev host0")
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {}/", vip())))
    }

    fn mac(&self) -> Result<String> {
        self.sh_ok("cat /sys/class/net/host0/address")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.poweroff();
        let _ = Command::new("umount").arg(self.merged()).status();
    }
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<u32> = dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    // "pid (comm) state ppid ...": comm may hold spaces.
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect();
    out.sort_unstable();
    out
}

fn pids_file() -> PathBuf {
    work_dir().join("pids")
}

fn record_pid(pid: u32) -> Result<()> {
    let mut s = std::fs::read_to_string(pids_file()).unwrap_or_default();
    let _ = writeln!(s, "{pid}");
    std::fs::write(pids_file(), s)?;
    Ok(())
}

/// Removes what an earlier run left: its systemd-nspawn processes (by
/// recorded pid), mounts, the bridge, the client namespace.
fn cleanup() {
    if let Ok(pids) = std::fs::read_to_string(pids_file()) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let is_nspawn = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "systemd-nspawn");
            if is_nspawn {
                // SAFETY: kill(2) of a systemd-nspawn this task started and
                // recorded; no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = std::fs::remove_file(pids_file());
    for i in 1..=2 {
        let merged = work_dir().join(machine(i)).join("merged");
        while Command::new("umount")
            .arg(&merged)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {}
        let _ = std::fs::remove_dir_all(work_dir().join(machine(i)));
    }
    ip_quiet(&["netns", "del", CLIENT_NS]);
    ip_quiet(&["link", "del", "skpk3c"]);
    ip_quiet(&["link", "del", BRIDGE]);
}

/// The bridge and the client namespace; removed on drop.
struct Network;

impl Network {
    fn up() -> Result<Self> {
        add_bridge(BRIDGE)?;
        let net = Self;
        add_host(CLIENT_NS, addr(250), "skpk3c", BRIDGE)?;
        Ok(net)
    }

    fn client(script: &str) -> Result<Output> {
        output(Command::new("ip").args(["netns", "exec", CLIENT_NS, "bash", "-c", script]))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        ip_quiet(&["netns", "del", CLIENT_NS]);
        ip_quiet(&["link", "del", "skpk3c"]);
        ip_quiet(&["link", "del", BRIDGE]);
    }
}

/// Makes node `i`'s file system: an overlay of the cached root, with its
/// network (systemd-networkd on host0), host name, the package file and the
/// demo service binary.
fn make_node(i: usize, rootfs: &Path, debs: &[PathBuf]) -> Result<Node> {
    let dir = work_dir().join(machine(i));
    for d in ["upper", "work", "merged"] {
        std::fs::create_dir_all(dir.join(d))
            .with_context(|| format!("creating {}", dir.join(d).display()))?;
    }
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            rootfs.display(),
            dir.join("upper").display(),
            dir.join("work").display()
        ))
        .arg(dir.join("merged")))?;
    let node = Node {
        i,
        dir,
        nspawn: None,
    };
    std::fs::write(node.file("/etc/hostname"), format!("node{i}\n"))
        .with_context(|| format!("writing {}", node.file("/etc/hostname").display()))?;
    std::fs::create_dir_all(node.file("/etc/systemd/network")).context("etc/systemd/network")?;
    std::fs::write(
        // Before networkd's own 80-container-host0.network (DHCP).
        node.file("/etc/systemd/network/10-host0.network"),
        format!(
            "[Match]\nName=host0\n\n[Network]\nAddress={}/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n",
            addr(u8::try_from(i)?)
        ),
    )?;
    let wants = node.file("/etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants)?;
    let _ = std::os::unix::fs::symlink(
        "/lib/systemd/system/systemd-networkd.service",
        wants.join("systemd-networkd.service"),
    );
    let online = node.file("/etc/systemd/system/network-online.target.wants");
    std::fs::create_dir_all(&online)?;
    let _ = std::os::unix::fs::symlink(
        "/lib/systemd/system/systemd-networkd-wait-online.service",
        online.join("systemd-networkd-wait-online.service"),
    );
    for (n, deb) in debs.iter().enumerate() {
        std::fs::copy(deb, node.file(&format!("/root/safekit-{}.deb", n + 1)))
            .with_context(|| format!("copying {}", deb.display()))?;
    }
    std::fs::copy(
        package::target_dir().join("release/safekit-demo"),
        node.file("/usr/local/bin/safekit-demo"),
    )
    .context("copying safekit-demo")?;
    Ok(node)
}

/// The operator's configuration of node `i` (the same on both but the
/// key, which is shared).
fn configure(node: &Node, key: &[u8]) -> Result<()> {
    let etc = node.file("/etc/safekit");
    std::fs::create_dir_all(etc.join("modules/web/bin"))?;
    std::fs::write(
        etc.join("cluster.toml"),
        format!(
            "name = \"skpk\"\nkey_file = \"cluster.key\"\n\n[[lan]]\nname = \"default\"\nreplication = true\n\n[[node]]\nname = \"node1\"\naddrs = {{ default = \"{}\" }}\n\n[[node]]\nname = \"node2\"\naddrs = {{ default = \"{}\" }}\n",
            addr(1),
            addr(2)
        ),
    )?;
    let key_path = etc.join("cluster.key");
    std::fs::write(&key_path, key)?;
    set_mode(&key_path, 0o600)?;
    std::fs::write(
        etc.join("modules/web/module.toml"),
        format!(
            "[service]\nmode = \"mirror\"\nboot = true\n\n[heart]\npulse = \"200ms\"\ntimeout = \"2s\"\n\n[vip]\naddrs = [\"{}\"]\n\n[rfs]\n[[rfs.dir]]\npath = \"/srv/data\"\n",
            vip()
        ),
    )?;
    let start = "#!/bin/sh\necho \"start_prim on $SAFE_NODE\" >> /root/events\n/usr/local/bin/safekit-demo --listen 0.0.0.0:7000 --text \"$SAFE_NODE\" --pidfile /run/demo.pid >/dev/null 2>&1 &\n";
    let stop = "#!/bin/sh\necho \"stop_prim $1 on $SAFE_NODE\" >> /root/events\n[ -f /run/demo.pid ] && kill \"$(cat /run/demo.pid)\" 2>/dev/null\nrm -f /run/demo.pid\nexit 0\n";
    for (name, body) in [("start_prim", start), ("stop_prim", stop)] {
        let p = etc.join("modules/web/bin").join(name);
        std::fs::write(&p, body)?;
        set_mode(&p, 0o755)?;
    }
    std::fs::create_dir_all(node.file("/srv/data"))?;
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// PRIM (3) on one node and SECOND (4) on the other: the primary's index.
fn pair(nodes: &[Node]) -> Option<usize> {
    match (nodes[0].state(), nodes[1].state()) {
        (Some(3), Some(4)) => Some(0),
        (Some(4), Some(3)) => Some(1),
        _ => None,
    }
}

fn wait_pair(nodes: &[Node], limit: Duration, what: &str) -> Result<usize> {
    let mut found = None;
    wait_until(limit, || {
        found = pair(nodes);
        found.is_some()
    });
    found.with_context(|| {
        format!(
            "{what}: not PRIM/SECOND (states {:?} {:?})\n{}",
            nodes[0].state(),
            nodes[1].state(),
            diagnose(nodes)
        )
    })
}

/// What each node says about its service, for a failure's message.
fn diagnose(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| {
            let o = n.sh(
                "systemctl status --no-pager safekitd 2>&1; journalctl -b --no-pager -u safekitd 2>&1 | tail -30; tail -20 /var/log/safekit/web.log 2>&1",
            );
            format!(
                "--- node{}:\n{}",
                n.i,
                o.map_or_else(|e| e.to_string(), |o| text(&o))
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The client reaches the VIP at the MAC of node `p` (its neighbour entry)
/// and gets that node's answer from the demo service.
fn client_reaches(nodes: &[Node], p: usize) -> Result<()> {
    let mac = nodes[p].mac()?;
    let want = format!("node{}", p + 1);
    let (mut neigh, mut answer) = (String::new(), None);
    let ok = wait_until(Duration::from_secs(15), || {
        neigh = Network::client(&format!(
            "ping -c1 -W1 {v} >/dev/null; ip neigh show {v}",
            v = vip()
        ))
        .map(|o| text(&o))
        .unwrap_or_default();
        answer = answer_from_vip();
        neigh.contains(&mac) && answer.as_deref() == Some(want.as_str())
    });
    ensure!(
        ok,
        "the client does not reach node{} ({mac}) at the VIP: neighbour {neigh:?}, answer {answer:?}",
        p + 1
    );
    Ok(())
}

/// The demo service's answer through the VIP, from the client namespace.
fn answer_from_vip() -> Option<String> {
    let o = Network::client(&format!(
        "exec 3<>/dev/tcp/{}/7000 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 2 cat <&3",
        vip()
    ))
    .ok()?;
    let t = String::from_utf8_lossy(&o.stdout).into_owned();
    t.split("\r\n\r\n").nth(1).map(|b| b.trim().to_owned())
}

/// Runs the whole test.
#[expect(
    clippy::too_many_lines,
    reason = "one story, in the order an operator lives it"
)]
pub fn run_all() -> Result<()> {
    let started = Instant::now();
    setup::apt_packages(&["debootstrap", "systemd-container"])?;
    cleanup();
    std::fs::create_dir_all(work_dir())?;
    // cargo deb keeps only its latest package in target/debian: a copy of
    // each revision.
    let deb = work_dir().join("safekit-1.deb");
    std::fs::copy(package::package(None)?, &deb)?;
    let deb2 = work_dir().join("safekit-2.deb");
    std::fs::copy(package::package(Some("2"))?, &deb2)?;
    let rootfs = rootfs()?;
    let _net = Network::up()?;
    let mut nodes = vec![
        make_node(1, &rootfs, &[deb.clone(), deb2.clone()])?,
        make_node(2, &rootfs, &[deb.clone(), deb2.clone()])?,
    ];
    let log = |i: usize| work_dir().join(format!("{}.console", machine(i)));
    for (i, n) in nodes.iter_mut().enumerate() {
        let _ = std::fs::remove_file(log(i + 1));
        n.boot(&log(i + 1))
            .with_context(|| format!("booting node{}", i + 1))?;
    }
    eprintln!("system-test: two Debian 12 machines booted with systemd");

    // Install: enabled, inactive until configured; the unit checks clean.
    for n in &nodes {
        n.sh_ok("DEBIAN_FRONTEND=noninteractive dpkg -i /root/safekit-1.deb")?;
        ensure!(n.sh_ok("systemctl is-enabled safekitd")? == "enabled");
        let active = n.sh("systemctl is-active safekitd")?;
        ensure!(
            String::from_utf8_lossy(&active.stdout).trim() == "inactive",
            "safekitd runs without a configuration: {}",
            text(&active)
        );
        let verify = n.sh("systemd-analyze verify /lib/systemd/system/safekitd.service")?;
        ensure!(
            verify.status.success() && text(&verify).trim().is_empty(),
            "systemd-analyze verify: {}",
            text(&verify)
        );
        let man = n.sh_ok("MANWIDTH=80 man -P cat safekit 2>&1")?;
        ensure!(
            man.contains("logview") && !man.contains("warning"),
            "man safekit: {man}"
        );
        let man5 = n.sh_ok("MANWIDTH=80 man -P cat 5 safekit-module.toml 2>&1")?;
        ensure!(
            man5.contains("nice_stop_timeout"),
            "man 5 safekit-module.toml: {man5}"
        );
        n.sh_ok(
            "bash -c '. /usr/share/bash-completion/completions/safekit && complete -p safekit'",
        )?;
    }
    eprintln!(
        "system-test: installed; unit enabled, waiting for a configuration; man and completion ok"
    );

    // Configure (boot = true) and reboot: the module is PRIM/SECOND after
    // boot, the service active through sd_notify.
    let mut key = vec![0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
    for (i, n) in nodes.iter_mut().enumerate() {
        configure(n, &key)?;
        n.poweroff();
        n.boot(&log(i + 1))?;
    }
    // A first start of a replicated module: no copy is known up to date,
    // both wait until the operator names the reference (`safekit prim`).
    ensure!(
        wait_until(Duration::from_secs(60), || nodes.iter().all(|n| n
            .sh("safekit state -m web -lq")
            .is_ok_and(|o| o.status.code() == Some(1)))),
        "after the first boot the nodes are not both WAIT"
    );
    nodes[0].sh_ok("safekit prim -m web")?;
    let p = wait_pair(&nodes, Duration::from_secs(60), "after boot")?;
    for n in &nodes {
        ensure!(
            n.unit("ActiveState") == "active" && n.unit("Type") == "notify",
            "node{}: safekitd {} {}",
            n.i,
            n.unit("ActiveState"),
            n.unit("Type")
        );
        ensure!(
            wait_until(Duration::from_secs(5), || n
                .unit("StatusText")
                .contains("web PRIM")
                || n.unit("StatusText").contains("web SECOND")),
            "node{} status text {:?}",
            n.i,
            n.unit("StatusText")
        );
    }
    client_reaches(&nodes, p)?;
    eprintln!(
        "system-test: after boot node{} PRIM, node{} SECOND; status {:?}",
        p + 1,
        2 - p,
        nodes[p].unit("StatusText")
    );

    // kill -9 of the primary's safekitd: systemd restarts it; the module
    // resumes by the mirror rules.
    let main_pid = nodes[p].unit("MainPID");
    nodes[p].sh_ok(&format!("kill -9 {main_pid}"))?;
    ensure!(
        wait_until(Duration::from_secs(30), || {
            let now = nodes[p].unit("MainPID");
            now != main_pid && now != "0" && nodes[p].unit("ActiveState") == "active"
        }),
        "systemd did not restart safekitd after kill -9 (NRestarts {})",
        nodes[p].unit("NRestarts")
    );
    ensure!(nodes[p].unit("NRestarts") == "1");
    let p = wait_pair(&nodes, Duration::from_secs(60), "after kill -9")?;
    ensure!(
        wait_until(Duration::from_secs(10), || nodes[p].has_vip()
            && !nodes[1 - p].has_vip()),
        "the VIP is not on node{} only",
        p + 1
    );
    client_reaches(&nodes, p)?;
    eprintln!(
        "system-test: kill -9: restarted by systemd; node{} PRIM",
        p + 1
    );

    // A wedged engine (SIGSTOP): no watchdog ping, systemd kills and
    // restarts it.
    let wedged = nodes[p].unit("MainPID");
    nodes[p].sh_ok(&format!("kill -STOP {wedged}"))?;
    ensure!(
        wait_until(Duration::from_secs(40), || {
            let now = nodes[p].unit("MainPID");
            now != wedged && now != "0" && nodes[p].unit("ActiveState") == "active"
        }),
        "the watchdog did not restart a stopped safekitd"
    );
    let journal = nodes[p].sh_ok("journalctl -u safekitd --no-pager")?;
    ensure!(
        journal.contains("Watchdog timeout"),
        "no watchdog timeout in the journal: {journal}"
    );
    let p = wait_pair(
        &nodes,
        Duration::from_secs(60),
        "after the watchdog restart",
    )?;
    eprintln!(
        "system-test: wedged engine: watchdog restart; node{} PRIM",
        p + 1
    );

    // systemctl stop on the primary: the module stops cleanly, the VIP
    // leaves, the peer takes over.
    let s = 1 - p;
    nodes[p].sh_ok("systemctl stop safekitd")?;
    let events = nodes[p].sh_ok("cat /root/events")?;
    ensure!(
        events
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("stop_prim")),
        "stop_prim was not the last script on node{}: {events}",
        p + 1
    );
    ensure!(!nodes[p].has_vip(), "the VIP stayed on the stopped node");
    ensure!(
        wait_until(Duration::from_secs(20), || nodes[s].state() == Some(2)),
        "node{} did not take over (state {:?})",
        s + 1,
        nodes[s].state()
    );
    client_reaches(&nodes, s)?;
    eprintln!(
        "system-test: systemctl stop on node{}: node{} ALONE",
        p + 1,
        s + 1
    );

    // Upgrade, remove, purge on the stopped node.
    let n = &nodes[p];
    n.sh_ok("echo '# changed by the operator' >> /etc/safekit/examples/cluster.toml")?;
    n.sh_ok("DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold /root/safekit-2.deb")?;
    ensure!(
        n.sh_ok("cat /etc/safekit/examples/cluster.toml")?
            .contains("changed by the operator"),
        "the upgrade replaced a changed conffile"
    );
    ensure!(
        n.unit("ActiveState") == "inactive",
        "the upgrade started safekitd"
    );
    n.sh_ok("dpkg -r safekit")?;
    ensure!(
        n.sh("test -f /etc/safekit/examples/modules/web/module.toml")?
            .status
            .success()
    );
    ensure!(!n.sh("test -e /usr/sbin/safekitd")?.status.success());
    n.sh_ok("dpkg -P safekit")?;
    ensure!(
        !n.sh("test -e /etc/safekit/examples")?.status.success(),
        "examples left after purge"
    );
    ensure!(
        !n.sh("test -e /var/log/safekit")?.status.success(),
        "logs left after purge"
    );
    ensure!(
        n.sh("test -f /etc/safekit/cluster.toml")?.status.success(),
        "purge removed the operator's own configuration"
    );
    eprintln!(
        "system-test: upgrade kept a changed conffile; remove kept, purge removed the examples"
    );

    for n in &mut nodes {
        n.poweroff();
    }
    drop(nodes);
    cleanup();
    eprintln!("system-test: passed in {:.0?}", started.elapsed());
    Ok(())
}

/// Entry point: fails with what went wrong, after cleaning up.
pub fn system_test() -> Result<()> {
    let r = run_all();
    cleanup();
    if let Err(e) = &r {
        bail!("system test failed: {e:#}");
    }
    r
}
