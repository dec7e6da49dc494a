//! Redis Sentinel: a master with 2 replicas under 3 sentinels, each test on
//! a private setup of its own (it kills or demotes the master). Hosts and
//! workers connect with a `redis+sentinel://` URL and carry on across a
//! failover without a restart: a master killed mid-workload with the write
//! concern on loses nothing acknowledged, a worker blocked in its idle wait
//! claims the next run on the new master, a planned switch (`SENTINEL
//! FAILOVER`) surfaces no error to the handlers, and the demo runs on it.
//!
//! The tests take turns: each runs six redis-server processes whose
//! sentinels judge a master down after 1 s of silence, and two setups under
//! load at once on a small machine could fail over for no reason.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use runledger::embedded_sentinel::RedisSentinel;
use runledger::*;
use serde_json::{Value, json};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One Sentinel test at a time (see the module doc).
fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts a private setup off the runtime's threads.
fn start_setup() -> RedisSentinel {
    tokio::task::block_in_place(|| RedisSentinel::start().unwrap_or_else(|e| panic!("start the Sentinel setup: {e}")))
}

fn concern() -> StoreConfig {
    StoreConfig { wait_replicas: 1, replica_timeout: Duration::from_millis(500), ..Default::default() }
}

async fn completed(store: &Store, queues: &[&str]) -> i64 {
    let mut n = 0;
    for q in queues {
        if let Ok(stats) = store.queue_stats(q, 0).await {
            n += stats.counters.get("completed").copied().unwrap_or(0);
        }
    }
    n
}

async fn counter(store: &Store, queues: &[&str], name: &str) -> i64 {
    let mut n = 0;
    for q in queues {
        if let Ok(stats) = store.queue_stats(q, 0).await {
            n += stats.counters.get(name).copied().unwrap_or(0);
        }
    }
    n
}

/// The longest pause between two acknowledged writes (of any handler) that
/// ends after `from` and starts before the switch was over (plus a margin):
/// how long the workers' writes stalled around a failover.
fn longest_pause(acks: &[Instant], from: Instant, switch: Duration) -> Duration {
    let mut acks = acks.to_vec();
    acks.sort_unstable();
    let until = from + switch + Duration::from_secs(10);
    acks.windows(2)
        .filter(|pair| pair[1] > from && pair[0] < until)
        .map(|pair| pair[1].duration_since(pair[0]))
        .max()
        .unwrap_or_default()
}

/// The URL form and the connection: a `redis+sentinel://` URL reaches the
/// master (and `--sentinel-master` with a plain URL of the sentinels does
/// too), a master name no sentinel monitors fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)]
async fn a_sentinel_url_reaches_the_master() {
    let _turn = turn();
    let setup = start_setup();
    tokio::time::timeout(Duration::from_secs(120), async {
        let store = Store::connect(&setup.url()).await.expect("connect through the sentinels");
        assert!(store.is_sentinel() && !store.is_cluster());
        let master = tokio::task::block_in_place(|| setup.master_port()).expect("master");
        assert_eq!(store.sentinel_master_addr(), Some(format!("127.0.0.1:{master}")));
        store.create_run(&NewRun::new("s-1", "agent").queue("q")).await.expect("create");
        let run = store.get_run("s-1").await.expect("get");
        assert_eq!(run.status, RunStatus::Queued);

        let hosts: Vec<String> = setup.sentinel_ports().iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let plain = format!("redis://{}/", hosts.join(","));
        let cfg = StoreConfig { sentinel_master: Some(setup.master_name().to_string()), ..Default::default() };
        let other = Store::connect_with(&plain, cfg).await.expect("connect with sentinel_master");
        assert_eq!(other.get_run("s-1").await.expect("get").run_id, "s-1");

        let wrong = Store::connect(&format!("redis+sentinel://{}/nosuchmaster", hosts.join(","))).await;
        assert!(matches!(wrong, Err(Error::Invalid(_))), "an unknown master name is bad input");
    })
    .await
    .expect("hang guard: the test took over 120 s");
}

