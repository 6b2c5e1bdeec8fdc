//! HTTP on 9010 and HTTPS on 9453 (SPEC §8, §9): one router on both.
//!
//! - `GET /var/modules/<AM>/ready.txt`: the anonymous health check, 200 in
//!   PRIM, ALONE or UP, else 404; it reveals nothing else;
//! - `GET /metrics` (Prometheus text): credentials needed unless
//!   `[api] metrics_anonymous = true`;
//! - the REST API under `/api/v1` ([`handlers`]), described by
//!   `/api/v1/openapi.json` (generated from the handlers by utoipa), with
//!   proxy mode `/api/v1/nodes/<node>/...` ([`proxy`]) and a live event
//!   stream ([`events`]);
//! - the web console at `/` ([`console`]), assets embedded in the binary.
//!
//! Every API request is authenticated ([`Caller`]): a bearer API key, a
//! console session cookie (with its CSRF token on state-changing
//! requests), or a request proxied by another node of the cluster (signed
//! with a key derived from the cluster key). Connections are served by
//! hyper, one task each, at most [`MAX_CONNECTIONS`] per port, with a
//! header timeout; TLS (rustls, TLS 1.3 and 1.2 only) in [`tls`].

mod console;
pub(super) mod events;
mod handlers;
mod proxy;
mod session;
pub(super) mod tls;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{ConnectInfo, FromRequestParts, Path, State},
    http::{HeaderMap, Method, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Serialize;
use tokio::{net::TcpListener, sync::mpsc};

use super::{Shared, engine::Event};
use crate::{
    auth::{self, Role},
    config::ClusterConfig,
    paths::Paths,
};

/// Most connections served at once per port; more wait in the backlog.
pub(super) const MAX_CONNECTIONS: usize = 256;
/// Time a client has to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body (configuration files are the largest).
pub(super) const MAX_BODY: usize = 1024 * 1024;
/// Name of the session cookie.
pub(super) const SESSION_COOKIE: &str = "safekit_session";
/// Header carrying the CSRF token of a session.
pub(super) const CSRF_HEADER: &str = "x-csrf-token";

/// What every handler reads.
pub(super) struct ApiState {
    /// Status snapshot, metrics, data plane, change notifications.
    pub(super) shared: Arc<Shared>,
    /// The engine's inbox: control verbs go the way `safekit` sends them.
    pub(super) engine: mpsc::Sender<Event>,
    /// The node's paths.
    pub(super) paths: Paths,
    /// `cluster.toml` as loaded at start.
    pub(super) cluster: ClusterConfig,
    /// This node's name.
    pub(super) me: String,
    /// Console sessions.
    sessions: Mutex<session::Sessions>,
    /// Failed logins.
    limiter: Mutex<session::LoginLimiter>,
    /// Proxy mode: signing key and nonces seen.
    pub(super) proxy: proxy::ProxyAuth,
    /// Proxy mode over HTTPS (when this node has a certificate and the
    /// cluster CA), else HTTP.
    pub(super) proxy_tls: Option<tokio_rustls::TlsConnector>,
    /// State transitions of the last hours.
    pub(super) history: Arc<Mutex<events::History>>,
    /// Event streams open.
    pub(super) streams: Arc<std::sync::atomic::AtomicUsize>,
}

impl ApiState {
    pub(super) fn new(
        shared: Arc<Shared>,
        engine: mpsc::Sender<Event>,
        paths: Paths,
        cluster: ClusterConfig,
        me: String,
    ) -> Arc<Self> {
        let proxy = proxy::ProxyAuth::new(&cluster.key);
        let proxy_tls = tls::connector(&paths.etc(), &me);
        Arc::new(Self {
            shared,
            engine,
            paths,
            cluster,
            me,
            sessions: Mutex::default(),
            limiter: Mutex::default(),
            proxy,
            proxy_tls,
            history: Arc::default(),
            streams: Arc::default(),
        })
    }
}

/// An API error: a status and a JSON `{"error": "..."}` body.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
}

/// Body of every error answer.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub(super) struct ErrorBody {
    /// What is wrong.
    pub(super) error: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub(super) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub(super) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"safekit\""),
            );
        }
        r
    }
}

/// How the caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Via {
    /// A bearer API key.
    ApiKey,
    /// A console session (its cookie token).
    Session(String),
    /// Another node, for a caller it authenticated.
    Proxy,
}

