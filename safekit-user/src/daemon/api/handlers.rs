//! The REST API's endpoints under `/api/v1`, and the `OpenAPI` document
//! generated from them (utoipa).
//!
//! Control verbs build the same [`control::Request`] as `safekit` and send
//! it to the engine the way the control socket does, so the API and the
//! CLI behave the same.

use std::{sync::Arc, time::Instant};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Query, Request, State},
    http::{StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::oneshot;
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::{ApiError, ApiState, Caller, ErrorBody, Https, SESSION_COOKIE, Via, events, session};
use crate::{
    auth::{self, Role},
    control::{self, MirrorCmd},
    daemon::engine::Event,
    status::{ModuleStatus, NodeStatus},
};

/// How long a control verb may take before the API gives up waiting.
const VERB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Default and largest page of `GET .../log`.
const LOG_PAGE: usize = 200;
const LOG_PAGE_MAX: usize = 5000;
/// Largest configuration file accepted by `config/check`.
const MAX_CONFIG_FILE: usize = 256 * 1024;

/// A JSON body whose errors are JSON too.
pub(super) struct JsonBody<T>(pub(super) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("bad JSON body: {e}")))
    }
}

/// Query parameters whose errors are JSON.
pub(super) struct Params<T>(pub(super) T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    fn from_request_parts(
        parts: &mut Parts,
        _: &S,
    ) -> impl Future<Output = Result<Self, Self::Rejection>> + Send {
        std::future::ready(
            Query::<T>::try_from_uri(&parts.uri)
                .map(|q| Params(q.0))
                .map_err(|e| ApiError::bad_request(e.body_text())),
        )
    }
}

/// Path parameters whose errors are JSON.
pub(super) struct Segments<T>(pub(super) T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Segments<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Segments(p.0))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/login", post(login))
        .route("/api/v1/logout", post(logout))
        .route("/api/v1/session", get(session_info))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/status", get(status))
        .route("/api/v1/modules", get(modules))
        .route("/api/v1/modules/{module}", get(module))
        .route("/api/v1/modules/{module}/log", get(module_log))
        .route("/api/v1/modules/{module}/history", get(events::history))
        .route("/api/v1/modules/{module}/set", post(set_resource))
        .route("/api/v1/modules/{module}/{verb}", post(verb))
        .route("/api/v1/config", get(config_read))
        .route("/api/v1/config/check", post(config_check))
        .route("/api/v1/config/apply", post(config_apply))
        .route("/api/v1/snapshot", get(snapshot))
        .route("/api/v1/events", get(events::stream))
        .route(
            "/api/v1/nodes/{node}/{*rest}",
            axum::routing::any(super::proxy::forward),
        )
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "safekit REST API",
        description = "Monitor and control a safekit cluster. Every path also exists as \
/api/v1/nodes/{node}/... (proxy mode): the node answering forwards the request to that node. \
Authenticate with an API key (Authorization: Bearer skk_...) or a console session cookie \
(POST /api/v1/login; state-changing requests then need the X-CSRF-Token header). Roles: \
monitor (read), control (+ verbs), admin (+ configuration, snapshots)."
    ),
    paths(
        login, logout, session_info, cluster, status, modules, module, module_log,
        events::history, set_resource, verb, config_read, config_check, config_apply, snapshot,
        events::stream, openapi
    ),
    components(schemas(
        ErrorBody, Message, LoginRequest, SessionInfo, ClusterInfo, NodeInfo, LogPage,
        SetRequest, Verb, SyncMode, UpDown, ConfigFile, ConfigFiles, CheckResult, ConfigErrorBody, NodeApply, ApplyResult, ApplyRefused,
        events::HistoryEntry, events::ModuleHistory, NodeStatus, ModuleStatus, Role
    )),
    modifiers(&Security),
    security(("bearer" = []), ("session" = []))
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            utoipa::openapi::security::SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build(),
            ),
        );
        components.add_security_scheme(
            "session",
            utoipa::openapi::security::SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(
                SESSION_COOKIE,
            ))),
        );
    }
}

