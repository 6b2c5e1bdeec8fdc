//! `safekitd`: one daemon per node.
//!
//! Tasks (all on one tokio runtime):
//! - the **engine** ([`engine::Engine`]) owns every module and all decisions;
//!   it is the only task that mutates state. It wakes on an event (datagram,
//!   control request) or on its next deadline (a pulse to send, a peer to
//!   declare lost, a module timer), then publishes a [`NodeStatus`] snapshot;
//! - one **heartbeat receiver** per LAN socket forwards datagrams to the engine;
//! - the **control server** accepts `safekit` connections on the Unix socket
//!   and forwards requests to the engine;
//! - the **HTTP server** (port 9010) answers `ready.txt` and `/metrics` from
//!   the published snapshot without touching the engine.

mod checks;
pub mod engine;
mod farm;
mod http;
pub mod mirror;
pub(crate) mod mirror_core;
mod net;
mod rfs;

use std::{net::SocketAddr, sync::Arc};

use tokio::sync::{RwLock, mpsc};

use crate::{config::Config, metrics::Metrics, paths::Paths, status::NodeStatus};

/// What the HTTP server and the control server read.
#[derive(Debug)]
pub struct Shared {
    /// Latest status, published by the engine after each step.
    pub status: RwLock<NodeStatus>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The XDP filters (their per-CPU verdict counters are read at scrape
    /// time).
    pub(crate) dataplane: farm::Dataplane,
}

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// None of the configured nodes has an address on this host.
    #[error(
        "this host has none of the node addresses of cluster.toml ({0}); use --node to name it"
    )]
    NodeNotFound(String),
    /// `--node` names a node that is not in cluster.toml.
    #[error("node {0:?} is not in cluster.toml")]
    UnknownNode(String),
    /// Could not bind a socket.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A module replicates directories but this node has no address on a
    /// replication LAN.
    #[error(
        "a mirror module replicates directories but no LAN with replication = true gives this node an address"
    )]
    NoReplicationLan,
    /// Another daemon answers on the control socket.
    #[error("another safekitd is already running with this root ({0})")]
    AlreadyRunning(String),
    /// File system error on the daemon's own files.
    #[error("{op} {path}: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// This node's address on the replication LAN, replication port.
fn config_replication_addr(engine: &engine::Engine) -> Result<SocketAddr, StartError> {
    engine
        .replication_addr()
        .ok_or(StartError::NoReplicationLan)
}

#[expect(
    clippy::too_many_lines,
    reason = "the daemon's start in order: sockets, listeners, tasks, engine"
)]
/// Runs the daemon until `shutdown` is requested (control socket or signal).
pub async fn run(paths: Paths, config: Config, node: Option<String>) -> Result<(), StartError> {
    let me = match node {
        Some(n) => {
            if config.cluster.node(&n).is_none() {
                return Err(StartError::UnknownNode(n));
            }
            n
        }
        None => net::find_local_node(&config.cluster)?,
    };
    let sockets = net::bind_heartbeat_sockets(&config.cluster, &me).await?;
    let http_addr = SocketAddr::from(([0, 0, 0, 0], config.cluster.ports.http));
    let http_listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .map_err(|source| StartError::Bind {
            what: "HTTP",
            addr: http_addr,
            source,
        })?;
    let control = net::bind_control_socket(&paths)?;
    // Before any command can start a module: VIPs a crashed daemon left.
    let leftovers: Vec<_> = config
        .modules
        .values()
        .filter(|m| m.mode() == crate::config::Mode::Mirror)
        .filter_map(|m| {
            m.vip
                .as_ref()
                .map(|v| (m.name.clone(), v.addrs.clone(), v.interface.clone()))
        })
        .collect();
    mirror::remove_leftover_vips(&leftovers).await;
    // The XDP farm program verified now, off the engine, rather than when
    // the first farm module starts (nftables-only farms skip it).
    let xdp_farm = config.modules.values().any(|m| {
        m.mode() == crate::config::Mode::Farm
            && m.farm
                .as_ref()
                .is_none_or(|f| f.filter != crate::config::FarmFilterBackend::Nftables)
    });
    if xdp_farm {
        tokio::task::spawn_blocking(|| {
            if let Err(e) = crate::farm::filter::FarmFilter::preload() {
                tracing::warn!("preloading the XDP farm filter: {e} (tried again at start)");
            }
        });
    }
    let metrics = Arc::new(Metrics::new(config.modules.keys().map(String::as_str)));
    let (tx, rx) = mpsc::channel(1024);
    let dataplane = farm::Dataplane::default();
    let engine = engine::Engine::new(
        paths,
        config,
        me,
        sockets.clone(),
        metrics.clone(),
        tx.clone(),
        dataplane.clone(),
    )?;
    // Replication listener (TCP 5600 on the replication LAN) when a mirror
    // module replicates directories.
    if engine.replicates() {
        let addr = config_replication_addr(&engine)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "replication",
                addr,
                source,
            })?;
        let (stx, mut srx) = tokio::sync::mpsc::unbounded_channel();
        let registry = Arc::clone(&engine.registry);
        let key = engine.cluster_key().to_vec();
        tokio::spawn(async move {
            if let Err(e) = crate::rfs::serve_registry(
                listener,
                registry,
                &key,
                std::time::Duration::from_secs(5),
                Some(stx),
            )
            .await
            {
                tracing::error!(error = %crate::rfs::error_chain(&e), "replication listener stopped");
            }
        });
        let etx = tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = srx.recv().await {
                if etx.send(engine::Event::RfsSecondary(ev)).await.is_err() {
                    return;
                }
            }
        });
    }
    let shared = Arc::new(Shared {
        status: RwLock::new(engine.status(std::time::Instant::now())),
        metrics,
        dataplane,
    });
    for (lan, sock) in sockets.iter().enumerate() {
        tokio::spawn(net::receive_heartbeats(
            lan,
            sock.socket.clone(),
            tx.clone(),
        ));
    }
    tokio::spawn(net::serve_control(control, tx.clone()));
    tokio::spawn(http::serve(http_listener, shared.clone()));
    let hangups = tx.clone();
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGHUP");
                return;
            }
        };
        while hup.recv().await.is_some() {
            if hangups.send(engine::Event::Reload).await.is_err() {
                return;
            }
        }
    });
    let signals = tx.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = signals.send(engine::Event::Signal).await;
    });
    engine.run(rx, shared).await;
    Ok(())
}
