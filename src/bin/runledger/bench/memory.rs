//! Bench phases about memory and housekeeping: bytes per run on a redis-server
//! at its stock settings (next to the recommended ones the main phases use),
//! the reaper's purge rate, and the longest script Redis ran.

use std::time::Instant;

use runledger::embedded::RedisServer;
use runledger::{Result, Store};

use super::probe::{OPERATION_CALLS, Probe, per_run};
use super::workload::{enqueue_batched, lifecycle};
use crate::target::Target;

/// The queue of the purge phase (one of the bench's queues, see `standard.rs`).
pub const PURGE_QUEUE: &str = "bench-purge";

/// Bytes per queued and per finished run (3 events) on a private
/// redis-server started with Redis's defaults (`hash-max-listpack-value 64`).
pub async fn stock_memory(target: &Target, prefix: &str, runs: usize) -> Result<(Option<f64>, Option<f64>)> {
    let server = RedisServer::start_with(&["--hash-max-listpack-value", "64"])?;
    let store = Store::connect_with(&server.url(), target.config(prefix)).await?;
    let probe = Probe::new(&store);
    let before = probe.used_memory().await?;
    enqueue_batched(&store, "bench-stock", runs).await?;
    let queued = probe.used_memory().await?;
    lifecycle(&store, "bench-stock", 4, runs).await?;
    let finished = probe.used_memory().await?;
    Ok((per_run(before, queued, 1.0, runs), per_run(before, finished, 1.0, runs)))
}

/// A backlog for the reaper: `runs` runs through their lifecycle, all to be
/// past the retention at the time [`purge_rate`] gives the reaper.
pub async fn purge_backlog(store: &Store, runs: usize) -> Result<()> {
    enqueue_batched(store, PURGE_QUEUE, runs).await?;
    lifecycle(store, PURGE_QUEUE, 4, runs).await?;
    Ok(())
}

/// The reaper's purge rate (runs/s) over the backlog: one pass, in scripts
/// of `REAP_BATCH` runs, with a clock past the retention.
pub async fn purge_rate(store: &Store) -> Result<(f64, i64)> {
    let past = store.server_time_ms().await? + store.config().retention.as_millis() as i64 + 60_000;
    let start = Instant::now();
    let report = store.reap(&[PURGE_QUEUE.to_string()], Some(past)).await?;
    Ok((report.purged as f64 / start.elapsed().as_secs_f64(), report.purged))
}

/// The longest operation (FCALL or EVALSHA) Redis ran since its stats were
/// last reset, in microseconds (the upper bound of its `LATENCY HISTOGRAM`
/// bucket). `None` when the server refuses the command (an ACL user, a
/// managed service) or ran none.
pub async fn longest_script_us(store: &Store) -> Option<u64> {
    let mut longest = None;
    for name in OPERATION_CALLS {
        longest = longest.max(longest_us_of(store, name).await);
    }
    longest
}

async fn longest_us_of(store: &Store, command: &str) -> Option<u64> {
    let mut conn = store.conn().await.ok()?;
    let reply: redis::Value = redis::cmd("LATENCY").arg("HISTOGRAM").arg(command).query_async(&mut conn).await.ok()?;
    // [name, [calls, n, histogram_usec, [bucket, cumulative count, ...]]] (maps on RESP3).
    let flat = |v: redis::Value| -> Vec<redis::Value> {
        match v {
            redis::Value::Array(items) => items,
            redis::Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            _ => Vec::new(),
        }
    };
    let int = |v: &redis::Value| -> Option<u64> {
        match v {
            redis::Value::Int(n) => u64::try_from(*n).ok(),
            redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    };
    let mut top = flat(reply).into_iter();
    let _name = top.next()?;
    let fields = flat(top.next()?);
    let mut calls = None;
    let mut buckets = Vec::new();
    let mut it = fields.into_iter();
    while let (Some(key), Some(value)) = (it.next(), it.next()) {
        match redis::from_redis_value::<String>(key).ok()?.as_str() {
            "calls" => calls = int(&value),
            "histogram_usec" => buckets = flat(value),
            _ => {}
        }
    }
    let calls = calls?;
    buckets
        .chunks(2)
        .filter_map(|pair| Some((int(&pair[0])?, int(pair.get(1)?)?)))
        .find(|(_, n)| *n >= calls)
        .map(|(b, _)| b)
}

/// Resets the server's command stats (and latency histograms). False when refused.
pub async fn reset_stats(store: &Store) -> bool {
    let Ok(mut conn) = store.conn().await else { return false };
    redis::cmd("CONFIG").arg("RESETSTAT").query_async::<()>(&mut conn).await.is_ok()
}
