//! Module cgroups (cgroup v2): every script of a module — and so the
//! application its `start_prim` or `start_both` leaves running — is placed
//! in `<cgroup2>/safekit/<instance>/<module>` before it executes, so the
//! whole application can be killed at once (`cgroup.kill`) without the
//! daemon having known its pids: by the guard when safekitd dies, and by a
//! restarted safekitd before it acts.
//!
//! `<instance>` is made from the node root (`--root`), so several daemons on
//! one machine (one per network namespace in the lab) never share a cgroup.
//! The cgroup2 hierarchy is found in `/proc/self/mountinfo` (`/sys/fs/cgroup`
//! on a pure v2 system, `/sys/fs/cgroup/unified` in hybrid mode); when this
//! mount namespace has none (`ip netns exec` remounts `/sys`), the daemon
//! mounts it under its runtime directory: there is one hierarchy per
//! machine, whatever the mount point.

use std::{
    io::Write as _,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Errors of the module cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A file of the hierarchy could not be read, written or made.
    #[error("{op} {path}: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Processes were still there after the kill.
    #[error("{0}: processes still present after cgroup.kill")]
    Survivors(PathBuf),
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { op, path, source }
}

/// The cgroups of one node's modules.
#[derive(Debug, Clone)]
pub struct Cgroups {
    /// `<cgroup2>/safekit/<instance>`.
    base: PathBuf,
}

/// The mount point of the cgroup2 hierarchy in a `/proc/self/mountinfo`
/// text (mount points are octal-escaped there: `\040` for a space).
#[must_use]
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut f = left.split_whitespace();
        let root = f.nth(3)?;
        let point = f.next()?;
        // A bind of a sub-cgroup would not show the whole hierarchy.
        (root == "/").then(|| crate::rfs::mounts::unescape(point))
    })
}

/// The cgroup name of the daemon whose root is `root`: `host` for `/`,
/// otherwise the path with `/` as `-` (other unusual characters as `_`),
/// then a short hash of the exact path, so two roots never meet.
#[must_use]
pub fn instance_name(root: &Path) -> String {
    let text = root.to_string_lossy();
    let trimmed = text.trim_matches('/');
    if trimmed.is_empty() {
        return "host".to_owned();
    }
    let mut name: String = trimmed
        .chars()
        .map(|c| match c {
            '/' => '-',
            c if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' => c,
            _ => '_',
        })
        .collect();
    if name.len() > 96 {
        name = name.split_off(name.len() - 96);
    }
    let hash = blake3::hash(text.as_bytes());
    let b = hash.as_bytes();
    format!("{name}.{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

impl Cgroups {
    /// The module cgroups of the node whose root is `root`; mounts the
    /// cgroup2 hierarchy at `fallback` when this mount namespace has none.
    pub fn open(root: &Path, fallback: &Path) -> Result<Self, CgroupError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io("reading", Path::new("/proc/self/mountinfo")))?;
        let mount = if let Some(m) = cgroup2_mount(&mountinfo) {
            m
        } else {
            mount_cgroup2(fallback)?;
            fallback.to_path_buf()
        };
        let base = mount.join("safekit").join(instance_name(root));
        std::fs::create_dir_all(&base).map_err(io("creating", &base))?;
        Ok(Self { base })
    }

    /// The cgroups of a node, at a known place (tests, tools).
    #[must_use]
    pub fn at(base: PathBuf) -> Self {
        Self { base }
    }

    /// `<cgroup2>/safekit/<instance>`.
    #[must_use]
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The cgroup of `module`.
    #[must_use]
    pub fn module(&self, module: &str) -> PathBuf {
        self.base.join(module)
    }

    /// Kills every process of every module cgroup of this node and removes
    /// the emptied cgroups; returns (module, processes killed) for each
    /// cgroup that had any, and the errors met.
    #[must_use]
    pub fn kill_all(&self) -> (Vec<(String, usize)>, Vec<CgroupError>) {
        let mut killed = Vec::new();
        let mut errors = Vec::new();
        let Ok(dir) = std::fs::read_dir(&self.base) else {
            return (killed, errors);
        };
        for entry in dir.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            match kill(&entry.path()) {
                Ok(0) => {}
                Ok(n) => killed.push((name, n)),
                Err(e) => errors.push(e),
            }
            let _ = std::fs::remove_dir(entry.path());
        }
        (killed, errors)
    }

    /// Removes the module cgroups that no process uses (clean shutdown).
    pub fn remove_empty(&self) {
        if let Ok(dir) = std::fs::read_dir(&self.base) {
            for entry in dir.flatten() {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&self.base);
    }
}

