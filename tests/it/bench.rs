//! `runledger bench` end to end, on a tiny workload: it must run on its own
//! private redis-server (no REDIS_URL) or on a given server, print one JSON
//! document with every figure, and `--check` must print the target table.
//!
//! A benchmark, not a timed test: nothing here asserts a speed target.

use crate::common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use runledger::NewRun;
use runledger::embedded::find_redis_server;
use serde_json::Value;

/// The small workload of these tests.
const SMALL: &[&str] =
    &["--runs", "300", "--workers", "2", "--many-workers", "4", "--depth", "2000", "--latency-samples", "20"];

/// Runs the binary with a clean environment (no REDIS_URL, prefix or log
/// filter) in a blocking task; fails the test if it takes over 120 s.
async fn runledger(args: Vec<String>) -> (Output, Duration) {
    if find_redis_server().is_none() {
        panic!("runledger bench starts redis-server from PATH: install it (apt-get install -y redis-server)");
    }
    let shown = args.join(" ");
    let task = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_runledger"))
            .env_remove("REDIS_URL")
            .env_remove("RUNLEDGER_PREFIX")
            .env_remove("RUST_LOG")
            .args(&args)
            .stdin(Stdio::null())
            .output();
        (output, start.elapsed())
    });
    let (output, took) = tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .unwrap_or_else(|_| panic!("`runledger {shown}` did not finish within 120 s"))
        .expect("the blocking task running runledger panicked");
    (output.unwrap_or_else(|e| panic!("spawning `runledger {shown}`: {e}")), took)
}

