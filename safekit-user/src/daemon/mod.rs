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
//! - the **HTTP and HTTPS servers** (ports 9010, 9453; [`api`]) answer
//!   `ready.txt`, `/metrics`, the REST API and the console from the
//!   published snapshot; control verbs go to the engine as the control
//!   socket's do.

mod api;
mod arbiter;
mod checks;
pub(crate) mod config_apply;
pub mod engine;
mod farm;
pub mod guard;
pub mod mirror;
pub(crate) mod mirror_core;
mod net;
mod notify;
mod rfs;

use std::{net::SocketAddr, sync::Arc};

use tokio::sync::{RwLock, mpsc};

use crate::{config::Config, metrics::Metrics, paths::Paths, status::NodeStatus};

/// `safekitd`'s command line (its man page, safekitd(8), is generated from
/// it).
#[derive(clap::Parser, Debug)]
#[command(
    name = "safekitd",
    version,
    about = "The safekit daemon: runs this node's application modules",
    long_about = "The safekit daemon of one node: runs this node's application modules \
(mirror and farm), sends and checks the authenticated heartbeats, serves the control socket \
of the safekit command, the health check, the metrics and replication. Configuration: \
/etc/safekit/cluster.toml and /etc/safekit/modules/<AM>/module.toml \
(safekit-cluster.toml(5), safekit-module.toml(5)); state in /var/lib/safekit, the control \
socket in /run/safekit, logs in /var/log/safekit. Installed as the systemd service \
safekitd.service (Type=notify, watchdog): SIGTERM stops every module cleanly before exit. \
Environment: SAFEKIT_ROOT (as --root), SAFEKIT_LOG (log filter, default info)."
)]
pub struct Args {
    /// Root of every path (config, state, runtime, logs); default `/`.
    #[arg(long, env = "SAFEKIT_ROOT")]
    pub root: Option<std::path::PathBuf>,
    /// This node's name in cluster.toml (default: the node whose address is
    /// configured on this host).
    #[arg(long)]
    pub node: Option<String>,
    /// Internal: run as the guard of the daemon that started this process
    /// (cleans after it if it dies; see `safekit::daemon::guard`).
    #[arg(long, hide = true, requires = "node")]
    pub guard: bool,
}

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
    /// `config apply` on this node.
    pub(crate) apply: Option<Arc<config_apply::ApplyCtx>>,
    /// The replicated directories this node receives, and what the
    /// replication listener refused.
    pub(crate) registry: Arc<crate::rfs::Registry>,
    /// Bumped after each publication of `status` (event streams wait on it).
    pub changes: tokio::sync::watch::Sender<u64>,
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
    /// The epoch file exists but does not hold an epoch.
    #[error(
        "the epoch file {path} is unreadable ({why}): safekitd will not start with a guessed epoch (its peers would refuse an epoch below the last one they saw). Write a number above this node's last epoch into it (each peer keeps it in var/lib/safekit/peer_epochs.json), then start again"
    )]
    Epoch {
        /// The file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// The node's HTTPS certificate or key cannot be used.
    #[error("HTTPS: {0}")]
    Tls(String),
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
    let tls_addr = SocketAddr::from(([0, 0, 0, 0], config.cluster.ports.https));
    let https = match api::tls::acceptor(&paths.etc(), &me) {
        Ok(Some(acceptor)) => {
            let listener = tokio::net::TcpListener::bind(tls_addr)
                .await
                .map_err(|source| StartError::Bind {
                    what: "HTTPS",
                    addr: tls_addr,
                    source,
                })?;
            Some((listener, acceptor))
        }
        Ok(None) => {
            tracing::warn!(
                "HTTPS off: no certificate for this node in etc/safekit/tls (safekit certs init makes them)"
            );
            None
        }
        Err(e) => return Err(StartError::Tls(e)),
    };
    let control = net::bind_control_socket(&paths)?;
    // Before any command can start a module: what a daemon that died left
    // (applications in the module cgroups, VIPs), then the guard that
    // cleans after this one if it dies.
    let cgroups = match crate::sys::cgroup::Cgroups::open(
        paths.root(),
        &guard::cgroup_fallback(&paths),
    ) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(error = %e, "no module cgroups: an application is not stopped if safekitd dies");
            None
        }
    };
    guard::wait_previous_guard(&paths);
    guard::clean_leftovers(&paths, &config, &me, cgroups.as_ref(), "safekitd start").await;
    // Mirror VIP traffic admitted only with the lease program's mark (a
    // table that outlives the daemon).
    if let Err(e) = crate::nft::lease::install(&guard::mirror_vips(&config, &me)) {
        tracing::error!(error = %e, "mirror VIP traffic is not tied to the lease");
    }
    let guard = guard::GuardHandle::start(&paths, &me);
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
    let apply_ctx = Arc::new(config_apply::ApplyCtx::new(
        me.clone(),
        config.cluster.key.clone(),
        paths.etc(),
        paths.state_dir().join(config_apply::PREVIOUS_DIR),
        config
            .cluster
            .nodes
            .iter()
            .map(|n| {
                let addrs = n
                    .addrs
                    .values()
                    .map(|ip| SocketAddr::new(*ip, config.cluster.ports.http))
                    .collect();
                (n.name.clone(), addrs)
            })
            .collect(),
        tx.clone(),
    ));
    let dataplane = farm::Dataplane::default();
    let api_paths = paths.clone();
    let api_cluster = config.cluster.clone();
    let api_me = me.clone();
    let mut engine = engine::Engine::new(
        paths,
        config,
        me,
        sockets.clone(),
        metrics.clone(),
        tx.clone(),
        dataplane.clone(),
        cgroups.clone(),
    )?;
    engine.set_apply(Arc::clone(&apply_ctx));
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
        apply: Some(apply_ctx),
        registry: Arc::clone(&engine.registry),
        changes: tokio::sync::watch::Sender::new(0),
    });
    for (lan, sock) in sockets.iter().enumerate() {
        tokio::spawn(net::receive_heartbeats(
            lan,
            sock.socket.clone(),
            tx.clone(),
        ));
    }
    tokio::spawn(net::serve_control(
        control,
        tx.clone(),
        engine.commands_log(),
    ));
    let api = api::ApiState::new(shared.clone(), tx.clone(), api_paths, api_cluster, api_me);
    tokio::spawn(api::events::record(shared.clone(), api.history.clone()));
    let router = api::router(api);
    tokio::spawn(api::serve(http_listener, router.clone(), None));
    if let Some((listener, acceptor)) = https {
        tokio::spawn(api::serve(listener, router, Some(acceptor)));
    }
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
            if hangups
                .send(engine::Event::Reload { reply: None })
                .await
                .is_err()
            {
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
    // Stopped cleanly: the modules' scripts ran, the guard has nothing to do.
    guard.stop().await;
    if let Some(c) = &cgroups {
        c.remove_empty();
    }
    Ok(())
}
