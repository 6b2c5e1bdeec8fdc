//! The live event stream (`GET /api/v1/events`, Server-Sent Events) and the
//! state history of the last hours (`GET /api/v1/modules/<AM>/history`).
//!
//! The engine bumps [`Shared::changes`](super::super::Shared) after each
//! step. A `status` event carries the node's whole status whenever
//! something a person would see changed (a state, a colour, a peer's state,
//! resynchronisation progress, farm membership), at most every
//! [`MIN_INTERVAL`]; a comment line keeps idle connections open. The
//! recorder task ([`record`]) keeps each module's transitions for
//! [`HISTORY_SPAN`], at most [`HISTORY_MAX`] per module. At most
//! [`MAX_STREAMS`] streams are open at once (503 beyond).

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::{
    Json,
    extract::State,
    response::sse::{Event, KeepAlive, Sse},
};
use futures_util::Stream;
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiError, ApiState, Caller, ErrorBody, handlers::Segments};
use crate::status::{Colour, ModuleState, NodeStatus};

/// Shortest time between two `status` events of one stream.
const MIN_INTERVAL: Duration = Duration::from_millis(200);
/// Transitions kept.
const HISTORY_SPAN: Duration = Duration::from_hours(24);
/// Most transitions kept per module.
const HISTORY_MAX: usize = 2000;

/// What a person sees of a status: everything but heartbeat ages and
/// cumulative counters' noise.
fn visible(status: &NodeStatus) -> String {
    let mut s = status.clone();
    for m in &mut s.modules {
        for p in &mut m.peers {
            p.last_seen_ms.clear();
        }
    }
    serde_json::to_string(&s).unwrap_or_default()
}

/// The live event stream: a `status` event (the node's status, as `GET
/// /api/v1/status`) at once and whenever it visibly changes.
#[utoipa::path(get, path = "/api/v1/events", tag = "state",
    responses((status = 200, description = "Server-Sent Events: `status` events with a NodeStatus",
               content_type = "text/event-stream"),
              (status = 401, body = ErrorBody),
              (status = 503, body = ErrorBody, description = "Too many streams open")))]
