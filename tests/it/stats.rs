//! LangBot's stats: run stats and runner stats over a creation window, and
//! runtime stats, checked against numbers computed here from the runs' own
//! stored times; the `stats` CLI command. Both backends.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use runledger::store::Conn;
use runledger::*;
use serde_json::Value;

async fn create(store: &Store, new: NewRun) {
    store.create_run(&new).await.unwrap_or_else(|e| panic!("create {}: {e}", new.run_id));
}

/// Claims `run_id` (the only claimable run of its runner in its queue).
async fn claim(store: &Store, queue: &str, runner: &str) -> Run {
    let request = ClaimRequest::new("rt-1").queue(queue).runner(runner);
    store.claim_next_run(&request).await.expect("claim").expect("a run to claim")
}

async fn finish(store: &Store, run: &Run, status: RunStatus) {
    store.finalize_run(&run.run_id, &Finish::new(status), run.claim_token.as_deref()).await.expect("finalize");
}

/// The hand-built set: runners alpha (5 runs), beta (4), gamma (1), over two queues.
async fn build(store: &Store) {
    // alpha: a1, a2 completed, a3 failed, a4 queued, a5 cancelled while queued.
    for (id, queue) in [("a1", "q1"), ("a2", "q2"), ("a3", "q1")] {
        create(store, NewRun::new(id, "alpha").queue(queue)).await;
        let run = claim(store, queue, "alpha").await;
        assert_eq!(run.run_id, id);
        // Durations of a few ms at least, so they are not all zero.
        tokio::time::sleep(Duration::from_millis(30)).await;
        finish(store, &run, if id == "a3" { RunStatus::Failed } else { RunStatus::Completed }).await;
    }
    create(store, NewRun::new("a4", "alpha").queue("q1")).await;
    create(store, NewRun::new("a5", "alpha").queue("q2")).await;
    store.request_cancel("a5", None).await.expect("cancel a5");
    // beta: b1 timeout, b2 running, b3 claimed, b4 created.
    create(store, NewRun::new("b1", "beta").queue("q2")).await;
    let b1 = claim(store, "q2", "beta").await;
    finish(store, &b1, RunStatus::Timeout).await;
    create(store, NewRun::new("b2", "beta").queue("q1").status(RunStatus::Running)).await;
    create(store, NewRun::new("b3", "beta").queue("q2")).await;
    claim(store, "q2", "beta").await;
    create(store, NewRun::new("b4", "beta").queue("q1").status(RunStatus::Created)).await;
    // gamma: one failure.
    create(store, NewRun::new("g1", "gamma").queue("q1")).await;
    let g1 = claim(store, "q1", "gamma").await;
    finish(store, &g1, RunStatus::Failed).await;
}

const ALL: [&str; 10] = ["a1", "a2", "a3", "a4", "a5", "b1", "b2", "b3", "b4", "g1"];

/// A run's stored times in ms, read as an operator would.
struct Times {
    runner: String,
    status: String,
    created: i64,
    started: Option<i64>,
    finished: Option<i64>,
}

async fn times(raw: &mut Conn, store: &Store, run_id: &str) -> Times {
    let queue = store.get_run(run_id).await.expect("get").queue_name;
    let key = store.queue_keys(&queue).run(run_id);
    let v: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(&key)
        .arg(&["runner_id", "status", "created_at", "started_at", "finished_at"])
        .query_async(raw)
        .await
        .expect("HMGET");
    let ms = |i: usize| v[i].as_ref().map(|s| s.parse::<i64>().expect("ms"));
    Times {
        runner: v[0].clone().expect("runner"),
        status: v[1].clone().expect("status"),
        created: ms(2).expect("created"),
        started: ms(3),
        finished: ms(4),
    }
}

fn r3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Averages are rounded to 2 decimals, as LangBot's.
fn avg(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        None
    } else {
        Some((values.iter().sum::<f64>() / values.len() as f64 * 100.0).round() / 100.0)
    }
}

/// Nearest rank: the ceil(p * n / 100)-th smallest.
fn nearest_rank(values: &[f64], p: usize) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    Some(r3(sorted[rank - 1]))
}

