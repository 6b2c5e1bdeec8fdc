//! A stalled or absent secondary never hangs the application; changes made
//! ALONE are journalled; a dead FUSE mount left by a crashed daemon is
//! recovered (root, FUSE).

use std::{
    fs::{self, OpenOptions},
    io::Write,
    net::{SocketAddr, TcpListener},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use safekit::rfs::{
    ChannelKey, LinkState, Primary, PrimaryParams, RfsEvent,
    channel::accept,
    journal::{Change, Journal},
    proto::{Message, Op, RelPath},
};

const KEY: [u8; 32] = [9; 32];

struct Dirs(PathBuf);

impl Dirs {
    fn new(tag: &str) -> Self {
        let base = std::env::temp_dir().join(format!("rfs-recovery-{tag}-{}", std::process::id()));
        let _ = rustix::mount::unmount(base.join("a"), rustix::mount::UnmountFlags::DETACH);
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("a")).expect("mkdir");
        Self(base)
    }
    fn a(&self) -> PathBuf {
        self.0.join("a")
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        for _ in 0..4 {
            let _ = rustix::mount::unmount(self.a(), rustix::mount::UnmountFlags::DETACH);
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A secondary that completes the handshake and the hello, then never reads
/// again (a stalled process). Stops when `stop` is set.
fn stalled_secondary(stop: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    thread::spawn(move || {
        let Ok((s, _)) = l.accept() else { return };
        let key = ChannelKey::from_cluster_key(&KEY).expect("key");
        let Ok((mut tx, mut rx)) = accept(s, &key, Duration::from_secs(5)) else {
            return;
        };
        if !matches!(rx.recv(), Ok(Message::Hello { .. })) {
            return;
        }
        let _ = tx.send(&Message::Welcome {
            sync_id: 0,
            suspects: vec![],
            resume_id: 0,
        });
        // Take part in the resynchronisation until the synchronisation
        // point, then stall: read nothing more, acknowledge nothing.
        while let Ok(Message::Op { seq, op }) = rx.recv() {
            let _ = tx.send(&Message::Ack { seq });
            if matches!(op, Op::InSync { .. }) {
                break;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        drop((tx, rx));
    });
    addr
}

fn params(journal: &Path, send_timeout: Duration) -> PrimaryParams {
    let mut p = PrimaryParams::new("/data");
    p.send_timeout = send_timeout;
    p.journal = Some(journal.to_path_buf());
    p
}

#[test]
fn a_stalled_secondary_does_not_hang_the_writer() {
    let d = Dirs::new("stalled");
    let stop = Arc::new(AtomicBool::new(false));
    let addr = stalled_secondary(Arc::clone(&stop));
    let timeout = Duration::from_secs(1);
    let journal = d.0.join("journal");
    let (primary, mut events) =
        Primary::start(&d.a(), Some(addr), &KEY, params(&journal, timeout)).expect("start");
    assert!(matches!(
        events.blocking_recv(),
        Some(RfsEvent::Connected { .. })
    ));
    assert_eq!(primary.state(), LinkState::Connected);

    // 48 MiB in 1 MiB writes: far more than the socket buffers hold, so the
    // sender blocks on the stalled peer; the writer must be released.
    let start = Instant::now();
    let mut f = fs::File::create(d.a().join("big")).expect("create");
    let chunk = vec![0xabu8; 1 << 20];
    for _ in 0..48 {
        f.write_all(&chunk).expect("write");
    }
    f.sync_all().expect("fsync");
    drop(f);
    let took = start.elapsed();
    assert!(
        took < timeout + Duration::from_secs(8),
        "writer held {took:?} with a {timeout:?} send timeout"
    );
    assert_eq!(primary.state(), LinkState::Alone);
    match events.try_recv() {
        Ok(RfsEvent::SecondaryLost { reason, .. }) => {
            assert!(
                reason.contains("send timeout") || reason.contains("send failed"),
                "{reason}"
            );
        }
        other => panic!("expected SecondaryLost, got {other:?}"),
    }
    assert_eq!(
        fs::metadata(d.a().join("big")).expect("stat").len(),
        48 << 20
    );

    // ALONE: writes go on, each journalled; the journal covers them all.
    let g = OpenOptions::new()
        .write(true)
        .open(d.a().join("big"))
        .expect("open");
    g.write_at(b"alone", 100 << 20).expect("write");
    drop(g);
    fs::write(d.a().join("new"), b"n").expect("write");
    let big = RelPath::new("big").expect("path");
    let dirty = primary.dirty();
    assert!(
        dirty.covers(
            &big,
            Change::Range {
                start: 0,
                end: 48 << 20
            }
        ),
        "{dirty:?}"
    );
    assert!(dirty.covers(
        &big,
        Change::Range {
            start: 100 << 20,
            end: (100 << 20) + 5
        }
    ));
    assert!(dirty.covers(&RelPath::new("new").expect("path"), Change::Meta));
    primary.stop().expect("stop");
    stop.store(true, Ordering::Relaxed);
    // Persisted: a restarted daemon still knows.
    let j = Journal::open(&journal).expect("reopen journal");
    assert_eq!(j.dirty(), &dirty);
}

#[test]
fn an_absent_secondary_starts_alone() {
    let d = Dirs::new("absent");
    // A port nobody listens on.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let start = Instant::now();
    let (primary, mut events) = Primary::start(
        &d.a(),
        Some(addr),
        &KEY,
        params(&d.0.join("journal"), Duration::from_secs(1)),
    )
    .expect("start");
    assert!(matches!(
        events.blocking_recv(),
        Some(RfsEvent::SecondaryLost { .. })
    ));
    assert!(start.elapsed() < Duration::from_secs(6));
    assert_eq!(primary.state(), LinkState::Alone);
    fs::write(d.a().join("f"), b"served anyway").expect("write");
    assert_eq!(fs::read(d.a().join("f")).expect("read"), b"served anyway");
    drop(primary);
    // Unmounted on drop: the real directory holds the file.
    assert_eq!(fs::read(d.a().join("f")).expect("read"), b"served anyway");
}

/// Mounts a FUSE filesystem over `dir` and closes its `/dev/fuse`: what a
/// crashed FUSE daemon leaves (ENOTCONN). `None` without `/dev/fuse`.
fn dead_fuse_mount(dir: &Path, source: &str, fstype: &str) -> Option<()> {
    let fuse = match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("skipped: /dev/fuse unavailable ({e})");
            return None;
        }
    };
    let data = std::ffi::CString::new(format!(
        "fd={},rootmode=40000,user_id=0,group_id=0",
        std::os::fd::AsRawFd::as_raw_fd(&fuse)
    ))
    .expect("no NUL");
    rustix::mount::mount(
        source,
        dir,
        fstype,
        rustix::mount::MountFlags::empty(),
        Some(data.as_c_str()),
    )
    .expect("mount a FUSE to kill");
    drop(fuse);
    let e = fs::metadata(dir).expect_err("dead mount");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    Some(())
}

#[test]
fn a_dead_fuse_mount_is_recovered() {
    let d = Dirs::new("dead");
    fs::write(d.a().join("existing"), b"under the mount").expect("write");
    // What a crashed safekitd leaves: its FUSE mount, source "safekit-rfs".
    if dead_fuse_mount(&d.a(), "safekit-rfs", "fuse").is_none() {
        return;
    }
    let (primary, _events) = Primary::start(
        &d.a(),
        None,
        &KEY,
        params(&d.0.join("journal"), Duration::from_secs(1)),
    )
    .expect("start over a dead mount");
    assert_eq!(
        fs::read(d.a().join("existing")).expect("read through the new mount"),
        b"under the mount"
    );
    drop(primary);
}

#[test]
fn someone_elses_dead_fuse_mount_is_left_alone() {
    let d = Dirs::new("foreign");
    fs::write(d.a().join("existing"), b"under the mount").expect("write");
    // A dead sshfs (say) of the operator's on the directory: not ours to
    // detach. The start fails, naming the directory and the error, and the
    // mount is still there.
    if dead_fuse_mount(&d.a(), "host:/export", "fuse.sshfs").is_none() {
        return;
    }
    let r = Primary::start(
        &d.a(),
        None,
        &KEY,
        params(&d.0.join("journal"), Duration::from_secs(1)),
    );
    let e = r
        .map(|_| ())
        .expect_err("started over someone else's mount");
    let text = safekit::rfs::error_chain(&e);
    assert!(
        text.contains(&d.a().display().to_string()) && text.contains("not connected"),
        "{text}"
    );
    let still = fs::metadata(d.a()).expect_err("the foreign mount is still there");
    assert_eq!(still.raw_os_error(), Some(libc::ENOTCONN));
}
