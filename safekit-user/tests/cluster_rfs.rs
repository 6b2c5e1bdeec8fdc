//! Replication through the daemon (issue 4, SPEC §5 "Replication", §11): two
//! real `safekitd` in network namespaces run a mirror module with a
//! replicated directory `/srv/data`; node i's copy is the real directory
//! `<root i>/srv/data`. Each daemon runs in a mount namespace of its own
//! (`ip netns exec`), where that directory is a FUSE mount served by
//! safekitd on the primary and a read-only bind mount on the secondary: the
//! test acts as the application of node i through `Lab::node_view` (the
//! path under `/proc/<daemon pid>/root`), and checks each node's copy on
//! disk through the real directory (the test's own mount namespace).
//!
//! - replicated writes: what is done through the primary's mount (create,
//!   writes at offsets, truncate, rename over, mkdir/rmdir, symlink,
//!   chmod/chown, utimes, xattrs, `O_APPEND`, unlink) is in the secondary's
//!   copy, equal by content checksum and metadata; the secondary's copy
//!   refuses writes (EROFS);
//! - crash test: a writer appends numbered records with fsync through the
//!   current primary's mount and logs each acknowledged one outside the
//!   cluster; the primary's safekitd is `kill -9`ed at random points 20 times;
//!   every acknowledged record is on the node that takes over;
//! - reintegration: a returning node gets only what changed (resync bytes
//!   ≤ 1.1 × bytes changed + 1 MiB), trees equal by checksum;
//! - a stalled secondary (SIGSTOP) does not hang the application; after
//!   SIGCONT it resyncs to equal;
//! - a first sync cut by `kill -9` of the secondary's daemon resumes where it
//!   stopped (≤ 1.1 × the tree sent over both attempts);
//! - resync progress in `safekit state -v` and `/metrics`.

mod common;
mod faultfs;

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    fs::{self, File, OpenOptions},
    io::Write as _,
    net::SocketAddr,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::{Lab, LabModule, demo_scripts, http_get, serial, wait_for};
use safekit::{
    control::{self, Request, Response},
    status::{Colour, ModuleState, ModuleStatus},
};

const MODULE: &str = "web";
/// The replicated directory as the application sees it.
const DIR: &str = "/srv/data";
const MIB: usize = 1 << 20;
/// `rfs.send_timeout` of every test.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// `f_type` of a FUSE filesystem.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// The mirror module: pulse 100 ms / timeout 1 s, `/srv/data` replicated,
/// `rfs_extra` lines added to `[rfs]`; no preferred primary (so no automatic
/// swap back: whoever is primary stays so).
fn module(rfs_extra: &str) -> LabModule {
    LabModule {
        name: MODULE.into(),
        toml: format!(
            r#"[service]
mode = "mirror"
nodes = ["node1", "node2"]

[heart]
pulse = "100ms"
timeout = "1s"

[rfs]
send_timeout = "1s"
{rfs_extra}
[[rfs.dir]]
path = "{DIR}"
"#
        ),
        scripts: vec![
            (
                "start_prim".into(),
                "#!/bin/sh\necho \"start_prim on $SAFE_NODE\"\nexit 0\n".into(),
            ),
            (
                "stop_prim".into(),
                "#!/bin/sh\necho \"stop_prim on $SAFE_NODE\"\nexit 0\n".into(),
            ),
        ],
    }
}

/// Detaches every mount at or below `base` (FUSE mounts, live or dead, and
/// bind mounts, possibly stacked), deepest first, until none is left.
fn unmount_under(base: &Path) {
    for _ in 0..20 {
        let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let mut points: Vec<PathBuf> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| PathBuf::from(p.replace("\\040", " ")))
            .filter(|p| p.starts_with(base))
            .collect();
        if points.is_empty() {
            return;
        }
        points.sort();
        for p in points.iter().rev() {
            let _ = rustix::mount::unmount(p, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// A lab of two nodes running the module, torn down on drop: daemons
/// killed, mounts under the lab directory detached, then the directory
/// removed (the lab removes its namespaces and links).
struct Rig {
    lab: Lab,
    dir: PathBuf,
}

impl Rig {
    fn new(prefix: &str, subnet: u8, rfs_extra: &str) -> Self {
        Self::with_scripts(prefix, subnet, rfs_extra, Vec::new())
    }

    /// With these scripts instead of the echoing `start_prim`/`stop_prim`.
    fn with_scripts(
        prefix: &str,
        subnet: u8,
        rfs_extra: &str,
        scripts: Vec<(String, String)>,
    ) -> Self {
        let dir = PathBuf::from(format!("/tmp/safekit-test-{prefix}"));
        // Leftovers of a run that died: mounts first, or removing the
        // directory would walk into them.
        unmount_under(&dir);
        let mut m = module(rfs_extra);
        if !scripts.is_empty() {
            m.scripts = scripts;
        }
        let lab = common::lab(prefix, subnet, 2, vec![m]);
        Self { lab, dir }
    }

    /// Node `i`'s copy of the replicated directory on disk: the real
    /// directory, as the test's mount namespace sees it.
    fn disk(&self, i: usize) -> PathBuf {
        self.lab.root(i).join(DIR.trim_start_matches('/'))
    }

    /// The replicated directory as node `i`'s application sees it (in its
    /// daemon's mount namespace): the FUSE mount on a primary, the
    /// read-only bind mount on a secondary.
    fn view(&self, i: usize) -> PathBuf {
        self.lab
            .node_view(i, &self.disk(i))
            .unwrap_or_else(|| panic!("node{i}'s daemon is not running"))
    }

    fn start_daemon(&mut self, i: usize) {
        self.lab.start_daemon(i).expect("start safekitd");
    }

    fn cli(&self, i: usize, args: &[&str]) -> (bool, String) {
        let out = self.lab.safekit(i, args).expect("run safekit");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn module_cmd(&self, i: usize, cmd: &str) {
        let (ok, text) = self.cli(i, &[cmd, "-m", MODULE]);
        assert!(ok, "safekit {cmd} -m {MODULE} on node{i}: {text}");
    }

    /// Starts both daemons, then the module: a first start of a replicated
    /// module (neither copy known up to date), so as an operator does,
    /// `prim` on node1, the reference, then `start` on node2.
    fn start_both(&mut self) {
        self.start_daemon(1);
        self.start_daemon(2);
        self.module_cmd(1, "prim");
        self.module_cmd(2, "start");
    }

    fn status(&self, i: usize) -> Option<ModuleStatus> {
        module_status(&sock(&self.lab, i))
    }

    fn state(&self, i: usize) -> Option<ModuleState> {
        self.status(i).map(|m| m.state)
    }

    /// `prim` is PRIM and `sec` SECOND in sync (green).
    fn in_sync(&self, prim: usize, sec: usize) -> bool {
        self.state(prim) == Some(ModuleState::Prim)
            && self.status(sec).is_some_and(|m| {
                m.state == ModuleState::Second
                    && m.colour == Colour::Green
                    && !m.rfs.is_empty()
                    && m.rfs.iter().all(|d| d.link == "in sync")
            })
    }

    /// Waits for `prim` PRIM and `sec` SECOND in sync; panics with both
    /// nodes' states and logs after `limit`. Returns the time it took.
    fn wait_in_sync(&self, prim: usize, sec: usize, limit: Duration, what: &str) -> Duration {
        wait_for(limit, || self.in_sync(prim, sec)).unwrap_or_else(|| {
            panic!(
                "{what}: node{prim} not PRIM with node{sec} SECOND in sync within {limit:?}\n{}",
                self.diagnose()
            )
        })
    }

    fn wait_state(&self, i: usize, want: ModuleState, limit: Duration, what: &str) -> Duration {
        wait_for(limit, || self.state(i) == Some(want)).unwrap_or_else(|| {
            panic!(
                "{what}: node{i} not {want} within {limit:?}\n{}",
                self.diagnose()
            )
        })
    }

    /// Both nodes' `state -v`, the end of their daemon output and module log.
    /// Waits until node `i` serves the replicated directory (its FUSE mount
    /// is up: what the application there would see from then on).
    fn wait_serving(&self, i: usize, limit: Duration, round: usize) {
        assert!(
            wait_for(limit, || is_fuse(&self.view(i))).is_some(),
            "round {round}: node{i} ALONE but not serving its copy within {limit:?}\n{}",
            self.diagnose()
        );
    }

    fn diagnose(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for i in 1..=2 {
            let state = if self.lab.daemon_pid(i).is_some() {
                self.cli(i, &["state", "-m", MODULE, "-v"]).1
            } else {
                "(daemon not running)".into()
            };
            let daemon =
                fs::read_to_string(self.lab.root(i).join("safekitd.out")).unwrap_or_default();
            let log = if self.lab.daemon_pid(i).is_some() {
                self.cli(i, &["log", "-m", MODULE, "-n", "40"]).1
            } else {
                String::new()
            };
            let _ = write!(
                out,
                "--- node{i} state -v:\n{state}\n--- node{i} safekitd.out (end):\n{}\n--- node{i} module log (end):\n{log}\n",
                tail(&daemon, 40)
            );
        }
        out
    }

    /// `/metrics` of node `i`, fetched from the client namespace.
    fn metrics(&self, i: usize) -> String {
        let addr = SocketAddr::from((self.lab.spec().node_addr(i), 9010));
        http_get(&self.lab.spec().client_ns(), addr, "/metrics").1
    }

    /// A metric of this module's replicated directory on node `i`.
    fn rfs_metric(&self, i: usize, name: &str, extra: &[(&str, &str)]) -> Option<f64> {
        let mut labels = vec![("module", MODULE), ("dir", DIR)];
        labels.extend_from_slice(extra);
        metric(&self.metrics(i), name, &labels)
    }

    /// `safekit_rfs_resync_sent_bytes_total` of node `i` (panics when absent).
    fn resync_sent(&self, i: usize) -> u64 {
        let v = self
            .rfs_metric(i, "safekit_rfs_resync_sent_bytes_total", &[])
            .unwrap_or_else(|| {
                panic!(
                    "node{i}: no safekit_rfs_resync_sent_bytes_total{{module=\"{MODULE}\",dir=\"{DIR}\"}} in /metrics:\n{}",
                    self.metrics(i)
                )
            });
        as_u64(v)
    }

    /// Node `i`'s safekitd pid, for signals.
    fn pid(&self, i: usize) -> i32 {
        i32::try_from(self.lab.daemon_pid(i).expect("daemon running")).expect("pid")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // SIGKILL also ends a stopped (SIGSTOPped) daemon.
        for i in 1..=2 {
            self.lab.kill_daemon(i);
        }
        unmount_under(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "counters exported as floats, well below 2^53"
)]
fn as_u64(v: f64) -> u64 {
    v as u64
}

#[expect(clippy::cast_precision_loss, reason = "a ratio for display")]
fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b as f64
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn sock(lab: &Lab, i: usize) -> PathBuf {
    lab.root(i).join("run/safekit/safekitd.sock")
}

/// The module's status through node's control socket; `None` when the
/// daemon does not answer (dead, stopped) within a second.
fn module_status(sock: &Path) -> Option<ModuleStatus> {
    match control::call(sock, &Request::State, Duration::from_secs(1)) {
        Ok(Response::State { status }) => status.module(MODULE).cloned(),
        _ => None,
    }
}

/// The value of sample `name{labels...}` in a Prometheus text body, labels
/// in any order (the sample may carry more labels than asked for).
fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines().find_map(|line| {
        let (head, value) = line.rsplit_once(' ')?;
        let (n, rest) = head.split_once('{').unwrap_or((head, "}"));
        if n != name {
            return None;
        }
        let inner = rest.strip_suffix('}')?;
        let have: Vec<(&str, &str)> = inner
            .split(',')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.trim(), v.trim().trim_matches('"')))
            })
            .collect();
        labels
            .iter()
            .all(|l| have.contains(l))
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// True when `p` is on a FUSE filesystem.
fn is_fuse(p: &Path) -> bool {
    rustix::fs::statfs(p).is_ok_and(|s| s.f_type == FUSE_SUPER_MAGIC)
}

/// Extended attributes of `p`, `security.*` aside.
fn xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 65536];
    let Ok(n) = rustix::fs::llistxattr(p, &mut buf[..]) else {
        return out;
    };
    for name in buf[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(b"security.") {
            continue;
        }
        let mut v = vec![0u8; 65536];
        if let Ok(m) = rustix::fs::lgetxattr(p, OsStr::from_bytes(name), &mut v[..]) {
            v.truncate(m);
            out.insert(name.to_vec(), v);
        }
    }
    out
}

/// What is compared of each entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    /// Regular files only.
    mtime: Option<(i64, i64)>,
    /// BLAKE3 of a file's content, or a symlink's target.
    content: String,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Every entry under `root` (not `root` itself), by relative path; with
/// files' mtimes when `times`.
fn digest(root: &Path, times: bool) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries =
            fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
        for entry in entries {
            let rel = rel.join(entry.expect("dir entry").file_name());
            let p = root.join(&rel);
            let md =
                fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
            let ft = md.file_type();
            let (kind, content) = if ft.is_dir() {
                stack.push(rel.clone());
                ("dir", String::new())
            } else if ft.is_symlink() {
                (
                    "symlink",
                    fs::read_link(&p).expect("readlink").display().to_string(),
                )
            } else if ft.is_file() {
                let mut hasher = blake3::Hasher::new();
                let mut file =
                    File::open(&p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
                std::io::copy(&mut file, &mut hasher)
                    .unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                ("file", hasher.finalize().to_hex().to_string())
            } else {
                ("other", String::new())
            };
            out.insert(
                rel,
                Entry {
                    kind,
                    mode: if ft.is_symlink() {
                        0
                    } else {
                        md.mode() & 0o7777
                    },
                    uid: md.uid(),
                    gid: md.gid(),
                    size: if ft.is_dir() { 0 } else { md.len() },
                    mtime: (times && ft.is_file()).then(|| (md.mtime(), md.mtime_nsec())),
                    content,
                    xattrs: xattrs(&p),
                },
            );
        }
    }
    out
}