/// The `OpenAPI` document.
#[must_use]
pub(crate) fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json"),
              (status = 401, body = ErrorBody)))]
async fn openapi(_caller: Caller) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

/// An informational answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(super) struct Message {
    /// What happened.
    message: String,
}

/// Credentials of a console login.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    /// User name (users.toml).
    user: String,
    /// Password.
    password: String,
}

/// The caller.
#[derive(Debug, Serialize, ToSchema)]
struct SessionInfo {
    /// User or API key name.
    user: String,
    /// Role.
    role: Role,
    /// CSRF token to send in `X-CSRF-Token` with state-changing requests
    /// (sessions only).
    csrf: Option<String>,
    /// This node.
    node: String,
}

/// Logs in: sets the session cookie (`HttpOnly`, `SameSite=Strict`; `Secure`
/// on HTTPS). At most 5 failures per minute per client and per user name.
#[utoipa::path(post, path = "/api/v1/login", tag = "session", request_body = LoginRequest,
    security(()),
    responses((status = 200, body = SessionInfo), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn login(
    State(state): State<Arc<ApiState>>,
    parts: Parts,
    JsonBody(req): JsonBody<LoginRequest>,
) -> Result<Response, ApiError> {
    let ip = super::peer_ip(&parts);
    let https = parts.extensions.get::<Https>().is_some_and(|h| h.0);
    let now = Instant::now();
    let limited = state
        .limiter
        .lock()
        .map_err(|_| ApiError::internal("limiter poisoned"))?
        .check(now, ip, &req.user);
    if let Err(secs) = limited {
        let mut r = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed logins: try again in {secs} s"),
        )
        .into_response();
        if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return Ok(r);
    }
    let etc = state.paths.etc();
    let user = req.user.clone();
    let found = tokio::task::spawn_blocking(move || {
        let users = auth::load_users(&etc).map_err(|e| e.to_string())?;
        Ok::<_, String>(users.login(&req.user, &req.password).map(|u| u.role))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(ApiError::internal)?;
    let Some(role) = found else {
        if let Ok(mut l) = state.limiter.lock() {
            l.failed(Instant::now(), ip, &user);
        }
        tracing::info!(%ip, user = %user, "console login refused");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong user or password",
        ));
    };
    if let Ok(mut l) = state.limiter.lock() {
        l.succeeded(ip);
    }
    let token = auth::random_hex(32).map_err(|e| ApiError::internal(e.to_string()))?;
    let csrf = auth::random_hex(32).map_err(|e| ApiError::internal(e.to_string()))?;
    let ttl = state.cluster.api.session_ttl;
    state
        .sessions
        .lock()
        .map_err(|_| ApiError::internal("session table poisoned"))?
        .insert(
            now,
            token.clone(),
            session::Session {
                user: user.clone(),
                csrf: csrf.clone(),
                expires: now + ttl,
            },
        );
    tracing::info!(%ip, user = %user, "console login");
    let cookie = format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        ttl.as_secs(),
        if https { "; Secure" } else { "" }
    );
    let mut r = Json(SessionInfo {
        user,
        role,
        csrf: Some(csrf),
        node: state.me.clone(),
    })
    .into_response();
    if let Ok(v) = header::HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

/// Ends the console session.
#[utoipa::path(post, path = "/api/v1/logout", tag = "session",
    responses((status = 200, body = Message), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody)))]
async fn logout(State(state): State<Arc<ApiState>>, caller: Caller) -> Response {
    if let Via::Session(token) = &caller.via {
        state.end_session(token);
    }
    let mut r = Json(Message {
        message: "logged out".into(),
    })
    .into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        header::HeaderValue::from_static(
            "safekit_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

/// Who is calling, with the CSRF token of a session.
#[utoipa::path(get, path = "/api/v1/session", tag = "session",
    responses((status = 200, body = SessionInfo), (status = 401, body = ErrorBody)))]
