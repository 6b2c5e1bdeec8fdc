//! Bounded against peers and clients (issue 12, item 5), against real
//! daemons: a mirror module replicating `/srv/data`, node1 PRIM, node2
//! SECOND.
//!
//! - 1,000 connections to node2's TCP 5600 from a client without the
//!   cluster key (half send a bogus handshake, half nothing), held past
//!   the handshake deadline: node2's threads (`/proc/PID/task`) and memory
//!   (`VmRSS`) stay bounded, sampled every 100 ms, the pair stays
//!   PRIM/SECOND throughout, every connection is counted refused, and a
//!   file written on the primary afterwards reaches the secondary;
//! - a 64 MiB control request on node2's control socket: refused with an
//!   error after 64 KiB, memory bounded, the daemon still answers;
//! - node2 at its file-descriptor limit while connections arrive (accept
//!   fails with `EMFILE`): once descriptors are free again the listener
//!   serves again (`safekit rfs verify` goes through it).
//!
//! Prefix `skbd3`, subnet 10.77.123.0/24.

mod common;

use std::{
    io::{BufRead as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use common::{LabModule, http_get, metric, serial, status, wait_for};
use safekit::status::ModuleState;

const MODULE: &str = "bnd";
const DIR: &str = "/srv/data";
const CONNECTIONS: usize = 1000;

fn module() -> LabModule {
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
send_timeout = "2s"
[[rfs.dir]]
path = "{DIR}"
"#
        ),
        scripts: vec![],
    }
}

fn state(lab: &common::Lab, i: usize) -> Option<ModuleState> {
    status(lab, i).module(MODULE).map(|m| m.state)
}

