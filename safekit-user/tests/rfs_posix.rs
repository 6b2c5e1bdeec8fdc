//! POSIX behaviour through the replicating FUSE mount (root, FUSE).
//!
//! Each test mounts a primary over dir A replicating over loopback TCP to a
//! secondary applying into dir B, runs one behaviour through the mount and on
//! a plain reference directory R, and asserts:
//! - the mount behaves like R (every return value and errno, then content,
//!   sizes, modes, owners, symlink targets, xattrs);
//! - A and B end equal, times included (content checksum, mode, uid/gid,
//!   mtime, xattrs, symlink targets).

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::fd::OwnedFd,
    os::unix::{
        ffi::OsStrExt,
        fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use rustix::fs::{AtFlags, Mode, OFlags};
use safekit::{
    config::AsyncMode,
    rfs::{LinkState, Primary, PrimaryParams, RfsEvent, SecondaryConfig, serve},
};
use tokio::sync::mpsc::UnboundedReceiver;

mod fdwalk;

use fdwalk::{open_sub, read_at};

const KEY: [u8; 32] = *b"0123456789abcdef0123456789abcdef";

/// A primary over `a` replicating into `b`, and a reference directory `r`.
struct Pair {
    base: PathBuf,
    a: PathBuf,
    b: PathBuf,
    r: PathBuf,
    /// The real directory under the mount (opened before mounting).
    a_real: File,
    primary: Option<Primary>,
    events: UnboundedReceiver<RfsEvent>,
    rt: tokio::runtime::Runtime,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Pair {
    fn new(tag: &str, mode: AsyncMode) -> Self {
        let base = std::env::temp_dir().join(format!(
            "rfs-posix-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&base);
        let (a, b, r) = (base.join("a"), base.join("b"), base.join("r"));
        for d in [&a, &b, &r] {
            fs::create_dir_all(d).expect("mkdir");
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        rt.spawn(serve(
            listener,
            SecondaryConfig {
                dirs: vec![("/data".into(), b.clone())],
                key: KEY.to_vec(),
                async_mode: mode,
                handshake_timeout: Duration::from_secs(5),
            },
            None,
        ));
        let a_real = File::open(&a).expect("open the real directory");
        let mut params = PrimaryParams::new("/data");
        params.send_timeout = Duration::from_secs(10);
        params.journal = Some(base.join("journal"));
        params.passthrough_reads = std::env::var_os("RFS_PASSTHROUGH").is_some();
        let (primary, mut events) =
            Primary::start(&a, Some(addr), &KEY, params).expect("start primary");
        // The first resynchronisation (of the empty directory) completes.
        match events.blocking_recv() {
            Some(RfsEvent::Connected { .. }) => {}
            other => panic!("expected Connected, got {other:?}"),
        }
        assert_eq!(primary.state(), LinkState::Connected);
        // Same root times on both sides before anything happens.
        let m = fs::metadata(&a).expect("stat a");
        set_times(&b, (m.atime(), m.atime_nsec()), (m.mtime(), m.mtime_nsec()));
        Self {
            base,
            a,
            b,
            r,
            a_real,
            primary: Some(primary),
            events,
            rt,
        }
    }

    /// Runs `f` on the reference and through the mount; asserts the same
    /// results, the same tree (times aside), and A == B (times included).
    fn check(&mut self, f: impl Fn(&Path) -> Vec<String>) {
        self.run(f);
        self.compare();
    }

    /// Runs `f` on the reference and through the mount; asserts the same
    /// results.
    fn run(&mut self, f: impl Fn(&Path) -> Vec<String>) {
        let want = f(&self.r);
        let got = f(&self.a);
        assert_eq!(got, want, "mount differs from a plain directory");
    }

    /// Asserts the same tree (times aside) through the mount and in the
    /// reference, and A == B (times included).
    fn compare(&mut self) {
        assert_eq!(
            snapshot(&self.a, false),
            snapshot(&self.r, false),
            "tree through the mount differs from the plain directory"
        );
        self.assert_replicated();
    }

    /// The primary's copy on disk (the real directory under the mount,
    /// through its handle): what the secondary must hold, times included.
    /// Under the write-back cache the kernel keeps its own mtime for a file
    /// it wrote through the mount until it forgets the inode; the disk's is
    /// the one replicated.
    fn a_real(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&self.a_real)
        ))
    }

    fn assert_replicated(&mut self) {
        let a = snapshot(&self.a_real(), true);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let b = snapshot(&self.b, true);
            if a == b {
                break;
            }
            if Instant::now() > deadline {
                assert_eq!(b, a, "secondary copy differs from the primary");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            self.primary.as_ref().map(Primary::state),
            Some(LinkState::Connected),
            "events: {:?}",
            self.events.try_recv()
        );
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let Some(p) = self.primary.take() {
            let _ = p.stop();
        }
        // Last resort if unmount failed.
        let _ = rustix::mount::unmount(&self.a, rustix::mount::UnmountFlags::DETACH);
        let _ = fs::remove_dir_all(&self.base);
        let _ = &self.rt;
    }
}

fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    let ts = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &ts,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("utimensat");
}

#[derive(Debug, PartialEq, Eq)]
struct Meta {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: Option<(i64, i64)>,
    content: Option<String>,
    link: Option<PathBuf>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 65536];
    let Ok(n) = rustix::fs::llistxattr(p, &mut buf[..]) else {
        return out;
    };
    let names: Vec<Vec<u8>> = buf[..n]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    for name in names {
        if name.starts_with(b"security.") {
            continue;
        }
        let mut v = vec![0u8; 65536];
        if let Ok(m) = rustix::fs::lgetxattr(p, OsStr::from_bytes(&name), &mut v[..]) {
            v.truncate(m);
            out.insert(name, v);
        }
    }
    out
}