async fn session_info(State(state): State<Arc<ApiState>>, caller: Caller) -> Json<SessionInfo> {
    let csrf = match &caller.via {
        Via::Session(token) => state
            .sessions
            .lock()
            .ok()
            .and_then(|mut s| s.get(Instant::now(), token))
            .map(|s| s.csrf),
        _ => None,
    };
    Json(SessionInfo {
        user: caller.name,
        role: caller.role,
        csrf,
        node: state.me.clone(),
    })
}

/// A node of the cluster.
#[derive(Debug, Serialize, ToSchema)]
struct NodeInfo {
    /// Node name.
    name: String,
    /// Address per LAN.
    addrs: std::collections::BTreeMap<String, String>,
}

/// The cluster as this node knows it.
#[derive(Debug, Serialize, ToSchema)]
struct ClusterInfo {
    /// Cluster name.
    name: String,
    /// The node answering.
    node: String,
    /// Every node.
    nodes: Vec<NodeInfo>,
    /// Modules of this node.
    modules: Vec<String>,
    /// HTTP port.
    http_port: u16,
    /// HTTPS port.
    https_port: u16,
}

/// The cluster: its nodes and this node's modules.
#[utoipa::path(get, path = "/api/v1/cluster", tag = "state",
    responses((status = 200, body = ClusterInfo), (status = 401, body = ErrorBody)))]
async fn cluster(State(state): State<Arc<ApiState>>, _caller: Caller) -> Json<ClusterInfo> {
    let status = state.shared.status.read().await;
    let c = &state.cluster;
    Json(ClusterInfo {
        name: c.name.clone(),
        node: state.me.clone(),
        nodes: c
            .nodes
            .iter()
            .map(|n| NodeInfo {
                name: n.name.clone(),
                addrs: n
                    .addrs
                    .iter()
                    .map(|(l, a)| (l.clone(), a.to_string()))
                    .collect(),
            })
            .collect(),
        modules: status.modules.iter().map(|m| m.name.clone()).collect(),
        http_port: c.ports.http,
        https_port: c.ports.https,
    })
}

/// This node's full status (as `safekit state -v`).
#[utoipa::path(get, path = "/api/v1/status", tag = "state",
    responses((status = 200, body = NodeStatus), (status = 401, body = ErrorBody)))]
async fn status(State(state): State<Arc<ApiState>>, _caller: Caller) -> Json<NodeStatus> {
    Json(state.shared.status.read().await.clone())
}

/// Every module of this node with its state, colour, peers, replication
/// and farm membership.
#[utoipa::path(get, path = "/api/v1/modules", tag = "state",
    responses((status = 200, body = Vec<ModuleStatus>), (status = 401, body = ErrorBody)))]
async fn modules(State(state): State<Arc<ApiState>>, _caller: Caller) -> Json<Vec<ModuleStatus>> {
    Json(state.shared.status.read().await.modules.clone())
}

/// The module of that name, or 404 naming the modules there are.
pub(super) async fn module_status(state: &ApiState, name: &str) -> Result<ModuleStatus, ApiError> {
    let status = state.shared.status.read().await;
    status
        .module(name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(crate::cli::no_module(name, &status)))
}

/// One module.
#[utoipa::path(get, path = "/api/v1/modules/{module}", tag = "state",
    params(("module" = String, Path, description = "Module name")),
    responses((status = 200, body = ModuleStatus), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn module(
    State(state): State<Arc<ApiState>>,
    _caller: Caller,
    Segments(name): Segments<String>,
) -> Result<Json<ModuleStatus>, ApiError> {
    module_status(&state, &name).await.map(Json)
}

/// Control verbs (as the `safekit` commands of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum Verb {
    /// Start the module on this node.
    Start,
    /// Stop it on this node.
    Stop,
    /// Restart the application, same role.
    Restart,
    /// Stop, then start again (may fail over).
    Stopstart,
    /// Stop at once (`stop_prim force`).
    Forcestop,
    /// Force primary (mirror).
    Prim,
    /// Force secondary (mirror).
    Second,
    /// Primary even on possibly inconsistent data (mirror).
    Primforce,
    /// Exchange roles, on the primary (mirror).
    Swap,
}

