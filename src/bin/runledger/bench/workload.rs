//! The bench's workload, the same for every part: runs with ~200 bytes of
//! metadata and a random priority, enqueued one at a time or in batches,
//! then claimed, given 3 events and finished by the library's Worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngExt;
use runledger::{Done, Error, NewRun, Result, Store, Worker};
use serde_json::json;

use super::METADATA_PAD;

/// How many runner ids the bench's runs spread over (`--runners`), and
/// whether its lifecycle workers claim with a filter naming them all
/// (`--runner-filter`). Set once, before the first phase.
static RUNNERS: AtomicUsize = AtomicUsize::new(1);
static RUNNER_FILTER: AtomicBool = AtomicBool::new(false);

/// The runner id of run number i: `bench-agent`, or with `--runners N`
/// `bench-agent-<i mod N>`.
pub(crate) fn bench_runner(i: usize) -> String {
    match RUNNERS.load(Ordering::Relaxed) {
        0 | 1 => "bench-agent".to_string(),
        n => format!("bench-agent-{}", i % n),
    }
}

fn bench_run(i: usize, queue: &str) -> NewRun {
    // ~200 bytes of metadata, as in the peers' workload.
    NewRun::new(uuid::Uuid::new_v4().to_string(), bench_runner(i))
        .queue(queue)
        .priority(rand::rng().random_range(0..10))
        .metadata(json!({ "n": i, "user": "bench", "text": &METADATA_PAD[..150] }))
}

/// How many runner ids the runs spread over.
pub(crate) fn runner_count() -> usize {
    RUNNERS.load(Ordering::Relaxed).max(1)
}

/// Spreads the runs made from now on over `runners` runner ids, and makes the
/// lifecycle's workers claim with a filter naming them all when `filter`.
pub(crate) fn spread_over_runners(runners: usize, filter: bool) {
    RUNNERS.store(runners.max(1), Ordering::Relaxed);
    RUNNER_FILTER.store(filter, Ordering::Relaxed);
}

