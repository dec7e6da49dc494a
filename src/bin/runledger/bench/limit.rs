//! The yardsticks the bench measures runledger against, on the same server
//! in the same run: the time of one round trip, and the cost of the minimal
//! Redis commands of an enqueue and of a lifecycle sent raw in pipelines (no
//! script, no check, no index): the physical limit of one Redis core for this
//! workload. `--check` states its targets as ratios to these, so a figure is
//! never judged against a number from another machine or another day.

use std::time::Instant;

use runledger::{Result, Store};
use serde::Serialize;

use super::METADATA_PAD;
use super::probe::{Probe, per_run};
use crate::measure::percentile;

/// The queue whose key names the raw commands use (never registered as a queue).
pub const LIMIT_QUEUE: &str = "bench-limit";

/// Runs per pipeline of the raw phases.
const PIPELINE_RUNS: usize = 100;

/// The commands of one minimal lifecycle (see [`limit`]).
pub const LIMIT_COMMANDS: f64 = 10.0;

#[derive(Serialize, Default, Clone, Debug)]
pub struct Limit {
    /// One PING on one connection, in microseconds: median and 99th percentile.
    pub round_trip_us_p50: f64,
    pub round_trip_us_p99: f64,
    /// The minimal enqueue (HSET of the run's fields, ZADD to the queue), one
    /// round trip per run, one after the other.
    pub enqueue_one_per_s: f64,
    /// The same, pipelined.
    pub enqueue_per_s: f64,
    pub enqueue_redis_cpu_us_per_run: Option<f64>,
    pub memory_per_queued_run: Option<f64>,
    /// The minimal lifecycle (see [`limit`]), pipelined.
    pub lifecycle_per_s: f64,
    pub lifecycle_commands: f64,
    pub lifecycle_redis_cpu_us: Option<f64>,
    pub memory_per_finished_run: Option<f64>,
    /// (workers, runs/s) of the minimal lifecycle in two round trips per run
    /// (see [`two_trip_lifecycle`]).
    pub two_trip_lifecycle_per_s: Vec<(usize, f64)>,
}

