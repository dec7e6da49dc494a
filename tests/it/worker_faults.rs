//! The Worker when things go wrong around a handler: a handler that blocks
//! its thread, Redis stalling the renewals, a host writing audit events into
//! a running run, concurrent emits. No assertion here depends on how fast
//! anything is; the timeouts are hang guards.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runledger::*;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const HANG_GUARD: Duration = Duration::from_secs(90);

fn start(worker: Worker) -> (CancellationToken, tokio::task::JoinHandle<Result<WorkerReport>>) {
    let token = worker.shutdown_token();
    (token, tokio::spawn(worker.run()))
}

/// Polls `check` until it holds; panics (a hang guard, not a speed check) after a minute.
async fn until<F: AsyncFnMut() -> bool>(what: &str, mut check: F) {
    let guard = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(tokio::time::Instant::now() < guard, "hang guard: still waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status(store: &Store, run_id: &str) -> Run {
    store.get_run(run_id).await.unwrap_or_else(|e| panic!("get {run_id}: {e}"))
}

async fn event_types(store: &Store, run_id: &str) -> Vec<(i64, String)> {
    let page = store.page_run_events(run_id, None, None, 100, Direction::Forward).await.expect("events");
    page.items.into_iter().map(|e| (e.sequence, e.event_type)).collect()
}

/// A handler that blocks its thread (no `spawn_blocking`) cannot be aborted.
/// Once it is told to stop (here: its run is cancelled), the worker must
/// still free its slot, record the outcome, go on with other runs and shut
/// down, leaving the blocked thread behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocking_handler_cannot_wedge_the_worker() {
    let (_redis, store) = common::store().await;
    store.create_run(&NewRun::new("blocks", "agent").queue("bq").priority(5)).await.expect("create");
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Arc::new(Mutex::new(release_rx));
    let blocked_now = Arc::new(AtomicBool::new(false));
    let (rx, blocked) = (release_rx.clone(), blocked_now.clone());
    let worker = Worker::builder(&store)
        .runtime_id("bq-w")
        .queue("bq")
        .concurrency(1)
        .lease(Duration::from_secs(5))
        .grace(Duration::from_millis(200))
        .reap_every(None)
        .handle_signals(false)
        .build(move |ctx| {
            let (rx, blocked) = (rx.clone(), blocked.clone());
            async move {
                if ctx.run.run_id == "blocks" && ctx.run.dispatch_attempts == 1 {
                    // Blocks this thread until the test lets go, ignoring every stop.
                    blocked.store(true, Ordering::SeqCst);
                    let _ = rx.lock().map(|rx| rx.recv_timeout(Duration::from_secs(120)));
                    blocked.store(false, Ordering::SeqCst);
                }
                Ok(Done::default())
            }
        })
        .expect("build");
    let (stop, handle) = start(worker);
    until("the handler blocks", async || blocked_now.load(Ordering::SeqCst)).await;
    store.create_run(&NewRun::new("after", "agent").queue("bq")).await.expect("create after");
    store.request_cancel("blocks", Some("operator")).await.expect("cancel");
    // Its only slot was held by the blocked handler: the next run gets it.
    until("the run after the blocked one completes", async || {
        status(&store, "after").await.status == RunStatus::Completed
    })
    .await;
    assert_eq!(status(&store, "blocks").await.status, RunStatus::Cancelled);
    stop.cancel();
    let report = tokio::time::timeout(HANG_GUARD, handle).await.expect("hang guard: worker shutdown").expect("join");
    let report = report.expect("worker");
    assert!(blocked_now.load(Ordering::SeqCst), "the first handler is still blocked when the worker has stopped");
    release_tx.send(()).expect("release the blocked thread");
    assert_eq!((report.claimed, report.completed, report.cancelled), (2, 1, 1), "{report:?}");
}

/// Sets its flag when dropped: when the handler's future ends, by returning
/// or by being aborted.
struct Ended(Arc<AtomicBool>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Redis stalls every write (CLIENT PAUSE, for far longer than the lease)
/// while a run is held: the renewal cannot land, and the worker ends the
/// handler at the lease's end by its own clock instead of waiting for Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_renewal_stops_the_handler_at_the_lease_end() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    store.create_run(&NewRun::new("stall", "agent").queue("sq")).await.expect("create");
    let started = Arc::new(Notify::new());
    let first_ended = Arc::new(AtomicBool::new(false));
    let (st, fe) = (started.clone(), first_ended.clone());
    let worker = Worker::builder(&store)
        .runtime_id("sq-w")
        .queue("sq")
        .lease(Duration::from_secs(2))
        .renew_every(Duration::from_millis(500))
        .reap_every(None)
        .handle_signals(false)
        .build(move |ctx| {
            let (st, fe) = (st.clone(), fe.clone());
            async move {
                if ctx.run.dispatch_attempts > 1 {
                    return Ok(Done::default());
                }
                let _ended = Ended(fe);
                st.notify_one();
                // Would run on for minutes: only the worker can end it.
                tokio::select! {
                    _ = ctx.stopped() => Err(Failure::fatal("stopped")),
                    _ = tokio::time::sleep(Duration::from_secs(600)) => Ok(Done::default()),
                }
            }
        })
        .expect("build");
    let (stop, handle) = start(worker);
    tokio::time::timeout(HANG_GUARD, started.notified()).await.expect("hang guard: handler start");
    // Writes stall far longer than the lease; this connection's own commands go through.
    let _: () =
        redis::cmd("CLIENT").arg("PAUSE").arg("600000").arg("WRITE").query_async(&mut raw).await.expect("PAUSE");
    until("the worker ends the handler while Redis is still paused", async || first_ended.load(Ordering::SeqCst)).await;
    let _: () = redis::cmd("CLIENT").arg("UNPAUSE").query_async(&mut raw).await.expect("UNPAUSE");
    // The late renewal is refused by the server (the lease had expired), and the run is run again.
    until("the run completes on a later attempt", async || {
        status(&store, "stall").await.status == RunStatus::Completed
    })
    .await;
    stop.cancel();
    let report = tokio::time::timeout(HANG_GUARD, handle).await.expect("hang guard").expect("join").expect("worker");
    assert_eq!((report.lease_lost, report.completed), (1, 1), "{report:?}");
    assert_eq!(status(&store, "stall").await.dispatch_attempts, 2);
}

