//! Replication benchmark (root, FUSE): the replicating mount (`rfs::Primary`
//! over dir `a`, a secondary applying into dir `b` over loopback TCP) against
//! the same workloads on a plain directory of the same filesystem, side by
//! side in one run, for `async = "second"` and `async = "none"`:
//!
//! 1. sequential 1 MiB writes of a 256 MiB file, fsync at the end;
//! 2. 4 KiB random writes, each followed by fsync, in a 64 MiB file written
//!    beforehand (`fallocate` is refused on the mount);
//! 3. create + write 4 KiB + close + unlink;
//! 4. sequential 1 MiB reads of the 256 MiB file, cold (dropped from the page
//!    cache first) and warm, and 4 KiB random reads, cold.
//!
//! 5. (test `full_resync_rate`) a full resynchronisation of a 256 MiB tree (one 128 MiB file, 64 of
//!    1 MiB, 512 of 128 KiB) to an empty secondary, journal and checkpoints
//!    as in production: resync MB/s, against a plain copy of the same tree
//!    on the same filesystem (read, write, syncfs), and paced by
//!    `resync_bandwidth` = 100 MiB/s (MB/s here are MiB per second);
//! 6. PostgreSQL's pgbench (tpcb-like, scale 10, 4 clients, 30 s;
//!    `RFS_BENCH_PG_SECS` to change, 0 to skip), `pgbench -i` time and TPS,
//!    on a plain directory, the mount ALONE, and the replicated mount at
//!    both durabilities (Debian's postgresql, installed if missing).
//!
//! A third column, the same mount with no secondary (ALONE, no journal),
//! tells what FUSE costs from what replication costs. Each workload runs
//! `ROUNDS` times on each side, interleaved, and the median is printed, then
//! each target met or missed, and the CPU time of each thread during the
//! replicated writes (where the time goes).
//!
//! A benchmark, not a pass/fail test: the only assertions are that
//! replication stayed up (or the figures would not be of replication).
//! `cargo xtask bench replication`, or `cargo test --release -p safekit-user
//! --test rfs_bench -- --ignored --nocapture`.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{Read, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use rustix::{
    fs::{Advice, Mode, OFlags},
    mount::UnmountFlags,
};
use safekit::config::{AsyncMode, Durability};

const MIB: usize = 1 << 20;
const BLOCK: usize = 4096;
/// Sequential file, written then read.
const SEQ_MIB: usize = 256;
/// File of the random writes.
const RAND_MIB: usize = 64;
/// 4 KiB write + fsync operations.
const FSYNC_OPS: usize = 2000;
/// Files created, written, closed and deleted.
const FILES: usize = 2000;
/// 4 KiB random reads.
const RAND_READS: usize = 2000;
/// Runs of every workload on every side; the median is reported.
const ROUNDS: usize = 3;
/// No further round starts if it would likely end past this, per mode (a
/// loaded machine gets fewer rounds rather than a run of many minutes).
const MODE_BUDGET: Duration = Duration::from_secs(45);
/// Temporary directories: `<tmp>/rfs-bench-<pid>`.
const PREFIX: &str = "rfs-bench-";
/// `/proc/<pid>/task/<tid>/stat` counts CPU time in `USER_HZ`, 100 on Linux.
const USER_HZ: f64 = 100.0;

/// The mounts. Every use of the rfs API is in this module, the one spot to
/// adapt when that API changes.
mod rfs {
    use std::{
        path::Path,
        sync::atomic::Ordering,
        time::{Duration, Instant},
    };

    use safekit::{
        config::{AsyncMode, Durability},
        rfs::{
            DirState, LinkState, Primary, PrimaryParams, Registry, RfsError, RfsEvent,
            SecondaryConfig, SecondaryDir, serve, serve_registry,
        },
    };
    use tokio::{runtime::Runtime, sync::mpsc::UnboundedReceiver, task::JoinHandle};

    const KEY: [u8; 32] = [5; 32];
    const NAME: &str = "/bench";
    /// Bound on the secondary becoming live (a resynchronisation may run
    /// first).
    const CONNECT_WAIT: Duration = Duration::from_secs(30);

    /// The replicating mount, with its secondary if it has one. Dropping it
    /// unmounts.
    pub(super) struct Mount {
        primary: Option<Primary>,
        events: UnboundedReceiver<RfsEvent>,
        secondary: Option<JoinHandle<Result<(), RfsError>>>,
        rt: Runtime,
    }

