//! The dashboard's actions: cancel a run, requeue one that ended badly,
//! release a stuck claim, pause or resume a queue or one group of it. Each is the `Store`
//! operator call the CLI makes (`cancel_by_operator`, `requeue_run`,
//! `release_stuck_claim`, `pause`, `resume`), which records an audit event
//! (on the run, or in the queue's audit stream), with actor `ui`.
//!
//! Guards, in order: `--read-only` refuses every action (403); a request
//! from another site (`Sec-Fetch-Site: cross-site`, or an `Origin` that is
//! not this host) is refused (403), so a page elsewhere cannot post to a
//! dashboard on loopback; with `--token`, the form field `token` or an
//! `Authorization: Bearer` header must carry it (401).

use axum::Form;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use runledger::{Run, RunStatus};
use serde::Deserialize;

use super::html::{enc, error_page, esc, message};
use super::{Shared, Ui};

const ACTOR: &str = "ui";

#[derive(Deserialize, Default)]
pub struct ActionForm {
    token: Option<String>,
    reason: Option<String>,
    /// For a release: the claim attempt the operator saw.
    attempt: Option<i64>,
    /// For a group's pause or resume posted as a form: the group's key.
    group: Option<String>,
}

impl ActionForm {
    fn reason(&self) -> Option<&str> {
        self.reason.as_deref().map(str::trim).filter(|r| !r.is_empty())
    }
}

