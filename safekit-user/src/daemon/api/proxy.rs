//! Proxy mode: `/api/v1/nodes/<node>/<rest>` on any node is
//! `/api/v1/<rest>` on `<node>`.
//!
//! The node answering authenticates the caller (and its CSRF token), then
//! forwards the request to the target node — over HTTPS, its certificate
//! verified against the cluster CA, when this node has its certificate and
//! `tls/ca.crt`; else over HTTP — with the
//! caller's name and role in an `X-Safekit-Proxy` header, signed with a key
//! derived from the cluster key (keyed BLAKE3 over the method, path, origin
//! node, user, role, time and a random nonce). The target accepts it within
//! [`MAX_SKEW`] of its clock, once per nonce, and enforces the role itself.
//! Credentials (API key, cookie) are never forwarded.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header, request::Parts},
    response::Response,
};

use super::{ApiError, ApiState, Caller, Via, handlers::Segments};
use crate::auth::Role;

/// Header of a proxied request.
const PROXY_HEADER: &str = "x-safekit-proxy";
/// Largest accepted difference between the nodes' clocks.
const MAX_SKEW: Duration = Duration::from_secs(30);
/// Most nonces remembered (requests in flight within [`MAX_SKEW`]).
const MAX_NONCES: usize = 65_536;
/// Time to connect to the target node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time for the target's answer headers (control verbs take up to 30 s).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(40);

/// Signing key and the nonces seen.
pub(in crate::daemon) struct ProxyAuth {
    key: [u8; 32],
    nonces: Mutex<HashMap<String, Instant>>,
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ProxyAuth {
    pub(super) fn new(cluster_key: &[u8]) -> Self {
        Self {
            key: blake3::derive_key("safekit REST API proxy mode v1", cluster_key),
            nonces: Mutex::default(),
        }
    }

    fn mac(&self, fields: &[&str]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        for f in fields {
            h.update(&(f.len() as u64).to_le_bytes());
            h.update(f.as_bytes());
        }
        h.finalize()
    }

    /// The header value for a request `method path` from node `from` on
    /// behalf of `caller`.
    fn sign(
        &self,
        method: &str,
        path: &str,
        from: &str,
        caller: &Caller,
    ) -> Result<String, ApiError> {
        let time = unix_secs().to_string();
        let nonce = crate::auth::random_hex(16).map_err(|e| ApiError::internal(e.to_string()))?;
        let role = caller.role.name();
        let mac = self.mac(&[method, path, from, &caller.name, role, &time, &nonce]);
        Ok(format!(
            "{from};{};{role};{time};{nonce};{}",
            caller.name,
            mac.to_hex()
        ))
    }

    /// `Some(caller)` for a request another node proxied with a valid
    /// signature; `None` without the header; 401 when forged, stale or
    /// replayed.
    pub(super) fn verify(&self, parts: &Parts) -> Result<Option<Caller>, ApiError> {
        let Some(value) = parts.headers.get(PROXY_HEADER) else {
            return Ok(None);
        };
        let bad = || ApiError::new(StatusCode::UNAUTHORIZED, "invalid proxied request");
        let text = value.to_str().map_err(|_| bad())?;
        let f: Vec<&str> = text.split(';').collect();
        let [from, user, role, time, nonce, mac] = f.as_slice() else {
            return Err(bad());
        };
        let path = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path(), |p| p.as_str());
        let expected = self.mac(&[parts.method.as_str(), path, from, user, role, time, nonce]);
        let given = blake3::Hash::from_hex(mac).map_err(|_| bad())?;
        if given != expected {
            return Err(bad());
        }
        let t: u64 = time.parse().map_err(|_| bad())?;
        if unix_secs().abs_diff(t) > MAX_SKEW.as_secs() {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "proxied request too old (or the nodes' clocks differ by more than 30 s)",
            ));
        }
        let now = Instant::now();
        let mut nonces = self
            .nonces
            .lock()
            .map_err(|_| ApiError::internal("nonce table poisoned"))?;
        nonces.retain(|_, seen| now.duration_since(*seen) <= MAX_SKEW * 2);
        if nonces.contains_key(*nonce) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "replayed proxied request",
            ));
        }
        if nonces.len() >= MAX_NONCES {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many proxied requests",
            ));
        }
        nonces.insert((*nonce).to_owned(), now);
        let role = Role::parse(role).map_err(|_| bad())?;
        Ok(Some(Caller {
            name: format!("{user}@{from}"),
            role,
            via: Via::Proxy,
        }))
    }
}

