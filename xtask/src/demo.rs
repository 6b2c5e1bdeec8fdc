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

/// The demo modules: a farm module on every node.
fn modules(spec: &LabSpec) -> Vec<LabModule> {
    vec![LabModule {
        name: "front".into(),
        toml: format!(
            r#"[service]
mode = "farm"

[farm]
pulse = "100ms"
lans = ["default"]

[vip]
addrs = ["{}"]
[[vip.rule]]
proto = "tcp"
port = 80
filter = "client_ip_port"
"#,
            spec.addr(200)
        ),
        scripts: vec![],
    }]
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

/// The guided tour: a 3-node lab, a farm module started everywhere, states,
/// a node killed and seen lost by the others.
pub fn run() -> Result<()> {
    let nodes = 3;
    println!("== bringing up a lab of {nodes} nodes (network namespaces on a bridge)");
    let mut lab = lab_up(nodes)?;
    for i in 1..=nodes {
        show(&lab, i, &["start", "-m", "front"])?;
    }
    std::thread::sleep(Duration::from_millis(500));
    println!("== every node runs the farm module and sees its peers:");
    for i in 1..=nodes {
        print!("{}", show(&lab, i, &["state"])?);
    }
    println!("== kill -9 of node3's safekitd; node1 notices within the farm timeout (10 pulses):");
    let t = Instant::now();
    lab.kill_daemon(3);
    loop {
        let s = show(&lab, 1, &["state", "-m", "front"])?;
        if s.contains("node3: lost") || t.elapsed() > Duration::from_secs(5) {
            print!("{s}");
            println!("   (reported after {} ms)", t.elapsed().as_millis());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("== node1 in detail (safekit state -v):");
    let body = Command::new("ip")
        .args(["netns", "exec", &lab.spec().node_ns(1)])
        .arg(bin_dir().join("safekit"))
        .args(["--root"])
        .arg(lab.root(1))
        .args(["state", "-v"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&body.stdout));
    println!("== restarting node3's safekitd; the lab stays up for you to explore.");
    lab.start_daemon(3)?;
    show(&lab, 3, &["start", "-m", "front"])?;
    lab.persist();
    print_lab_help(nodes);
    Ok(())
}