fn durations(all: &[Times]) -> Vec<f64> {
    all.iter()
        .filter(|t| t.status == "completed")
        .map(|t| (t.finished.expect("finished") - t.started.expect("started")) as f64 / 1000.0)
        .collect()
}

async fn run_stats_match_the_runs_own_times() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    build(&store).await;
    let mut all = Vec::new();
    for id in ALL {
        all.push(times(&mut raw, &store, id).await);
    }
    let first = all.iter().map(|t| t.created / 1000).min().expect("runs");
    let last = all.iter().map(|t| t.created / 1000).max().expect("runs");
    let (start, end) = (first - 30, last + 30);
    let stats = store.get_run_stats(start, end, None).await.expect("run stats");
    let json = serde_json::to_value(&stats).expect("json");
    let keys: BTreeSet<&str> = json.as_object().expect("object").keys().map(String::as_str).collect();
    let mut expected_keys: BTreeSet<&str> = [
        "start_time",
        "end_time",
        "total_count",
        "throughput_per_hour",
        "success_rate",
        "failure_rate",
        "avg_duration_seconds",
        "p50_duration_seconds",
        "p95_duration_seconds",
        "p99_duration_seconds",
        "avg_queue_wait_seconds",
    ]
    .into_iter()
    .collect();
    let count_keys: Vec<String> = RunStatus::ALL.iter().map(|s| format!("{s}_count")).collect();
    expected_keys.extend(count_keys.iter().map(String::as_str));
    assert_eq!(keys, expected_keys);
    assert_eq!((json["start_time"].as_i64(), json["end_time"].as_i64()), (Some(start), Some(end)));
    assert_eq!(json["total_count"], 10);
    for (status, n) in [
        ("created", 1),
        ("queued", 1),
        ("claimed", 1),
        ("running", 1),
        ("completed", 2),
        ("failed", 2),
        ("cancelled", 1),
        ("timeout", 1),
    ] {
        assert_eq!(json[format!("{status}_count")], n, "{status}_count in {json}");
    }
    assert_eq!(stats.success_rate, Some(0.2));
    assert_eq!(stats.failure_rate, Some(0.3), "failed + timeout over total");
    let hours = (end - start) as f64 / 3600.0;
    assert_eq!(stats.throughput_per_hour, (10.0 / hours * 100.0).round() / 100.0, "2 decimals");
    let d = durations(&all);
    assert_eq!(d.len(), 2);
    assert!(d.iter().all(|v| *v >= 0.03), "the runs slept 30 ms: {d:?}");
    assert_eq!(stats.avg_duration_seconds, avg(&d));
    assert_eq!(stats.p50_duration_seconds, nearest_rank(&d, 50));
    assert_eq!(stats.p95_duration_seconds, nearest_rank(&d, 95));
    assert_eq!(stats.p99_duration_seconds, nearest_rank(&d, 99));
    let waits: Vec<f64> =
        all.iter().filter_map(|t| t.started.map(|s| (s - t.created) as f64 / 1000.0)).filter(|w| *w >= 0.0).collect();
    assert_eq!(waits.len(), 7, "a1 a2 a3 b1 b2 b3 g1 started");
    assert_eq!(stats.avg_queue_wait_seconds, avg(&waits));

    // One runner's window.
    let alpha = store.get_run_stats(start, end, Some("alpha")).await.expect("alpha");
    assert_eq!((alpha.total_count, alpha.completed_count, alpha.failed_count), (5, 2, 1));
    assert_eq!((alpha.queued_count, alpha.cancelled_count), (1, 1));
    assert_eq!(alpha.success_rate, Some(0.4));
    assert_eq!(alpha.failure_rate, Some(0.2));
    assert_eq!(alpha.avg_duration_seconds, avg(&d));

    // Both ends inclusive, in seconds: the window of g1's own second holds it.
    let g1 = all.iter().find(|t| t.runner == "gamma").expect("g1");
    let own = store.get_run_stats(g1.created / 1000, g1.created / 1000, None).await.expect("own second");
    let same_second = all.iter().filter(|t| t.created / 1000 == g1.created / 1000).count() as u64;
    assert_eq!(own.total_count, same_second);
    assert!(own.total_count >= 1);
    // A window of one second counts as 0.001 h (LangBot's floor), not as 1/3600 h.
    assert_eq!(own.throughput_per_hour, (own.total_count as f64 / 0.001 * 100.0).round() / 100.0);

    // A window before every run: nothing, and null rates.
    let empty = store.get_run_stats(start - 100, first - 1, None).await.expect("empty");
    assert_eq!(empty.total_count, 0);
    let json = serde_json::to_value(&empty).expect("json");
    for key in
        ["success_rate", "failure_rate", "avg_duration_seconds", "p50_duration_seconds", "avg_queue_wait_seconds"]
    {
        assert!(json[key].is_null(), "{key} in {json}");
    }
    assert_eq!(json["throughput_per_hour"], 0.0);

    // Bad windows and runner ids: one clear error.
    assert!(matches!(store.get_run_stats(end, start, None).await, Err(Error::Invalid(_))));
    assert!(matches!(store.get_run_stats(-1, end, None).await, Err(Error::Invalid(_))));
    assert!(matches!(store.get_run_stats(start, end, Some("a{b}")).await, Err(Error::Invalid(_))));
}

