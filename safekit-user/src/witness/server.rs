//! `safekit witness`: the daemon's loop. One UDP socket; each request is
//! authenticated, decided by [`Grants`], the grants persisted (write,
//! fsync, rename, fsync the directory) when they changed, then answered.
//! A request whose decision cannot be persisted is not answered: the node
//! then hears nothing and waits, as when the witness is down.

use std::{
    net::UdpSocket,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use super::{
    codec::{self, Answer, Message, WitnessKey},
    grants::Grants,
};

/// Errors of the witness daemon.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// The state file exists but cannot be read or parsed.
    #[error("witness state {path}: {detail}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Writing the state file failed.
    #[error("persisting the witness state to {path}: {source}")]
    Persist {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A socket operation failed.
    #[error("witness socket ({op}): {source}")]
    Socket {
        /// The operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Loads the grants (absent file: none granted yet). An unreadable or
/// corrupt file is an error: starting empty could grant a generation twice.
pub fn load(path: &Path) -> Result<Grants, WitnessError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| WitnessError::State {
            path: path.to_path_buf(),
            detail: format!("corrupt ({e}); refusing to start without the grants it holds"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Grants::default()),
        Err(e) => Err(WitnessError::State {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }),
    }
}

/// Writes the grants durably.
pub fn store(path: &Path, g: &Grants) -> Result<(), WitnessError> {
    use std::io::Write as _;
    let err = |source| WitnessError::Persist {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(g).map_err(|e| err(std::io::Error::other(e)))?;
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)
}

/// Serves until `stop` is set (checked every 200 ms).
pub fn serve(
    socket: &UdpSocket,
    key: &WitnessKey,
    state: &Path,
    stop: &AtomicBool,
) -> Result<(), WitnessError> {
    let sock_err = |op| move |source| WitnessError::Socket { op, source };
    let mut grants = load(state)?;
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(sock_err("set_read_timeout"))?;
    let mut buf = [0u8; codec::MAX_LEN + 1];
    let mut dropped = 0u64;
    let mut last_drop_log: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => return Err(sock_err("recv")(e)),
        };
        let req = match codec::decode(&buf[..n], key) {
            Ok(Message::Request(r)) => r,
            Ok(Message::Answer(_)) => continue,
            Err(e) => {
                dropped += 1;
                // At most one line every 10 s: the network can send these.
                if last_drop_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(%from, error = %e, dropped, "witness datagram dropped");
                    last_drop_log = Some(Instant::now());
                }
                continue;
            }
        };
        let d = grants.decide(&req);
        if d.changed {
            if let Err(e) = store(state, &grants) {
                tracing::error!(error = %e, "grant not persisted: not answered");
                grants = load(state)?;
                continue;
            }
            tracing::info!(
                cluster = %req.cluster, module = %req.module, node = %req.node,
                generation = req.generation, "granted"
            );
        }
        let answer = Answer {
            verdict: d.verdict,
            holder: d.holder,
            held: d.held,
            request: req,
        };
        match codec::encode_answer(&answer, key) {
            Ok(b) => {
                if let Err(e) = socket.send_to(&b, from) {
                    tracing::warn!(%from, error = %e, "witness answer not sent");
                }
            }
            Err(e) => tracing::warn!(error = %e, "witness answer not encoded"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::witness::codec::{Request, Verdict};

    /// A witness on a loopback port in a thread; stopped on drop.
    struct Running {
        addr: std::net::SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<Result<(), WitnessError>>>,
    }

    impl Running {
        fn start(key: &WitnessKey, state: &Path) -> Self {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let addr = socket.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let (k, s, st) = (key.clone(), state.to_path_buf(), Arc::clone(&stop));
            let thread = Some(std::thread::spawn(move || serve(&socket, &k, &s, &st)));
            Self { addr, stop, thread }
        }

        fn stop(mut self) -> Result<(), WitnessError> {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.take().unwrap().join().unwrap()
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn ask(w: &Running, key: &WitnessKey, node: &str, generation: u64) -> Option<Verdict> {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let request = Request {
            cluster: "lab".into(),
            module: "web".into(),
            node: node.into(),
            generation,
            nonce: 42,
        };
        client
            .send_to(&codec::encode_request(&request, key).unwrap(), w.addr)
            .unwrap();
        let mut buf = [0u8; codec::MAX_LEN];
        let (len, _) = client.recv_from(&mut buf).ok()?;
        match codec::decode(&buf[..len], key) {
            Ok(Message::Answer(a)) if a.request == request => Some(a.verdict),
            other => panic!("unexpected answer {other:?}"),
        }
    }

    #[test]
    fn grants_survive_a_restart_and_other_keys_get_no_answer() {
        let dir = std::env::temp_dir().join(format!("safekit-witness-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = dir.join("witness.json");
        let key = WitnessKey::derive(&[1; 32]);
        let w = Running::start(&key, &state);
        assert_eq!(ask(&w, &key, "node2", 3), Some(Verdict::Granted));
        assert_eq!(ask(&w, &key, "node1", 3), Some(Verdict::Refused));
        // Not the cluster key: dropped, no answer.
        assert_eq!(ask(&w, &WitnessKey::derive(&[2; 32]), "node1", 9), None);
        w.stop().unwrap();
        // Restarted: it still refuses generation 3 to node1.
        let w = Running::start(&key, &state);
        assert_eq!(ask(&w, &key, "node1", 3), Some(Verdict::Refused));
        assert_eq!(ask(&w, &key, "node1", 4), Some(Verdict::Granted));
        w.stop().unwrap();
        // A corrupt state refuses to start instead of granting afresh.
        std::fs::write(&state, "{not json").unwrap();
        let e = load(&state).unwrap_err().to_string();
        assert!(
            e.contains("corrupt") && e.contains("refusing to start"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
