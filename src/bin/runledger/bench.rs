//! `runledger bench`: the benchmark of issue #4. Enqueue rates, lifecycle
//! rates with the library's Worker, idle claim latency, claim cost against
//! queue depth, memory per run and Redis commands / CPU per lifecycle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use rand::RngExt;
use runledger::{ClaimOutcome, ClaimRequest, Done, Error, Finish, NewRun, Result, RunStatus, Store, Worker};
use serde::Serialize;
use serde_json::json;

use crate::Target;
use crate::demo::percentile;
use crate::output::Output;
use crate::private::PrivateRedis;

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Runs per phase.
    #[arg(long, default_value_t = 20_000)]
    pub runs: usize,
    /// Workers (one process, library Worker) of the main lifecycle phase.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Workers of the second lifecycle phase (0 = skip).
    #[arg(long, default_value_t = 32)]
    pub many_workers: usize,
    /// Queue depth of the deep claim-cost measurement (0 = skip).
    #[arg(long, default_value_t = 1_000_000)]
    pub depth: usize,
    /// Single enqueues of the idle-latency phase.
    #[arg(long, default_value_t = 1_000)]
    pub latency_samples: usize,
    /// Print each figure next to its target and say which fall short.
    #[arg(long)]
    pub check: bool,
    /// With --redis: use --prefix as it is instead of a fresh prefix, so an ACL user limited to
    /// its prefix (README, "Security: ACL user") can run the bench. Its runs go to the queues
    /// bench, bench-single, bench-many, bench-idle, bench-1k and bench-deep of that prefix, which
    /// must hold no runs; they are emptied again at the end (the queue names stay registered).
    #[arg(long)]
    pub shared: bool,
    /// Only the binding's overhead: the host's workload (create_run as running, append_event x3,
    /// finalize_run) from --tasks concurrent tasks, with this library and with the Python
    /// package (`python -m runledger.bench`) on the same Redis, in --rounds alternating rounds.
    #[arg(long)]
    pub host_shape: bool,
    /// Concurrent tasks of --host-shape (tokio tasks; asyncio tasks on one loop in Python).
    #[arg(long, default_value_t = 32)]
    pub tasks: usize,
    /// Rounds of --host-shape and --peer; the figures are their medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The Python interpreter of --host-shape, with the runledger package installed
    /// (pip install ./python) [default: python3].
    #[arg(long, value_name = "PATH")]
    pub python: Option<std::path::PathBuf>,
    /// Only runledger beside a peer queue, side by side in --rounds alternating rounds, each
    /// side on a fresh private redis-server at Redis's stock settings, with the same workload:
    /// `bullmq` (BullMQ's Queue and Worker, run by Node.js from --peer-dir).
    #[arg(long, value_name = "PEER")]
    pub peer: Option<String>,
    /// The folder of --peer's side: the repository's `bench/bullmq`, after `npm ci` in it.
    #[arg(long, value_name = "DIR")]
    pub peer_dir: Option<std::path::PathBuf>,
    /// The Node.js of --peer bullmq [default: node].
    #[arg(long, value_name = "PATH")]
    pub node: Option<std::path::PathBuf>,
    /// Runner ids the runs spread over (`bench-agent-0` ..), to measure the claim with several.
    #[arg(long, default_value_t = 1)]
    pub runners: usize,
    /// The lifecycle workers claim with a runner filter naming every runner of --runners.
    #[arg(long)]
    pub runner_filter: bool,
    /// Only the dashboard's cost: Redis commands and time of one /metrics scrape and of each
    /// page of `runledger ui`, at 10 and at 1,000 queues (a private redis-server).
    #[arg(long)]
    pub dashboard: bool,
}

/// The queues the single-server bench fills (with `--shared`, under the given prefix).
const QUEUES: [&str; 9] = [
    "bench-single",
    "bench",
    "bench-many",
    "bench-idle",
    "bench-1k",
    "bench-deep",
    "bench-purge",
    crate::bench_steps::STEPS_QUEUE,
    crate::bench_limit::LIMIT_QUEUE,
];