/// `/proc/self/fd/<dir>/<name>`: `dir/name` for the `l*xattr` calls,
/// whatever the depth of `dir` (its own path may exceed `PATH_MAX`).
fn proc_entry(dir: &OwnedFd, name: &OsStr) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd_for_test()));
    p.push(name);
    p
}

/// The content of the regular file `dir/name`, as a checksum.
fn content_at(dir: &OwnedFd, name: &OsStr) -> String {
    let read = || -> std::io::Result<Vec<u8>> {
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut data = Vec::new();
        File::from(fd).read_to_end(&mut data)?;
        Ok(data)
    };
    read().map_or_else(
        |e| format!("unreadable: {e}"),
        |data| blake3::hash(&data).to_hex().to_string(),
    )
}

/// Every entry under `root`: metadata, a content checksum, xattrs. The
/// secondary's copy may change while it is read (its applier catches up):
/// an entry gone meanwhile is left out or marked unreadable, and the caller
/// compares again. Walked by directory fds (`*at` calls), so entries whose
/// path from `root` exceeds `PATH_MAX` are compared too.
fn snapshot(root: &Path, times: bool) -> BTreeMap<PathBuf, Meta> {
    let mut out = BTreeMap::new();
    let Ok(top) = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return out;
    };
    // The root itself (through a trailing `/`: the directory a
    // `/proc/self/fd/N` link names, not the link).
    let rp = root.join("");
    if let Ok(m) = fs::metadata(&rp) {
        out.insert(
            PathBuf::new(),
            Meta {
                kind: "dir",
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: 0,
                mtime: times.then_some((m.mtime(), m.mtime_nsec())),
                content: None,
                link: None,
                xattrs: xattrs(&rp),
            },
        );
    }
    fdwalk::walk(top, |path, dir, name, st| {
        let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
        let (is_dir, is_link, is_file) = (
            ft == rustix::fs::FileType::Directory,
            ft == rustix::fs::FileType::Symlink,
            ft == rustix::fs::FileType::RegularFile,
        );
        let kind = if is_dir {
            "dir"
        } else if is_link {
            "symlink"
        } else if is_file {
            "file"
        } else {
            "other"
        };
        let link = is_link.then(|| {
            rustix::fs::readlinkat(dir, name, Vec::new())
                .map(|t| PathBuf::from(OsStr::from_bytes(t.as_bytes())))
                .unwrap_or_default()
        });
        #[expect(
            clippy::cast_sign_loss,
            clippy::cast_possible_wrap,
            reason = "sizes and times of stat"
        )]
        out.insert(
            path.to_path_buf(),
            Meta {
                kind,
                mode: if is_link { 0 } else { st.st_mode & 0o7777 },
                uid: st.st_uid,
                gid: st.st_gid,
                size: if is_dir { 0 } else { st.st_size as u64 },
                mtime: times.then_some((st.st_mtime, st.st_mtime_nsec as i64)),
                content: is_file.then(|| content_at(dir, name)),
                link,
                xattrs: xattrs(&proc_entry(dir, name)),
            },
        );
    });
    out
}

fn res<T: std::fmt::Debug>(r: std::io::Result<T>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(e) => format!("err {:?}", e.raw_os_error()),
    }
}

fn rres<T: std::fmt::Debug>(r: rustix::io::Result<T>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(e) => format!("err {}", e.raw_os_error()),
    }
}

/// Runs `script` with `sh -c` as the unprivileged user 65534 (no
/// capabilities, so no `CAP_FSETID`); its exit status.
fn as_nobody(script: &str) -> String {
    match std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .status()
    {
        Ok(s) => format!("{:?}", s.code()),
        Err(e) => format!("setpriv: {e}"),
    }
}