/// XLEN by way of XINFO STREAM (0 when the stream does not exist yet).
async fn stream_length(conn: &mut runledger::store::Conn, key: &str) -> Result<i64> {
    let info: redis::Value = match redis::cmd("XINFO").arg("STREAM").arg(key).query_async(conn).await {
        Ok(info) => info,
        Err(e) if e.detail().is_some_and(|d| d.contains("no such key")) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let pairs: Vec<(redis::Value, redis::Value)> = match info {
        redis::Value::Map(pairs) => pairs,
        redis::Value::Array(items) => {
            let mut it = items.into_iter();
            std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect()
        }
        other => return Err(Error::Protocol(format!("XINFO STREAM {key}: {other:?}"))),
    };
    for (name, value) in pairs {
        if redis::from_redis_value::<String>(name).ok().as_deref() == Some("length") {
            return redis::from_redis_value::<i64>(value).map_err(|e| Error::Protocol(format!("XINFO length: {e}")));
        }
    }
    Err(Error::Protocol(format!("XINFO STREAM {key} gave no length")))
}

async fn wait_finished(store: &Store, queue: &str, n: i64, timeout: Duration) -> Result<()> {
    // One XINFO STREAM per partition and poll: no script of a lifecycle sends
    // it, so commands_between can leave the monitor out of the counts exactly.
    let keys: Vec<String> = store.partitions(queue).await?.iter().map(|q| store.queue_keys(q).finished()).collect();
    let mut conn = store.conn().await?;
    let start = Instant::now();
    loop {
        let mut finished = 0;
        for key in &keys {
            finished += stream_length(&mut conn, key).await?;
        }
        if finished >= n {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(Error::Server(format!("bench: only {finished} of {n} runs finished in {queue}")));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Enqueues n runs one call at a time; returns the time spent in the calls.
pub(crate) async fn enqueue_single(store: &Store, queue: &str, n: usize) -> Result<Duration> {
    let mut spent = Duration::ZERO;
    for i in 0..n {
        let run = bench_run(i, queue);
        let start = Instant::now();
        store.create_run(&run).await?;
        spent += start.elapsed();
    }
    Ok(spent)
}

/// Enqueues n runs in batches of 1000; returns the time spent in the enqueue
/// calls (making the runs is the load generator's work, not the queue's).
pub(crate) async fn enqueue_batched(store: &Store, queue: &str, n: usize) -> Result<Duration> {
    let mut spent = Duration::ZERO;
    let mut i = 0;
    while i < n {
        let batch: Vec<NewRun> = (i..(i + 1000).min(n)).map(|k| bench_run(k, queue)).collect();
        let start = Instant::now();
        store.create_runs(&batch).await?;
        spent += start.elapsed();
        i += batch.len();
    }
    Ok(spent)
}

/// The lifecycle: W workers each claim, append 3 events (one round trip), finish.
pub(crate) async fn lifecycle(store: &Store, queue: &str, workers: usize, n: usize) -> Result<Duration> {
    let mut tokens = Vec::new();
    let mut handles = Vec::new();
    let start = Instant::now();
    for w in 0..workers {
        let mut builder = Worker::builder(store);
        if RUNNER_FILTER.load(Ordering::Relaxed) {
            for i in 0..RUNNERS.load(Ordering::Relaxed).max(1) {
                builder = builder.runner(bench_runner(i));
            }
        }
        let worker = builder
            .runtime_id(format!("bench-{w}-{}", std::process::id()))
            .queue(queue)
            .concurrency(1)
            .lease(Duration::from_secs(30))
            .handle_signals(false)
            .check_settings(false)
            .reap_every(None)
            .build(|ctx| async move {
                let pad = &METADATA_PAD[..70];
                ctx.emit_many(vec![
                    ("progress".into(), json!({ "step": 1, "text": pad })),
                    ("progress".into(), json!({ "step": 2, "text": pad })),
                    ("result".into(), json!({ "step": 3, "text": pad })),
                ])
                .await?;
                Ok(Done::default())
            })?;
        tokens.push(worker.shutdown_token());
        handles.push(tokio::spawn(worker.run()));
    }
    wait_finished(store, queue, n as i64, Duration::from_secs(600)).await?;
    let elapsed = start.elapsed();
    for t in tokens {
        t.cancel();
    }
    for h in handles {
        let _ = h.await;
    }
    Ok(elapsed)
}

pub(crate) async fn idle_latency(store: &Store, queue: &str, samples: usize, workers: usize) -> Result<Vec<f64>> {
    let entered: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let mut tokens = Vec::new();
    let mut handles = Vec::new();
    for w in 0..workers {
        let entered = entered.clone();
        let worker = Worker::builder(store)
            .runtime_id(format!("bench-idle-{w}-{}", std::process::id()))
            .queue(queue)
            .handle_signals(false)
            .check_settings(false)
            .reap_every(None)
            .build(move |ctx| {
                let at = Instant::now();
                if let Ok(mut m) = entered.lock() {
                    m.insert(ctx.run.run_id.clone(), at);
                }
                async move { Ok(Done::default()) }
            })?;
        tokens.push(worker.shutdown_token());
        handles.push(tokio::spawn(worker.run()));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sent = Vec::with_capacity(samples);
    for i in 0..samples {
        let run = bench_run(i, queue);
        let at = Instant::now();
        store.create_run(&run).await?;
        sent.push((run.run_id, at));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    wait_finished(store, queue, samples as i64, Duration::from_secs(60)).await?;
    for t in tokens {
        t.cancel();
    }
    for h in handles {
        let _ = h.await;
    }
    let entered = entered.lock().map_err(|_| Error::Protocol("latency map poisoned".into()))?;
    let mut out: Vec<f64> = sent
        .iter()
        .filter_map(|(id, at)| entered.get(id).map(|e| e.duration_since(*at).as_secs_f64() * 1000.0))
        .collect();
    out.sort_by(|a, b| a.total_cmp(b));
    Ok(out)
}

/// Deletes every key under `prefix` (SCAN + UNLINK); returns how many.
pub(crate) async fn remove_prefix(store: &Store, prefix: &str) -> Result<u64> {
    let mut pattern: String = prefix
        .chars()
        .flat_map(|c| if matches!(c, '*' | '?' | '[' | ']' | '\\') { vec!['\\', c] } else { vec![c] })
        .collect();
    pattern.push_str(":*");
    let mut conn = store.conn().await?;
    let (mut cursor, mut removed) = (0u64, 0u64);
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await?;
            removed += n;
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}
