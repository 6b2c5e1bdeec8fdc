//! `safekit farm which-node -m AM IP[:PORT] [--dport N]` (IPv4 or IPv6;
//! `[IPv6]:PORT`).

use std::net::{IpAddr, SocketAddr};

use crate::{
    control::{Request, Response},
    paths::Paths,
};

/// `safekit farm ...`.
#[derive(clap::Subcommand, Debug)]
pub enum FarmCommand {
    /// Which node serves a client (under this node's current membership).
    WhichNode {
        /// Farm module.
        #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
        module: String,
        /// Client address, with its port for `client_ip_port` rules.
        client: String,
        /// Destination port selecting the rule (default: the first rule).
        #[arg(long)]
        dport: Option<u16>,
    },
}

pub(super) fn run(paths: &Paths, cmd: FarmCommand) -> i32 {
    let FarmCommand::WhichNode {
        module,
        client,
        dport,
    } = cmd;
    let (ip, port) = if let Ok(sa) = client.parse::<SocketAddr>() {
        (sa.ip(), Some(sa.port()))
    } else if let Ok(ip) = client.parse::<IpAddr>() {
        (ip, None)
    } else {
        eprintln!(
            "safekit: {client:?} is not IP or IP:PORT (e.g. 10.0.0.7, 10.0.0.7:40000, fd00::7 or [fd00::7]:40000)"
        );
        return super::EXIT_USAGE;
    };
    let req = Request::FarmWhich {
        module,
        client: ip,
        port,
        dport,
    };
    match super::call(paths, &req) {
        Ok(Response::Which {
            bucket,
            node,
            filter,
        }) => {
            println!(
                "{client} -> bucket {bucket} ({filter}) -> {}",
                node.as_deref().unwrap_or("no node (no UP member)")
            );
            0
        }
        Ok(Response::Error { error }) => {
            eprintln!("safekit: {error}");
            super::module_cmd::refused(paths, &req)
        }
        Ok(_) => {
            eprintln!("safekit: unexpected answer from safekitd");
            1
        }
        Err(e) => {
            eprintln!("safekit: {e}");
            1
        }
    }
}