// 1. The cluster failover test's checks, on Sentinel.
const RUNS: usize = 2000;
const QUEUES: [&str; 3] = ["sa", "sb", "sc"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)]
async fn killing_the_master_mid_workload_loses_nothing_acknowledged() {
    let _turn = turn();
    let mut setup = start_setup();
    let url = setup.url();
    let host = Store::connect_with(&url, concern()).await.expect("host store");
    let body = async {
        // Host: enqueues in batches, retrying what was not acknowledged.
        let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
        let enqueuer = {
            let host = host.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                let mut failures = 0;
                for batch in 0..RUNS / 50 {
                    let runs: Vec<NewRun> = (0..50)
                        .map(|i| {
                            let n = batch * 50 + i;
                            NewRun::new(format!("s-{n}"), "agent")
                                .queue(QUEUES[n % QUEUES.len()])
                                .priority((n % 3) as i64)
                        })
                        .collect();
                    let deadline = Instant::now() + Duration::from_secs(120);
                    loop {
                        match host.create_runs(&runs).await {
                            Ok(created) => {
                                lock(&acked).extend(created.into_iter().map(|r| r.run_id));
                                break;
                            }
                            Err(e) => {
                                failures += 1;
                                assert!(
                                    Instant::now() < deadline,
                                    "hang guard: batch {batch} not acknowledged within 120 s: {e}"
                                );
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                    // Spread over the workload, so that enqueues meet the failover too.
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                failures
            })
        };

        let handled: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let acked_events: Arc<Mutex<HashMap<(String, i64), i64>>> = Arc::default();
        // When each acknowledged emit came back: the gap around the kill is
        // what the failover cost the workers.
        let acks: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let mut workers = Vec::new();
        for w in 0..3 {
            let store = Store::connect_with(&url, concern()).await.expect("worker store");
            let (handled, acked_events, acks) = (handled.clone(), acked_events.clone(), acks.clone());
            let worker = Worker::builder(&store)
                .runtime_id(format!("sf-w{w}"))
                .queues(QUEUES)
                .concurrency(6)
                .lease(Duration::from_secs(5))
                .heartbeat(Duration::from_secs(1))
                .reap_every(Some(Duration::from_secs(1)))
                .handle_signals(false)
                .build(move |ctx| {
                    let (handled, acked_events, acks) = (handled.clone(), acked_events.clone(), acks.clone());
                    async move {
                        *lock(&handled).entry(ctx.run_id().to_string()).or_default() += 1;
                        for n in 1..=3 {
                            let event = ctx.emit("step", json!({ "n": n })).await?;
                            lock(&acks).push(Instant::now());
                            lock(&acked_events).insert((ctx.run_id().to_string(), event.sequence), n);
                        }
                        Ok(Done::default())
                    }
                })
                .expect("worker");
            let token = worker.shutdown_token();
            workers.push((token, tokio::spawn(worker.run())));
        }

        let deadline = Instant::now() + Duration::from_secs(180);
        while completed(&host, &QUEUES).await < (RUNS / 4) as i64 {
            assert!(Instant::now() < deadline, "hang guard: workers did not get going");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let old = tokio::task::block_in_place(|| setup.master_port()).expect("master");
        let reclaimed_before = counter(&host, &QUEUES, "reclaimed").await;
        let done_before = completed(&host, &QUEUES).await;
        let pid = setup.pid(old).expect("pid");
        let killed = Instant::now();
        tokio::task::block_in_place(|| setup.kill(old)).expect("kill -9 the master");
        let new = tokio::task::block_in_place(|| setup.wait_new_master(old, Duration::from_secs(60)))
            .unwrap_or_else(|e| panic!("no promotion: {e}\n{}", setup.logs()));
        let promoted_in = killed.elapsed();
        // The old master comes back as a replica of the new one.
        tokio::task::block_in_place(|| setup.restart_as_replica(old, new)).expect("restart the old master");
        tokio::task::block_in_place(|| setup.wait_ready(Duration::from_secs(60)))
            .unwrap_or_else(|e| panic!("setup not whole again: {e}"));

        let failures = enqueuer.await.expect("enqueuer task");
        let deadline = Instant::now() + Duration::from_secs(240);
        while completed(&host, &QUEUES).await < RUNS as i64 {
            if Instant::now() > deadline {
                let mut stuck = Vec::new();
                for n in 0..RUNS {
                    match host.get_run(&format!("s-{n}")).await {
                        Ok(run) if run.status == RunStatus::Completed => {}
                        Ok(run) => {
                            stuck.push(format!("{} {} attempts {}", run.run_id, run.status, run.dispatch_attempts))
                        }
                        Err(e) => stuck.push(format!("s-{n}: {e}")),
                    }
                }
                panic!("only {} of {RUNS} runs completed: {stuck:?}", completed(&host, &QUEUES).await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (w, (token, task)) in workers.into_iter().enumerate() {
            token.cancel();
            let ended =
                tokio::time::timeout(Duration::from_secs(30), task).await.expect("hang guard: a worker never stopped");
            ended
                .expect("worker task panicked")
                .unwrap_or_else(|e| panic!("worker {w} failed during the failover: {e}"));
        }

        let acked = lock(&acked).clone();
        assert_eq!(acked.len(), RUNS, "every batch was acknowledged in the end");
        let mut reclaimed_runs = 0;
        for run_id in &acked {
            let run =
                host.get_run(run_id).await.unwrap_or_else(|e| panic!("acknowledged run {run_id} is missing: {e}"));
            assert_eq!(run.status, RunStatus::Completed, "{run_id}");
            if run.dispatch_attempts > 1 {
                reclaimed_runs += 1;
            }
            let page = host.page_run_events(run_id, None, None, 100, Direction::Forward).await.expect("events");
            let seqs: Vec<i64> = page.items.iter().map(|e| e.sequence).collect();
            assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "{run_id}: no gap, no duplicate");
            let steps: Vec<i64> = page.items.iter().filter_map(|e| e.data["n"].as_i64()).collect();
            assert!(steps.ends_with(&[1, 2, 3]), "{run_id}: the completing handler's events are all there: {steps:?}");
        }
        let acked_events = lock(&acked_events).clone();
        assert!(acked_events.len() >= 3 * RUNS, "every completed run acknowledged its 3 events");
        let mut by_run: HashMap<&str, Vec<(i64, i64)>> = HashMap::new();
        for ((run_id, seq), n) in &acked_events {
            by_run.entry(run_id.as_str()).or_default().push((*seq, *n));
        }
        for (run_id, events) in by_run {
            let page = host.page_run_events(run_id, None, None, 100, Direction::Forward).await.expect("events");
            let stored: HashMap<i64, i64> =
                page.items.iter().map(|e| (e.sequence, e.data["n"].as_i64().unwrap_or(-1))).collect();
            for (seq, n) in events {
                assert_eq!(
                    stored.get(&seq),
                    Some(&n),
                    "{run_id}: acknowledged event {seq} (step {n}) is lost or changed"
                );
            }
        }
        assert_eq!(completed(&host, &QUEUES).await, RUNS as i64, "one completion per run");

        // What the failover cost.
        let reclaimed = counter(&host, &QUEUES, "reclaimed").await - reclaimed_before;
        let again = lock(&handled).values().filter(|&&n| n > 1).count();
        let stalled = longest_pause(&lock(&acks), killed, promoted_in);
        eprintln!(
            "sentinel failover: killed master 127.0.0.1:{old} (pid {pid}) with {done_before} of {RUNS} runs done; \
             sentinels named 127.0.0.1:{new} after {promoted_in:.1?}; the workers' writes stalled for at most \
             {stalled:.1?}; {reclaimed} lease re-claims, {reclaimed_runs} runs dispatched more than once, \
             {again} handled more than once; {failures} enqueue batches retried"
        );
    };
    tokio::time::timeout(Duration::from_secs(600), body).await.expect("hang guard: the test took over 600 s");
}

// 2. The BullMQ #4378 case: a worker blocked in its idle wait when the master
// goes (demoted by a planned switch, then killed) claims the next run on the
// new master, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)]
async fn an_idle_worker_claims_the_next_run_after_a_failover() {
    let _turn = turn();
    let mut setup = start_setup();
    let url = setup.url();
    let host = Store::connect(&url).await.expect("host store");
    let body = async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let store = Store::connect(&url).await.expect("worker store");
        let worker = Worker::builder(&store)
            .runtime_id("idle-w")
            .queues(["idle"])
            .concurrency(1)
            .lease(Duration::from_secs(5))
            .heartbeat(Duration::from_secs(1))
            .handle_signals(false)
            .build(move |ctx| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(ctx.run_id().to_string());
                    Ok(Done::default())
                }
            })
            .expect("worker");
        let token = worker.shutdown_token();
        let task = tokio::spawn(worker.run());

        // Warm up: the worker claims a run, then blocks in its idle wait.
        host.create_run(&NewRun::new("before", "agent").queue("idle")).await.expect("create");
        let first = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("first run claimed");
        assert_eq!(first.as_deref(), Some("before"));
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let mut latencies = Vec::new();
        for (phase, how) in ["planned", "killed"].into_iter().enumerate() {
            let old = tokio::task::block_in_place(|| setup.master_port()).expect("master");
            let switched = Instant::now();
            if how == "planned" {
                tokio::task::block_in_place(|| setup.failover()).expect("SENTINEL FAILOVER");
            } else {
                tokio::task::block_in_place(|| setup.kill(old)).expect("kill -9 the master");
            }
            let new = tokio::task::block_in_place(|| setup.wait_new_master(old, Duration::from_secs(60)))
                .unwrap_or_else(|e| panic!("{how}: no new master: {e}\n{}", setup.logs()));
            let promoted = switched.elapsed();
            if how == "killed" {
                tokio::task::block_in_place(|| setup.restart_as_replica(old, new)).expect("restart the old master");
            }
            tokio::task::block_in_place(|| setup.wait_ready(Duration::from_secs(60)))
                .unwrap_or_else(|e| panic!("{how}: setup not whole again: {e}"));
            // Enqueued on the new master: the worker, idle all along, must take it.
            let run_id = format!("after-{phase}");
            let enqueued = Instant::now();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match host.create_run(&NewRun::new(&run_id, "agent").queue("idle")).await {
                    Ok(_) => break,
                    Err(e) => {
                        assert!(Instant::now() < deadline, "{how}: enqueue not acknowledged in 60 s: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            let got = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{how}: the idle worker did not claim {run_id} within 60 s of its enqueue"));
            assert_eq!(got.as_deref(), Some(run_id.as_str()), "{how}");
            latencies.push((how, promoted, enqueued.elapsed()));
        }
        token.cancel();
        let report = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("hang guard: the worker never stopped")
            .expect("worker task panicked")
            .expect("the worker ran through both failovers");
        assert_eq!(report.completed, 3, "{report:?}");
        for (how, promoted, claimed) in latencies {
            eprintln!(
                "sentinel idle worker, {how} switch: new master named after {promoted:.1?}; the next run was \
                 handled {claimed:.1?} after its enqueue was sent"
            );
        }
    };
    tokio::time::timeout(Duration::from_secs(400), body).await.expect("hang guard: the test took over 400 s");
}

// 3. A planned switch (`SENTINEL FAILOVER`) under load: no handler sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)]
async fn a_planned_switch_surfaces_no_error_to_the_handler() {
    const N: usize = 1000;
    let _turn = turn();
    let setup = start_setup();
    let url = setup.url();
    let host = Store::connect(&url).await.expect("host store");
    let body = async {
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let acks: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let mut workers = Vec::new();
        for w in 0..2 {
            let store = Store::connect(&url).await.expect("worker store");
            let (errors, acks) = (errors.clone(), acks.clone());
            let worker = Worker::builder(&store)
                .runtime_id(format!("pl-w{w}"))
                .queues(["planned"])
                .concurrency(4)
                .lease(Duration::from_secs(5))
                .heartbeat(Duration::from_secs(1))
                .reap_every(Some(Duration::from_secs(1)))
                .handle_signals(false)
                .build(move |ctx| {
                    let (errors, acks) = (errors.clone(), acks.clone());
                    async move {
                        for n in 1..=3 {
                            match ctx.emit("step", json!({ "n": n })).await {
                                Ok(_) => lock(&acks).push(Instant::now()),
                                Err(e) => {
                                    lock(&errors).push(format!("{} step {n}: {e}", ctx.run_id()));
                                    return Err(e.into());
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Ok(Done::default())
                    }
                })
                .expect("worker");
            let token = worker.shutdown_token();
            workers.push((token, tokio::spawn(worker.run())));
        }
        let runs: Vec<NewRun> = (0..N).map(|n| NewRun::new(format!("p-{n}"), "agent").queue("planned")).collect();
        host.create_runs(&runs).await.expect("enqueue");
        let deadline = Instant::now() + Duration::from_secs(120);
        while completed(&host, &["planned"]).await < (N / 4) as i64 {
            assert!(Instant::now() < deadline, "hang guard: workers did not get going");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let old = tokio::task::block_in_place(|| setup.master_port()).expect("master");
        let switched = Instant::now();
        tokio::task::block_in_place(|| setup.failover()).expect("SENTINEL FAILOVER");
        let new = tokio::task::block_in_place(|| setup.wait_new_master(old, Duration::from_secs(60)))
            .unwrap_or_else(|e| panic!("no new master: {e}\n{}", setup.logs()));
        let promoted = switched.elapsed();

        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            // Retried: the host's own reads may meet the switch.
            let done = completed(&host, &["planned"]).await;
            if done >= N as i64 {
                break;
            }
            assert!(Instant::now() < deadline, "only {done} of {N} runs completed after the switch");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut reports = Vec::new();
        for (w, (token, task)) in workers.into_iter().enumerate() {
            token.cancel();
            let ended =
                tokio::time::timeout(Duration::from_secs(30), task).await.expect("hang guard: a worker never stopped");
            reports.push(ended.expect("worker task panicked").unwrap_or_else(|e| panic!("worker {w} failed: {e}")));
        }
        let errors = lock(&errors).clone();
        assert!(errors.is_empty(), "handlers saw errors across the planned switch: {errors:?}");
        let failed: u64 = reports.iter().map(|r| r.failed).sum();
        assert_eq!(failed, 0, "no run failed: {reports:?}");
        for n in 0..N {
            let run = host.get_run(&format!("p-{n}")).await.expect("run");
            assert_eq!(run.status, RunStatus::Completed, "p-{n}");
        }
        let gap = longest_pause(&lock(&acks), switched, promoted);
        let again: u64 = reports.iter().map(|r| r.claimed).sum::<u64>().saturating_sub(N as u64);
        eprintln!(
            "sentinel planned switch: 127.0.0.1:{old} -> 127.0.0.1:{new} in {promoted:.1?}; longest pause between \
             acknowledged writes {gap:.1?}; {again} extra claims (runs run again)"
        );
    };
    tokio::time::timeout(Duration::from_secs(500), body).await.expect("hang guard: the test took over 500 s");
}

// 4. `runledger demo --sentinel` starts its own Sentinel setup and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)]
async fn the_demo_runs_on_sentinel() {
    let _turn = turn();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_runledger"));
    cmd.env_remove("REDIS_URL").env_remove("RUNLEDGER_PREFIX").env_remove("REDIS_SENTINEL_MASTER");
    cmd.args(["--json", "demo", "--sentinel", "--runs", "60", "--workers", "3", "--concurrency", "2"])
        .args(["--work-ms", "30", "--lease", "1", "--timeout", "120"])
        .stdin(Stdio::null())
        // The demo stops its Sentinel setup as it exits; a hung one is killed with the test.
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("hang guard: demo --sentinel ran over 300 s")
        .expect("run runledger demo --sentinel");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo --sentinel failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert!(stderr.contains("Sentinel"), "demo did not start a Sentinel setup:\n{stderr}");
    let summary: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("demo --json is not JSON ({e}):\n{stdout}"));
    assert_eq!(summary["check_ok"], json!(true), "{summary}");
    assert!(summary["redis"].as_str().is_some_and(|u| u.starts_with("redis+sentinel://")), "{summary}");
}

/// Runs a Worker on `queue` until every run of `ids` (created here, retried
/// while a switch is under way) is completed; the worker keeps running.
async fn enqueue_and_wait(host: &Store, queue: &str, ids: &[String], what: &str) {
    for id in ids {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match host.create_run(&NewRun::new(id, "agent").queue(queue)).await {
                Ok(_) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "{what}: enqueue of {id} not acknowledged in 60 s: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    for id in ids {
        loop {
            if let Ok(run) = host.get_run(id).await
                && run.status == RunStatus::Completed
            {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: {id} was not completed within 90 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A Worker on `queue` that emits one event per run; its shutdown token and task.
fn spawn_worker(
    store: &Store,
    queue: &str,
    runtime: &str,
) -> (tokio_util::sync::CancellationToken, tokio::task::JoinHandle<Result<WorkerReport>>) {
    let worker = Worker::builder(store)
        .runtime_id(runtime)
        .queues([queue])
        .concurrency(2)
        .lease(Duration::from_secs(10))
        .heartbeat(Duration::from_secs(1))
        // A tenant has no CONFIG GET: nothing to check, and no ACL LOG entry.
        .check_settings(false)
        .handle_signals(false)
        .build(|ctx| async move {
            ctx.emit("step", json!({ "run": ctx.run_id() })).await?;
            Ok(Done::default())
        })
        .expect("worker");
    let token = worker.shutdown_token();
    (token, tokio::spawn(worker.run()))
}

async fn stop_worker(
    token: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<WorkerReport>>,
) -> WorkerReport {
    token.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("hang guard: the worker never stopped")
        .expect("worker task panicked")
        .expect("the worker ran through the switch")
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// `(major, minor)` of the redis-server on PATH (`redis-server --version`).
fn server_version() -> (u32, u32) {
    let binary = runledger::embedded::find_redis_server().expect("redis-server on PATH");
    let out = std::process::Command::new(binary).arg("--version").output().expect("redis-server --version");
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split_whitespace().find_map(|w| w.strip_prefix("v=")).expect("v=... in redis-server --version");
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

// 5. The README's tenant ACL user on the data nodes (plus `+role`, which
// the README adds under Sentinel), the sentinels behind a password of their
// own: the store and a Worker work as that user through the sentinels,
// across a planned switch, and are refused what the ACL denies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)]
async fn an_acl_user_works_through_the_sentinels_and_is_refused_the_rest() {
    let _turn = turn();
    let line = crate::acl::readme_acl_lines().into_iter().next().expect("the README's tenant line");
    let mut rules = line.strip_prefix("ACL SETUSER ").expect("ACL SETUSER ...").replace(">CHANGE-ME", ">tenant-pw");
    rules.push_str(" +role");
    if server_version() >= (7, 2) {
        rules.push_str(" +client|setinfo");
    }
    let options = runledger::embedded_sentinel::SentinelOptions {
        data_password: Some("admin-pw".into()),
        acl_users: vec![rules],
        sentinel_password: Some("sentinel-pw".into()),
        ..Default::default()
    };
    let setup = tokio::task::block_in_place(|| RedisSentinel::start_with_options(options))
        .unwrap_or_else(|e| panic!("start the Sentinel setup with ACL users: {e}"));
    let url = setup.url_as("runledger", "tenant-pw");
    assert!(url.contains("sentinel_password=") && url.contains("runledger:tenant%2Dpw@"), "{url}");
    tokio::time::timeout(Duration::from_secs(400), async {
        let host = Store::connect(&url).await.expect("connect as the tenant through the sentinels");
        let worker_store = Store::connect(&url).await.expect("worker store");
        let (token, task) = spawn_worker(&worker_store, "acl", "acl-w");
        enqueue_and_wait(&host, "acl", &ids("acl-before", 4), "before the switch").await;

        let old = tokio::task::block_in_place(|| setup.master_port()).expect("master");
        tokio::task::block_in_place(|| setup.failover()).expect("SENTINEL FAILOVER");
        let new = tokio::task::block_in_place(|| setup.wait_new_master(old, Duration::from_secs(60)))
            .unwrap_or_else(|e| panic!("no new master: {e}\n{}", setup.logs()));
        // Until the sentinels demote the old master it still takes writes
        // (see the README on +switch-master): the runs after the switch are
        // enqueued once it is a replica.
        tokio::task::block_in_place(|| setup.wait_ready(Duration::from_secs(60)))
            .unwrap_or_else(|e| panic!("setup not whole again: {e}"));
        // ACL is not replicated: the new master has the user from its own config.
        enqueue_and_wait(&host, "acl", &ids("acl-after", 4), "after the switch").await;
        let report = stop_worker(token, task).await;
        assert_eq!(report.failed, 0, "{report:?}");
        assert_eq!(host.sentinel_master_addr(), Some(format!("127.0.0.1:{new}")));

        // Refused: keys outside the tenant's prefix.
        let other = Store::connect_with(&url, StoreConfig { prefix: "other".into(), ..Default::default() })
            .await
            .expect("connecting needs no key");
        let err = other.create_run(&NewRun::new("x", "agent").queue("q")).await.expect_err("another prefix");
        assert!(format!("{err:?} {err}").to_lowercase().contains("noperm"), "refused by the ACL: {err:?}");
        // Refused: server-wide commands, as that user on the master itself.
        let tenant = redis::Client::open(format!("redis://runledger:tenant-pw@127.0.0.1:{new}/")).expect("client");
        let mut conn = tenant.get_multiplexed_async_connection().await.expect("tenant connection to the master");
        for cmd in [redis::cmd("CONFIG").arg("GET").arg("requirepass").clone(), redis::cmd("FLUSHALL")] {
            let refused: redis::RedisResult<redis::Value> = cmd.query_async(&mut conn).await;
            let e = refused.expect_err("the tenant ACL refuses it");
            assert_eq!(e.code(), Some("NOPERM"), "{e}");
        }

        // The sentinels' password is needed, and the tenant's must be right.
        let without = url.split('?').next().expect("url").to_string();
        let refused = Store::connect(&without).await.err().expect("sentinels without their password refuse");
        assert!(!refused.is_transient(), "a refusal, not an outage to wait out: {refused:?}");
        // The URL is percent-encoded (`-` is `%2D`).
        let wrong = url.replace("tenant%2Dpw", "wrong%2Dpw");
        assert_ne!(wrong, url);
        let refused = Store::connect(&wrong).await.err().expect("a wrong tenant password is refused");
        let shown = format!("{refused:?} {refused}");
        assert!(!shown.contains("wrong-pw") && !shown.contains("wrong%2Dpw"), "no password in the error: {shown}");
    })
    .await
    .expect("hang guard: the test took over 400 s");
}

// 6. TLS everywhere (`rediss+sentinel://`): master, replicas and sentinels
// on TLS ports only, with replication and the sentinels' links over TLS, a
// private CA trusted with `tls_ca_file`; across a planned switch. A
// redis-server built without TLS fails here (the setup does not come up),
// as tests/it/tls.rs does: never a skip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)]
async fn rediss_sentinel_with_a_private_ca() {
    let _turn = turn();
    let dir = tempfile::Builder::new().prefix("runledger-sentinel-tls-").tempdir().expect("temp dir");
    let (ca_pem, ca) = crate::tls::new_ca("runledger sentinel test CA");
    let (cert_pem, key_pem) = crate::tls::server_cert(&ca);
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write a certificate file");
        path
    };
    let tls = runledger::embedded_sentinel::TlsFiles {
        ca_file: write("ca.pem", &ca_pem),
        cert_file: write("server.pem", &cert_pem),
        key_file: write("server.key", &key_pem),
    };
    let ca_file = tls.ca_file.clone();
    let options = runledger::embedded_sentinel::SentinelOptions { tls: Some(tls), ..Default::default() };
    let setup = tokio::task::block_in_place(|| RedisSentinel::start_with_options(options)).unwrap_or_else(|e| {
        panic!("start the Sentinel setup on TLS (a redis-server built without TLS, BUILD_TLS=yes, fails here): {e}")
    });
    let url = setup.url();
    assert!(url.starts_with("rediss+sentinel://"), "{url}");
    tokio::time::timeout(Duration::from_secs(400), async {
        let cfg = || StoreConfig { tls_ca_file: Some(ca_file.clone()), ..Default::default() };
        let host = Store::connect_with(&url, cfg()).await.expect("rediss+sentinel:// with the CA");
        let worker_store = Store::connect_with(&url, cfg()).await.expect("worker store");
        let (token, task) = spawn_worker(&worker_store, "tls", "tls-w");
        enqueue_and_wait(&host, "tls", &ids("tls-before", 4), "before the switch").await;
        let old = tokio::task::block_in_place(|| setup.master_port()).expect("master");
        tokio::task::block_in_place(|| setup.failover()).expect("SENTINEL FAILOVER");
        let new = tokio::task::block_in_place(|| setup.wait_new_master(old, Duration::from_secs(60)))
            .unwrap_or_else(|e| panic!("no new master over TLS: {e}\n{}", setup.logs()));
        // The old master is demoted (over TLS too) before the next runs go in.
        tokio::task::block_in_place(|| setup.wait_ready(Duration::from_secs(60)))
            .unwrap_or_else(|e| panic!("setup not whole again over TLS: {e}\n{}", setup.logs()));
        enqueue_and_wait(&host, "tls", &ids("tls-after", 4), "after the switch").await;
        let report = stop_worker(token, task).await;
        assert_eq!(report.failed, 0, "{report:?}");
        assert_eq!(host.sentinel_master_addr(), Some(format!("127.0.0.1:{new}")));

        // Really verified: without the CA the sentinels' certificate is refused.
        let refused = Store::connect(&url).await.err().expect("rediss+sentinel:// without the CA must fail");
        assert!(format!("{refused:?}").to_lowercase().contains("certificate"), "{refused:?}");
        // And nothing answers in plain text.
        let plain = url.replacen("rediss+sentinel://", "redis+sentinel://", 1);
        assert!(Store::connect(&plain).await.is_err(), "plain text to TLS-only sentinels must fail");
    })
    .await
    .expect("hang guard: the test took over 400 s");
}

// 7. Why no `+switch-master` subscription is needed for a planned switch:
// the sentinels disconnect the demoted master's clients, so even a store
// that only reads (which a replica would serve without complaint) finds
// the new master on its next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)]
async fn a_store_that_only_reads_follows_a_planned_switch() {
    let _turn = turn();
    let setup = start_setup();
    tokio::time::timeout(Duration::from_secs(200), async {
        let writer = Store::connect(&setup.url()).await.expect("writer");
        writer.create_run(&NewRun::new("read-me", "agent").queue("r")).await.expect("create");
        let reader = Store::connect(&setup.url()).await.expect("reader");
        assert_eq!(reader.get_run("read-me").await.expect("read").status, RunStatus::Queued);
        let old = tokio::task::block_in_place(|| setup.master_port()).expect("master");
        tokio::task::block_in_place(|| setup.failover()).expect("SENTINEL FAILOVER");
        let new = tokio::task::block_in_place(|| setup.wait_new_master(old, Duration::from_secs(60)))
            .unwrap_or_else(|e| panic!("no new master: {e}\n{}", setup.logs()));
        let want = format!("127.0.0.1:{new}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Reads only: nothing here answers READONLY.
            let _ = reader.get_run("read-me").await;
            if reader.sentinel_master_addr().as_deref() == Some(want.as_str()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the reading store still uses {:?}, not the new master {want}",
                reader.sentinel_master_addr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("hang guard: the test took over 200 s");
}

// 8. No password of a Sentinel URL (the data nodes' nor the sentinels') in
// what the CLI prints when it cannot connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_no_password_of_a_sentinel_url() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let url = format!("redis+sentinel://app:user-secret-1@127.0.0.1:{port}/mm?sentinel_password=sentinel-secret-2");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_runledger"));
    cmd.env_remove("REDIS_URL").env_remove("REDIS_SENTINEL_MASTER").env("RUST_LOG", "debug");
    cmd.args(["--redis", &url, "get", "x"]).stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("hang guard: the CLI ran over 60 s")
        .expect("run runledger");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "no sentinel listens there: {stderr}");
    for secret in ["user-secret-1", "sentinel-secret-2"] {
        assert!(!stderr.contains(secret) && !stdout.contains(secret), "{secret} printed:\n{stdout}\n{stderr}");
    }
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "the error still names the sentinels: {stderr}");
}
