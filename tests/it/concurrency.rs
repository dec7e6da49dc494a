use crate::common;

// Many claimers at once: every run is finished exactly once, a run is held by
// at most one live lease at any instant, and a worker that lost its lease can
// no longer write into the run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runledger::*;
use serde_json::json;

const QUEUE: &str = "load";
/// How long a worker task may run before the test is declared hung (not slow:
/// no assertion here depends on elapsed time).
const HANG_GUARD: Duration = Duration::from_secs(300);

/// What happened to one claim.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    /// Finalized with this token; server finish time in epoch seconds.
    Finished { finished_at: i64 },
    /// A fenced write was refused with StaleToken at this step.
    Stale { step: &'static str },
}

#[derive(Clone, Debug)]
struct Claim {
    run_id: String,
    token: String,
    worker: usize,
    /// Server time of the claim, epoch ms (lease expiry minus lease length).
    claimed_ms: i64,
    lease_expires_ms: i64,
    outcome: Outcome,
}

fn run_name(i: usize) -> String {
    format!("run-{i:05}")
}

fn run_index(run_id: &str) -> usize {
    run_id.trim_start_matches("run-").parse().expect("run id has an index")
}

/// 2 or 3 events per run, with content that depends only on the run and the
/// sequence, so a re-claimer's appends are idempotent retries of the first holder's.
fn events_of(run_id: &str) -> Vec<NewEvent> {
    let n = 2 + (run_index(run_id) % 2) as i64;
    (1..=n).map(|s| NewEvent::new(s, "progress", json!({"run": run_id, "step": s}))).collect()
}

async fn enqueue(store: &Store, n: usize) {
    let runs: Vec<NewRun> =
        (0..n).map(|i| NewRun::new(run_name(i), "agent").queue(QUEUE).priority((i % 7) as i64 - 3)).collect();
    for chunk in runs.chunks(500) {
        store.create_runs(chunk).await.expect("create_runs");
    }
}

/// (run_id, status, dispatch_attempts, [(stream entry id, data)]) of one run, read raw.
type RunState = (String, String, i64, Vec<(String, String)>);

/// Every run's final state.
async fn final_state(redis: &common::TestRedis, n: usize) -> Vec<RunState> {
    let mut raw = common::raw(redis).await;
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let id = run_name(i);
            pipe.cmd("HMGET").arg(format!("rl:{{{QUEUE}}}:run:{id}")).arg("status").arg("dispatch_attempts");
            pipe.cmd("XRANGE").arg(format!("rl:{{{QUEUE}}}:events:{id}")).arg("-").arg("+");
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut raw).await.expect("pipeline of reads");
        for (k, pair) in replies.chunks(2).enumerate() {
            let (status, attempts): (Option<String>, Option<i64>) =
                redis::from_redis_value(pair[0].clone()).expect("HMGET reply");
            let entries: Vec<(String, HashMap<String, String>)> =
                redis::from_redis_value(pair[1].clone()).expect("XRANGE reply");
            let entries = entries.into_iter().map(|(id, f)| (id, f.get("data").cloned().unwrap_or_default())).collect();
            out.push((run_name(chunk[k]), status.unwrap_or_default(), attempts.unwrap_or(0), entries));
        }
    }
    out
}