    fn runtime() -> Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime")
    }

    impl Mount {
        /// Mounts over `dir` with no secondary (ALONE, no journal): FUSE
        /// alone.
        pub(super) fn alone(dir: &Path) -> Self {
            let (primary, events) =
                Primary::start(dir, None, &KEY, PrimaryParams::new(NAME)).expect("mount");
            Self {
                primary: Some(primary),
                events,
                secondary: None,
                rt: runtime(),
            }
        }

        /// Starts a secondary applying into `b`, mounts over `a` and waits
        /// until live replication runs.
        pub(super) fn replicated(
            a: &Path,
            b: &Path,
            mode: AsyncMode,
            durability: Durability,
        ) -> Self {
            let rt = runtime();
            let listener = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .expect("bind the secondary's listener");
            let addr = listener.local_addr().expect("listener address");
            let secondary = rt.spawn(serve(
                listener,
                SecondaryConfig {
                    dirs: vec![(NAME.into(), b.to_path_buf())],
                    key: KEY.to_vec(),
                    async_mode: mode,
                    handshake_timeout: Duration::from_secs(5),
                },
                None,
            ));
            let mut params = PrimaryParams::new(NAME);
            params.durability = durability;
            let (primary, events) = Primary::start(a, Some(addr), &KEY, params).expect("mount");
            let mut me = Self {
                primary: Some(primary),
                events,
                secondary: Some(secondary),
                rt,
            };
            me.wait_connected();
            me
        }

        fn primary(&self) -> &Primary {
            self.primary.as_ref().expect("primary running")
        }

        /// Waits (bounded) for `RfsEvent::Connected`, or the link state,
        /// whichever shows first that operations reach the secondary.
        fn wait_connected(&mut self) {
            let deadline = Instant::now() + CONNECT_WAIT;
            loop {
                let events = &mut self.events;
                let ev = self.rt.block_on(async {
                    tokio::time::timeout(Duration::from_millis(100), events.recv()).await
                });
                match ev {
                    Ok(Some(RfsEvent::Connected { .. })) => return,
                    Ok(Some(other)) => println!("  (rfs event while connecting: {other:?})"),
                    Ok(None) => panic!("rfs event channel closed before the secondary connected"),
                    Err(_) => {}
                }
                if self.primary().state() == LinkState::Connected {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "the secondary is not live within {CONNECT_WAIT:?}"
                );
            }
        }

        /// Panics if the secondary was lost: the figures would be of a
        /// primary running alone.
        pub(super) fn assert_connected(&mut self) {
            while let Ok(ev) = self.events.try_recv() {
                assert!(
                    !matches!(
                        ev,
                        RfsEvent::SecondaryLost { .. } | RfsEvent::SecondaryFailed { .. }
                    ),
                    "replication broke during the benchmark: {ev:?}"
                );
            }
            assert_eq!(
                self.primary().state(),
                LinkState::Connected,
                "replication broke during the benchmark"
            );
        }

        /// Bytes of written data sent to the secondary so far.
        pub(super) fn bytes_sent(&self) -> u64 {
            self.primary().counters().bytes_sent.load(Ordering::Relaxed)
        }

        /// Unmounts and stops the secondary.
        pub(super) fn stop(mut self) {
            if let Some(p) = self.primary.take() {
                p.stop().expect("unmount");
            }
        }
    }

    /// A full resynchronisation of `a` to an empty `b` (journal and
    /// synchronisation state under `state`, as the daemon keeps them), at
    /// most `bandwidth` bytes per second: how long until the secondary was
    /// live.
    pub(super) fn full_resync(
        a: &Path,
        b: &Path,
        state: &Path,
        bandwidth: Option<u64>,
    ) -> Duration {
        let rt = runtime();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the secondary's listener");
        let addr = listener.local_addr().expect("listener address");
        let registry = Registry::new();
        registry.add(
            NAME.into(),
            SecondaryDir {
                local: b.to_path_buf(),
                root: None,
                async_mode: AsyncMode::Second,
                state: Some(DirState::new(state.join("b"))),
                quarantine: None,
            },
        );
        let r = std::sync::Arc::clone(&registry);
        let secondary = rt.spawn(async move {
            serve_registry(listener, r, &KEY, Duration::from_secs(5), None).await
        });
        std::fs::create_dir_all(state.join("a")).expect("mkdir the state directory");
        let mut params = PrimaryParams::new(NAME);
        params.journal = Some(state.join("a/journal"));
        params.state = Some(DirState::new(state.join("a")));
        params.resync.bandwidth = bandwidth;
        let started = Instant::now();
        let (primary, events) = Primary::start(a, Some(addr), &KEY, params).expect("mount");
        let mut m = Mount {
            primary: Some(primary),
            events,
            secondary: Some(secondary),
            rt,
        };
        m.wait_connected();
        let took = started.elapsed();
        m.assert_connected();
        m.stop();
        registry.remove(NAME);
        took
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            if let Some(p) = self.primary.take() {
                let _ = p.stop();
            }
            if let Some(s) = &self.secondary {
                s.abort();
            }
        }
    }
}

/// PostgreSQL's pgbench on a directory: `pgbench -i` time and TPS.
mod pg {
    use std::{
        fs,
        os::unix::fs::PermissionsExt,
        path::{Path, PathBuf},
        process::{Command, Stdio},
        time::{Duration, Instant},
    };

    /// pgbench scale (`-s`).
    const SCALE: &str = "10";
    /// Clients (`-c`).
    const CLIENTS: &str = "4";

