//! Shared helpers of the privileged cluster tests: the lab (namespaces,
//! bridge, daemons), entering a namespace, talking to a node.
#![allow(dead_code, unreachable_pub, reason = "each test binary uses a subset")]

#[path = "../../../xtask/src/lab.rs"]
pub mod lab;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use safekit::{
    control::{self, Request, Response},
    status::NodeStatus,
};

pub use lab::{Lab, LabModule, LabSpec};

static SERIAL: Mutex<()> = Mutex::new(());

/// Cluster tests measure timings: run them one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Points the lab at this build's binaries.
pub fn use_built_binaries() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_safekitd"));
    // SAFETY: set before any thread of this test reads the environment
    // (tests take `serial()` first and call this right after).
    unsafe { std::env::set_var("SAFEKIT_BIN_DIR", bin.parent().unwrap()) };
}

/// A lab with `nodes` nodes and these modules, in `/tmp/safekit-test-<prefix>`.
pub fn lab(prefix: &str, subnet: u8, nodes: usize, modules: Vec<LabModule>) -> Lab {
    use_built_binaries();
    let spec = LabSpec {
        prefix: prefix.to_owned(),
        nodes,
        subnet,
        modules,
        cluster_extra: String::new(),
    };
    Lab::up(spec, &PathBuf::from(format!("/tmp/safekit-test-{prefix}"))).expect("lab up")
}

/// Runs `f` on a thread that entered network namespace `ns`; sockets it
/// opens live in that namespace.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_netns(ns, f).join().expect("netns thread")
}

/// Like [`in_netns`], without waiting: the thread runs alongside the test.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns file");
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// The node's status through its control socket.
pub fn status(lab: &Lab, node: usize) -> NodeStatus {
    let sock = lab.root(node).join("run/safekit/safekitd.sock");
    match control::call(&sock, &Request::State, Duration::from_secs(5)).expect("control call") {
        Response::State { status } => status,
        other => panic!("unexpected answer {other:?}"),
    }
}

/// Polls `cond` every 10 ms for up to `limit`; returns the time it took.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() <= limit {
        if cond() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// `GET path` on `addr` from inside `ns`: (status code, body).
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_owned();
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (code, body)
    })
}

/// `POST path` with `body` from namespace `ns`: the raw response text.
pub fn http_post_raw(ns: &str, addr: SocketAddr, path: &str, body: &[u8]) -> String {
    let path = path.to_owned();
    let body = body.to_vec();
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(&body).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    })
}

/// The value of a metrics sample `name{labels}` in a /metrics body.
pub fn metric(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The lab's demo service binary.
pub fn demo_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_safekit-demo"))
}

/// `start_both`/`stop_both` (or `start_prim`/`stop_prim`) scripts running
/// the demo service on `listen`, answering with the node name.
pub fn demo_scripts(start: &str, stop: &str, listen: &str) -> Vec<(String, String)> {
    demo_scripts_with(start, stop, listen, "")
}

/// Like [`demo_scripts`], with extra arguments for the demo service (e.g.
/// `--keepalive 20`). The start script returns once the service listens
/// (its pidfile is written then), as a real start script should.
pub fn demo_scripts_with(
    start: &str,
    stop: &str,
    listen: &str,
    extra: &str,
) -> Vec<(String, String)> {
    let demo = demo_bin();
    vec![
        (
            start.to_owned(),
            format!(
                "#!/bin/sh\nrm -f \"$SAFE_ROOT/demo.pid\"\n\"{}\" --listen {listen} --text \"$SAFE_NODE\" --pidfile \"$SAFE_ROOT/demo.pid\" {extra} >/dev/null 2>&1 &\necho \"demo service started on $SAFE_NODE\"\ni=0\nwhile [ ! -s \"$SAFE_ROOT/demo.pid\" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done\n",
                demo.display()
            ),
        ),
        (
            stop.to_owned(),
            "#!/bin/sh\n[ -f \"$SAFE_ROOT/demo.pid\" ] && kill \"$(cat \"$SAFE_ROOT/demo.pid\")\" 2>/dev/null\nrm -f \"$SAFE_ROOT/demo.pid\"\nexit 0\n".to_owned(),
        ),
    ]
}

/// From inside `ns`: connects to `dst` from `src` (a chosen local address
/// and port), reads the demo service's answer, returns its body.
pub fn ask_from(ns: &str, src: SocketAddr, dst: SocketAddr) -> Result<String, String> {
    in_netns(ns, move || ask(src, dst))
}