fn check_streams(state: &[RunState]) {
    for (run_id, _, _, entries) in state {
        let expected = events_of(run_id);
        let ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
        let want: Vec<String> = (1..=expected.len()).map(|s| format!("{s}-0")).collect();
        assert_eq!(ids, want, "{run_id}: the event stream is complete and in order");
        for ((_, data), ev) in entries.iter().zip(&expected) {
            let stored: serde_json::Value = serde_json::from_str(data).expect("event data is JSON");
            assert_eq!(stored, ev.data, "{run_id}: event {} content", ev.sequence);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_claimers_finish_every_run_exactly_once() {
    const RUNS: usize = 2000;
    const WORKERS: usize = 8;
    const LEASE: Duration = Duration::from_secs(30);
    let (redis, store) = common::store().await;
    enqueue(&store, RUNS).await;

    let history: Arc<Mutex<Vec<Claim>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let url = redis.url.clone();
        let history = history.clone();
        tasks.push(tokio::spawn(async move {
            let store = Store::connect(&url).await.expect("worker connects");
            let req = ClaimRequest::new(format!("worker-{w}")).queue(QUEUE).lease(LEASE);
            let mut done = 0usize;
            loop {
                let Some(run) = store.claim_next_run(&req).await.expect("claim") else { break };
                let token = run.claim_token.clone().expect("claim carries a token");
                let lease_ms = run.claim_lease_expires_at_ms.expect("lease expiry");
                assert_eq!(run.status, RunStatus::Claimed);
                assert_eq!(run.claimed_by_runtime_id.as_deref(), Some(format!("worker-{w}").as_str()));
                for ev in events_of(&run.run_id) {
                    store
                        .append_event(&run.run_id, Some(&token), &ev)
                        .await
                        .unwrap_or_else(|e| panic!("{} event {}: {e}", run.run_id, ev.sequence));
                }
                let fin = store
                    .finalize_run(
                        &run.run_id,
                        &Finish::new(RunStatus::Completed).usage(json!({"worker": w})),
                        Some(&token),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("finalize {}: {e}", run.run_id));
                history.lock().expect("history lock").push(Claim {
                    run_id: run.run_id.clone(),
                    token,
                    worker: w,
                    claimed_ms: lease_ms - LEASE.as_millis() as i64,
                    lease_expires_ms: lease_ms,
                    outcome: Outcome::Finished { finished_at: fin.finished_at.expect("finished_at") },
                });
                done += 1;
            }
            done
        }));
    }
    let mut per_worker = Vec::new();
    for t in tasks {
        per_worker.push(
            tokio::time::timeout(HANG_GUARD, t)
                .await
                .expect("hang guard: a worker task never ended")
                .expect("worker task"),
        );
    }
    let history = history.lock().expect("history lock").clone();

    // Every run was claimed and finished exactly once.
    assert_eq!(per_worker.iter().sum::<usize>(), RUNS);
    assert!(per_worker.iter().filter(|&&n| n > 0).count() >= 2, "work was shared: {per_worker:?}");
    assert_eq!(history.len(), RUNS);
    let distinct: HashSet<&str> = history.iter().map(|c| c.run_id.as_str()).collect();
    assert_eq!(distinct.len(), RUNS, "no run was handed out twice");
    let tokens: HashSet<&str> = history.iter().map(|c| c.token.as_str()).collect();
    assert_eq!(tokens.len(), RUNS, "every claim got its own token");
    // Each claim as the server recorded it, not as this test set it: the
    // lease counts from the server's claim time, the finish fell inside that
    // lease by the server's clock, and the usage is the finishing worker's.
    let mut raw = common::raw(&redis).await;
    for c in &history {
        let key = format!("rl:{{{QUEUE}}}:run:{}", c.run_id);
        let (claimed, finished): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("started_at")
            .arg("finished_at")
            .query_async(&mut raw)
            .await
            .expect("HMGET of the run's times");
        // Each run is claimed once here: its claim time is its started_at.
        let (claimed, finished) = (claimed.expect("started_at"), finished.expect("finished_at"));
        assert_eq!(
            claimed + LEASE.as_millis() as i64,
            c.lease_expires_ms,
            "{}: the lease counts from the claim",
            c.run_id
        );
        assert!(
            claimed <= finished && finished <= c.lease_expires_ms,
            "{}: finished at {finished}, outside its lease {claimed}..{}",
            c.run_id,
            c.lease_expires_ms
        );
        assert!(
            matches!(c.outcome, Outcome::Finished { finished_at } if finished_at == finished / 1000),
            "{}",
            c.run_id
        );
        let stored = store.get_run(&c.run_id).await.expect("get_run");
        assert_eq!(
            stored.usage,
            Some(json!({"worker": c.worker})),
            "{}: finished by the worker that claimed it",
            c.run_id
        );
    }

    let state = final_state(&redis, RUNS).await;
    for (run_id, status, attempts, _) in &state {
        assert_eq!(status, "completed", "{run_id}");
        assert_eq!(*attempts, 1, "{run_id} was dispatched exactly once");
    }
    check_streams(&state);

    // The ledger agrees: nothing queued or held, every run listed as completed.
    let stats = store.queue_stats(QUEUE, 10).await.expect("stats");
    assert_eq!((stats.queued, stats.claimed, stats.delayed, stats.finished), (0, 0, 0, RUNS as i64));
    assert_eq!(stats.counters.get("completed"), Some(&(RUNS as i64)));
    assert_eq!(stats.counters.get("reclaimed"), None, "no lease expired");
    let mut listed = 0;
    let mut filter = RunFilter { statuses: vec![RunStatus::Completed], limit: 100, ..Default::default() };
    loop {
        let page = store.list_runs(&filter).await.expect("list");
        listed += page.items.len();
        match page.next_cursor {
            Some(c) => filter.before_id = Some(c),
            None => break,
        }
    }
    assert_eq!(listed, RUNS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_leases_and_stalled_workers_are_fenced() {
    const RUNS: usize = 300;
    const WORKERS: usize = 8;
    const LEASE: Duration = Duration::from_millis(300);
    const STALL: Duration = Duration::from_millis(1000);
    let (redis, store) = common::store().await;
    enqueue(&store, RUNS).await;

    let history: Arc<Mutex<Vec<Claim>>> = Arc::new(Mutex::new(Vec::new()));
    let finished: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let url = redis.url.clone();
        let history = history.clone();
        let finished = finished.clone();
        tasks.push(tokio::spawn(async move {
            let store = Store::connect(&url).await.expect("worker connects");
            let req = ClaimRequest::new(format!("worker-{w}")).queue(QUEUE).lease(LEASE);
            loop {
                let Some(run) = store.claim_next_run(&req).await.expect("claim") else {
                    if finished.lock().expect("lock").len() == RUNS {
                        return;
                    }
                    // Runs are held by stalled workers; their leases will expire.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let token = run.claim_token.clone().expect("token");
                let lease_ms = run.claim_lease_expires_at_ms.expect("lease expiry");
                let i = run_index(&run.run_id);
                // Every 10th run stalls on its first dispatch: half before the events,
                // half between the events and the finish.
                let first = run.dispatch_attempts == 1;
                let stall_early = first && i.is_multiple_of(20);
                let stall_late = first && i % 20 == 10;
                let outcome = async {
                    if stall_early {
                        tokio::time::sleep(STALL).await;
                    }
                    for ev in events_of(&run.run_id) {
                        match store.append_event(&run.run_id, Some(&token), &ev).await {
                            Ok(_) => {}
                            Err(Error::StaleToken(_)) => return Outcome::Stale { step: "append" },
                            Err(e) => panic!("{} append {}: {e}", run.run_id, ev.sequence),
                        }
                    }
                    if stall_late {
                        tokio::time::sleep(STALL).await;
                    }
                    match store.finalize_run(&run.run_id, &Finish::new(RunStatus::Completed), Some(&token)).await {
                        Ok(r) => Outcome::Finished { finished_at: r.finished_at.expect("finished_at") },
                        Err(Error::StaleToken(_)) => Outcome::Stale { step: "finalize" },
                        Err(e) => panic!("{} finalize: {e}", run.run_id),
                    }
                }
                .await;
                if matches!(outcome, Outcome::Finished { .. }) {
                    let fresh = finished.lock().expect("lock").insert(run.run_id.clone());
                    assert!(fresh, "{} was finalized successfully twice", run.run_id);
                }
                history.lock().expect("lock").push(Claim {
                    run_id: run.run_id.clone(),
                    token,
                    worker: w,
                    claimed_ms: lease_ms - LEASE.as_millis() as i64,
                    lease_expires_ms: lease_ms,
                    outcome,
                });
            }
        }));
    }
    for t in tasks {
        // A run that never finished keeps the workers looping: that is a hang, not slowness.
        tokio::time::timeout(HANG_GUARD, t).await.expect("hang guard: a worker task never ended").expect("worker task");
    }
    let history = history.lock().expect("lock").clone();
    let mut by_run: BTreeMap<String, Vec<Claim>> = BTreeMap::new();
    for c in history {
        by_run.entry(c.run_id.clone()).or_default().push(c);
    }
    assert_eq!(by_run.len(), RUNS, "every run was claimed");

    let state = final_state(&redis, RUNS).await;
    let attempts: HashMap<&str, i64> = state.iter().map(|(id, _, a, _)| (id.as_str(), *a)).collect();
    let mut reclaimed_runs = 0;
    let mut refusals: HashMap<&str, usize> = HashMap::new();
    for (run_id, claims) in &mut by_run {
        claims.sort_by_key(|c| c.claimed_ms);
        // At most one live lease at any instant: each claim starts at or after the
        // previous claim's lease expiry (server times, no renewals in this test).
        for pair in claims.windows(2) {
            assert!(
                pair[1].claimed_ms >= pair[0].lease_expires_ms,
                "{run_id}: claimed at {} while the previous lease ran until {}",
                pair[1].claimed_ms,
                pair[0].lease_expires_ms
            );
            assert_ne!(pair[0].token, pair[1].token);
        }
        // Exactly one claim finished the run, and it is the last one.
        let finishers: Vec<_> = claims.iter().filter(|c| matches!(c.outcome, Outcome::Finished { .. })).collect();
        assert_eq!(finishers.len(), 1, "{run_id}: finished once, got {claims:#?}");
        assert_eq!(finishers[0].token, claims.last().expect("a claim").token, "{run_id}: the last holder finished it");
        // Whenever a second token exists, every earlier token's write was refused.
        if claims.len() > 1 {
            reclaimed_runs += 1;
            for c in &claims[..claims.len() - 1] {
                match c.outcome {
                    Outcome::Stale { step } => *refusals.entry(step).or_default() += 1,
                    ref other => {
                        panic!("{run_id}: token {} of worker {} was not refused: {other:?}", c.token, c.worker)
                    }
                }
            }
        }
        assert_eq!(attempts[run_id.as_str()], claims.len() as i64, "{run_id}: dispatch_attempts counts every claim");
    }
    for (run_id, status, _, _) in &state {
        assert_eq!(status, "completed", "{run_id}");
    }
    check_streams(&state);
    assert!(reclaimed_runs > 0, "the stalls made some leases expire and be re-claimed");
    assert!(refusals.values().sum::<usize>() >= reclaimed_runs, "refusals {refusals:?}");
    eprintln!("re-claimed runs: {reclaimed_runs}, stale refusals by step: {refusals:?}");
    let stats = store.queue_stats(QUEUE, 10).await.expect("stats");
    assert_eq!((stats.queued, stats.claimed, stats.finished), (0, 0, RUNS as i64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_claimers_get_one_run_once() {
    let (redis, store) = common::store().await;
    for round in 0..20 {
        let run_id = format!("solo-{round}");
        store.create_run(&NewRun::new(run_id.as_str(), "agent").queue(QUEUE)).await.expect("create");
        let barrier = Arc::new(tokio::sync::Barrier::new(16));
        let mut tasks = Vec::new();
        for w in 0..16 {
            let store = store.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let req = ClaimRequest::new(format!("rt-{w}")).queue(QUEUE).lease(Duration::from_secs(30));
                barrier.wait().await;
                store.claim_next_run(&req).await.expect("claim")
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            if let Some(run) = t.await.expect("task") {
                winners.push(run);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one claimer wins");
        assert_eq!(winners[0].run_id, run_id);
        assert_eq!(winners[0].dispatch_attempts, 1);
    }
    let _ = redis;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_creates_and_audits_stay_consistent() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    // 16 hosts create the same run at once: one run, one id.
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for w in 0..16 {
        let store = store.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store.create_run(&NewRun::new("same", format!("runner-{w}")).queue(QUEUE)).await.expect("create")
        }));
    }
    let mut runs = Vec::new();
    for t in tasks {
        runs.push(t.await.expect("task"));
    }
    assert!(runs.iter().all(|r| r == &runs[0]), "every creator got the same stored run");
    let clock: String = redis::cmd("HGET")
        .arg(format!("rl:{{{QUEUE}}}:meta"))
        .arg("clock")
        .query_async(&mut raw)
        .await
        .expect("HGET clock");
    assert_eq!(clock.parse::<i64>().expect("clock"), runs[0].id / 4096, "one id taken for the one run");
    let queued: i64 =
        redis::cmd("ZCARD").arg(format!("rl:{{{QUEUE}}}:queued")).query_async(&mut raw).await.expect("ZCARD");
    assert_eq!(queued, 1);

    // 8 hosts write 25 audit events each at once: 200 distinct, gapless sequences.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for k in 0..25 {
                let e = store
                    .append_audit_event("same", "audit", Some(&json!({"w": w, "k": k})), None)
                    .await
                    .expect("audit");
                seqs.push(e.sequence);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let seqs = t.await.expect("task");
        assert!(seqs.windows(2).all(|p| p[0] < p[1]), "one writer sees rising sequences");
        all.extend(seqs);
    }
    all.sort();
    assert_eq!(all, (1..=200).collect::<Vec<i64>>());

    // Two writers race for the same new sequence with different content: one wins, one conflicts.
    let (ea, eb) = (NewEvent::new(201, "x", json!({"by": "a"})), NewEvent::new(201, "x", json!({"by": "b"})));
    let a = store.append_event("same", None, &ea);
    let b = store.append_event("same", None, &eb);
    let (a, b) = tokio::join!(a, b);
    let ok = [a.is_ok(), b.is_ok()];
    assert_eq!(ok.iter().filter(|&&x| x).count(), 1, "exactly one writer wins: {a:?} {b:?}");
    let loser = if a.is_ok() { b } else { a };
    assert!(matches!(loser, Err(Error::Conflict(_))), "the other gets a conflict: {loser:?}");
    let len: i64 =
        redis::cmd("XLEN").arg(format!("rl:{{{QUEUE}}}:events:same")).query_async(&mut raw).await.expect("XLEN");
    assert_eq!(len, 201);
}