    /// Where Debian's PostgreSQL binaries are (`/usr/lib/postgresql/<v>/bin`),
    /// installing the `postgresql` package if there are none.
    pub(super) fn binaries() -> Result<PathBuf, String> {
        let find = || {
            let mut v: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
                .ok()?
                .flatten()
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("pgbench").exists() && b.join("initdb").exists())
                .collect();
            v.sort();
            v.pop()
        };
        if let Some(b) = find() {
            return Ok(b);
        }
        println!("  installing Debian's postgresql (apt-get) for pgbench");
        let ok = Command::new("apt-get")
            .args(["install", "-y", "-q", "postgresql"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
        match find() {
            Some(b) if ok => Ok(b),
            _ => Err("postgresql could not be installed (apt-get install postgresql)".into()),
        }
    }

    fn as_postgres(bin: &Path, tool: &str) -> Command {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    }

    fn run(mut c: Command, what: &str) -> Result<String, String> {
        let out = c
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{what}: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{what} failed: {}", text.trim()))
        }
    }

    /// A database cluster in `dir/pg` (a fresh directory), served on a Unix
    /// socket in `dir/sock` until dropped.
    pub(super) struct Db {
        bin: PathBuf,
        data: PathBuf,
        sock: PathBuf,
        port: u16,
    }

    impl Db {
        /// initdb and start the server.
        pub(super) fn start(bin: &Path, dir: &Path, port: u16) -> Result<Self, String> {
            let data = dir.join("pg");
            let sock = dir.join("sock");
            for d in [&data, &sock] {
                fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
                run(
                    {
                        let mut c = Command::new("chown");
                        c.args(["postgres:postgres"]).arg(d);
                        c
                    },
                    "chown",
                )?;
                fs::set_permissions(d, fs::Permissions::from_mode(0o700))
                    .map_err(|e| format!("chmod {}: {e}", d.display()))?;
            }
            let mut init = as_postgres(bin, "initdb");
            init.args(["-A", "trust", "-U", "postgres", "-D"])
                .arg(&data);
            run(init, "initdb")?;
            let mut start = as_postgres(bin, "pg_ctl");
            start
                .args(["-w", "-l"])
                .arg(sock.join("server.log"))
                .args(["-D"])
                .arg(&data)
                .args(["-o"])
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=''",
                    sock.display()
                ))
                .arg("start");
            run(start, "pg_ctl start")?;
            Ok(Self {
                bin: bin.to_path_buf(),
                data,
                sock,
                port,
            })
        }

        fn pgbench(&self) -> Command {
            let mut c = as_postgres(&self.bin, "pgbench");
            c.arg("-h")
                .arg(&self.sock)
                .args(["-p", &self.port.to_string(), "-U", "postgres"]);
            c
        }

        /// `pgbench -i -s 10` (tables dropped and made again): its time.
        pub(super) fn init(&self) -> Result<Duration, String> {
            let mut i = self.pgbench();
            i.args(["-i", "-q", "-s", SCALE, "postgres"]);
            let t = Instant::now();
            run(i, "pgbench -i")?;
            Ok(t.elapsed())
        }

        /// `pgbench -c 4 -j 2 -T secs`: TPS.
        pub(super) fn tps(&self, secs: u64) -> Result<f64, String> {
            let mut b = self.pgbench();
            b.args([
                "-c",
                CLIENTS,
                "-j",
                "2",
                "-T",
                &secs.to_string(),
                "postgres",
            ]);
            let out = run(b, "pgbench")?;
            out.lines()
                .find(|l| l.starts_with("tps = "))
                .and_then(|l| {
                    l.trim_start_matches("tps = ")
                        .split(' ')
                        .next()?
                        .parse()
                        .ok()
                })
                .ok_or_else(|| format!("no tps in pgbench output: {out}"))
        }
    }

    impl Drop for Db {
        fn drop(&mut self) {
            let mut stop = as_postgres(&self.bin, "pg_ctl");
            stop.args(["-w", "-m", "fast", "-D"])
                .arg(&self.data)
                .arg("stop");
            let _ = run(stop, "pg_ctl stop");
        }
    }
}

/// The temporary directory of this run; removed on drop, with any mount left
/// under it. On creation, leftovers of runs that died are removed too.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        Self::named("")
    }

    /// `<tmp>/rfs-bench-<pid><suffix>`: one per benchmark test, which may
    /// run at once.
    fn named(suffix: &str) -> Self {
        remove_leftovers();
        let base = std::env::temp_dir().join(format!("{PREFIX}{}{suffix}", std::process::id()));
        unmount_under(&base);
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).expect("mkdir the scratch directory");
        Self(base)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        unmount_under(&self.0);
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Detaches every mount at or below `base`, deepest first.
fn unmount_under(base: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(base))
        .collect();
    points.sort();
    for p in points.iter().rev() {
        let _ = rustix::mount::unmount(p, UnmountFlags::DETACH);
    }
}

/// Removes scratch directories of earlier runs whose process is gone.
fn remove_leftovers() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.split('-').next())
        else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        unmount_under(&e.path());
        let _ = fs::remove_dir_all(e.path());
    }
}

/// Where a workload runs: the directory the application uses, and the real
/// directory underneath (under a mount, the real files are reachable only
/// through this handle, opened before mounting).
struct Side {
    dir: PathBuf,
    real: File,
}