#[derive(Serialize, Default, Clone)]
pub struct Figures {
    pub redis_version: String,
    pub redis_config: String,
    pub runs: usize,
    pub enqueue_single_per_s: f64,
    pub enqueue_batched_per_s: f64,
    /// Redis CPU and script time per run of the batched enqueue: what bounds its rate.
    /// Figures read from INFO are null when the server refuses INFO (an ACL user).
    pub enqueue_redis_cpu_us_per_run: Option<f64>,
    pub enqueue_script_us_per_run: Option<f64>,
    pub lifecycle_per_s: f64,
    pub lifecycle_workers: usize,
    pub lifecycle_many_per_s: Option<f64>,
    pub lifecycle_many_workers: usize,
    pub idle_latency_ms_p50: f64,
    pub idle_latency_ms_p99: f64,
    pub idle_latency_ms_max: f64,
    pub claim_us_at_1k: f64,
    pub claim_us_at_depth: Option<f64>,
    pub depth: usize,
    pub claim_cost_ratio: Option<f64>,
    pub memory_per_queued_run: Option<f64>,
    pub memory_per_finished_run: Option<f64>,
    pub commands_per_lifecycle: Option<f64>,
    pub command_breakdown: HashMap<String, f64>,
    pub round_trips_per_lifecycle: Option<f64>,
    pub redis_cpu_us_per_lifecycle: Option<f64>,
    /// The part of it spent running the scripts (the rest is network I/O and the event loop).
    pub script_us_per_lifecycle: Option<f64>,
    /// The same runs on a redis-server at Redis's defaults (`hash-max-listpack-value 64`);
    /// measured with the private server only.
    pub memory_per_queued_run_stock: Option<f64>,
    pub memory_per_finished_run_stock: Option<f64>,
    /// Finished runs past the retention one reaper pass purges per second.
    pub purge_per_s: Option<f64>,
    /// The longest script of the bench, and of its purge, in microseconds (the
    /// upper bound of its LATENCY HISTOGRAM bucket); null when refused.
    pub longest_script_us: Option<u64>,
    pub longest_purge_script_us: Option<u64>,
    /// Commands and Redis CPU of each step of a lifecycle, called on its own.
    pub steps: Option<crate::bench_steps::Steps>,
    /// The yardsticks of this run (round trip, minimal commands), which the
    /// `--check` targets are ratios to.
    pub limit: Option<crate::bench_limit::Limit>,
}

pub(crate) const METADATA_PAD: &str = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation";

/// How many runner ids the bench's runs spread over (`--runners`), and
/// whether its lifecycle workers claim with a filter naming them all
/// (`--runner-filter`). Set once, before the first phase.
static RUNNERS: AtomicUsize = AtomicUsize::new(1);
static RUNNER_FILTER: AtomicBool = AtomicBool::new(false);

/// The runner id of run number i: `bench-agent`, or with `--runners N`
/// `bench-agent-<i mod N>`.
fn bench_runner(i: usize) -> String {
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

/// True when the server refused a command rather than failed it: an ACL
/// user without it (NOPERM), or a command renamed away. The figures that
/// need it are then n/a instead of the bench dying.
fn refused(e: &redis::RedisError) -> bool {
    matches!(e.kind(), redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm))
        || (e.code() == Some("ERR")
            && e.detail().is_some_and(|d| d.contains("unknown command") || d.contains("unknown subcommand")))
}

/// The server-wide commands the bench reads its figures with (INFO, CONFIG
/// GET, MEMORY PURGE), which an ACL user limited to its prefix may lack: a
/// refused one says so once on stderr and its figures are n/a.
pub(crate) struct Probe<'a> {
    store: &'a Store,
    refused: Mutex<Vec<&'static str>>,
}

impl<'a> Probe<'a> {
    pub(crate) fn new(store: &'a Store) -> Self {
        Probe { store, refused: Mutex::new(Vec::new()) }
    }

    fn is_refused(&self, command: &'static str) -> bool {
        self.refused.lock().map(|r| r.contains(&command)).unwrap_or(false)
    }

    /// Notes (once) that `command` was refused; the figures it feeds are n/a.
    fn note_refused(&self, command: &'static str, e: &redis::RedisError, consequence: &str) {
        if let Ok(mut r) = self.refused.lock()
            && !r.contains(&command)
        {
            r.push(command);
            let reason = e.detail().unwrap_or("refused");
            eprintln!("bench: note: the server refuses {command} ({reason}): {consequence}");
        }
    }