/// Like [`ask_from`], in the current namespace.
pub fn ask(src: SocketAddr, dst: SocketAddr) -> Result<String, String> {
    ask_within(src, dst, Duration::from_secs(2))
}

/// Like [`ask`], giving up connecting after `connect_timeout`.
pub fn ask_within(
    src: SocketAddr,
    dst: SocketAddr,
    connect_timeout: Duration,
) -> Result<String, String> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(src), Type::STREAM, None).map_err(|e| e.to_string())?;
    s.set_reuse_address(true).map_err(|e| e.to_string())?;
    s.bind(&src.into())
        .map_err(|e| format!("bind {src}: {e}"))?;
    s.connect_timeout(&dst.into(), connect_timeout)
        .map_err(|e| format!("connect {dst} from {src}: {e}"))?;
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("read from {dst}: {e}"))?;
    Ok(text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_owned())
}

/// Many requests from one namespace thread: (source port, answer).
pub fn ask_many(
    ns: &str,
    src_ip: std::net::Ipv4Addr,
    ports: std::ops::Range<u16>,
    dst: SocketAddr,
) -> Vec<(u16, Result<String, String>)> {
    in_netns(ns, move || {
        ports
            .map(|p| (p, ask(SocketAddr::from((src_ip, p)), dst)))
            .collect()
    })
}

/// Reads one UDP datagram from `from` to port 8888 as seen on the wire in
/// the current namespace (`AF_PACKET`), returning its payload.
pub fn capture_heartbeat(from: Ipv4Addr, timeout: Duration) -> Vec<u8> {
    // SAFETY: plain socket syscalls on a fd we own and close.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM,
            i32::from((u16::try_from(libc::ETH_P_IP).unwrap()).to_be()),
        );
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap(),
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            u32::try_from(size_of::<libc::timeval>()).unwrap(),
        );
        let mut buf = vec![0u8; 2048];
        loop {
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            assert!(
                n > 0,
                "no heartbeat captured: {}",
                std::io::Error::last_os_error()
            );
            let p = &buf[..usize::try_from(n).unwrap()];
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if p[9] == 17
                && p[12..16] == from.octets()
                && u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]) == 8888
            {
                libc::close(fd);
                return p[ihl + 8..].to_vec();
            }
        }
    }
}

/// Sends `payload` in a UDP datagram with a spoofed source address (raw
/// socket, `IP_HDRINCL`), from the current namespace.
pub fn send_spoofed(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) {
    let total = 28 + payload.len();
    let mut pkt = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    pkt[2..4].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
    pkt.extend_from_slice(&src.octets());
    pkt.extend_from_slice(&dst.octets());
    pkt.extend_from_slice(&40000u16.to_be_bytes());
    pkt.extend_from_slice(&8888u16.to_be_bytes());
    pkt.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
    pkt.extend_from_slice(&[0, 0]);
    pkt.extend_from_slice(payload);
    // SAFETY: plain socket syscalls on a fd we own and close; the address
    // struct is fully initialised.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let sa = libc::sockaddr_in {
            sin_family: u16::try_from(libc::AF_INET).unwrap(),
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        let n = libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const sa).cast(),
            u32::try_from(size_of::<libc::sockaddr_in>()).unwrap(),
        );
        assert_eq!(
            usize::try_from(n).ok(),
            Some(pkt.len()),
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        libc::close(fd);
    }
}

/// Node `node`'s state of module `name` (`None` when it cannot be asked).
pub fn state_of(lab: &Lab, node: usize, name: &str) -> Option<safekit::status::ModuleState> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| status(lab, node)))
        .ok()
        .and_then(|s| s.module(name).map(|m| m.state))
}

/// A pid a script wrote in `$SAFE_ROOT/<file>`.
pub fn pid_in(lab: &Lab, node: usize, file: &str) -> Option<i32> {
    std::fs::read_to_string(lab.root(node).join(file))
        .ok()
        .and_then(|p| p.trim().parse().ok())
}

/// The process runs (a reaped process has no /proc entry; a zombie is not
/// running either).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// The VIP is on one of node `node`'s interfaces (a mirror VIP lives on lo).
pub fn has_vip(lab: &Lab, node: usize, v: std::net::Ipv4Addr) -> bool {
    let out = lab
        .exec(
            &lab.spec().node_ns(node),
            &["ip", "-4", "-o", "addr", "show"],
        )
        .expect("ip addr");
    String::from_utf8_lossy(&out.stdout).contains(&format!(" {v}/"))
}
