//! `cargo xtask run` and `cargo xtask lab up|down`: the lab with the demo
//! modules, and a guided tour of what safekit does.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::lab::{Lab, LabModule, LabSpec, bin_dir, cleanup};

/// Prefix of the interactive lab's namespaces and links.
pub const PREFIX: &str = "sklab";
/// Third octet of the lab subnet (10.77.1.0/24).
pub const SUBNET: u8 = 1;

fn lab_dir() -> PathBuf {
    PathBuf::from("/tmp/safekit-lab")
}

/// Scripts that start and stop the demo service (answers with the node name).
fn demo_scripts(start: &str, stop: &str, listen: &str) -> Vec<(String, String)> {
    let demo = bin_dir().join("safekit-demo");
    vec![
        (
            start.to_owned(),
            format!(
                "#!/bin/sh\n\"{}\" --listen {listen} --text \"$SAFE_NODE\" --pidfile \"$SAFE_ROOT/demo-$SAFEMODULE.pid\" >/dev/null 2>&1 &\necho \"demo service started on $SAFE_NODE\"\n",
                demo.display()
            ),
        ),
        (
            stop.to_owned(),
            "#!/bin/sh\n[ -f \"$SAFE_ROOT/demo-$SAFEMODULE.pid\" ] && kill \"$(cat \"$SAFE_ROOT/demo-$SAFEMODULE.pid\")\" 2>/dev/null\nrm -f \"$SAFE_ROOT/demo-$SAFEMODULE.pid\"\nexit 0\n".to_owned(),
        ),
    ]
}

/// The demo modules: a farm module on every node serving the demo HTTP
/// service on a VIP, balanced per client IP and port; a mirror module on
/// node1 and node2 with a VIP and a replicated directory.
fn modules(spec: &LabSpec) -> Vec<LabModule> {
    vec![
        mirror_module(spec),
        LabModule {
            name: "front".into(),
            toml: format!(
                r#"[service]
mode = "farm"

[farm]
pulse = "100ms"

[vip]
addrs = ["{}"]
[[vip.rule]]
proto = "tcp"
port = 80
filter = "client_ip_port"

[[check.tcp]]
host = "127.0.0.1"
port = 80
interval = "1s"
timeout = "500ms"
"#,
                spec.addr(200)
            ),
            scripts: demo_scripts("start_both", "stop_both", "0.0.0.0:80"),
        },
    ]
}

/// The replicated directory of the demo mirror module.
const MIRROR_DIR: &str = "/srv/web";

fn mirror_module(spec: &LabSpec) -> LabModule {
    LabModule {
        name: "web".into(),
        toml: format!(
            r#"[service]
mode = "mirror"
nodes = ["node1", "node2"]

[heart]
pulse = "100ms"
timeout = "1s"

[vip]
addrs = ["{}"]

[rfs]
send_timeout = "1s"
[[rfs.dir]]
path = "{MIRROR_DIR}"
"#,
            spec.addr(100)
        ),
        scripts: demo_scripts("start_prim", "stop_prim", "0.0.0.0:8080"),
    }
}

/// Builds the lab and starts safekitd on every node.
pub fn lab_up(nodes: usize) -> Result<Lab> {
    if nodes < 2 {
        bail!("a cluster needs at least 2 nodes");
    }
    let mut spec = LabSpec {
        prefix: PREFIX.into(),
        nodes,
        subnet: SUBNET,
        modules: vec![],
        cluster_extra: String::new(),
    };
    spec.modules = modules(&spec);
    let mut lab = Lab::up(spec, &lab_dir())?;
    for i in 1..=nodes {
        lab.start_daemon(i)?;
    }
    Ok(lab)
}

/// Removes the lab.
pub fn lab_down() {
    cleanup(PREFIX, &lab_dir());
    let _ = std::fs::remove_dir_all(lab_dir());
    eprintln!("lab removed");
}