/// The pids in cgroup `cg`.
fn procs(cg: &Path) -> Result<Vec<i32>, CgroupError> {
    let f = cg.join("cgroup.procs");
    Ok(std::fs::read_to_string(&f)
        .map_err(io("reading", &f))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// Kills every process of cgroup `cg` (`cgroup.kill`, Linux 5.14; SIGKILL
/// to each listed pid before that) and waits until it is empty; returns how
/// many there were.
pub fn kill(cg: &Path) -> Result<usize, CgroupError> {
    let before = procs(cg)?;
    if before.is_empty() {
        return Ok(0);
    }
    let k = cg.join("cgroup.kill");
    let native = std::fs::OpenOptions::new()
        .write(true)
        .open(&k)
        .and_then(|mut f| f.write_all(b"1"))
        .is_ok();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = procs(cg)?;
        if left.is_empty() {
            return Ok(before.len());
        }
        if Instant::now() >= deadline {
            return Err(CgroupError::Survivors(cg.to_path_buf()));
        }
        if !native {
            for pid in left {
                // SAFETY: kill(2) with a pid read from this cgroup; no memory.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Opens `cg/cgroup.procs` for writing (close-on-exec), creating the cgroup:
/// a child writes "0" there between fork and exec to enter it.
pub fn open_procs(cg: &Path) -> Result<OwnedFd, CgroupError> {
    std::fs::create_dir_all(cg).map_err(io("creating", cg))?;
    let f = cg.join("cgroup.procs");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .map_err(io("opening", &f))?;
    Ok(OwnedFd::from(file))
}

fn mount_cgroup2(at: &Path) -> Result<(), CgroupError> {
    use std::os::unix::ffi::OsStrExt as _;
    std::fs::create_dir_all(at).map_err(io("creating", at))?;
    let target =
        std::ffi::CString::new(at.as_os_str().as_bytes()).map_err(|_| CgroupError::Io {
            op: "mounting cgroup2 on",
            path: at.to_path_buf(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // Already mounted there by an earlier run in this namespace.
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(CgroupError::Io {
                op: "mounting cgroup2 on",
                path: at.to_path_buf(),
                source: e,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let v2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(v2), Some(PathBuf::from("/sys/fs/cgroup")));
        let spaced = "30 23 0:26 / /run/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(spaced), Some(PathBuf::from("/run/my cg")));
        let sub = "30 23 0:26 /sub /mnt rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(sub), None);
        assert_eq!(cgroup2_mount(""), None);
    }

    #[test]
    fn instance_names_never_collide() {
        assert_eq!(instance_name(Path::new("/")), "host");
        let a = instance_name(Path::new("/tmp/safekit-test-sklz1/node1"));
        assert!(a.starts_with("tmp-safekit-test-sklz1-node1."), "{a}");
        let b = instance_name(Path::new("/tmp/safekit-test-sklz1-node1"));
        assert_ne!(a, b, "same text once '/' is '-', different roots");
        let c = instance_name(Path::new("/tmp/x y/node1"));
        assert!(c.starts_with("tmp-x_y-node1."), "{c}");
        let long = format!("/{}", "d/".repeat(200));
        assert!(instance_name(Path::new(&long)).len() < 110);
    }
}
