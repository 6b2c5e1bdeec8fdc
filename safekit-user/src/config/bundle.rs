//! A configuration as `safekit config apply` carries it from one node to the
//! others: `cluster.toml` and module directories (`module.toml` and the
//! `bin/` scripts), never the key file. Each receiving node checks it
//! against its own config dir ([`Bundle::check`]: staged in a scratch copy,
//! then [`super::load`]), keeps what it replaces ([`Bundle::install`]: the
//! previous files into a `previous` directory, `safekit config rollback`),
//! and writes every file atomically (temporary file, fsync, rename, fsync of
//! the directory).
//!
//! A bundle is authenticated with the cluster key ([`seal`], [`open`]): a
//! keyed BLAKE3 MAC over the sender, a timestamp, a nonce and the body.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::{Config, ConfigErrors, cluster::CLUSTER_FILE, load::MODULES_DIR, module::MODULE_FILE};

/// The scripts directory of a module.
pub const BIN_DIR: &str = "bin";
/// Largest bundle accepted (every file together).
pub const MAX_BUNDLE: usize = 4 << 20;
/// Largest script.
const MAX_SCRIPT: usize = 1 << 20;

/// Errors reading, checking or installing a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `-m AM` names no module of the config dir.
    #[error("no module {0:?} in the configuration")]
    UnknownModule(String),
    /// A name in the bundle is not a plain file name.
    #[error("refused: {0:?} is not a plain file name")]
    BadName(String),
    /// Over [`MAX_BUNDLE`] or [`MAX_SCRIPT`].
    #[error("refused: {0}")]
    TooLarge(String),
    /// The configuration it would make is invalid.
    #[error("{0}")]
    Invalid(String),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BundleError + use<> {
    let path = path.to_path_buf();
    move |source| BundleError::Io { op, path, source }
}

/// A script of a module's `bin/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptFile {
    /// Permission bits.
    pub mode: u32,
    /// Content.
    pub content: Vec<u8>,
}

/// One module directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleFiles {
    /// `module.toml`.
    pub module_toml: String,
    /// `bin/<name>`.
    pub scripts: BTreeMap<String, ScriptFile>,
}

/// What `config apply` sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// `cluster.toml`.
    pub cluster_toml: String,
    /// Module directories, by name (every module, or the one of `-m`).
    pub modules: BTreeMap<String, ModuleFiles>,
}

