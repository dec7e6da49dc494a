//! Redis going away for a while, and connections cut under running workers.
//!
//! - An outage shorter than the lease (redis-server stopped for 5 s, then
//!   started again on its AOF) under two busy workers: every run still ends
//!   `completed`, claimed once (`dispatch_attempts == 1`), with one event
//!   stream 1..N and no event written twice.
//! - While the server is down, library calls return at all, and return an
//!   error that says "try again later" (`is_transient()`), not a hang.
//! - `CLIENT KILL TYPE normal`, three times, under the same workload: the
//!   workers reconnect, and the same holds: every run completed once.
//!
//! The first and last depend on the worker riding out a short outage (an
//! emit retries transient errors until its lease ends, a claim whose reply
//! was lost is not left orphaned); they may fail on a library without that.
//! Every wait is bounded by a hang guard; no assertion depends on how long
//! anything took.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use runledger::embedded::RedisServer;
use runledger::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// How long a wait may take before the test is declared hung.
const HANG_GUARD: Duration = Duration::from_secs(240);
const RUNS: usize = 300;
const EVENTS: i64 = 3;
/// Runs from this index on wait, before their first emit, until the
/// disruption has begun: so it always hits a workload in mid-run, however
/// fast or slow the machine is.
const HELD_BACK_FROM: usize = 150;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Polls `cond` every 50 ms until it holds; panics (a hang, not a slowness
/// verdict) when the hang guard passes first.
async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let waited = tokio::time::timeout(HANG_GUARD, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "hang guard: still waiting for {what} after {HANG_GUARD:?}");
}

fn aof_server() -> RedisServer {
    RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
        .unwrap_or_else(|e| panic!("starting redis-server with AOF: {e}"))
}

fn run_id(i: usize) -> String {
    format!("r{i:03}")
}

use crate::common::all_events;

/// Two workers (a store each, as two processes would have) on 300 runs.
struct Workload {
    url: String,
    workers: Vec<(CancellationToken, tokio::task::JoinHandle<Result<WorkerReport>>)>,
    /// Handler invocations, by run id.
    entered: Arc<Mutex<HashMap<String, usize>>>,
    /// Set once the disruption has begun; releases the held-back runs.
    disrupted: Arc<AtomicBool>,
    started: Arc<AtomicUsize>,
}

