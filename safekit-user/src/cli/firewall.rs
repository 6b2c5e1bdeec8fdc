//! `safekit firewall add|remove`: opens the cluster's ports to its nodes in
//! nftables (table `inet safekit_firewall`), or removes that table.

use crate::{config, nft::firewall, paths::Paths};

/// `safekit firewall ...`.
#[derive(clap::Subcommand, Debug)]
pub enum FirewallCommand {
    /// Accept the cluster's ports (UDP heartbeats, TCP replication, HTTP,
    /// HTTPS) from the cluster's node addresses; replaces an earlier table.
    Add,
    /// Remove the table (nothing to do when it is not there).
    Remove,
}

pub(super) fn run(paths: &Paths, cmd: &FirewallCommand) -> i32 {
    match cmd {
        FirewallCommand::Add => {
            let cfg = match config::load(&paths.etc()) {
                Ok(cfg) => cfg,
                Err(errors) => {
                    eprintln!("{errors}");
                    eprintln!("safekit: firewall not changed: the configuration has errors");
                    return 1;
                }
            };
            if let Err(e) = firewall::add(&cfg.cluster) {
                eprintln!("safekit: {e}");
                return 1;
            }
            let ports: Vec<String> = firewall::ports(&cfg.cluster)
                .iter()
                .map(|p| {
                    let proto = if p.proto == safekit_common::PROTO_UDP {
                        "udp"
                    } else {
                        "tcp"
                    };
                    format!("{proto}/{} ({})", p.port, p.what)
                })
                .collect();
            let addrs: Vec<String> = firewall::node_addresses(&cfg.cluster)
                .iter()
                .map(ToString::to_string)
                .collect();
            println!(
                "firewall: table inet {} accepts {} from {}",
                firewall::TABLE,
                ports.join(", "),
                addrs.join(", ")
            );
            0
        }
        FirewallCommand::Remove => match firewall::remove() {
            Ok(()) => {
                println!("firewall: table inet {} removed", firewall::TABLE);
                0
            }
            Err(e) => {
                eprintln!("safekit: {e}");
                1
            }
        },
    }
}