/// `fullsync` (copy everything) or `nosync` (swap without resync).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum SyncMode {
    /// Copy everything at the next resynchronisation (prim, second, swap).
    Fullsync,
    /// Swap without resynchronisation.
    Nosync,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct VerbParams {
    /// `fullsync` for prim, second or swap; `nosync` for swap.
    sync: Option<SyncMode>,
}

/// Sends a request to the engine as the control socket does.
pub(super) async fn engine_call(
    state: &ApiState,
    req: control::Request,
) -> Result<control::Response, ApiError> {
    let (reply, answer) = oneshot::channel();
    state
        .engine
        .send(Event::Control { req, reply })
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "safekitd is stopping"))?;
    match tokio::time::timeout(VERB_TIMEOUT, answer).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "safekitd is shutting down",
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "safekitd did not answer within 30 s",
        )),
    }
}

/// [`engine_call`] for a command (not a read-only query), recorded in the
/// commands log as `safekit` commands are, the caller named by its API
/// identity: `api NAME (ROLE, key|session|proxy)`.
pub(super) async fn engine_command(
    state: &ApiState,
    caller: &Caller,
    req: control::Request,
) -> Result<control::Response, ApiError> {
    let command = req.command_line();
    let r = engine_call(state, req).await;
    if let Some(command) = command {
        let via = match caller.via {
            Via::ApiKey => "key",
            Via::Session(_) => "session",
            Via::Proxy => "proxy",
        };
        let who = format!("api {} ({}, {via})", caller.name, caller.role.name());
        let outcome = match &r {
            Ok(resp) => resp.outcome(),
            Err(e) => format!("error: {}", e.message),
        };
        let log = state.paths.commands_log();
        // A file append: off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || {
            crate::daemon::net::record_command(&log, &who, &command, &outcome);
        })
        .await;
    }
    r
}

/// A verb's answer: 200 with the message, 409 with the refusal.
fn verb_answer(r: control::Response) -> Result<Json<Message>, ApiError> {
    match r {
        control::Response::Ok { message } => Ok(Json(Message { message })),
        control::Response::Error { error } => Err(ApiError::new(StatusCode::CONFLICT, error)),
        other => Err(ApiError::internal(format!("unexpected answer {other:?}"))),
    }
}

/// Runs a control verb on this node: the same request as `safekit VERB -m
/// AM [fullsync|nosync]`.
#[utoipa::path(post, path = "/api/v1/modules/{module}/{verb}", tag = "control",
    params(("module" = String, Path, description = "Module name"),
           ("verb" = Verb, Path, description = "Control verb"), VerbParams),
    responses((status = 200, body = Message, description = "Done"),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody, description = "Role too low or CSRF token missing"),
              (status = 404, body = ErrorBody, description = "No such module or verb"),
              (status = 409, body = ErrorBody, description = "Refused in the current state")))]
