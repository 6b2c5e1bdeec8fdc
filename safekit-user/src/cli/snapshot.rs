//! `safekit snapshot [-o FILE]`: a support bundle (tar.gz) of the node's
//! configuration (without the cluster key), module logs, persisted state and
//! the daemon's current status.

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
    let staging =
        std::env::temp_dir().join(format!("safekit-snapshot-{}-{stamp}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| e.to_string())?;
    let status_text = match &status {
        Some(s) => serde_json::to_string_pretty(s).unwrap_or_default(),
        None => "safekitd not reachable".to_owned(),
    };
    std::fs::write(staging.join("status.json"), status_text).map_err(|e| e.to_string())?;
    let copy = |from: PathBuf, to: &str| -> Result<(), String> {
        if !from.exists() {
            return Ok(());
        }
        let st = std::process::Command::new("cp")
            .arg("-a")
            .arg(&from)
            .arg(staging.join(to))
            .status()
            .map_err(|e| e.to_string())?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("copying {}", from.display()))
        }
    };
    copy(paths.etc(), "etc")?;
    copy(paths.log_dir(), "log")?;
    copy(paths.state_dir(), "state")?;
    // Never ship the cluster key.
    if let Ok(cfg) = crate::config::load(&paths.etc())
        && let Ok(rel) = cfg.cluster.key_file.strip_prefix(paths.etc())
    {
        let _ = std::fs::remove_file(staging.join("etc").join(rel));
    }
    let _ = std::fs::remove_file(staging.join("etc/cluster.key"));
    let st = std::process::Command::new("tar")
        .arg("czf")
        .arg(&out)
        .arg("-C")
        .arg(&staging)
        .arg(".")
        .status()
        .map_err(|e| format!("running tar: {e}"))?;
    let _ = std::fs::remove_dir_all(&staging);
    if st.success() {
        Ok(out)
    } else {
        Err(format!("tar failed: {st}"))
    }
}
