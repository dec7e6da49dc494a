//! The dashboard's pages: queues (all, and one), runs (filtered, paged by
//! cursor), one run (fields, lease, events that keep coming), runtimes.

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use runledger::{Direction, QueueStats, Run, RunFilter, RunStatus};
use serde::Deserialize;
use serde_json::Value;

use super::Shared;
use super::html::{age, enc, error_page, esc, page, queue_link, run_link, when};

/// Every status a run can have, for the runs filter.
const STATUSES: [&str; 8] = ["created", "queued", "claimed", "running", "completed", "failed", "cancelled", "timeout"];

/// The depth columns of a queue row, in order.
fn depth_cells(s: &QueueStats) -> String {
    format!(
        "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
        s.queued,
        s.delayed,
        s.pinned,
        s.claimed,
        s.running,
        s.dead,
        s.finished,
        age(s.oldest_queued_age)
    )
}

const DEPTH_HEAD: &str = "<th>queued</th><th>delayed</th><th>pinned</th><th>claimed</th><th>running</th><th>dead</th><th>finished</th><th>oldest queued</th>";

fn counter(s: &QueueStats, name: &str) -> i64 {
    s.counters.get(name).copied().unwrap_or(0)
}

/// The badges of a queue's row: paused, and how many of its groups are.
fn badges(s: &QueueStats) -> String {
    let mut out = String::new();
    if s.paused {
        out.push_str(r#" <span class="badge paused">paused</span>"#);
    }
    // Its own class: "badge paused" means the whole queue.
    match s.paused_groups {
        0 => {}
        1 => out.push_str(r#" <span class="badge groups-paused">1 group paused</span>"#),
        n => {
            let _ = write!(out, r#" <span class="badge groups-paused">{n} groups paused</span>"#);
        }
    }
    out
}

/// `/`: every queue, a partitioned queue as one row with its partitions under it.
pub async fn queues(State(ui): State<Shared>) -> Response {
    let rows = match ui.store.queue_overview(0).await {
        Ok(rows) => rows,
        Err(e) => return error_page(&e),
    };
    let physical: Vec<QueueStats> = QueueStats::physical(&rows).into_iter().cloned().collect();
    let runtimes = match ui.store.runtime_stats_with(&physical).await {
        Ok(r) => r,
        Err(e) => return error_page(&e),
    };
    let mut body = format!(
        r#"<p class="summary">{} queues · runtimes <a href="/runtimes">{} online, {} stale</a> · {} runs active</p>"#,
        rows.iter().filter(|s| s.partition_of.is_none()).count(),
        runtimes.online_count,
        runtimes.stale_count,
        runtimes.active_runs
    );
    body.push_str(&format!(
        r#"<table id="queues"><thead><tr><th>queue</th>{DEPTH_HEAD}<th>completed</th><th>failed</th><th>last 10 min</th></tr></thead><tbody>"#
    ));
    for s in &rows {
        let class = if s.partition_of.is_some() { " class=\"partition\"" } else { "" };
        let _ = write!(
            body,
            r#"<tr{class} data-queue="{}"><td>{}</td>{}<td>{}</td><td>{}</td><td>{}</td></tr>"#,
            esc(&s.queue_name),
            queue_link(&s.queue_name) + &badges(s),
            depth_cells(s),
            counter(s, "completed"),
            counter(s, "failed") + counter(s, "timeout"),
            ui.throughput.chart(&s.queue_name)
        );
    }
    if rows.is_empty() {
        body.push_str(r#"<tr><td colspan="12" class="muted">no queues yet</td></tr>"#);
    }
    body.push_str("</tbody></table>");
    page("Queues", &body, true).into_response()
}

/// `/queues/{queue}`: one queue (merged over its partitions), its lease
/// holders, queued runs by runner, counters and dead runs.
pub async fn queue(State(ui): State<Shared>, Path(queue): Path<String>) -> Response {
    let physical = match ui.store.partitions(&queue).await {
        Ok(p) => p,
        Err(e) => return error_page(&e),
    };
    let mut parts = Vec::new();
    for q in &physical {
        match ui.store.queue_stats(q, 50).await {
            Ok(s) => parts.push(s),
            Err(e) => return error_page(&e),
        }
    }
    let merged = if parts.len() == 1 { parts[0].clone() } else { QueueStats::merged(&queue, &parts) };
    let mut dead = Vec::new();
    for q in &physical {
        match ui.store.dead_runs(q, 20).await {
            Ok(d) => dead.extend(d),
            Err(e) => return error_page(&e),
        }
    }
    dead.sort_by_key(|d| std::cmp::Reverse(d.1));
    dead.truncate(20);

    let mut body = format!(r#"<table id="depths"><thead><tr><th>queue</th>{DEPTH_HEAD}</tr></thead><tbody>"#);
    let _ = write!(body, r#"<tr data-queue="{}"><td>{}</td>{}</tr>"#, esc(&queue), esc(&queue), depth_cells(&merged));
    if parts.len() > 1 {
        for p in &parts {
            let _ = write!(body, r#"<tr class="partition"><td>{}</td>{}</tr>"#, esc(&p.queue_name), depth_cells(p));
        }
    }
    body.push_str("</tbody></table>");
    if merged.paused {
        body.push_str(r#"<p><span class="badge paused">paused</span> claims hand out nothing until it is resumed</p>"#);
    }
    body.push_str(&super::actions::queue_forms(&ui, &queue, merged.paused));
    match group_section(&ui, &queue, &merged).await {
        Ok(section) => body.push_str(&section),
        Err(e) => return error_page(&e),
    }
    let _ = write!(
        body,
        r#"<p><a href="/runs?queue={}">runs of {}</a> · last 10 min: {}</p>"#,
        enc(&queue),
        esc(&queue),
        ui.throughput.chart(&queue)
    );

    body.push_str("<h2>Counters</h2><table id=\"counters\"><tbody>");
    for (name, value) in &merged.counters {
        let _ = write!(body, "<tr><th>{}</th><td>{value}</td></tr>", esc(name));
    }
    body.push_str("</tbody></table>");

    body.push_str("<h2>Lease holders</h2><table id=\"holders\"><thead><tr><th>run</th><th>runtime</th><th>lease expires in</th></tr></thead><tbody>");
    for h in &merged.lease_holders {
        let _ = write!(
            body,
            r#"<tr><td>{}</td><td>{}</td><td><span class="countdown" data-until-ms="{}">{}</span></td></tr>"#,
            run_link(&h.run_id),
            esc(&h.runtime_id),
            (h.claim_lease_expires_at * 1000.0) as i64,
            when(Some(h.claim_lease_expires_at as i64))
        );
    }
    if merged.lease_holders.is_empty() {
        body.push_str(r#"<tr><td colspan="3" class="muted">no claims</td></tr>"#);
    }
    body.push_str("</tbody></table>");

    body.push_str("<h2>Queued by runner</h2><table id=\"runners\"><tbody>");
    for (runner, n) in &merged.queued_by_runner {
        let _ = write!(
            body,
            r#"<tr><th><a href="/runs?queue={}&amp;runner={}&amp;status=queued">{}</a></th><td>{n}</td></tr>"#,
            enc(&queue),
            enc(runner),
            esc(runner)
        );
    }
    body.push_str("</tbody></table>");

    body.push_str("<h2>Dead runs</h2><table id=\"dead\"><thead><tr><th>run</th><th>died</th></tr></thead><tbody>");
    for (rid, at_ms) in &dead {
        let _ = write!(body, "<tr><td>{}</td><td>{}</td></tr>", run_link(rid), when(Some(at_ms / 1000)));
    }
    if dead.is_empty() {
        body.push_str(r#"<tr><td colspan="2" class="muted">none</td></tr>"#);
    }
    body.push_str("</tbody></table>");
    page(&format!("Queue {queue}"), &body, true).into_response()
}

/// Paused groups listed on a queue's page.
const PAUSED_GROUPS_SHOWN: usize = 100;

/// A grouped queue's settings, its paused groups and the forms to pause and
/// resume one; nothing for a queue that never grouped nor paused a group.
async fn group_section(ui: &super::Ui, queue: &str, merged: &QueueStats) -> runledger::Result<String> {
    let groups = ui.store.queue_groups(queue).await?;
    let Some(by) = groups.group_by.as_deref().or((merged.paused_groups > 0).then_some("")) else {
        return Ok(String::new());
    };
    let paused = ui.store.paused_groups(queue, PAUSED_GROUPS_SHOWN).await?;
    let mut out = String::new();
    if by.is_empty() {
        out.push_str(r#"<p id="groups">not grouped any more; groups paused while it was stay paused</p>"#);
    } else {
        let _ = write!(
            out,
            r#"<p id="groups">grouped by <b>{}</b>: at most {} runs of one group claimed at once ({} groups with a limit of their own) · {} queued runs waiting for their group</p>"#,
            esc(by),
            groups.group_concurrency,
            groups.group_limits.len(),
            merged.waiting_for_group
        );
    }
    let more = merged.paused_groups - paused.len() as i64;
    out.push_str(&super::actions::group_forms(ui, queue, &paused, more));
    Ok(out)
}

/// The filters of `/runs` (the `list_runs` filters); empty fields are unset.
#[derive(Deserialize, Default)]
pub struct RunsQuery {
    queue: Option<String>,
    status: Option<String>,
    conversation: Option<String>,
    bot: Option<String>,
    workspace: Option<String>,
    thread: Option<String>,
    runner: Option<String>,
    before: Option<i64>,
    limit: Option<usize>,
}

fn set(v: &Option<String>) -> Option<String> {
    v.as_ref().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// `/runs`: runs newest first, filtered, paged by the `id` cursor.
pub async fn runs(State(ui): State<Shared>, Query(q): Query<RunsQuery>) -> Response {
    let statuses = match set(&q.status).map(|s| s.parse::<RunStatus>()).transpose() {
        Ok(s) => s.into_iter().collect(),
        Err(e) => return error_page(&e),
    };
    let thread = set(&q.thread);
    let filter = RunFilter {
        queues: set(&q.queue).into_iter().collect(),
        conversation_id: set(&q.conversation),
        statuses,
        before_id: q.before,
        limit: q.limit.unwrap_or(50).clamp(1, 100),
        bot_id: set(&q.bot),
        workspace_id: set(&q.workspace),
        strict_thread: thread.is_some(),
        thread_id: thread,
        runner_id: set(&q.runner),
        binding_id: None,
    };
    let result = ui.store.list_runs(&filter).await;
    let page_of = match result {
        Ok(p) => p,
        Err(e) => return error_page(&e),
    };
    let field = |name: &str, label: &str, value: &Option<String>| {
        format!(
            r#"<label>{label} <input name="{name}" value="{}" size="12"></label> "#,
            esc(value.as_deref().unwrap_or(""))
        )
    };
    let mut body = String::from(r#"<form class="filters" method="get" action="/runs">"#);
    body.push_str(&field("queue", "queue", &q.queue));
    body.push_str(r#"<label>status <select name="status"><option value="">any</option>"#);
    for s in STATUSES {
        let selected = if q.status.as_deref() == Some(s) { " selected" } else { "" };
        let _ = write!(body, r#"<option{selected}>{s}</option>"#);
    }
    body.push_str("</select></label> ");
    body.push_str(&field("conversation", "conversation", &q.conversation));
    body.push_str(&field("bot", "bot", &q.bot));
    body.push_str(&field("workspace", "workspace", &q.workspace));
    body.push_str(&field("thread", "thread", &q.thread));
    body.push_str(&field("runner", "runner", &q.runner));
    body.push_str(r#"<button>Filter</button></form>"#);
    let _ = write!(body, r#"<p class="summary">{} runs match</p>"#, page_of.total);
    body.push_str(r#"<table id="runs"><thead><tr><th>id</th><th>run</th><th>queue</th><th>runner</th><th>status</th><th>attempts</th><th>created</th><th>updated</th></tr></thead><tbody>"#);
    for r in &page_of.items {
        let _ = write!(
            body,
            r#"<tr data-run="{}"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class="status {}">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            esc(&r.run_id),
            r.id,
            run_link(&r.run_id),
            queue_link(&r.queue_name),
            esc(&r.runner_id),
            r.status,
            r.status,
            r.dispatch_attempts,
            when(Some(r.created_at)),
            when(Some(r.updated_at))
        );
    }
    if page_of.items.is_empty() {
        body.push_str(r#"<tr><td colspan="8" class="muted">no runs</td></tr>"#);
    }
    body.push_str("</tbody></table>");
    if let (true, Some(cursor)) = (page_of.has_more, page_of.next_cursor) {
        let mut link = String::from("/runs?");
        for (name, value) in [
            ("queue", &q.queue),
            ("status", &q.status),
            ("conversation", &q.conversation),
            ("bot", &q.bot),
            ("workspace", &q.workspace),
            ("thread", &q.thread),
            ("runner", &q.runner),
        ] {
            if let Some(v) = set(value) {
                let _ = write!(link, "{name}={}&", enc(&v));
            }
        }
        let _ = write!(link, "before={cursor}");
        let _ = write!(body, r#"<p><a id="next" href="{}">older runs →</a></p>"#, esc(&link));
    }
    page("Runs", &body, false).into_response()
}

/// Events a run page shows at first (the newest); the live view adds the rest.
const FIRST_EVENTS: usize = 100;

/// `/runs/{run_id}`: every field, the lease with its countdown, the actions
/// the run's status allows, and its events, live.
pub async fn run(State(ui): State<Shared>, Path(run_id): Path<String>) -> Response {
    let run = match ui.store.get_run(&run_id).await {
        Ok(r) => r,
        Err(e) => return error_page(&e),
    };
    let (events, now_ms) = match tokio::try_join!(
        ui.store.page_run_events(&run_id, None, None, FIRST_EVENTS, Direction::Backward),
        ui.store.server_time_ms()
    ) {
        Ok(both) => both,
        Err(e) => return error_page(&e),
    };
    let mut items = events.items;
    items.reverse();
    let last = items.last().map(|e| e.sequence).unwrap_or(0);

    let mut body = format!(
        r#"<p class="summary">status <b class="status {}" id="status">{}</b>{} · queue {} · runner {}</p>"#,
        run.status,
        run.status,
        run.status_reason.as_deref().map(|r| format!(" ({})", esc(r))).unwrap_or_default(),
        queue_link(&run.queue_name),
        esc(&run.runner_id)
    );
    body.push_str(&lease_section(&run, now_ms));
    body.push_str(&super::actions::forms(&ui, &run));
    let _ = write!(
        body,
        r#"<h2>Events</h2><p class="muted" id="live-state">{}</p><table id="events" data-live="/runs/{}/live?after={last}"><thead><tr><th>seq</th><th>type</th><th>source</th><th>at</th><th>data</th></tr></thead><tbody>"#,
        if events.has_more {
            format!("the last {FIRST_EVENTS} events; older ones: runledger events")
        } else {
            String::new()
        },
        enc(&run_id)
    );
    for e in &items {
        let _ = write!(
            body,
            r#"<tr data-seq="{}"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>"#,
            e.sequence,
            e.sequence,
            esc(&e.event_type),
            esc(&e.source),
            when(Some(e.created_at)),
            esc(&short_json(&e.data))
        );
    }
    body.push_str("</tbody></table>");
    body.push_str(&fields_table(&run));
    page(&format!("Run {run_id}"), &body, false).into_response()
}

fn lease_section(run: &Run, now_ms: i64) -> String {
    let Some(until) = run.claim_lease_expires_at_ms.filter(|_| run.status == RunStatus::Claimed) else {
        return String::new();
    };
    format!(
        r#"<p id="lease">held by <b>{}</b> (attempt {}), lease expires in <span class="countdown" data-until-ms="{until}" data-server-now-ms="{now_ms}">{}</span></p>"#,
        esc(run.claimed_by_runtime_id.as_deref().unwrap_or("?")),
        run.dispatch_attempts,
        age(Some((until - now_ms) as f64 / 1000.0))
    )
}

/// Every field of the run as the seed names it; times also as dates.
fn fields_table(run: &Run) -> String {
    let mut out = String::from(r#"<h2>Fields</h2><table id="fields"><tbody>"#);
    if let Ok(Value::Object(map)) = serde_json::to_value(run) {
        for (name, value) in map {
            let shown = match (&value, name.ends_with("_at")) {
                (Value::Number(n), true) => format!("{} <span class=\"muted\">{n}</span>", when(n.as_i64())),
                (Value::String(s), _) => esc(s),
                (Value::Null, _) => "<span class=\"muted\">null</span>".into(),
                (Value::Number(n), false) => n.to_string(),
                (other, _) => format!("<code>{}</code>", esc(&short_json(other))),
            };
            let _ = write!(out, r#"<tr data-field="{}"><th>{}</th><td>{shown}</td></tr>"#, esc(&name), esc(&name));
        }
    }
    out.push_str("</tbody></table>");
    out
}

/// JSON on one line, cut at 2,000 characters.
pub fn short_json(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(2000) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text,
    }
}

/// `/runtimes`: every registered runtime, its heartbeat age and the runs it holds.
pub async fn runtimes(State(ui): State<Shared>) -> Response {
    let (page_of, rows, now_ms) = match tokio::try_join!(
        ui.store.page_runtimes(&[], None, 500),
        ui.store.queue_overview(1000),
        ui.store.server_time_ms()
    ) {
        Ok(all) => all,
        Err(e) => return error_page(&e),
    };
    // A merged row repeats its partitions' holders: count physical queues only.
    let mut held: BTreeMap<&str, usize> = BTreeMap::new();
    for s in QueueStats::physical(&rows) {
        for h in &s.lease_holders {
            *held.entry(h.runtime_id.as_str()).or_default() += 1;
        }
    }
    let mut body = format!(
        r#"<p class="summary">{} runtimes</p><table id="runtimes"><thead><tr><th>runtime</th><th>status</th><th>heartbeat age</th><th>runs held</th><th>version</th><th>labels</th><th>registered</th></tr></thead><tbody>"#,
        page_of.total
    );
    for rt in &page_of.items {
        let beat_age = rt.last_heartbeat_at.map(|s| (now_ms as f64 / 1000.0 - s as f64).max(0.0));
        let _ = write!(
            body,
            r#"<tr data-runtime="{}"><td>{}</td><td class="status {}">{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>"#,
            esc(&rt.runtime_id),
            esc(&rt.runtime_id),
            esc(&rt.status),
            esc(&rt.status),
            age(beat_age),
            held.get(rt.runtime_id.as_str()).copied().unwrap_or(0),
            esc(rt.version.as_deref().unwrap_or("-")),
            esc(&short_json(&rt.labels)),
            when(Some(rt.created_at))
        );
    }
    if page_of.items.is_empty() {
        body.push_str(r#"<tr><td colspan="7" class="muted">no runtimes registered</td></tr>"#);
    }
    body.push_str("</tbody></table>");
    page("Runtimes", &body, true).into_response()
}