async fn verb(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Segments((module, verb)): Segments<(String, String)>,
    Params(params): Params<VerbParams>,
) -> Result<Json<Message>, ApiError> {
    caller.need(Role::Control)?;
    let verb: Verb = serde_json::from_value(serde_json::Value::String(verb.clone()))
        .map_err(|_| {
            ApiError::not_found(format!(
                "no verb {verb:?}: start, stop, restart, stopstart, forcestop, prim, second, primforce, swap, set"
            ))
        })?;
    module_status(&state, &module).await?;
    let mirror = |cmd| control::Request::Mirror {
        module: module.clone(),
        cmd,
        fullsync: params.sync == Some(SyncMode::Fullsync),
    };
    let sync_ok = match params.sync {
        None => true,
        Some(SyncMode::Fullsync) => matches!(verb, Verb::Prim | Verb::Second | Verb::Swap),
        Some(SyncMode::Nosync) => verb == Verb::Swap,
    };
    if !sync_ok {
        return Err(ApiError::bad_request(
            "sync=fullsync applies to prim, second and swap; sync=nosync to swap only",
        ));
    }
    let req = match verb {
        Verb::Start => control::Request::Start {
            module: module.clone(),
        },
        Verb::Stop => control::Request::Stop {
            module: module.clone(),
        },
        Verb::Restart => mirror(MirrorCmd::Restart),
        Verb::Stopstart => mirror(MirrorCmd::StopStart),
        Verb::Forcestop => mirror(MirrorCmd::ForceStop),
        Verb::Prim => mirror(MirrorCmd::Prim),
        Verb::Second => mirror(MirrorCmd::Second),
        Verb::Primforce => mirror(MirrorCmd::PrimForce),
        Verb::Swap => mirror(MirrorCmd::Swap),
    };
    tracing::info!(caller = %caller.name, module = %module, ?verb, "API control verb");
    verb_answer(engine_command(&state, &caller, req).await?)
}

/// `up` or `down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum UpDown {
    /// Up.
    Up,
    /// Down.
    Down,
}

/// A resource of a custom checker and its value.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SetRequest {
    /// `custom.<name>` of a `[[check.custom]]`.
    resource: String,
    /// New value.
    value: UpDown,
}

/// Sets a custom checker's resource up or down (as `safekit set -m AM -r
/// custom.NAME -v up|down`).
#[utoipa::path(post, path = "/api/v1/modules/{module}/set", tag = "control",
    params(("module" = String, Path, description = "Module name")),
    request_body = SetRequest,
    responses((status = 200, body = Message), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn set_resource(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Segments(module): Segments<String>,
    JsonBody(body): JsonBody<SetRequest>,
) -> Result<Json<Message>, ApiError> {
    caller.need(Role::Control)?;
    module_status(&state, &module).await?;
    let req = control::Request::SetResource {
        module,
        resource: body.resource,
        up: body.value == UpDown::Up,
    };
    verb_answer(engine_command(&state, &caller, req).await?)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct LogParams {
    /// First line (0-based); default: the last `limit` lines.
    from: Option<usize>,
    /// Most lines (default 200, at most 5000).
    limit: Option<usize>,
}

/// A page of a module log.
#[derive(Debug, Serialize, ToSchema)]
struct LogPage {
    /// Module.
    module: String,
    /// Lines in the log.
    total: usize,
    /// Index of the first line of this page.
    from: usize,
    /// The lines.
    lines: Vec<String>,
}

/// A page of the module log (`safekit log`): the last lines by default;
/// `from` pages forward, poll with `from = total` to follow.
#[utoipa::path(get, path = "/api/v1/modules/{module}/log", tag = "state",
    params(("module" = String, Path, description = "Module name"), LogParams),
    responses((status = 200, body = LogPage), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn module_log(
    State(state): State<Arc<ApiState>>,
    _caller: Caller,
    Segments(module): Segments<String>,
    Params(p): Params<LogParams>,
) -> Result<Json<LogPage>, ApiError> {
    module_status(&state, &module).await?;
    let limit = p.limit.unwrap_or(LOG_PAGE).clamp(1, LOG_PAGE_MAX);
    let path = state.paths.module_log(&module);
    let text = match tokio::fs::read(&path).await {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(ApiError::internal(format!(
                "reading {}: {e}",
                path.display()
            )));
        }
    };
    let all: Vec<&str> = text.lines().collect();
    let total = all.len();
    let from = p.from.unwrap_or(total.saturating_sub(limit)).min(total);
    let lines = all[from..]
        .iter()
        .take(limit)
        .map(|l| (*l).to_owned())
        .collect();
    Ok(Json(LogPage {
        module,
        total,
        from,
        lines,
    }))
}

/// A configuration file, relative to the configuration directory.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    /// `cluster.toml` or `modules/<AM>/module.toml`.
    path: String,
    /// Its text.
    text: String,
}

/// Configuration files.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ConfigFiles {
    /// The files.
    files: Vec<ConfigFile>,
}

