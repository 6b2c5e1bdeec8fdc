//! `safekit config apply` and `config rollback` (SPEC §8): one node reads
//! its configuration, checks it, and sends it to every node of the cluster
//! (itself included) as a [`Bundle`] sealed with the cluster key, in an
//! HTTP `POST` to [`PATH`] on each node's HTTP port. Each node checks the
//! seal, checks the configuration against its own config dir, installs it
//! (previous version kept, files written atomically) and reloads
//! ([`super::engine::Engine::reload`]): what can change while a module runs
//! changes now, the rest at its next start; a reload never changes a
//! state by itself. One apply at a time per node.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
};
use http_body_util::{BodyExt as _, Full};
use tokio::sync::{mpsc, oneshot};

use super::{Shared, engine::Event};
use crate::{
    config::bundle::{self, Bundle, MAX_BUNDLE, Seal},
    control::ApplyOutcome,
};

/// Where a node receives a configuration.
pub(crate) const PATH: &str = "/internal/v1/config";
/// Under the state dir: the configuration kept by the last change.
pub(crate) const PREVIOUS_DIR: &str = "config.previous";
/// Under the state dir: the configuration the daemon runs.
pub(crate) const APPLIED_DIR: &str = "config.applied";
/// How long a node has to answer.
const NODE_TIMEOUT: Duration = Duration::from_secs(10);

const H_NODE: &str = "x-safekit-node";
const H_TIME: &str = "x-safekit-time";
const H_NONCE: &str = "x-safekit-nonce";
const H_MAC: &str = "x-safekit-mac";

/// What applying needs on a node.
#[derive(Debug)]
pub(crate) struct ApplyCtx {
    /// This node.
    pub(crate) me: String,
    /// The cluster key.
    pub(crate) key: Vec<u8>,
    /// The config dir.
    pub(crate) etc: PathBuf,
    /// Where the previous configuration is kept.
    pub(crate) previous: PathBuf,
    /// The configuration the daemon runs (see [`bundle::snapshot`]).
    pub(crate) applied: PathBuf,
    /// Every node of the cluster and its HTTP addresses (one per LAN).
    pub(crate) nodes: Vec<(String, Vec<SocketAddr>)>,
    /// The engine.
    pub(crate) events: mpsc::Sender<Event>,
    /// One apply at a time.
    lock: tokio::sync::Mutex<()>,
    /// Nonces seen recently (replays refused).
    seen: Mutex<VecDeque<[u8; 16]>>,
}

impl ApplyCtx {
    /// A context for node `me`.
    pub(crate) fn new(
        me: String,
        key: Vec<u8>,
        etc: PathBuf,
        previous: PathBuf,
        nodes: Vec<(String, Vec<SocketAddr>)>,
        events: mpsc::Sender<Event>,
    ) -> Self {
        Self {
            me,
            key,
            applied: previous.with_file_name(APPLIED_DIR),
            etc,
            previous,
            nodes,
            events,
            lock: tokio::sync::Mutex::new(()),
            seen: Mutex::new(VecDeque::new()),
        }
    }
}

/// What to apply.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// This node's configuration (every module, or one).
    Current(Option<String>),
    /// The version kept before the last change (`config rollback`).
    Previous,
}

/// Applies `source` on every node; one outcome per node, in the cluster's
/// order. An invalid configuration is refused here and sent nowhere.
pub(crate) async fn apply(ctx: Arc<ApplyCtx>, source: Source) -> Vec<(String, ApplyOutcome)> {
    let read = {
        let ctx = Arc::clone(&ctx);
        tokio::task::spawn_blocking(move || {
            let b = match &source {
                Source::Current(only) => Bundle::read(&ctx.etc, only.as_deref()),
                Source::Previous => Bundle::read(&ctx.previous, None),
            }?;
            b.check(&ctx.etc)?;
            Ok::<_, bundle::BundleError>(b)
        })
        .await
    };
    let bundle = match read {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let refused = ApplyOutcome::Refused {
                error: format!("on {} (nothing sent): {e}", ctx.me),
            };
            return ctx
                .nodes
                .iter()
                .map(|(n, _)| (n.clone(), refused.clone()))
                .collect();
        }
        Err(e) => {
            return vec![(
                ctx.me.clone(),
                ApplyOutcome::Refused {
                    error: e.to_string(),
                },
            )];
        }
    };
    let body = match serde_json::to_vec(&bundle) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            return vec![(
                ctx.me.clone(),
                ApplyOutcome::Refused {
                    error: e.to_string(),
                },
            )];
        }
    };
    let mut jobs = Vec::new();
    for (node, addrs) in &ctx.nodes {
        let (ctx, node, addrs, body, bundle) = (
            Arc::clone(&ctx),
            node.clone(),
            addrs.clone(),
            body.clone(),
            bundle.clone(),
        );
        jobs.push(tokio::spawn(async move {
            let outcome = if node == ctx.me {
                install(&ctx, bundle).await
            } else {
                send(&ctx, &addrs, body).await
            };
            (node, outcome)
        }));
    }
    let mut out = Vec::new();
    for j in jobs {
        if let Ok(r) = j.await {
            out.push(r);
        }
    }
    out
}