/// The authenticated caller of an API request.
#[derive(Debug, Clone)]
pub(super) struct Caller {
    /// User name, API key name, or `user@node` for proxied requests.
    pub(super) name: String,
    /// What it may do.
    pub(super) role: Role,
    /// How it authenticated.
    pub(super) via: Via,
}

impl Caller {
    /// `Ok` when the caller's role includes `role`, else 403.
    pub(super) fn need(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{} has role {}; this needs role {role} or higher",
                    self.name, self.role
                ),
            ))
        }
    }
}

/// Whether the connection is HTTPS (set by the accept loop).
#[derive(Debug, Clone, Copy)]
pub(super) struct Https(pub(super) bool);

/// The value of cookie `name` in the request.
pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Constant-time equality of two strings.
pub(super) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The client's address (set by the accept loop).
pub(super) fn peer_ip(parts: &Parts) -> IpAddr {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip())
}

impl ApiState {
    /// Authenticates a request from its headers.
    pub(super) fn authenticate(&self, parts: &Parts) -> Result<Caller, ApiError> {
        let headers = &parts.headers;
        if let Some(caller) = self.proxy.verify(parts)? {
            return Ok(caller);
        }
        let etc = self.paths.etc();
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    ApiError::unauthorized("Authorization must be \"Bearer <API key>\"")
                })?;
            let keys = auth::load_keys(&etc).map_err(|e| ApiError::internal(e.to_string()))?;
            let key = keys
                .check(token.trim())
                .ok_or_else(|| ApiError::unauthorized("unknown or revoked API key"))?;
            return Ok(Caller {
                name: key.name.clone(),
                role: key.role,
                via: Via::ApiKey,
            });
        }
        if let Some(token) = cookie(headers, SESSION_COOKIE) {
            let session = self
                .sessions
                .lock()
                .map_err(|_| ApiError::internal("session table poisoned"))?
                .get(Instant::now(), token)
                .ok_or_else(|| {
                    ApiError::unauthorized("session expired or unknown: log in again")
                })?;
            let users = auth::load_users(&etc).map_err(|e| ApiError::internal(e.to_string()))?;
            let Some(user) = users.get(&session.user) else {
                self.end_session(token);
                return Err(ApiError::unauthorized(format!(
                    "user {:?} no longer exists",
                    session.user
                )));
            };
            let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
            if !safe {
                let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
                if !sent.is_some_and(|s| same(s, &session.csrf)) {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "missing or wrong CSRF token: send the session's csrf value in X-CSRF-Token",
                    ));
                }
            }
            return Ok(Caller {
                name: user.name.clone(),
                role: user.role,
                via: Via::Session(token.to_owned()),
            });
        }
        Err(ApiError::unauthorized(
            "credentials needed: an API key (Authorization: Bearer ...) or a console session",
        ))
    }

    fn end_session(&self, token: &str) {
        if let Ok(mut s) = self.sessions.lock() {
            s.remove(token);
        }
    }
}

impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = ApiError;

    fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> impl Future<Output = Result<Self, Self::Rejection>> + Send {
        std::future::ready(state.authenticate(parts))
    }
}

/// The router of both ports.
pub(super) fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/var/modules/{module}/ready.txt", get(ready))
        .route("/metrics", get(metrics))
        // Node to node, sealed with the cluster key (`config apply`); its
        // bundle may be larger than other bodies.
        .route(
            super::config_apply::PATH,
            axum::routing::post(config_receive).layer(axum::extract::DefaultBodyLimit::max(
                crate::config::bundle::MAX_BUNDLE + 64 * 1024,
            )),
        )
        .merge(handlers::routes())
        .merge(console::routes())
        .fallback(|| async { ApiError::not_found("no such path") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serves `router` on `listener` (plain HTTP, or TLS with `tls`).
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let https = tls.is_some();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_conn(stream, peer, false, router).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve_conn(s, peer, https, router).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_conn<S>(io: S, peer: SocketAddr, https: bool, router: Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(Https(https));
        let mut router = router.clone();
        async move { tower_service::Service::call(&mut router, req).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "HTTP connection");
    }
}

async fn ready(
    State(state): State<Arc<ApiState>>,
    Path(module): Path<String>,
) -> impl IntoResponse {
    let status = state.shared.status.read().await;
    match status.module(&module) {
        Some(m) if m.state.is_ready() => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::NOT_FOUND, "not ready\n"),
    }
}

