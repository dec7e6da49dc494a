//! `runledger ui` over HTTP against a private redis-server: every page shows
//! what Redis holds, the live view streams events appended after it opened,
//! every action changes Redis as the CLI's does and leaves an audit event,
//! the guards (read-only, token, cross-site, non-loopback) refuse, and
//! `/metrics` parses as Prometheus text with the values set up here.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use crate::common::dashboard::{Dashboard, client, row_cells};
use futures_util::StreamExt;
use runledger::*;
use serde_json::json;

const BOUND: Duration = Duration::from_secs(120);

async fn bounded<F: std::future::Future<Output = ()>>(case: F) {
    tokio::time::timeout(BOUND, case).await.expect("test took more than 120 s");
}

async fn get(url: &str) -> (u16, String) {
    let response = client().get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

async fn post(url: &str, form: &[(&str, &str)]) -> (u16, String, Option<String>) {
    let response = client().post(url).form(form).send().await.unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = response.status().as_u16();
    let location = response.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_string);
    (status, response.text().await.expect("body"), location)
}

async fn claim(store: &Store, queue: &str, runtime: &str, lease: Duration) -> Run {
    store
        .claim_next_run(&ClaimRequest::new(runtime).queue(queue).lease(lease))
        .await
        .expect("claim")
        .expect("a run to claim")
}

