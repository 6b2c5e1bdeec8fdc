//! Reintegration through the replication library (root, FUSE): a first full
//! resynchronisation, then a secondary that was away gets only what changed
//! while it was, with the application writing during the resynchronisation;
//! both copies end equal by content checksum and metadata.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs::{self, OpenOptions},
    io::Write,
    os::{
        fd::OwnedFd,
        unix::fs::{FileExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use rustix::fs::{AtFlags, Mode, OFlags};
use safekit::{
    config::AsyncMode,
    rfs::{
        DirState, LinkState, Primary, PrimaryParams, Registry, RfsEvent, SecondaryDir,
        serve_registry, state::Side,
    },
};

mod fdwalk;

use fdwalk::{open_sub, read_at};

const KEY: [u8; 32] = [9; 32];
const MIB: usize = 1 << 20;

struct Dirs(PathBuf, String);

impl Dirs {
    fn new(tag: &str) -> Self {
        let base = std::env::temp_dir().join(format!("rfs-resync-{tag}-{}", std::process::id()));
        let _ = rustix::mount::unmount(base.join("a"), rustix::mount::UnmountFlags::DETACH);
        let _ = fs::remove_dir_all(&base);
        for d in ["a", "b", "sa", "sb"] {
            fs::create_dir_all(base.join(d)).expect("mkdir");
        }
        Self(base, format!("/data-{tag}"))
    }
    fn p(&self, d: &str) -> PathBuf {
        self.0.join(d)
    }
    /// The replicated directory's name (one per test: their logs tell
    /// them apart).
    fn name(&self) -> &str {
        &self.1
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(self.p("a"), rustix::mount::UnmountFlags::DETACH);
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Path → (kind, mode, size, mtime, content checksum or link target).
/// Walked by directory fds (`*at` calls), so entries whose path from the
/// root exceeds `PATH_MAX` are compared too; an entry gone meanwhile is
/// left out (the caller compares again).
fn digest(root: &Path) -> BTreeMap<PathBuf, (String, u32, u64, i64, String)> {
    let mut out = BTreeMap::new();
    let top = rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
        .expect("open the root");
    fdwalk::walk(top, |path, dir, name, st| {
        let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
        let is_dir = ft == rustix::fs::FileType::Directory;
        let (kind, sum) = match ft {
            rustix::fs::FileType::Symlink => (
                "link",
                rustix::fs::readlinkat(dir, name, Vec::new())
                    .map(|t| t.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            rustix::fs::FileType::Directory => ("dir", String::new()),
            _ => (
                "file",
                read_at(dir, name).map_or_else(
                    |e| format!("unreadable: {e}"),
                    |data| blake3::hash(&data).to_hex().to_string(),
                ),
            ),
        };
        out.insert(
            path.to_path_buf(),
            (
                kind.to_string(),
                st.st_mode & 0o7777,
                if is_dir {
                    0
                } else {
                    u64::try_from(st.st_size).unwrap_or(0)
                },
                if is_dir { 0 } else { st.st_mtime },
                sum,
            ),
        );
    });
    out
}

fn fill(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            u8::try_from(i % 256)
                .unwrap_or(0)
                .wrapping_mul(31)
                .wrapping_add(seed)
        })
        .collect()
}

struct Secondary {
    rt: tokio::runtime::Runtime,
    task: Option<tokio::task::JoinHandle<()>>,
    addr: std::net::SocketAddr,
    registry: Arc<Registry>,
    name: String,
}

impl Secondary {
    fn start(d: &Dirs, addr: Option<std::net::SocketAddr>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let bind = addr.map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string());
        let l = rt
            .block_on(tokio::net::TcpListener::bind(bind))
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let registry = Registry::new();
        registry.add(
            d.name().into(),
            SecondaryDir {
                local: d.p("b"),
                root: None,
                async_mode: AsyncMode::Second,
                state: Some(DirState::new(d.p("sb"))),
                quarantine: Some(d.p("quarantine")),
            },
        );
        let r = Arc::clone(&registry);
        let task = rt.spawn(async move {
            let _ = serve_registry(l, r, &KEY, Duration::from_secs(5), None).await;
        });
        Self {
            name: d.name().to_string(),
            rt,
            task: Some(task),
            addr,
            registry,
        }
    }

    fn stop(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.registry.remove(&self.name);
        self.rt.shutdown_timeout(Duration::from_secs(2));
    }
}

#[track_caller]
/// The primary over `a` with its journal and state in `sa`, replicating to
/// `sec` (send timeout 5 s).
fn start_primary(
    d: &Dirs,
    sec: &Secondary,
) -> (Primary, tokio::sync::mpsc::UnboundedReceiver<RfsEvent>) {
    let mut params = PrimaryParams::new(d.name());
    params.journal = Some(d.p("sa").join("journal"));
    params.state = Some(DirState::new(d.p("sa")));
    params.send_timeout = Duration::from_secs(5);
    Primary::start(&d.p("a"), Some(sec.addr), &KEY, params).expect("start")
}

fn wait_connected(events: &mut tokio::sync::mpsc::UnboundedReceiver<RfsEvent>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "no resynchronisation within 60 s"
        );
        match events.try_recv() {
            Ok(RfsEvent::Connected { .. }) => return,
            Ok(RfsEvent::SecondaryLost { reason, .. }) => panic!("lost: {reason}"),
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[track_caller]
fn wait_equal(d: &Dirs) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (a, b) = (digest(&d.p("a")), digest(&d.p("b")));
        if a == b {
            return;
        }
        if Instant::now() >= deadline {
            let diff: Vec<_> = a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(v))
                .map(|(k, v)| format!("{}: {v:?} vs {:?}", k.display(), b.get(k)))
                .chain(
                    b.keys()
                        .filter(|k| !a.contains_key(*k))
                        .map(|k| format!("{}: only on the secondary", k.display())),
                )
                .collect();
            panic!("copies differ: {diff:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[expect(clippy::too_many_lines, reason = "the scenario in order")]
fn reintegration_sends_only_what_changed_while_the_application_writes() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("safekit=info")
        .with_test_writer()
        .try_init();
    let d = Dirs::new("reint");
    // A tree already there before the first start: 24 files of 2 MiB in
    // nested directories, a sparse file, a symlink, an xattr.
    for i in 0u8..24 {
        let dir = d.p("a").join(format!("d{}", i % 4)).join("sub");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join(format!("f{i}")), fill(2 * MIB, i)).expect("write");
    }
    let sparse = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(d.p("a").join("sparse"))
        .expect("create");
    sparse.write_at(b"end", (64 * MIB) as u64).expect("write");
    drop(sparse);
    std::os::unix::fs::symlink("d0/sub/f0", d.p("a").join("link")).expect("symlink");
    rustix::fs::setxattr(
        d.p("a").join("d1"),
        "user.tag",
        b"blue",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("setxattr");

    let sec = Secondary::start(&d, None);
    let (primary, mut events) = start_primary(&d, &sec);
    // First start: full resynchronisation; the sparse file stays sparse.
    wait_connected(&mut events);
    assert_eq!(primary.state(), LinkState::Connected);
    wait_equal(&d);
    let full = primary.counters().resync_bytes.load(Ordering::Relaxed);
    assert!(
        full >= (48 * MIB) as u64 && full < (50 * MIB) as u64,
        "full sync sent {full} bytes"
    );
    let b_sparse = fs::metadata(d.p("b").join("sparse")).expect("stat");
    assert!(
        b_sparse.blocks() * 512 < (8 * MIB) as u64,
        "sparse file filled"
    );
    let p = primary.progress();
    assert!(p.full && !p.active && p.files_done >= 30, "{p:?}");

    // The secondary goes away; the application goes on alone.
    let addr = sec.addr;
    sec.stop();
    let f = OpenOptions::new()
        .write(true)
        .open(d.p("a").join("d0/sub/f0"))
        .expect("open");
    f.write_all_at(&[1; 10], 5).expect("write"); // live: fails over to alone
    drop(f);
    let deadline = Instant::now() + Duration::from_secs(10);
    while primary.state() != LinkState::Alone {
        assert!(Instant::now() < deadline, "still connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    // 10 MiB changed across 10 files (1 MiB each at an aligned offset), one
    // file created, one removed, one renamed, one chmod.
    for i in 0..10 {
        let f = OpenOptions::new()
            .write(true)
            .open(d.p("a").join(format!("d{}/sub/f{i}", i % 4)))
            .expect("open");
        f.write_all_at(&fill(MIB, 200), MIB as u64).expect("write");
    }
    fs::write(d.p("a").join("new"), b"created alone").expect("write");
    fs::remove_file(d.p("a").join("d3/sub/f23")).expect("unlink");
    fs::rename(d.p("a").join("d2/sub/f22"), d.p("a").join("renamed")).expect("rename");
    fs::set_permissions(
        d.p("a").join("d1/sub/f21"),
        fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");

    // It comes back; a writer keeps appending during the resynchronisation.
    let sec = Secondary::start(&d, Some(addr));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        let path = d.p("a").join("log");
        std::thread::spawn(move || {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("open log");
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                writeln!(f, "record {n}").expect("append");
                n += 1;
            }
            n
        })
    };
    // The loss of the first secondary was reported: forget it.
    while events.try_recv().is_ok() {}
    let before = primary.counters().resync_bytes.load(Ordering::Relaxed);
    primary.resync(sec.addr, false);
    wait_connected(&mut events);
    stop.store(true, Ordering::Relaxed);
    let records = writer.join().expect("writer");
    assert!(records > 0);
    wait_equal(&d);
    let sent = primary.counters().resync_bytes.load(Ordering::Relaxed) - before;
    // What changed: 10 MiB + the 10 bytes (a 1 MiB chunk) + the new file +
    // the renamed 2 MiB file + the log written meanwhile (its size).
    let log = fs::metadata(d.p("a").join("log")).expect("stat").len();
    let changed = (11 * MIB + 2 * MIB) as u64 + log + 16;
    assert!(
        sent <= changed + changed / 10,
        "resync sent {sent} bytes for {changed} changed"
    );
    let p = primary.progress();
    assert!(!p.full && !p.active, "{p:?}");
    // Live again: a write reaches the secondary.
    fs::write(d.p("a").join("after"), b"live").expect("write");
    wait_equal(&d);
    assert_eq!(primary.state(), LinkState::Connected);
    primary.stop().expect("stop");
    sec.stop();
}

#[test]
fn what_the_secondary_changed_alone_is_quarantined_then_overwritten() {
    let d = Dirs::new("quarantine");
    // Both copies share a synchronisation point, then diverged: the node
    // that now returns as secondary changed `x` alone (its journal says
    // so), the primary changed it too.
    fs::write(d.p("a").join("x"), b"primary's x").expect("write");
    fs::write(d.p("b").join("x"), b"secondary's x").expect("write");
    // Not journalled on either side: a delta resync leaves it alone.
    fs::write(d.p("a").join("y"), b"same").expect("write");
    fs::write(d.p("b").join("y"), b"same").expect("write");
    for s in ["sa", "sb"] {
        DirState::new(d.p(s)).set_sync_id(42).expect("sync id");
    }
    {
        let mut j = safekit::rfs::journal::Journal::open(&DirState::new(d.p("sb")).journal())
            .expect("journal");
        j.record(
            &safekit::rfs::proto::RelPath::new("x").expect("path"),
            safekit::rfs::journal::Change::Tree,
        )
        .expect("record");
        j.sync().expect("sync");
    }
    let sec = Secondary::start(&d, None);
    let mut params = PrimaryParams::new(d.name());
    params.journal = Some(d.p("sa").join("journal"));
    params.state = Some(DirState::new(d.p("sa")));
    let (primary, mut events) =
        Primary::start(&d.p("a"), Some(sec.addr), &KEY, params).expect("start");
    wait_connected(&mut events);
    wait_equal(&d);
    // The secondary's version was kept aside, under a timestamped folder.
    let kept: Vec<PathBuf> = fs::read_dir(d.p("quarantine"))
        .expect("quarantine dir")
        .map(|e| e.expect("entry").path().join("x"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(fs::read(&kept[0]).expect("read"), b"secondary's x");
    // Only the suspect was sent, not the whole tree.
    let sent = primary.counters().resync_bytes.load(Ordering::Relaxed);
    assert_eq!(sent, b"primary's x".len() as u64);
    let p = primary.progress();
    assert!(!p.full, "{p:?}");
    primary.stop().expect("stop");
    sec.stop();
}

/// `levels` directories of 200-byte names made level by level below
/// `top` (a directory opened on the primary's copy or its mount): the fds
/// of the top and of every level.
fn deep_dirs(top: &Path, levels: usize) -> Vec<OwnedFd> {
    let name = "d".repeat(200);
    let mut dirs = vec![
        rustix::fs::open(top, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).expect("open"),
    ];
    for _ in 0..levels {
        let here = dirs.last().expect("a level");
        match rustix::fs::mkdirat(here, name.as_str(), Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => panic!("mkdirat: {e}"),
        }
        let next = open_sub(here, OsStr::new(&name)).expect("open the level");
        dirs.push(next);
    }
    dirs
}

/// Writes `data` at `offset` of `dir/name` (created if missing).
fn write_at(dir: &OwnedFd, name: &str, data: &[u8], offset: u64) {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .expect("open for writing");
    fs::File::from(fd)
        .write_all_at(data, offset)
        .expect("write");
}

#[test]
fn a_tree_deeper_than_path_max_is_resynchronised_and_verified() {
    // 45 levels of 200-byte names (over twice PATH_MAX from the root), with
    // files at several depths: a full resynchronisation copies it, verify
    // finds both copies equal, and what changes down there while the
    // secondary is away is sent again by the journal.
    let d = Dirs::new("deep");
    let levels = 45;
    {
        let dirs = deep_dirs(&d.p("a"), levels);
        let bottom = dirs.last().expect("bottom");
        write_at(bottom, "big", &fill(3 * MIB, 7), 0);
        write_at(bottom, "sparse", b"end", (16 * MIB) as u64);
        write_at(&dirs[20], "middle", b"in the middle", 0);
        rustix::fs::symlinkat("big", bottom, "link").expect("symlink");
        rustix::fs::setxattr(
            format!("/proc/self/fd/{}/big", bottom.as_raw_fd_for_test()),
            "user.deep",
            b"value",
            rustix::fs::XattrFlags::empty(),
        )
        .expect("setxattr");
    }
    let sec = Secondary::start(&d, None);
    let (primary, mut events) = start_primary(&d, &sec);
    wait_connected(&mut events);
    wait_equal(&d);
    let a = digest(&d.p("a"));
    assert_eq!(a.len(), levels + 4, "{:?}", a.keys().collect::<Vec<_>>());
    assert!(
        a.keys().any(|p| p.as_os_str().len() > 2 * 4096),
        "the tree is deeper than twice PATH_MAX"
    );
    let (entries, diffs) = primary.verifier().verify(sec.addr).expect("verify");
    assert_eq!(entries, levels + 4);
    assert!(diffs.is_empty(), "{diffs:?}");

    // The secondary goes away; down there, through the mount, a write goes
    // on alone, a file is created, one renamed, one removed.
    let addr = sec.addr;
    sec.stop();
    {
        let dirs = deep_dirs(&d.p("a"), levels);
        let bottom = dirs.last().expect("bottom");
        write_at(bottom, "big", &[1; 10], 5);
        let deadline = Instant::now() + Duration::from_secs(10);
        while primary.state() != LinkState::Alone {
            assert!(Instant::now() < deadline, "still connected");
            std::thread::sleep(Duration::from_millis(20));
        }
        write_at(bottom, "big", &fill(MIB, 9), (2 * MIB) as u64);
        write_at(bottom, "new", b"created alone, deep", 0);
        rustix::fs::renameat(&dirs[20], "middle", bottom, "moved").expect("rename");
        rustix::fs::unlinkat(bottom, "sparse", AtFlags::empty()).expect("unlink");
    }
    let sec = Secondary::start(&d, Some(addr));
    while events.try_recv().is_ok() {}
    let before = primary.counters().resync_bytes.load(Ordering::Relaxed);
    primary.resync(sec.addr, false);
    wait_connected(&mut events);
    wait_equal(&d);
    let sent = primary.counters().resync_bytes.load(Ordering::Relaxed) - before;
    // Two 1 MiB chunks of the big file and the two small files: not the
    // whole tree again.
    assert!(sent <= (2 * MIB + 4096) as u64, "resync sent {sent} bytes");
    assert!(!primary.progress().full);
    let (entries, diffs) = primary.verifier().verify(sec.addr).expect("verify");
    assert_eq!(entries, levels + 4);
    assert!(diffs.is_empty(), "{diffs:?}");
    // Live again, down there too.
    {
        let dirs = deep_dirs(&d.p("a"), levels);
        write_at(dirs.last().expect("bottom"), "after", b"live", 0);
    }
    wait_equal(&d);
    assert_eq!(primary.state(), LinkState::Connected);
    primary.stop().expect("stop");
    sec.stop();
}

/// `as_raw_fd` for an `OwnedFd`.
trait RawForTest {
    fn as_raw_fd_for_test(&self) -> i32;
}

impl RawForTest for OwnedFd {
    fn as_raw_fd_for_test(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

/// A TCP relay between the primary and the secondary whose connections can
/// be cut (a broken link: both ends see the connection fail).
struct Relay {
    addr: std::net::SocketAddr,
    conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    fn start(to: std::net::SocketAddr) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let kept = Arc::clone(&conns);
        std::thread::spawn(move || {
            for incoming in listener.incoming() {
                let Ok(near) = incoming else { return };
                let Ok(far) = std::net::TcpStream::connect(to) else {
                    continue;
                };
                for (mut from, mut into) in [
                    (
                        near.try_clone().expect("clone"),
                        far.try_clone().expect("clone"),
                    ),
                    (
                        far.try_clone().expect("clone"),
                        near.try_clone().expect("clone"),
                    ),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut into);
                        let _ = into.shutdown(std::net::Shutdown::Both);
                    });
                }
                let mut all = kept.lock().expect("lock");
                all.push(near);
                all.push(far);
            }
        });
        Self { addr, conns }
    }

    fn cut(&self) {
        for s in self.conns.lock().expect("lock").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A tree of known size: one big file, files of a few MiB, many small
/// ones in nested directories, some empty ones and symlinks. Its bytes.
fn mixed_tree(root: &Path) -> u64 {
    let mut bytes = 0u64;
    let mut put = |rel: &str, len: usize, seed: u8| {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, fill(len, seed)).expect("write");
        bytes += len as u64;
    };
    put("db/big", 160 * MIB, 1);
    for i in 0..48u8 {
        put(&format!("media/m{}/f{i}", i % 4), 2 * MIB, i);
    }
    for i in 0..160u8 {
        put(
            &format!("docs/y{}/q{}/doc{i}", i % 5, i % 3),
            256 << 10,
            i.wrapping_add(7),
        );
    }
    for i in 0..64u8 {
        put(&format!("etc/c{i}"), usize::from(i) * 37, i);
    }
    for i in 0..8 {
        fs::create_dir_all(root.join(format!("empty/e{i}"))).expect("mkdir");
        std::os::unix::fs::symlink(format!("../db/big{i}"), root.join(format!("etc/l{i}")))
            .expect("symlink");
    }
    bytes
}

#[expect(clippy::cast_precision_loss, reason = "a ratio to print")]
fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b as f64
}

/// Waits until the primary sent at least `bytes` of resynchronisation.
#[track_caller]
fn wait_sent(primary: &Primary, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while primary.counters().resync_bytes.load(Ordering::Relaxed) < bytes {
        assert!(Instant::now() < deadline, "resynchronisation stalled");
        assert_ne!(primary.state(), LinkState::Connected, "done before the cut");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for the report of the loss (it follows the state: drained before
/// it, it would be taken for a loss of the next attempt).
#[track_caller]
fn wait_lost(events: &mut tokio::sync::mpsc::UnboundedReceiver<RfsEvent>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no loss reported");
        match events.try_recv() {
            Ok(RfsEvent::SecondaryLost { .. }) => return,
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

#[track_caller]
fn wait_alone(primary: &Primary) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while primary.state() != LinkState::Alone {
        assert!(Instant::now() < deadline, "the cut was not noticed");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn params(d: &Dirs) -> PrimaryParams {
    let mut params = PrimaryParams::new(d.name());
    params.journal = Some(d.p("sa").join("journal"));
    params.state = Some(DirState::new(d.p("sa")));
    params.send_timeout = Duration::from_secs(5);
    params
}

/// Both copies equal: by the library's verification (the real files on
/// both sides: content, metadata, times), and by content as the
/// application sees them. (Not by mtime through the mount: with the
/// write-back cache the kernel shows the time of the write(2) while the
/// file underneath has the time its data was written back, which may be a
/// later second.)
#[track_caller]
fn assert_verified(d: &Dirs, primary: &Primary, sec: &Secondary) {
    assert_verified_min(d, primary, sec, 100);
}

#[track_caller]
fn assert_verified_min(d: &Dirs, primary: &Primary, sec: &Secondary, min: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (n, diffs) = primary.verifier().verify(sec.addr).expect("verify");
        if diffs.is_empty() {
            assert!(n >= min, "{n} entries");
            break;
        }
        assert!(Instant::now() < deadline, "{n} entries: {diffs:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let content = |root: &Path| {
        digest(root)
            .into_iter()
            .map(|(p, (kind, mode, size, _, sum))| (p, (kind, mode, size, sum)))
            .collect::<BTreeMap<_, _>>()
    };
    assert!(content(&d.p("a")) == content(&d.p("b")), "contents differ");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The connection breaks (both sides live on).
    Link,
    /// The secondary stops and starts again.
    Secondary,
    /// The primary stops (its journal stays) and starts again.
    Primary,
}

/// A first full synchronisation of a tree of about 300 MiB, cut at about
/// half, then resumed: it ends with equal copies, and everything the
/// attempts sent together is within 1.1 times the tree.
fn full_sync_cut_at_half(tag: &str, cut: Cut) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("safekit=info")
        .with_test_writer()
        .try_init();
    let d = Dirs::new(tag);
    let tree = mixed_tree(&d.p("a"));
    let mut sec = Secondary::start(&d, None);
    let relay = Relay::start(sec.addr);
    let (mut primary, mut events) =
        Primary::start(&d.p("a"), Some(relay.addr), &KEY, params(&d)).expect("start");
    let started = Instant::now();
    wait_sent(&primary, tree / 2);
    let mut sent = 0;
    match cut {
        Cut::Link => {
            relay.cut();
            wait_alone(&primary);
            wait_lost(&mut events);
        }
        Cut::Secondary => {
            let addr = sec.addr;
            sec.stop();
            wait_alone(&primary);
            wait_lost(&mut events);
            sec = Secondary::start(&d, Some(addr));
        }
        Cut::Primary => {
            sent += primary.counters().resync_bytes.load(Ordering::Relaxed);
            primary.stop().expect("stop");
            // What the stop may still count is lost with it: counted above
            // it would be a few MiB more sent (and resent) at most.
            let (p, e) = Primary::start(&d.p("a"), None, &KEY, params(&d)).expect("restart");
            primary = p;
            events = e;
        }
    }
    let first = sent.max(primary.counters().resync_bytes.load(Ordering::Relaxed));
    let before = if cut == Cut::Primary { 0 } else { first };
    while events.try_recv().is_ok() {}
    primary.resync(relay.addr, false);
    wait_connected(&mut events);
    let took = started.elapsed();
    let p = primary.progress();
    assert!(p.resumed && !p.full, "{p:?}");
    let second = primary.counters().resync_bytes.load(Ordering::Relaxed) - before;
    let total = first + second;
    eprintln!(
        "{cut:?} cut: tree {} MiB, first attempt {} MiB, resumed {} MiB, total {:.3}x the tree, {} checkpoints, {:.1} s",
        tree >> 20,
        first >> 20,
        second >> 20,
        ratio(total, tree),
        primary.counters().checkpoints.load(Ordering::Relaxed),
        took.as_secs_f64()
    );
    assert!(
        second < tree - tree / 3,
        "the resumed attempt sent {second} of {tree}: it started again"
    );
    assert!(
        total <= tree + tree / 10,
        "sent {total} bytes in all for a tree of {tree}"
    );
    assert_verified(&d, &primary, &sec);
    // Live from there.
    fs::write(d.p("a").join("after"), b"live").expect("write");
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::read(d.p("b").join("after")).ok().as_deref() != Some(b"live") {
        assert!(Instant::now() < deadline, "not replicated live");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(primary.state(), LinkState::Connected);
    primary.stop().expect("stop");
    sec.stop();
}

#[test]
fn a_full_sync_cut_by_a_broken_link_resumes_where_it_stopped() {
    full_sync_cut_at_half("cut-link", Cut::Link);
}

#[test]
fn a_full_sync_cut_by_a_secondary_restart_resumes_where_it_stopped() {
    full_sync_cut_at_half("cut-second", Cut::Secondary);
}

#[test]
fn a_full_sync_cut_by_a_primary_restart_resumes_where_it_stopped() {
    full_sync_cut_at_half("cut-prim", Cut::Primary);
}

#[test]
#[expect(clippy::too_many_lines, reason = "the scenario in order")]
fn a_delta_resync_cut_by_a_broken_link_resumes_where_it_stopped() {
    let d = Dirs::new("cut-delta");
    for i in 0..24u8 {
        let p = d.p("a").join(format!("base/s{}/f{i}", i % 3));
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, fill(4 * MIB, i)).expect("write");
    }
    let sec = Secondary::start(&d, None);
    let relay = Relay::start(sec.addr);
    let (primary, mut events) =
        Primary::start(&d.p("a"), Some(relay.addr), &KEY, params(&d)).expect("start");
    wait_connected(&mut events);
    wait_equal(&d);
    // The link breaks; the application goes on alone and changes about
    // 190 MiB: two MiB of each file, 80 new files of 1 MiB, a new 64 MiB one.
    relay.cut();
    wait_alone(&primary);
    wait_lost(&mut events);
    let mut changed = 0u64;
    for i in 0..24u8 {
        let f = OpenOptions::new()
            .write(true)
            .open(d.p("a").join(format!("base/s{}/f{i}", i % 3)))
            .expect("open");
        for at in [0, 2] {
            f.write_all_at(&fill(MIB, 100 + i), (at * MIB) as u64)
                .expect("write");
            changed += MIB as u64;
        }
    }
    for i in 0..80u8 {
        let p = d.p("a").join(format!("new/n{}/g{i}", i % 4));
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, fill(MIB, i)).expect("write");
        changed += MIB as u64;
    }
    fs::write(d.p("a").join("new/big"), fill(64 * MIB, 9)).expect("write");
    changed += (64 * MIB) as u64;
    // Meanwhile the application appends to a log and rewrites pieces of
    // files being sent, across both attempts: what it changes after a
    // checkpoint must stay in the journal.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, root) = (Arc::clone(&stop), d.p("a"));
        std::thread::spawn(move || {
            let mut log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(root.join("log"))
                .expect("open log");
            let big = OpenOptions::new()
                .write(true)
                .open(root.join("new/big"))
                .expect("open");
            let mut written = 0u64;
            for n in 0u32..200_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                writeln!(log, "record {n}").expect("append");
                if n % 64 == 0 {
                    let at = u64::from(n / 64 % 1024) * (64 << 10);
                    big.write_all_at(&[u8::try_from(n % 251).unwrap_or(0); 4096], at)
                        .expect("write");
                    written += 4096;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            written
        })
    };
    while events.try_recv().is_ok() {}
    let before = primary.counters().resync_bytes.load(Ordering::Relaxed);
    primary.resync(relay.addr, false);
    wait_sent(&primary, before + changed / 2);
    relay.cut();
    wait_alone(&primary);
    wait_lost(&mut events);
    let first = primary.counters().resync_bytes.load(Ordering::Relaxed) - before;
    while events.try_recv().is_ok() {}
    primary.resync(relay.addr, false);
    wait_connected(&mut events);
    stop.store(true, Ordering::Relaxed);
    changed +=
        writer.join().expect("writer") + fs::metadata(d.p("a").join("log")).expect("stat").len();
    let total = primary.counters().resync_bytes.load(Ordering::Relaxed) - before;
    let p = primary.progress();
    assert!(!p.full, "{p:?}");
    eprintln!(
        "delta cut: changed {} MiB, first attempt {} MiB, resumed {} MiB, total {:.3}x what changed",
        changed >> 20,
        first >> 20,
        (total - first) >> 20,
        ratio(total, changed)
    );
    assert!(
        total - first < changed - changed / 3,
        "the resumed attempt sent {} of {changed}: it started again",
        total - first
    );
    assert!(
        total <= changed + changed / 10,
        "sent {total} bytes in all for {changed} changed"
    );
    assert_verified(&d, &primary, &sec);
    primary.stop().expect("stop");
    sec.stop();
}

#[test]
fn a_full_sync_is_not_resumed_on_a_secondary_that_forgot_it() {
    let d = Dirs::new("forgot");
    for i in 0..16u8 {
        let p = d.p("a").join(format!("f{i}"));
        fs::write(p, fill(2 * MIB, i)).expect("write");
    }
    let tree = (32 * MIB) as u64;
    let sec = Secondary::start(&d, None);
    let relay = Relay::start(sec.addr);
    let mut params = params(&d);
    // Paced: slow enough to be cut at half.
    params.resync.bandwidth = Some(16 << 20);
    let (primary, mut events) =
        Primary::start(&d.p("a"), Some(relay.addr), &KEY, params).expect("start");
    wait_sent(&primary, tree / 2);
    relay.cut();
    wait_alone(&primary);
    wait_lost(&mut events);
    let first = primary.counters().resync_bytes.load(Ordering::Relaxed);
    // What `safekit second fullsync` does on the secondary's node.
    let sb = DirState::new(d.p("sb"));
    assert_ne!(sb.resume_id(Side::Received), 0, "recorded on receipt");
    sb.forget_resume(Side::Received).expect("forget");
    primary.resync(relay.addr, false);
    wait_connected(&mut events);
    let p = primary.progress();
    assert!(p.full && !p.resumed, "{p:?}");
    let second = primary.counters().resync_bytes.load(Ordering::Relaxed) - first;
    assert!(second >= tree, "the whole tree again: {second} of {tree}");
    assert_verified_min(&d, &primary, &sec, 16);
    // In sync: both sides forgot the full resynchronisation.
    assert_eq!(DirState::new(d.p("sa")).resume_id(Side::Sent), 0);
    assert_eq!(sb.resume_id(Side::Received), 0);
    primary.stop().expect("stop");
    sec.stop();
}