/// A plain file name: not empty, no `/`, not `.` or `..`, no NUL.
fn plain(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

fn read_module(dir: &Path) -> Result<ModuleFiles, BundleError> {
    let file = dir.join(MODULE_FILE);
    let module_toml = fs::read_to_string(&file).map_err(io_err("read", &file))?;
    let mut scripts = BTreeMap::new();
    let bin = dir.join(BIN_DIR);
    match fs::read_dir(&bin) {
        Ok(entries) => {
            for e in entries {
                let e = e.map_err(io_err("list", &bin))?;
                let path = e.path();
                let meta = fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
                if !meta.is_file() {
                    continue;
                }
                let name = e.file_name().to_string_lossy().into_owned();
                if meta.len() > MAX_SCRIPT as u64 {
                    return Err(BundleError::TooLarge(format!(
                        "{} is over {MAX_SCRIPT} bytes",
                        path.display()
                    )));
                }
                let content = fs::read(&path).map_err(io_err("read", &path))?;
                scripts.insert(
                    name,
                    ScriptFile {
                        mode: meta.permissions().mode() & 0o7777,
                        content,
                    },
                );
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("list", &bin)(e)),
    }
    Ok(ModuleFiles {
        module_toml,
        scripts,
    })
}

/// Module directory names of `etc`.
fn module_names(etc: &Path) -> Result<Vec<String>, BundleError> {
    let dir = etc.join(MODULES_DIR);
    let mut names = Vec::new();
    match fs::read_dir(&dir) {
        Ok(entries) => {
            for e in entries {
                let e = e.map_err(io_err("list", &dir))?;
                if e.path().join(MODULE_FILE).is_file() {
                    names.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("list", &dir)(e)),
    }
    names.sort();
    Ok(names)
}

impl Bundle {
    /// Reads the bundle of config dir `etc`: `cluster.toml` and every module
    /// (or only `only`).
    pub fn read(etc: &Path, only: Option<&str>) -> Result<Self, BundleError> {
        let cluster_file = etc.join(CLUSTER_FILE);
        let cluster_toml =
            fs::read_to_string(&cluster_file).map_err(io_err("read", &cluster_file))?;
        let names = module_names(etc)?;
        let names: Vec<String> = match only {
            Some(m) if names.iter().any(|n| n == m) => vec![m.to_owned()],
            Some(m) => return Err(BundleError::UnknownModule(m.to_owned())),
            None => names,
        };
        let mut modules = BTreeMap::new();
        for n in names {
            let files = read_module(&etc.join(MODULES_DIR).join(&n))?;
            modules.insert(n, files);
        }
        let b = Self {
            cluster_toml,
            modules,
        };
        b.sane()?;
        Ok(b)
    }

    /// Names plain, sizes bounded: checked before anything touches a disk.
    fn sane(&self) -> Result<(), BundleError> {
        let mut total = self.cluster_toml.len();
        for (name, m) in &self.modules {
            if !plain(name) {
                return Err(BundleError::BadName(name.clone()));
            }
            total += m.module_toml.len();
            for (s, f) in &m.scripts {
                if !plain(s) {
                    return Err(BundleError::BadName(format!("{name}/{BIN_DIR}/{s}")));
                }
                if f.content.len() > MAX_SCRIPT {
                    return Err(BundleError::TooLarge(format!(
                        "{name}/{BIN_DIR}/{s} is over {MAX_SCRIPT} bytes"
                    )));
                }
                total += f.content.len();
            }
        }
        if total > MAX_BUNDLE {
            return Err(BundleError::TooLarge(format!(
                "the configuration is over {MAX_BUNDLE} bytes"
            )));
        }
        Ok(())
    }

    /// Every file of the bundle: path relative to the config dir, content,
    /// mode.
    fn files(&self) -> Vec<(PathBuf, &[u8], u32)> {
        let mut out = vec![(
            PathBuf::from(CLUSTER_FILE),
            self.cluster_toml.as_bytes(),
            0o644,
        )];
        for (name, m) in &self.modules {
            let dir = Path::new(MODULES_DIR).join(name);
            out.push((dir.join(MODULE_FILE), m.module_toml.as_bytes(), 0o644));
            for (s, f) in &m.scripts {
                out.push((dir.join(BIN_DIR).join(s), &f.content, f.mode));
            }
        }
        out
    }

    /// The configuration `etc` would have with this bundle, checked as a
    /// whole ([`super::load`] on a scratch copy next to `etc`: the key file
    /// and the modules the bundle does not carry are taken from `etc`).
    /// Errors name the files of `etc`.
    pub fn check(&self, etc: &Path) -> Result<Config, BundleError> {
        self.sane()?;
        let stage = scratch_dir(etc);
        let _ = fs::remove_dir_all(&stage);
        let r = self.stage(etc, &stage).and_then(|()| {
            super::load(&stage).map_err(|e| BundleError::Invalid(rename_errors(&e, &stage, etc)))
        });
        let _ = fs::remove_dir_all(&stage);
        r
    }

    fn stage(&self, etc: &Path, stage: &Path) -> Result<(), BundleError> {
        fs::create_dir_all(stage.join(MODULES_DIR)).map_err(io_err("create", stage))?;
        // Everything at the top of etc but cluster.toml and the modules: the
        // key file, users, certificates (linked, never copied).
        if let Ok(entries) = fs::read_dir(etc) {
            for e in entries.flatten() {
                let name = e.file_name();
                if name == CLUSTER_FILE || name == MODULES_DIR {
                    continue;
                }
                let to = stage.join(&name);
                std::os::unix::fs::symlink(e.path(), &to).map_err(io_err("link", &to))?;
            }
        }
        // Modules the bundle does not carry, as they are.
        for name in module_names(etc)? {
            if !self.modules.contains_key(&name) {
                let to = stage.join(MODULES_DIR).join(&name);
                std::os::unix::fs::symlink(etc.join(MODULES_DIR).join(&name), &to)
                    .map_err(io_err("link", &to))?;
            }
        }
        for (rel, content, mode) in self.files() {
            let path = stage.join(&rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(io_err("create", parent))?;
            }
            fs::write(&path, content).map_err(io_err("write", &path))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod", &path))?;
        }
        Ok(())
    }

    /// Whether every file of the bundle is already in `etc` as it is.
    #[must_use]
    pub fn installed_in(&self, etc: &Path) -> bool {
        self.files().iter().all(|(rel, content, mode)| {
            let path = etc.join(rel);
            fs::read(&path).is_ok_and(|c| c == *content)
                && fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o7777 == *mode)
        })
    }

    /// Writes the bundle into `etc`, each file atomically. The
    /// configuration it replaces is kept in `previous` first (whole:
    /// `cluster.toml` and every module directory): the one the daemon runs,
    /// recorded in `applied` by [`snapshot`] — on the node where the
    /// operator edited the files, they hold the new version already — or
    /// else the files of `etc`. Scripts the bundle's modules no longer
    /// carry are removed. Returns false (and writes nothing) when the daemon
    /// runs this configuration already.
    pub fn install(
        &self,
        etc: &Path,
        previous: &Path,
        applied: &Path,
    ) -> Result<bool, BundleError> {
        self.sane()?;
        let in_etc = self.installed_in(etc) && !self.has_stale_scripts(etc);
        let running = Self::read(applied, None).ok();
        let runs_it = running
            .as_ref()
            .is_none_or(|_| self.installed_in(applied) && !self.has_stale_scripts(applied));
        if in_etc && runs_it {
            return Ok(false);
        }
        let current = match running {
            Some(r) => r,
            None => Self::read(etc, None)?,
        };
        let _ = fs::remove_dir_all(previous);
        current.write_into(previous)?;
        self.write_into(etc)?;
        for (name, m) in &self.modules {
            let bin = etc.join(MODULES_DIR).join(name).join(BIN_DIR);
            for stale in stale_scripts(&bin, m) {
                fs::remove_file(&stale).map_err(io_err("remove", &stale))?;
            }
        }
        Ok(true)
    }

    fn has_stale_scripts(&self, etc: &Path) -> bool {
        self.modules.iter().any(|(name, m)| {
            !stale_scripts(&etc.join(MODULES_DIR).join(name).join(BIN_DIR), m).is_empty()
        })
    }

    /// Writes every file under `dir`, atomically each.
    fn write_into(&self, dir: &Path) -> Result<(), BundleError> {
        for (rel, content, mode) in self.files() {
            write_atomic(&dir.join(rel), content, mode)?;
        }
        Ok(())
    }
}

/// Records the configuration of `etc` as the one the daemon runs, in
/// `applied` (replaced whole), for [`Bundle::install`].
pub fn snapshot(etc: &Path, applied: &Path) -> Result<(), BundleError> {
    let b = Bundle::read(etc, None)?;
    let _ = fs::remove_dir_all(applied);
    b.write_into(applied)
}

/// Files in `bin` that `m` does not carry.
fn stale_scripts(bin: &Path, m: &ModuleFiles) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(bin) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| !m.scripts.contains_key(&*e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect()
}

/// The scratch directory where a bundle is checked: beside `etc`.
fn scratch_dir(etc: &Path) -> PathBuf {
    let name = etc
        .file_name()
        .map_or_else(|| "safekit".into(), |n| n.to_string_lossy().into_owned());
    etc.with_file_name(format!(".{name}.check-{}", std::process::id()))
}

/// The errors of the staged copy, naming the files of `etc`.
fn rename_errors(e: &ConfigErrors, stage: &Path, etc: &Path) -> String {
    let mut renamed = e.clone();
    for err in &mut renamed.0 {
        if let Ok(rel) = err.file.strip_prefix(stage) {
            err.file = etc.join(rel);
        }
    }
    renamed.to_string()
}

/// Writes `content` to `path` atomically: a temporary file beside it,
/// fsync, rename over, fsync of the directory.
fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<(), BundleError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let tmp = path.with_file_name(format!(
        ".{}.new-{}",
        path.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        std::process::id()
    ));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(content).map_err(io_err("write", &tmp))?;
    // The mode exactly (not masked by the umask).
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))?;
    Ok(())
}