/// A run that ends dead: one attempt allowed, its lease left to expire, a reap.
async fn dead_run(store: &Store, queue: &str, run_id: &str) {
    store.create_run(&NewRun::new(run_id, "agent").queue(queue).max_attempts(1)).await.expect("create");
    claim(store, queue, "rt-gone", Duration::from_millis(200)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    store.reap(&[queue.to_string()], None).await.expect("reap");
    let run = store.get_run(run_id).await.expect("dead run");
    assert_eq!(run.status, RunStatus::Failed, "{run:?}");
}

async fn audit_types(store: &Store, run_id: &str) -> Vec<String> {
    common::all_events(store, run_id)
        .await
        .into_iter()
        .map(|e| e.event_type)
        .filter(|t| t.starts_with("operator."))
        .collect()
}

#[tokio::test]
async fn every_page_shows_what_redis_holds() {
    bounded(async {
        let (redis, store) = common::store().await;
        for i in 0..3 {
            store.create_run(&NewRun::new(format!("q{i}"), "agent").queue("alpha").conversation("c1")).await.unwrap();
        }
        store.create_run(&NewRun::new("d1", "agent").queue("alpha").not_before(4e9)).await.unwrap();
        store.register_runtime(&RegisterRuntime::new("rt-1")).await.unwrap();
        let held = claim(&store, "alpha", "rt-1", Duration::from_secs(60)).await;
        let token = held.claim_token.clone().unwrap();
        store
            .append_events(&held.run_id, Some(&token), &[NewEvent::new(1, "progress", json!({"step": "<one>"}))])
            .await
            .unwrap();
        store.create_run(&NewRun::new("b1", "other-agent").queue("beta")).await.unwrap();
        let b1 = claim(&store, "beta", "rt-1", Duration::from_secs(60)).await;
        store.finalize_run("b1", &Finish::new(RunStatus::Failed), b1.claim_token.as_deref()).await.unwrap();
        dead_run(&store, "beta", "dead/1 ?").await;
        store.declare_partitions("wide", 2).await.unwrap();
        for i in 0..4 {
            store.create_run(&NewRun::new(format!("w{i}"), "agent").queue("wide")).await.unwrap();
        }

        let ui = Dashboard::start(&redis.url, &[]).await;
        let (status, home) = get(&ui.url("/")).await;
        assert_eq!(status, 200);
        // queue, queued, delayed, pinned, claimed, running, dead, finished, oldest, completed, failed, chart
        let alpha = row_cells(&home, r#"data-queue="alpha""#);
        assert_eq!(&alpha[1..8], ["2", "1", "0", "1", "0", "0", "0"], "{alpha:?}");
        let beta = row_cells(&home, r#"data-queue="beta""#);
        assert_eq!(&beta[1..8], ["0", "0", "0", "0", "0", "1", "2"], "{beta:?}");
        assert_eq!(beta[10], "2", "failed counter: {beta:?}");
        let wide = row_cells(&home, r#"data-queue="wide""#);
        assert_eq!(wide[1], "4", "a partitioned queue is one row: {wide:?}");
        let p0 = row_cells(&home, r#"data-queue="wide#0""#);
        let p1 = row_cells(&home, r#"data-queue="wide#1""#);
        assert_eq!(p0[1].parse::<i64>().unwrap() + p1[1].parse::<i64>().unwrap(), 4);
        assert!(home.contains("1 online, 0 stale"), "runtime summary missing");

        let (status, alpha_page) = get(&ui.url("/queues/alpha")).await;
        assert_eq!(status, 200);
        assert!(alpha_page.contains(&format!("/runs/{}", held.run_id)), "lease holder listed");
        assert!(alpha_page.contains("rt-1"));
        let (_, beta_page) = get(&ui.url("/queues/beta")).await;
        assert!(beta_page.contains("/runs/dead%2F1%20%3F"), "dead run listed with its id encoded");

        let (status, queued) = get(&ui.url("/runs?queue=alpha&status=queued")).await;
        assert_eq!(status, 200);
        assert!(queued.contains("3 runs match"), "queued (delayed included), not the claimed one: {queued}");
        assert!(!queued.contains(&format!(r#"data-run="{}""#, held.run_id)), "claimed run filtered out");
        let (_, by_conversation) = get(&ui.url("/runs?conversation=c1&limit=1")).await;
        assert!(by_conversation.contains("3 runs match"));
        assert!(by_conversation.contains(r#"id="next""#), "a next-page cursor link");
        let next = by_conversation
            .split(r#"id="next" href=""#)
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .replace("&amp;", "&");
        let (status, second) = get(&ui.url(&next)).await;
        assert_eq!(status, 200);
        assert!(second.contains("3 runs match"));
        let (status, _) = get(&ui.url("/runs?status=bogus")).await;
        assert_eq!(status, 400, "unknown status refused");

        let (status, run_page) = get(&ui.url(&format!("/runs/{}", held.run_id))).await;
        assert_eq!(status, 200);
        for field in ["run_id", "status", "claimed_by_runtime_id", "dispatch_attempts", "created_at", "metadata"] {
            assert!(run_page.contains(&format!(r#"data-field="{field}""#)), "field {field} missing");
        }
        assert!(run_page.contains(r#"id="lease""#) && run_page.contains("held by <b>rt-1</b>"), "lease shown");
        assert!(run_page.contains(r#"data-seq="1""#), "event row");
        assert!(run_page.contains("&lt;one&gt;"), "event data escaped");
        assert!(!run_page.contains(&token), "the claim token never shows");
        assert!(run_page.contains(r#"id="release""#) && run_page.contains(r#"id="cancel""#));
        let (status, _) = get(&ui.url("/runs/no-such-run")).await;
        assert_eq!(status, 404);

        let (status, runtimes) = get(&ui.url("/runtimes")).await;
        assert_eq!(status, 200);
        let rt = row_cells(&runtimes, r#"data-runtime="rt-1""#);
        assert_eq!(rt[1], "online");
        assert_eq!(rt[3], "1", "runs held: {rt:?}");
    })
    .await;
}

#[tokio::test]
async fn the_live_view_streams_events_appended_after_it_opened() {
    bounded(async {
        let (redis, store) = common::store().await;
        store.create_run(&NewRun::new("live", "agent").queue("q")).await.unwrap();
        let run = claim(&store, "q", "rt", Duration::from_secs(60)).await;
        let token = run.claim_token.clone().unwrap();
        store.append_events("live", Some(&token), &[NewEvent::new(1, "start", json!({}))]).await.unwrap();
        let ui = Dashboard::start(&redis.url, &[]).await;
        let response = client().get(ui.url("/runs/live/live?after=1")).send().await.expect("open live view");
        assert_eq!(response.status().as_u16(), 200);
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let mut body = response.bytes_stream();
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                store
                    .append_events("live", Some(&token), &[NewEvent::new(2, "progress", json!({"n": 2}))])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
                store
                    .append_events("live", Some(&token), &[NewEvent::new(3, "progress", json!({"n": 3}))])
                    .await
                    .unwrap();
                store.finalize_run("live", &Finish::new(RunStatus::Completed), Some(&token)).await.unwrap();
            })
        };
        let mut text = String::new();
        while !text.contains("event: end") {
            let chunk = tokio::time::timeout(Duration::from_secs(20), body.next())
                .await
                .expect("no live message in 20 s")
                .expect("the stream ended before its end message")
                .expect("stream chunk");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        writer.await.unwrap();
        let seqs: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("id: ")).collect();
        assert_eq!(seqs, ["2", "3"], "each new event once, in order, none before `after`: {text}");
        assert!(text.contains(r#""n":2"#) && text.contains(r#""type":"progress""#));
        assert!(text.contains(r#""status":"completed""#), "the end carries the final status: {text}");

        // A browser reconnecting sends Last-Event-ID and gets only what follows it.
        let again = client().get(ui.url("/runs/live/live")).header("Last-Event-ID", "2").send().await.unwrap();
        let text = again.text().await.unwrap();
        let seqs: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("id: ")).collect();
        assert_eq!(seqs, ["3"], "{text}");
        let (status, _) = get(&ui.url("/runs/nope/live")).await;
        assert_eq!(status, 404);
    })
    .await;
}

#[tokio::test]
async fn actions_do_what_the_cli_does_and_are_audited() {
    bounded(async {
        let (redis, store) = common::store().await;
        let ui = Dashboard::start(&redis.url, &[]).await;

        // Cancel a queued run.
        store.create_run(&NewRun::new("c1", "agent").queue("q")).await.unwrap();
        let (status, _, location) = post(&ui.url("/runs/c1/cancel"), &[("reason", "not needed")]).await;
        assert_eq!(status, 303);
        assert_eq!(location.as_deref(), Some("/runs/c1"));
        let c1 = store.get_run("c1").await.unwrap();
        assert_eq!(c1.status, RunStatus::Cancelled);
        assert_eq!(audit_types(&store, "c1").await, ["operator.cancel"]);

        // Release a stuck claim: the attempt must be the one held.
        store.create_run(&NewRun::new("s1", "agent").queue("q")).await.unwrap();
        let held = claim(&store, "q", "rt-stuck", Duration::from_secs(600)).await;
        let (status, body, _) = post(&ui.url("/runs/s1/release"), &[("attempt", "7")]).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(store.get_run("s1").await.unwrap().status, RunStatus::Claimed, "a wrong attempt changes nothing");
        let (status, _, _) = post(&ui.url("/runs/s1/release"), &[("attempt", "1"), ("reason", "hung")]).await;
        assert_eq!(status, 303);
        let s1 = store.get_run("s1").await.unwrap();
        assert_eq!(s1.status, RunStatus::Queued);
        assert_eq!(s1.status_reason.as_deref(), Some("hung"));
        let renew = store.renew_claim("s1", held.claim_token.as_deref().unwrap(), Duration::from_secs(60)).await;
        assert!(matches!(renew, Err(Error::StaleToken(_))), "the old holder lost it: {renew:?}");
        let (status, _, _) = post(&ui.url("/runs/s1/release"), &[("attempt", "1")]).await;
        assert_eq!(status, 409, "a second click finds it released");
        assert_eq!(audit_types(&store, "s1").await, ["operator.release"]);

        // Pause and resume a queue: its page shows the badge and the other button.
        let (status, _, location) = post(&ui.url("/queues/q/pause"), &[]).await;
        assert_eq!((status, location.as_deref()), (303, Some("/queues/q")));
        assert!(store.queue_stats("q", 0).await.unwrap().paused);
        let (_, page) = get(&ui.url("/queues/q")).await;
        assert!(page.contains("badge paused") && page.contains("Resume queue"), "{page}");
        let (status, _, _) = post(&ui.url("/queues/q/resume"), &[]).await;
        assert_eq!(status, 303);
        assert!(!store.queue_stats("q", 0).await.unwrap().paused);
        let (_, page) = get(&ui.url("/queues/q")).await;
        assert!(page.contains("Pause queue") && !page.contains("badge paused"), "{page}");
        let (status, _, _) = post(&ui.url("/queues/q/explode"), &[]).await;
        assert_eq!(status, 404);

        // Requeue a dead run: a new run with its fields, the old one stays dead.
        dead_run(&store, "dq", "dead1").await;
        let (status, _, location) = post(&ui.url("/runs/dead1/requeue"), &[]).await;
        assert_eq!(status, 303);
        assert_eq!(location.as_deref(), Some("/runs/dead1~r1"));
        let copy = store.get_run("dead1~r1").await.unwrap();
        assert_eq!(copy.status, RunStatus::Queued);
        assert_eq!(copy.queue_name, "dq");
        assert_eq!(copy.metadata["requeued_from"], "dead1");
        assert_eq!(copy.max_attempts, Some(1));
        assert_eq!(store.get_run("dead1").await.unwrap().status, RunStatus::Failed);
        let (status, _, location) = post(&ui.url("/runs/dead1/requeue"), &[]).await;
        assert_eq!((status, location.as_deref()), (303, Some("/runs/dead1~r1")), "a second click finds the copy");
        assert_eq!(store.queue_stats("dq", 0).await.unwrap().queued, 1, "one copy, not two");
        assert_eq!(audit_types(&store, "dead1").await[0], "operator.requeue");
        let (status, _, _) = post(&ui.url("/runs/dead1~r1/requeue"), &[]).await;
        assert_eq!(status, 409, "a queued run is not requeued");
        let (status, _, _) = post(&ui.url("/runs/missing/cancel"), &[]).await;
        assert_eq!(status, 404);

        // The CLI makes the same calls.
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_runledger"))
            .args(["--redis", &redis.url, "requeue", "c1"])
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(store.get_run("c1~r1").await.unwrap().status, RunStatus::Queued);
        store.create_run(&NewRun::new("s2", "agent").queue("cli")).await.unwrap();
        claim(&store, "cli", "rt-stuck", Duration::from_secs(600)).await;
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_runledger"))
            .args(["--redis", &redis.url, "release", "s2", "--attempt", "1", "--reason", "stuck"])
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(store.get_run("s2").await.unwrap().status, RunStatus::Queued);
        assert_eq!(audit_types(&store, "s2").await, ["operator.release"]);
        let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_runledger"))
            .args(["--redis", &redis.url, "release", "s2"])
            .output()
            .await
            .unwrap();
        assert!(!refused.status.success(), "release needs --token or --attempt");
    })
    .await;
}

#[tokio::test]
async fn guards_refuse_actions_and_leave_redis_alone() {
    bounded(async {
        let (redis, store) = common::store().await;
        store.create_run(&NewRun::new("r", "agent").queue("q")).await.unwrap();
        let mut raw = common::raw(&redis).await;
        let before = common::keyspace(&mut raw).await;

        let read_only = Dashboard::start(&redis.url, &["--read-only"]).await;
        let (status, _, _) = post(&read_only.url("/runs/r/cancel"), &[]).await;
        assert_eq!(status, 403);
        let (status, _, _) = post(&read_only.url("/queues/q/pause"), &[]).await;
        assert_eq!(status, 403, "pausing is an action too");
        let (_, page) = get(&read_only.url("/queues/q")).await;
        assert!(!page.contains("Pause queue"), "no pause button on a read-only dashboard");
        let (_, page) = get(&read_only.url("/runs/r")).await;
        assert!(!page.contains("<form method=\"post\""), "no action forms on a read-only dashboard");

        let guarded = Dashboard::start(&redis.url, &["--token", "s3cret"]).await;
        let (status, _, _) = post(&guarded.url("/runs/r/cancel"), &[]).await;
        assert_eq!(status, 401);
        let (status, _, _) = post(&guarded.url("/runs/r/cancel"), &[("token", "wrong")]).await;
        assert_eq!(status, 401);
        let (status, _, _) = post(&guarded.url("/queues/q/pause"), &[("token", "wrong")]).await;
        assert_eq!(status, 401);
        let cross = client()
            .post(guarded.url("/runs/r/cancel"))
            .header("Origin", "http://evil.example")
            .form(&[("token", "s3cret")])
            .send()
            .await
            .unwrap();
        assert_eq!(cross.status().as_u16(), 403, "another site's form is refused");
        assert_eq!(common::keyspace(&mut raw).await, before, "refused actions wrote nothing");

        let bearer = client().post(guarded.url("/runs/r/cancel")).bearer_auth("s3cret").form(&[("reason", "x")]);
        assert_eq!(bearer.send().await.unwrap().status().as_u16(), 303);
        assert_eq!(store.get_run("r").await.unwrap().status, RunStatus::Cancelled);

        // Not loopback, no token, not read-only: refused before it listens.
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_runledger"))
            .args(["--redis", &redis.url, "ui", "--listen", "0.0.0.0:0"])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "bad input exit code");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not a loopback address") && stderr.contains("--token"), "{stderr}");
    })
    .await;
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_with_the_values_set_up() {
    bounded(async {
        let (redis, store) = common::store().await;
        for i in 0..3 {
            store.create_run(&NewRun::new(format!("a{i}"), "agent").queue("alpha")).await.unwrap();
        }
        store.create_run(&NewRun::new("late", "agent").queue("alpha").not_before(4e9)).await.unwrap();
        let held = claim(&store, "alpha", "rt-1", Duration::from_secs(60)).await;
        store.register_runtime(&RegisterRuntime::new("rt-1")).await.unwrap();
        let done = claim(&store, "alpha", "rt-1", Duration::from_secs(60)).await;
        store
            .finalize_run(&done.run_id, &Finish::new(RunStatus::Completed), done.claim_token.as_deref())
            .await
            .unwrap();
        dead_run(&store, "beta", "gone").await;
        store.declare_partitions("wide", 2).await.unwrap();
        for i in 0..5 {
            store.create_run(&NewRun::new(format!("w{i}"), "agent").queue("wide")).await.unwrap();
        }
        let _ = held;
        // A paused queue, and a grouped one with a run waiting for its group.
        store.pause("beta", None, Some("test")).await.unwrap();
        let grouped = GroupSettings { group_by: Some(Some(GroupBy::GroupKey)), ..Default::default() };
        store.set_groups("chat", &grouped).await.unwrap();
        for i in 0..2 {
            store.create_run(&NewRun::new(format!("g{i}"), "agent").queue("chat").group_key("G")).await.unwrap();
        }

        let ui = Dashboard::start(&redis.url, &["--read-only"]).await;
        let page = client().get(ui.url("/")).send().await.unwrap().text().await.unwrap();
        assert_eq!(page.matches("badge paused").count(), 1, "one paused queue has its badge: {page}");
        let response = client().get(ui.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
        let text = response.text().await.unwrap();
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text");
        let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
            let found: Vec<f64> = scrape
                .samples
                .iter()
                .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                    prometheus_parse::Value::Untyped(v) => v,
                    _ => f64::NAN,
                })
                .collect();
            assert!(!found.is_empty(), "no sample {name}{labels:?} in\n{text}");
            found.iter().sum()
        };
        let alpha = [("queue", "alpha"), ("partition", "alpha")];
        let with = |status: &'static str| {
            let mut l: Vec<(&str, &str)> = alpha.to_vec();
            l.push(("status", status));
            l
        };
        assert_eq!(value("runledger_queue_runs", &with("queued")), 1.0);
        assert_eq!(value("runledger_queue_paused", &[("queue", "beta")]), 1.0);
        assert_eq!(value("runledger_queue_paused", &[("queue", "alpha")]), 0.0);
        assert_eq!(value("runledger_queue_waiting_for_group", &[("queue", "chat")]), 1.0);
        assert_eq!(value("runledger_queue_runs", &[("queue", "chat"), ("status", "queued")]), 2.0);
        assert_eq!(value("runledger_queue_runs", &with("delayed")), 1.0);
        assert_eq!(value("runledger_queue_runs", &with("claimed")), 1.0);
        assert_eq!(value("runledger_queue_runs", &with("finished")), 1.0);
        assert_eq!(value("runledger_queue_leases", &alpha), 1.0);
        assert!(value("runledger_queue_oldest_queued_age_seconds", &alpha) >= 0.0);
        assert_eq!(value("runledger_runs_total", &with("created")), 4.0);
        assert_eq!(value("runledger_runs_total", &with("completed")), 1.0);
        assert_eq!(value("runledger_queue_runs", &[("queue", "beta"), ("status", "dead")]), 1.0);
        assert_eq!(value("runledger_runs_total", &[("queue", "beta"), ("status", "dead")]), 1.0);
        assert_eq!(value("runledger_runs_total", &[("queue", "beta"), ("status", "failed")]), 1.0);
        // A partitioned queue: one series per partition, adding up to the queue.
        assert_eq!(value("runledger_queue_runs", &[("queue", "wide"), ("status", "queued")]), 5.0);
        assert_eq!(
            value("runledger_queue_runs", &[("queue", "wide"), ("partition", "wide#0"), ("status", "queued")])
                + value("runledger_queue_runs", &[("queue", "wide"), ("partition", "wide#1"), ("status", "queued")]),
            5.0
        );
        assert!(!text.contains(r#"partition="wide""#), "no merged row counted twice");
        assert_eq!(value("runledger_runtimes", &[("status", "online")]), 1.0);
        assert_eq!(value("runledger_runtimes", &[("status", "stale")]), 0.0);
        assert_eq!(value("runledger_queues", &[]), 4.0, "alpha, beta, wide and chat");
        let types: HashMap<&str, &str> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_once(' ')).collect();
        assert_eq!(types.get("runledger_runs_total"), Some(&"counter"));
        assert_eq!(types.get("runledger_queue_runs"), Some(&"gauge"));
    })
    .await;
}

/// A group key that needs escaping in a URL path and in HTML alike.
const ODD_GROUP: &str = r#"a/b ?&<x>"'#%"#;
/// ODD_GROUP as one path segment.
const ODD_GROUP_PATH: &str = "a%2Fb%20%3F%26%3Cx%3E%22%27%23%25";

/// A queue grouped by conversation (one run of a group at a time) with one
/// queued run in ODD_GROUP and one in `B`.
async fn grouped_queue(store: &Store, queue: &str) {
    let settings =
        GroupSettings { group_by: Some(Some(GroupBy::ConversationId)), concurrency: Some(1), ..Default::default() };
    store.set_groups(queue, &settings).await.expect("set groups");
    store.create_run(&NewRun::new("odd-1", "agent").queue(queue).conversation(ODD_GROUP)).await.expect("create");
    store.create_run(&NewRun::new("b-1", "agent").queue(queue).conversation("B")).await.expect("create");
}

/// The queue's audit stream as (type, group, by).
async fn queue_audit(store: &Store, raw: &mut runledger::store::Conn, queue: &str) -> Vec<(String, String, String)> {
    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(store.queue_keys(queue).base.clone() + "audit")
        .arg("-")
        .arg("+")
        .query_async(raw)
        .await
        .expect("XRANGE audit");
    entries.into_iter().map(|(_, f)| (f["type"].clone(), f["group"].clone(), f["by"].clone())).collect()
}

#[tokio::test]
async fn a_group_is_paused_and_resumed_from_its_queue_page() {
    bounded(async {
        let (redis, store) = common::store().await;
        let mut raw = common::raw(&redis).await;
        grouped_queue(&store, "chat").await;
        let ui = Dashboard::start(&redis.url, &[]).await;
        let (_, home) = get(&ui.url("/")).await;
        assert!(!home.contains("groups-paused"), "no group paused yet: {home}");
        let (_, page) = get(&ui.url("/queues/chat")).await;
        assert!(page.contains("grouped by <b>conversation_id</b>"), "{page}");
        assert!(page.contains(r#"id="pause-group""#) && page.contains(r#"action="/queues/chat/groups/pause""#));

        // Pause by key, as the form posts it.
        let (status, body, location) = post(&ui.url("/queues/chat/groups/pause"), &[("group", ODD_GROUP)]).await;
        assert_eq!((status, location.as_deref()), (303, Some("/queues/chat")), "{body}");
        assert_eq!(queue_audit(&store, &mut raw, "chat").await, [("paused".into(), ODD_GROUP.into(), "ui".into())]);
        let b = claim(&store, "chat", "rt", Duration::from_secs(60)).await;
        assert_eq!(b.run_id, "b-1", "claims skip the paused group");
        let none = store.claim_next_run(&ClaimRequest::new("rt").queue("chat")).await.expect("claim");
        assert!(none.is_none(), "only the paused group's run is left: {none:?}");
        assert_eq!(store.get_run("odd-1").await.expect("get").status, RunStatus::Queued, "it stays queued");

        // The page lists it, escaped, with a Resume button that names it encoded.
        let (_, page) = get(&ui.url("/queues/chat")).await;
        let shown = r#"a/b ?&amp;&lt;x&gt;&quot;&#39;#%"#;
        assert!(page.contains(&format!(r#"<tr data-group="{shown}"><td>{shown}</td>"#)), "{page}");
        assert!(page.contains(&format!(r#"action="/queues/chat/groups/{ODD_GROUP_PATH}/resume""#)), "{page}");
        assert!(!page.contains("<x>"), "the key is escaped everywhere: {page}");
        let (_, home) = get(&ui.url("/")).await;
        assert!(home.contains(r#"<span class="badge groups-paused">1 group paused</span>"#), "{home}");
        assert!(!home.contains("badge paused"), "the queue itself is not paused: {home}");

        // Resume through the button's route.
        let (status, body, location) =
            post(&ui.url(&format!("/queues/chat/groups/{ODD_GROUP_PATH}/resume")), &[]).await;
        assert_eq!((status, location.as_deref()), (303, Some("/queues/chat")), "{body}");
        let odd = claim(&store, "chat", "rt", Duration::from_secs(60)).await;
        assert_eq!(odd.run_id, "odd-1", "the resumed group's run is claimable again");
        assert_eq!(
            queue_audit(&store, &mut raw, "chat").await,
            [("paused".into(), ODD_GROUP.into(), "ui".into()), ("resumed".into(), ODD_GROUP.into(), "ui".into())]
        );
        let (_, page) = get(&ui.url("/queues/chat")).await;
        assert!(!page.contains("data-group="), "no group paused any more: {page}");
        let (_, home) = get(&ui.url("/")).await;
        assert!(!home.contains("groups-paused"), "{home}");

        // Two paused groups: the badge counts them.
        for g in ["G1", "G2"] {
            let (status, _, _) = post(&ui.url(&format!("/queues/chat/groups/{g}/pause")), &[]).await;
            assert_eq!(status, 303);
        }
        let (_, home) = get(&ui.url("/")).await;
        assert!(home.contains("2 groups paused"), "{home}");
        assert_eq!(store.paused_groups("chat", 10).await.expect("paused groups"), ["G1", "G2"]);

        let (status, _, _) = post(&ui.url("/queues/chat/groups/G1/explode"), &[]).await;
        assert_eq!(status, 404);
        let (status, _, _) = post(&ui.url("/queues/chat/groups/pause"), &[("group", "")]).await;
        assert_eq!(status, 400, "a pause needs a key");
        let (status, _, _) = post(&ui.url("/queues/chat/groups/pause"), &[("group", "x{y}")]).await;
        assert_eq!(status, 400, "a key the store refuses");
    })
    .await;
}

#[tokio::test]
async fn group_actions_are_guarded_like_every_action() {
    bounded(async {
        let (redis, store) = common::store().await;
        grouped_queue(&store, "chat").await;
        store.pause("chat", Some(ODD_GROUP), Some("test")).await.expect("pause");
        let mut raw = common::raw(&redis).await;
        let before = common::keyspace(&mut raw).await;
        let resume = format!("/queues/chat/groups/{ODD_GROUP_PATH}/resume");

        let read_only = Dashboard::start(&redis.url, &["--read-only"]).await;
        for (path, form) in [(resume.as_str(), vec![]), ("/queues/chat/groups/pause", vec![("group", "B")])] {
            let (status, _, _) = post(&read_only.url(path), &form).await;
            assert_eq!(status, 403, "read-only refuses {path}");
        }
        let (_, page) = get(&read_only.url("/queues/chat")).await;
        assert!(page.contains(r#"<tr data-group="a/b"#), "the paused group is listed: {page}");
        assert!(!page.contains("Resume</button>") && !page.contains(r#"id="pause-group""#), "no buttons: {page}");

        let guarded = Dashboard::start(&redis.url, &["--token", "s3cret"]).await;
        let (_, page) = get(&guarded.url("/queues/chat")).await;
        assert!(page.contains(r#"name="token""#) && page.contains("Resume</button>"), "{page}");
        for token in [None, Some("wrong")] {
            let mut form: Vec<(&str, &str)> = token.map(|t| ("token", t)).into_iter().collect();
            let (status, _, _) = post(&guarded.url(&resume), &form).await;
            assert_eq!(status, 401, "resume with token {token:?}");
            form.push(("group", "B"));
            let (status, _, _) = post(&guarded.url("/queues/chat/groups/pause"), &form).await;
            assert_eq!(status, 401, "pause with token {token:?}");
        }
        for (name, value) in [("Origin", "http://evil.example"), ("Sec-Fetch-Site", "cross-site")] {
            for (path, group) in [(resume.as_str(), None), ("/queues/chat/groups/pause", Some("B"))] {
                let mut form = vec![("token", "s3cret")];
                form.extend(group.map(|g| ("group", g)));
                let response =
                    client().post(guarded.url(path)).header(name, value).form(&form).send().await.expect("POST");
                assert_eq!(response.status().as_u16(), 403, "{name}: {value} on {path}");
            }
        }
        assert_eq!(common::keyspace(&mut raw).await, before, "refused group actions wrote nothing");

        let (status, _, _) = post(&guarded.url(&resume), &[("token", "s3cret")]).await;
        assert_eq!(status, 303, "the right token is let through");
        assert!(store.paused_groups("chat", 10).await.expect("paused groups").is_empty());
    })
    .await;
}