/// The set-id bits that a write or truncate by an unprivileged caller
/// clears (the daemon does it: `FUSE_HANDLE_KILLPRIV_V2`, which spares every
/// write a GETXATTR of `security.capability`), as on a plain directory and
/// on the secondary; a privileged writer keeps them.
#[test]
fn set_id_bits_cleared_by_unprivileged_writes_and_truncates() {
    let mut p = Pair::new("setid", AsyncMode::None);
    p.check(|d| {
        let mut log = Vec::new();
        let mode = |n: &str| res(fs::metadata(d.join(n)).map(|m| m.mode() & 0o7777));
        for (name, m) in [
            ("w", 0o6775),
            ("w-noexec", 0o6764),
            ("t", 0o6775),
            ("root", 0o6775),
        ] {
            fs::write(d.join(name), b"data").expect("write");
            std::os::unix::fs::chown(d.join(name), Some(65534), Some(65534)).expect("chown");
            fs::set_permissions(d.join(name), fs::Permissions::from_mode(m)).expect("chmod");
        }
        let q = |n: &str| d.join(n).display().to_string();
        // An append by the owner, unprivileged: set-user-ID goes, and
        // set-group-ID where the group may execute.
        log.push(as_nobody(&format!("printf more >> '{}'", q("w"))));
        log.push(mode("w"));
        log.push(as_nobody(&format!("printf more >> '{}'", q("w-noexec"))));
        log.push(mode("w-noexec"));
        log.push(as_nobody(&format!("truncate -s 2 '{}'", q("t"))));
        log.push(mode("t"));
        // Root (CAP_FSETID) keeps them.
        log.push(res(OpenOptions::new()
            .append(true)
            .open(d.join("root"))
            .and_then(|mut f| f.write_all(b"more"))));
        log.push(mode("root"));
        for n in ["w", "w-noexec", "t", "root"] {
            log.push(res(fs::read(d.join(n))));
        }
        log
    });
}

#[test]
fn create_and_write_at_offsets() {
    let mut p = Pair::new("write", AsyncMode::None);
    p.check(|d| {
        let mut log = Vec::new();
        let f = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(d.join("f"))
            .expect("create");
        log.push(res(f.write_at(b"hello", 0)));
        log.push(res(f.write_at(b"world", 100)));
        log.push(res(f.write_at(b"XY", 3)));
        log.push(res(f.write_at(&vec![7u8; 300_000], 50)));
        // Several kernel requests, each replicated in pieces, at an offset
        // aligned to nothing: a piece out of place changes the checksum.
        let big: Vec<u8> = (0..(3_u32 << 20) + 1234)
            .map(|i| u8::try_from(i % 251).unwrap_or(0))
            .collect();
        log.push(res(f.write_at(&big, 4097)));
        let mut s = Vec::new();
        let mut g = File::open(d.join("f")).expect("open");
        log.push(res(g.read_to_end(&mut s)));
        log.push(blake3::hash(&s).to_hex().to_string());
        log.push(res(fs::metadata(d.join("f")).map(|m| m.len())));
        log.push(res(OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(d.join("f"))
            .map(|_| ())));
        log
    });
}

#[test]
fn sparse_files_and_truncate_up_and_down() {
    let mut p = Pair::new("sparse", AsyncMode::None);
    p.check(|d| {
        let mut log = Vec::new();
        let f = File::create(d.join("sparse")).expect("create");
        log.push(res(f.write_at(b"x", 10 << 20)));
        log.push(res(f.metadata().map(|m| m.len())));
        let g = File::create(d.join("t")).expect("create");
        log.push(res(g.write_at(&[1u8; 5000], 0)));
        log.push(res(g.set_len(100)));
        log.push(res(g.set_len(70_000)));
        log.push(res(g.write_at(b"end", 69_997)));
        log.push(res(g.set_len(10)));
        log.push(res(fs::read(d.join("t"))));
        // truncate by path, and O_TRUNC.
        log.push(res(OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(d.join("sparse"))
            .map(|_| ())));
        log.push(res(fs::metadata(d.join("sparse")).map(|m| m.len())));
        log
    });
}

#[test]
fn o_append() {
    let mut p = Pair::new("append", AsyncMode::None);
    p.check(|d| {
        let mut log = Vec::new();
        fs::write(d.join("log"), b"start\n").expect("write");
        let mut a = OpenOptions::new()
            .append(true)
            .open(d.join("log"))
            .expect("open");
        let mut b = OpenOptions::new()
            .append(true)
            .open(d.join("log"))
            .expect("open");
        for i in 0..20 {
            let w = if i % 2 == 0 { &mut a } else { &mut b };
            log.push(res(w.write(format!("line {i}\n").as_bytes())));
        }
        // An explicit seek does not defeat O_APPEND.
        log.push(res(a.seek(SeekFrom::Start(0))));
        log.push(res(a.write(b"tail\n")));
        log.push(res(fs::read_to_string(d.join("log"))));
        log
    });
}

#[test]
fn rename_over_existing_noreplace_and_exchange() {
    let mut p = Pair::new("rename", AsyncMode::None);
    p.check(|d| {
        let mut log = Vec::new();
        fs::write(d.join("x"), b"x").expect("write");
        fs::write(d.join("y"), b"yy").expect("write");
        fs::create_dir(d.join("dir")).expect("mkdir");
        fs::write(d.join("dir/in"), b"in").expect("write");
        log.push(res(fs::rename(d.join("x"), d.join("y"))));
        log.push(res(fs::read(d.join("y"))));
        log.push(res(fs::metadata(d.join("x")).map(|_| ())));
        fs::write(d.join("z"), b"zzz").expect("write");
        let dir = File::open(d).expect("open dir");
        log.push(rres(rustix::fs::renameat_with(
            &dir,
            "z",
            &dir,
            "y",
            rustix::fs::RenameFlags::NOREPLACE,
        )));
        log.push(rres(rustix::fs::renameat_with(
            &dir,
            "z",
            &dir,
            "y",
            rustix::fs::RenameFlags::EXCHANGE,
        )));
        log.push(res(fs::read(d.join("y"))));
        log.push(res(fs::read(d.join("z"))));
        // Directories move with their content; a write after the move lands
        // at the new path.
        log.push(res(fs::rename(d.join("dir"), d.join("moved"))));
        log.push(res(fs::write(d.join("moved/in"), b"after move")));
        log.push(res(fs::rename(d.join("moved/in"), d.join("top"))));
        log
    });
}

