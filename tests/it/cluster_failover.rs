//! Failover: a master of a 6-node cluster is killed (SIGKILL) while workers
//! run 2,000 runs with the write concern on (every write waits for a
//! replica). Its replica takes over; hosts and workers carry on without a
//! restart, and at the end every acknowledged enqueue and event is there and
//! every run ended exactly once with its complete event stream.
//!
//! This test starts a cluster of its own (not the suite's shared one): it
//! kills one of its nodes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runledger::embedded_cluster::RedisCluster;
use runledger::*;
use serde_json::json;

const RUNS: usize = 2000;
const QUEUES: [&str; 6] = ["fa", "fb", "fc", "fd", "fe", "ff"];

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn config() -> StoreConfig {
    StoreConfig { wait_replicas: 1, replica_timeout: Duration::from_millis(500), ..Default::default() }
}

async fn completed(store: &Store) -> i64 {
    let mut n = 0;
    for q in QUEUES {
        if let Ok(stats) = store.queue_stats(q, 0).await {
            n += stats.counters.get("completed").copied().unwrap_or(0);
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_master_mid_workload_loses_nothing_acknowledged() {
    let mut cluster = RedisCluster::start().expect("start a 6-node cluster");
    let url = cluster.url();
    let host = Store::connect_with(&url, config()).await.expect("host store");
    assert!(host.is_cluster());

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
                        NewRun::new(format!("f-{n}"), "agent").queue(QUEUES[n % QUEUES.len()]).priority((n % 3) as i64)
                    })
                    .collect();
                let deadline = Instant::now() + Duration::from_secs(60);
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
                                "hang guard: batch {batch} not acknowledged within 60 s: {e}"
                            );
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            failures
        })
    };

    // Workers: three of them, each handler emits 3 events and finishes.
    let handled: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    // Every event whose append was acknowledged: (run, sequence) -> step.
    let acked_events: Arc<Mutex<HashMap<(String, i64), i64>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..3 {
        let store = Store::connect_with(&url, config()).await.expect("worker store");
        let handled = handled.clone();
        let acked_events = acked_events.clone();
        let worker = Worker::builder(&store)
            .runtime_id(format!("fo-w{w}"))
            .queues(QUEUES)
            .concurrency(6)
            .lease(Duration::from_secs(5))
            .heartbeat(Duration::from_secs(1))
            .reap_every(Some(Duration::from_secs(1)))
            .handle_signals(false)
            .build(move |ctx| {
                let handled = handled.clone();
                let acked_events = acked_events.clone();
                async move {
                    *lock(&handled).entry(ctx.run_id().to_string()).or_default() += 1;
                    for n in 1..=3 {
                        let event = ctx.emit("step", json!({ "n": n })).await?;
                        lock(&acked_events).insert((ctx.run_id().to_string(), event.sequence), n);
                    }
                    Ok(Done::default())
                }
            })
            .expect("worker");
        let token = worker.shutdown_token();
        workers.push((token, tokio::spawn(worker.run())));
    }

    // Kill the master of the first queue once a quarter of the runs are done.
    let deadline = Instant::now() + Duration::from_secs(120);
    while completed(&host).await < (RUNS / 4) as i64 {
        assert!(Instant::now() < deadline, "hang guard: workers did not get going");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victim = cluster.master_of_slot(key_slot(QUEUES[0])).expect("master of the queue's slot");
    let masters_before = cluster.master_ports().expect("masters");
    cluster.kill(victim).expect("kill -9 the master");
    cluster.wait_ok(Duration::from_secs(30)).expect("a replica takes over");
    let masters_after = cluster.master_ports().expect("masters");
    assert!(!masters_after.contains(&victim), "the killed node is no master");
    assert_eq!(masters_after.len(), masters_before.len());
    // The old master comes back as a replica, so the write concern can be met again.
    cluster.restart_node(victim).expect("restart the old master");
    cluster.wait_replicas_up(Duration::from_secs(30)).expect("replicas linked");

    let failures = enqueuer.await.expect("enqueuer task");
    let deadline = Instant::now() + Duration::from_secs(180);
    while completed(&host).await < RUNS as i64 {
        if Instant::now() > deadline {
            let mut stuck = Vec::new();
            for n in 0..RUNS {
                match host.get_run(&format!("f-{n}")).await {
                    Ok(run) if run.status == RunStatus::Completed => {}
                    Ok(run) => stuck.push(format!(
                        "{} {} attempts {} holder {:?} reason {:?}",
                        run.run_id, run.status, run.dispatch_attempts, run.claimed_by_runtime_id, run.status_reason
                    )),
                    Err(e) => stuck.push(format!("f-{n}: {e}")),
                }
            }
            panic!("only {} of {RUNS} runs completed 180 s after the failover: {stuck:?}", completed(&host).await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (w, (token, task)) in workers.into_iter().enumerate() {
        token.cancel();
        let ended =
            tokio::time::timeout(Duration::from_secs(30), task).await.expect("hang guard: a worker never stopped");
        let report = ended.expect("worker task panicked");
        report.unwrap_or_else(|e| panic!("worker {w} failed during the failover: {e}"));
    }

    let acked = lock(&acked).clone();
    assert_eq!(acked.len(), RUNS, "every batch was acknowledged in the end");
    for run_id in &acked {
        let run = host.get_run(run_id).await.unwrap_or_else(|e| panic!("acknowledged run {run_id} is missing: {e}"));
        assert_eq!(run.status, RunStatus::Completed, "{run_id}");
        let page = host.page_run_events(run_id, None, None, 100, Direction::Forward).await.expect("events");
        let seqs: Vec<i64> = page.items.iter().map(|e| e.sequence).collect();
        // A handler that ran again (at-least-once) continues the stream: no gap, no duplicate,
        // and the run that completed left all three of its events at the end.
        assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "{run_id}: no gap, no duplicate");
        let steps: Vec<i64> = page.items.iter().filter_map(|e| e.data["n"].as_i64()).collect();
        assert!(steps.ends_with(&[1, 2, 3]), "{run_id}: the completing handler's events are all there: {steps:?}");
    }
    // Every acknowledged event survived the failover, with its content.
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
            assert_eq!(stored.get(&seq), Some(&n), "{run_id}: acknowledged event {seq} (step {n}) is lost or changed");
        }
    }
    // Each run finished exactly once: one completion counted per run.
    assert_eq!(completed(&host).await, RUNS as i64, "one completion per run");
    let handled = lock(&handled);
    let again = handled.values().filter(|&&n| n > 1).count();
    eprintln!(
        "failover: killed master {victim}; {failures} enqueue retries; {again} runs handled more than once (at-least-once)"
    );
}

/// The cluster slot of a queue's keys (`{Q}` hash tag): CRC16/XMODEM mod 16384.
fn key_slot(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for byte in tag.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}