/// `POST /internal/v1/config`: a configuration from another node
/// (`config apply`), authenticated by its seal, not by a user.
async fn config_receive(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    super::config_apply::receive(State(Arc::clone(&state.shared)), headers, body).await
}

async fn metrics(State(state): State<Arc<ApiState>>, parts: Parts) -> Response {
    if !state.cluster.api.metrics_anonymous
        && let Err(e) = state.authenticate(&parts)
    {
        return e.into_response();
    }
    let shared = &state.shared;
    let status = shared.status.read().await;
    let mut body = shared.metrics.render(&status);
    body.push_str(&farm_metrics(shared, &status));
    body.push_str(&listener_metrics(shared, &status));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Replication connections turned away before authentication.
fn listener_metrics(shared: &Shared, status: &crate::status::NodeStatus) -> String {
    use std::fmt::Write as _;
    let node = crate::metrics::Label(&status.node);
    let mut out = String::from(
        "# HELP safekit_rfs_connections_refused_total Replication connections turned away before the peer proved it holds the cluster key, by reason (accept_error: accept failed, retried).\n# TYPE safekit_rfs_connections_refused_total counter\n",
    );
    for (reason, n) in shared.registry.counters().by_reason() {
        let _ = writeln!(
            out,
            "safekit_rfs_connections_refused_total{{node=\"{node}\",reason=\"{reason}\"}} {n}"
        );
    }
    out
}

/// Buckets owned per farm module, and the XDP filters' verdict counters.
fn farm_metrics(shared: &Shared, status: &crate::status::NodeStatus) -> String {
    use safekit_common::counter;
    use std::fmt::Write as _;
    let node = crate::metrics::Label(&status.node);
    let mut out = String::from(
        "# HELP safekit_farm_buckets_owned Buckets of the farm VIP this node accepts.\n# TYPE safekit_farm_buckets_owned gauge\n",
    );
    for m in &status.modules {
        if let Some(f) = &m.farm {
            let _ = writeln!(
                out,
                "safekit_farm_buckets_owned{{node=\"{node}\",module=\"{}\"}} {}",
                crate::metrics::Label(&m.name),
                f.buckets.len()
            );
        }
    }
    out.push_str(
        "# HELP safekit_farm_draining 1 while the farm module drains (graceful stop).\n# TYPE safekit_farm_draining gauge\n",
    );
    for m in &status.modules {
        if let Some(f) = &m.farm {
            let _ = writeln!(
                out,
                "safekit_farm_draining{{node=\"{node}\",module=\"{}\"}} {}",
                m.name,
                u8::from(f.draining.is_some())
            );
        }
    }
    out.push_str(
        "# HELP safekit_farm_drain_connections Connections the draining farm module still serves.\n# TYPE safekit_farm_drain_connections gauge\n",
    );
    for m in &status.modules {
        if let Some(f) = &m.farm {
            let _ = writeln!(
                out,
                "safekit_farm_drain_connections{{node=\"{node}\",module=\"{}\"}} {}",
                m.name,
                f.draining.unwrap_or(0)
            );
        }
    }
    out.push_str(
        "# HELP safekit_xdp_packets_total Frames seen by the XDP farm filter, by verdict.\n# TYPE safekit_xdp_packets_total counter\n",
    );
    let names = [
        (counter::PASS_OTHER, "pass_other"),
        (counter::ACCEPT, "accept"),
        (counter::DROP_NOT_OWNER, "drop_not_owner"),
        (counter::DROP_MALFORMED, "drop_malformed"),
        (counter::PASS_NO_RULE, "pass_no_rule"),
        (counter::ARP_REPLY, "arp_reply"),
        (counter::DROP_FRAGMENT, "drop_fragment"),
        (counter::PASS_UNPARSED, "pass_unparsed"),
        (counter::ACCEPT_FLOW, "accept_flow"),
        (counter::DROP_NO_FLOW, "drop_no_flow"),
        (counter::NS_REPLY, "ns_reply"),
        (counter::DROP_LEASE, "drop_lease"),
    ];
    if let Ok(dp) = shared.dataplane.lock() {
        for (iface, f) in dp.iter() {
            let Ok(c) = f.counters() else { continue };
            let iface = crate::metrics::Label(iface);
            for (i, name) in names {
                let v = c.get(i as usize).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "safekit_xdp_packets_total{{node=\"{node}\",interface=\"{iface}\",verdict=\"{name}\"}} {v}"
                );
            }
        }
    }
    out
}
