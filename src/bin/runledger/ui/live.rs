//! `/runs/{run_id}/live?after=N`: the run's new events as server-sent
//! events, read from its stream with `XREAD BLOCK` on a connection of the
//! stream's own (what `runledger events --follow` shows, pushed to the page).
//!
//! Each event is an SSE message of type `run-event` whose `id` is the
//! sequence (a browser that reconnects sends it back as `Last-Event-ID`, and
//! the stream resumes after it) and whose data is the event as JSON. When
//! the run is finished and every event is out, one `end` message carries the
//! final status, and the stream closes.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use runledger::store::Conn;
use runledger::{Direction, RunEvent};
use serde::Deserialize;
use serde_json::json;

use super::Shared;
use super::html::error_page;

/// How long one XREAD blocks before the run's status is looked at again.
const BLOCK: Duration = Duration::from_secs(2);

/// How many times in a row the stream's connection is opened again after
/// Redis went away (a restart, a Sentinel failover) before the page is told
/// the live view failed; with the pause, about a minute.
const RECONNECTS: u32 = 60;
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
pub struct LiveQuery {
    after: Option<i64>,
}

pub async fn events(
    State(ui): State<Shared>,
    Path(run_id): Path<String>,
    Query(q): Query<LiveQuery>,
    headers: HeaderMap,
) -> Response {
    let resumed = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i64>().ok());
    let after = q.after.unwrap_or(0).max(resumed.unwrap_or(0)).max(0);
    // Not found is an HTTP error here, not a stream that ends at once.
    if let Err(e) = ui.store.get_run(&run_id).await {
        return error_page(&e);
    }
    let conn = match ui.store.dedicated_conn().await {
        Ok(c) => c,
        Err(e) => return error_page(&e),
    };
    Sse::new(follow(ui, conn, run_id, after)).keep_alive(KeepAlive::default()).into_response()
}

struct Follow {
    ui: Shared,
    conn: Conn,
    run_id: String,
    after: i64,
    done: bool,
    /// Failed reads in a row (see [`RECONNECTS`]).
    failures: u32,
}

fn follow(ui: Shared, conn: Conn, run_id: String, after: i64) -> impl Stream<Item = Result<Event, Infallible>> {
    let state = Follow { ui, conn, run_id, after, done: false, failures: 0 };
    stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let stop = s.ui.stop.clone();
        let batch = tokio::select! {
            _ = stop.cancelled() => return None,
            batch = next_batch(&mut s) => batch,
        };
        Some((stream::iter(batch.into_iter().map(Ok)), s))
    })
    .flatten()
}

/// The next messages: new events, or the end once the run is finished.
async fn next_batch(s: &mut Follow) -> Vec<Event> {
    match s.ui.store.wait_run_events(&mut s.conn, &s.run_id, s.after, BLOCK).await {
        Ok(events) if !events.is_empty() => {
            s.failures = 0;
            return messages(s, &events);
        }
        Ok(_) => s.failures = 0,
        // Redis away, or a new master being elected: follow the stream on a
        // new connection (which, under Sentinel, goes to the new master).
        Err(e) if e.is_transient() && s.failures < RECONNECTS => {
            s.failures += 1;
            tracing::debug!(run_id = %s.run_id, error = %e, "live events: reading again on a new connection");
            tokio::time::sleep(RECONNECT_PAUSE).await;
            if let Ok(conn) = s.ui.store.dedicated_conn().await {
                s.conn = conn;
            }
            return Vec::new();
        }
        Err(e) => return failed(s, &e),
    }
    let run = match s.ui.store.get_run(&s.run_id).await {
        Ok(run) => run,
        Err(e) => return failed(s, &e),
    };
    if !run.status.is_terminal() {
        return Vec::new();
    }
    // Finished: what was written just before the finish, then the end.
    let mut out = Vec::new();
    loop {
        match s.ui.store.page_run_events(&s.run_id, None, Some(s.after), 100, Direction::Forward).await {
            Ok(page) => {
                out.extend(messages(s, &page.items));
                if !page.has_more {
                    break;
                }
            }
            Err(e) => {
                out.extend(failed(s, &e));
                return out;
            }
        }
    }
    s.done = true;
    out.push(
        Event::default()
            .event("end")
            .data(json!({ "status": run.status, "status_reason": run.status_reason }).to_string()),
    );
    out
}

fn messages(s: &mut Follow, events: &[RunEvent]) -> Vec<Event> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        s.after = s.after.max(e.sequence);
        let data = serde_json::to_string(e).unwrap_or_else(|_| "{}".into());
        out.push(Event::default().event("run-event").id(e.sequence.to_string()).data(data));
    }
    out
}

fn failed(s: &mut Follow, err: &runledger::Error) -> Vec<Event> {
    tracing::warn!(run_id = %s.run_id, error = %err, "live events stopped");
    s.done = true;
    vec![Event::default().event("failed").data(json!({ "error": err.to_string() }).to_string())]
}
