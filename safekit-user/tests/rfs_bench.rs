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
use safekit::config::AsyncMode;

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
        config::AsyncMode,
        rfs::{LinkState, Primary, PrimaryParams, RfsError, RfsEvent, SecondaryConfig, serve},
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
        pub(super) fn replicated(a: &Path, b: &Path, mode: AsyncMode) -> Self {
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
            let (primary, events) =
                Primary::start(a, Some(addr), &KEY, PrimaryParams::new(NAME)).expect("mount");
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

/// The temporary directory of this run; removed on drop, with any mount left
/// under it. On creation, leftovers of runs that died are removed too.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        remove_leftovers();
        let base = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
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
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
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

fn print_targets(mode: &str, figures: &[Figures; SIDES]) {
    let (plain, replicated) = (&figures[PLAIN], &figures[REPLICATED]);
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    let write = replicated.seq_write / plain.seq_write;
    let read = replicated.seq_read_cold / plain.seq_read_cold;
    let fsync = replicated.fsync.p99 / plain.fsync.p99;
    println!(
        "  async = {mode}: seq write >= 70 % of unreplicated: {:.0} % {}",
        100.0 * write,
        verdict(write >= 0.70)
    );
    println!(
        "  async = {mode}: seq read (cold) >= 90 % of unreplicated: {:.0} % {}",
        100.0 * read,
        verdict(read >= 0.90)
    );
    println!(
        "  async = {mode}: 4 KiB write+fsync p99 <= 3x unreplicated: {fsync:.1}x {}",
        verdict(fsync <= 3.0)
    );
}

/// Every round of one `async` mode, under `base` (removed after); the
/// medians, per side.
fn run_mode(base: &Path, mode: AsyncMode) -> [Figures; SIDES] {
    let secondary = base.join("b");
    fs::create_dir_all(&secondary).expect("mkdir the secondary's directory");
    let (primary, alone_dir) = (base.join("a"), base.join("m"));
    let sides = [
        Side::new(&base.join("r")),
        Side::new(&alone_dir),
        Side::new(&primary),
    ];
    let alone = rfs::Mount::alone(&alone_dir);
    let mut replicated = rfs::Mount::replicated(&primary, &secondary, mode);
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

#[test]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
fn replicated_mount_vs_plain_directory() {
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        eprintln!("skipped: /dev/fuse unavailable ({e})");
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
        "  reads through a mount: the FUSE inode's page cache (FOPEN_KEEP_CACHE; write-back \
         cache off, so writes go through to the daemon), misses served by the daemon's pread; \
         'cold' drops both the FUSE pages and the real file's (fadvise DONTNEED) first"
    );
    let started = Instant::now();
    let mut results = Vec::new();
    for mode in [AsyncMode::Second, AsyncMode::None] {
        let name = format!("{mode:?}").to_lowercase();
        println!("\nasync = {name:?}");
        let figures = run_mode(&scratch.0.join(&name), mode);
        print_table(&figures);
        results.push((name, figures));
    }
    println!("\ntargets (informational: benchmarks never assert speed):");
    for (mode, figures) in &results {
        print_targets(mode, figures);
    }
    println!(
        "context: FUSE studies measure 5-80 % loss depending on the workload \
         (e.g. Vangoor et al., FAST '17); DRBD claims < 3 % overhead at block level"
    );
    println!("total {:.0} s", started.elapsed().as_secs_f64());
}
