//! Sockets of the daemon: heartbeat UDP per LAN, the control Unix socket.

use std::{net::SocketAddr, os::unix::fs::PermissionsExt as _, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UdpSocket, UnixListener},
    sync::{mpsc, oneshot},
};

use super::{StartError, engine::Event};
use crate::{
    config::ClusterConfig,
    control::{MAX_REQUEST, Response, decode_request},
    heartbeat::codec::MAX_LEN,
    paths::Paths,
};

/// The heartbeat socket bound on one LAN.
#[derive(Debug, Clone)]
pub(super) struct LanSocket {
    /// LAN name.
    pub(super) lan: String,
    /// Bound to (addr, heartbeat port).
    pub(super) socket: Arc<UdpSocket>,
}

/// The node whose configured address exists on this host: binding a UDP
/// socket to an address only succeeds where it is local.
pub(super) fn find_local_node(cluster: &ClusterConfig) -> Result<String, StartError> {
    for node in &cluster.nodes {
        for addr in node.addrs.values() {
            if std::net::UdpSocket::bind(SocketAddr::new(*addr, 0)).is_ok() {
                return Ok(node.name.clone());
            }
        }
    }
    let all: Vec<String> = cluster
        .nodes
        .iter()
        .flat_map(|n| n.addrs.values().map(ToString::to_string))
        .collect();
    Err(StartError::NodeNotFound(all.join(", ")))
}

pub(super) async fn bind_heartbeat_sockets(
    cluster: &ClusterConfig,
    me: &str,
) -> Result<Vec<LanSocket>, StartError> {
    let node = cluster
        .node(me)
        .ok_or_else(|| StartError::UnknownNode(me.to_owned()))?;
    let mut out = Vec::new();
    for lan in cluster.lans.iter().filter(|l| l.heartbeat) {
        let Some(addr) = node.addrs.get(&lan.name) else {
            continue;
        };
        let sa = SocketAddr::new(*addr, cluster.ports.heartbeat);
        let socket = UdpSocket::bind(sa)
            .await
            .map_err(|source| StartError::Bind {
                what: "heartbeat UDP",
                addr: sa,
                source,
            })?;
        out.push(LanSocket {
            lan: lan.name.clone(),
            socket: Arc::new(socket),
        });
    }
    Ok(out)
}

pub(super) async fn receive_heartbeats(
    lan: usize,
    socket: Arc<UdpSocket>,
    tx: mpsc::Sender<Event>,
) {
    let mut buf = vec![0u8; MAX_LEN + 1];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, from)) => {
                let ev = Event::Datagram {
                    lan,
                    from,
                    bytes: buf[..n].to_vec(),
                };
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat receive error");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

pub(super) fn bind_control_socket(paths: &Paths) -> Result<UnixListener, StartError> {
    let path = paths.control_socket();
    let io = |op, source| StartError::Io {
        op,
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(paths.run_dir()).map_err(|e| io("creating the directory of", e))?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(StartError::AlreadyRunning(path.display().to_string()));
        }
        // A socket left by a daemon that died.
        std::fs::remove_file(&path).map_err(|e| io("removing stale", e))?;
    }
    let listener = UnixListener::bind(&path).map_err(|e| io("binding", e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("chmod", e))?;
    Ok(listener)
}

/// Serves `safekit` connections; every command (not the read-only queries)
/// is recorded in `commands_log` with the caller's uid and pid, taken from
/// the socket (`SO_PEERCRED`), and its result.
pub(super) async fn serve_control(
    listener: UnixListener,
    tx: mpsc::Sender<Event>,
    commands_log: std::path::PathBuf,
) {
    let commands_log = Arc::new(commands_log);
    let mut backoff = crate::sys::accept::AcceptBackoff::new("control");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff.ok();
                stream
            }
            Err(e) => {
                backoff.failed(&e).await;
                continue;
            }
        };
        let tx = tx.clone();
        let caller = match stream.peer_cred() {
            Ok(c) => format!(
                "uid {} pid {}",
                c.uid(),
                c.pid().map_or_else(|| "?".to_owned(), |p| p.to_string())
            ),
            Err(e) => format!("uid ? ({e})"),
        };
        let commands_log = Arc::clone(&commands_log);
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut reader = BufReader::new(read);
            loop {
                let Ok(Some(line)) = read_request(&mut reader).await else {
                    return;
                };
                let too_long = line.len() > MAX_REQUEST;
                let response = match decode_request(&line) {
                    Ok(req) => {
                        let command = req.command_line();
                        let (reply, answer) = oneshot::channel();
                        if tx.send(Event::Control { req, reply }).await.is_err() {
                            return;
                        }
                        let response = answer.await.unwrap_or(Response::Error {
                            error: "safekitd is shutting down".into(),
                        });
                        if let Some(command) = command {
                            record_command(&commands_log, &caller, &command, &response.outcome());
                        }
                        response
                    }
                    Err(error) => Response::Error { error },
                };
                let mut text = serde_json::to_string(&response).unwrap_or_default();
                text.push('\n');
                if write.write_all(text.as_bytes()).await.is_err() || too_long {
                    // The rest of an oversized request is not read.
                    return;
                }
            }
        });
    }
}

/// Reads one request line (without its newline), at most
/// [`MAX_REQUEST`] + 1 bytes: a longer one comes back cut there, for the
/// caller to refuse. `None` at the end of the stream.
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt as _;
    let mut line = Vec::new();
    let limit = u64::try_from(MAX_REQUEST + 1).unwrap_or(u64::MAX);
    let n = reader.take(limit).read_until(b'\n', &mut line).await?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    Ok(Some(line))
}

/// Appends `time | uid U pid P | command | result` to the commands log; a
/// failure to write it is reported and never fails the command.
pub(super) fn record_command(path: &std::path::Path, caller: &str, command: &str, outcome: &str) {
    let line = format!(
        "{} | {caller} | {command} | {outcome}\n",
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?
            .write_all(line.as_bytes())
    };
    if let Err(e) = write() {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the commands log");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Request;

    #[tokio::test]
    async fn requests_are_read_whole_up_to_the_limit_and_cut_past_it() {
        let long = vec![b'x'; MAX_REQUEST + 10];
        let mut input = b"{\"request\":\"state\"}\n".to_vec();
        input.extend_from_slice(&long);
        let mut r = BufReader::new(&input[..]);
        let first = read_request(&mut r).await.unwrap().unwrap();
        assert_eq!(decode_request(&first), Ok(Request::State));
        let cut = read_request(&mut r).await.unwrap().unwrap();
        assert_eq!(cut.len(), MAX_REQUEST + 1, "read no further than the limit");
        assert!(decode_request(&cut).unwrap_err().contains("longer than"));
    }
}