/// An operator's audit event lands while a handler runs; the handler's next
/// emits move on after it instead of failing with a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_event_never_fails_a_running_handler() {
    let (_redis, store) = common::store().await;
    store.create_run(&NewRun::new("audited", "agent").queue("aq")).await.expect("create");
    let (emitted, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (em, ga) = (emitted.clone(), gate.clone());
    let worker = Worker::builder(&store)
        .runtime_id("aq-w")
        .queue("aq")
        .reap_every(None)
        .handle_signals(false)
        .build(move |ctx| {
            let (em, ga) = (em.clone(), ga.clone());
            async move {
                ctx.emit("first", json!({})).await?;
                em.notify_one();
                ga.notified().await;
                ctx.emit("second", json!({})).await?;
                ctx.emit_many(vec![("third".into(), json!({})), ("fourth".into(), json!({}))]).await?;
                Ok(Done::default())
            }
        })
        .expect("build");
    let (stop, handle) = start(worker);
    tokio::time::timeout(HANG_GUARD, emitted.notified()).await.expect("hang guard: first emit");
    let text = json!({"text": "looked at it"});
    let note = store.append_audit_event("audited", "operator-note", Some(&text), None).await.expect("audit");
    assert_eq!(note.sequence, 2);
    gate.notify_one();
    until("the run completes", async || status(&store, "audited").await.status.is_terminal()).await;
    stop.cancel();
    let report = tokio::time::timeout(HANG_GUARD, handle).await.expect("hang guard").expect("join").expect("worker");
    assert_eq!(status(&store, "audited").await.status, RunStatus::Completed);
    assert_eq!(report.completed, 1, "{report:?}");
    let events = event_types(&store, "audited").await;
    let expected: Vec<(i64, String)> = [(1, "first"), (2, "operator-note"), (3, "second"), (4, "third"), (5, "fourth")]
        .iter()
        .map(|(s, t)| (*s, t.to_string()))
        .collect();
    assert_eq!(events, expected);
}

/// Emits made at the same time by one handler all land, numbered in the
/// order they were made, with no hole and no out-of-order refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_emits_land_in_order_without_holes() {
    let (_redis, store) = common::store().await;
    store.create_run(&NewRun::new("many", "agent").queue("mq")).await.expect("create");
    let failures = Arc::new(AtomicUsize::new(0));
    let f = failures.clone();
    // (i, the sequence its emit was given), as the handler saw them.
    let given: Arc<std::sync::Mutex<Vec<(i64, i64)>>> = Arc::default();
    let g = given.clone();
    let worker = Worker::builder(&store)
        .runtime_id("mq-w")
        .queue("mq")
        .reap_every(None)
        .handle_signals(false)
        .build(move |ctx| {
            let (f, g) = (f.clone(), g.clone());
            async move {
                // join_all polls the emits in the order they were made: i = 0, 1, ...
                let emits = (0..40).map(|i| {
                    let ctx = ctx.clone();
                    async move { ctx.emit("tick", json!({ "i": i })).await }
                });
                for (i, result) in futures_util::future::join_all(emits).await.into_iter().enumerate() {
                    match result {
                        Ok(event) => g.lock().expect("lock").push((i as i64, event.sequence)),
                        Err(_) => {
                            f.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                Ok(Done::default())
            }
        })
        .expect("build");
    let (stop, handle) = start(worker);
    until("the run completes", async || status(&store, "many").await.status.is_terminal()).await;
    stop.cancel();
    tokio::time::timeout(HANG_GUARD, handle).await.expect("hang guard").expect("join").expect("worker");
    assert_eq!(failures.load(Ordering::SeqCst), 0, "every emit lands");
    let sequences: Vec<i64> = event_types(&store, "many").await.into_iter().map(|(s, _)| s).collect();
    assert_eq!(sequences, (1..=40).collect::<Vec<i64>>(), "no hole");
    // Numbered in the order they were made: emit i got sequence i + 1, and
    // the stored event i + 1 is emit i's.
    let given = given.lock().expect("lock").clone();
    assert_eq!(given, (0..40).map(|i| (i, i + 1)).collect::<Vec<_>>(), "each emit's sequence is its order");
    let page = store.page_run_events("many", None, None, 100, Direction::Forward).await.expect("events");
    let stored: Vec<(i64, i64)> = page.items.iter().map(|e| (e.sequence, e.data["i"].as_i64().unwrap_or(-1))).collect();
    assert_eq!(stored, (0..40).map(|i| (i + 1, i)).collect::<Vec<_>>(), "event i + 1 holds emit i");
}
