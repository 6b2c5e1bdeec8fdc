//! Checkers (SPEC §7) as tasks: each probes on its interval and reports
//! every result to the engine, which decides what a failure means.

use std::{net::SocketAddr, time::Duration};

use tokio::{sync::mpsc, task::JoinHandle};

use super::engine::Event;
use crate::config::ModuleConfig;

/// Starts the checkers of a module; the handles stop them when aborted.
pub(super) fn spawn_all(cfg: &ModuleConfig, tx: &mpsc::Sender<Event>) -> Vec<JoinHandle<()>> {
    let mut out = Vec::new();
    for (i, c) in cfg.check_tcp.iter().enumerate() {
        let what = format!("tcp {}:{}", c.host, c.port);
        let (host, port, interval, timeout) = (c.host.clone(), c.port, c.interval, c.timeout);
        out.push(spawn_loop(
            cfg.name.clone(),
            format!("tcp{i}"),
            what,
            interval,
            tx.clone(),
            move || {
                let host = host.clone();
                async move { tcp_probe(&host, port, timeout).await }
            },
        ));
    }
    out
}

fn spawn_loop<F, Fut>(
    module: String,
    id: String,
    what: String,
    interval: Duration,
    tx: mpsc::Sender<Event>,
    probe: F,
) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    tokio::spawn(async move {
        loop {
            let result = probe().await;
            let ev = Event::Check {
                module: module.clone(),
                id: id.clone(),
                what: what.clone(),
                result,
            };
            if tx.send(ev).await.is_err() {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    })
}

async fn tcp_probe(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .collect();
    let addr = addrs.first().ok_or_else(|| format!("{host} has no address"))?;
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("connect {addr}: {e}")),
        Err(_) => Err(format!("connect {addr}: no answer within {timeout:?}")),
    }
}