/// Checks, installs and reloads `bundle` on this node.
async fn install(ctx: &Arc<ApplyCtx>, bundle: Bundle) -> ApplyOutcome {
    let _one = ctx.lock.lock().await;
    let job = {
        let ctx = Arc::clone(ctx);
        tokio::task::spawn_blocking(move || {
            let config = bundle.check(&ctx.etc)?;
            if config.cluster.node(&ctx.me).is_none() {
                return Err(bundle::BundleError::Invalid(format!(
                    "node {} is not in the cluster.toml sent",
                    ctx.me
                )));
            }
            bundle.install(&ctx.etc, &ctx.previous, &ctx.applied)
        })
        .await
    };
    let changed = match job {
        Ok(Ok(changed)) => changed,
        Ok(Err(e)) => {
            return ApplyOutcome::Refused {
                error: e.to_string(),
            };
        }
        Err(e) => {
            return ApplyOutcome::Refused {
                error: e.to_string(),
            };
        }
    };
    // Reloaded even when the files were in place already: on the node
    // where the operator edited them, the running modules have not seen
    // them yet.
    let (reply, rx) = oneshot::channel();
    if ctx
        .events
        .send(Event::Reload { reply: Some(reply) })
        .await
        .is_err()
    {
        return ApplyOutcome::Refused {
            error: "safekitd is stopping".into(),
        };
    }
    match rx.await {
        Ok(Ok(notes)) if !changed && notes.is_empty() => ApplyOutcome::Unchanged,
        Ok(Ok(notes)) => ApplyOutcome::Applied { notes },
        Ok(Err(e)) => ApplyOutcome::Refused {
            error: format!("written, but the reload refused it: {e}"),
        },
        Err(_) => ApplyOutcome::Refused {
            error: "safekitd is stopping".into(),
        },
    }
}

/// Sends the sealed bundle to a node, trying each of its addresses.
async fn send(ctx: &ApplyCtx, addrs: &[SocketAddr], body: Bytes) -> ApplyOutcome {
    let seal = bundle::seal(&ctx.key, &ctx.me, &body);
    let mut last = String::from("no address");
    for addr in addrs {
        match tokio::time::timeout(NODE_TIMEOUT, post(*addr, &seal, body.clone())).await {
            Ok(Ok((status, text))) => {
                return match serde_json::from_slice::<ApplyOutcome>(&text) {
                    Ok(o) => o,
                    Err(_) => ApplyOutcome::Refused {
                        error: format!("{status}: {}", String::from_utf8_lossy(&text).trim()),
                    },
                };
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: no answer within {NODE_TIMEOUT:?}"),
        }
    }
    ApplyOutcome::Unreachable { error: last }
}

async fn post(addr: SocketAddr, seal: &Seal, body: Bytes) -> Result<(StatusCode, Bytes), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::post(PATH)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(H_NODE, &seal.sender)
        .header(H_TIME, seal.time.to_string())
        .header(H_NONCE, hex(&seal.nonce))
        .header(H_MAC, hex(&seal.mac))
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The seal carried by the headers; `None` when one is missing or malformed.
fn seal_of(headers: &HeaderMap) -> Option<Seal> {
    let get = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    Some(Seal {
        sender: get(H_NODE)?.to_owned(),
        time: get(H_TIME)?.parse().ok()?,
        nonce: unhex(get(H_NONCE)?)?,
        mac: unhex(get(H_MAC)?)?,
    })
}

fn answer(status: StatusCode, o: &ApplyOutcome) -> axum::response::Response {
    let body = serde_json::to_vec(o).unwrap_or_default();
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// `POST /internal/v1/config` from another node.
pub(super) async fn receive(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let Some(ctx) = shared.apply.clone() else {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            &ApplyOutcome::Refused {
                error: "configuration apply is not available on this node".into(),
            },
        );
    };
    let refuse = |status, error: String| answer(status, &ApplyOutcome::Refused { error });
    if body.len() > MAX_BUNDLE + 64 * 1024 {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "configuration too large".into(),
        );
    }
    let Some(seal) = seal_of(&headers) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "not authenticated with the cluster key".into(),
        );
    };
    let opened = {
        let mut seen = ctx
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        bundle::open(&ctx.key, &seal, &body, &mut seen)
    };
    if let Err(e) = opened {
        tracing::warn!(from = %seal.sender, error = %e, "configuration refused");
        return refuse(StatusCode::UNAUTHORIZED, e.to_string());
    }
    if !ctx.nodes.iter().any(|(n, _)| *n == seal.sender) {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("{:?} is not a node of this cluster", seal.sender),
        );
    }
    let bundle: Bundle = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("malformed: {e}")),
    };
    tracing::info!(from = %seal.sender, "configuration received");
    let o = install(&ctx, bundle).await;
    let status = match o {
        ApplyOutcome::Refused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::OK,
    };
    answer(status, &o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_bad_input() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex::<4>(&hex(&b)), Some(b));
        assert_eq!(unhex::<4>("00"), None);
        assert_eq!(unhex::<2>("zzzz"), None);
        assert_eq!(unhex::<2>("é0a"), None);
    }
}