    /// INFO `section` as key -> value; `None` when the server refuses INFO.
    pub(crate) async fn info(&self, section: &str) -> Result<Option<HashMap<String, String>>> {
        if self.is_refused("INFO") {
            return Ok(None);
        }
        let mut conn = self.store.conn().await?;
        let text: String = match redis::cmd("INFO").arg(section).query_async(&mut conn).await {
            Ok(text) => text,
            Err(e) if refused(&e) => {
                self.note_refused("INFO", &e, "the Redis version and the memory, CPU and command figures are n/a");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Some(
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect(),
        ))
    }

    /// CONFIG GET `name` as (name, value) pairs; `None` when refused.
    async fn config_get(&self, name: &str) -> Result<Option<Vec<String>>> {
        if self.is_refused("CONFIG GET") {
            return Ok(None);
        }
        let mut conn = self.store.conn().await?;
        match redis::cmd("CONFIG").arg("GET").arg(name).query_async(&mut conn).await {
            Ok(pair) => Ok(Some(pair)),
            Err(e) if refused(&e) => {
                self.note_refused("CONFIG GET", &e, "the server's settings are not shown nor checked");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn used_memory(&self) -> Result<Option<f64>> {
        if self.is_refused("INFO") {
            return Ok(None);
        }
        if !self.is_refused("MEMORY PURGE") {
            // Let lazy frees settle so the figure is stable (optional: only steadier figures).
            let mut conn = self.store.conn().await?;
            if let Err(e) = redis::cmd("MEMORY").arg("PURGE").query_async::<()>(&mut conn).await
                && refused(&e)
            {
                self.note_refused("MEMORY PURGE", &e, "memory figures are read without purging first");
            }
        }
        Ok(self.info("memory").await?.map(|m| m.get("used_memory").and_then(|v| v.parse().ok()).unwrap_or(0.0)))
    }

    pub(crate) async fn redis_cpu(&self) -> Result<Option<f64>> {
        Ok(self.info("cpu").await?.map(|cpu| {
            let get = |k: &str| cpu.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            get("used_cpu_sys") + get("used_cpu_user")
        }))
    }

    /// Microseconds the server has spent running scripts by SHA.
    async fn script_usec(&self) -> Result<Option<f64>> {
        Ok(self.command_calls().await?.map(|c| c.get("evalsha").map(|(_, usec)| *usec).unwrap_or(0.0)))
    }

    /// Per command: (calls, microseconds spent running it), from INFO commandstats.
    pub(crate) async fn command_calls(&self) -> Result<Option<HashMap<String, (f64, f64)>>> {
        let Some(stats) = self.info("commandstats").await? else { return Ok(None) };
        let mut out = HashMap::new();
        for (k, v) in stats {
            if let Some(name) = k.strip_prefix("cmdstat_") {
                let field = |key: &str| v.split(',').find_map(|p| p.strip_prefix(key)).and_then(|c| c.parse().ok());
                out.insert(name.to_string(), (field("calls=").unwrap_or(0.0), field("usec=").unwrap_or(0.0)));
            }
        }
        Ok(Some(out))
    }
}

/// `after - before` per run, when both were read.
pub(crate) fn per_run(before: Option<f64>, after: Option<f64>, scale: f64, runs: usize) -> Option<f64> {
    Some((after? - before?) * scale / runs as f64)
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

/// The commands the server ran between two INFO commandstats readings, per
/// run: (total, by command, microseconds running scripts). The bench's own
/// probes (INFO, CONFIG GET, MEMORY PURGE, the XINFO STREAM of its progress
/// polls, which no script of a lifecycle sends) are left out.
pub(crate) fn commands_between(
    before: &HashMap<String, (f64, f64)>,
    after: &HashMap<String, (f64, f64)>,
    runs: usize,
) -> (f64, HashMap<String, f64>, f64) {
    let (mut total, mut breakdown, mut script_us) = (0.0, HashMap::new(), 0.0);
    for (name, (calls_after, usec_after)) in after {
        if name == "info" || name == "config|get" || name == "memory|purge" || name == "xinfo|stream" {
            continue;
        }
        let (calls_before, usec_before) = before.get(name).copied().unwrap_or_default();
        if name == "evalsha" {
            script_us = (usec_after - usec_before) / runs as f64;
        }
        let delta = calls_after - calls_before;
        if delta > 0.0 {
            breakdown.insert(name.clone(), delta / runs as f64);
            total += delta;
        }
    }
    (total / runs as f64, breakdown, script_us)
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

/// Median time of `samples` claims (each followed by a finish, untimed) on a
/// queue holding about `depth` runs.
async fn claim_cost(store: &Store, queue: &str, samples: usize) -> Result<f64> {
    let request = ClaimRequest::new("bench-claimer").queue(queue).lease(Duration::from_secs(60));
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        let outcome = store.claim_from(queue, &request).await?;
        times.push(start.elapsed().as_secs_f64() * 1e6);
        if let ClaimOutcome::Claimed(run) = outcome {
            store.finalize_run(&run.run_id, &Finish::new(RunStatus::Completed), run.claim_token.as_deref()).await?;
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(percentile(&times, 0.5))
}

pub async fn run(target: &Target, out: &Output, a: BenchArgs) -> Result<()> {
    if a.host_shape {
        return crate::bench_host::run(target, out, &a).await;
    }
    if a.dashboard {
        return crate::bench_ui::run(target, out).await;
    }
    if a.peer.is_some() {
        return crate::bench_peer::run(target, out, &a).await;
    }
    if target.cluster || target.url.as_deref().is_some_and(|u| u.contains("+cluster://")) {
        if a.shared {
            return Err(Error::Invalid("bench --cluster uses prefixes of its own; --shared is for one server".into()));
        }
        return crate::bench_cluster::run(target, out, &a).await;
    }
    let prefix = target.prefix.as_str();
    RUNNERS.store(a.runners.max(1), Ordering::Relaxed);
    RUNNER_FILTER.store(a.runner_filter, Ordering::Relaxed);
    if a.runs == 0 || a.workers == 0 {
        return Err(Error::Invalid("--runs and --workers must be at least 1".into()));
    }
    let (server, url, prefix) = match target.url.clone() {
        Some(url) if a.shared => (None, url, prefix.to_string()),
        Some(url) => (None, url, format!("{prefix}-bench-{:08x}", rand::rng().random::<u32>())),
        None => {
            let server = PrivateRedis::start(target.cluster)?;
            let url = server.url();
            (Some(server), url, prefix.to_string())
        }
    };
    let shared = server.is_none() && a.shared;
    let store = Store::connect_with(&url, target.config(&prefix)).await?;
    if shared {
        check_bench_queues_empty(&store).await?;
    }
    let probe = Probe::new(&store);
    let server_info = probe.info("server").await?;
    let mut config = Vec::new();
    for name in ["appendonly", "save", "maxmemory", "hash-max-listpack-value", "stream-node-max-bytes", "io-threads"] {
        let Some(pair) = probe.config_get(name).await? else { break };
        if let [k, v] = &pair[..] {
            config.push(format!("{k}={v}"));
        }
    }
    // config_advice reads CONFIG GET too: not worth asking again once refused.
    if !probe.is_refused("CONFIG GET") {
        for a in store.config_advice().await? {
            eprintln!(
                "bench: note: this server has {}={}; runledger recommends {} (README, \"Redis settings\")",
                a.name, a.actual, a.recommended
            );
        }
    }
    let mut f = Figures {
        redis_version: match &server_info {
            Some(info) => info.get("redis_version").cloned().unwrap_or_default(),
            None => "n/a".into(),
        },
        redis_config: if probe.is_refused("CONFIG GET") { "n/a".into() } else { config.join(" ") },
        runs: a.runs,
        lifecycle_workers: a.workers,
        lifecycle_many_workers: a.many_workers,
        depth: a.depth,
        ..Default::default()
    };
    eprintln!(
        "bench: Redis {} at {} ({}), {} runs, key prefix {prefix}",
        f.redis_version,
        redacted(&url),
        f.redis_config,
        a.runs
    );
    let mut measured = phases(&store, &probe, &a, &mut f, server.is_none() && !shared).await;
    if measured.is_ok() {
        measured = housekeeping(&store, &a, &mut f, server.is_some()).await;
    }
    if measured.is_ok() && server.is_some() {
        let (queued, finished) = crate::bench_memory::stock_memory(target, &prefix, a.runs).await?;
        (f.memory_per_queued_run_stock, f.memory_per_finished_run_stock) = (queued, finished);
        eprintln!(
            "bench: at Redis's defaults (hash-max-listpack-value 64): {} bytes per queued run, {} per finished run",
            na(queued, 0),
            na(finished, 0)
        );
    }
    if shared {
        // The prefix is someone's ledger: only the bench's own queues go, even after a failure.
        let removed = empty_bench_queues(&store).await?;
        eprintln!("bench: removed {removed} runs of queues {} under prefix {prefix}", QUEUES.join(", "));
    }
    measured?;
    if server.is_none() && !shared {
        // A given server keeps nothing of the bench (its runs live under their own prefix).
        // The figures are measured by now: a refused SCAN or UNLINK only leaves the keys.
        match remove_prefix(&store, &prefix).await {
            Ok(removed) => eprintln!("bench: removed {removed} keys under prefix {prefix}"),
            Err(e) => eprintln!("bench: note: could not remove the keys under prefix {prefix}: {e}"),
        }
    }
    drop(server);
    if out.json {
        out.json(&f);
    } else {
        print_table(&f);
    }
    if a.check {
        let short = print_check(&f, out.json);
        if short > 0 {
            eprintln!("bench: {short} figure(s) short of target");
        }
    }
    Ok(())
}

/// The measurements, into `f`. `fresh`: the bench's own fresh prefix on a
/// given server (a refusal there means the user is limited to its prefix).
async fn phases(store: &Store, probe: &Probe<'_>, a: &BenchArgs, f: &mut Figures, fresh: bool) -> Result<()> {
    let store = store.clone();
    let prefix = store.config().prefix.clone();
    // 0. The yardsticks: a round trip, and the minimal commands sent raw.
    let limit = crate::bench_limit::limit(
        &store,
        probe,
        a.runs,
        &[a.workers, a.many_workers].into_iter().filter(|w| *w > 0).collect::<Vec<_>>(),
    )
    .await
    .map_err(|e| fresh_prefix_refused(e, fresh, &prefix))?;
    eprintln!(
        "bench: yardsticks: round trip p50 {:.0} us p99 {:.0} us; minimal commands: enqueue one at a time {:.0}/s, \
         pipelined {:.0}/s ({} us Redis CPU per run), lifecycle pipelined {:.0}/s ({} commands, {} us Redis CPU \
         per run), in two round trips {}",
        limit.round_trip_us_p50,
        limit.round_trip_us_p99,
        limit.enqueue_one_per_s,
        limit.enqueue_per_s,
        na(limit.enqueue_redis_cpu_us_per_run, 1),
        limit.lifecycle_per_s,
        limit.lifecycle_commands,
        na(limit.lifecycle_redis_cpu_us, 1),
        limit
            .two_trip_lifecycle_per_s
            .iter()
            .map(|(w, r)| format!("{r:.0}/s at {w} workers"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    f.limit = Some(limit);

    // 1. Enqueue, one call at a time.
    let spent =
        enqueue_single(&store, "bench-single", a.runs).await.map_err(|e| fresh_prefix_refused(e, fresh, &prefix))?;
    f.enqueue_single_per_s = a.runs as f64 / spent.as_secs_f64();
    eprintln!("bench: enqueue one at a time {:.0}/s", f.enqueue_single_per_s);

    // 2. Enqueue batched; memory per queued run.
    let before = probe.used_memory().await?;
    let (script_before, cpu_before) = (probe.script_usec().await?, probe.redis_cpu().await?);
    let took = enqueue_batched(&store, "bench", a.runs).await?;
    f.enqueue_batched_per_s = a.runs as f64 / took.as_secs_f64();
    f.enqueue_script_us_per_run = per_run(script_before, probe.script_usec().await?, 1.0, a.runs);
    f.enqueue_redis_cpu_us_per_run = per_run(cpu_before, probe.redis_cpu().await?, 1e6, a.runs);
    f.memory_per_queued_run = per_run(before, probe.used_memory().await?, 1.0, a.runs);
    eprintln!(
        "bench: enqueue batched {:.0}/s ({} us Redis CPU per run, {} us of it in scripts), {} bytes per queued run",
        f.enqueue_batched_per_s,
        na(f.enqueue_redis_cpu_us_per_run, 1),
        na(f.enqueue_script_us_per_run, 1),
        na(f.memory_per_queued_run, 0)
    );

    // 3. Lifecycle with W workers; commands, CPU and memory per lifecycle.
    let calls_before = probe.command_calls().await?;
    let cpu_before = probe.redis_cpu().await?;
    let took = lifecycle(&store, "bench", a.workers, a.runs).await?;
    let cpu_after = probe.redis_cpu().await?;
    let calls_after = probe.command_calls().await?;
    f.lifecycle_per_s = a.runs as f64 / took.as_secs_f64();
    f.redis_cpu_us_per_lifecycle = per_run(cpu_before, cpu_after, 1e6, a.runs);
    if let (Some(calls_before), Some(calls_after)) = (calls_before, calls_after) {
        let (total, breakdown, script_us) = commands_between(&calls_before, &calls_after, a.runs);
        f.command_breakdown = breakdown;
        f.script_us_per_lifecycle = Some(script_us);
        f.commands_per_lifecycle = Some(total);
        // Round trips: the commands only a client sends (scripts, blocking
        // waits, pool pings); commands run inside scripts are not round trips.
        f.round_trips_per_lifecycle = Some(
            ["evalsha", "blpop", "ping"].iter().map(|c| f.command_breakdown.get(*c).copied().unwrap_or(0.0)).sum(),
        );
    }
    f.memory_per_finished_run = per_run(before, probe.used_memory().await?, 1.0, a.runs);
    eprintln!(
        "bench: lifecycle {} workers {:.0}/s, {} commands and {} us Redis CPU per run ({} us in scripts), \
         {} bytes per finished run",
        a.workers,
        f.lifecycle_per_s,
        na(f.commands_per_lifecycle, 1),
        na(f.redis_cpu_us_per_lifecycle, 0),
        na(f.script_us_per_lifecycle, 0),
        na(f.memory_per_finished_run, 0)
    );

    // 3b. The same lifecycle step by step.
    let steps = crate::bench_steps::steps(&store, probe, a.runs).await?;
    let step = |name: &str, s: &crate::bench_steps::StepCost| {
        format!("{name} {} commands, {} us Redis CPU", na(s.commands, 1), na(s.redis_cpu_us, 0))
    };
    eprintln!(
        "bench: per step: {}; {}; {}",
        step("claim", &steps.claim),
        step("3 events", &steps.event_batch),
        step("finish", &steps.finish)
    );
    f.steps = Some(steps);

    // 4. Lifecycle with many workers.
    if a.many_workers > 0 {
        enqueue_batched(&store, "bench-many", a.runs).await?;
        let took = lifecycle(&store, "bench-many", a.many_workers, a.runs).await?;
        f.lifecycle_many_per_s = Some(a.runs as f64 / took.as_secs_f64());
        eprintln!("bench: lifecycle {} workers {:.0}/s", a.many_workers, a.runs as f64 / took.as_secs_f64());
    }

    // 5. Idle claim latency.
    let lat = idle_latency(&store, "bench-idle", a.latency_samples, a.workers).await?;
    f.idle_latency_ms_p50 = percentile(&lat, 0.5);
    f.idle_latency_ms_p99 = percentile(&lat, 0.99);
    f.idle_latency_ms_max = lat.last().copied().unwrap_or(0.0);
    eprintln!("bench: idle claim latency p50 {:.3} ms p99 {:.3} ms", f.idle_latency_ms_p50, f.idle_latency_ms_p99);

    // 6. Claim cost at 1k queued and at depth.
    let samples = 200.min(a.runs);
    enqueue_batched(&store, "bench-1k", 1000 + samples).await?;
    f.claim_us_at_1k = claim_cost(&store, "bench-1k", samples).await?;
    if a.depth > 0 {
        eprintln!("bench: filling a queue with {} runs", a.depth);
        enqueue_batched(&store, "bench-deep", a.depth + samples).await?;
        let deep = claim_cost(&store, "bench-deep", samples).await?;
        f.claim_us_at_depth = Some(deep);
        f.claim_cost_ratio = Some(deep / f.claim_us_at_1k);
    }
    match f.claim_us_at_depth {
        Some(deep) => eprintln!("bench: claim {:.0} us at 1k, {deep:.0} us at {}", f.claim_us_at_1k, a.depth),
        None => eprintln!("bench: claim {:.0} us at 1k", f.claim_us_at_1k),
    }
    Ok(())
}

/// Retention and script length: the purge rate of one reaper pass, and the
/// longest script Redis ran. On the private server the stats are reset
/// before the purge, so its longest script is told apart; a given server's
/// stats are the operator's and are left alone.
async fn housekeeping(store: &Store, a: &BenchArgs, f: &mut Figures, private: bool) -> Result<()> {
    use crate::bench_memory::{longest_script_us, purge_backlog, purge_rate, reset_stats};
    purge_backlog(store, a.runs).await?;
    f.longest_script_us = longest_script_us(store).await;
    let reset = private && reset_stats(store).await;
    let (rate, purged) = purge_rate(store).await?;
    f.purge_per_s = Some(rate);
    if reset {
        f.longest_purge_script_us = longest_script_us(store).await;
    } else {
        f.longest_script_us = longest_script_us(store).await;
    }
    eprintln!(
        "bench: reaper purged {purged} runs past the retention at {rate:.0}/s; longest script {} us (purge {} us)",
        f.longest_script_us.map_or("n/a".into(), |v| v.to_string()),
        f.longest_purge_script_us.map_or("n/a".into(), |v| v.to_string()),
    );
    Ok(())
}

/// The URL without its password, to print.
pub(crate) fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    match authority.rsplit_once('@') {
        Some((user, hosts)) if user.contains(':') => {
            let name = user.split(':').next().unwrap_or_default();
            format!("{scheme}://{name}:***@{hosts}/{path}")
        }
        Some((_, hosts)) => format!("{scheme}://***@{hosts}/{path}"),
        None => url.to_string(),
    }
}

/// A figure, or `n/a` when it could not be read.
fn na(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.decimals$}"))
}

/// A refused key on the fresh prefix of a bench on a given server: the user
/// is limited to its own prefix, which `--shared` keeps to.
fn fresh_prefix_refused(e: Error, fresh: bool, prefix: &str) -> Error {
    match &e {
        Error::Redis(r) if fresh && matches!(r.kind(), redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)) => {
            Error::Server(format!(
                "bench: the Redis user may not use the bench's fresh key prefix {prefix} ({e}); \
                 for a user limited to its own prefix run the bench with --shared"
            ))
        }
        _ => e,
    }
}

/// With `--shared`: the bench's queues must hold no runs, since it empties them at the end.
async fn check_bench_queues_empty(store: &Store) -> Result<()> {
    let mut conn = store.conn().await?;
    for queue in QUEUES {
        let n: u64 = redis::cmd("XLEN").arg(store.queue_keys(queue).runs_index()).query_async(&mut conn).await?;
        if n > 0 {
            return Err(Error::Invalid(format!(
                "bench --shared: queue {queue} under prefix {} holds {n} runs (another bench running, or a \
                 queue of that name); the bench empties its queues when it ends, so it will not use them",
                store.config().prefix
            )));
        }
    }
    Ok(())
}

/// With `--shared`: deletes the runs of the bench's queues (their hashes, event
/// streams and locators, found through each queue's `runs` stream) and the
/// queues' own keys, key by key (no SCAN, which an ACL user may lack, and
/// nothing else of the prefix). The queue names stay registered in
/// `<P>:queues` (numbers are never reused); claim receipts expire on their
/// own. Returns how many runs were removed.
async fn empty_bench_queues(store: &Store) -> Result<u64> {
    let global = runledger::keys::GlobalKeys { prefix: store.config().prefix.clone() };
    let mut conn = store.conn().await?;
    let mut removed = 0;
    for queue in QUEUES {
        let keys = store.queue_keys(queue);
        let mut start = "-".to_string();
        loop {
            let page: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
                .arg(keys.runs_index())
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            let Some((last, _)) = page.last() else { break };
            start = format!("({last}");
            let run_ids: Vec<&String> = page.iter().filter_map(|(_, fields)| fields.get("r")).collect();
            if run_ids.is_empty() {
                continue;
            }
            let own: Vec<String> = run_ids.iter().flat_map(|id| [keys.run(id), keys.events(id)]).collect();
            let locators: Vec<String> = run_ids.iter().map(|id| global.locator(id)).collect();
            let _: () = redis::cmd("DEL").arg(&own).query_async(&mut conn).await?;
            let _: () = redis::cmd("DEL").arg(&locators).query_async(&mut conn).await?;
            removed += run_ids.len() as u64;
        }
        let mut own = vec![
            keys.queued(),
            keys.leases(),
            keys.delayed(),
            keys.deadlines(),
            keys.finished(),
            keys.stats(),
            keys.wake(),
            keys.runners(),
            keys.running(),
            keys.listeners(),
            keys.pins(),
            keys.hints(),
            keys.runs_index(),
        ];
        for i in 0..RUNNERS.load(Ordering::Relaxed).max(1) {
            own.push(keys.runner_lane(&bench_runner(i)));
            own.push(keys.runner_wake(&bench_runner(i)));
        }
        let _: () = redis::cmd("DEL").arg(&own[..]).query_async(&mut conn).await?;
    }
    Ok(removed)
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

fn print_table(f: &Figures) {
    println!("runledger bench: Redis {} ({}), {} runs", f.redis_version, f.redis_config, f.runs);
    println!("| figure | value |");
    println!("| --- | --- |");
    println!("| enqueue, one call at a time, runs/s | {:.0} |", f.enqueue_single_per_s);
    println!("| enqueue, batched (1000), runs/s | {:.0} |", f.enqueue_batched_per_s);
    println!("| lifecycle, {} workers, runs/s | {:.0} |", f.lifecycle_workers, f.lifecycle_per_s);
    if let Some(v) = f.lifecycle_many_per_s {
        println!("| lifecycle, {} workers, runs/s | {:.0} |", f.lifecycle_many_workers, v);
    }
    println!(
        "| idle claim latency p50 / p99 / max, ms | {:.3} / {:.3} / {:.3} |",
        f.idle_latency_ms_p50, f.idle_latency_ms_p99, f.idle_latency_ms_max
    );
    match (f.claim_us_at_depth, f.claim_cost_ratio) {
        (Some(d), Some(r)) => {
            println!("| claim cost at 1k vs {} queued, us | {:.0} vs {:.0} ({:.2}x) |", f.depth, f.claim_us_at_1k, d, r)
        }
        _ => println!("| claim cost at 1k queued, us | {:.0} |", f.claim_us_at_1k),
    }
    println!("| Redis memory per queued run, bytes | {} |", na(f.memory_per_queued_run, 0));
    println!("| Redis memory per finished run with 3 events, bytes | {} |", na(f.memory_per_finished_run, 0));
    if f.memory_per_queued_run_stock.is_some() || f.memory_per_finished_run_stock.is_some() {
        println!(
            "| the same at Redis's defaults (queued / finished), bytes | {} / {} |",
            na(f.memory_per_queued_run_stock, 0),
            na(f.memory_per_finished_run_stock, 0)
        );
    }
    println!("| reaper purge rate, runs/s | {} |", na(f.purge_per_s, 0));
    let us = |v: Option<u64>| v.map_or("n/a".to_string(), |v| format!("<= {v}"));
    println!("| longest script, us (of the purge) | {} ({}) |", us(f.longest_script_us), us(f.longest_purge_script_us));
    println!(
        "| Redis CPU per lifecycle, us | {} ({} running scripts) |",
        na(f.redis_cpu_us_per_lifecycle, 0),
        na(f.script_us_per_lifecycle, 0)
    );
    println!(
        "| Redis commands per lifecycle (round trips) | {} ({}) |",
        na(f.commands_per_lifecycle, 2),
        na(f.round_trips_per_lifecycle, 2)
    );
    if let Some(steps) = &f.steps {
        for (name, s) in [("claim", &steps.claim), ("batch of 3 events", &steps.event_batch), ("finish", &steps.finish)]
        {
            println!("| per {name}: commands / Redis CPU us | {} / {} |", na(s.commands, 1), na(s.redis_cpu_us, 0));
        }
    }
    if let Some(l) = &f.limit {
        println!(
            "| yardstick: round trip (PING) p50 / p99, us | {:.0} / {:.0} |",
            l.round_trip_us_p50, l.round_trip_us_p99
        );
        println!("| yardstick: minimal enqueue one round trip each, runs/s | {:.0} |", l.enqueue_one_per_s);
        println!(
            "| yardstick: minimal enqueue pipelined, runs/s (Redis CPU us, bytes per run) | {:.0} ({}, {}) |",
            l.enqueue_per_s,
            na(l.enqueue_redis_cpu_us_per_run, 1),
            na(l.memory_per_queued_run, 0)
        );
        println!(
            "| yardstick: minimal lifecycle pipelined, runs/s ({} commands, Redis CPU us, bytes per run) | {:.0} ({}, {}) |",
            l.lifecycle_commands,
            l.lifecycle_per_s,
            na(l.lifecycle_redis_cpu_us, 1),
            na(l.memory_per_finished_run, 0)
        );
        for (w, r) in &l.two_trip_lifecycle_per_s {
            println!("| yardstick: minimal lifecycle in 2 round trips per run, {w} workers, runs/s | {r:.0} |");
        }
    }
}

/// The minimal lifecycle's rate in two round trips per run from `workers` callers.
fn two_trip_rate(l: &crate::bench_limit::Limit, workers: usize) -> Option<f64> {
    l.two_trip_lifecycle_per_s.iter().find(|(w, _)| *w == workers).map(|(_, r)| *r)
}

/// Prints figure vs target; returns how many fall short. Every speed target is
/// a ratio to a yardstick measured in this run (see `bench_limit.rs`), never a
/// number from another machine or day.
fn print_check(f: &Figures, to_stderr: bool) -> usize {
    // With --json, stdout holds only the JSON document.
    let say = |line: String| if to_stderr { eprintln!("{line}") } else { println!("{line}") };
    // (figure, measured, target, ok); ok is None when a figure or its yardstick is n/a
    // (a server that refuses INFO).
    type Row = (String, String, String, Option<bool>);
    let mut rows: Vec<Row> = Vec::new();
    let at_most = |name: &str, v: Option<f64>, unit: &str, limit: Option<f64>, what: &str| -> Row {
        let measured = v.map_or("n/a".to_string(), |v| format!("{v:.1}{unit}"));
        let target = limit.map_or(format!("<= {what}: n/a"), |t| format!("<= {t:.1}{unit} ({what})"));
        (name.to_string(), measured, target, v.zip(limit).map(|(v, t)| v <= t))
    };
    let at_least = |name: &str, v: f64, unit: &str, limit: Option<f64>, what: &str| -> Row {
        let target = limit.map_or(format!(">= {what}: n/a"), |t| format!(">= {t:.0}{unit} ({what})"));
        (name.to_string(), format!("{v:.0}{unit}"), target, limit.map(|t| v >= t))
    };
    let l = f.limit.as_ref();
    rows.push(at_most("Redis commands per lifecycle", f.commands_per_lifecycle, "", Some(14.0), "14"));
    rows.push(at_most("round trips per lifecycle", f.round_trips_per_lifecycle, "", Some(3.05), "3"));
    rows.push(at_most(
        "Redis CPU per lifecycle",
        f.redis_cpu_us_per_lifecycle,
        " us",
        l.and_then(|l| l.lifecycle_redis_cpu_us).map(|c| 2.0 * c),
        "2x the minimal commands'",
    ));
    rows.push(at_most(
        "Redis CPU per batched enqueue",
        f.enqueue_redis_cpu_us_per_run,
        " us",
        l.and_then(|l| l.enqueue_redis_cpu_us_per_run).map(|c| 2.0 * c),
        "2x the minimal commands'",
    ));
    rows.push(at_least(
        "enqueue, one at a time",
        f.enqueue_single_per_s,
        "/s",
        l.map(|l| 0.5 * l.enqueue_one_per_s),
        "half the minimal commands' in one round trip each",
    ));
    rows.push(at_least(
        &format!("lifecycle, {} workers", f.lifecycle_workers),
        f.lifecycle_per_s,
        "/s",
        l.and_then(|l| two_trip_rate(l, f.lifecycle_workers)).map(|r| 0.5 * r),
        "half the minimal commands' in 2 round trips per run",
    ));
    if let Some(v) = f.lifecycle_many_per_s {
        rows.push(at_least(
            &format!("lifecycle, {} workers", f.lifecycle_many_workers),
            v,
            "/s",
            l.and_then(|l| two_trip_rate(l, f.lifecycle_many_workers)).map(|r| 0.5 * r),
            "half the minimal commands' in 2 round trips per run",
        ));
    }
    rows.push(at_most(
        "idle claim p99",
        Some(f.idle_latency_ms_p99 * 1000.0),
        " us",
        l.map(|l| 4.0 * l.round_trip_us_p99),
        "4 round trips at p99",
    ));
    rows.push(at_most(
        "memory per queued run",
        f.memory_per_queued_run,
        " B",
        l.and_then(|l| l.memory_per_queued_run).map(|m| 1.5 * m),
        "1.5x the minimal commands'",
    ));
    rows.push(at_most(
        "memory per finished run",
        f.memory_per_finished_run,
        " B",
        l.and_then(|l| l.memory_per_finished_run).map(|m| 1.5 * m),
        "1.5x the minimal commands'",
    ));
    if let Some(r) = f.claim_cost_ratio {
        rows.push(at_most("claim cost deep vs 1k", Some(r), "x", Some(1.5), "1.5x"));
    }
    say(String::new());
    say("| figure | measured | target | |".into());
    say("| --- | --- | --- | --- |".into());
    let mut short = 0;
    for (name, measured, target, ok) in rows {
        if ok == Some(false) {
            short += 1;
        }
        let verdict = match ok {
            Some(true) => "ok",
            Some(false) => "SHORT",
            None => "n/a",
        };
        say(format!("| {name} | {measured} | {target} | {verdict} |"));
    }
    short
}
