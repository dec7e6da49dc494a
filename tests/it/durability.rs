//! What survives a Redis crash, and what a worker does when it does not.
//!
//! - With `appendonly yes` and `appendfsync always`, every write the library
//!   acknowledged (an `Ok` reply: a run created, claimed, an event appended,
//!   a run finished) is still there after redis-server is SIGKILLed mid-stream
//!   and started again on its data dir. Calls that failed around the kill
//!   prove nothing either way and are not checked.
//! - Without persistence, a restart loses the runs. A worker holding one
//!   notices at its next renewal (the run is not found), stops the handler
//!   with `StopReason::LeaseLost`, counts the run as lease lost and never as
//!   completed, and goes on to complete runs created after the restart.
//!
//! Every wait is bounded by a hang guard; no assertion depends on how long
//! anything took.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use runledger::embedded::RedisServer;
use runledger::*;
use serde_json::{Value, json};

/// How long any one wait may take before the test is declared hung.
const HANG_GUARD: Duration = Duration::from_secs(120);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Polls `cond` every 20 ms until it holds; panics (a hang, not a slowness
/// verdict) when the hang guard passes first.
async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let waited = tokio::time::timeout(HANG_GUARD, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "hang guard: still waiting for {what} after {HANG_GUARD:?}");
}

use crate::common::all_events;

/// The writes one writer saw acknowledged.
#[derive(Default)]
struct Acked {
    created: HashSet<String>,
    /// run_id -> (runtime, claim token).
    claimed: HashMap<String, (String, String)>,
    /// run_id -> (sequence, type, data) of each acknowledged event.
    events: HashMap<String, Vec<(i64, String, Value)>>,
    finished: HashMap<String, RunStatus>,
}