/// How old (or how far in the future) a sealed bundle may be.
pub const MAX_SKEW: Duration = Duration::from_secs(120);

/// The authentication of a bundle sent by `sender` at `time` (seconds since
/// the epoch) with `nonce`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    /// The sending node.
    pub sender: String,
    /// Seconds since the epoch.
    pub time: u64,
    /// Random, never reused.
    pub nonce: [u8; 16],
    /// Keyed BLAKE3 over the rest and the body.
    pub mac: [u8; 32],
}

fn mac(key: &[u8], sender: &str, time: u64, nonce: &[u8; 16], body: &[u8]) -> blake3::Hash {
    let k = blake3::derive_key("safekit 2026 config apply v1", key);
    let mut h = blake3::Hasher::new_keyed(&k);
    h.update(&(sender.len() as u64).to_le_bytes());
    h.update(sender.as_bytes());
    h.update(&time.to_le_bytes());
    h.update(nonce);
    h.update(body);
    h.finalize()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Seals `body` for the other nodes.
#[must_use]
pub fn seal(key: &[u8], sender: &str, body: &[u8]) -> Seal {
    let mut nonce = [0u8; 16];
    // No randomness at all would make every seal of a second equal: the
    // time and the process id still differ then.
    if getrandom::fill(&mut nonce).is_err() {
        nonce[..8].copy_from_slice(&now_secs().to_le_bytes());
        nonce[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    let time = now_secs();
    Seal {
        sender: sender.to_owned(),
        time,
        nonce,
        mac: *mac(key, sender, time, &nonce, body).as_bytes(),
    }
}

/// Why a sealed bundle is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The MAC does not match: not sealed with this cluster's key, or
    /// altered.
    #[error("not authenticated with the cluster key")]
    BadMac,
    /// Too old or from the future.
    #[error("sealed {0} s away from this node's clock (at most {max} s)", max = MAX_SKEW.as_secs())]
    Skew(i64),
    /// Seen already.
    #[error("replayed")]
    Replayed,
}

/// Checks `seal` over `body` (the MAC in constant time, then the clock);
/// `seen` holds recent nonces (the caller keeps it, bounded): a nonce seen
/// already is refused.
pub fn open(
    key: &[u8],
    seal: &Seal,
    body: &[u8],
    seen: &mut std::collections::VecDeque<[u8; 16]>,
) -> Result<(), SealError> {
    let want = mac(key, &seal.sender, seal.time, &seal.nonce, body);
    if want != blake3::Hash::from_bytes(seal.mac) {
        return Err(SealError::BadMac);
    }
    let now = now_secs();
    #[expect(clippy::cast_possible_wrap, reason = "seconds since 1970")]
    let skew = seal.time as i64 - now as i64;
    if skew.unsigned_abs() > MAX_SKEW.as_secs() {
        return Err(SealError::Skew(skew));
    }
    if seen.contains(&seal.nonce) {
        return Err(SealError::Replayed);
    }
    if seen.len() >= 1024 {
        seen.pop_front();
    }
    seen.push_back(seal.nonce);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("safekit-bundle-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn a_seal_opens_once_with_the_key_and_never_when_altered() {
        let key = [7u8; 32];
        let body = b"{\"cluster_toml\":\"\"}";
        let s = seal(&key, "node1", body);
        let mut seen = std::collections::VecDeque::new();
        assert_eq!(open(&key, &s, body, &mut seen), Ok(()));
        assert_eq!(open(&key, &s, body, &mut seen), Err(SealError::Replayed));
        let mut seen = std::collections::VecDeque::new();
        assert_eq!(
            open(&[8u8; 32], &s, body, &mut seen),
            Err(SealError::BadMac)
        );
        assert_eq!(open(&key, &s, b"other", &mut seen), Err(SealError::BadMac));
        let mut other = s.clone();
        other.sender = "node2".into();
        assert_eq!(open(&key, &other, body, &mut seen), Err(SealError::BadMac));
        let mut old = seal(&key, "node1", body);
        old.time -= 600;
        old.mac = *mac(&key, "node1", old.time, &old.nonce, body).as_bytes();
        assert!(matches!(
            open(&key, &old, body, &mut seen),
            Err(SealError::Skew(_))
        ));
    }

    #[test]
    fn names_must_be_plain_and_sizes_bounded() {
        let mut b = Bundle {
            cluster_toml: String::new(),
            modules: BTreeMap::new(),
        };
        b.modules.insert(
            "../evil".into(),
            ModuleFiles {
                module_toml: String::new(),
                scripts: BTreeMap::new(),
            },
        );
        assert!(matches!(b.sane(), Err(BundleError::BadName(_))));
        b.modules.clear();
        let mut scripts = BTreeMap::new();
        scripts.insert(
            "big".into(),
            ScriptFile {
                mode: 0o755,
                content: vec![0; MAX_SCRIPT + 1],
            },
        );
        b.modules.insert(
            "web".into(),
            ModuleFiles {
                module_toml: String::new(),
                scripts,
            },
        );
        assert!(matches!(b.sane(), Err(BundleError::TooLarge(_))));
    }

    #[test]
    fn install_keeps_the_previous_version_and_writes_only_changes() {
        let etc = tmp("etc");
        let prev = tmp("prev");
        let applied = tmp("applied").join("none");
        fs::write(etc.join(CLUSTER_FILE), "old cluster\n").expect("write");
        let bin = etc.join(MODULES_DIR).join("web").join(BIN_DIR);
        fs::create_dir_all(&bin).expect("mkdir");
        fs::write(
            etc.join(MODULES_DIR).join("web").join(MODULE_FILE),
            "old module\n",
        )
        .expect("write");
        fs::write(bin.join("start_prim"), "#!/bin/sh\necho old\n").expect("write");
        fs::write(bin.join("gone"), "#!/bin/sh\n").expect("write");
        let mut b = Bundle::read(&etc, None).expect("read");
        assert!(b.installed_in(&etc));
        b.cluster_toml = "new cluster\n".into();
        let web = b.modules.get_mut("web").expect("web");
        web.scripts.remove("gone");
        web.scripts.get_mut("start_prim").expect("script").content =
            b"#!/bin/sh\necho new\n".to_vec();
        assert!(b.install(&etc, &prev, &applied).expect("install"));
        assert_eq!(
            fs::read_to_string(etc.join(CLUSTER_FILE)).expect("read"),
            "new cluster\n"
        );
        assert_eq!(
            fs::read_to_string(bin.join("start_prim")).expect("read"),
            "#!/bin/sh\necho new\n"
        );
        assert!(!bin.join("gone").exists());
        // The previous version, whole.
        let old = Bundle::read(&prev, None).expect("read previous");
        assert_eq!(old.cluster_toml, "old cluster\n");
        assert!(old.modules["web"].scripts.contains_key("gone"));
        // Applied again: nothing to do.
        assert!(!b.install(&etc, &prev, &applied).expect("install again"));
        // Edited in place and recorded as running: the recorded version is
        // the previous one.
        snapshot(&etc, &applied).expect("snapshot");
        b.cluster_toml = "edited in place\n".into();
        b.write_into(&etc).expect("edit");
        assert!(b.install(&etc, &prev, &applied).expect("install edited"));
        assert_eq!(
            Bundle::read(&prev, None)
                .expect("read previous")
                .cluster_toml,
            "new cluster\n"
        );
        let _ = fs::remove_dir_all(&etc);
        let _ = fs::remove_dir_all(&prev);
    }
}