#[test]
fn mkdir_rmdir_and_hard_links() {
    let mut p = Pair::new("dirs", AsyncMode::None);
    p.check(|d| {
        let mut log = vec![
            res(fs::create_dir(d.join("d"))),
            res(fs::create_dir(d.join("d"))),
        ];
        log.push(res(fs::create_dir_all(d.join("d/e/f"))));
        log.push(res(fs::write(d.join("d/e/f/file"), b"1")));
        log.push(res(fs::remove_dir(d.join("d/e"))));
        log.push(res(fs::hard_link(d.join("d/e/f/file"), d.join("link"))));
        log.push(res(fs::metadata(d.join("link")).map(|m| m.nlink())));
        log.push(res(fs::remove_file(d.join("d/e/f/file"))));
        log.push(res(fs::write(d.join("link"), b"via the other name")));
        log.push(res(fs::remove_dir(d.join("d/e/f"))));
        log.push(res(fs::remove_dir(d.join("d/e"))));
        log.push(res(fs::remove_dir(d.join("nope"))));
        log.push(res(fs::create_dir(d.join("keep"))));
        log
    });
}

#[test]
fn unlink_of_an_open_file() {
    let mut p = Pair::new("unlink", AsyncMode::None);
    p.check(|d| {
        let mut log = Vec::new();
        let mut f = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(d.join("tmp"))
            .expect("create");
        log.push(res(f.write(b"before")));
        log.push(res(fs::remove_file(d.join("tmp"))));
        log.push(res(f.write(b" after")));
        log.push(res(f.metadata().map(|m| (m.nlink(), m.len()))));
        let mut s = String::new();
        log.push(res(f.seek(SeekFrom::Start(0))));
        log.push(res(f.read_to_string(&mut s)));
        log.push(s);
        // A new file of the same name is a different file.
        log.push(res(fs::write(d.join("tmp"), b"new")));
        log.push(res(f.write(b" more")));
        drop(f);
        log.push(res(fs::read(d.join("tmp"))));
        log
    });
}

#[test]
fn symlinks() {
    let mut p = Pair::new("symlink", AsyncMode::None);
    p.check(|d| {
        let mut log = Vec::new();
        fs::write(d.join("target"), b"t").expect("write");
        log.push(res(std::os::unix::fs::symlink("target", d.join("l"))));
        log.push(res(std::os::unix::fs::symlink(
            "../../outside/x",
            d.join("dangling"),
        )));
        log.push(res(std::os::unix::fs::symlink("target", d.join("l"))));
        log.push(res(fs::read_link(d.join("l"))));
        log.push(res(fs::read(d.join("l"))));
        log.push(res(fs::write(d.join("l"), b"through the link")));
        log.push(res(fs::read(d.join("target"))));
        log.push(res(fs::read(d.join("dangling"))));
        log.push(res(fs::rename(d.join("l"), d.join("l2"))));
        log
    });
}

#[test]
fn chmod_chown_and_utimes() {
    let mut p = Pair::new("attrs", AsyncMode::None);
    p.run(|d| {
        let mut log = Vec::new();
        fs::write(d.join("f"), b"data").expect("write");
        fs::create_dir(d.join("dir")).expect("mkdir");
        log.push(res(fs::set_permissions(
            d.join("f"),
            fs::Permissions::from_mode(0o640),
        )));
        log.push(res(std::os::unix::fs::chown(
            d.join("f"),
            Some(1234),
            Some(5678),
        )));
        log.push(res(fs::set_permissions(
            d.join("f"),
            fs::Permissions::from_mode(0o6755),
        )));
        log.push(res(std::os::unix::fs::chown(d.join("f"), Some(4321), None)));
        log.push(res(fs::metadata(d.join("f")).map(|m| m.mode() & 0o7777)));
        log.push(res(fs::set_permissions(
            d.join("dir"),
            fs::Permissions::from_mode(0o2770),
        )));
        log.push(res(std::os::unix::fs::chown(
            d.join("dir"),
            Some(7),
            Some(8),
        )));
        log.push(res(fs::write(d.join("dir/child"), b"c")));
        log.push(res(fs::metadata(d.join("dir/child")).map(|m| m.gid())));
        std::os::unix::fs::symlink("f", d.join("l")).expect("symlink");
        log.push(res(std::os::unix::fs::lchown(
            d.join("l"),
            Some(99),
            Some(98),
        )));
        set_times(&d.join("f"), (1_000_000, 5), (2_000_000, 6));
        set_times(&d.join("dir"), (3_000_000, 7), (4_000_000, 8));
        set_times(&d.join("l"), (5_000_000, 0), (6_000_000, 0));
        let m = fs::symlink_metadata(d.join("f")).expect("stat");
        log.push(format!(
            "{} {} {} {}",
            m.atime(),
            m.atime_nsec(),
            m.mtime(),
            m.mtime_nsec()
        ));
        log
    });
    // Explicit times are equal on both nodes, atime included (before any
    // read; changes stream to the secondary, so within a bounded wait).
    let times = |d: &Path, name: &str| {
        fs::symlink_metadata(d.join(name))
            .map(|m| (m.atime(), m.atime_nsec(), m.mtime(), m.mtime_nsec()))
            .ok()
    };
    for name in ["f", "dir", "l"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while times(&p.b, name) != times(&p.a, name) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(times(&p.a, name), times(&p.b, name), "{name}");
    }
    p.compare();
}