pub(super) async fn stream(
    State(state): State<Arc<ApiState>>,
    _caller: Caller,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let open = StreamSlot::take(&state.streams).ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_STREAMS} event streams are open on this node: try again later"),
        )
    })?;
    let rx = state.shared.changes.subscribe();
    let init = (state, rx, String::new(), open);
    let s = futures_util::stream::unfold(init, |(state, mut rx, last, open)| async move {
        loop {
            let status = state.shared.status.read().await.clone();
            let key = visible(&status);
            if key != last {
                let ev = Event::default()
                    .event("status")
                    .data(serde_json::to_string(&status).unwrap_or_default());
                return Some((Ok(ev), (state, rx, key, open)));
            }
            if rx.changed().await.is_err() {
                return None;
            }
            tokio::time::sleep(MIN_INTERVAL).await;
        }
    });
    Ok(Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Most event streams open at once on a node: they hold connections, and
/// the health check must always find one free.
pub(super) const MAX_STREAMS: usize = 64;

/// One open event stream, counted in `ApiState::streams` until dropped.
struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    fn take(count: &Arc<AtomicUsize>) -> Option<Self> {
        let before = count.fetch_add(1, Ordering::AcqRel);
        if before >= MAX_STREAMS {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(Arc::clone(count)))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One state of a module, from a time on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub(super) struct HistoryEntry {
    /// Unix time, milliseconds.
    at_ms: u64,
    /// State from then on.
    state: ModuleState,
    /// Its colour.
    colour: Colour,
}

/// A module's transitions of the last hours, oldest first.
#[derive(Debug, Clone, Default)]
pub(in crate::daemon) struct History {
    /// Transitions, per module.
    modules: BTreeMap<String, VecDeque<HistoryEntry>>,
}

impl History {
    /// Records the states of `status` at `now` (Unix ms): a new entry per
    /// module whose state or colour changed.
    fn record(&mut self, now_ms: u64, status: &NodeStatus) {
        let span = u64::try_from(HISTORY_SPAN.as_millis()).unwrap_or(u64::MAX);
        for m in &status.modules {
            let h = self.modules.entry(m.name.clone()).or_default();
            let changed = h
                .back()
                .is_none_or(|e| e.state != m.state || e.colour != m.colour);
            if changed {
                h.push_back(HistoryEntry {
                    at_ms: now_ms,
                    state: m.state,
                    colour: m.colour,
                });
            }
            while h.len() > HISTORY_MAX
                || (h.len() > 1 && h.get(1).is_some_and(|e| e.at_ms + span < now_ms))
            {
                h.pop_front();
            }
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Records every visible change into `history` until the daemon stops.
pub(in crate::daemon) async fn record(
    shared: Arc<super::super::Shared>,
    history: Arc<Mutex<History>>,
) {
    let mut rx = shared.changes.subscribe();
    loop {
        let status = shared.status.read().await.clone();
        if let Ok(mut h) = history.lock() {
            h.record(unix_ms(), &status);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// A module's history.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ModuleHistory {
    /// Module.
    module: String,
    /// Transitions of the last 24 hours, oldest first (the first entry may
    /// be older: the state at the start of the span).
    entries: Vec<HistoryEntry>,
}

/// A module's state transitions of the last 24 hours (since safekitd
/// started), for the console's timeline.
#[utoipa::path(get, path = "/api/v1/modules/{module}/history", tag = "state",
    params(("module" = String, Path, description = "Module name")),
    responses((status = 200, body = ModuleHistory), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
pub(super) async fn history(
    State(state): State<Arc<ApiState>>,
    _caller: Caller,
    Segments(module): Segments<String>,
) -> Result<Json<ModuleHistory>, ApiError> {
    super::handlers::module_status(&state, &module).await?;
    let entries = state
        .history
        .lock()
        .map_err(|_| ApiError::internal("history poisoned"))?
        .modules
        .get(&module)
        .map(|h| h.iter().cloned().collect())
        .unwrap_or_default();
    Ok(Json(ModuleHistory { module, entries }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Mode, ModuleStatus};

    fn status(state: ModuleState, colour: Colour) -> NodeStatus {
        NodeStatus {
            cluster: "c".into(),
            node: "n1".into(),
            epoch: 1,
            modules: vec![ModuleStatus {
                name: "web".into(),
                mode: Mode::Mirror,
                state,
                colour,
                peers: vec![],
                details: vec![],
                farm: None,
                rfs: vec![],
                checkers: vec![],
            }],
        }
    }

    #[test]
    fn event_streams_are_bounded() {
        let count = Arc::new(AtomicUsize::new(0));
        let mut open: Vec<_> = (0..MAX_STREAMS)
            .map(|_| StreamSlot::take(&count).expect("a slot"))
            .collect();
        assert!(StreamSlot::take(&count).is_none(), "one too many");
        assert_eq!(count.load(Ordering::Acquire), MAX_STREAMS);
        open.pop();
        assert!(
            StreamSlot::take(&count).is_some(),
            "a closed stream frees its slot"
        );
        drop(open);
        assert_eq!(count.load(Ordering::Acquire), 0);
    }

    #[test]
    fn history_keeps_transitions_only() {
        let mut h = History::default();
        h.record(1, &status(ModuleState::Stop, Colour::Red));
        h.record(2, &status(ModuleState::Stop, Colour::Red));
        h.record(3, &status(ModuleState::Wait, Colour::Orange));
        h.record(4, &status(ModuleState::Prim, Colour::Green));
        let e: Vec<_> = h.modules["web"]
            .iter()
            .map(|e| (e.at_ms, e.state))
            .collect();
        assert_eq!(
            e,
            [
                (1, ModuleState::Stop),
                (3, ModuleState::Wait),
                (4, ModuleState::Prim)
            ]
        );
        let day = u64::try_from(HISTORY_SPAN.as_millis()).unwrap();
        h.record(day + 10, &status(ModuleState::Second, Colour::Green));
        let e: Vec<_> = h.modules["web"].iter().map(|e| e.state).collect();
        assert_eq!(
            e,
            [ModuleState::Prim, ModuleState::Second],
            "older than the span dropped, but the state at its start"
        );
    }
}
