//! `runledger bench --peer bullmq --peer-dir DIR`: runledger beside BullMQ,
//! side by side in one run on one machine (the brief's section 8). Each round
//! gives each side a fresh redis-server at Redis's stock settings and the same
//! workload (enqueue one at a time and batched, the lifecycle at --workers and
//! at --many-workers, idle claim latency); the sides alternate which goes first.
//! BullMQ's side is `DIR/peer.mjs` run by Node.js with BullMQ's own Queue and
//! Worker, as its docs recommend: one `Worker` of `concurrency: W`, the 3
//! events as `job.log` lines (kept per job, as runledger keeps a run's
//! stream), so memory per finished run compares equal durability. The
//! earlier harness (W Workers of concurrency 1, `updateProgress`) stays as a
//! second lifecycle row. The server's memory, CPU and command counts are read around each
//! phase by the same code for both sides. Figures are medians over rounds;
//! each ratio is the median of the rounds' ratios.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use runledger::embedded::RedisServer;
use runledger::{Error, Result, Store};
use serde::Serialize;

use super::BenchArgs;
use super::probe::{Probe, commands_between, per_run};
use super::workload::{enqueue_batched, enqueue_single, idle_latency, lifecycle};
use crate::measure::{median, percentile};
use crate::output::Output;
use crate::target::Target;

/// One side's figures in one round (None: the phase was not run).
#[derive(Serialize, Default, Clone)]
pub struct SideFigures {
    pub enqueue_single_per_s: f64,
    pub enqueue_batched_per_s: f64,
    pub lifecycle_per_s: f64,
    pub lifecycle_many_per_s: Option<f64>,
    /// BullMQ: W Workers of concurrency 1 with `updateProgress`; runledger: its lifecycle again.
    pub lifecycle_progress_per_s: Option<f64>,
    pub idle_latency_ms_p50: f64,
    pub idle_latency_ms_p99: f64,
    pub redis_cpu_us_per_lifecycle: Option<f64>,
    pub commands_per_lifecycle: Option<f64>,
    pub memory_per_queued_run: Option<f64>,
    pub memory_per_finished_run: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    peer: String,
    redis_version: String,
    redis_config: &'static str,
    runs: usize,
    workers: usize,
    many_workers: usize,
    rounds: Vec<[SideFigures; 2]>,
    /// Medians over rounds: [runledger, peer].
    median: [SideFigures; 2],
    /// Median over rounds of runledger's figure divided by the peer's.
    ratio: HashMap<&'static str, Option<f64>>,
}

/// The figures compared, with how each is read off a side's figures.
type Figure = (&'static str, &'static str, fn(&SideFigures) -> Option<f64>);
const FIGURES: &[Figure] = &[
    ("enqueue_single_per_s", "enqueue, one call at a time, runs/s", |s| Some(s.enqueue_single_per_s)),
    ("enqueue_batched_per_s", "enqueue, batched (1000), runs/s", |s| Some(s.enqueue_batched_per_s)),
    ("lifecycle_per_s", "lifecycle, --workers, runs/s", |s| Some(s.lifecycle_per_s)),
    ("lifecycle_many_per_s", "lifecycle, --many-workers, runs/s", |s| s.lifecycle_many_per_s),
    (
        "lifecycle_progress_per_s",
        "lifecycle, --workers, BullMQ as --workers Workers of concurrency 1 with updateProgress, runs/s",
        |s| s.lifecycle_progress_per_s,
    ),
    ("idle_latency_ms_p50", "idle claim latency p50, ms", |s| Some(s.idle_latency_ms_p50)),
    ("idle_latency_ms_p99", "idle claim latency p99, ms", |s| Some(s.idle_latency_ms_p99)),
    ("redis_cpu_us_per_lifecycle", "Redis CPU per lifecycle, us", |s| s.redis_cpu_us_per_lifecycle),
    ("commands_per_lifecycle", "Redis commands per lifecycle", |s| s.commands_per_lifecycle),
    ("memory_per_queued_run", "memory per queued run, bytes", |s| s.memory_per_queued_run),
    ("memory_per_finished_run", "memory per finished run (3 events), bytes", |s| s.memory_per_finished_run),
];

/// Redis's stock value of the one setting the private servers change
/// (see `runledger::embedded::RECOMMENDED_CONFIG`): both sides run at stock.
const STOCK: &[&str] = &["--hash-max-listpack-value", "64"];