#[test]
fn xattrs_set_replace_remove() {
    let mut p = Pair::new("xattr", AsyncMode::None);
    p.check(|d| {
        let mut log = Vec::new();
        fs::write(d.join("f"), b"x").expect("write");
        fs::create_dir(d.join("dir")).expect("mkdir");
        let f = d.join("f");
        let flags = rustix::fs::XattrFlags::empty();
        log.push(rres(rustix::fs::setxattr(&f, "user.a", b"1", flags)));
        log.push(rres(rustix::fs::setxattr(
            &f,
            "user.b",
            &[9u8; 4000],
            flags,
        )));
        log.push(rres(rustix::fs::setxattr(
            &f,
            "user.a",
            b"22",
            rustix::fs::XattrFlags::CREATE,
        )));
        log.push(rres(rustix::fs::setxattr(
            &f,
            "user.a",
            b"333",
            rustix::fs::XattrFlags::REPLACE,
        )));
        log.push(rres(rustix::fs::setxattr(
            &f,
            "user.c",
            b"",
            rustix::fs::XattrFlags::REPLACE,
        )));
        log.push(rres(rustix::fs::removexattr(&f, "user.b")));
        log.push(rres(rustix::fs::removexattr(&f, "user.b")));
        log.push(rres(rustix::fs::setxattr(
            d.join("dir"),
            "user.d",
            b"dir",
            flags,
        )));
        let mut small = [0u8; 2];
        log.push(rres(rustix::fs::getxattr(&f, "user.a", &mut small[..])));
        log.push(format!("{:?}", xattrs(&f)));
        log
    });
}

#[test]
fn mmap_write_and_msync() {
    let mut p = Pair::new("mmap", AsyncMode::None);
    p.check(|d| {
        let mut log = Vec::new();
        let f = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .mode(0o644)
            .open(d.join("mapped"))
            .expect("create");
        f.set_len(65536).expect("set_len");
        let len = 65536;
        // SAFETY: a fresh shared mapping of a file we own, unmapped below;
        // no other reference to the region exists.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        // SAFETY: `ptr` maps `len` writable bytes (checked above).
        let region = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) };
        for (i, b) in region.iter_mut().enumerate().step_by(97) {
            *b = u8::try_from(i % 251).unwrap_or(0);
        }
        region[4096..4096 + 11].copy_from_slice(b"mapped data");
        // SAFETY: same mapping, still valid.
        log.push(format!("msync {}", unsafe {
            libc::msync(ptr, len, libc::MS_SYNC)
        }));
        // SAFETY: unmapping the region created above; `region` is not used after.
        log.push(format!("munmap {}", unsafe { libc::munmap(ptr, len) }));
        log.push(res(f.sync_all()));
        drop(f);
        let data = fs::read(d.join("mapped")).expect("read");
        log.push(blake3::hash(&data).to_hex().to_string());
        log
    });
}

#[test]
fn two_concurrent_writers() {
    let mut p = Pair::new("concurrent", AsyncMode::None);
    p.check(|d| {
        let path = d.join("shared");
        File::create(&path).expect("create");
        std::thread::scope(|s| {
            for w in 0..2u8 {
                let path = path.clone();
                s.spawn(move || {
                    let f = OpenOptions::new().write(true).open(&path).expect("open");
                    for i in 0..200u64 {
                        // Disjoint 4 KiB blocks, interleaved.
                        let off = (i * 2 + u64::from(w)) * 4096;
                        f.write_all_at(&[w + 1; 4096], off).expect("write");
                    }
                    f.sync_data().expect("fsync");
                });
            }
        });
        let data = fs::read(&path).expect("read");
        vec![
            data.len().to_string(),
            blake3::hash(&data).to_hex().to_string(),
        ]
    });
    // Overlapping writers: whatever order wins locally wins on the secondary.
    let path = p.a.join("overlap");
    File::create(&path).expect("create");
    std::thread::scope(|s| {
        for w in 0..2u8 {
            let path = path.clone();
            s.spawn(move || {
                let f = OpenOptions::new().write(true).open(&path).expect("open");
                for i in 0..300u64 {
                    f.write_all_at(&[w + 1; 3000], (i % 7) * 1000)
                        .expect("write");
                }
            });
        }
    });
    p.assert_replicated();
}