/// Headers never forwarded: credentials, hop-by-hop.
const DROPPED: [&str; 8] = [
    "authorization",
    "cookie",
    "x-csrf-token",
    PROXY_HEADER,
    "host",
    "connection",
    "keep-alive",
    "transfer-encoding",
];

/// `ANY /api/v1/nodes/{node}/{*rest}`: the same request on `node`.
pub(super) async fn forward(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Segments((node, rest)): Segments<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    if caller.via == Via::Proxy {
        return Err(ApiError::bad_request(
            "a proxied request cannot be proxied again",
        ));
    }
    let target = state.cluster.node(&node).ok_or_else(|| {
        ApiError::not_found(format!(
            "no node {node:?} in the cluster (nodes: {})",
            state
                .cluster
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let ip = state
        .cluster
        .replication_lan()
        .and_then(|l| target.addrs.get(&l.name))
        .or_else(|| target.addrs.values().next())
        .copied()
        .ok_or_else(|| ApiError::internal(format!("node {node} has no address")))?;
    let port = if state.proxy_tls.is_some() {
        state.cluster.ports.https
    } else {
        state.cluster.ports.http
    };
    let addr = SocketAddr::new(ip, port);
    let (parts, body) = req.into_parts();
    // The rest of the path as the client encoded it (the extracted `rest`
    // is percent-decoded).
    let raw_rest = parts
        .uri
        .path()
        .strip_prefix("/api/v1/nodes/")
        .and_then(|p| p.split_once('/'))
        .map_or(rest.as_str(), |(_, r)| r);
    let path = match parts.uri.query() {
        Some(q) => format!("/api/v1/{raw_rest}?{q}"),
        None => format!("/api/v1/{raw_rest}"),
    };
    let signature = state
        .proxy
        .sign(parts.method.as_str(), &path, &state.me, &caller)?;
    let mut out = axum::http::Request::builder()
        .method(parts.method.clone())
        .uri(&path);
    for (k, v) in &parts.headers {
        if !DROPPED.contains(&k.as_str()) {
            out = out.header(k, v);
        }
    }
    let out = out
        .header(header::HOST, addr.to_string())
        .header(
            PROXY_HEADER,
            HeaderValue::from_str(&signature).map_err(|e| ApiError::internal(e.to_string()))?,
        )
        .body(body)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let unreachable = |e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("node {node} unreachable: {e}"),
        )
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| unreachable(&"connection timed out"))?
        .map_err(|e| unreachable(&e))?;
    let answer = match &state.proxy_tls {
        Some(connector) => {
            let name = rustls::pki_types::ServerName::IpAddress(ip.into());
            let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, stream))
                .await
                .map_err(|_| unreachable(&"TLS handshake timed out"))?
                .map_err(|e| unreachable(&format!("TLS: {e}")))?;
            send(tls, out).await
        }
        None => send(stream, out).await,
    }
    .map_err(|e| unreachable(&e))?;
    let (parts, body) = answer.into_parts();
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Sends `req` on a new HTTP/1.1 connection over `io`; the answer's body
/// streams from it.
async fn send<IO>(
    io: IO,
    req: axum::http::Request<Body>,
) -> Result<axum::http::Response<hyper::body::Incoming>, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "proxy connection");
        }
    });
    match tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(req)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within 40 s".into()),
    }
}