pub async fn run(target: &Target, out: &Output, a: &BenchArgs) -> Result<()> {
    let peer = a.peer.as_deref().unwrap_or_default();
    if peer != "bullmq" {
        return Err(Error::Invalid(format!("bench --peer: unknown peer {peer:?} (the one known is bullmq)")));
    }
    if target.url.is_some() || target.cluster {
        return Err(Error::Invalid(
            "bench --peer starts fresh private redis-servers of its own; leave out --redis and --cluster".into(),
        ));
    }
    if a.runs == 0 || a.workers == 0 || a.rounds == 0 {
        return Err(Error::Invalid("--runs, --workers and --rounds must be at least 1".into()));
    }
    let node = Node::find(a)?;
    eprintln!("bench: runledger beside BullMQ {} (node {}), {} rounds", node.bullmq_version, node.version, a.rounds);
    let mut rounds = Vec::new();
    let mut redis_version = String::new();
    for round in 0..a.rounds {
        let mut pair: [SideFigures; 2] = Default::default();
        // The sides alternate which goes first, so neither always meets a cooler machine.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let server = RedisServer::start_with(STOCK)?;
            let store = Store::connect_with(&server.url(), target.config(&target.prefix)).await?;
            let probe = Probe::new(&store);
            if redis_version.is_empty()
                && let Some(info) = probe.info("server").await?
            {
                redis_version = info.get("redis_version").cloned().unwrap_or_default();
            }
            let name = if side == 0 { "runledger" } else { "BullMQ" };
            eprintln!("bench: round {} of {}, {name}", round + 1, a.rounds);
            pair[side] = if side == 0 {
                measure(&probe, a, &Runledger { store: &store }).await?
            } else {
                measure(&probe, a, &node.side(server.port())).await?
            };
        }
        rounds.push(pair);
    }
    let medians = [median_of(&rounds, 0), median_of(&rounds, 1)];
    let mut ratio = HashMap::new();
    for (key, _, get) in FIGURES {
        let per_round: Vec<f64> = rounds.iter().filter_map(|[ours, theirs]| Some(get(ours)? / get(theirs)?)).collect();
        ratio.insert(*key, median(&per_round));
    }
    let report = Report {
        peer: format!("BullMQ {}", node.bullmq_version),
        redis_version,
        redis_config: "stock (hash-max-listpack-value 64)",
        runs: a.runs,
        workers: a.workers,
        many_workers: a.many_workers,
        rounds,
        median: medians,
        ratio,
    };
    if out.json {
        out.json(&report);
    } else {
        print_table(&report, a);
    }
    Ok(())
}

/// One side of the comparison: the workload's phases against one server.
trait Side {
    async fn enqueue_single(&self, queue: &str, n: usize) -> Result<f64>;
    async fn enqueue_batched(&self, queue: &str, n: usize) -> Result<f64>;
    async fn lifecycle(&self, queue: &str, workers: usize, n: usize) -> Result<f64>;
    /// The second lifecycle row (see [`SideFigures::lifecycle_progress_per_s`]).
    async fn lifecycle_progress(&self, queue: &str, workers: usize, n: usize) -> Result<f64>;
    async fn idle_latency(&self, queue: &str, samples: usize, workers: usize) -> Result<Vec<f64>>;
}

/// The workload on one side, with the server read around each phase.
async fn measure(probe: &Probe<'_>, a: &BenchArgs, side: &impl Side) -> Result<SideFigures> {
    let mut f = SideFigures {
        enqueue_single_per_s: a.runs as f64 / side.enqueue_single("bench-single", a.runs).await?,
        ..Default::default()
    };
    let before = probe.used_memory().await?;
    f.enqueue_batched_per_s = a.runs as f64 / side.enqueue_batched("bench", a.runs).await?;
    f.memory_per_queued_run = per_run(before, probe.used_memory().await?, 1.0, a.runs);
    let (calls_before, cpu_before) = (probe.command_calls().await?, probe.redis_cpu().await?);
    f.lifecycle_per_s = a.runs as f64 / side.lifecycle("bench", a.workers, a.runs).await?;
    f.redis_cpu_us_per_lifecycle = per_run(cpu_before, probe.redis_cpu().await?, 1e6, a.runs);
    if let (Some(b), Some(c)) = (calls_before, probe.command_calls().await?) {
        f.commands_per_lifecycle = Some(commands_between(&b, &c, a.runs).total);
    }
    f.memory_per_finished_run = per_run(before, probe.used_memory().await?, 1.0, a.runs);
    if a.many_workers > 0 {
        side.enqueue_batched("bench-many", a.runs).await?;
        f.lifecycle_many_per_s = Some(a.runs as f64 / side.lifecycle("bench-many", a.many_workers, a.runs).await?);
    }
    side.enqueue_batched("bench-progress", a.runs).await?;
    f.lifecycle_progress_per_s =
        Some(a.runs as f64 / side.lifecycle_progress("bench-progress", a.workers, a.runs).await?);
    let latencies = side.idle_latency("bench-idle", a.latency_samples, a.workers).await?;
    if latencies.len() < a.latency_samples {
        return Err(Error::Server(format!(
            "bench --peer: {} of {} idle-latency samples were seen",
            latencies.len(),
            a.latency_samples
        )));
    }
    f.idle_latency_ms_p50 = percentile(&latencies, 0.5);
    f.idle_latency_ms_p99 = percentile(&latencies, 0.99);
    Ok(f)
}