#[test]
fn fifo_and_fsync_in_second_mode() {
    // async = "second": acknowledged on receipt; the copy converges.
    let mut p = Pair::new("second", AsyncMode::Second);
    p.check(|d| {
        let mut log = Vec::new();
        let fifo = d.join("fifo");
        log.push(rres(rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )));
        let mut f = File::create(d.join("synced")).expect("create");
        for i in 0..50 {
            log.push(res(f.write(format!("record {i}\n").as_bytes())));
            log.push(res(f.sync_data()));
        }
        let g = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DSYNC)
            .open(d.join("synced"))
            .expect("open O_DSYNC");
        log.push(res(g.write_at(b"DSYNC", 0)));
        log
    });
}

#[test]
fn reader_open_while_a_writer_opens() {
    // A writer opening a file a reader holds must work, and the reader must
    // see its writes (with passthrough reads on, the kernel refuses this).
    let mut p = Pair::new("readers", AsyncMode::None);
    p.check(|d| {
        let mut log = Vec::new();
        fs::write(d.join("f"), b"0123456789").expect("write");
        let mut r = File::open(d.join("f")).expect("open ro");
        let mut s = String::new();
        log.push(res(r.read_to_string(&mut s)));
        let w = OpenOptions::new().write(true).open(d.join("f"));
        log.push(format!(
            "{:?}",
            w.as_ref().map(|_| ()).map_err(std::io::Error::raw_os_error)
        ));
        if let Ok(w) = w {
            log.push(res(w.write_at(b"abc", 2)));
        }
        let mut s = String::new();
        log.push(res(r.seek(SeekFrom::Start(0))));
        log.push(res(r.read_to_string(&mut s)));
        log.push(s);
        log
    });
}

/// The inode number of an open fd (`fstat`).
fn fd_ino(fd: &impl std::os::fd::AsFd) -> u64 {
    rustix::fs::fstat(fd).expect("fstat").st_ino
}