/// One configuration error, at its line.
#[derive(Debug, Serialize, ToSchema)]
struct ConfigErrorBody {
    /// File, relative to the configuration directory.
    file: String,
    /// 1-based line.
    line: Option<usize>,
    /// Dotted key.
    key: String,
    /// What is wrong and what is allowed.
    message: String,
}

/// Result of a check.
#[derive(Debug, Serialize, ToSchema)]
struct CheckResult {
    /// No error.
    ok: bool,
    /// Every error.
    errors: Vec<ConfigErrorBody>,
}

/// The configuration files of this node (`cluster.toml` and every
/// `module.toml`; never the cluster key, users or API keys).
#[utoipa::path(get, path = "/api/v1/config", tag = "config",
    responses((status = 200, body = ConfigFiles), (status = 401, body = ErrorBody)))]
async fn config_read(
    State(state): State<Arc<ApiState>>,
    _caller: Caller,
) -> Result<Json<ConfigFiles>, ApiError> {
    let etc = state.paths.etc();
    tokio::task::spawn_blocking(move || {
        let mut files = Vec::new();
        let mut read = |rel: String| {
            if let Ok(text) = std::fs::read_to_string(etc.join(&rel)) {
                files.push(ConfigFile { path: rel, text });
            }
        };
        read(crate::config::CLUSTER_FILE.to_owned());
        let mut names: Vec<String> = std::fs::read_dir(etc.join(crate::config::MODULES_DIR))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        for n in names {
            read(format!(
                "{}/{n}/{}",
                crate::config::MODULES_DIR,
                crate::config::MODULE_FILE
            ));
        }
        Json(ConfigFiles { files })
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))
}