fn args(before: &[&str], after: &[&str]) -> Vec<String> {
    before.iter().chain(SMALL).chain(after).map(|s| s.to_string()).collect()
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn num(f: &Value, key: &str) -> f64 {
    f[key].as_f64().unwrap_or_else(|| panic!("figure `{key}` is missing or not a number: {f:#}"))
}

fn positive(f: &Value, key: &str) -> f64 {
    let v = num(f, key);
    assert!(v.is_finite() && v > 0.0, "figure `{key}` must be a positive number, got {v}: {f:#}");
    v
}

/// Every figure of the JSON report is present and sane.
fn check_figures(f: &Value) {
    let redis_version = f["redis_version"].as_str().unwrap_or_else(|| panic!("redis_version: {f:#}"));
    assert!(!redis_version.is_empty(), "redis_version is empty: {f:#}");
    assert!(
        redis_version.split('.').next().and_then(|major| major.parse::<u32>().ok()).is_some(),
        "redis_version looks like a version: {redis_version}"
    );
    assert!(f["redis_config"].as_str().is_some_and(|c| c.contains("appendonly=")), "redis_config: {f:#}");

    assert_eq!(f["runs"], 300, "{f:#}");
    assert_eq!(f["lifecycle_workers"], 2, "{f:#}");
    assert_eq!(f["lifecycle_many_workers"], 4, "{f:#}");
    assert_eq!(f["depth"], 2000, "{f:#}");

    for key in ["enqueue_single_per_s", "enqueue_batched_per_s", "lifecycle_per_s", "lifecycle_many_per_s"] {
        positive(f, key);
    }

    let p50 = num(f, "idle_latency_ms_p50");
    let p99 = num(f, "idle_latency_ms_p99");
    let max = num(f, "idle_latency_ms_max");
    assert!(p50 > 0.0, "idle latency p50 must be positive: {f:#}");
    assert!(p50 <= p99 && p99 <= max, "p50 <= p99 <= max: {p50} {p99} {max}");
    assert!(max < 60_000.0, "an idle claim latency over a minute is not a measurement: {max} ms");

    let at_1k = positive(f, "claim_us_at_1k");
    let at_depth = positive(f, "claim_us_at_depth");
    let ratio = positive(f, "claim_cost_ratio");
    assert!((ratio - at_depth / at_1k).abs() <= 1e-6 * ratio.max(1.0), "claim_cost_ratio = deep / 1k: {f:#}");

    let queued = positive(f, "memory_per_queued_run");
    let finished = positive(f, "memory_per_finished_run");
    // Per-run figures from INFO memory deltas: plausible sizes, no unit slips.
    assert!(queued < 1_000_000.0 && finished < 1_000_000.0, "memory per run in bytes: {f:#}");

    let commands = positive(f, "commands_per_lifecycle");
    let round_trips = num(f, "round_trips_per_lifecycle");
    assert!((1.0..=4.0).contains(&round_trips), "round trips per lifecycle between 1 and 4, got {round_trips}: {f:#}");
    assert!(commands >= round_trips, "every round trip is a command: {f:#}");
    let breakdown = f["command_breakdown"].as_object().unwrap_or_else(|| panic!("command_breakdown: {f:#}"));
    assert!(breakdown.contains_key("fcall"), "lifecycles call the Functions library: {f:#}");
    assert!(!breakdown.contains_key("evalsha"), "no operation falls back to a script where FCALL works: {f:#}");
    let sum: f64 = breakdown.values().map(|v| v.as_f64().unwrap_or_else(|| panic!("breakdown value {v}"))).sum();
    assert!(
        (sum - commands).abs() < 1e-6 * commands.max(1.0),
        "the breakdown adds up to commands_per_lifecycle: {f:#}"
    );

    let cpu = num(f, "redis_cpu_us_per_lifecycle");
    assert!(cpu.is_finite() && cpu >= 0.0, "redis_cpu_us_per_lifecycle: {f:#}");
    let scripts = num(f, "script_us_per_lifecycle");
    assert!(scripts > 0.0 && scripts.is_finite(), "scripts take some time on the server: {f:#}");

    // The lifecycle step by step: each step runs commands and costs Redis CPU,
    // and the claim and the finish are scripts with commands inside.
    for step in ["claim", "event_batch", "finish"] {
        let s = &f["steps"][step];
        let commands = num(s, "commands");
        assert!(commands >= 1.0, "a {step} runs at least its script: {f:#}");
        let cpu = num(s, "redis_cpu_us");
        assert!(cpu.is_finite() && cpu >= 0.0, "{step} Redis CPU: {f:#}");
        assert!(num(s, "script_us") > 0.0, "a {step} runs a script: {f:#}");
    }
    for step in ["claim", "finish"] {
        assert!(num(&f["steps"][step], "commands") > 2.0, "a {step} script runs commands inside: {f:#}");
    }

    // The yardsticks of the same run: a round trip, the minimal commands.
    let l = &f["limit"];
    let (rtt50, rtt99) = (positive(l, "round_trip_us_p50"), positive(l, "round_trip_us_p99"));
    assert!(rtt50 <= rtt99, "round trip p50 <= p99: {f:#}");
    for key in
        ["enqueue_one_per_s", "enqueue_per_s", "lifecycle_per_s", "memory_per_queued_run", "memory_per_finished_run"]
    {
        positive(l, key);
    }
    assert_eq!(num(l, "lifecycle_commands"), 10.0, "the minimal lifecycle is 10 commands: {f:#}");
    assert!(num(l, "lifecycle_redis_cpu_us") >= 0.0 && num(l, "enqueue_redis_cpu_us_per_run") >= 0.0, "{f:#}");
    let two_trips =
        l["two_trip_lifecycle_per_s"].as_array().unwrap_or_else(|| panic!("two_trip_lifecycle_per_s: {f:#}"));
    let workers: Vec<u64> = two_trips.iter().map(|p| p[0].as_u64().unwrap_or_else(|| panic!("workers: {p}"))).collect();
    assert_eq!(workers, vec![2, 4], "one two-trip figure per lifecycle phase's workers: {f:#}");
    for p in two_trips {
        assert!(p[1].as_f64().is_some_and(|r| r > 0.0), "a two-trip rate: {p}");
    }

    // Retention: the reaper purged the runs it was given, and the longest script is known.
    positive(f, "purge_per_s");
    let longest = positive(f, "longest_script_us");
    assert!(longest.fract() == 0.0, "a histogram bucket, in whole microseconds: {f:#}");
}

/// Figures only the private server gives: memory at Redis's defaults (the
/// run hash is then a hash table, not a listpack: more bytes, whatever the
/// machine), and the longest script of the purge alone.
fn check_private_figures(f: &Value) {
    let stock_queued = positive(f, "memory_per_queued_run_stock");
    let stock_finished = positive(f, "memory_per_finished_run_stock");
    assert!(stock_queued > num(f, "memory_per_queued_run"), "a queued run costs more at Redis's defaults: {f:#}");
    assert!(stock_finished < 1_000_000.0, "memory per run in bytes: {f:#}");
    positive(f, "longest_purge_script_us");
}

/// The URL of the server bench used, from its first stderr line.
fn bench_url(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("bench: Redis ").and_then(|rest| rest.split(" at ").nth(1)))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("bench names its Redis on stderr:\n{stderr}"))
        .to_string()
}

