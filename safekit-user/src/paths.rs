//! Where everything lives (SPEC §3). Every path hangs off one root so that
//! several nodes can run on one machine: `safekitd --root DIR` (or
//! `SAFEKIT_ROOT`) puts `/etc/safekit`, `/var/lib/safekit`, `/run/safekit`,
//! `/var/log/safekit` — and the absolute paths in module configs — under DIR.

use std::path::{Path, PathBuf};

/// Environment variable naming the root, for the daemon, the CLI and scripts.
pub const ROOT_ENV: &str = "SAFEKIT_ROOT";

/// The node's file layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    root: PathBuf,
}

impl Paths {
    /// Layout under `root` (`/` in production).
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Layout from an explicit `--root`, else `SAFEKIT_ROOT`, else `/`.
    #[must_use]
    pub fn from_arg_or_env(arg: Option<PathBuf>) -> Self {
        let root = arg
            .or_else(|| std::env::var_os(ROOT_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/"));
        Self::new(root)
    }

    /// The root itself.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Maps an absolute path of the config (e.g. a replicated directory)
    /// under the root.
    #[must_use]
    pub fn under_root(&self, p: &Path) -> PathBuf {
        let rel = p.strip_prefix("/").unwrap_or(p);
        self.root.join(rel)
    }

    /// `/etc/safekit`.
    #[must_use]
    pub fn etc(&self) -> PathBuf {
        self.root.join("etc/safekit")
    }

    /// `/etc/safekit/modules/<AM>`.
    #[must_use]
    pub fn module_dir(&self, module: &str) -> PathBuf {
        self.etc().join("modules").join(module)
    }

    /// `/var/lib/safekit` (persistent state).
    #[must_use]
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("var/lib/safekit")
    }

    /// `/var/lib/safekit/<AM>`.
    #[must_use]
    pub fn module_state_dir(&self, module: &str) -> PathBuf {
        self.state_dir().join(module)
    }

    /// `/run/safekit` (runtime).
    #[must_use]
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run/safekit")
    }

    /// The daemon's control socket.
    #[must_use]
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir().join("safekitd.sock")
    }

    /// `/var/log/safekit`.
    #[must_use]
    pub fn log_dir(&self) -> PathBuf {
        self.root.join("var/log/safekit")
    }

    /// `/var/log/safekit/commands.log`: every command safekitd received.
    #[must_use]
    pub fn commands_log(&self) -> PathBuf {
        self.log_dir().join("commands.log")
    }

    /// `/var/log/safekit/<AM>.log`.
    #[must_use]
    pub fn module_log(&self, module: &str) -> PathBuf {
        self.log_dir().join(format!("{module}.log"))
    }
}

/// Replaces the state file `path` durably: the bytes are written to a
/// temporary file beside it and fsynced, renamed over it, and the directory
/// (created if missing) is fsynced, so a crash leaves the old or the new
/// content, never a mix.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_writes_replace_the_whole_file() {
        let dir = std::env::temp_dir().join(format!("safekit-paths-{}", std::process::id()));
        let f = dir.join("sub/state.json");
        write_durably(&f, b"first, longer content").unwrap();
        write_durably(&f, b"second").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"second");
        assert!(!dir.join("sub/state.json.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_paths_move_under_the_root() {
        let p = Paths::new("/tmp/n1");
        assert_eq!(
            p.under_root(Path::new("/srv/web/data")),
            Path::new("/tmp/n1/srv/web/data")
        );
        assert_eq!(
            p.control_socket(),
            Path::new("/tmp/n1/run/safekit/safekitd.sock")
        );
        assert_eq!(
            Paths::new("/").module_log("web"),
            Path::new("/var/log/safekit/web.log")
        );
    }
}
