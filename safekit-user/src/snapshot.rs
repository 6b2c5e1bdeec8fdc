//! The support bundle (`safekit snapshot`, `GET /api/v1/snapshot`): a
//! tar.gz of the node's configuration (without the cluster key, users, API
//! keys or TLS private keys), module logs, persisted state and status.

use std::path::Path;

use crate::{paths::Paths, status::NodeStatus};

/// Writes the bundle of the node at `paths` to `out`; `status` is the
/// daemon's (absent when it could not be asked).
pub fn write_bundle(paths: &Paths, status: Option<&NodeStatus>, out: &Path) -> Result<(), String> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let staging =
        std::env::temp_dir().join(format!("safekit-snapshot-{}-{stamp}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| e.to_string())?;
    let r = fill(paths, status, &staging).and_then(|()| {
        let st = std::process::Command::new("tar")
            .arg("czf")
            .arg(out)
            .arg("-C")
            .arg(&staging)
            .arg(".")
            .status()
            .map_err(|e| format!("running tar: {e}"))?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("tar failed: {st}"))
        }
    });
    let _ = std::fs::remove_dir_all(&staging);
    r
}

fn fill(paths: &Paths, status: Option<&NodeStatus>, staging: &Path) -> Result<(), String> {
    let status_text = match status {
        Some(s) => serde_json::to_string_pretty(s).unwrap_or_default(),
        None => "safekitd not reachable".to_owned(),
    };
    std::fs::write(staging.join("status.json"), status_text).map_err(|e| e.to_string())?;
    let copy = |from: std::path::PathBuf, to: &str| -> Result<(), String> {
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
    // Never ship secrets: the cluster key, password hashes, API key
    // hashes, TLS private keys.
    if let Ok(cfg) = crate::config::load(&paths.etc())
        && let Ok(rel) = cfg.cluster.key_file.strip_prefix(paths.etc())
    {
        let _ = std::fs::remove_file(staging.join("etc").join(rel));
    }
    let etc = staging.join("etc");
    for f in [
        "cluster.key",
        crate::auth::USERS_FILE,
        crate::auth::APIKEYS_FILE,
    ] {
        let _ = std::fs::remove_file(etc.join(f));
    }
    if let Ok(rd) = std::fs::read_dir(etc.join(crate::certs::TLS_DIR)) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "key") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}