/// True for `cluster.toml` and `modules/<AM>/module.toml` with a valid
/// module name.
fn config_path_ok(p: &str) -> bool {
    if p == crate::config::CLUSTER_FILE {
        return true;
    }
    let parts: Vec<&str> = p.split('/').collect();
    matches!(parts.as_slice(), [dir, name, file]
        if *dir == crate::config::MODULES_DIR
            && *file == crate::config::MODULE_FILE
            && (1..=32).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

/// Checks configuration files as they would be after replacing the given
/// ones (the others as they are on this node), without touching anything
/// running: every error with its file and line.
#[utoipa::path(post, path = "/api/v1/config/check", tag = "config", request_body = ConfigFiles,
    responses((status = 200, body = CheckResult), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn config_check(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    JsonBody(body): JsonBody<ConfigFiles>,
) -> Result<Json<CheckResult>, ApiError> {
    caller.need(Role::Admin)?;
    check_files(&body.files)?;
    let etc = state.paths.etc();
    let scratch = state.paths.run_dir().join(format!(
        "config-check-{}",
        auth::random_hex(8).map_err(|e| ApiError::internal(e.to_string()))?
    ));
    tokio::task::spawn_blocking(move || check_overlay(&etc, &scratch, &body.files))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map(Json)
}

/// Only configuration files, none too large.
fn check_files(files: &[ConfigFile]) -> Result<(), ApiError> {
    for f in files {
        if !config_path_ok(&f.path) {
            return Err(ApiError::bad_request(format!(
                "{:?} is not a configuration file: use cluster.toml or modules/<AM>/module.toml",
                f.path
            )));
        }
        if f.text.len() > MAX_CONFIG_FILE {
            return Err(ApiError::bad_request(format!(
                "{} is larger than {MAX_CONFIG_FILE} bytes",
                f.path
            )));
        }
    }
    Ok(())
}

/// Copies `etc` to `scratch`, writes `files` over it, loads it, removes it.
fn check_overlay(
    etc: &std::path::Path,
    scratch: &std::path::Path,
    files: &[ConfigFile],
) -> Result<CheckResult, ApiError> {
    let _ = std::fs::remove_dir_all(scratch);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(etc)
        .arg(scratch)
        .status()
        .map_err(|e| ApiError::internal(format!("copying the configuration: {e}")))?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(scratch);
        return Err(ApiError::internal("copying the configuration failed"));
    }
    let result = (|| {
        for f in files {
            let p = scratch.join(&f.path);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(|e| ApiError::internal(e.to_string()))?;
            }
            std::fs::write(&p, &f.text).map_err(|e| ApiError::internal(e.to_string()))?;
        }
        Ok(match crate::config::load(scratch) {
            Ok(_) => CheckResult {
                ok: true,
                errors: Vec::new(),
            },
            Err(errors) => CheckResult {
                ok: false,
                errors: errors
                    .iter()
                    .map(|e| ConfigErrorBody {
                        file: e.file.strip_prefix(scratch).map_or_else(
                            |_| e.file.display().to_string(),
                            |p| p.display().to_string(),
                        ),
                        line: e.line,
                        key: e.key.clone(),
                        message: e.message.clone(),
                    })
                    .collect(),
            },
        })
    })();
    let _ = std::fs::remove_dir_all(scratch);
    result
}

/// Each node's outcome of an apply.
#[derive(Debug, Serialize, ToSchema)]
struct NodeApply {
    /// The node.
    node: String,
    /// `applied`, `unchanged`, `refused` or `unreachable`.
    result: String,
    /// What changed (`applied`), per module.
    notes: Vec<String>,
    /// Why (`refused`, `unreachable`).
    error: Option<String>,
}

/// The outcome of an apply on every node.
#[derive(Debug, Serialize, ToSchema)]
struct ApplyResult {
    /// One line for people.
    message: String,
    /// Every node applied it or had it already.
    ok: bool,
    /// Per node, in the cluster's order.
    nodes: Vec<NodeApply>,
}

/// An apply refused here: the configuration has errors; nothing written.
#[derive(Debug, Serialize, ToSchema)]
struct ApplyRefused {
    /// What is wrong, in a line.
    error: String,
    /// Every error at its file and line.
    errors: Vec<ConfigErrorBody>,
}

/// Applies configuration files to every node, as `safekit config apply`
/// does: they are checked against this node's configuration (errors: 422,
/// nothing written), written here (each atomically), then this node's
/// configuration is sent to every node, which checks, installs (keeping the
/// previous version) and reloads it — what can change while a module runs
/// at once, the rest at its next start; never a state change by itself.
#[utoipa::path(post, path = "/api/v1/config/apply", tag = "config", request_body = ConfigFiles,
    responses((status = 200, body = ApplyResult, description = "Each node's outcome"),
              (status = 422, body = ApplyRefused, description = "Invalid: nothing written"),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody)))]
