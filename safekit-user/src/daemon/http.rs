//! HTTP on port 9010: the anonymous health check `GET
//! /var/modules/<AM>/ready.txt` (200 in PRIM, ALONE or UP, else 404; it reveals
//! nothing else) and `GET /metrics` (Prometheus text).

use std::sync::Arc;

use axum::{
    Router,
    extract::{Path, State},
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;

use super::Shared;

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/var/modules/{module}/ready.txt", get(ready))
        .route("/metrics", get(metrics))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

async fn ready(State(shared): State<Arc<Shared>>, Path(module): Path<String>) -> impl IntoResponse {
    let status = shared.status.read().await;
    match status.module(&module) {
        Some(m) if m.state.is_ready() => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::NOT_FOUND, "not ready\n"),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let status = shared.status.read().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(&status),
    )
}