impl Side {
    fn new(dir: &Path) -> Self {
        fs::create_dir_all(dir).expect("mkdir");
        Self {
            dir: dir.to_path_buf(),
            real: File::open(dir).expect("open the real directory"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Drops `name` from the page cache: the file as the application sees it
    /// (for a mount, the FUSE inode's pages) and the real file underneath
    /// (whose pages the daemon's `pread` would hit).
    fn drop_cache(&self, name: &str) {
        let seen = File::open(self.path(name)).expect("open to drop its cache");
        rustix::fs::fadvise(&seen, 0, None, Advice::DontNeed).expect("fadvise");
        let real = rustix::fs::openat(
            &self.real,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .expect("open the real file");
        rustix::fs::fadvise(&real, 0, None, Advice::DontNeed).expect("fadvise the real file");
    }
}

/// Throughput and latency (milliseconds) of a run of operations.
#[derive(Debug, Clone, Copy, Default)]
struct Ops {
    per_s: f64,
    p50: f64,
    p99: f64,
}

impl Ops {
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    fn of(mut lat: Vec<Duration>, total: Duration) -> Self {
        lat.sort_unstable();
        let at = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)].as_secs_f64() * 1e3;
        Self {
            per_s: lat.len() as f64 / total.as_secs_f64(),
            p50: at(50),
            p99: at(99),
        }
    }
}

/// Every figure of one side (MB/s, or operations).
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    seq_write: f64,
    fsync: Ops,
    create: Ops,
    seq_read_cold: f64,
    seq_read_warm: f64,
    rand_read: Ops,
}

impl Figures {
    /// The median of each figure over rounds.
    fn median(rounds: &[Figures]) -> Figures {
        let m = |get: &dyn Fn(&Figures) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(get).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let ops = |get: &dyn Fn(&Figures) -> Ops| Ops {
            per_s: m(&|f| get(f).per_s),
            p50: m(&|f| get(f).p50),
            p99: m(&|f| get(f).p99),
        };
        Figures {
            seq_write: m(&|f| f.seq_write),
            fsync: ops(&|f| f.fsync),
            create: ops(&|f| f.create),
            seq_read_cold: m(&|f| f.seq_read_cold),
            seq_read_warm: m(&|f| f.seq_read_warm),
            rand_read: ops(&|f| f.rand_read),
        }
    }
}

#[expect(clippy::cast_precision_loss, reason = "a rate")]
fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

/// A fixed pseudo-random sequence (splitmix64): every side gets the same.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        usize::try_from(z % n as u64).expect("below n")
    }

    /// A random `BLOCK`-aligned offset in a file of `mib` MiB.
    fn block_offset(&mut self, mib: usize) -> u64 {
        (self.below(mib * MIB / BLOCK) * BLOCK) as u64
    }
}

/// Writes what the page cache and the disk hold back, so that a workload
/// does not pay for the previous one's writeback.
fn settle() {
    rustix::fs::sync();
}

/// Writes `mib` MiB to `path` in 1 MiB writes, fsyncs; MB/s.
fn write_seq(path: &Path, mib: usize) -> f64 {
    let buf = vec![0x5au8; MIB];
    let start = Instant::now();
    let mut f = File::create(path).expect("create");
    for _ in 0..mib {
        f.write_all(&buf).expect("write");
    }
    f.sync_all().expect("fsync");
    mbps(mib * MIB, start.elapsed())
}

/// 4 KiB writes at random aligned offsets of the `RAND_MIB` file, each
/// followed by fsync.
fn write_fsync(path: &Path) -> Ops {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the random-write file");
    let mut rng = Rng(7);
    let mut buf = [0u8; BLOCK];
    let mut lat = Vec::with_capacity(FSYNC_OPS);
    let start = Instant::now();
    for i in 0..FSYNC_OPS {
        buf.fill(u8::try_from(i % 251).expect("below 251"));
        let off = rng.block_offset(RAND_MIB);
        let t = Instant::now();
        f.write_all_at(&buf, off).expect("pwrite");
        f.sync_all().expect("fsync");
        lat.push(t.elapsed());
    }
    Ops::of(lat, start.elapsed())
}

/// Create, write 4 KiB, close, unlink, `FILES` times.
fn create_delete(dir: &Path) -> Ops {
    fs::create_dir_all(dir).expect("mkdir");
    let buf = [0xc3u8; BLOCK];
    let mut lat = Vec::with_capacity(FILES);
    let start = Instant::now();
    for i in 0..FILES {
        let p = dir.join(format!("f{i}"));
        let t = Instant::now();
        let mut f = File::create(&p).expect("create");
        f.write_all(&buf).expect("write");
        drop(f);
        fs::remove_file(&p).expect("unlink");
        lat.push(t.elapsed());
    }
    Ops::of(lat, start.elapsed())
}

/// Reads `path` to the end in 1 MiB reads; MB/s.
fn read_seq(path: &Path) -> f64 {
    let mut buf = vec![0u8; MIB];
    let start = Instant::now();
    let mut f = File::open(path).expect("open");
    let mut total = 0;
    loop {
        match f.read(&mut buf).expect("read") {
            0 => break,
            n => total += n,
        }
    }
    mbps(total, start.elapsed())
}

