//! `safekit witness`: runs the arbitrating witness on a third machine (see
//! [`crate::witness`]). It needs the cluster key (to authenticate requests
//! and sign answers) and a state file (the grants, kept across restarts).

use std::{net::SocketAddr, path::PathBuf, sync::atomic::AtomicBool};

use crate::{
    paths::Paths,
    witness::{self, codec::WitnessKey, server},
};

/// `safekit witness [--listen ADDR:PORT] [--key FILE] [--state FILE]`.
#[derive(clap::Args, Debug)]
pub struct WitnessArgs {
    /// UDP address to answer on.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], witness::DEFAULT_PORT)))]
    pub listen: SocketAddr,
    /// The cluster key file (the same bytes as the nodes' `key_file`);
    /// default `<root>/etc/safekit/cluster.key`.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Where the grants are kept; default
    /// `<root>/var/lib/safekit/witness.json`.
    #[arg(long)]
    pub state: Option<PathBuf>,
}

/// Runs the witness until killed; returns the exit code on error.
pub(super) fn run(paths: &Paths, args: &WitnessArgs) -> i32 {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SAFEKIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let key_path = args
        .key
        .clone()
        .unwrap_or_else(|| paths.etc().join("cluster.key"));
    let key = match std::fs::read(&key_path) {
        Ok(k) if k.len() >= 32 => WitnessKey::derive(&k),
        Ok(k) => {
            eprintln!(
                "safekit witness: {}: {} bytes, at least 32 needed (the cluster key file)",
                key_path.display(),
                k.len()
            );
            return 1;
        }
        Err(e) => {
            eprintln!("safekit witness: reading {}: {e}", key_path.display());
            return 1;
        }
    };
    let state = args
        .state
        .clone()
        .unwrap_or_else(|| paths.state_dir().join("witness.json"));
    // Checked before binding: a corrupt state refuses to start.
    if let Err(e) = server::load(&state) {
        eprintln!("safekit witness: {e}");
        return 1;
    }
    let socket = match std::net::UdpSocket::bind(args.listen) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("safekit witness: binding UDP {}: {e}", args.listen);
            return 1;
        }
    };
    tracing::info!(listen = %args.listen, state = %state.display(), "safekit witness answering");
    match server::serve(&socket, &key, &state, &AtomicBool::new(false)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("safekit witness: {e}");
            1
        }
    }
}