/// How to look around the lab.
pub fn print_lab_help(nodes: usize) {
    let bin = bin_dir();
    println!(
        "\nThe lab is up: bridge {PREFIX}br, nodes {PREFIX}n1..{PREFIX}n{nodes} (10.77.{SUBNET}.1..), client {PREFIX}cl (10.77.{SUBNET}.250)."
    );
    println!("Look around:");
    println!(
        "  ip netns exec {PREFIX}n1 {} --root /tmp/safekit-lab/node1 state -v",
        bin.join("safekit").display()
    );
    println!(
        "  {} --root /tmp/safekit-lab/node2 log -m front",
        bin.join("safekit").display()
    );
    println!(
        "  ip netns exec {PREFIX}cl curl -s http://10.77.{SUBNET}.200/          # the farm VIP"
    );
    println!(
        "  ip netns exec {PREFIX}cl curl -s http://10.77.{SUBNET}.100:8080/     # the mirror VIP"
    );
    println!("  ip netns exec {PREFIX}cl curl -s http://10.77.{SUBNET}.1:9010/metrics");
    println!("Remove it: cargo xtask lab down");
}

fn show(lab: &Lab, i: usize, args: &[&str]) -> Result<String> {
    let out = lab.safekit(i, args)?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// `curl` from the client namespace with a chosen source port.
fn curl(lab: &Lab, url: &str, local_port: u16) -> String {
    let out = lab.exec(
        &lab.spec().client_ns(),
        &[
            "curl",
            "-s",
            "--max-time",
            "2",
            "--local-port",
            &local_port.to_string(),
            url,
        ],
    );
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        Ok(o) => format!("(no answer: curl exit {:?})", o.status.code()),
        Err(e) => format!("(curl failed: {e})"),
    }
}

/// Requests from 12 source ports; prints who answered each.
fn show_farm(lab: &Lab, url: &str, base_port: u16) {
    let mut line = String::new();
    for p in 0..12 {
        let who = curl(lab, url, base_port + p);
        line.push(' ');
        line.push_str(&who);
    }
    println!("   answers:{line}");
}