/// 4 KiB reads at random aligned offsets of the `SEQ_MIB` file.
fn read_rand(path: &Path) -> Ops {
    let f = File::open(path).expect("open");
    let mut rng = Rng(11);
    let mut buf = [0u8; BLOCK];
    let mut lat = Vec::with_capacity(RAND_READS);
    let start = Instant::now();
    for _ in 0..RAND_READS {
        let off = rng.block_offset(SEQ_MIB);
        let t = Instant::now();
        f.read_exact_at(&mut buf, off).expect("pread");
        lat.push(t.elapsed());
    }
    Ops::of(lat, start.elapsed())
}

/// CPU seconds (user + system) of this process's threads, by thread name
/// (unnamed threads carry their creator's); the calling thread is `app`.
fn thread_cpu() -> BTreeMap<String, f64> {
    let me = fs::read_to_string("/proc/thread-self/comm").unwrap_or_default();
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return by_name;
    };
    for t in tasks.flatten() {
        let (Ok(stat), Ok(comm)) = (
            fs::read_to_string(t.path().join("stat")),
            fs::read_to_string(t.path().join("comm")),
        ) else {
            continue;
        };
        // After the `(comm)` field: state is field 3, utime 14, stime 15.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let ticks: u64 = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse::<u64>().ok())
            .sum();
        let name = if comm == me {
            "app".to_string()
        } else {
            comm.trim().to_string()
        };
        #[expect(clippy::cast_precision_loss, reason = "CPU seconds")]
        let secs = ticks as f64 / USER_HZ;
        *by_name.entry(name).or_insert(0.0) += secs;
    }
    by_name
}