async fn runner_stats_order_rates_and_durations() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    build(&store).await;
    let mut all = Vec::new();
    for id in ALL {
        all.push(times(&mut raw, &store, id).await);
    }
    let now = store.server_time_ms().await.expect("time") / 1000;
    let items = store.get_runner_stats(now - 600, now + 10, 50).await.expect("runner stats");
    let order: Vec<&str> = items.iter().map(|r| r.runner_id.as_str()).collect();
    assert_eq!(order, ["alpha", "beta", "gamma"], "most runs first");
    let by = |id: &str| items.iter().find(|r| r.runner_id == id).expect("runner").clone();
    let alpha = by("alpha");
    assert_eq!((alpha.total_runs, alpha.active_runs, alpha.completed_runs, alpha.failed_runs), (5, 1, 2, 1));
    assert_eq!(alpha.success_rate, 0.4);
    assert_eq!(alpha.avg_duration_seconds, avg(&durations(&all)));
    let beta = by("beta");
    assert_eq!((beta.total_runs, beta.active_runs, beta.completed_runs, beta.failed_runs), (4, 2, 0, 1));
    assert_eq!((beta.success_rate, beta.avg_duration_seconds), (0.0, None));
    let gamma = by("gamma");
    assert_eq!((gamma.total_runs, gamma.failed_runs, gamma.success_rate), (1, 1, 0.0));
    let json = serde_json::to_value(&gamma).expect("json");
    let keys: BTreeSet<&str> = json.as_object().expect("object").keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = [
        "runner_id",
        "total_runs",
        "active_runs",
        "completed_runs",
        "failed_runs",
        "success_rate",
        "avg_duration_seconds",
        "runner_label",
        "plugin_identity",
    ]
    .into_iter()
    .collect();
    assert_eq!(keys, expected);
    assert!(json["runner_label"].is_null() && json["plugin_identity"].is_null(), "null, as upstream: {json}");
    let top = store.get_runner_stats(now - 600, now + 10, 2).await.expect("limit 2");
    assert_eq!(top.iter().map(|r| r.runner_id.as_str()).collect::<Vec<_>>(), ["alpha", "beta"]);
    assert!(store.get_runner_stats(now - 600, now + 10, 50).await.is_ok());
    assert!(store.get_runner_stats(now + 10, now - 600, 50).await.is_err());
}