/// The guided tour: a 3-node farm serving HTTP on a VIP; node3 killed and
/// its share taken over; node3 back.
pub fn run() -> Result<()> {
    let nodes = 3;
    println!("== bringing up a lab of {nodes} nodes (network namespaces on a bridge)");
    let mut lab = lab_up(nodes)?;
    for i in 1..=nodes {
        show(&lab, i, &["start", "-m", "front"])?;
    }
    let vip = lab.spec().addr(200);
    let url = format!("http://{vip}/");
    wait_settled(&lab, nodes);
    println!("== every node runs the farm module 'front' and sees its peers:");
    for i in 1..=nodes {
        print!("{}", show(&lab, i, &["state"])?);
    }
    println!("== the client asks http://{vip}/ from 12 source ports; the XDP filters spread them:");
    show_farm(&lab, &url, 30000);
    println!("== which node serves 10.77.{SUBNET}.250:30000? (safekit farm which-node)");
    print!(
        "{}",
        show(
            &lab,
            1,
            &[
                "farm",
                "which-node",
                "-m",
                "front",
                &format!("{}:30000", lab.spec().client_addr())
            ]
        )?
    );
    println!(
        "== kill -9 of node3's safekitd; node1 and node2 take its buckets after 10 missed pulses:"
    );
    let t = Instant::now();
    lab.kill_daemon(3);
    loop {
        let s = show(&lab, 1, &["state", "-m", "front"])?;
        if s.contains("node3: lost") || t.elapsed() > Duration::from_secs(5) {
            print!("{s}");
            println!(
                "   (node3 reported lost after {} ms)",
                t.elapsed().as_millis()
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    show_farm(&lab, &url, 31000);
    println!("== node1 in detail (safekit state -v):");
    let body = Command::new("ip")
        .args(["netns", "exec", &lab.spec().node_ns(1)])
        .arg(bin_dir().join("safekit"))
        .args(["--root"])
        .arg(lab.root(1))
        .args(["state", "-v"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&body.stdout));
    println!("== node3's safekitd restarted and its module started: it gets its buckets back:");
    lab.start_daemon(3)?;
    show(&lab, 3, &["start", "-m", "front"])?;
    wait_settled(&lab, nodes);
    show_farm(&lab, &url, 32000);
    mirror_tour(&mut lab)?;
    lab.persist();
    print_lab_help(nodes);
    Ok(())
}

fn module_state(lab: &Lab, i: usize, module: &str) -> String {
    show(lab, i, &["state", "-m", module, "-l"]).unwrap_or_default()
}

/// Waits (up to `secs`) until node `i`'s module `module` shows `want`.
fn wait_state(lab: &Lab, i: usize, module: &str, want: &str, secs: u64) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if module_state(lab, i, module).contains(want) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The mirror part: PRIM/SECOND with a replicated directory, a file written
/// on the primary found on the secondary, kill -9 of the primary, the
/// secondary takes over with the file, the old primary back as SECOND.
fn mirror_tour(lab: &mut Lab) -> Result<()> {
    let vip = lab.spec().addr(100);
    println!("== mirror module 'web' on node1 and node2: VIP {vip}, {MIRROR_DIR} replicated");
    println!(
        "   first start of a replicated module: neither node knows its copy up to date, so the"
    );
    println!(
        "   operator names the reference, `safekit prim -m web` on node1, then `safekit start -m web` on node2"
    );
    show(lab, 1, &["prim", "-m", "web"])?;
    show(lab, 2, &["start", "-m", "web"])?;
    let synced = wait_state(lab, 1, "web", "PRIM", 15) && wait_state(lab, 2, "web", "SECOND", 5);
    for i in [1, 2] {
        print!("{}", show(lab, i, &["state", "-m", "web", "-v"])?);
    }
    if !synced {
        println!("   (the pair did not reach PRIM/SECOND within 15 s: see `safekit log -m web`)");
        return Ok(());
    }
    let url = format!("http://{vip}:8080/");
    println!("   the client asks {url}: {}", curl(lab, &url, 33000));
    let path = lab
        .root(1)
        .join(MIRROR_DIR.trim_start_matches('/'))
        .join("orders.txt");
    if let Some(p) = lab.node_view(1, &path) {
        std::fs::write(&p, "order 1\norder 2\n")?;
        println!("   wrote {} through node1's mount", path.display());
    }
    let copy = lab
        .root(2)
        .join(MIRROR_DIR.trim_start_matches('/'))
        .join("orders.txt");
    std::thread::sleep(Duration::from_millis(100));
    println!(
        "   node2's copy {}: {:?}",
        copy.display(),
        std::fs::read_to_string(&copy).unwrap_or_else(|e| format!("({e})"))
    );
    println!("== kill -9 of node1's safekitd: node2 takes over after the 1 s heartbeat timeout");
    let t = Instant::now();
    lab.kill_daemon(1);
    // The demo service of node1 dies with its host in real life.
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "kill $(cat {}/demo-web.pid) 2>/dev/null",
            lab.root(1).display()
        ))
        .status();
    if wait_state(lab, 2, "web", "ALONE", 10) {
        println!("   node2 ALONE after {} ms", t.elapsed().as_millis());
    }
    std::thread::sleep(Duration::from_millis(500));
    println!("   the client asks {url}: {}", curl(lab, &url, 33001));
    println!("== node1's safekitd restarted: SECOND, resynchronised with only what changed");
    lab.start_daemon(1)?;
    show(lab, 1, &["start", "-m", "web"])?;
    show(lab, 1, &["start", "-m", "front"])?;
    if wait_state(lab, 2, "web", "PRIM", 15) {
        for i in [2, 1] {
            print!("{}", show(lab, i, &["state", "-m", "web", "-v"])?);
        }
    }
    print!("{}", show(lab, 2, &["rfs", "verify", "-m", "web"])?);
    Ok(())
}

/// Waits (up to 5 s) until node1 sees every node UP.
fn wait_settled(lab: &Lab, nodes: usize) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if let Ok(s) = show(lab, 1, &["state", "-m", "front"])
            && s.matches(": UP").count() == nodes - 1
            && s.contains("UP (green)")
        {
            std::thread::sleep(Duration::from_millis(300));
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