// 1. No REDIS_URL: bench starts its own redis-server; stdout is only the JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_json_on_private_server() {
    let (output, took) = runledger(args(&["--json", "bench"], &[])).await;
    assert_eq!(output.status.code(), Some(0), "bench failed: {}", describe(&output));
    let stdout = String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8");
    let figures: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout must be one JSON document ({e}): {}", describe(&output)));
    check_figures(&figures);
    check_private_figures(&figures);
    eprintln!("bench (private server) took {took:?}");

    // Progress went to stderr, and the private server is gone afterwards.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let url = bench_url(&stderr);
    assert!(url.starts_with("redis://127.0.0.1:"), "a private loopback server: {url}");
    let addr = url.trim_start_matches("redis://").trim_end_matches('/').to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(&addr).is_ok() {
        assert!(Instant::now() < deadline, "hang guard: bench left its redis-server running at {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// 2. --check in text mode: the table of figures and the check table on stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_check_prints_target_table() {
    let (output, _) = runledger(args(&["bench"], &["--check"])).await;
    assert_eq!(output.status.code(), Some(0), "bench --check never fails on speed: {}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("| figure | value |"), "the figures table: {}", describe(&output));
    assert!(stdout.contains("| figure | measured | target |"), "the check table header: {}", describe(&output));
    for row in [
        "enqueue, one at a time",
        "idle claim p99",
        "round trips per lifecycle",
        "claim cost deep vs 1k",
        "Redis commands per lifecycle",
        "Redis CPU per lifecycle",
        "lifecycle, 2 workers",
        "lifecycle, 4 workers",
    ] {
        assert!(stdout.contains(&format!("| {row} |")), "check row `{row}`: {}", describe(&output));
    }
    // Every check row ends with its verdict.
    let verdicts = stdout
        .lines()
        .skip_while(|l| !l.starts_with("| figure | measured | target |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .inspect(|l| assert!(l.ends_with("| ok |") || l.ends_with("| SHORT |"), "a verdict per row: {l}"))
        .count();
    assert!(verdicts >= 8, "at least 8 checked figures: {}", describe(&output));
    // The speed targets are ratios to this run's yardsticks, which the table shows.
    assert!(
        stdout.contains("2x the minimal commands'"),
        "CPU target against the minimal commands: {}",
        describe(&output)
    );
    assert!(
        stdout.contains("| yardstick: round trip (PING)"),
        "the yardsticks in the figures table: {}",
        describe(&output)
    );

    // With --json, the check table goes to stderr and stdout stays one JSON document.
    let (output, _) = runledger(args(&["--json", "bench"], &["--check"])).await;
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let figures: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("--json --check: stdout must be one JSON document ({e}): {}", describe(&output)));
    check_figures(&figures);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("| figure | measured | target |"),
        "--json --check prints the table on stderr: {}",
        describe(&output)
    );
}

// 3. --redis <url>: bench runs against the given server and leaves its data alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_on_given_server() {
    let (redis, store) = common::store().await;
    store.create_run(&NewRun::new("keep-me", "agent").queue("mine")).await.expect("create a run of our own");

    let (output, _) = runledger(args(&["--redis", &redis.url, "--json", "bench"], &[])).await;
    assert_eq!(output.status.code(), Some(0), "bench failed: {}", describe(&output));
    let figures: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout must be one JSON document ({e}): {}", describe(&output)));
    check_figures(&figures);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(bench_url(&stderr), redis.url, "bench used the given server: {stderr}");

    // The ledger already on the server is untouched (bench works under its own prefix).
    let run = store.get_run("keep-me").await.expect("our run is still there");
    assert_eq!(run.status, runledger::RunStatus::Queued);
    assert_eq!(store.known_queues().await.expect("known queues"), ["mine"]);
    let stats = store.queue_stats("mine", 10).await.expect("queue stats");
    assert_eq!(stats.queued, 1);
    // ... and nothing of the bench is left behind: every key is our ledger's.
    let mut conn = common::raw(&redis).await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.expect("KEYS");
    let foreign: Vec<&String> = keys.iter().filter(|k| !k.starts_with("rl:")).collect();
    assert!(
        foreign.is_empty(),
        "bench left {} keys on the given server, e.g. {:?}",
        foreign.len(),
        &foreign[..foreign.len().min(5)]
    );
    assert!(stderr.contains("bench: removed "), "bench says what it removed: {stderr}");

    // Bad arguments are refused before anything runs.
    let (output, _) =
        runledger(vec!["--redis".into(), redis.url.clone(), "bench".into(), "--runs".into(), "0".into()]).await;
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{}", describe(&output));
    assert!(stderr.starts_with("runledger: "), "{}", describe(&output));

    // An unreachable given server: exit 1 with one line.
    let (output, _) = runledger(vec!["--redis".into(), "redis://127.0.0.1:1/".into(), "bench".into()]).await;
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{}", describe(&output));
    assert!(stderr.starts_with("runledger: "), "{}", describe(&output));
}

// 4. --host-shape needs a Python with the package (the figures themselves are
// checked by python/tests/test_bench.py, which has one): without it, or with
// --shared, one clear line and nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_host_shape_refuses_what_it_cannot_run() {
    let host_shape = |extra: &[&str]| {
        ["bench", "--host-shape", "--runs", "10"].iter().chain(extra).map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let cases: [(&[&str], &str); 3] = [
        (&["--python", "/nonexistent/python"], "could not start /nonexistent/python"),
        (&["--python", "/bin/false"], "cannot import runledger"),
        (&["--shared"], "drop --shared"),
    ];
    for (extra, says) in cases {
        let (output, _) = runledger(host_shape(extra)).await;
        assert_eq!(output.status.code(), Some(2), "{extra:?}: {}", describe(&output));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{extra:?}: one line: {}", describe(&output));
        assert!(stderr.starts_with("runledger: ") && stderr.contains(says), "{extra:?}: {}", describe(&output));
        assert!(output.stdout.is_empty(), "{extra:?}: nothing ran: {}", describe(&output));
    }
}

/// The repository's BullMQ side of `bench --peer bullmq` (`.ci/run` runs `npm ci` in it).
fn bullmq_dir() -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/bullmq");
    if !std::path::Path::new(dir).join("node_modules/bullmq/package.json").is_file() {
        panic!(
            "bench --peer bullmq needs BullMQ installed: run `npm ci` in {dir} (Node.js and npm from Debian's nodejs, npm)"
        );
    }
    dir.to_string()
}

