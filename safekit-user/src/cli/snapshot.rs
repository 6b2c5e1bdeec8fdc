//! `safekit snapshot [-o FILE]`: a support bundle (tar.gz) of the node's
//! configuration (without the cluster key, users, API keys or TLS keys),
//! module logs, persisted state and the daemon's current status
//! ([`crate::snapshot`]).

use std::path::PathBuf;

use crate::{
    control::{Request, Response},
    paths::Paths,
};

/// Arguments of `snapshot`.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// Output file (default: ./safekit-snapshot-<node>-<unix time>.tar.gz).
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
}

pub(super) fn run(paths: &Paths, args: &SnapshotArgs) -> i32 {
    match make(paths, args) {
        Ok(p) => {
            println!("snapshot written to {}", p.display());
            0
        }
        Err(e) => {
            eprintln!("safekit: snapshot: {e}");
            1
        }
    }
}

fn make(paths: &Paths, args: &SnapshotArgs) -> Result<PathBuf, String> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let status = match super::call(paths, &Request::State) {
        Ok(Response::State { status }) => Some(status),
        _ => None,
    };
    let node = status
        .as_ref()
        .map_or("unknown", |s| s.node.as_str())
        .to_owned();
    let out = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("safekit-snapshot-{node}-{stamp}.tar.gz")));
    crate::snapshot::write_bundle(paths, status.as_ref(), &out)?;
    Ok(out)
}