/// `POST /runs/{run_id}/{action}`: `cancel` (optional `reason`), `requeue`,
/// `release` (`attempt`, optional `reason`); a redirect to the run's page
/// (the new run's, for a requeue) when done.
pub async fn act(
    State(ui): State<Shared>,
    Path((run_id, action)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Err((status, why)) = guard(&ui, &headers, &form) {
        return message(status, &why);
    }
    let done = match action.as_str() {
        "cancel" => ui.store.cancel_by_operator(&run_id, form.reason(), ACTOR).await,
        "requeue" => ui.store.requeue_run(&run_id, ACTOR).await,
        "release" => match form.attempt {
            Some(attempt) => ui.store.release_stuck_claim(&run_id, attempt, form.reason(), ACTOR).await,
            None => {
                return message(StatusCode::BAD_REQUEST, "a release needs the claim's attempt (form field attempt)");
            }
        },
        other => return message(StatusCode::NOT_FOUND, &format!("no action {other:?}: cancel, requeue or release")),
    };
    match done {
        Ok(run) => to_run(&run.run_id),
        Err(e) => error_page(&e),
    }
}

/// `POST /queues/{queue}/{action}`: `pause` or `resume` the queue; a
/// redirect to the queue's page when done.
pub async fn queue_act(
    State(ui): State<Shared>,
    Path((queue, action)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Err((status, why)) = guard(&ui, &headers, &form) {
        return message(status, &why);
    }
    let done = match action.as_str() {
        "pause" => ui.store.pause(&queue, None, Some(ACTOR)).await,
        "resume" => ui.store.resume(&queue, None, Some(ACTOR)).await,
        other => return message(StatusCode::NOT_FOUND, &format!("no queue action {other:?}: pause or resume")),
    };
    match done {
        Ok(_) => Redirect::to(&format!("/queues/{}", enc(&queue))).into_response(),
        Err(e) => error_page(&e),
    }
}

/// `POST /queues/{queue}/groups/{group}/{action}` (the Resume buttons: the
/// key percent-encoded in the path): `pause` or `resume` one group of the
/// queue; a redirect to the queue's page when done.
pub async fn group_act(
    State(ui): State<Shared>,
    Path((queue, group, action)): Path<(String, String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    set_group_paused(&ui, &queue, &group, &action, &headers, &form).await
}

/// `POST /queues/{queue}/groups/{action}` with the key in the form field
/// `group` (the pause form, where the operator types the key).
pub async fn group_form_act(
    State(ui): State<Shared>,
    Path((queue, action)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    let group = form.group.clone().unwrap_or_default();
    set_group_paused(&ui, &queue, &group, &action, &headers, &form).await
}

async fn set_group_paused(
    ui: &Ui,
    queue: &str,
    group: &str,
    action: &str,
    headers: &HeaderMap,
    form: &ActionForm,
) -> Response {
    if let Err((status, why)) = guard(ui, headers, form) {
        return message(status, &why);
    }
    // Not trimmed: a key is matched exactly, and " A" pausing "A" would be a surprise.
    if group.trim().is_empty() {
        return message(StatusCode::BAD_REQUEST, "give the key of the group to pause or resume (form field group)");
    }
    let done = match action {
        "pause" => ui.store.pause(queue, Some(group), Some(ACTOR)).await,
        "resume" => ui.store.resume(queue, Some(group), Some(ACTOR)).await,
        other => return message(StatusCode::NOT_FOUND, &format!("no group action {other:?}: pause or resume")),
    };
    match done {
        Ok(_) => Redirect::to(&format!("/queues/{}", enc(queue))).into_response(),
        Err(e) => error_page(&e),
    }
}

/// The paused groups of a queue's page, each with its Resume button, and a
/// form to pause a group by its key (no buttons on a read-only dashboard).
/// `more`: paused groups beyond those listed.
pub fn group_forms(ui: &Ui, queue: &str, paused: &[String], more: i64) -> String {
    let token = token_input(ui);
    let q = enc(queue);
    let mut out = String::from(r#"<h2>Paused groups</h2><table id="paused-groups"><tbody>"#);
    for g in paused {
        out.push_str(&format!(r#"<tr data-group="{}"><td>{}</td><td>"#, esc(g), esc(g)));
        if !ui.read_only {
            out.push_str(&format!(
                r#"<form method="post" action="/queues/{q}/groups/{}/resume">{token}<button>Resume</button></form>"#,
                enc(g)
            ));
        }
        out.push_str("</td></tr>");
    }
    if paused.is_empty() {
        out.push_str(r#"<tr><td colspan="2" class="muted">none</td></tr>"#);
    }
    out.push_str("</tbody></table>");
    if more > 0 {
        out.push_str(&format!(r#"<p class="muted">and {more} more paused groups</p>"#));
    }
    if !ui.read_only {
        out.push_str(&format!(
            r#"<div class="actions"><form method="post" action="/queues/{q}/groups/pause" id="pause-group"><input name="group" placeholder="group key" required size="16">{token}<button>Pause group</button></form></div>"#
        ));
    }
    out
}

/// The pause or resume button of a queue's page (none on a read-only dashboard).
pub fn queue_forms(ui: &Ui, queue: &str, paused: bool) -> String {
    if ui.read_only {
        return String::new();
    }
    let token = token_input(ui);
    let (action, label) = if paused { ("resume", "Resume queue") } else { ("pause", "Pause queue") };
    format!(
        r#"<div class="actions"><form method="post" action="/queues/{}/{action}" id="{action}">{token}<button>{label}</button></form></div>"#,
        enc(queue)
    )
}

fn to_run(run_id: &str) -> Response {
    Redirect::to(&format!("/runs/{}", enc(run_id))).into_response()
}

/// Why an action is refused: its status code and a line for the page.
type Refusal = (StatusCode, String);

fn guard(ui: &Ui, headers: &HeaderMap, form: &ActionForm) -> Result<(), Refusal> {
    if ui.read_only {
        return Err((StatusCode::FORBIDDEN, "this dashboard is read-only (--read-only)".into()));
    }
    let header = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) == Some("cross-site") {
        return Err((StatusCode::FORBIDDEN, "actions from another site are refused".into()));
    }
    if let Some(origin) = header(header::ORIGIN) {
        let origin_host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or(origin);
        if Some(origin_host) != header(header::HOST) {
            return Err((StatusCode::FORBIDDEN, format!("actions from origin {origin} are refused")));
        }
    }
    if let Some(expected) = &ui.token {
        let bearer = header(header::AUTHORIZATION).and_then(|v| v.strip_prefix("Bearer "));
        let given = form.token.as_deref().filter(|t| !t.is_empty()).or(bearer).unwrap_or("");
        if !same(given.as_bytes(), expected.as_bytes()) {
            return Err((StatusCode::UNAUTHORIZED, "this action needs the dashboard's token (--token)".into()));
        }
    }
    Ok(())
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token field of an action form, when the dashboard has a token.
fn token_input(ui: &Ui) -> &'static str {
    if ui.token.is_some() {
        r#"<input type="password" name="token" placeholder="token" required size="10">"#
    } else {
        ""
    }
}

/// The action forms a run's status allows (none on a read-only dashboard).
pub fn forms(ui: &Ui, run: &Run) -> String {
    if ui.read_only {
        return r#"<p class="muted">read-only dashboard: no actions</p>"#.into();
    }
    let token = token_input(ui);
    let id = enc(&run.run_id);
    let mut out = String::from(r#"<div class="actions">"#);
    if !run.status.is_terminal() {
        out.push_str(&format!(
            r#"<form method="post" action="/runs/{id}/cancel" id="cancel"><input name="reason" placeholder="reason" size="16">{token}<button>Cancel run</button></form>"#
        ));
    }
    if run.status == RunStatus::Claimed {
        out.push_str(&format!(
            r#"<form method="post" action="/runs/{id}/release" id="release"><input type="hidden" name="attempt" value="{}"><input name="reason" placeholder="reason" size="16">{token}<button>Release claim</button></form>"#,
            run.dispatch_attempts
        ));
    }
    if matches!(run.status, RunStatus::Failed | RunStatus::Timeout | RunStatus::Cancelled) {
        out.push_str(&format!(
            r#"<form method="post" action="/runs/{id}/requeue" id="requeue">{token}<button>Requeue as {}</button></form>"#,
            esc(&runledger::store::requeued_run_id(&run.run_id))
        ));
    }
    out.push_str("</div>");
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_compare_whole() {
        assert!(super::same(b"abc", b"abc"));
        assert!(!super::same(b"abc", b"abd"));
        assert!(!super::same(b"abc", b"abcd"));
    }
}