// runledger beside BullMQ on the same workload, each round on fresh stock
// servers: both sides' figures, every ratio, and the peer's version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_peer_bullmq_measures_both_sides() {
    let dir = bullmq_dir();
    let (output, _) =
        runledger(args(&["--json", "bench", "--peer", "bullmq", "--peer-dir", &dir, "--rounds", "2"], &[])).await;
    assert!(output.status.success(), "{}", describe(&output));
    let report: Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("JSON: {e}: {}", describe(&output)));
    assert_eq!(report["peer"], "BullMQ 6.7.0", "{report:#}");
    assert_eq!(report["rounds"].as_array().map(Vec::len), Some(2), "{report:#}");
    let keys = [
        "enqueue_single_per_s",
        "enqueue_batched_per_s",
        "lifecycle_per_s",
        "lifecycle_many_per_s",
        "lifecycle_progress_per_s",
        "idle_latency_ms_p50",
        "idle_latency_ms_p99",
        "redis_cpu_us_per_lifecycle",
        "commands_per_lifecycle",
        "memory_per_queued_run",
        "memory_per_finished_run",
    ];
    for side in [&report["median"][0], &report["median"][1], &report["rounds"][1][1]] {
        for key in keys {
            positive(side, key);
        }
    }
    for key in keys {
        positive(&report["ratio"], key);
    }
    // Each side ran its own workload: the commands per lifecycle differ by side.
    assert_ne!(
        num(&report["median"][0], "commands_per_lifecycle"),
        num(&report["median"][1], "commands_per_lifecycle")
    );
}

// Without what it needs, `bench --peer` says so in one line and runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_peer_refuses_what_it_cannot_run() {
    let empty = tempfile::tempdir().expect("temp dir");
    std::fs::write(empty.path().join("peer.mjs"), "").expect("write peer.mjs");
    let empty = empty.path().to_string_lossy().to_string();
    let dir = bullmq_dir();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--peer", "sidekiq", "--peer-dir", &dir], "unknown peer"),
        (vec!["--peer", "bullmq"], "needs --peer-dir"),
        (vec!["--peer", "bullmq", "--peer-dir", "/nonexistent"], "has no peer.mjs"),
        (vec!["--peer", "bullmq", "--peer-dir", &empty], "BullMQ is not installed"),
        (vec!["--peer", "bullmq", "--peer-dir", &dir, "--node", "/nonexistent/node"], "cannot run Node.js"),
        (vec!["--peer", "bullmq", "--peer-dir", &dir, "--rounds", "0"], "at least 1"),
    ];
    for (extra, says) in cases {
        let argv: Vec<String> = ["bench"].iter().chain(&extra).map(|s| s.to_string()).collect();
        let (output, _) = runledger(argv).await;
        assert_eq!(output.status.code(), Some(2), "{extra:?}: {}", describe(&output));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{extra:?}: one line: {}", describe(&output));
        assert!(stderr.starts_with("runledger: ") && stderr.contains(says), "{extra:?}: {}", describe(&output));
        assert!(output.stdout.is_empty(), "{extra:?}: nothing ran: {}", describe(&output));
    }
    let (output, _) = runledger(vec![
        "--redis".into(),
        "redis://127.0.0.1:1/".into(),
        "bench".into(),
        "--peer".into(),
        "bullmq".into(),
        "--peer-dir".into(),
        dir,
    ])
    .await;
    assert_eq!(output.status.code(), Some(2), "--redis: {}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("leave out --redis"), "{}", describe(&output));
}