async fn start_workload(url: &str) -> Workload {
    let store = Store::connect(url).await.expect("connect");
    let runs: Vec<NewRun> =
        (0..RUNS).map(|i| NewRun::new(run_id(i), "agent").queue("q").metadata(json!({ "i": i }))).collect();
    for chunk in runs.chunks(100) {
        store.create_runs(chunk).await.expect("create the runs");
    }
    let entered: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let disrupted = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for k in 0..2 {
        let store = Store::connect(url).await.expect("connect a worker's store");
        let (entered, disrupted, started) = (entered.clone(), disrupted.clone(), started.clone());
        let worker = Worker::builder(&store)
            .runtime_id(format!("w{k}"))
            .queue("q")
            .concurrency(4)
            // Renewed every 10 s: a lease renewed just before the outage
            // still has 20 s left, so a slow restart cannot outlast it.
            .lease(Duration::from_secs(30))
            .heartbeat(Duration::from_secs(1))
            .handle_signals(false)
            .build(move |ctx| {
                let (entered, disrupted, started) = (entered.clone(), disrupted.clone(), started.clone());
                async move {
                    *lock(&entered).entry(ctx.run_id().to_string()).or_default() += 1;
                    started.fetch_add(1, Ordering::SeqCst);
                    let i = ctx.run.metadata["i"].as_u64().expect("metadata.i") as usize;
                    while i >= HELD_BACK_FROM && !disrupted.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    for n in 1..=EVENTS {
                        ctx.emit("step", json!({ "n": n })).await?;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Ok(Done::default())
                }
            })
            .expect("worker");
        let token = worker.shutdown_token();
        workers.push((token, tokio::spawn(worker.run())));
    }
    Workload { url: url.to_string(), workers, entered, disrupted, started }
}

impl Workload {
    /// Waits until the workers are well into the runs.
    async fn under_way(&self) {
        wait_until("50 handlers to start", || async { self.started.load(Ordering::SeqCst) >= 50 }).await;
    }

    /// Waits for every run to end, stops the workers, and checks each run:
    /// completed, claimed once, events 1..=3 once each.
    async fn check(self) {
        let store = Store::connect(&self.url).await.expect("connect to check");
        let ids: Vec<String> = (0..RUNS).map(run_id).collect();
        wait_until("every run to end", || async {
            for id in &ids {
                match store.get_run(id).await {
                    Ok(run) if run.status.is_terminal() => {}
                    _ => return false,
                }
            }
            true
        })
        .await;
        let mut reports = Vec::new();
        for (token, handle) in self.workers {
            token.cancel();
            let report = tokio::time::timeout(HANG_GUARD, handle)
                .await
                .expect("hang guard: a worker did not stop")
                .expect("worker task panicked")
                .expect("worker returned an error");
            reports.push(report);
        }
        eprintln!("worker reports: {reports:?}");

        let entered = lock(&self.entered).clone();
        let mut wrong = Vec::new();
        for id in &ids {
            let run = store.get_run(id).await.unwrap_or_else(|e| panic!("get_run {id}: {e}"));
            let events = all_events(&store, id).await;
            let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
            let steps: Vec<i64> = events.iter().map(|e| e.data["n"].as_i64().unwrap_or(-1)).collect();
            let contiguous = sequences.iter().copied().eq(1..=sequences.len() as i64);
            let handled = entered.get(id).copied().unwrap_or(0);
            if run.status != RunStatus::Completed
                || run.dispatch_attempts != 1
                || !contiguous
                || steps != (1..=EVENTS).collect::<Vec<_>>()
                || handled != 1
            {
                wrong.push(format!(
                    "{id}: {} ({:?}), dispatch_attempts {}, handler ran {handled}x, sequences {sequences:?}, steps {steps:?}",
                    run.status, run.status_reason, run.dispatch_attempts
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {RUNS} runs did not complete exactly once with one event stream 1..={EVENTS}:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
        for r in &reports {
            assert_eq!(r.lease_lost + r.retried + r.failed, 0, "a run was given up or retried: {r:?}");
        }
        assert_eq!(reports.iter().map(|r| r.completed).sum::<u64>(), RUNS as u64, "{reports:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_shorter_than_the_lease_runs_nothing_twice() {
    let mut server = aof_server();
    let workload = start_workload(&server.url()).await;
    workload.under_way().await;

    tokio::task::block_in_place(|| server.stop());
    workload.disrupted.store(true, Ordering::SeqCst);
    // A sixth of the lease: renewals and emits fail meanwhile, the leases do not run out.
    tokio::time::sleep(Duration::from_secs(5)).await;
    tokio::task::block_in_place(|| server.start_again()).expect("start redis-server again on its AOF");

    workload.check().await;
}

/// Runs a call under the hang guard and returns its error, which must be transient.
async fn transient_error<T>(what: &str, call: impl Future<Output = Result<T>>) -> Error {
    let result = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .unwrap_or_else(|_| panic!("hang guard: {what} did not return within 30 s while Redis was down"));
    let Err(err) = result else { panic!("{what} succeeded with Redis down") };
    assert!(err.is_transient(), "{what}: {err:?} is not transient");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_return_transient_errors_while_redis_is_down() {
    let mut server = aof_server();
    let cfg = StoreConfig { response_timeout: Duration::from_secs(2), ..Default::default() };
    let store = Store::connect_with(&server.url(), cfg.clone()).await.expect("connect");
    store.create_run(&NewRun::new("before", "agent").queue("q")).await.expect("create before the outage");

    tokio::task::block_in_place(|| server.stop());
    let claim = ClaimRequest::new("rt").queue("q");
    // Twice: the first call finds the store's connections dead, the second has none.
    for round in 1..=2 {
        let e = transient_error("get_run", store.get_run("before")).await;
        eprintln!("round {round}: get_run: {e}");
        let during = NewRun::new(format!("during{round}"), "agent").queue("q");
        let e = transient_error("create_run", store.create_run(&during)).await;
        eprintln!("round {round}: create_run: {e}");
        let e = transient_error("claim_next_run", store.claim_next_run(&claim)).await;
        eprintln!("round {round}: claim_next_run: {e}");
    }
    let e = transient_error("connect", Store::connect_with(&server.url(), cfg)).await;
    eprintln!("connect: {e}");

    // Back on its AOF: the same store carries on with what was there.
    tokio::task::block_in_place(|| server.start_again()).expect("start redis-server again on its AOF");
    assert_eq!(store.get_run("before").await.expect("get_run after the outage").status, RunStatus::Queued);
    let claimed = store.claim_next_run(&claim).await.expect("claim after the outage").expect("a run");
    assert_eq!(claimed.run_id, "before", "the creates that failed during the outage did not land");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_run_nothing_twice() {
    let server = aof_server();
    let workload = start_workload(&server.url()).await;
    workload.under_way().await;

    let client = redis::Client::open(server.url()).expect("client");
    // No reply timeout of the client's own (a busy machine is slow, not wrong); the hang guard bounds the call.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    for cut in 1..=3 {
        // A connection of its own each time; CLIENT KILL spares the caller (SKIPME yes).
        let kill = async {
            let mut raw = client.get_multiplexed_async_connection_with_config(&config).await?;
            redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal").query_async::<i64>(&mut raw).await
        };
        let killed = tokio::time::timeout(Duration::from_secs(30), kill)
            .await
            .expect("hang guard: CLIENT KILL did not return")
            .expect("CLIENT KILL TYPE normal");
        eprintln!("cut {cut}: {killed} connections killed");
        workload.disrupted.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    workload.check().await;
}

/// `runledger worker` started while its Redis is down (a host booting, a
/// deploy racing a Redis restart) waits for it instead of exiting, then
/// serves the queue, and still stops at SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_command_waits_for_redis_to_come_up() {
    let mut server = aof_server();
    tokio::task::block_in_place(|| server.stop());
    let logs = tempfile::tempdir().expect("temp dir");
    let log_path = logs.path().join("worker.log");
    let log = std::fs::File::create(&log_path).expect("worker log");
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_runledger"))
        .args(["--redis", &server.url(), "worker", "--queue", "q", "--work-ms", "1", "--fail-rate", "0"])
        .args(["--runtime-id", "late-redis", "--grace", "1"])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .env_remove("REDIS_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn runledger worker");
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut exited = None;
    wait_until("the worker to say it cannot reach Redis, or exit", || {
        exited = worker.try_wait().expect("worker status");
        let done = exited.is_some() || read_log().contains("cannot reach Redis yet");
        async move { done }
    })
    .await;
    assert!(exited.is_none(), "the worker exited ({exited:?}) instead of waiting: {}", read_log());

    tokio::task::block_in_place(|| server.start_again()).expect("start redis-server again");
    let store = Store::connect(&server.url()).await.expect("connect");
    store.create_run(&NewRun::new("after-start", "agent").queue("q")).await.expect("create");
    wait_until("the waiting worker to complete the run", || async {
        store.get_run("after-start").await.map(|r| r.status == RunStatus::Completed).unwrap_or(false)
    })
    .await;

    // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
    unsafe { libc::kill(worker.id() as libc::pid_t, libc::SIGTERM) };
    let status = tokio::task::block_in_place(|| {
        let deadline = std::time::Instant::now() + HANG_GUARD;
        loop {
            if let Some(status) = worker.try_wait().expect("worker status") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "hang guard: the worker ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert!(status.success(), "worker exit {status}: {}", read_log());
}
