//! The `Worker` runtime and the worker-facing CLI commands, end to end on a
//! real Redis (a private redis-server per test, see `common`).
//!
//! A test fails on behaviour only: no assertion depends on how long
//! anything took (the one kept is a lower bound, "a retry waits its backoff",
//! which slowness cannot fail). Waits and timeouts are hang guards; how fast
//! things are is measured by `runledger bench`.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use runledger::*;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The shortest hang guard of a wait: a bound sized for how long a thing
/// usually takes would fail a test on a slow machine, not on its behaviour.
const HANG_GUARD_FLOOR: Duration = Duration::from_secs(60);

/// Polls `$cond` (which may `.await`) every 20 ms until it holds. `$within`
/// (raised to at least [`HANG_GUARD_FLOOR`]) is a hang guard: when it passes
/// first the test fails as hung, not as slow.
macro_rules! eventually {
    ($within:expr, $what:expr, $cond:expr) => {{
        let guard: Duration = std::cmp::max($within, HANG_GUARD_FLOOR);
        let deadline = Instant::now() + guard;
        loop {
            if $cond {
                break;
            }
            assert!(Instant::now() < deadline, "hang guard: still waiting for {} after {guard:?}", $what);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

use crate::common::all_events;

fn sequences(events: &[RunEvent]) -> Vec<i64> {
    events.iter().map(|e| e.sequence).collect()
}

fn types(events: &[RunEvent]) -> Vec<String> {
    events.iter().map(|e| e.event_type.clone()).collect()
}

async fn stats(store: &Store, queue: &str) -> QueueStats {
    store.queue_stats(queue, 100).await.unwrap_or_else(|e| panic!("queue_stats {queue}: {e}"))
}

fn counter(stats: &QueueStats, name: &str) -> i64 {
    stats.counters.get(name).copied().unwrap_or(0)
}

async fn run(store: &Store, run_id: &str) -> Run {
    store.get_run(run_id).await.unwrap_or_else(|e| panic!("get_run {run_id}: {e}"))
}

fn report_sum(r: &WorkerReport) -> u64 {
    r.completed + r.failed + r.retried + r.cancelled + r.lease_lost + r.released_on_shutdown
}

/// Spawns a worker; returns its shutdown token and its task.
fn start(worker: Worker) -> (CancellationToken, tokio::task::JoinHandle<Result<WorkerReport>>) {
    let token = worker.shutdown_token();
    (token, tokio::spawn(worker.run()))
}

async fn stop(token: CancellationToken, handle: tokio::task::JoinHandle<Result<WorkerReport>>) -> WorkerReport {
    token.cancel();
    tokio::time::timeout(Duration::from_secs(20), handle)
        .await
        .expect("hang guard: the worker had not stopped 20 s after shutdown")
        .expect("worker task panicked")
        .expect("worker returned an error")
}

// 1. Two workers, two queues, 200 runs.
async fn two_workers_finish_every_run_once_with_ordered_events() {
    const N: usize = 200;
    let (_redis, store) = common::store().await;
    // run_id -> runtimes whose handler ran it.
    let handled: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let make = |id: &str, queues: [&str; 2]| {
        let handled = handled.clone();
        let me = id.to_string();
        Worker::builder(&store)
            .runtime_id(id)
            .queues(queues)
            .concurrency(4)
            .heartbeat(Duration::from_secs(1))
            .handle_signals(false)
            .build(move |ctx| {
                let handled = handled.clone();
                let me = me.clone();
                async move {
                    lock(&handled).entry(ctx.run_id().to_string()).or_default().push(me.clone());
                    let k = ctx.run.metadata["events"].as_i64().expect("metadata.events");
                    for n in 1..=k {
                        ctx.emit("step", json!({ "n": n })).await?;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Ok(Done { metadata: Some(json!({ "done_by": me })), ..Default::default() })
                }
            })
            .expect("build worker")
    };
    let (t1, h1) = start(make("e2e-w1", ["alpha", "beta"]));
    let (t2, h2) = start(make("e2e-w2", ["beta", "alpha"]));

    // Registered while running.
    for id in ["e2e-w1", "e2e-w2"] {
        eventually!(Duration::from_secs(5), format!("runtime {id} registered"), store.get_runtime(id).await.is_ok());
        let rt = store.get_runtime(id).await.expect("get_runtime");
        assert_eq!(rt.status, "online");
        assert_eq!(rt.runtime_id, id);
    }

    let runs: Vec<NewRun> = (0..N)
        .map(|i| {
            NewRun::new(format!("e2e-{i:03}"), "agent")
                .queue(if i % 2 == 0 { "alpha" } else { "beta" })
                .priority((i % 5) as i64)
                .metadata(json!({ "events": 1 + i % 4 }))
        })
        .collect();
    for chunk in runs.chunks(50) {
        store.create_runs(chunk).await.expect("create_runs");
    }
    eventually!(Duration::from_secs(60), "all runs finished", {
        stats(&store, "alpha").await.finished + stats(&store, "beta").await.finished == N as i64
    });
    // Still registered at the end of the work.
    assert!(store.get_runtime("e2e-w1").await.is_ok() && store.get_runtime("e2e-w2").await.is_ok());

    let r1 = stop(t1, h1).await;
    let r2 = stop(t2, h2).await;
    for (id, r) in [("e2e-w1", &r1), ("e2e-w2", &r2)] {
        assert_eq!(r.claimed, report_sum(r), "{id}: report does not add up: {r:?}");
        assert_eq!(r.claimed, r.completed, "{id}: something other than completions: {r:?}");
        assert!(r.completed > 0, "{id} did no work: {r:?}");
    }
    assert_eq!(r1.completed + r2.completed, N as u64, "{r1:?} {r2:?}");

    let alpha = stats(&store, "alpha").await;
    let beta = stats(&store, "beta").await;
    assert_eq!(counter(&alpha, "completed") + counter(&beta, "completed"), N as i64);
    assert_eq!(alpha.claimed + beta.claimed + alpha.queued + beta.queued, 0);

    let handled = lock(&handled).clone();
    for i in 0..N {
        let id = format!("e2e-{i:03}");
        let r = run(&store, &id).await;
        assert_eq!(r.status, RunStatus::Completed, "{id}");
        assert_eq!(r.dispatch_attempts, 1, "{id}");
        assert!(r.claimed_by_runtime_id.is_none() && r.claim_lease_expires_at.is_none(), "{id} still holds a claim");
        let by = handled.get(&id).unwrap_or_else(|| panic!("{id} never handled"));
        assert_eq!(by.len(), 1, "{id} handled {} times: {by:?}", by.len());
        assert_eq!(r.metadata["done_by"], json!(by[0]), "{id}");
        let events = all_events(&store, &id).await;
        let k = 1 + (i % 4) as i64;
        assert_eq!(sequences(&events), (1..=k).collect::<Vec<_>>(), "{id}");
        let ns: Vec<Value> = events.iter().map(|e| e.data["n"].clone()).collect();
        assert_eq!(ns, (1..=k).map(|n| json!(n)).collect::<Vec<_>>(), "{id}: events out of order");
    }

    // Deregistered after.
    for id in ["e2e-w1", "e2e-w2"] {
        match store.get_runtime(id).await {
            Err(Error::NotFound(_)) => {}
            other => panic!("{id} should be deregistered, got {other:?}"),
        }
    }
}

// 2. A worker that cannot renew loses its lease; another finishes the run;
//    the first one's token is fenced off.
#[derive(Default)]
struct Stalled {
    token: Option<String>,
    reason: Option<StopReason>,
    late_emit: Option<Result<i64>>,
}

async fn lost_lease_is_reclaimed_and_the_old_token_is_fenced() {
    let (_redis, store) = common::store().await;
    store.create_run(&NewRun::new("ll-1", "agent").queue("ll")).await.expect("create");

    let stalled: Arc<Mutex<Stalled>> = Arc::default();
    let st = stalled.clone();
    // Worker 1 claims nothing after its first run, so that the re-claim is
    // worker 2's: its handler shuts it down at once, with a grace period
    // longer than the test, so the run is not released but lost with its lease.
    let t1 = CancellationToken::new();
    let stop_w1 = t1.clone();
    let w1 = Worker::builder(&store)
        .runtime_id("ll-w1")
        .queue("ll")
        .lease(Duration::from_secs(1))
        .renew_every(Duration::from_secs(30))
        .reap_every(None)
        .handle_signals(false)
        .shutdown_token(t1)
        .grace(Duration::from_secs(600))
        .build(move |ctx| {
            let (st, stop_w1) = (st.clone(), stop_w1.clone());
            async move {
                stop_w1.cancel();
                let t0 = Instant::now();
                lock(&st).token = Some(ctx.claim_token().to_string());
                ctx.emit("w1-started", json!({})).await?;
                // The stall has no end of its own: only the worker's stop ends it.
                tokio::select! {
                    _ = ctx.stopped() => lock(&st).reason = ctx.stop_reason(),
                    _ = tokio::time::sleep(Duration::from_secs(600)) => {}
                }
                // A stalled handler carries on as if nothing happened.
                tokio::time::sleep_until((t0 + Duration::from_secs(3)).into()).await;
                let late = ctx.emit("w1-late", json!({})).await.map(|e| e.sequence);
                lock(&st).late_emit = Some(late);
                Ok(Done::default())
            }
        })
        .expect("build w1");
    let (t1, h1) = start(w1);
    eventually!(
        Duration::from_secs(5),
        "worker 1 claims ll-1",
        run(&store, "ll-1").await.claimed_by_runtime_id.as_deref() == Some("ll-w1")
    );

    let entered = Arc::new(Notify::new());
    let gate = Arc::new(Notify::new());
    let (en, ga) = (entered.clone(), gate.clone());
    let w2 = Worker::builder(&store)
        .runtime_id("ll-w2")
        .queue("ll")
        .handle_signals(false)
        .build(move |ctx| {
            let (en, ga) = (en.clone(), ga.clone());
            async move {
                en.notify_one();
                tokio::time::timeout(Duration::from_secs(120), ga.notified())
                    .await
                    .map_err(|_| Failure::fatal("gate"))?;
                ctx.emit("w2-done", json!({ "attempt": ctx.run.dispatch_attempts })).await?;
                Ok(Done { metadata: Some(json!({ "finished_by": "ll-w2" })), ..Default::default() })
            }
        })
        .expect("build w2");
    let (t2, h2) = start(w2);
    tokio::time::timeout(HANG_GUARD_FLOOR, entered.notified())
        .await
        .expect("hang guard: worker 2 never re-claimed the run");

    // Worker 2 holds it now.
    let held = run(&store, "ll-1").await;
    assert_eq!(held.status, RunStatus::Claimed);
    assert_eq!(held.claimed_by_runtime_id.as_deref(), Some("ll-w2"));
    assert_eq!(held.dispatch_attempts, 2);
    assert!(counter(&stats(&store, "ll").await, "reclaimed") >= 1);

    // Worker 1 stopped its handler for the lost lease and aborted it at once
    // (by design: its writes are fenced anyway), so the handler may not get to
    // look at the reason; if it did, the reason is the lease. The worker's
    // report below counts the lease lost.
    let (old_token, reason) = {
        let s = lock(&stalled);
        (s.token.clone().expect("token recorded"), s.reason.clone())
    };
    assert!(matches!(reason, None | Some(StopReason::LeaseLost(_))), "stop reason {reason:?}");

    // The old token can write nothing any more.
    match store.append_event("ll-1", Some(&old_token), &NewEvent::new(50, "stale", json!({}))).await {
        Err(Error::StaleToken(_)) => {}
        other => panic!("append with the old token: {other:?}"),
    }
    match store.finalize_run("ll-1", &Finish::new(RunStatus::Failed).reason("stale"), Some(&old_token)).await {
        Err(Error::StaleToken(_)) => {}
        other => panic!("finalize with the old token: {other:?}"),
    }
    match store.renew_claim("ll-1", &old_token, Duration::from_secs(30)).await {
        Err(Error::StaleToken(_)) => {}
        other => panic!("renew with the old token: {other:?}"),
    }

    gate.notify_one();
    eventually!(Duration::from_secs(10), "ll-1 completed", run(&store, "ll-1").await.status == RunStatus::Completed);
    let r1 = stop(t1, h1).await;
    let r2 = stop(t2, h2).await;

    let done = run(&store, "ll-1").await;
    assert_eq!(done.metadata["finished_by"], json!("ll-w2"));
    assert_eq!(done.dispatch_attempts, 2);
    let s = stats(&store, "ll").await;
    assert_eq!(counter(&s, "completed"), 1);
    assert_eq!(counter(&s, "failed") + counter(&s, "cancelled") + counter(&s, "timeout"), 0);
    assert!(counter(&s, "reclaimed") >= 1);
    assert_eq!((r1.claimed, r1.lease_lost, r1.completed), (1, 1, 0), "{r1:?}");
    assert_eq!((r2.claimed, r2.completed), (1, 1), "{r2:?}");
    assert_eq!(r1.claimed, report_sum(&r1));
    assert_eq!(r2.claimed, report_sum(&r2));

    // Worker 1's handler was stopped at its lease's end, by the worker's own
    // clock (its renewals were too rare to keep the lease): it never got to
    // its late write.
    assert!(lock(&stalled).late_emit.is_none(), "worker 1's handler outlived its lease");
    let events = all_events(&store, "ll-1").await;
    assert_eq!(types(&events), ["w1-started", "w2-done"]);
    assert_eq!(sequences(&events), [1, 2]);
}

// 3. request_cancel reaches the handler holding the run.
/// The stop reason the handler saw, once it was stopped.
type Seen = Option<Option<StopReason>>;

async fn cancel_reaches_the_running_handler() {
    let (_redis, store) = common::store().await;
    store.create_run(&NewRun::new("c-1", "agent").queue("cq")).await.expect("create");
    let started = Arc::new(Notify::new());
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let (s, sn) = (started.clone(), seen.clone());
    let worker = Worker::builder(&store)
        .runtime_id("c-w")
        .queue("cq")
        .handle_signals(false)
        .build(move |ctx| {
            let (s, sn) = (s.clone(), sn.clone());
            async move {
                s.notify_one();
                tokio::select! {
                    _ = ctx.stopped() => {
                        *lock(&sn) = Some(ctx.stop_reason());
                        Err(Failure::fatal("stopped"))
                    }
                    _ = tokio::time::sleep(Duration::from_secs(60)) => Ok(Done::default()),
                }
            }
        })
        .expect("build");
    let (t, h) = start(worker);
    tokio::time::timeout(HANG_GUARD_FLOOR, started.notified()).await.expect("hang guard: the handler never started");
    assert_eq!(run(&store, "c-1").await.status, RunStatus::Claimed);

    let r = store.request_cancel("c-1", Some("user changed their mind")).await.expect("request_cancel");
    assert!(r.cancel_requested_at.is_some());
    eventually!(Duration::from_secs(5), "the handler sees the cancel", lock(&seen).is_some());
    // The handler sleeps 60 s otherwise: the stop it saw is the cancel's (how soon it came is for `runledger bench`).
    let reason = lock(&seen).clone().expect("seen");
    assert_eq!(reason, Some(StopReason::Cancelled));

    eventually!(Duration::from_secs(5), "c-1 cancelled", run(&store, "c-1").await.status == RunStatus::Cancelled);
    let report = stop(t, h).await;
    assert_eq!((report.claimed, report.cancelled), (1, 1), "{report:?}");
    assert_eq!(report.claimed, report_sum(&report));
    let done = run(&store, "c-1").await;
    assert!(done.finished_at.is_some() && done.claimed_by_runtime_id.is_none());
    assert_eq!(counter(&stats(&store, "cq").await, "cancelled"), 1);
}

// 4. Panics, retryable and fatal failures.
async fn panics_retries_and_fatal_failures() {
    let (_redis, store) = common::store().await;
    for id in ["px-panic", "px-retry", "px-fatal"] {
        store.create_run(&NewRun::new(id, "agent").queue("px")).await.expect("create");
    }
    // When attempt 1 of px-retry gave up, and when attempt 2 started.
    let retry_times: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let rt = retry_times.clone();
    let worker = Worker::builder(&store)
        .runtime_id("px-w")
        .queue("px")
        .concurrency(3)
        .backoff(Backoff { base: Duration::from_millis(300), max: Duration::from_secs(1), max_attempts: 3 })
        .handle_signals(false)
        .build(move |ctx| {
            let rt = rt.clone();
            async move {
                match ctx.run_id() {
                    "px-panic" => panic!("boom in handler"),
                    "px-fatal" => Err(Failure::fatal("bad input, no point retrying")),
                    _ if ctx.run.dispatch_attempts == 1 => {
                        lock(&rt).0 = Some(Instant::now());
                        Err(Failure::retryable("upstream busy"))
                    }
                    _ => {
                        lock(&rt).1 = Some(Instant::now());
                        ctx.emit("ok", json!({ "attempt": ctx.run.dispatch_attempts })).await?;
                        Ok(Done::default())
                    }
                }
            }
        })
        .expect("build");
    let (t, h) = start(worker);
    eventually!(Duration::from_secs(15), "all three finished", stats(&store, "px").await.finished == 3);
    let report = stop(t, h).await;

    let panicked = run(&store, "px-panic").await;
    assert_eq!(panicked.status, RunStatus::Failed);
    let reason = panicked.status_reason.clone().unwrap_or_default();
    assert!(reason.contains("panicked") && reason.contains("boom in handler"), "reason: {reason}");

    let retried = run(&store, "px-retry").await;
    assert_eq!(retried.status, RunStatus::Completed);
    assert!(retried.dispatch_attempts >= 2, "attempts {}", retried.dispatch_attempts);
    let (gave_up, again) = *lock(&retry_times);
    let gap = again.expect("attempt 2 ran").duration_since(gave_up.expect("attempt 1 ran"));
    // The backoff delay for attempt 2 is 300 ms jittered to 50..100 %: a lower
    // bound (the retry waits), which slowness cannot fail.
    assert!(gap >= Duration::from_millis(140), "retried after only {gap:?}");
    assert_eq!(types(&all_events(&store, "px-retry").await), ["ok"]);

    let fatal = run(&store, "px-fatal").await;
    assert_eq!(fatal.status, RunStatus::Failed);
    assert_eq!(fatal.dispatch_attempts, 1);
    assert!(fatal.status_reason.unwrap_or_default().contains("bad input"));

    assert_eq!((report.claimed, report.completed, report.failed, report.retried), (4, 1, 2, 1), "{report:?}");
    assert_eq!(report.claimed, report_sum(&report));
    let s = stats(&store, "px").await;
    assert_eq!((counter(&s, "completed"), counter(&s, "failed")), (1, 2));
}

// 5. Shutdown gives in-flight runs back; another worker finishes them.
async fn shutdown_releases_in_flight_runs_to_the_next_worker() {
    const N: usize = 3;
    let (_redis, store) = common::store().await;
    for i in 0..N {
        store.create_run(&NewRun::new(format!("sd-{i}"), "agent").queue("sd")).await.expect("create");
    }
    let reasons: Arc<Mutex<Vec<Option<StopReason>>>> = Arc::default();
    let rs = reasons.clone();
    let w1 = Worker::builder(&store)
        .runtime_id("sd-w1")
        .queue("sd")
        .concurrency(N)
        .grace(Duration::from_millis(300))
        .handle_signals(false)
        .build(move |ctx| {
            let rs = rs.clone();
            async move {
                tokio::select! {
                    _ = ctx.stopped() => {
                        lock(&rs).push(ctx.stop_reason());
                        Err(Failure::fatal("stopped"))
                    }
                    _ = tokio::time::sleep(Duration::from_secs(10)) => Ok(Done::default()),
                }
            }
        })
        .expect("build w1");
    let (t1, h1) = start(w1);
    eventually!(Duration::from_secs(10), "all runs claimed", stats(&store, "sd").await.claimed == N as i64);

    let r1 = stop(t1, h1).await;
    assert_eq!((r1.claimed, r1.released_on_shutdown), (N as u64, N as u64), "{r1:?}");
    assert_eq!(r1.claimed, report_sum(&r1));
    assert_eq!(*lock(&reasons), vec![Some(StopReason::Shutdown); N]);
    assert!(matches!(store.get_runtime("sd-w1").await, Err(Error::NotFound(_))));

    let s = stats(&store, "sd").await;
    assert_eq!((s.queued, s.claimed, s.finished), (N as i64, 0, 0), "{s:?}");
    for i in 0..N {
        let r = run(&store, &format!("sd-{i}")).await;
        assert_eq!(r.status, RunStatus::Queued, "sd-{i}");
        assert!(r.claimed_by_runtime_id.is_none() && r.claim_lease_expires_at.is_none(), "sd-{i} still claimed: {r:?}");
    }

    let handled: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let hd = handled.clone();
    let w2 = Worker::builder(&store)
        .runtime_id("sd-w2")
        .queue("sd")
        .concurrency(2)
        .handle_signals(false)
        .build(move |ctx| {
            let hd = hd.clone();
            async move {
                *lock(&hd).entry(ctx.run_id().to_string()).or_default() += 1;
                ctx.emit("done", json!({ "by": "sd-w2" })).await?;
                Ok(Done::default())
            }
        })
        .expect("build w2");
    let (t2, h2) = start(w2);
    eventually!(
        Duration::from_secs(10),
        "the second worker finishes them",
        stats(&store, "sd").await.finished == N as i64
    );
    let r2 = stop(t2, h2).await;
    assert_eq!((r2.claimed, r2.completed), (N as u64, N as u64), "{r2:?}");
    assert_eq!(counter(&stats(&store, "sd").await, "completed"), N as i64);
    for i in 0..N {
        let id = format!("sd-{i}");
        let r = run(&store, &id).await;
        assert_eq!(r.status, RunStatus::Completed, "{id}");
        assert_eq!(r.dispatch_attempts, 2, "{id}");
        assert_eq!(lock(&handled).get(&id).copied(), Some(1), "{id}");
        assert_eq!(types(&all_events(&store, &id).await), ["done"], "{id}");
    }
}

/// Kills the child process if the test ends before it did.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn runledger_bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runledger"));
    cmd.env_remove("REDIS_URL").env_remove("RUNLEDGER_PREFIX").stdin(Stdio::null());
    cmd
}

// 6. A `runledger worker` process killed with SIGKILL: its runs come back.
async fn killed_worker_process_runs_are_reclaimed() {
    const N: usize = 6;
    let (redis, store) = common::store().await;
    for i in 0..N {
        store.create_run(&NewRun::new(format!("k-{i}"), "agent").queue("kq")).await.expect("create");
    }
    let child = runledger_bin()
        .args(["--redis", &redis.url, "--prefix", &store.config().prefix])
        .args(["worker", "--queue", "kq", "--concurrency", "2", "--lease", "2", "--work-ms", "60000"])
        .args(["--heartbeat", "1", "--fail-rate", "0", "--runtime-id", "doomed"])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn runledger worker");
    let mut child = KillOnDrop(child);
    eventually!(Duration::from_secs(20), "the worker process claims two runs", stats(&store, "kq").await.claimed >= 2);
    let holders = stats(&store, "kq").await.lease_holders;
    assert!(holders.iter().all(|h| h.runtime_id == "doomed"), "{holders:?}");
    let held: Vec<String> = holders.into_iter().map(|h| h.run_id).collect();
    assert_eq!(held.len(), 2, "{held:?}");

    child.0.kill().expect("SIGKILL the worker process");
    let status = child.0.wait().expect("wait for the killed worker");
    assert!(!status.success());
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }

    let handled: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let hd = handled.clone();
    let rescuer = Worker::builder(&store)
        .runtime_id("rescuer")
        .queue("kq")
        .concurrency(2)
        .handle_signals(false)
        .build(move |ctx| {
            let hd = hd.clone();
            async move {
                *lock(&hd).entry(ctx.run_id().to_string()).or_default() += 1;
                ctx.emit("rescued", json!({ "attempt": ctx.run.dispatch_attempts })).await?;
                Ok(Done::default())
            }
        })
        .expect("build rescuer");
    let (t, h) = start(rescuer);
    eventually!(
        Duration::from_secs(20),
        "every run completed",
        counter(&stats(&store, "kq").await, "completed") == N as i64
    );
    let report = stop(t, h).await;
    assert_eq!((report.claimed, report.completed), (N as u64, N as u64), "{report:?}");

    let s = stats(&store, "kq").await;
    assert_eq!(counter(&s, "completed"), N as i64);
    assert_eq!(counter(&s, "failed") + counter(&s, "cancelled") + counter(&s, "timeout") + counter(&s, "dead"), 0);
    assert!(counter(&s, "reclaimed") >= 2, "{s:?}");
    assert_eq!((s.queued, s.claimed, s.finished), (0, 0, N as i64));
    for i in 0..N {
        let id = format!("k-{i}");
        let r = run(&store, &id).await;
        assert_eq!(r.status, RunStatus::Completed, "{id}");
        assert_eq!(lock(&handled).get(&id).copied(), Some(1), "{id} handled more than once in-process");
        let events = all_events(&store, &id).await;
        if held.contains(&id) {
            assert!(r.dispatch_attempts >= 2, "{id} re-claimed with {} attempts", r.dispatch_attempts);
            // The killed process had started it; the rescuer finished it.
            assert_eq!(types(&events), ["started", "rescued"], "{id}");
        } else {
            assert_eq!(r.dispatch_attempts, 1, "{id}");
            assert_eq!(types(&events), ["rescued"], "{id}");
        }
        assert_eq!(sequences(&events), (1..=events.len() as i64).collect::<Vec<_>>(), "{id}");
    }
}

// 7. `runledger demo` on a fresh machine: its own redis-server, a checked summary.
#[test]
fn demo_runs_end_to_end_with_a_private_redis() {
    let demo = ["demo", "--runs", "40", "--workers", "3", "--concurrency", "2", "--work-ms", "30", "--lease", "1"];
    let text = runledger_bin().args(demo).args(["--timeout", "60"]).output().expect("run runledger demo");
    let stdout = String::from_utf8_lossy(&text.stdout);
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(text.status.success(), "demo failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", text.status);
    let check = stdout.lines().find(|l| l.contains("check")).unwrap_or_else(|| panic!("no check line:\n{stdout}"));
    assert!(check.contains("OK"), "check line: {check}");
    assert!(stderr.contains("private redis-server"), "demo did not start its own redis-server:\n{stderr}");

    let json_run =
        runledger_bin().args(demo).args(["--timeout", "60", "--json"]).output().expect("run runledger demo --json");
    let stdout = String::from_utf8_lossy(&json_run.stdout);
    assert!(
        json_run.status.success(),
        "demo --json failed: {:?}\n{stdout}\n{}",
        json_run.status,
        String::from_utf8_lossy(&json_run.stderr)
    );
    let summary: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("demo --json is not JSON ({e}):\n{stdout}"));
    assert_eq!(summary["runs"], json!(40), "{summary}");
    assert_eq!(summary["check_ok"], json!(true), "{summary}");
    assert_eq!(summary["problems"], json!([]), "{summary}");
    let completed = summary["completed"].as_u64().expect("completed");
    let failed = summary["failed"].as_u64().expect("failed");
    assert_eq!(completed + failed, 40, "{summary}");
    assert_eq!(summary["killed_workers"], json!(1), "{summary}");
}

// 7b. `runledger demo --shared` against a given Redis, with a separate
// `runledger worker` process (as docker compose runs them): both take runs,
// and a second demo on the same prefix still checks out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_shares_the_queues_with_a_worker_process() {
    let redis = common::redis().await;
    let mut worker = runledger_bin()
        .args(["--redis", redis.url.as_str(), "--json", "worker", "--queue", "alpha", "--queue", "beta"])
        .args(["--queue", "gamma", "--concurrency", "2", "--work-ms", "60", "--grace", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start runledger worker");
    for _ in 0..2 {
        let demo = runledger_bin()
            .args(["--redis", redis.url.as_str(), "--json", "demo", "--shared", "--runs", "40", "--workers", "2"])
            .args(["--concurrency", "2", "--work-ms", "60", "--lease", "1", "--timeout", "60"])
            .output()
            .expect("run runledger demo --shared");
        let stdout = String::from_utf8_lossy(&demo.stdout);
        assert!(demo.status.success(), "demo --shared failed:\n{stdout}\n{}", String::from_utf8_lossy(&demo.stderr));
        let summary: Value = serde_json::from_str(stdout.trim()).expect("demo --json summary");
        assert_eq!(summary["check_ok"], json!(true), "{summary}");
        assert_eq!(summary["prefix"], json!("rl"), "--shared keeps the prefix: {summary}");
    }
    // SIGTERM: the worker shuts down gracefully and reports what it did.
    let pid = i32::try_from(worker.id()).expect("pid");
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let output = tokio::task::spawn_blocking(move || {
        let status = worker.wait().expect("worker exit");
        let mut text = String::new();
        use std::io::Read;
        if let Some(mut out) = worker.stdout.take() {
            out.read_to_string(&mut text).expect("worker stdout");
        }
        (status, text)
    })
    .await
    .expect("join");
    assert!(output.0.success(), "worker exit: {:?}", output.0);
    let report: Value = serde_json::from_str(output.1.trim()).expect("worker --json report");
    assert!(report["claimed"].as_u64().expect("claimed") > 0, "the worker process took part: {report}");
}

fn command_calls(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

async fn commandstats(conn: &mut runledger::store::Conn) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.expect("INFO commandstats");
    command_calls(&info)
}

// 8. An idle worker blocks (it claims only when a wait ends) and an enqueue reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_worker_blocks_cheaply_and_wakes_on_enqueue() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let entered: Arc<Mutex<HashSet<String>>> = Arc::default();
    let en = entered.clone();
    let worker = Worker::builder(&store)
        .runtime_id("idle-w")
        .queue("idle")
        // Nothing on a timer but the wait itself (no reaper pass, no heartbeat in
        // the window): every command counted below belongs to the wait loop.
        .reap_every(None)
        .heartbeat(Duration::from_secs(3600))
        .handle_signals(false)
        .build(move |ctx| {
            let en = en.clone();
            async move {
                lock(&en).insert(ctx.run_id().to_string());
                Ok(Done::default())
            }
        })
        .expect("build");
    let (t, h) = start(worker);
    eventually!(Duration::from_secs(5), "worker registered", store.get_runtime("idle-w").await.is_ok());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Idle cost, counted per wait rather than per second: over a 3 s window
    // the worker blocks, and claims (one call, FCALL; the commands the
    // function runs are counted too, so only FCALL is compared) about once
    // per BLPOP. A worker that polled instead of blocking would make many
    // claims per BLPOP, however long the window.
    let before = commandstats(&mut raw).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = commandstats(&mut raw).await;
    let delta = |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    let (blpops, claims) = (delta("blpop"), delta("fcall") + delta("evalsha"));
    assert!(blpops >= 1, "the idle worker never blocked: {after:?}");
    assert!(
        claims <= 2 * (blpops + 1),
        "an idle worker made {claims} claims for {blpops} BLPOPs: before {before:?} after {after:?}"
    );

    // Wake-up: each enqueue reaches the handler, whatever the phase of the
    // safety poll (how soon is measured by `runledger bench`).
    for (i, pause) in [0u64, 700, 1300].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let id = format!("idle-{i}");
        store.create_run(&NewRun::new(&id, "agent").queue("idle")).await.expect("create");
        eventually!(Duration::from_secs(5), format!("{id} handled"), lock(&entered).contains(&id));
    }
    eventually!(Duration::from_secs(5), "all completed", counter(&stats(&store, "idle").await, "completed") == 3);
    let report = stop(t, h).await;
    assert_eq!(report.completed, 3, "{report:?}");
}

// Every case above, on a server of its own and on the test cluster.
backend_tests!(
    two_workers_finish_every_run_once_with_ordered_events,
    lost_lease_is_reclaimed_and_the_old_token_is_fenced,
    cancel_reaches_the_running_handler,
    panics_retries_and_fatal_failures,
    shutdown_releases_in_flight_runs_to_the_next_worker,
    killed_worker_process_runs_are_reclaimed,
);

// A worker reads the server's settings at start (one CONFIG GET per
// recommended setting) unless told not to: a user whose ACL lacks CONFIG GET,
// or many workers in one process, turn it off with check_settings(false).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_checks_the_servers_settings_unless_told_not_to() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    for check in [false, true] {
        let queue = format!("settings-{check}");
        let before = commandstats(&mut raw).await;
        let worker = Worker::builder(&store)
            .runtime_id(format!("settings-w-{check}"))
            .queue(&queue)
            .reap_every(None)
            .handle_signals(false)
            .check_settings(check)
            .build(|_ctx| async move { Ok(Done::default()) })
            .expect("build");
        let (t, h) = start(worker);
        store.create_run(&NewRun::new(format!("settings-run-{check}"), "agent").queue(&queue)).await.expect("create");
        eventually!(
            Duration::from_secs(5),
            "the run completed",
            counter(&stats(&store, &queue).await, "completed") == 1
        );
        let report = stop(t, h).await;
        assert_eq!(report.completed, 1, "{report:?}");
        let after = commandstats(&mut raw).await;
        let config_gets =
            after.get("config|get").copied().unwrap_or(0) - before.get("config|get").copied().unwrap_or(0);
        if check {
            assert_eq!(
                config_gets,
                runledger::embedded::RECOMMENDED_CONFIG.len() as u64,
                "one CONFIG GET per recommended setting"
            );
        } else {
            assert_eq!(config_gets, 0, "check_settings(false) reads no settings: {after:?}");
        }
    }
}