/// runledger's side: the bench's own phases (`workload.rs`), in seconds.
struct Runledger<'a> {
    store: &'a Store,
}

impl Side for Runledger<'_> {
    async fn enqueue_single(&self, queue: &str, n: usize) -> Result<f64> {
        Ok(enqueue_single(self.store, queue, n).await?.as_secs_f64())
    }
    async fn enqueue_batched(&self, queue: &str, n: usize) -> Result<f64> {
        Ok(enqueue_batched(self.store, queue, n).await?.as_secs_f64())
    }
    async fn lifecycle(&self, queue: &str, workers: usize, n: usize) -> Result<f64> {
        Ok(lifecycle(self.store, queue, workers, n).await?.as_secs_f64())
    }
    async fn lifecycle_progress(&self, queue: &str, workers: usize, n: usize) -> Result<f64> {
        self.lifecycle(queue, workers, n).await
    }
    async fn idle_latency(&self, queue: &str, samples: usize, workers: usize) -> Result<Vec<f64>> {
        idle_latency(self.store, queue, samples, workers).await
    }
}

/// Node.js and the peer's folder (peer.mjs with BullMQ installed beside it).
struct Node {
    node: PathBuf,
    script: PathBuf,
    version: String,
    bullmq_version: String,
}

impl Node {
    fn find(a: &BenchArgs) -> Result<Node> {
        let dir = a.peer_dir.clone().ok_or_else(|| {
            Error::Invalid(
                "bench --peer bullmq needs --peer-dir DIR: the repository's bench/bullmq, after `npm ci` in it".into(),
            )
        })?;
        let script = dir.join("peer.mjs");
        if !script.is_file() {
            return Err(Error::Invalid(format!("bench --peer-dir: {} has no peer.mjs", dir.display())));
        }
        let manifest = dir.join("node_modules/bullmq/package.json");
        let bullmq_version = std::fs::read_to_string(&manifest)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| v["version"].as_str().map(str::to_string))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "bench --peer-dir: BullMQ is not installed in {} (run `npm ci` there)",
                    dir.display()
                ))
            })?;
        let node = a.node.clone().unwrap_or_else(|| PathBuf::from("node"));
        let version = std::process::Command::new(&node)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .ok_or_else(|| Error::Invalid(format!("bench --peer: cannot run Node.js ({})", node.display())))?;
        Ok(Node { node, script, version, bullmq_version })
    }

    fn side(&self, port: u16) -> Bullmq<'_> {
        Bullmq { node: &self.node, script: &self.script, port }
    }
}

/// BullMQ's side: one `node peer.mjs` per phase.
struct Bullmq<'a> {
    node: &'a Path,
    script: &'a Path,
    port: u16,
}