/// Adds the minimal enqueue of run `id` (number `n`) to `pipe`.
fn enqueue_commands(pipe: &mut redis::Pipeline, keys: &runledger::keys::QueueKeys, id: &str, n: i64, now: i64) {
    let metadata = format!(r#"{{"n":{n},"text":"{}","user":"bench"}}"#, &METADATA_PAD[..150]);
    pipe.cmd("HSET")
        .arg(keys.run(id))
        .arg(&["run_id", id, "runner_id", "bench-agent", "queue_name", LIMIT_QUEUE, "status", "queued"])
        .arg(&["priority", "5", "dispatch_attempts", "0", "metadata", &metadata])
        .arg("id")
        .arg(n)
        .arg("created_at")
        .arg(now)
        .arg("updated_at")
        .arg(now)
        .ignore();
    pipe.cmd("ZADD").arg(keys.queued()).arg(n).arg(id).ignore();
}

/// Adds the claim part of the minimal lifecycle of run `id` to `pipe`.
fn claim_commands(pipe: &mut redis::Pipeline, keys: &runledger::keys::QueueKeys, id: &str, now: i64) {
    let expires = now + 30_000;
    pipe.cmd("ZRANGE").arg(keys.queued()).arg(0).arg(0).ignore();
    pipe.cmd("ZREM").arg(keys.queued()).arg(id).ignore();
    pipe.cmd("HSET")
        .arg(keys.run(id))
        .arg(&["status", "claimed", "claimed_by_runtime_id", "bench-limit", "claim_token"])
        .arg("0123456789abcdef0123456789abcdef")
        .arg("claim_lease_expires_at")
        .arg(expires)
        .arg(&["dispatch_attempts", "1", "updated_at"])
        .arg(now)
        .ignore();
    pipe.cmd("ZADD").arg(keys.leases()).arg(expires).arg(id).ignore();
}

/// Adds the events and finish part of the minimal lifecycle of run `id` to `pipe`.
fn finish_commands(pipe: &mut redis::Pipeline, keys: &runledger::keys::QueueKeys, id: &str, now: i64) {
    let event = format!(r#"{{"step":1,"text":"{}"}}"#, &METADATA_PAD[..70]);
    for seq in 1..=3 {
        pipe.cmd("XADD")
            .arg(keys.events(id))
            .arg(format!("{seq}-0"))
            .arg(&["type", "progress", "data", &event, "source", "runner", "created_at"])
            .arg(now)
            .ignore();
    }
    pipe.cmd("HSET")
        .arg(keys.run(id))
        .arg(&["status", "completed", "finished_at"])
        .arg(now)
        .arg("updated_at")
        .arg(now)
        .ignore();
    pipe.cmd("ZREM").arg(keys.leases()).arg(id).ignore();
    pipe.cmd("XADD").arg(keys.finished()).arg("*").arg("r").arg(id).ignore();
}

/// The minimal enqueue of `ids` (numbered in order), PIPELINE_RUNS runs per pipeline.
async fn enqueue_pipelined(
    conn: &mut runledger::store::Conn,
    keys: &runledger::keys::QueueKeys,
    ids: &[String],
    now: i64,
) -> Result<()> {
    for (chunk_no, chunk) in ids.chunks(PIPELINE_RUNS).enumerate() {
        let mut pipe = redis::pipe();
        for (i, id) in chunk.iter().enumerate() {
            enqueue_commands(&mut pipe, keys, id, (chunk_no * PIPELINE_RUNS + i) as i64, now);
        }
        let _: () = pipe.query_async(conn).await?;
    }
    Ok(())
}

/// The minimal lifecycle from `workers` concurrent callers, each run in two
/// round trips as runledger's Worker makes it (claim; events and finish):
/// runs per second. Runs are enqueued (unmeasured) first.
async fn two_trip_lifecycle(store: &Store, ids: &[String], workers: usize, now: i64) -> Result<f64> {
    let keys = store.queue_keys(LIMIT_QUEUE);
    let mut conn = store.conn().await?;
    enqueue_pipelined(&mut conn, &keys, ids, now).await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (store, keys) = (store.clone(), keys.clone());
        let mine: Vec<String> = ids.iter().skip(w).step_by(workers).cloned().collect();
        tasks.push(tokio::spawn(async move {
            let mut conn = store.conn().await?;
            for id in mine {
                let mut claim = redis::pipe();
                claim_commands(&mut claim, &keys, &id, now);
                let _: () = claim.query_async(&mut conn).await?;
                let mut finish = redis::pipe();
                finish_commands(&mut finish, &keys, &id, now);
                let _: () = finish.query_async(&mut conn).await?;
            }
            Ok::<_, runledger::Error>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| runledger::Error::Protocol(format!("bench limit task: {e}")))??;
    }
    Ok(ids.len() as f64 / start.elapsed().as_secs_f64())
}

/// Median and p99 of `samples` PINGs, one after the other on one connection, in us.
async fn round_trip(store: &Store, samples: usize) -> Result<(f64, f64)> {
    let mut conn = store.conn().await?;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((percentile(&times, 0.5), percentile(&times, 0.99)))
}

/// Measures the yardsticks with `runs` runs: the round trip, then the minimal
/// enqueue and the minimal lifecycle, pipelined; then the enqueue one round
/// trip at a time, and the lifecycle in two round trips per run from each
/// number of `workers`. The lifecycle's commands are those the
/// work itself needs, with the run ids known in advance:
/// claim `ZRANGE queued 0 0` and `ZREM queued` (the head, taken: ZPOPMIN is
/// not among the commands of the README's ACL user), `HSET run` (status, holder, token, lease,
/// attempts, updated_at), `ZADD leases`; three `XADD events`; finish `HSET
/// run` (status, finished_at, updated_at), `ZREM leases`, `XADD finished`.
/// Every key it wrote is deleted again before it returns.
pub async fn limit(store: &Store, probe: &Probe<'_>, runs: usize, workers: &[usize]) -> Result<Limit> {
    let (rtt_p50, rtt_p99) = round_trip(store, 1000).await?;
    let keys = store.queue_keys(LIMIT_QUEUE);
    let ids: Vec<String> = (0..runs).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let mut conn = store.conn().await?;
    let measured = async {
        let now = store.server_time_ms().await?;

        let before = probe.used_memory().await?;
        let cpu_before = probe.redis_cpu().await?;
        let start = Instant::now();
        enqueue_pipelined(&mut conn, &keys, &ids, now).await?;
        let enqueue_per_s = runs as f64 / start.elapsed().as_secs_f64();
        let enqueue_cpu = per_run(cpu_before, probe.redis_cpu().await?, 1e6, runs);
        let queued_memory = per_run(before, probe.used_memory().await?, 1.0, runs);

        let cpu_before = probe.redis_cpu().await?;
        let start = Instant::now();
        for chunk in ids.chunks(PIPELINE_RUNS) {
            let mut pipe = redis::pipe();
            for id in chunk {
                claim_commands(&mut pipe, &keys, id, now);
                finish_commands(&mut pipe, &keys, id, now);
            }
            let _: () = pipe.query_async(&mut conn).await?;
        }
        let lifecycle_per_s = runs as f64 / start.elapsed().as_secs_f64();
        let lifecycle_cpu = per_run(cpu_before, probe.redis_cpu().await?, 1e6, runs);
        let finished_memory = per_run(before, probe.used_memory().await?, 1.0, runs);
        remove(&mut conn, &keys, &ids).await?;

        // One enqueue per round trip, one after the other.
        let start = Instant::now();
        for (n, id) in ids.iter().enumerate() {
            let mut pipe = redis::pipe();
            enqueue_commands(&mut pipe, &keys, id, n as i64, now);
            let _: () = pipe.query_async(&mut conn).await?;
        }
        let enqueue_one_per_s = runs as f64 / start.elapsed().as_secs_f64();
        remove(&mut conn, &keys, &ids).await?;

        let mut two_trips = Vec::new();
        for &w in workers {
            two_trips.push((w, two_trip_lifecycle(store, &ids, w, now).await?));
            remove(&mut conn, &keys, &ids).await?;
        }
        Ok::<_, runledger::Error>(Limit {
            round_trip_us_p50: rtt_p50,
            round_trip_us_p99: rtt_p99,
            enqueue_one_per_s,
            enqueue_per_s,
            enqueue_redis_cpu_us_per_run: enqueue_cpu,
            memory_per_queued_run: queued_memory,
            lifecycle_per_s,
            lifecycle_commands: LIMIT_COMMANDS,
            lifecycle_redis_cpu_us: lifecycle_cpu,
            memory_per_finished_run: finished_memory,
            two_trip_lifecycle_per_s: two_trips,
        })
    }
    .await;
    // The raw keys go even when a step failed: they are no queue's runs.
    remove(&mut conn, &keys, &ids).await?;
    measured
}

/// Deletes the raw keys of `ids` and of the limit queue.
async fn remove(conn: &mut runledger::store::Conn, keys: &runledger::keys::QueueKeys, ids: &[String]) -> Result<()> {
    for chunk in ids.chunks(500) {
        let own: Vec<String> = chunk.iter().flat_map(|id| [keys.run(id), keys.events(id)]).collect();
        let _: () = redis::cmd("DEL").arg(&own).query_async(conn).await?;
    }
    let _: () = redis::cmd("DEL").arg(&[keys.queued(), keys.leases(), keys.finished()]).query_async(conn).await?;
    Ok(())
}