async fn runtime_stats_count_runtimes_ages_and_active_runs() {
    let (_redis, store) = common::store().await;
    build(&store).await;
    store.register_runtime(&RegisterRuntime::new("rt-1")).await.expect("register rt-1");
    let mut busy = RegisterRuntime::new("rt-2");
    busy.status = "busy".into();
    store.register_runtime(&busy).await.expect("register rt-2");
    let mut short = RegisterRuntime::new("rt-3");
    short.heartbeat_deadline = Duration::from_millis(1);
    store.register_runtime(&short).await.expect("register rt-3");
    // A hang guard, not a speed limit: rt-3's deadline passes by the server's clock.
    let stale = tokio::time::timeout(Duration::from_secs(60), async {
        while store.get_runtime("rt-3").await.expect("get").status != "stale" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(stale.is_ok(), "hang guard: rt-3 never went stale");
    let mut heartbeats = Vec::new();
    for id in ["rt-1", "rt-2", "rt-3"] {
        heartbeats.push(store.get_runtime(id).await.expect("get").last_heartbeat_at.expect("heartbeat"));
    }
    let before = store.server_time_ms().await.expect("time") as f64 / 1000.0;
    let stats = store.get_runtime_stats().await.expect("runtime stats");
    let after = store.server_time_ms().await.expect("time") as f64 / 1000.0;
    assert_eq!((stats.total_count, stats.online_count, stats.stale_count), (3, 1, 1));
    assert_eq!((stats.active_runs, stats.claimed_runs), (2, 1), "b3 claimed, b2 running");
    // Ages by the server's clock between the two readings, from whole-second heartbeats.
    let oldest = *heartbeats.iter().min().expect("heartbeats") as f64;
    let newest = *heartbeats.iter().max().expect("heartbeats") as f64;
    let max = stats.max_heartbeat_age_seconds.expect("max age");
    let mean = stats.avg_heartbeat_age_seconds.expect("avg age");
    assert!(max >= before - oldest - 0.005 && max <= after - oldest + 0.005, "max {max}");
    // The mean and the max are rounded to 2 decimals (as LangBot rounds its averages).
    assert!(mean <= max && mean >= before - newest - 0.005, "avg {mean}");
    let json = serde_json::to_value(&stats).expect("json");
    let keys: BTreeSet<&str> = json.as_object().expect("object").keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = [
        "total_count",
        "online_count",
        "stale_count",
        "avg_heartbeat_age_seconds",
        "max_heartbeat_age_seconds",
        "active_runs",
        "claimed_runs",
    ]
    .into_iter()
    .collect();
    assert_eq!(keys, expected);
}

/// `runledger stats` prints the same dicts with --json, readable lines without.
async fn the_stats_command() {
    let (redis, store) = common::store().await;
    build(&store).await;
    store.register_runtime(&RegisterRuntime::new("rt-1")).await.expect("register");
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_runledger"));
        cmd.arg("--redis").arg(&redis.url).args(args).env_remove("REDIS_URL").env_remove("RUNLEDGER_PREFIX");
        tokio::task::block_in_place(move || cmd.output().expect("run the CLI"))
    };
    let json = |args: &[&str]| -> Value {
        let out = cli(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let now = store.server_time_ms().await.expect("time") / 1000;
    let (from, to) = ((now - 600).to_string(), (now + 10).to_string());
    // Default: --runs over the last 24 h.
    let runs = json(&["--json", "stats"]);
    assert_eq!(runs["total_count"], 10);
    assert_eq!(runs["end_time"].as_i64().zip(runs["start_time"].as_i64()).map(|(e, s)| e - s), Some(86_400));
    let lib = store.get_run_stats(now - 600, now + 10, Some("alpha")).await.expect("lib");
    let cli_alpha = json(&["--json", "stats", "--runs", "--from", &from, "--to", &to, "--runner", "alpha"]);
    assert_eq!(cli_alpha, serde_json::to_value(&lib).expect("json"));
    let runners = json(&["--json", "stats", "--runners", "--from", &from, "--to", &to, "--limit", "2"]);
    let names: Vec<&str> = runners.as_array().expect("list").iter().filter_map(|r| r["runner_id"].as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    let runtimes = json(&["--json", "stats", "--runtimes"]);
    assert_eq!((runtimes["total_count"].as_u64(), runtimes["active_runs"].as_u64()), (Some(1), Some(2)));
    // Human output: readable lines with the figures.
    let out = cli(&["stats", "--from", &from, "--to", &to]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("total 10"), "{text}");
    assert!(text.contains("completed 2") && text.contains("success rate 20.00%"), "{text}");
    let out = cli(&["stats", "--runners", "--from", &from, "--to", &to]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("gamma"));
    // A window that ends before it starts: bad input, exit 2, one line.
    let out = cli(&["stats", "--from", &to, "--to", &from]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

backend_tests!(
    run_stats_match_the_runs_own_times,
    runner_stats_order_rates_and_durations,
    runtime_stats_count_runtimes_ages_and_active_runs,
    the_stats_command,
);
