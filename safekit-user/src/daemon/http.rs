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

/// Largest request body a handler may read.
const MAX_BODY: usize = 64 * 1024;

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/var/modules/{module}/ready.txt", get(ready))
        .route("/metrics", get(metrics))
        .route(
            super::config_apply::PATH,
            axum::routing::post(super::config_apply::receive).layer(
                axum::extract::DefaultBodyLimit::max(crate::config::bundle::MAX_BUNDLE + 64 * 1024),
            ),
        )
        // Other routes read no body; any that will gets at most this.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
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
    let mut body = shared.metrics.render(&status);
    body.push_str(&farm_metrics(&shared, &status));
    body.push_str(&listener_metrics(&shared, &status));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
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