impl Bullmq<'_> {
    async fn phase(&self, phase: &str, queue: &str, runs: usize, workers: usize) -> Result<serde_json::Value> {
        let spec =
            serde_json::json!({ "port": self.port, "phase": phase, "queue": queue, "runs": runs, "workers": workers });
        let child = tokio::process::Command::new(self.node)
            .arg(self.script)
            .arg(spec.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Invalid(format!("bench --peer: cannot start {}: {e}", self.node.display())))?;
        // A hang guard: no phase of a bench this size takes ten minutes.
        let output = tokio::time::timeout(Duration::from_secs(600), child.wait_with_output())
            .await
            .map_err(|_| Error::Server(format!("bench --peer: BullMQ's {phase} phase did not end in 600 s")))?
            .map_err(|e| Error::Server(format!("bench --peer: BullMQ's {phase} phase: {e}")))?;
        if !output.status.success() {
            return Err(Error::Server(format!(
                "bench --peer: BullMQ's {phase} phase failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        serde_json::from_slice(&output.stdout)
            .map_err(|e| Error::Protocol(format!("bench --peer: BullMQ's {phase} phase printed no JSON line ({e})")))
    }

    async fn elapsed(&self, phase: &str, queue: &str, runs: usize, workers: usize) -> Result<f64> {
        let v = self.phase(phase, queue, runs, workers).await?;
        v["elapsed_s"].as_f64().ok_or_else(|| Error::Protocol(format!("bench --peer: {phase} gave no elapsed_s")))
    }
}

impl Side for Bullmq<'_> {
    async fn enqueue_single(&self, queue: &str, n: usize) -> Result<f64> {
        self.elapsed("enqueue-single", queue, n, 1).await
    }
    async fn enqueue_batched(&self, queue: &str, n: usize) -> Result<f64> {
        self.elapsed("enqueue-batched", queue, n, 1).await
    }
    async fn lifecycle(&self, queue: &str, workers: usize, n: usize) -> Result<f64> {
        self.elapsed("lifecycle", queue, n, workers).await
    }
    async fn lifecycle_progress(&self, queue: &str, workers: usize, n: usize) -> Result<f64> {
        self.elapsed("lifecycle-progress", queue, n, workers).await
    }
    async fn idle_latency(&self, queue: &str, samples: usize, workers: usize) -> Result<Vec<f64>> {
        let v = self.phase("idle-latency", queue, samples, workers).await?;
        let mut out: Vec<f64> =
            v["latencies_ms"].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default();
        out.sort_by(|a, b| a.total_cmp(b));
        Ok(out)
    }
}

/// The per-figure medians of one side over the rounds.
fn median_of(rounds: &[[SideFigures; 2]], side: usize) -> SideFigures {
    let m = |get: fn(&SideFigures) -> Option<f64>| {
        median(&rounds.iter().filter_map(|r| get(&r[side])).collect::<Vec<f64>>())
    };
    SideFigures {
        enqueue_single_per_s: m(|s| Some(s.enqueue_single_per_s)).unwrap_or_default(),
        enqueue_batched_per_s: m(|s| Some(s.enqueue_batched_per_s)).unwrap_or_default(),
        lifecycle_per_s: m(|s| Some(s.lifecycle_per_s)).unwrap_or_default(),
        lifecycle_many_per_s: m(|s| s.lifecycle_many_per_s),
        lifecycle_progress_per_s: m(|s| s.lifecycle_progress_per_s),
        idle_latency_ms_p50: m(|s| Some(s.idle_latency_ms_p50)).unwrap_or_default(),
        idle_latency_ms_p99: m(|s| Some(s.idle_latency_ms_p99)).unwrap_or_default(),
        redis_cpu_us_per_lifecycle: m(|s| s.redis_cpu_us_per_lifecycle),
        commands_per_lifecycle: m(|s| s.commands_per_lifecycle),
        memory_per_queued_run: m(|s| s.memory_per_queued_run),
        memory_per_finished_run: m(|s| s.memory_per_finished_run),
    }
}

fn print_table(r: &Report, a: &BenchArgs) {
    println!(
        "runledger bench --peer: Redis {} at {}, {} runs, {} rounds (medians; ratio = median of the rounds' ratios)",
        r.redis_version,
        r.redis_config,
        r.runs,
        r.rounds.len()
    );
    println!("| figure | {} | runledger | runledger / peer |", r.peer);
    println!("| --- | --- | --- | --- |");
    let show = |v: Option<f64>| match v {
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
        None => "n/a".into(),
    };
    for (key, label, get) in FIGURES {
        let label = label
            .replace("--workers Workers", &format!("{} Workers", a.workers))
            .replace("--workers", &format!("{} workers", a.workers))
            .replace("--many-workers", &format!("{} workers", a.many_workers));
        if key == &"lifecycle_many_per_s" && a.many_workers == 0 {
            continue;
        }
        let ratio = r.ratio.get(key).copied().flatten().map_or("n/a".into(), |v| format!("{v:.2}x"));
        println!("| {label} | {} | {} | {ratio} |", show(get(&r.median[1])), show(get(&r.median[0])));
    }
}