fn cli(lab: &common::Lab, i: usize, args: &[&str]) -> (bool, String) {
    let out = lab.safekit(i, args).expect("run safekit");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Threads and resident memory (KiB) of a process.
fn footprint(pid: u32) -> (usize, u64) {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    (threads, rss)
}

/// Sets a process's soft file descriptor limit (the hard one kept: raising
/// it back needs `CAP_SYS_RESOURCE`); returns the old soft limit.
fn set_nofile(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let p = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: prlimit on a pid with valid rlimit structs (a null new limit
    // only reads).
    let rc = unsafe { libc::prlimit(p, libc::RLIMIT_NOFILE, std::ptr::null(), &raw mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    let rc = unsafe { libc::prlimit(p, libc::RLIMIT_NOFILE, &raw const new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    old.rlim_cur
}

/// Room for this test's own thousand sockets.
fn raise_own_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit of this process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut l);
        l.rlim_cur = l.rlim_max.min(65536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &raw const l);
    }
}

fn refused_total(body: &str) -> f64 {
    ["busy", "handshake_failed", "handshake_timeout", "closed"]
        .iter()
        .filter_map(|r| {
            metric(
                body,
                &format!("safekit_rfs_connections_refused_total{{node=\"node2\",reason=\"{r}\"}}"),
            )
        })
        .sum()
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn unauthenticated_connections_and_oversized_requests_leave_the_daemon_bounded_and_unchanged() {
    let _serial = serial();
    raise_own_nofile();
    let mut lab = common::lab("skbd3", 123, 2, vec![module()]);
    lab.start_daemon(1).expect("start node1");
    lab.start_daemon(2).expect("start node2");
    let (ok, text) = cli(&lab, 1, &["prim", "-m", MODULE]);
    assert!(ok, "{text}");
    let (ok, text) = cli(&lab, 2, &["start", "-m", MODULE]);
    assert!(ok, "{text}");
    let in_sync = |lab: &common::Lab| {
        state(lab, 1) == Some(ModuleState::Prim) && state(lab, 2) == Some(ModuleState::Second)
    };
    wait_for(Duration::from_secs(30), || in_sync(&lab))
        .unwrap_or_else(|| panic!("not PRIM/SECOND: {:?} {:?}", state(&lab, 1), state(&lab, 2)));
    let spec = lab.spec().clone();
    let node2 = spec.node_addr(2);
    let pid = lab.daemon_pid(2).expect("node2 pid");
    std::thread::sleep(Duration::from_millis(500));
    let (threads0, rss0) = footprint(pid);
    println!("node2 safekitd at rest: {threads0} threads, VmRSS {rss0} KiB");

    // 1,000 connections without the key, held 6 s (the deadline is 5 s).
    let target = SocketAddr::from((node2, 5600));
    let client = common::spawn_in_netns(&spec.client_ns(), move || {
        let mut held = Vec::new();
        let mut failed = 0;
        for i in 0..CONNECTIONS {
            match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                Ok(mut s) => {
                    if i % 2 == 0 {
                        // A frame that is no Noise handshake of the key.
                        let mut f = vec![0, 48];
                        f.extend((0..48u8).map(|b| b.wrapping_mul(37)));
                        let _ = s.write_all(&f);
                    }
                    held.push(s);
                }
                Err(_) => failed += 1,
            }
        }
        std::thread::sleep(Duration::from_secs(6));
        (held.len(), failed)
    });
    let (mut max_threads, mut max_rss, mut samples) = (0, 0, 0);
    while !client.is_finished() {
        let (t, r) = footprint(pid);
        max_threads = max_threads.max(t);
        max_rss = max_rss.max(r);
        assert!(
            in_sync(&lab),
            "the pair changed state under the flood: {:?} {:?}",
            state(&lab, 1),
            state(&lab, 2)
        );
        samples += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let (connected, failed) = client.join().expect("client");
    println!(
        "{connected} connections held ({failed} failed to connect); node2 peak: {max_threads} threads, VmRSS {max_rss} KiB over {samples} samples"
    );
    assert!(
        connected >= CONNECTIONS * 9 / 10,
        "only {connected} connected"
    );
    assert!(samples >= 30, "only {samples} samples");
    assert!(
        max_threads <= threads0 + 4,
        "threads grew from {threads0} to {max_threads}"
    );
    assert!(
        max_rss <= rss0 + 32 * 1024,
        "VmRSS grew from {rss0} to {max_rss} KiB"
    );
    let metrics_addr = SocketAddr::from((node2, 9010));
    let counted = wait_for(Duration::from_secs(8), || {
        (refused_total(&http_get(&spec.client_ns(), metrics_addr, "/metrics").1)
            - f64::from(u32::try_from(connected).unwrap()))
        .abs()
            < 0.5
    });
    let body = http_get(&spec.client_ns(), metrics_addr, "/metrics").1;
    assert!(
        counted.is_some(),
        "{connected} connections, refused counted {}:\n{body}",
        refused_total(&body)
    );
    // The data path is untouched.
    let file = lab
        .root(1)
        .join(DIR.trim_start_matches('/'))
        .join("after-flood");
    let through = lab.node_view(1, &file).expect("node1 view");
    std::fs::write(&through, b"still replicated\n").expect("write through the primary");
    let copy = lab
        .root(2)
        .join(DIR.trim_start_matches('/'))
        .join("after-flood");
    wait_for(Duration::from_secs(5), || {
        std::fs::read(&copy).is_ok_and(|b| b == b"still replicated\n")
    })
    .expect("the write reached the secondary");

    // A 64 MiB control request.
    let sock = lab.root(2).join("run/safekit/safekitd.sock");
    let stream = UnixStream::connect(&sock).expect("control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..64 {
            if writer.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut answer = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut answer)
        .expect("an answer");
    drop(stream);
    let _ = flood.join();
    assert!(answer.contains("longer than 65536 bytes"), "{answer}");
    let (_, rss) = footprint(pid);
    assert!(
        rss <= rss0 + 32 * 1024,
        "VmRSS {rss} KiB after the oversized request ({rss0} at rest)"
    );
    assert!(in_sync(&lab), "state changed by the oversized request");

    // Out of file descriptors while connections arrive.
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count) as u64;
    let old = set_nofile(pid, open_fds + 4);
    let starved = common::spawn_in_netns(&spec.client_ns(), move || {
        let held: Vec<TcpStream> = (0..40)
            .filter_map(|_| TcpStream::connect_timeout(&target, Duration::from_secs(2)).ok())
            .collect();
        std::thread::sleep(Duration::from_secs(1));
        held.len()
    });
    let _ = starved.join();
    set_nofile(pid, old);
    let body = http_get(&spec.client_ns(), metrics_addr, "/metrics").1;
    let accept_errors = metric(
        &body,
        "safekit_rfs_connections_refused_total{node=\"node2\",reason=\"accept_error\"}",
    )
    .unwrap_or(0.0);
    assert!(
        accept_errors > 0.0,
        "accept never failed: EMFILE not reached\n{body}"
    );
    // The listener serves again: a verification connects through it.
    let t = Instant::now();
    let verified = wait_for(Duration::from_secs(10), || {
        let (ok, text) = cli(&lab, 1, &["rfs", "verify", "-m", MODULE]);
        ok && text.contains("equal")
    });
    assert!(
        verified.is_some(),
        "rfs verify fails after EMFILE ({:?}): {}",
        t.elapsed(),
        cli(&lab, 1, &["rfs", "verify", "-m", MODULE]).1
    );
    assert!(in_sync(&lab), "state changed by the EMFILE episode");
}