/// Runs `f`, returning its result and `name 0.42 s, ...` for the threads
/// that used CPU meanwhile, with the wall time.
fn with_cpu<T>(f: impl FnOnce() -> T) -> (T, String) {
    let (before, start) = (thread_cpu(), Instant::now());
    let out = f();
    let wall = start.elapsed();
    let after = thread_cpu();
    let mut d: Vec<(&String, f64)> = after
        .iter()
        .map(|(k, v)| (k, v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    d.sort_by(|x, y| y.1.total_cmp(&x.1));
    let threads: Vec<String> = d.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
    (
        out,
        format!(
            "{:.2} s wall; CPU s: {}",
            wall.as_secs_f64(),
            threads.join(", ")
        ),
    )
}

/// The three sides of a comparison.
const SIDES: usize = 3;
/// Indices into `[Side; SIDES]`: the plain directory, then (1) the mount
/// with no secondary, then the replicated mount.
const PLAIN: usize = 0;
const REPLICATED: usize = 2;

/// One round of every workload on every side, one workload at a time on
/// each side (starting with a different side each round) so that all see
/// the same machine load. Prints where the CPU time goes during the
/// replicated writes of the first round.
fn round(sides: &[Side; SIDES], n: usize) -> [Figures; SIDES] {
    let order: Vec<usize> = (0..SIDES).map(|k| (k + n) % SIDES).collect();
    let mut f = [Figures::default(); SIDES];
    let mut cpu = Vec::new();
    for &i in &order {
        settle();
        let (w, c) = with_cpu(|| write_seq(&sides[i].path("seq"), SEQ_MIB));
        f[i].seq_write = w;
        if i == REPLICATED {
            cpu.push(format!("seq write: {c}"));
        }
    }
    for &i in &order {
        write_seq(&sides[i].path("rand"), RAND_MIB);
        settle();
        let (w, c) = with_cpu(|| write_fsync(&sides[i].path("rand")));
        f[i].fsync = w;
        if i == REPLICATED {
            cpu.push(format!("4 KiB write+fsync: {c}"));
        }
    }
    for &i in &order {
        settle();
        f[i].create = create_delete(&sides[i].path("files"));
    }
    for &i in &order {
        sides[i].drop_cache("seq");
        f[i].seq_read_cold = read_seq(&sides[i].path("seq"));
        f[i].seq_read_warm = read_seq(&sides[i].path("seq"));
    }
    for &i in &order {
        sides[i].drop_cache("seq");
        f[i].rand_read = read_rand(&sides[i].path("seq"));
    }
    if n == 0 {
        for c in cpu {
            println!("  replicated {c}");
        }
    }
    f
}

/// The 1, 5 and 15 minute load averages: other jobs may share the machine.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn pct(mount: f64, plain: f64) -> String {
    format!("{:.0} %", 100.0 * mount / plain)
}

fn print_table(figures: &[Figures; SIDES]) {
    let row = |what: &str, cells: [String; SIDES], ratio: String| {
        let [plain, alone, replicated] = cells;
        println!("  {what:<36} {plain:>15} {alone:>15} {replicated:>15} {ratio:>13}");
    };
    let (plain, replicated) = (&figures[PLAIN], &figures[REPLICATED]);
    let rate = |what: &str, get: fn(&Figures) -> f64| {
        row(
            what,
            figures.map(|x| format!("{:.0} MB/s", get(&x))),
            pct(get(replicated), get(plain)),
        );
    };
    let ops = |what: &str, get: fn(&Figures) -> Ops| {
        let (unrepl, repl) = (get(plain), get(replicated));
        row(
            what,
            figures.map(|x| format!("{:.0} op/s", get(&x).per_s)),
            pct(repl.per_s, unrepl.per_s),
        );
        row(
            "    p50 / p99 (ms)",
            figures.map(|x| format!("{:.3} / {:.3}", get(&x).p50, get(&x).p99)),
            format!(
                "{:.1}x / {:.1}x",
                repl.p50 / unrepl.p50,
                repl.p99 / unrepl.p99
            ),
        );
    };
    row(
        "workload (median of rounds)",
        [
            "unreplicated".into(),
            "FUSE alone".into(),
            "replicated".into(),
        ],
        "repl/unrepl".into(),
    );
    rate(&format!("seq write 1 MiB x {SEQ_MIB} + fsync"), |x| {
        x.seq_write
    });
    ops(&format!("4 KiB write+fsync x {FSYNC_OPS}"), |x| x.fsync);
    ops(&format!("create+4 KiB+close+unlink x {FILES}"), |x| {
        x.create
    });
    rate("seq read 1 MiB, cold", |x| x.seq_read_cold);
    rate("seq read 1 MiB, warm (page cache)", |x| x.seq_read_warm);
    ops(&format!("4 KiB random read x {RAND_READS}, cold"), |x| {
        x.rand_read
    });
}

/// The issue's targets (set for `async = "second"` at the default
/// durability; printed for every configuration run).
fn print_targets(mode: &str, figures: &[Figures; SIDES]) {
    let (plain, replicated) = (&figures[PLAIN], &figures[REPLICATED]);
    let verdict = |ok: bool| if ok { "MET" } else { "MISS" };
    let write = replicated.seq_write / plain.seq_write;
    let read = replicated.seq_read_cold / plain.seq_read_cold;
    let create = replicated.create.per_s / plain.create.per_s;
    let fsync = replicated.fsync.p50 - plain.fsync.p50;
    println!(
        "  {mode}: seq write >= 90 % of plain: {:.0} % {}",
        100.0 * write,
        verdict(write >= 0.90)
    );
    println!(
        "  {mode}: 4 KiB write+fsync p50 <= plain + 0.15 ms: plain {:.3} ms, replicated {:.3} ms (+{fsync:.3}) {}",
        plain.fsync.p50,
        replicated.fsync.p50,
        verdict(fsync <= 0.15)
    );
    println!(
        "  {mode}: create/write/close/unlink >= 30 % of plain: {:.0} % {}",
        100.0 * create,
        verdict(create >= 0.30)
    );
    println!(
        "  {mode}: seq read (cold) >= 90 % of plain: {:.0} % {}",
        100.0 * read,
        verdict(read >= 0.90)
    );
}

/// Every round of one `async` mode, under `base` (removed after); the
/// medians, per side.
fn run_mode(base: &Path, mode: AsyncMode, durability: Durability) -> [Figures; SIDES] {
    let secondary = base.join("b");
    fs::create_dir_all(&secondary).expect("mkdir the secondary's directory");
    let (primary, alone_dir) = (base.join("a"), base.join("m"));
    let sides = [
        Side::new(&base.join("r")),
        Side::new(&alone_dir),
        Side::new(&primary),
    ];
    let alone = rfs::Mount::alone(&alone_dir);
    let mut replicated = rfs::Mount::replicated(&primary, &secondary, mode, durability);
    let (start, mut rounds) = (Instant::now(), Vec::new());
    while rounds.len() < ROUNDS {
        let done = rounds.len();
        rounds.push(round(&sides, done));
        let per_round = start.elapsed() / u32::try_from(done + 1).expect("few rounds");
        if start.elapsed() + per_round > MODE_BUDGET {
            break;
        }
    }
    replicated.assert_connected();
    println!(
        "  sent to the secondary: {} MiB of written data; {} round(s), load average {}",
        replicated.bytes_sent() >> 20,
        rounds.len(),
        loadavg()
    );
    replicated.stop();
    alone.stop();
    drop(sides);
    fs::remove_dir_all(base).expect("remove the mode's directories");
    std::array::from_fn(|side| Figures::median(&rounds.iter().map(|r| r[side]).collect::<Vec<_>>()))
}

/// Rounds of the pgbench comparison: each round runs `pgbench -i`, then
/// pgbench for a third of the run length, on every side in turn (starting
/// with a different side each round), so that all see the same machine
/// load; the medians are compared.
const PG_ROUNDS: usize = 3;

/// pgbench (tpcb-like, scale 10, 4 clients) on a plain directory, the
/// mount with no secondary (ALONE), and the replicated mount (`async =
/// "second"`) at both durabilities, all four servers up at once and
/// measured in interleaved rounds; `pgbench -i` time and TPS (medians),
/// then the targets. `RFS_BENCH_PG_SECS` sets the run length per side (30 s
/// by default, split over the rounds; 0 skips).
fn pgbench_compare(base: &Path) {
    let secs = std::env::var("RFS_BENCH_PG_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30u64);
    if secs == 0 {
        println!("\npgbench skipped (RFS_BENCH_PG_SECS=0)");
        return;
    }
    let bin = match pg::binaries() {
        Ok(b) => b,
        Err(e) => {
            println!("\npgbench skipped: {e}");
            return;
        }
    };
    let per_round = (secs / PG_ROUNDS as u64).max(1);
    println!(
        "\npgbench (tpcb-like, scale 10, 4 clients, {PG_ROUNDS} interleaved rounds of {per_round} s \
         per side; {}), load average {}",
        bin.display(),
        loadavg()
    );
    let port = 20_000 + u16::try_from(std::process::id() % 20_000).unwrap_or(0);
    let names = [
        "plain directory",
        "mount, ALONE (no secondary)",
        "PRIM with SECOND, durability = fsync",
        "PRIM with SECOND, durability = every_write",
    ];
    let dirs: Vec<PathBuf> = ["pg-plain", "pg-alone", "pg-a0", "pg-a1"]
        .iter()
        .map(|d| base.join(d))
        .collect();
    for d in &dirs {
        fs::create_dir_all(d).expect("mkdir");
    }
    let alone = rfs::Mount::alone(&dirs[1]);
    let mut prim = Vec::new();
    for (k, durability) in [Durability::Fsync, Durability::EveryWrite]
        .into_iter()
        .enumerate()
    {
        let b = base.join(format!("pg-b{k}"));
        fs::create_dir_all(&b).expect("mkdir");
        prim.push(rfs::Mount::replicated(
            &dirs[2 + k],
            &b,
            AsyncMode::Second,
            durability,
        ));
    }
    let dbs: Vec<Result<pg::Db, String>> = dirs
        .iter()
        .enumerate()
        .map(|(k, d)| pg::Db::start(&bin, d, port + u16::try_from(k).unwrap_or(0)))
        .collect();
    let mut init_times: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut errors: Vec<Option<String>> = dbs.iter().map(|d| d.as_ref().err().cloned()).collect();
    for round in 0..PG_ROUNDS {
        for k in (0..names.len()).map(|i| (i + round) % names.len()) {
            let (Ok(db), None) = (&dbs[k], &errors[k]) else {
                continue;
            };
            match db.init().and_then(|t| Ok((t, db.tps(per_round)?))) {
                Ok((t, v)) => {
                    init_times[k].push(t.as_secs_f64());
                    tps[k].push(v);
                }
                Err(e) => errors[k] = Some(e),
            }
        }
    }
    drop(dbs);
    for m in &mut prim {
        m.assert_connected();
    }
    for m in prim {
        m.stop();
    }
    alone.stop();
    let median = |v: &[f64]| -> Option<f64> {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let rows: Vec<Result<(f64, f64), String>> = (0..names.len())
        .map(
            |k| match (&errors[k], median(&init_times[k]), median(&tps[k])) {
                (Some(e), _, _) => Err(e.clone()),
                (None, Some(i), Some(t)) => Ok((i, t)),
                _ => Err("no round completed".into()),
            },
        )
        .collect();
    print_pg_rows(&names, &rows);
}

/// The pgbench table (medians against the plain directory's) and targets.
fn print_pg_rows(names: &[&str], rows: &[Result<(f64, f64), String>]) {
    let base_row = rows[0].as_ref().ok().copied();
    for (name, r) in names.iter().zip(rows) {
        match (r, base_row) {
            (Ok((init, tps)), Some((init0, tps0))) => println!(
                "  {name:<44} pgbench -i {init:>6.1} s ({:.2}x plain)   {tps:>7.0} TPS ({:.0} % of plain)",
                init / init0,
                100.0 * tps / tps0
            ),
            (Ok((init, tps)), None) => {
                println!("  {name:<44} pgbench -i {init:>6.1} s   {tps:>7.0} TPS");
            }
            (Err(e), _) => println!("  {name:<44} failed: {e}"),
        }
    }
    if let (Some((init0, tps0)), Some(Ok((init, tps)))) = (base_row, rows.get(2)) {
        let verdict = |ok: bool| if ok { "MET" } else { "MISS" };
        println!(
            "  target: pgbench TPS >= 90 % of plain (PRIM, fsync): {:.0} % {}",
            100.0 * tps / tps0,
            verdict(*tps >= 0.9 * tps0)
        );
        let ratio = init / init0;
        println!(
            "  target: pgbench -i <= 1.5x plain (PRIM, fsync): {ratio:.2}x {}",
            verdict(ratio <= 1.5)
        );
    }
}

/// A tree of 256 MiB: one 128 MiB file, 64 of 1 MiB, 512 of 128 KiB in 16
/// directories. Its bytes.
fn resync_tree(root: &Path) -> usize {
    let mut rng = Rng(7);
    let mut bytes = 0;
    let mut put = |rel: &str, len: usize| {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        let mut data = vec![0u8; len];
        for chunk in data.chunks_mut(8) {
            let v = rng.below(usize::MAX).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        fs::write(p, data).expect("write");
        bytes += len;
    };
    put("big", 128 * MIB);
    for i in 0..64 {
        put(&format!("m{}/f{i}", i % 4), MIB);
    }
    for i in 0..512 {
        put(&format!("d{}/s{i}", i % 16), 128 << 10);
    }
    bytes
}

/// Copies the tree `from` to `to` (read, write), then syncs the filesystem:
/// what the disk allows for a copy on one machine.
fn plain_copy(from: &Path, to: &Path) -> Duration {
    fn walk(from: &Path, to: &Path) {
        fs::create_dir_all(to).expect("mkdir");
        for e in fs::read_dir(from).expect("readdir") {
            let e = e.expect("entry");
            let (src, dst) = (e.path(), to.join(e.file_name()));
            if e.file_type().expect("type").is_dir() {
                walk(&src, &dst);
            } else {
                fs::copy(&src, &dst).expect("copy");
            }
        }
    }
    let started = Instant::now();
    walk(from, to);
    let f = File::open(to).expect("open");
    rustix::fs::syncfs(&f).expect("syncfs");
    started.elapsed()
}

/// Full resynchronisation rate, against a plain copy, and paced.
fn resync_compare(base: &Path) {
    let src = base.join("resync-a");
    let bytes = resync_tree(&src);
    let mut plain = Vec::new();
    let mut resync = Vec::new();
    for k in 0..ROUNDS {
        settle();
        let to = base.join(format!("resync-copy{k}"));
        plain.push(mbps(bytes, plain_copy(&src, &to)));
        fs::remove_dir_all(&to).expect("remove");
        settle();
        let (b, state) = (
            base.join(format!("resync-b{k}")),
            base.join(format!("resync-s{k}")),
        );
        fs::create_dir_all(&b).expect("mkdir");
        resync.push(mbps(bytes, rfs::full_resync(&src, &b, &state, None)));
        fs::remove_dir_all(&b).expect("remove");
        fs::remove_dir_all(&state).expect("remove");
    }
    let (b, state) = (base.join("resync-paced"), base.join("resync-paced-s"));
    fs::create_dir_all(&b).expect("mkdir");
    let paced = mbps(
        bytes,
        rfs::full_resync(&src, &b, &state, Some(100 * MIB as u64)),
    );
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (plain, resync) = (median(plain), median(resync));
    println!(
        "\nfull resynchronisation of a {} MiB tree (1 x 128 MiB, 64 x 1 MiB, 512 x 128 KiB) \
         to an empty secondary on this machine; load average {}",
        bytes >> 20,
        loadavg()
    );
    println!(
        "  resync {resync:>6.0} MB/s   plain copy on the same filesystem (read, write, \
         syncfs) {plain:>6.0} MB/s ({:.0} % of it)",
        100.0 * resync / plain
    );
    println!(
        "  resync paced by resync_bandwidth = {} (100 MiB/s): {paced:.0} MB/s",
        100 * MIB
    );
    fs::remove_dir_all(&src).expect("remove");
    fs::remove_dir_all(&b).expect("remove");
    fs::remove_dir_all(&state).expect("remove");
}

/// Whether `/dev/fuse` opens; says why not (the benchmark is skipped).
fn fuse_available() -> bool {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: /dev/fuse unavailable ({e})");
            false
        }
    }
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
fn replicated_mount_vs_plain_directory() {
    if !fuse_available() {
        return;
    }
    let scratch = Scratch::new();
    println!(
        "rfs bench in {}: a plain directory vs the rfs FUSE mount with no secondary vs the \
         replicated mount (secondary on this machine, loopback TCP), same filesystem; \
         load average {}",
        scratch.0.display(),
        loadavg()
    );
    println!(
        "  reads through a mount: the FUSE inode's page cache (FOPEN_KEEP_CACHE), misses \
         served by the daemon's pread; 'cold' drops both the FUSE pages and the real file's \
         (fadvise DONTNEED) first. durability = fsync: FUSE write-back cache on, only fsync \
         waits for the secondary; every_write: each write and metadata change waits"
    );
    let started = Instant::now();
    let mut results = Vec::new();
    // `RFS_BENCH_ONLY=pgbench`: the pgbench comparison alone.
    let pg_only = std::env::var("RFS_BENCH_ONLY").is_ok_and(|v| v == "pgbench");
    let modes = if pg_only {
        Vec::new()
    } else {
        vec![
            (AsyncMode::Second, Durability::Fsync),
            (AsyncMode::None, Durability::Fsync),
            (AsyncMode::Second, Durability::EveryWrite),
        ]
    };
    for (mode, durability) in modes {
        let name = format!("async = {mode:?}, durability = {durability:?}").to_lowercase();
        println!("\n{name}");
        let dir = format!("{mode:?}-{durability:?}").to_lowercase();
        let figures = run_mode(&scratch.0.join(dir), mode, durability);
        print_table(&figures);
        results.push((name, figures));
    }
    println!(
        "\ntargets (issue 11, for async = second at durability = fsync; informational: \
         benchmarks never assert speed):"
    );
    for (mode, figures) in &results {
        print_targets(mode, figures);
    }
    pgbench_compare(&scratch.0);
    println!(
        "context: FUSE studies measure 5-80 % loss depending on the workload \
         (e.g. Vangoor et al., FAST '17); DRBD claims < 3 % overhead at block level"
    );
    println!("total {:.0} s", started.elapsed().as_secs_f64());
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
fn full_resync_rate() {
    if !fuse_available() {
        return;
    }
    let scratch = Scratch::named("-resync");
    resync_compare(&scratch.0);
}