/// A failed call: counted, and a pause, so a writer does not spin while Redis is down.
async fn failed(errors: &AtomicU64) {
    errors.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// One writer: on its own queue, creates a run, claims the next one, appends
/// three events and finishes it, over and over until `stop`. Only writes
/// whose reply came back `Ok` are recorded; after a failed call the run in
/// hand is abandoned (whether the call landed is unknown) and the writer
/// moves on, so it keeps writing through the crash and after it.
async fn writer(store: Store, k: usize, stop: Arc<AtomicBool>, acks: Arc<AtomicU64>, errors: Arc<AtomicU64>) -> Acked {
    let queue = format!("q{k}");
    let runtime = format!("rt{k}");
    let mut acked = Acked::default();
    let tick = || acks.fetch_add(1, Ordering::SeqCst);
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let id = format!("w{k}-{i}");
        match store.create_run(&NewRun::new(&id, "agent").queue(&queue).metadata(json!({ "writer": k, "i": i }))).await
        {
            Ok(run) => {
                acked.created.insert(run.run_id);
                tick();
            }
            Err(_) => {
                failed(&errors).await;
                continue;
            }
        }
        // Not necessarily `id`: a create that failed may have landed, and is claimed first.
        let request = ClaimRequest::new(&runtime).queue(&queue).lease(Duration::from_secs(600));
        let run = match store.claim_next_run(&request).await {
            Ok(Some(run)) => run,
            Ok(None) => continue,
            Err(_) => {
                failed(&errors).await;
                continue;
            }
        };
        let token = run.claim_token.clone().expect("a claimed run has a token");
        acked.claimed.insert(run.run_id.clone(), (runtime.clone(), token.clone()));
        tick();
        let mut whole = true;
        for n in 1..=3 {
            let sequence = run.last_sequence + n;
            let data = json!({ "run": run.run_id, "n": n, "writer": k });
            let event = NewEvent::new(sequence, "step", data.clone());
            match store.append_event(&run.run_id, Some(&token), &event).await {
                Ok(_) => {
                    acked.events.entry(run.run_id.clone()).or_default().push((sequence, "step".into(), data));
                    tick();
                }
                Err(_) => {
                    whole = false;
                    failed(&errors).await;
                    break;
                }
            }
        }
        if !whole {
            continue;
        }
        let finish = if i.is_multiple_of(5) {
            Finish::new(RunStatus::Failed).reason("every fifth run fails")
        } else {
            Finish::new(RunStatus::Completed)
        };
        match store.finish_run(&run.run_id, &finish, Some(&token)).await {
            Ok(()) => {
                acked.finished.insert(run.run_id.clone(), finish.status);
                tick();
            }
            Err(_) => failed(&errors).await,
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_crash_with_aof_always() {
    const WRITERS: usize = 6;
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
        .unwrap_or_else(|e| panic!("starting redis-server with AOF: {e}"));
    let url = server.url();
    // A short reply timeout: a call caught by the kill fails instead of waiting 30 s.
    let cfg = StoreConfig { response_timeout: Duration::from_secs(2), ..Default::default() };
    let store = Store::connect_with(&url, cfg.clone()).await.expect("connect");

    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|k| tokio::spawn(writer(store.clone(), k, stop.clone(), acks.clone(), errors.clone())))
        .collect();

    // Kill once the writers are well under way, while they are still writing.
    wait_until("the writers' first 300 acknowledged writes", || async { acks.load(Ordering::SeqCst) >= 300 }).await;
    tokio::task::block_in_place(|| server.kill_and_restart()).expect("kill redis-server and start it on its data dir");
    let at_restart = acks.load(Ordering::SeqCst);
    // The writers reconnect and go on: the kill hit them mid-stream, not after they were done.
    wait_until("100 more acknowledged writes after the restart", || async {
        acks.load(Ordering::SeqCst) >= at_restart + 100
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for w in writers {
        let a = tokio::time::timeout(HANG_GUARD, w)
            .await
            .expect("hang guard: a writer did not stop")
            .expect("writer panicked");
        acked.push(a);
    }

    // Read everything back through a store of its own: nothing cached from the writers.
    let check = Store::connect_with(&url, cfg).await.expect("connect after the restart");
    let (mut runs, mut claims, mut events, mut finishes) = (0, 0, 0, 0);
    for a in &acked {
        for id in &a.created {
            check.get_run(id).await.unwrap_or_else(|e| panic!("acknowledged create of {id} lost: {e}"));
            runs += 1;
        }
        for (id, (runtime, token)) in &a.claimed {
            let run = check.get_run(id).await.unwrap_or_else(|e| panic!("claimed run {id} lost: {e}"));
            assert!(run.dispatch_attempts >= 1, "{id}: acknowledged claim lost: {run:?}");
            if let Some(status) = a.finished.get(id) {
                assert_eq!(run.status, *status, "{id}: acknowledged finish lost");
            } else if !run.status.is_terminal() {
                // Not finished (as far as the writer knows): still held by its acknowledged claim.
                assert!(
                    matches!(run.status, RunStatus::Claimed | RunStatus::Running),
                    "{id}: acknowledged claim lost: {run:?}"
                );
                // get_run never shows the token; a renewal with it succeeds only while it holds the claim.
                check
                    .renew_claim(id, token, Duration::from_secs(600))
                    .await
                    .unwrap_or_else(|e| panic!("{id}: the acknowledged claim token no longer holds: {e}"));
                assert_eq!(run.claimed_by_runtime_id.as_deref(), Some(runtime.as_str()), "{id}: claimed by");
            }
            claims += 1;
        }
        for (id, expected) in &a.events {
            let stored = all_events(&check, id).await;
            for (sequence, event_type, data) in expected {
                let found = stored
                    .iter()
                    .find(|e| e.sequence == *sequence)
                    .unwrap_or_else(|| panic!("{id}: acknowledged event {sequence} lost; stored: {stored:?}"));
                assert_eq!(&found.event_type, event_type, "{id}: event {sequence}");
                assert_eq!(&found.data, data, "{id}: event {sequence}");
                events += 1;
            }
        }
        finishes += a.finished.len();
    }
    eprintln!(
        "checked {runs} creates, {claims} claims, {events} events, {finishes} finishes; \
         {} calls failed around the kill",
        errors.load(Ordering::SeqCst)
    );
    assert!(runs > 0 && claims > 0 && events > 0 && finishes > 0, "every kind of write was acknowledged");
}

/// What the handler of the long run saw.
#[derive(Default)]
struct LongRun {
    started: bool,
    stop_reason: Option<Option<StopReason>>,
    returned_ok: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_gives_up_a_run_lost_in_a_restart_and_keeps_working() {
    let mut server = RedisServer::start().unwrap_or_else(|e| panic!("starting redis-server: {e}"));
    let cfg = StoreConfig { response_timeout: Duration::from_secs(2), ..Default::default() };
    let store = Store::connect_with(&server.url(), cfg).await.expect("connect");
    store.create_run(&NewRun::new("long", "agent").queue("q")).await.expect("create long");

    let long: Arc<Mutex<LongRun>> = Arc::default();
    let completed_by_handler: Arc<Mutex<Vec<String>>> = Arc::default();
    let worker = Worker::builder(&store)
        .runtime_id("w")
        .queue("q")
        .concurrency(2)
        .lease(Duration::from_secs(2))
        .heartbeat(Duration::from_secs(1))
        .reap_every(None)
        .handle_signals(false)
        .build({
            let long = long.clone();
            let completed = completed_by_handler.clone();
            move |ctx| {
                let long = long.clone();
                let completed = completed.clone();
                async move {
                    if ctx.run_id() != "long" {
                        lock(&completed).push(ctx.run_id().to_string());
                        return Ok(Done::default());
                    }
                    lock(&long).started = true;
                    tokio::select! {
                        _ = ctx.stopped() => {
                            lock(&long).stop_reason = Some(ctx.stop_reason());
                            Err(Failure::fatal("stopped"))
                        }
                        // Far longer than the test: only a stop ends this run.
                        _ = tokio::time::sleep(Duration::from_secs(600)) => {
                            lock(&long).returned_ok = true;
                            Ok(Done::default())
                        }
                    }
                }
            }
        })
        .expect("worker");
    let token = worker.shutdown_token();
    let handle = tokio::spawn(worker.run());

    wait_until("the handler of the long run to start", || async { lock(&long).started }).await;
    // Persistence is off: the restarted server is empty, the long run is gone.
    tokio::task::block_in_place(|| server.restart()).expect("restart redis-server");

    wait_until("the long run's handler to be stopped", || async { lock(&long).stop_reason.is_some() }).await;
    let reason = lock(&long).stop_reason.clone().flatten();
    assert!(matches!(reason, Some(StopReason::LeaseLost(_))), "the handler was stopped for {reason:?}");

    // The same worker serves runs created after the restart.
    store.create_run(&NewRun::new("after", "agent").queue("q")).await.expect("create after the restart");
    wait_until("the run created after the restart to complete", || async {
        store.get_run("after").await.is_ok_and(|r| r.status == RunStatus::Completed)
    })
    .await;

    token.cancel();
    let report = tokio::time::timeout(HANG_GUARD, handle)
        .await
        .expect("hang guard: the worker did not stop")
        .expect("worker task panicked")
        .expect("worker returned an error");
    assert!(!lock(&long).returned_ok, "the long run's handler ran to its end");
    assert_eq!(*lock(&completed_by_handler), ["after"]);
    assert_eq!(report.lease_lost, 1, "{report:?}");
    assert_eq!(report.completed, 1, "only the run created after the restart completed: {report:?}");
    assert_eq!(report.claimed, 2, "{report:?}");
    assert!(
        matches!(store.get_run("long").await, Err(Error::NotFound(_))),
        "the restart lost the long run (nobody wrote it back)"
    );
}