async fn config_apply(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    JsonBody(body): JsonBody<ConfigFiles>,
) -> Result<Response, ApiError> {
    caller.need(Role::Admin)?;
    check_files(&body.files)?;
    let etc = state.paths.etc();
    let scratch = state.paths.run_dir().join(format!(
        "config-check-{}",
        auth::random_hex(8).map_err(|e| ApiError::internal(e.to_string()))?
    ));
    let files = body.files;
    let written = tokio::task::spawn_blocking(move || {
        let check = check_overlay(&etc, &scratch, &files)?;
        if !check.ok {
            return Ok(Some(check));
        }
        for f in &files {
            let path = etc.join(&f.path);
            // The file's own mode when it exists (0644 for a new one).
            let mode = std::fs::metadata(&path).map_or(0o644, |m| {
                std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777
            });
            crate::config::bundle::write_atomic(&path, f.text.as_bytes(), mode)
                .map_err(|e| ApiError::internal(e.to_string()))?;
        }
        Ok::<_, ApiError>(None)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    if let Some(check) = written {
        let refused = ApplyRefused {
            error: format!(
                "the configuration has {} error(s): nothing written, nothing sent",
                check.errors.len()
            ),
            errors: check.errors,
        };
        return Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(refused)).into_response());
    }
    let r = engine_command(
        &state,
        &caller,
        control::Request::ConfigApply {
            module: None,
            rollback: false,
        },
    )
    .await?;
    let outcomes = match r {
        control::Response::Applied { nodes } => nodes,
        control::Response::Error { error } => {
            return Err(ApiError::new(StatusCode::CONFLICT, error));
        }
        other => return Err(ApiError::internal(format!("unexpected answer {other:?}"))),
    };
    let per_node: Vec<NodeApply> = outcomes
        .into_iter()
        .map(|(node, o)| {
            let (result, changes, why) = match o {
                control::ApplyOutcome::Applied { notes } => ("applied", notes, None),
                control::ApplyOutcome::Unchanged => ("unchanged", Vec::new(), None),
                control::ApplyOutcome::Refused { error } => ("refused", Vec::new(), Some(error)),
                control::ApplyOutcome::Unreachable { error } => {
                    ("unreachable", Vec::new(), Some(error))
                }
            };
            NodeApply {
                node,
                result: result.to_owned(),
                notes: changes,
                error: why,
            }
        })
        .collect();
    let ok = per_node
        .iter()
        .all(|n| n.result == "applied" || n.result == "unchanged");
    let message = per_node
        .iter()
        .map(|n| format!("{}: {}", n.node, n.result))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Json(ApplyResult {
        message,
        ok,
        nodes: per_node,
    })
    .into_response())
}

/// A support bundle of this node (tar.gz: configuration without the
/// cluster key, users, API keys or TLS keys; logs; state; status).
#[utoipa::path(get, path = "/api/v1/snapshot", tag = "config",
    responses((status = 200, description = "tar.gz", content_type = "application/gzip"),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn snapshot(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.need(Role::Admin)?;
    let status = state.shared.status.read().await.clone();
    let paths = state.paths.clone();
    let out = paths.run_dir().join(format!(
        "snapshot-{}.tar.gz",
        auth::random_hex(8).map_err(|e| ApiError::internal(e.to_string()))?
    ));
    let name = format!("safekit-snapshot-{}.tar.gz", status.node);
    let bytes = tokio::task::spawn_blocking(move || {
        let r = crate::snapshot::write_bundle(&paths, Some(&status), &out)
            .and_then(|()| std::fs::read(&out).map_err(|e| e.to_string()));
        let _ = std::fs::remove_file(&out);
        r
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(ApiError::internal)?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/gzip".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        bytes,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_paths_are_limited_to_config_files() {
        assert!(config_path_ok("cluster.toml"));
        assert!(config_path_ok("modules/web/module.toml"));
        assert!(!config_path_ok("modules/../cluster.key"));
        assert!(!config_path_ok("/etc/passwd"));
        assert!(!config_path_ok("users.toml"));
        assert!(!config_path_ok("modules/web/bin/start_prim"));
    }

    #[test]
    fn openapi_document_lists_the_fixed_shapes() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/api/v1/modules",
            "/api/v1/modules/{module}/{verb}",
            "/api/v1/login",
            "/api/v1/events",
            "/api/v1/config/check",
        ] {
            assert!(paths.contains_key(p), "{p} missing");
        }
        assert!(doc["components"]["schemas"]["ModuleStatus"].is_object());
    }
}