/// The differences between two digests, for a failure message.
fn differences(a: &BTreeMap<PathBuf, Entry>, b: &BTreeMap<PathBuf, Entry>) -> String {
    let mut out = Vec::new();
    for (p, e) in a {
        match b.get(p) {
            None => out.push(format!("{}: only on the first ({e:?})", p.display())),
            Some(f) if f != e => {
                out.push(format!("{}: first {e:?}\n    second {f:?}", p.display()));
            }
            Some(_) => {}
        }
    }
    for p in b.keys().filter(|p| !a.contains_key(*p)) {
        out.push(format!("{}: only on the second ({:?})", p.display(), b[p]));
    }
    let n = out.len();
    out.truncate(20);
    format!("{n} differences:\n  {}", out.join("\n  "))
}

/// Waits (bounded) until both nodes' copies on disk are equal, times
/// included; panics with the differences. Returns the digest.
fn wait_equal(rig: &Rig, limit: Duration, what: &str) -> BTreeMap<PathBuf, Entry> {
    let start = Instant::now();
    loop {
        let (a, b) = (digest(&rig.disk(1), true), digest(&rig.disk(2), true));
        if a == b {
            return a;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: copies differ after {limit:?}: {}\n{}",
            differences(&a, &b),
            rig.diagnose()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `n` pseudo-random (incompressible) bytes from `seed`.
fn noise(seed: &str, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut v);
    v
}

fn errno(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// The operations of the replicated-writes test, through `d1`: create,
/// writes at offsets, truncate, rename over, mkdir/rmdir, unlink, symlinks,
/// chmod/chown, utimes, xattrs, `O_APPEND`.
fn operations(d1: &Path) {
    // Create, writes at offsets (with a hole), truncate up and down.
    let f = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(d1.join("a.bin"))
        .expect("create a.bin");
    f.write_all_at(b"hello", 0).unwrap();
    f.write_all_at(&noise("a", 64 * 1024), 10_000).unwrap();
    f.write_all_at(b"tail", 3 * MIB as u64).unwrap();
    f.write_all_at(b"XY", 2).unwrap();
    f.sync_all().unwrap();
    f.set_len(5 * MIB as u64).unwrap();
    f.set_len(100_000).unwrap();
    drop(f);
    // Rename over an existing file.
    fs::write(d1.join("b.txt"), b"old content").unwrap();
    fs::write(d1.join("c.txt"), b"new content").unwrap();
    fs::rename(d1.join("c.txt"), d1.join("b.txt")).unwrap();
    // mkdir (nested), rmdir, a file in a subdirectory, unlink.
    fs::create_dir_all(d1.join("d1/d2")).unwrap();
    fs::write(d1.join("d1/d2/f"), noise("f", 200_000)).unwrap();
    fs::create_dir(d1.join("gone")).unwrap();
    fs::remove_dir(d1.join("gone")).unwrap();
    fs::write(d1.join("unlinked"), b"x").unwrap();
    fs::remove_file(d1.join("unlinked")).unwrap();
    // Symlinks, one dangling.
    std::os::unix::fs::symlink("a.bin", d1.join("link1")).unwrap();
    std::os::unix::fs::symlink("nowhere/x", d1.join("d1/link2")).unwrap();
    // chmod, chown, utimes.
    fs::set_permissions(d1.join("a.bin"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(d1.join("d1"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(d1.join("b.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(d1.join("b.txt"), Some(1234), Some(5678)).unwrap();
    let t = SystemTime::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    File::options()
        .write(true)
        .open(d1.join("b.txt"))
        .unwrap()
        .set_times(fs::FileTimes::new().set_accessed(t).set_modified(t))
        .unwrap();
    // xattrs: set, replace, remove, on a file and a directory.
    let flags = rustix::fs::XattrFlags::empty();
    rustix::fs::setxattr(d1.join("a.bin"), "user.one", b"1", flags).unwrap();
    rustix::fs::setxattr(d1.join("a.bin"), "user.two", &[7u8; 3000], flags).unwrap();
    rustix::fs::setxattr(
        d1.join("a.bin"),
        "user.one",
        b"replaced",
        rustix::fs::XattrFlags::REPLACE,
    )
    .unwrap();
    rustix::fs::removexattr(d1.join("a.bin"), "user.two").unwrap();
    rustix::fs::setxattr(d1.join("d1"), "user.dir", b"d", flags).unwrap();
    // O_APPEND.
    for line in ["first\n", "second\n"] {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(d1.join("log.txt"))
            .unwrap();
        f.write_all(line.as_bytes()).unwrap();
    }
}

#[test]
fn writes_through_the_primary_are_in_the_secondary_and_it_is_read_only() {
    let _serial = serial();
    let mut rig = Rig::new("skrf1", 61, "");
    rig.start_both();
    rig.wait_in_sync(1, 2, Duration::from_secs(20), "start");
    let (d1, d2) = (rig.view(1), rig.view(2));
    assert!(
        is_fuse(&d1),
        "node1's {} (PRIM) is not a FUSE mount\n{}",
        d1.display(),
        rig.diagnose()
    );

    operations(&d1);

    // Both copies on disk equal, times included; and what the application
    // sees through the mount is what is on disk.
    let tree = wait_equal(&rig, Duration::from_secs(10), "after the operations");
    let seen = digest(&d1, false);
    let on_disk = digest(&rig.disk(1), false);
    assert!(
        seen == on_disk,
        "node1's mount differs from its disk: {}",
        differences(&seen, &on_disk)
    );
    // The operations did what they should (not just the same on both sides).
    let a = &tree[Path::new("a.bin")];
    assert_eq!((a.kind, a.size, a.mode), ("file", 100_000, 0o640));
    assert_eq!(
        a.xattrs,
        BTreeMap::from([(b"user.one".to_vec(), b"replaced".to_vec())])
    );
    assert_eq!(fs::read(d2.join("b.txt")).unwrap(), b"new content");
    let b = &tree[Path::new("b.txt")];
    assert_eq!((b.uid, b.gid, b.mode), (1234, 5678, 0o600));
    assert_eq!(b.mtime, Some((1_000_000_000, 123_456_789)));
    assert_eq!(fs::read(d2.join("log.txt")).unwrap(), b"first\nsecond\n");
    assert_eq!(
        fs::read_link(d2.join("d1/link2")).unwrap(),
        Path::new("nowhere/x")
    );
    for gone in ["c.txt", "gone", "unlinked"] {
        assert!(!tree.contains_key(Path::new(gone)), "{gone} still there");
    }
    println!("{} entries equal on both nodes", tree.len());

    // The secondary's copy refuses writes (its application's view).
    let erofs = Some(libc::EROFS);
    assert_eq!(
        errno(File::create(d2.join("new"))),
        erofs,
        "create on node2"
    );
    assert_eq!(
        errno(OpenOptions::new().append(true).open(d2.join("log.txt"))),
        erofs,
        "open for writing on node2"
    );
    assert_eq!(errno(fs::create_dir(d2.join("newdir"))), erofs, "mkdir");
    assert_eq!(errno(fs::remove_file(d2.join("b.txt"))), erofs, "unlink");
    assert_eq!(fs::read(d2.join("log.txt")).unwrap(), b"first\nsecond\n");
}

// ---- crash test ----

/// Bytes of one record.
const RECORD: usize = 64;

/// Record `n`: `R:<n, 12 digits>:<check, 8 hex>:` padded with `.`, then a
/// newline. The check is derived from `n`, so a torn or corrupt record is
/// not mistaken for a good one.
fn record(n: u64) -> Vec<u8> {
    let mut r = format!("R:{n:012}:{:08x}:", check(n)).into_bytes();
    r.resize(RECORD - 1, b'.');
    r.push(b'\n');
    r
}

fn check(n: u64) -> u32 {
    let h = blake3::hash(&n.to_le_bytes());
    u32::from_le_bytes(h.as_bytes()[..4].try_into().unwrap())
}

/// Record numbers found in `data`, wherever they start (a torn record does
/// not hide the next ones); and the count of `R:` that are not a valid
/// record.
fn parse_records(data: &[u8]) -> (BTreeSet<u64>, usize) {
    let mut found = BTreeSet::new();
    let mut bad = 0;
    let mut i = 0;
    while i + 2 <= data.len() {
        if &data[i..i + 2] != b"R:" {
            i += 1;
            continue;
        }
        let rec = data.get(i..i + RECORD);
        let n = rec.and_then(|r| {
            let n: u64 = std::str::from_utf8(&r[2..14]).ok()?.parse().ok()?;
            let c = u32::from_str_radix(std::str::from_utf8(&r[15..23]).ok()?, 16).ok()?;
            (r[14] == b':' && r[23] == b':' && c == check(n) && r[RECORD - 1] == b'\n').then_some(n)
        });
        if let Some(n) = n {
            found.insert(n);
            i += RECORD;
        } else {
            bad += 1;
            i += 2;
        }
    }
    (found, bad)
}

/// Each node's application view of the replicated directory (`None` while
/// its daemon is down), kept current by the test for the writer.
type Views = Arc<Mutex<Vec<Option<PathBuf>>>>;

/// How a record writer makes each record durable.
#[derive(Debug, Clone, Copy)]
enum Durable {
    /// `write` then `fsync`.
    Fsync,
    /// A `write` on a file opened `O_DSYNC`.
    Dsync,
}

/// The primary's application view of the replicated directory, if a node
/// is PRIM or ALONE and its view is known.
fn primary_view(socks: &[PathBuf], views: &Views) -> Option<(usize, PathBuf)> {
    let primary = (0..2).find(|&k| {
        module_status(&socks[k])
            .is_some_and(|m| matches!(m.state, ModuleState::Prim | ModuleState::Alone))
    })?;
    let path = views.lock().unwrap()[primary].clone()?;
    Some((primary, path))
}

/// The writer thread: what it was told is durable.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<u64>>>,
    handle: Option<std::thread::JoinHandle<BTreeMap<String, u64>>>,
}

impl Writer {
    /// Appends records through the primary's mount (found by polling the
    /// nodes' states) until stopped: open `O_APPEND`, write, fsync; each
    /// acknowledged number goes to `ack_log` (outside the cluster) and to
    /// `acked`. On an error (a dead mount's ENOTCONN/EIO, EROFS of a node
    /// that just became SECOND) it closes the file and finds the primary
    /// again. It writes only through a FUSE mount: never into a copy that
    /// is not replicated. Returns the errors it saw, by kind.
    fn start(rig: &Rig, views: &Views, file: &str, how: Durable, ack_log: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let socks: Vec<PathBuf> = (1..=2).map(|i| sock(&rig.lab, i)).collect();
        let views = views.clone();
        let file = file.to_owned();
        let (stop2, acked2) = (stop.clone(), acked.clone());
        let handle = std::thread::spawn(move || {
            let mut log = File::create(&ack_log).expect("ack log");
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut note = |what: String| *errors.entry(what).or_default() += 1;
            let mut next = 0u64;
            let mut target: Option<File> = None;
            while !stop2.load(Ordering::Relaxed) {
                let Some(f) = target.as_mut() else {
                    let Some((primary, path)) = primary_view(&socks, &views) else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let mut open = OpenOptions::new();
                    open.append(true);
                    if let Durable::Dsync = how {
                        open.custom_flags(libc::O_DSYNC);
                    }
                    match open.open(path.join(&file)) {
                        Ok(f)
                            if rustix::fs::fstatfs(&f)
                                .is_ok_and(|s| s.f_type == FUSE_SUPER_MAGIC) =>
                        {
                            target = Some(f);
                        }
                        Ok(f) => {
                            // A primary whose directory is writable but not
                            // (yet) its FUSE mount: never written to.
                            let fs_type = rustix::fs::fstatfs(&f).map_or(0, |s| s.f_type);
                            note(format!(
                                "open node{}: writable, not a FUSE mount (f_type {fs_type:#x})",
                                primary + 1
                            ));
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            note(format!("open: {e}"));
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    continue;
                };
                let written = f.write_all(&record(next));
                let durable = match how {
                    Durable::Fsync => written.and_then(|()| f.sync_all()),
                    Durable::Dsync => written,
                };
                match durable {
                    Ok(()) => {
                        writeln!(log, "{next}").expect("ack log write");
                        acked2.lock().unwrap().push(next);
                        next += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => {
                        note(format!("write/fsync: {e}"));
                        target = None;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            errors
        });
        Self {
            stop,
            acked,
            handle: Some(handle),
        }
    }

    fn acked(&self) -> Vec<u64> {
        self.acked.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn finish(mut self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().expect("writer thread")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A small xorshift generator, seeded from the clock (printed, to replay).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Acknowledged records missing from node `i`'s copy of `file`: (missing,
/// acked count, records found, bad records).
fn missing_on(rig: &Rig, i: usize, file: &str, acked: &[u64]) -> (Vec<u64>, usize, usize, usize) {
    // Acknowledgements first, then the file: whatever was acknowledged by
    // then must be in it.
    let acked = acked.to_vec();
    let data = fs::read(rig.disk(i).join(file)).unwrap_or_else(|e| {
        panic!(
            "read node{i}'s copy of {file} on disk: {e}\n{}",
            rig.diagnose()
        )
    });
    let (found, bad) = parse_records(&data);
    let missing: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|n| !found.contains(n))
        .collect();
    (missing, acked.len(), found.len(), bad)
}

#[test]
fn no_acknowledged_write_is_lost_across_20_primary_crashes() {
    crash_test("skpf1", 151, "");
}

#[test]
fn no_acknowledged_write_is_lost_across_20_primary_crashes_every_write() {
    crash_test("skpf2", 152, "durability = \"every_write\"\n");
}

/// The record files and how their writers make records durable.
const WRITERS: [(&str, Durable); 2] = [
    ("records.log", Durable::Fsync),
    ("dsync.log", Durable::Dsync),
];

/// Two writers (records made durable by fsync, and by `O_DSYNC` writes)
/// through the primary; 20 `kill -9` of the primary at random points; after
/// each, every record either writer was told is durable is on the node
/// that takes over.
#[expect(clippy::too_many_lines, reason = "the crash test's rounds in order")]
fn crash_test(prefix: &str, subnet: u8, rfs_extra: &str) {
    const ROUNDS: usize = 20;
    let limit = Duration::from_secs(30);
    let _serial = serial();
    let mut rig = Rig::new(prefix, subnet, rfs_extra);
    rig.start_both();
    rig.wait_in_sync(1, 2, limit, "start");
    assert!(
        is_fuse(&rig.view(1)),
        "node1's copy (PRIM) is not a FUSE mount\n{}",
        rig.diagnose()
    );
    let views: Views = Arc::new(Mutex::new(vec![Some(rig.view(1)), Some(rig.view(2))]));
    let writers: Vec<(&str, Writer, PathBuf)> = WRITERS
        .iter()
        .map(|&(file, how)| {
            // The record file exists before the writer starts: it never
            // creates one (so it cannot create one outside a mount).
            File::create(rig.view(1).join(file)).expect("create the record file");
            let ack_log = rig.dir.join(format!("{file}.acked"));
            let w = Writer::start(&rig, &views, file, how, ack_log.clone());
            (file, w, ack_log)
        })
        .collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let seed = (now.as_secs() ^ (u64::from(now.subsec_nanos()) << 32)) | 1;
    println!(
        "crash test ({rfs_extra:?}): seed {seed}, acknowledged numbers in {}",
        rig.dir.display()
    );
    let mut rng = Rng(seed);
    let mut lost: BTreeSet<(&str, u64)> = BTreeSet::new();
    let mut primary = 1;
    for round in 1..=ROUNDS {
        let other = 3 - primary;
        // The writers are writing through this primary.
        for (file, w, _) in &writers {
            let before = w.count();
            assert!(
                wait_for(limit, || w.count() >= before + 20).is_some(),
                "round {round}: {file}'s writer acknowledged nothing through node{primary} for {limit:?}\n{}",
                rig.diagnose()
            );
        }
        let delay = Duration::from_millis(rng.below(1500));
        std::thread::sleep(delay);
        rig.lab.kill_daemon(primary);
        views.lock().unwrap()[primary - 1] = None;
        let took = rig.wait_state(
            other,
            ModuleState::Alone,
            limit,
            &format!("round {round}: after kill -9 of node{primary}"),
        );
        rig.wait_serving(other, limit, round);
        for (file, w, _) in &writers {
            let (missing, acked, found, bad) = missing_on(&rig, other, file, &w.acked());
            println!(
                "round {round}: killed node{primary} after {delay:?}; node{other} ALONE in {took:?}; \
                 {file}: {acked} acked, {found} records on node{other} ({bad} torn), {} missing",
                missing.len()
            );
            if !missing.is_empty() {
                println!(
                    "round {round}: MISSING from {file} on node{other}: {:?}",
                    &missing[..missing.len().min(50)]
                );
            }
            lost.extend(missing.into_iter().map(|n| (*file, n)));
        }
        // The killed node returns: SECOND, resync of what changed.
        rig.start_daemon(primary);
        views.lock().unwrap()[primary - 1] = Some(rig.view(primary));
        rig.module_cmd(primary, "start");
        let back = rig.wait_in_sync(
            other,
            primary,
            limit,
            &format!("round {round}: node{primary} rejoining"),
        );
        println!("round {round}: node{other} PRIM, node{primary} SECOND in sync after {back:?}");
        primary = other;
    }
    for (file, w, ack_log) in writers {
        let errors = w.finish();
        let acked = fs::read_to_string(&ack_log).expect("ack log");
        let acked: Vec<u64> = acked.lines().map(|l| l.parse().unwrap()).collect();
        let (missing, n, found, bad) = missing_on(&rig, primary, file, &acked);
        lost.extend(missing.into_iter().map(|n| (file, n)));
        println!("{file}: writer errors (expected while a primary is dead): {errors:?}");
        println!("{file}: final: {n} acked, {found} records on node{primary} ({bad} torn)");
        // Both copies equal once the writer stopped.
        let other = 3 - primary;
        let want = blake3::hash(&fs::read(rig.disk(primary).join(file)).unwrap());
        assert!(
            wait_for(Duration::from_secs(10), || fs::read(
                rig.disk(other).join(file)
            )
            .is_ok_and(|d| blake3::hash(&d) == want))
            .is_some(),
            "node{other}'s copy of {file} differs from the primary's\n{}",
            rig.diagnose()
        );
    }
    println!("acked lost: {} across {ROUNDS} failovers", lost.len());
    assert!(
        lost.is_empty(),
        "acknowledged records lost: {:?}",
        lost.iter().take(50).collect::<Vec<_>>()
    );
}

// ---- atomic replace across crashes ----

/// Target files the atomic-replace writer rewrites in turn.
const TARGETS: usize = 3;

/// Version `v` of target `t`: a header, a body whose length depends on the
/// version (up to 48 KiB, so a version spans several writes and pages),
/// and a BLAKE3 trailer over both: a torn or mixed file fails the check.
fn version_content(t: usize, v: u64) -> Vec<u8> {
    let mut data = format!("V:{t}:{v:012}:").into_bytes();
    let len = 1000 + usize::try_from(v * 7919 % 48_000).unwrap();
    data.extend(
        (0..len).map(|i| b'a' + u8::try_from((i + usize::try_from(v).unwrap()) % 26).unwrap()),
    );
    let sum = blake3::hash(&data);
    data.extend_from_slice(sum.as_bytes());
    data
}

/// The version a target's content holds, if it is one complete version.
fn parse_version(t: usize, data: &[u8]) -> Option<u64> {
    let (body, sum) = data.split_at_checked(data.len().checked_sub(32)?)?;
    if blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let head = format!("V:{t}:");
    let rest = body.strip_prefix(head.as_bytes())?;
    let v: u64 = std::str::from_utf8(rest.get(..12)?).ok()?.parse().ok()?;
    (version_content(t, v) == data).then_some(v)
}

/// The atomic-replace writer: what it was told is durable, per target.
struct Replacer {
    stop: Arc<AtomicBool>,
    durable: Arc<Mutex<[Option<u64>; TARGETS]>>,
    done: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<BTreeMap<String, u64>>>,
}

impl Replacer {
    /// Through the primary's mount, in a loop: an unsynced append to a
    /// scratch file, write `t<k>.tmp` (two writes), fsync it, an unsynced
    /// write to another scratch file, rename it over `t<k>`, fsync the
    /// directory: then version v of `t<k>` is durable. On an error it finds
    /// the primary again.
    fn start(rig: &Rig, views: &Views) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let durable = Arc::new(Mutex::new([None; TARGETS]));
        let done = Arc::new(AtomicU64::new(0));
        let socks: Vec<PathBuf> = (1..=2).map(|i| sock(&rig.lab, i)).collect();
        let views = views.clone();
        let (stop2, durable2, done2) = (stop.clone(), durable.clone(), done.clone());
        let handle = std::thread::spawn(move || {
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut v = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let Some((_, dir)) = primary_view(&socks, &views) else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                if !rustix::fs::statfs(&dir).is_ok_and(|s| s.f_type == FUSE_SUPER_MAGIC) {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                v += 1;
                let t = usize::try_from(v).unwrap() % TARGETS;
                let data = version_content(t, v);
                let tmp = dir.join(format!("t{t}.tmp"));
                let replace = || -> std::io::Result<()> {
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join("scratch-a"))?
                        .write_all(&noise(&format!("a{v}"), 3000))?;
                    let mut f = File::create(&tmp)?;
                    let half = data.len() / 2;
                    f.write_all(&data[..half])?;
                    f.write_all(&data[half..])?;
                    f.sync_all()?;
                    drop(f);
                    fs::write(dir.join("scratch-b"), noise(&format!("b{v}"), 5000))?;
                    fs::rename(&tmp, dir.join(format!("t{t}")))?;
                    File::open(&dir)?.sync_all()
                };
                match replace() {
                    Ok(()) => {
                        durable2.lock().unwrap()[t] = Some(v);
                        done2.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        *errors.entry(e.to_string()).or_default() += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            errors
        });
        Self {
            stop,
            durable,
            done,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().expect("replacer thread")
    }
}

impl Drop for Replacer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// On node `i`'s disk, per target: what is wrong (not one complete
/// version, or older than the version made durable), with what it holds.
fn replace_violations(rig: &Rig, i: usize, durable: &[Option<u64>; TARGETS]) -> Vec<String> {
    let mut wrong = Vec::new();
    for (t, want) in durable.iter().enumerate() {
        let data = fs::read(rig.disk(i).join(format!("t{t}"))).ok();
        let have = data.as_deref().map(|d| parse_version(t, d));
        match (want, have) {
            (_, Some(None)) => {
                wrong.push(format!("t{t}: not one complete version (mixed or torn)"));
            }
            (Some(w), None) => wrong.push(format!("t{t}: missing, version {w} was durable")),
            (Some(w), Some(Some(h))) if h < *w => {
                wrong.push(format!("t{t}: version {h}, older than durable {w}"));
            }
            _ => {}
        }
    }
    wrong
}

#[test]
fn atomic_replace_survives_20_primary_crashes() {
    const ROUNDS: usize = 20;
    let limit = Duration::from_secs(30);
    let _serial = serial();
    let mut rig = Rig::new("skpf3", 153, "");
    rig.start_both();
    rig.wait_in_sync(1, 2, limit, "start");
    let views: Views = Arc::new(Mutex::new(vec![Some(rig.view(1)), Some(rig.view(2))]));
    let w = Replacer::start(&rig, &views);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut rng = Rng((now.as_secs() ^ u64::from(now.subsec_nanos())) | 1);
    let mut violations = Vec::new();
    let mut primary = 1;
    for round in 1..=ROUNDS {
        let other = 3 - primary;
        let before = w.done.load(Ordering::Relaxed);
        assert!(
            wait_for(limit, || w.done.load(Ordering::Relaxed) >= before + 10).is_some(),
            "round {round}: no replace made durable through node{primary} for {limit:?}\n{}",
            rig.diagnose()
        );
        std::thread::sleep(Duration::from_millis(rng.below(800)));
        rig.lab.kill_daemon(primary);
        views.lock().unwrap()[primary - 1] = None;
        // What the writer was told before the kill (a later success would be
        // through a node that is not the survivor yet: none is primary).
        let durable = *w.durable.lock().unwrap();
        rig.wait_state(
            other,
            ModuleState::Alone,
            limit,
            &format!("round {round}: after kill -9 of node{primary}"),
        );
        rig.wait_serving(other, limit, round);
        let wrong = replace_violations(&rig, other, &durable);
        println!(
            "round {round}: node{other} took over; durable versions {durable:?}; {} violation(s)",
            wrong.len()
        );
        violations.extend(wrong.into_iter().map(|v| format!("round {round}: {v}")));
        rig.start_daemon(primary);
        views.lock().unwrap()[primary - 1] = Some(rig.view(primary));
        rig.module_cmd(primary, "start");
        rig.wait_in_sync(
            other,
            primary,
            limit,
            &format!("round {round}: node{primary} rejoining"),
        );
        primary = other;
    }
    let errors = w.finish();
    println!("replacer errors (expected while a primary is dead): {errors:?}");
    assert!(violations.is_empty(), "{violations:#?}");
}

// ---- reintegration ----

/// Writes `len` bytes of `data` at `off` in `path` (created if missing),
/// with fsync.
fn write_at(path: &Path, off: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all_at(data, off)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    f.sync_all().unwrap();
}

#[test]
fn a_returning_node_gets_only_what_changed() {
    // The issue's 1 GiB tree (about 10 s here); SAFEKIT_REINT_MB sets
    // another size.
    const FILE_MB: usize = 4;
    const CHANGES: usize = 50;
    const CHANGED: usize = 10 * MIB;
    let mb: usize = std::env::var("SAFEKIT_REINT_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let _serial = serial();
    let mut rig = Rig::new("skrf3", 63, "");
    // The tree is on node1 before anything starts: the first
    // resynchronisation sends it all.
    let files = mb / FILE_MB;
    let t = Instant::now();
    for k in 0..files {
        let p = rig.disk(1).join(format!("d{:02}/f{k:04}", k % 16));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, noise(&format!("tree {k}"), FILE_MB * MIB)).unwrap();
    }
    println!(
        "reintegration: tree of {files} files, {mb} MiB (SAFEKIT_REINT_MB, default 1024: the issue's 1 GiB), written in {:?}",
        t.elapsed()
    );
    rig.start_both();
    let full_limit = Duration::from_secs(60) + Duration::from_millis(250 * mb as u64);
    let took = rig.wait_in_sync(1, 2, full_limit, "first full sync");
    let first = rig.resync_sent(1);
    println!("first sync: {mb} MiB in {took:?}, node1 resync sent {first} bytes");
    let tree = wait_equal(&rig, Duration::from_secs(10), "after the first sync");
    assert_eq!(tree.values().filter(|e| e.kind == "file").count(), files);

    // node2 away; node1 ALONE; 10 MiB changed across 50 files through the
    // mount: in-place overwrites, appends, new files.
    rig.module_cmd(2, "stop");
    rig.wait_state(
        1,
        ModuleState::Alone,
        Duration::from_secs(10),
        "node2 stopped",
    );
    let sent_before = rig.resync_sent(1);
    let d1 = rig.view(1);
    assert!(is_fuse(&d1), "node1's copy (ALONE) is not a FUSE mount");
    fs::create_dir_all(d1.join("new")).unwrap();
    let mut changed = 0usize;
    for c in 0..CHANGES {
        // Sizes add up to exactly 10 MiB.
        let len = CHANGED / CHANGES + usize::from(c < CHANGED % CHANGES);
        let data = noise(&format!("change {c}"), len);
        let k = (c * 7) % files;
        let existing = d1.join(format!("d{:02}/f{k:04}", k % 16));
        match c % 5 {
            // Overwrite inside an existing file.
            0..=2 => write_at(
                &existing,
                ((c * 123_457) % (FILE_MB * MIB - len)) as u64,
                &data,
            ),
            // Append to an existing file.
            3 => write_at(&existing, (FILE_MB * MIB) as u64, &data),
            // A new file.
            _ => write_at(&d1.join(format!("new/n{c:02}")), 0, &data),
        }
        changed += len;
    }
    assert_eq!(changed, CHANGED);
    assert_eq!(rig.state(1), Some(ModuleState::Alone));

    rig.module_cmd(2, "start");
    let took = rig.wait_in_sync(1, 2, Duration::from_secs(60), "node2 back");
    let sent = rig.resync_sent(1) - sent_before;
    let allowed = changed + changed / 10 + MIB;
    println!("last resync on node1: {}", resync_figures(&rig, 1));
    println!(
        "reintegration: {changed} bytes changed across {CHANGES} files of a {mb} MiB tree; \
         resync sent {sent} bytes ({:.3} x changed; allowed {allowed}); in sync after {took:?}",
        ratio(sent, changed as u64)
    );
    assert!(
        sent <= allowed as u64,
        "the resync sent {sent} bytes for {changed} changed (allowed {allowed}); last resync on node1: {}\n{}",
        resync_figures(&rig, 1),
        rig.diagnose()
    );
    assert!(
        sent >= changed as u64,
        "the resync sent {sent} bytes, less than the {changed} changed: the counter does not count them"
    );
    let tree = wait_equal(&rig, Duration::from_secs(10), "after the reintegration");
    assert_eq!(
        tree.values().filter(|e| e.kind == "file").count(),
        files + CHANGES / 5
    );
}

/// The last resynchronisation's figures in node `i`'s `/metrics`.
fn resync_figures(rig: &Rig, i: usize) -> String {
    let body = rig.metrics(i);
    let labels = [("module", MODULE), ("dir", DIR)];
    let get = |n: &str| metric(&body, n, &labels).map_or_else(|| "?".into(), |v| v.to_string());
    format!(
        "bytes {}/{}, files {}/{}",
        get("safekit_rfs_resync_bytes_done"),
        get("safekit_rfs_resync_bytes_total"),
        get("safekit_rfs_resync_files_done"),
        get("safekit_rfs_resync_files_total")
    )
}

// ---- stalled secondary ----

/// After the stall: waits (bounded) for node1 PRIM / node2 SECOND in sync;
/// returns when and in which states both nodes were seen primary at once,
/// if they were.
fn wait_return(rig: &Rig) -> Option<(Duration, Option<ModuleState>, Option<ModuleState>)> {
    let start = Instant::now();
    let limit = Duration::from_secs(30);
    let mut both_primary = None;
    loop {
        let (s1, s2) = (rig.state(1), rig.state(2));
        let p = |s: Option<ModuleState>| matches!(s, Some(ModuleState::Prim | ModuleState::Alone));
        if p(s1) && p(s2) && both_primary.is_none() {
            both_primary = Some((start.elapsed(), s1, s2));
        }
        if rig.in_sync(1, 2) {
            break;
        }
        assert!(
            start.elapsed() < limit,
            "after SIGCONT: not PRIM/SECOND in sync within {limit:?} ({s1:?} {s2:?})\n{}",
            rig.diagnose()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "after SIGCONT: PRIM/SECOND in sync in {:?}",
        start.elapsed()
    );
    both_primary
}

#[test]
fn a_stalled_secondary_does_not_hang_the_application_and_resyncs_after() {
    let _serial = serial();
    // The application is the demo service (start_prim / stop_prim), so
    // that where it runs can be checked.
    let mut rig = Rig::with_scripts(
        "skrf4",
        64,
        "",
        demo_scripts("start_prim", "stop_prim", "0.0.0.0:7000"),
    );
    rig.start_both();
    rig.wait_in_sync(1, 2, Duration::from_secs(20), "start");
    let d1 = rig.view(1);
    assert!(is_fuse(&d1), "node1's copy (PRIM) is not a FUSE mount");
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(d1.join("app.log"))
        .unwrap();
    let write = |n: usize| {
        let t = Instant::now();
        (&f).write_all(&noise(&format!("app {n}"), 4096)).unwrap();
        f.sync_all().unwrap();
        t.elapsed()
    };
    for n in 0..10 {
        write(n);
    }
    let _ = wait_equal(&rig, Duration::from_secs(10), "before the stall");

    let pid2 = rig.pid(2);
    // SAFETY: kill(2) of node2's safekitd, a child of this test.
    assert_eq!(unsafe { libc::kill(pid2, libc::SIGSTOP) }, 0);
    let stalled = Instant::now();
    // The application keeps writing: no write waits past send_timeout and
    // a margin for a noisy machine.
    let margin = Duration::from_secs(4);
    let mut slowest = Duration::ZERO;
    let mut n = 10;
    while stalled.elapsed() < Duration::from_secs(3) || n < 30 {
        let took = write(n);
        slowest = slowest.max(took);
        assert!(
            took <= SEND_TIMEOUT + margin,
            "write {n} + fsync took {took:?} with node2 stalled (send_timeout {SEND_TIMEOUT:?})\n{}",
            rig.diagnose()
        );
        n += 1;
    }
    let alone = rig.wait_state(
        1,
        ModuleState::Alone,
        Duration::from_secs(5),
        "node2 stalled",
    );
    // More changes while node2 is stalled: a new file, a truncate.
    fs::write(d1.join("while-stalled.bin"), noise("stalled", 2 * MIB)).unwrap();
    OpenOptions::new()
        .write(true)
        .open(d1.join("app.log"))
        .unwrap()
        .set_len(50_000)
        .unwrap();
    let written = n;
    println!(
        "node2 stalled: {written} writes + fsync, slowest {slowest:?} (send_timeout {SEND_TIMEOUT:?}); node1 ALONE {alone:?} after the checks"
    );
    drop(f);

    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid2, libc::SIGCONT) }, 0);
    // Back to PRIM/SECOND. Both nodes primary at once is noted on the way,
    // asserted at the end (so one run tells everything).
    let both_primary = wait_return(&rig);
    let tree = wait_equal(&rig, Duration::from_secs(10), "after the stall");
    assert_eq!(tree[Path::new("app.log")].size, 50_000);
    assert_eq!(tree[Path::new("while-stalled.bin")].size, 2 * MIB as u64);
    // node2, SECOND again, serves its copy read-only (not a FUSE mount
    // left from a takeover).
    let d2 = rig.view(2);
    assert!(
        !is_fuse(&d2) && errno(File::create(d2.join("new"))) == Some(libc::EROFS),
        "node2 (SECOND) after the stall: its directory is {} and a create gives {:?}\n{}",
        if is_fuse(&d2) {
            "a FUSE mount"
        } else {
            "not a FUSE mount"
        },
        File::create(d2.join("new")).map(|_| ()),
        rig.diagnose()
    );
    // The application runs on node1 only.
    std::thread::sleep(Duration::from_millis(500));
    let demo = |i: usize| rig.lab.root(i).join("demo.pid").exists();
    assert!(
        demo(1) && !demo(2),
        "after the stall the application runs on node1: {}, on node2 (SECOND): {}\n{}",
        demo(1),
        demo(2),
        rig.diagnose()
    );
    // node2 was stalled, not its peer: it never took over (its module log
    // would show it; a poll can miss a short takeover).
    let (_, log2) = rig.cli(2, &["log", "-m", MODULE, "-n", "1000"]);
    let takeover: Vec<&str> = log2
        .lines()
        .filter(|l| l.contains("-> ALONE") || l.contains("-> PRIM") || l.contains("start_prim"))
        .collect();
    assert!(
        both_primary.is_none() && takeover.is_empty(),
        "the stalled secondary took over after SIGCONT while node1 was primary: \
         both primary seen {both_primary:?}; node2's log: {takeover:#?}\n{}",
        rig.diagnose()
    );
}

// ---- progress ----

/// True when `line` (the directory path taken out) shows at least two
/// "done/total" figures (bytes and files): a `/` followed by a digit.
fn shows_done_total(line: &str) -> bool {
    let rest = line.replace(DIR, "");
    let b = rest.as_bytes();
    (0..b.len())
        .filter(|&i| {
            b[i] == b'/'
                && b[i + 1..]
                    .iter()
                    .find(|c| **c != b' ')
                    .is_some_and(u8::is_ascii_digit)
        })
        .count()
        >= 2
}

/// Polls node1's `state -v` and `/metrics` during a resync until both
/// showed it: (the `state -v` line of the directory, resync bytes total,
/// bytes done). Panics if the resync ends first or after `limit`.
fn watch_progress(rig: &Rig, limit: Duration) -> (String, f64, f64) {
    let start = Instant::now();
    let mut state_line: Option<String> = None;
    let mut metrics_seen: Option<(f64, f64, f64)> = None;
    while state_line.is_none() || metrics_seen.is_none() {
        assert!(
            start.elapsed() < limit,
            "no resync progress seen within {limit:?} (state -v line: {state_line:?}, metrics: {metrics_seen:?})\n{}",
            rig.diagnose()
        );
        assert!(
            !rig.in_sync(1, 2),
            "the resync ended before its progress was seen (state -v line: {state_line:?}, metrics (link resyncing, bytes total, bytes done): {metrics_seen:?})\n{}",
            rig.diagnose()
        );
        if state_line.is_none() {
            let (_, text) = rig.cli(1, &["state", "-m", MODULE, "-v"]);
            // A running resync (not the last one's figures): with an ETA.
            if let Some(l) = text.lines().find(|l| {
                let l = l.to_lowercase();
                l.contains(DIR) && l.contains("resync") && l.contains("eta") && !l.contains("last ")
            }) {
                state_line = Some(l.trim().to_owned());
            }
        }
        if metrics_seen.is_none() {
            let body = rig.metrics(1);
            let labels = [("module", MODULE), ("dir", DIR)];
            let resyncing = metric(
                &body,
                "safekit_rfs_link",
                &[labels[0], labels[1], ("state", "resyncing")],
            );
            let total = metric(&body, "safekit_rfs_resync_bytes_total", &labels);
            let done = metric(&body, "safekit_rfs_resync_bytes_done", &labels);
            if resyncing == Some(1.0) && total.is_some_and(|t| t > 0.0) {
                metrics_seen = Some((1.0, total.unwrap_or(0.0), done.unwrap_or(-1.0)));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, total, done) = metrics_seen.unwrap();
    (state_line.unwrap(), total, done)
}

#[test]
fn resync_progress_is_visible_in_state_and_metrics() {
    const CHANGE_MB: usize = 60;
    let _serial = serial();
    let mut rig = Rig::new(
        "skrf5",
        65,
        "resync_bandwidth = \"20MiB/s\"\nresync_workers = 2",
    );
    rig.start_both();
    rig.wait_in_sync(1, 2, Duration::from_secs(20), "start");
    // In sync: the secondary's line says so, the primary's shows its link
    // up.
    let dir_line = |i: usize| {
        let (ok, text) = rig.cli(i, &["state", "-m", MODULE, "-v"]);
        assert!(ok, "{text}");
        let line = text.lines().find(|l| l.contains(DIR)).map(str::to_owned);
        (line.unwrap_or_default(), text)
    };
    let (line, text) = dir_line(2);
    assert!(
        line.contains("in sync"),
        "node2's state -v in sync shows no `{DIR} ... in sync` line:\n{text}"
    );
    let (line, text) = dir_line(1);
    assert!(
        line.contains("connected") || line.contains("in sync"),
        "node1's state -v in sync shows no `{DIR} ... connected` line:\n{text}"
    );
    assert_eq!(
        rig.rfs_metric(1, "safekit_rfs_link", &[("state", "connected")]),
        Some(1.0),
        "link connected in /metrics:\n{}",
        rig.metrics(1)
    );

    rig.module_cmd(2, "stop");
    rig.wait_state(
        1,
        ModuleState::Alone,
        Duration::from_secs(10),
        "node2 stopped",
    );
    let d1 = rig.view(1);
    for k in 0..CHANGE_MB / 4 {
        fs::write(
            d1.join(format!("big{k:02}")),
            noise(&format!("big {k}"), 4 * MIB),
        )
        .unwrap();
    }
    let (alone_line, text) = dir_line(1);
    assert!(
        alone_line.contains("alone"),
        "state -v while ALONE shows no `{DIR} ... alone` line:\n{text}"
    );

    rig.module_cmd(2, "start");
    let start = Instant::now();
    let (line, total, done) = watch_progress(&rig, Duration::from_secs(60));
    println!(
        "during the resync ({:?} in): state -v: {line:?}; metrics: link resyncing 1, resync bytes {done}/{total}",
        start.elapsed()
    );
    let lower = line.to_lowercase();
    assert!(
        shows_done_total(&line) && lower.contains("eta") && lower.contains("file"),
        "the resync line shows no bytes and files done/total and ETA: {line:?}"
    );
    rig.wait_in_sync(1, 2, Duration::from_secs(60), "end of the resync");
    println!(
        "resync of {CHANGE_MB} MiB at 20 MiB/s: in sync after {:?}",
        start.elapsed()
    );
    // The last resync's figures stay: everything changed was to send, and
    // was sent.
    let total = rig.rfs_metric(1, "safekit_rfs_resync_bytes_total", &[]);
    let done = rig.rfs_metric(1, "safekit_rfs_resync_bytes_done", &[]);
    println!("after the resync: bytes {done:?}/{total:?}");
    assert!(
        total.is_some_and(|t| t >= f64::from(u32::try_from(CHANGE_MB * MIB).unwrap()))
            && done == total,
        "last resync bytes done/total {done:?}/{total:?}, {CHANGE_MB} MiB changed"
    );
    let _ = wait_equal(&rig, Duration::from_secs(10), "after the resync");
}

// ---- a replicated directory that is a mount point of its own ----

/// The operator's filesystem mounted on each node's replicated directory.
#[derive(Debug, Clone, Copy)]
enum OwnFs {
    Tmpfs,
    Ext4,
}

impl OwnFs {
    fn fstype(self) -> &'static str {
        match self {
            Self::Tmpfs => "tmpfs",
            Self::Ext4 => "ext4",
        }
    }

    fn magic(self) -> i64 {
        match self {
            Self::Tmpfs => 0x0102_1994,
            Self::Ext4 => 0xEF53,
        }
    }
}

fn run_ok(cmd: &mut std::process::Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Mounts the operator's filesystem on node `i`'s replicated directory (in
/// the test's mount namespace, before the daemon starts, so the daemon's
/// namespace inherits it), with a marker file left underneath it.
fn mount_own_fs(rig: &Rig, i: usize, kind: OwnFs) {
    let dir = rig.disk(i);
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("underneath"), b"on the parent filesystem").expect("marker");
    match kind {
        OwnFs::Tmpfs => run_ok(
            std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
                .arg(&dir),
        ),
        OwnFs::Ext4 => {
            let image = rig.dir.join(format!("node{i}.ext4"));
            File::create(&image)
                .and_then(|f| f.set_len(64 << 20))
                .expect("image");
            run_ok(
                std::process::Command::new("mkfs.ext4")
                    .args(["-q", "-F"])
                    .arg(&image),
            );
            run_ok(
                std::process::Command::new("mount")
                    .args(["-o", "loop"])
                    .arg(&image)
                    .arg(&dir),
            );
        }
    }
}

/// The filesystem types stacked on `dir` in the mount namespace of `pid`,
/// bottom first (in mountinfo order).
fn stacked_types(pid: u32, dir: &Path) -> Vec<String> {
    let info = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    let dir = dir.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .filter(|l| l.split(' ').nth(4) == Some(dir.as_str()))
        .filter_map(|l| l.split(" - ").nth(1)?.split(' ').next().map(str::to_owned))
        .collect()
}

/// The operator's filesystem is on node `i`'s directory as the test sees
/// it, and still mounted under whatever the daemon stacked there.
fn assert_still_mounted(rig: &Rig, i: usize, kind: OwnFs, when: &str) {
    let disk = rig.disk(i);
    assert_eq!(
        rustix::fs::statfs(&disk).map(|s| s.f_type).ok(),
        Some(kind.magic()),
        "{when}: node{i}'s {} is no longer the operator's {}",
        disk.display(),
        kind.fstype()
    );
    if let Some(pid) = rig.lab.daemon_pid(i) {
        let types = stacked_types(pid, &disk);
        assert_eq!(
            types.first().map(String::as_str),
            Some(kind.fstype()),
            "{when}: in node{i}'s daemon, the mounts on {} are {types:?}\n{}",
            disk.display(),
            rig.diagnose()
        );
    }
}

/// Writes `name` through node `i`'s mount (the application) and syncs it.
/// The state shows PRIM/ALONE a few ms before the FUSE mount is up (an
/// application started by `start_prim` always finds it): wait for it.
fn app_write(rig: &Rig, i: usize, name: &str, data: &[u8]) {
    wait_for(Duration::from_secs(5), || is_fuse(&rig.view(i)))
        .unwrap_or_else(|| panic!("node{i}: no FUSE mount\n{}", rig.diagnose()));
    let mut f = File::create(rig.view(i).join(name)).unwrap_or_else(|e| {
        panic!(
            "node{i}: create {name} through the mount: {e}; mounts there: {:?}\n{}",
            rig.lab
                .daemon_pid(i)
                .map(|pid| stacked_types(pid, &rig.disk(i))),
            rig.diagnose()
        )
    });
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

fn a_mount_point_of_its_own(prefix: &str, subnet: u8, kind: OwnFs) {
    let _serial = serial();
    let mut rig = Rig::new(prefix, subnet, "");
    for i in 1..=2 {
        mount_own_fs(&rig, i, kind);
    }
    rig.start_both();
    rig.wait_in_sync(1, 2, Duration::from_secs(20), "start");
    for i in 1..=2 {
        assert_still_mounted(&rig, i, kind, "after start");
    }
    app_write(&rig, 1, "a", b"written by node1 as primary");

    // kill -9 of the primary's daemon: node2 takes over on its copy.
    rig.lab.kill_daemon(1);
    rig.wait_state(2, ModuleState::Alone, Duration::from_secs(10), "takeover");
    assert_still_mounted(&rig, 2, kind, "after the takeover");
    app_write(&rig, 2, "b", b"written by node2 alone");

    // node1's daemon restarted: back as SECOND, resynchronised.
    rig.start_daemon(1);
    rig.module_cmd(1, "start");
    rig.wait_in_sync(2, 1, Duration::from_secs(30), "node1 back");
    assert_still_mounted(&rig, 1, kind, "after node1's restart");

    // swap: node1 primary again.
    rig.module_cmd(2, "swap");
    rig.wait_in_sync(1, 2, Duration::from_secs(30), "swap");
    app_write(&rig, 1, "c", b"written by node1 after the swap");

    // kill -9 and restart of the secondary's daemon.
    rig.lab.kill_daemon(2);
    rig.start_daemon(2);
    rig.module_cmd(2, "start");
    rig.wait_in_sync(1, 2, Duration::from_secs(30), "node2 restarted");
    app_write(&rig, 1, "d", b"written by node1 at the end");

    let tree = wait_equal(&rig, Duration::from_secs(20), "at the end");
    for i in 1..=2 {
        assert_still_mounted(&rig, i, kind, "at the end");
        // Every byte is on the operator's filesystem: what the test sees
        // there (its top mount) is what the application wrote, and the
        // marker left underneath is hidden by it.
        for (name, want) in [
            ("a", &b"written by node1 as primary"[..]),
            ("b", b"written by node2 alone"),
            ("c", b"written by node1 after the swap"),
            ("d", b"written by node1 at the end"),
        ] {
            assert_eq!(
                fs::read(rig.disk(i).join(name)).ok().as_deref(),
                Some(want),
                "node{i}: {name} on the operator's {}",
                kind.fstype()
            );
        }
        assert!(!rig.disk(i).join("underneath").exists());
    }
    println!(
        "{}: {} entries equal on both nodes, the operator's filesystem mounted throughout",
        kind.fstype(),
        tree.len()
    );
}

#[test]
fn a_replicated_directory_on_its_own_tmpfs_stays_mounted() {
    a_mount_point_of_its_own("skrf6", 66, OwnFs::Tmpfs);
}

#[test]
fn a_replicated_directory_on_its_own_ext4_disk_stays_mounted() {
    a_mount_point_of_its_own("skrf7", 67, OwnFs::Ext4);
}

// ---- a secondary that cannot write ----

/// The module log of node `i`, through the CLI.
fn module_log(rig: &Rig, i: usize, n: usize) -> String {
    rig.cli(i, &["log", "-m", MODULE, "-n", &n.to_string()]).1
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: fill, fail, back off, primary dies, room, resync"
)]
fn a_secondary_whose_disk_fills_never_takes_over_and_resyncs_once_there_is_room() {
    const FILE: &str = "records.log";
    let _serial = serial();
    let mut rig = Rig::new("skrf8", 68, "");
    // node2's copy on a small filesystem of its own.
    let d2 = rig.disk(2);
    fs::create_dir_all(&d2).expect("mkdir");
    run_ok(
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(&d2),
    );
    rig.start_both();
    rig.wait_in_sync(1, 2, Duration::from_secs(20), "start");
    let ack_log = rig.dir.join("acked.log");
    app_write(&rig, 1, FILE, b"");
    let views: Views = Arc::new(Mutex::new(vec![Some(rig.view(1)), None]));
    let writer = Writer::start(&rig, &views, FILE, Durable::Fsync, ack_log);
    wait_for(Duration::from_secs(10), || writer.count() > 50).expect("the writer writes");

    // More than node2 can hold, through the primary's mount.
    app_write(&rig, 1, "filler", &noise("filler", 6 * MIB));
    rig.wait_state(1, ModuleState::Alone, Duration::from_secs(10), "disk full");
    let failed = wait_for(Duration::from_secs(5), || {
        rig.status(2).is_some_and(|m| {
            m.rfs.iter().any(|d| {
                d.link == "failed" && d.failure.as_deref().is_some_and(|f| f.contains("ENOSPC"))
            })
        })
    });
    assert!(
        failed.is_some(),
        "node2 does not show its copy failed with ENOSPC\n{}",
        rig.diagnose()
    );
    let state_v = rig.cli(2, &["state", "-m", MODULE, "-v"]).1;
    assert!(
        state_v.contains("failed (ENOSPC"),
        "state -v on node2:\n{state_v}"
    );
    assert_eq!(
        rig.rfs_metric(2, "safekit_rfs_link", &[("state", "failed")]),
        Some(1.0),
        "node2's /metrics"
    );
    // The primary keeps serving alone.
    let before = writer.count();
    wait_for(Duration::from_secs(5), || writer.count() > before + 50)
        .unwrap_or_else(|| panic!("the primary stopped serving\n{}", rig.diagnose()));
    // Resynchronisation attempts back off (each fails the same way).
    std::thread::sleep(Duration::from_secs(8));
    let log1 = module_log(&rig, 1, 400);
    let attempts: Vec<&str> = log1
        .lines()
        .filter(|l| l.contains("could not apply"))
        .collect();
    assert!(
        attempts.len() >= 2 && attempts.len() <= 5,
        "resync attempts in ~10 s: {attempts:#?}"
    );
    assert!(
        attempts.iter().any(|l| l.contains("next attempt in 4s")),
        "{attempts:#?}"
    );

    // The primary dies: node2 must not take over on its incomplete copy.
    let acked = writer.acked();
    let errors = writer.finish();
    rig.lab.kill_daemon(1);
    let limit = Instant::now() + Duration::from_secs(4);
    while Instant::now() < limit {
        let s = rig.state(2);
        assert!(
            !matches!(s, Some(ModuleState::Alone | ModuleState::Prim)),
            "node2 took over on a copy it could not write: {s:?}\n{}",
            rig.diagnose()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(rig.state(2), Some(ModuleState::Wait));
    let state_v = rig.cli(2, &["state", "-m", MODULE, "-v"]).1;
    assert!(state_v.contains("ENOSPC"), "state -v on node2:\n{state_v}");

    // Room again, node1 back: the resynchronisation completes.
    run_ok(
        std::process::Command::new("mount")
            .args(["-o", "remount,size=256m"])
            .arg(&d2),
    );
    rig.start_daemon(1);
    rig.module_cmd(1, "start");
    let took = wait_for(Duration::from_secs(60), || {
        matches!(rig.state(1), Some(ModuleState::Prim)) && rig.in_sync(1, 2)
    })
    .unwrap_or_else(|| {
        panic!(
            "no PRIM/SECOND in sync after room came back\n{}",
            rig.diagnose()
        )
    });
    let (missing, n, found, bad) = missing_on(&rig, 2, FILE, &acked);
    assert!(
        missing.is_empty(),
        "{} of {n} acknowledged records missing on node2 (found {found}, bad {bad}): {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    wait_equal(&rig, Duration::from_secs(20), "after the resync");
    println!(
        "disk full: {n} acknowledged records all on node2 after the resync ({took:?}); writer errors {errors:?}"
    );
}

/// The loop devices whose backing file is `image`.
fn loops_on(image: &Path) -> usize {
    let Ok(dir) = fs::read_dir("/sys/block") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            fs::read_to_string(e.path().join("loop/backing_file"))
                .is_ok_and(|b| Path::new(b.trim()) == image)
        })
        .count()
}

/// The rig of the EIO test: node2's copy on an ext4 over a loop device over
/// the fault-injecting filesystem. Torn down in order: daemons, the ext4
/// (its loop device goes with it), then the fault-injecting filesystem.
struct EioRig {
    rig: Rig,
    fault: Option<faultfs::FaultFs>,
}

impl EioRig {
    fn mount_ext4(&self) {
        let image = self.fault.as_ref().expect("fault fs").image();
        run_ok(
            std::process::Command::new("mount")
                .args(["-o", "loop,errors=continue"])
                .arg(&image)
                .arg(self.rig.disk(2)),
        );
    }

    /// Unmounts node2's ext4 and waits for its loop device to let go of
    /// the image (the daemons must be down).
    fn unmount_ext4(&self) -> bool {
        let _ = rustix::mount::unmount(self.rig.disk(2), rustix::mount::UnmountFlags::DETACH);
        let image = self.fault.as_ref().expect("fault fs").image();
        wait_for(Duration::from_secs(10), || loops_on(&image) == 0).is_some()
    }
}

impl Drop for EioRig {
    fn drop(&mut self) {
        for i in 1..=2 {
            self.rig.lab.kill_daemon(i);
        }
        let released = self.unmount_ext4();
        if let Some(f) = self.fault.take() {
            if released {
                drop(f);
            } else {
                // A loop device still holds the image: dropping the session
                // would wait for it for ever.
                std::mem::forget(f);
            }
        }
    }
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: EIO, fail, primary dies, repair, resync"
)]
fn a_secondary_meeting_io_errors_never_takes_over_and_resyncs_once_repaired() {
    const FILE: &str = "records.log";
    let _serial = serial();
    let rig = Rig::new("skrf9", 69, "");
    let fault = faultfs::FaultFs::mount(
        &rig.dir.join("faultfs"),
        &rig.dir.join("faultfs.backing"),
        128 << 20,
    )
    .expect("mount the fault-injecting filesystem");
    run_ok(
        std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(fault.image()),
    );
    let mut t = EioRig {
        rig,
        fault: Some(fault),
    };
    fs::create_dir_all(t.rig.disk(2)).expect("mkdir");
    t.mount_ext4();
    t.rig.start_both();
    t.rig.wait_in_sync(1, 2, Duration::from_secs(20), "start");
    let rig = &t.rig;
    app_write(rig, 1, FILE, b"");
    let views: Views = Arc::new(Mutex::new(vec![Some(rig.view(1)), None]));
    let writer = Writer::start(rig, &views, FILE, Durable::Fsync, rig.dir.join("acked.log"));
    wait_for(Duration::from_secs(10), || writer.count() > 50).expect("the writer writes");

    // I/O errors under node2's copy.
    t.fault
        .as_ref()
        .expect("fault fs")
        .failing
        .store(true, Ordering::SeqCst);
    rig.wait_state(1, ModuleState::Alone, Duration::from_secs(15), "EIO");
    let failed = wait_for(Duration::from_secs(5), || {
        rig.status(2).is_some_and(|m| {
            m.rfs.iter().any(|d| {
                d.link == "failed" && d.failure.as_deref().is_some_and(|f| f.contains("EIO"))
            })
        })
    });
    assert!(
        failed.is_some(),
        "node2 does not show its copy failed with EIO\n{}",
        rig.diagnose()
    );
    let before = writer.count();
    wait_for(Duration::from_secs(5), || writer.count() > before + 50)
        .unwrap_or_else(|| panic!("the primary stopped serving\n{}", rig.diagnose()));

    // The primary dies: node2 must not take over on its copy.
    let acked = writer.acked();
    let errors = writer.finish();
    t.rig.lab.kill_daemon(1);
    let limit = Instant::now() + Duration::from_secs(4);
    while Instant::now() < limit {
        let s = t.rig.state(2);
        assert!(
            !matches!(s, Some(ModuleState::Alone | ModuleState::Prim)),
            "node2 took over on a copy it could not write: {s:?}\n{}",
            t.rig.diagnose()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(t.rig.state(2), Some(ModuleState::Wait));

    // The disk repaired (errors off, fsck), both nodes back: in sync.
    t.fault
        .as_ref()
        .expect("fault fs")
        .failing
        .store(false, Ordering::SeqCst);
    t.rig.lab.kill_daemon(2);
    assert!(t.unmount_ext4(), "node2's ext4 still busy");
    let image = t.fault.as_ref().expect("fault fs").image();
    let fsck = std::process::Command::new("e2fsck")
        .args(["-f", "-y"])
        .arg(&image)
        .output()
        .expect("e2fsck");
    // 0: clean, 1: errors corrected.
    assert!(
        matches!(fsck.status.code(), Some(0 | 1)),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    t.mount_ext4();
    t.rig.start_daemon(1);
    t.rig.start_daemon(2);
    t.rig.module_cmd(1, "start");
    t.rig.module_cmd(2, "start");
    let took = wait_for(Duration::from_secs(60), || t.rig.in_sync(1, 2)).unwrap_or_else(|| {
        panic!(
            "no PRIM/SECOND in sync after the repair\n{}",
            t.rig.diagnose()
        )
    });
    let (missing, n, found, bad) = missing_on(&t.rig, 2, FILE, &acked);
    assert!(
        missing.is_empty(),
        "{} of {n} acknowledged records missing on node2 (found {found}, bad {bad}): {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    wait_equal(&t.rig, Duration::from_secs(20), "after the resync");
    println!(
        "EIO: {n} acknowledged records all on node2 after the repair and resync ({took:?}); writer errors {errors:?}"
    );
}

/// A first synchronisation cut at about half by a `kill -9` of the
/// secondary's safekitd resumes where it stopped once that node is back:
/// the primary (ALONE meanwhile, never restarted) sends no more than 1.1x
/// the tree over both attempts, and the copies end equal. Real daemons:
/// the resume id and the journal's checkpoints live in their state
/// directories.
#[test]
fn a_first_sync_cut_by_a_secondary_crash_resumes_where_it_stopped() {
    const FILES: usize = 48;
    const FILE_MB: usize = 4;
    let _serial = serial();
    // Paced, so that the cut lands in the middle.
    let mut rig = Rig::new("skrs1", 181, "resync_bandwidth = \"64MiB/s\"\n");
    for k in 0..FILES {
        let p = rig.disk(1).join(format!("d{:02}/f{k:03}", k % 6));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, noise(&format!("resume {k}"), FILE_MB * MIB)).unwrap();
    }
    let tree = (FILES * FILE_MB * MIB) as u64;
    rig.start_both();
    let half = wait_for(Duration::from_secs(60), || rig.resync_sent(1) >= tree / 2);
    assert!(
        half.is_some(),
        "the first sync never reached half the tree\n{}",
        rig.diagnose()
    );
    let cut_at = rig.resync_sent(1);
    rig.lab.kill_daemon(2);
    rig.wait_state(
        1,
        ModuleState::Alone,
        Duration::from_secs(10),
        "node2's safekitd killed",
    );
    assert!(
        !rig.in_sync(1, 2),
        "the cut came after the end of the first sync (sent {cut_at} of {tree})"
    );
    rig.start_daemon(2);
    rig.module_cmd(2, "start");
    rig.wait_in_sync(1, 2, Duration::from_secs(90), "node2 back");
    let sent = rig.resync_sent(1);
    println!(
        "first sync cut by kill -9 of the secondary at {cut_at} of {tree} bytes; \
         sent over both attempts {sent} ({:.3} x the tree); last resync: {}",
        ratio(sent, tree),
        resync_figures(&rig, 1)
    );
    assert!(
        sent <= tree + tree / 10,
        "both attempts sent {sent} bytes for a {tree}-byte tree (more than 1.1x): \
         the second started over\n{}",
        rig.diagnose()
    );
    wait_equal(&rig, Duration::from_secs(20), "after the resumed sync");
}