#[test]
fn stale_handle_never_reaches_another_file() {
    // A handle on a deleted file (O_PATH, and an open fd) must keep naming
    // the deleted file while new files are created: on a plain directory the
    // handle pins the inode, so no new file can take its number. Through the
    // mount, a new file must never take the deleted file's node id, and
    // reopening the handle through /proc/self/fd gives the deleted file's
    // content, never another file's.
    let mut p = Pair::new("stale", AsyncMode::Second);
    p.check(|d| {
        let mut log = Vec::new();
        for round in 0..6 {
            // Even rounds hold only an O_PATH handle (no open reaches the
            // filesystem), odd rounds only an open fd.
            let victim = d.join(format!("victim{round}"));
            fs::write(&victim, b"the deleted file").expect("write victim");
            let held: std::os::fd::OwnedFd = if round % 2 == 0 {
                rustix::fs::open(
                    &victim,
                    rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .expect("O_PATH open")
            } else {
                File::open(&victim).expect("open victim").into()
            };
            let ino = fd_ino(&held);
            fs::remove_file(&victim).expect("unlink victim");
            // Enough new files for the disk to reuse a freed number at once.
            let mut reused = 0;
            for i in 0..64 {
                let f = d.join(format!("new{round}-{i}"));
                fs::write(&f, format!("new file {i}")).expect("write new");
                if fs::metadata(&f).expect("stat new").ino() == ino {
                    reused += 1;
                }
            }
            log.push(format!(
                "round {round}: new files with the held number: {reused}"
            ));
            let st = rustix::fs::fstat(&held).expect("fstat handle");
            log.push(format!("handle: nlink {} size {}", st.st_nlink, st.st_size));
            let proc = format!("/proc/self/fd/{}", held.as_raw_fd_for_test());
            log.push(format!(
                "reopen: {}",
                res(fs::read(&proc).map(String::from_utf8))
            ));
        }
        log
    });
}

/// `as_raw_fd` for an `OwnedFd` without importing the trait at every use.
trait RawForTest {
    fn as_raw_fd_for_test(&self) -> i32;
}

impl RawForTest for std::os::fd::OwnedFd {
    fn as_raw_fd_for_test(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

#[test]
fn concurrent_namespace_changes_never_fail_spuriously() {
    // Six workers, each in its own directory, create, mkdir, rename and
    // unlink as fast as they can: on a plain directory none of these calls
    // fails; through the mount none may fail either (a reused inode number
    // taken for a node the kernel still holds gave ESTALE, EEXIST, ENOENT).
    let secs: u64 = std::env::var("RFS_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let mut p = Pair::new("stress", AsyncMode::Second);
    let root = p.a.clone();
    let failures = std::sync::Mutex::new(Vec::new());
    let ops = AtomicU32::new(0);
    let until = Instant::now() + Duration::from_secs(secs);
    std::thread::scope(|s| {
        for w in 0..6 {
            let dir = root.join(format!("w{w}"));
            let failures = &failures;
            let ops = &ops;
            s.spawn(move || {
                fs::create_dir(&dir).expect("mkdir worker dir");
                let mut i = 0u64;
                let fail = |what: &str, e: std::io::Error| {
                    failures
                        .lock()
                        .expect("lock")
                        .push(format!("w{w} {what}: {e}"));
                };
                while Instant::now() < until {
                    let f = dir.join(format!("f{i}"));
                    let g = dir.join(format!("g{i}"));
                    let sub = dir.join(format!("d{i}"));
                    if let Err(e) = fs::write(&f, i.to_le_bytes()) {
                        fail("create", e);
                    }
                    if let Err(e) = fs::create_dir(&sub) {
                        fail("mkdir", e);
                    }
                    if let Err(e) = fs::write(sub.join("x"), b"x") {
                        fail("create in subdir", e);
                    }
                    if let Err(e) = fs::rename(&f, &g) {
                        fail("rename", e);
                    }
                    if let Err(e) = fs::metadata(&g) {
                        fail("stat renamed", e);
                    }
                    if let Err(e) = fs::remove_file(&g) {
                        fail("unlink", e);
                    }
                    if let Err(e) = fs::remove_file(sub.join("x")) {
                        fail("unlink in subdir", e);
                    }
                    if let Err(e) = fs::remove_dir(&sub) {
                        fail("rmdir", e);
                    }
                    i += 1;
                    ops.fetch_add(8, Ordering::Relaxed);
                }
            });
        }
    });
    let failures = failures.into_inner().expect("lock");
    eprintln!(
        "{} operations in {secs} s, {} failed",
        ops.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} calls failed, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    p.assert_replicated();
}

#[test]
fn durability_points_are_on_the_secondary_when_they_return() {
    // async = "none", default durability (at fsync): what the application
    // is told is durable — fsync, fdatasync, an O_DSYNC write, msync of a
    // shared mapping, fsync of a directory after a rename — is already in
    // the secondary's copy on disk when the call returns (no wait here).
    let p = Pair::new("durable", AsyncMode::None);
    let on_b = |name: &str| fs::read(p.b.join(name)).ok();
    // write + fsync
    let mut f = File::create(p.a.join("fsynced")).expect("create");
    f.write_all(b"made durable by fsync").expect("write");
    f.sync_all().expect("fsync");
    assert_eq!(
        on_b("fsynced").as_deref(),
        Some(&b"made durable by fsync"[..])
    );
    // write + fdatasync
    f.write_all(b", then fdatasync").expect("write");
    f.sync_data().expect("fdatasync");
    assert_eq!(
        on_b("fsynced").as_deref(),
        Some(&b"made durable by fsync, then fdatasync"[..])
    );
    drop(f);
    // O_DSYNC writes
    let mut dsync = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_DSYNC)
        .open(p.a.join("dsync"))
        .expect("open O_DSYNC");
    for i in 0..20u8 {
        dsync.write_all(&[b'a' + i; 100]).expect("O_DSYNC write");
        let got = on_b("dsync").unwrap_or_default();
        assert_eq!(got.len(), 100 * (usize::from(i) + 1), "O_DSYNC write {i}");
    }
    drop(dsync);
    // mmap + msync
    let mapped = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(p.a.join("mapped"))
        .expect("create");
    mapped.set_len(8192).expect("set_len");
    mapped.sync_all().expect("fsync the size");
    // SAFETY: a fresh shared mapping of a file we own, unmapped below; no
    // other reference to the region exists.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&mapped),
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    // SAFETY: `ptr` maps 8192 writable bytes (checked above).
    let region = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), 8192) };
    region[5000..5011].copy_from_slice(b"mapped data");
    // SAFETY: same mapping, still valid.
    assert_eq!(unsafe { libc::msync(ptr, 8192, libc::MS_SYNC) }, 0, "msync");
    let got = on_b("mapped").unwrap_or_default();
    assert_eq!(
        got.get(5000..5011),
        Some(&b"mapped data"[..]),
        "after msync"
    );
    // SAFETY: unmapping the region created above; `region` is not used after.
    assert_eq!(unsafe { libc::munmap(ptr, 8192) }, 0);
    drop(mapped);
    // Atomic replace: temp file, fsync, rename over, fsync the directory.
    fs::write(p.a.join("target"), b"old").expect("write old");
    let mut tmp = File::create(p.a.join("target.tmp")).expect("create temp");
    tmp.write_all(b"new complete content").expect("write temp");
    tmp.sync_all().expect("fsync temp");
    drop(tmp);
    fs::rename(p.a.join("target.tmp"), p.a.join("target")).expect("rename");
    File::open(&p.a)
        .expect("open dir")
        .sync_all()
        .expect("fsync dir");
    assert_eq!(
        on_b("target").as_deref(),
        Some(&b"new complete content"[..])
    );
    assert!(
        on_b("target.tmp").is_none(),
        "temp name still on the secondary"
    );
}

#[test]
#[expect(clippy::too_many_lines, reason = "the scenario in order")]
fn a_tree_deeper_than_path_max() {
    // 45 levels of 200-byte names: the path from the root is over twice
    // PATH_MAX, yet every call below names at most one level, from the fd
    // of the level above, as `mkdir -p` with `chdir` would: legal on any
    // local filesystem, so through the mount too, and replicated.
    let mut p = Pair::new("deep", AsyncMode::None);
    let name = "d".repeat(200);
    let levels = 45;
    let deep_run = |d: &Path| {
        let mut log = Vec::new();
        let top = rustix::fs::open(d, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
            .expect("open the top");
        let mut dirs = vec![top];
        for _ in 0..levels {
            let here = dirs.last().expect("a level");
            log.push(rres(rustix::fs::mkdirat(
                here,
                name.as_str(),
                Mode::from_raw_mode(0o750),
            )));
            let next = open_sub(here, &name).expect("open the new level");
            dirs.push(next);
        }
        let whole = d.join(vec![name.as_str(); levels].join("/"));
        assert!(whole.as_os_str().len() > 2 * 4096);
        // One call on the whole path: too long for any filesystem.
        log.push(res(fs::metadata(&whole).map(|_| ())));
        let bottom = dirs.last().expect("bottom");
        // A file at the bottom: create, write, fsync, read back.
        let created = rustix::fs::openat(
            bottom,
            "file",
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o640),
        );
        log.push(rres(created.as_ref().map(|_| ()).map_err(|e| *e)));
        let mut f = File::from(created.expect("create at the bottom"));
        log.push(res(f.write_all(b"the content at the bottom of the tree")));
        log.push(res(f.write_at(b"BOTTOM", 4)));
        log.push(res(f.sync_all()));
        drop(f);
        log.push(res(read_at(bottom, "file").map(String::from_utf8)));
        // Rename at the bottom, then up twenty levels.
        log.push(rres(rustix::fs::renameat(
            bottom, "file", bottom, "renamed",
        )));
        log.push(rres(rustix::fs::renameat(
            bottom, "renamed", &dirs[25], "moved-up",
        )));
        log.push(rres(rustix::fs::renameat(
            &dirs[25], "moved-up", bottom, "renamed",
        )));
        // A symlink, read through.
        log.push(rres(rustix::fs::symlinkat("renamed", bottom, "link")));
        log.push(rres(
            rustix::fs::readlinkat(bottom, "link", Vec::new()).map(std::ffi::CString::into_bytes),
        ));
        log.push(res(read_at(bottom, "link").map(String::from_utf8)));
        // Extended attributes on the deep file: set, read, replace, remove.
        let obj = proc_entry(bottom, OsStr::new("renamed"));
        let flags = rustix::fs::XattrFlags::empty();
        log.push(rres(rustix::fs::lsetxattr(
            &obj,
            "user.deep",
            b"one",
            flags,
        )));
        log.push(rres(rustix::fs::lsetxattr(&obj, "user.gone", b"x", flags)));
        log.push(rres(rustix::fs::lsetxattr(
            &obj,
            "user.deep",
            b"two",
            flags,
        )));
        log.push(rres(rustix::fs::lremovexattr(&obj, "user.gone")));
        let mut v = [0u8; 64];
        log.push(rres(
            rustix::fs::lgetxattr(&obj, "user.deep", &mut v[..]).map(|n| v[..n].to_vec()),
        ));
        // Attributes: mode, times.
        log.push(rres(rustix::fs::chmodat(
            bottom,
            "renamed",
            Mode::from_raw_mode(0o604),
            AtFlags::empty(),
        )));
        // A hard link, then a file created, written and unlinked.
        log.push(rres(rustix::fs::linkat(
            bottom,
            "renamed",
            &dirs[levels - 1],
            "hard",
            AtFlags::empty(),
        )));
        let tmp = rustix::fs::openat(
            bottom,
            "tmp",
            OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map(File::from)
        .expect("create tmp");
        log.push(res((&tmp).write_all(b"short-lived")));
        drop(tmp);
        log.push(rres(rustix::fs::unlinkat(bottom, "tmp", AtFlags::empty())));
        log.push(rres(
            rustix::fs::statat(bottom, "tmp", AtFlags::empty()).map(|_| ()),
        ));
        // NAME_MAX still holds for one component.
        log.push(rres(rustix::fs::mkdirat(
            bottom,
            "n".repeat(256).as_str(),
            Mode::from_raw_mode(0o755),
        )));
        // A directory in the middle renamed: everything below moves, and a
        // write below lands at the new path.
        log.push(rres(rustix::fs::renameat(
            &dirs[20],
            name.as_str(),
            &dirs[20],
            "middle",
        )));
        let g = rustix::fs::openat(
            bottom,
            "renamed",
            OFlags::WRONLY | OFlags::APPEND,
            Mode::empty(),
        )
        .map(File::from)
        .expect("reopen");
        log.push(res((&g).write_all(b" and after the move")));
        log.push(res(g.sync_data()));
        drop(g);
        log.push(res(
            read_at(&dirs[levels - 1], "hard").map(String::from_utf8)
        ));
        // An empty directory at the bottom, removed.
        log.push(rres(rustix::fs::mkdirat(
            bottom,
            "empty",
            Mode::from_raw_mode(0o755),
        )));
        log.push(rres(rustix::fs::unlinkat(
            bottom,
            "empty",
            AtFlags::REMOVEDIR,
        )));
        log
    };
    p.check(deep_run);
    // The secondary's copy holds the deep file, content included (compared
    // above by checksum); and is reachable there level by level.
    let b =
        rustix::fs::open(&p.b, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).expect("open b");
    let mut here = b;
    for i in 0..levels {
        let n = if i == 20 { "middle" } else { name.as_str() };
        here = open_sub(&here, n).expect("level on the secondary");
    }
    assert_eq!(
        read_at(&here, "renamed").expect("deep file on the secondary"),
        b"the BOTTOMt at the bottom of the tree and after the move"
    );
}
