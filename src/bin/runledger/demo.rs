//! `runledger demo`, the main job: a host and several workers on one Redis,
//! one worker killed midway, live progress, and a summary that checks every
//! run ended exactly once with a complete event stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rand::RngExt;
use runledger::{Backoff, Direction, Error, NewRun, Result, RunStatus, Store, Worker};
use serde::Serialize;
use serde_json::json;

use crate::measure::percentile;
use crate::output::{Output, redacted};
use crate::private::PrivateRedis;
use crate::simulate::{Simulation, handle};
use crate::target::Target;

#[derive(Args, Clone)]
pub struct DemoArgs {
    /// Runs to enqueue (80 % at once, the rest one by one into idle workers).
    #[arg(long, default_value_t = 300)]
    pub runs: usize,
    /// Workers started in this process (the first is killed midway).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Handlers per worker.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Simulated work per run, in milliseconds.
    #[arg(long, default_value_t = 120)]
    pub work_ms: u64,
    /// Chance that an attempt fails (retryable).
    #[arg(long, default_value_t = 0.05)]
    pub fail_rate: f64,
    /// Lease in seconds: how long the killed worker's runs wait to be re-claimed.
    #[arg(long, default_value_t = 2.0)]
    pub lease: f64,
    /// With REDIS_URL: use --prefix as it is instead of a fresh one, so workers
    /// already serving alpha/beta/gamma under it (docker compose's) join in.
    #[arg(long)]
    pub shared: bool,
    /// Without REDIS_URL: start a private Redis Sentinel setup (a master, 2
    /// replicas, 3 sentinels) instead of one redis-server.
    #[arg(long, conflicts_with = "shared")]
    pub sentinel: bool,
    /// Give up if the runs are not all finished after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

const QUEUES: [&str; 3] = ["alpha", "beta", "gamma"];

#[derive(Serialize)]
struct Summary {
    redis: String,
    prefix: String,
    runs: usize,
    completed: usize,
    failed: usize,
    workers: usize,
    concurrency: usize,
    killed_workers: usize,
    wall_seconds: f64,
    throughput_runs_per_s: f64,
    events: usize,
    idle_claim_latency_ms_p50: f64,
    idle_claim_latency_ms_p99: f64,
    idle_claim_samples: usize,
    reclaims: i64,
    retries: i64,
    check_ok: bool,
    problems: Vec<String>,
}

/// The counters of one queue the demo follows.
struct Tally {
    finishes: i64,
    reclaimed: i64,
}

impl Tally {
    fn of(stats: &runledger::QueueStats) -> Tally {
        let count = |name: &str| stats.counters.get(name).copied().unwrap_or(0);
        Tally {
            finishes: ["completed", "failed", "cancelled", "timeout"].iter().map(|s| count(s)).sum(),
            reclaimed: count("reclaimed"),
        }
    }

    fn minus(&self, before: &Tally) -> Tally {
        Tally { finishes: self.finishes - before.finishes, reclaimed: self.reclaimed - before.reclaimed }
    }
}

pub async fn run(target: &Target, out: &Output, a: DemoArgs) -> Result<()> {
    let prefix = target.prefix.as_str();
    if a.runs == 0 || a.workers == 0 || a.concurrency == 0 {
        return Err(Error::Invalid("--runs, --workers and --concurrency must be at least 1".into()));
    }
    // Run ids are unique per demo, so demos can share a prefix.
    let tag = format!("{:08x}", rand::rng().random::<u32>());
    if a.sentinel && target.url.is_some() {
        return Err(Error::Invalid(
            "demo --sentinel starts a private Sentinel setup; with --redis / REDIS_URL pass a \
             redis+sentinel:// URL (or --sentinel-master) instead"
                .into(),
        ));
    }
    let (server, url, prefix) = match target.url.clone() {
        Some(url) if a.shared => (None, url, prefix.to_string()),
        Some(url) => (None, url, format!("{prefix}-demo-{tag}")),
        None if a.sentinel && target.cluster => {
            return Err(Error::Invalid("demo: --sentinel and --cluster exclude each other".into()));
        }
        None => {
            let server =
                if a.sentinel { PrivateRedis::start_sentinel()? } else { PrivateRedis::start(target.cluster)? };
            let url = server.url();
            (Some(server), url, prefix.to_string())
        }
    };
    eprintln!(
        "demo: Redis at {}{}, key prefix {prefix}",
        redacted(&url),
        server.as_ref().map(PrivateRedis::describe).unwrap_or_default()
    );
    let store = Store::connect_with(&url, target.config(&prefix)).await?;
    let lease = runledger::validate::seconds("--lease", a.lease)?;
    // A fresh prefix on a given server is refused to an ACL user limited to its own prefix.
    let fresh = server.is_none() && !a.shared;
    let refused = |e: Error| match &e {
        Error::Redis(r) if fresh && matches!(r.kind(), redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)) => {
            Error::Server(format!(
                "demo: the Redis user may not use the demo's fresh key prefix {prefix} ({e}); \
                 for a user limited to its own prefix run the demo with --shared"
            ))
        }
        _ => e,
    };
    // Counts before the demo, so that a shared prefix with history still adds up.
    let mut baseline = HashMap::new();
    for q in QUEUES {
        baseline.insert(q, Tally::of(&store.queue_stats(q, 0).await.map_err(refused)?));
    }
    let started = Instant::now();

    // Host: 80 % of the runs at once, over three queues and ten priorities.
    let bulk = (a.runs * 4 / 5).max(1).min(a.runs);
    let mut ids: Vec<(String, &str)> = Vec::with_capacity(a.runs);
    let new_run = |i: usize| {
        let queue = QUEUES[i % QUEUES.len()];
        let run = NewRun::new(format!("demo-{tag}-{i:05}"), "demo-agent")
            .queue(queue)
            .priority(rand::rng().random_range(0..10))
            .metadata(json!({ "prompt": format!("task number {i}"), "user": "demo" }));
        (run, queue)
    };
    for chunk in (0..bulk).collect::<Vec<_>>().chunks(100) {
        let runs: Vec<NewRun> = chunk.iter().map(|&i| new_run(i).0).collect();
        store.create_runs(&runs).await?;
        ids.extend(chunk.iter().map(|&i| (format!("demo-{tag}-{i:05}"), QUEUES[i % QUEUES.len()])));
    }

    // Workers, all in this process; each notes when it entered a run's first attempt.
    let entered: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let sim = Simulation { work_ms: a.work_ms, steps: 3, fail_rate: a.fail_rate };
    let mut handles = Vec::new();
    let mut tokens = Vec::new();
    for w in 0..a.workers {
        let entered = entered.clone();
        let worker = Worker::builder(&store)
            .runtime_id(format!("demo-worker-{w}-{}", std::process::id()))
            .queues(QUEUES)
            .concurrency(a.concurrency)
            .lease(lease)
            .heartbeat(Duration::from_secs(1))
            .reap_every(Some(Duration::from_secs(1)))
            .backoff(Backoff { base: Duration::from_millis(100), max: Duration::from_secs(2), max_attempts: 6 })
            .handle_signals(false)
            .build(move |ctx| {
                if ctx.run.dispatch_attempts == 1 {
                    lock(&entered).insert(ctx.run.run_id.clone(), Instant::now());
                }
                handle(ctx, sim)
            })?;
        tokens.push(worker.shutdown_token());
        handles.push(tokio::spawn(worker.run()));
    }

    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>6} [{bar:30}] {pos}/{len} {msg}")
        .map_err(|e| Error::Invalid(e.to_string()))?
        .progress_chars("=> ");
    let per_queue: Vec<ProgressBar> = QUEUES
        .iter()
        .enumerate()
        .map(|(qi, q)| {
            let total = (0..a.runs).filter(|i| i % QUEUES.len() == qi).count();
            let bar = bars.add(ProgressBar::new(total as u64));
            bar.set_style(style.clone());
            bar.set_prefix(q.to_string());
            bar
        })
        .collect();
    let status = bars.add(ProgressBar::new_spinner());

    let mut killed = 0;
    let mut trickled = bulk;
    let mut next_trickle = Instant::now();
    let deadline = started + Duration::from_secs(a.timeout);
    let mut last_events = (Instant::now(), 0i64);
    loop {
        let mut finished = 0;
        let mut reclaimed = 0;
        for (qi, q) in QUEUES.iter().enumerate() {
            let s = store.queue_stats(q, 0).await?;
            let now = Tally::of(&s).minus(&baseline[q]);
            finished += now.finishes;
            per_queue[qi].set_position(now.finishes.max(0) as u64);
            per_queue[qi].set_message(format!("queued {} claimed {} delayed {}", s.queued, s.claimed, s.delayed));
            reclaimed += now.reclaimed;
        }
        let elapsed = last_events.0.elapsed().as_secs_f64().max(0.001);
        let rate = (finished - last_events.1) as f64 / elapsed;
        last_events = (Instant::now(), finished);
        status.set_message(format!(
            "{finished}/{} finished  {:.0} runs/s  re-claims {}  workers alive {}",
            a.runs,
            rate,
            reclaimed,
            a.workers - killed
        ));

        // Kill the first worker abruptly once 40 % of the bulk is done.
        if killed == 0 && a.workers > 1 && finished as usize >= bulk * 2 / 5 {
            handles[0].abort();
            killed = 1;
            bars.println("demo: worker 0 killed (no release, no deregister): its runs come back after the lease").ok();
        }
        // Once the bulk is done and the workers idle, trickle the rest in one by
        // one: the time from enqueue to handler is the idle claim latency.
        let trickling = trickled < a.runs && finished as usize >= bulk;
        if trickling && Instant::now() >= next_trickle {
            let (run, queue) = new_run(trickled);
            sent.insert(run.run_id.clone(), Instant::now());
            store.create_run(&run).await?;
            ids.push((run.run_id.clone(), queue));
            trickled += 1;
            next_trickle = Instant::now() + Duration::from_millis(15);
        }
        if finished as usize >= a.runs {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Server(format!(
                "demo: only {finished} of {} runs finished within {} s",
                a.runs, a.timeout
            )));
        }
        let pause = if trickling { 2 } else { 100 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    for bar in &per_queue {
        bar.finish();
    }
    status.finish_and_clear();
    for t in &tokens {
        t.cancel();
    }
    for h in handles {
        let _ = h.await;
    }

    // The check: every run terminal, finished exactly once, full event stream.
    let mut problems = Vec::new();
    let (mut completed, mut failed, mut events, mut extra_attempts) = (0, 0, 0, 0);
    for (run_id, _) in &ids {
        let run = store.get_run(run_id).await?;
        match run.status {
            RunStatus::Completed => completed += 1,
            RunStatus::Failed => failed += 1,
            other => problems.push(format!("{run_id} ended {other}")),
        }
        extra_attempts += (run.dispatch_attempts - 1).max(0);
        let mut seqs = Vec::new();
        // An attempt cut short by the killed worker may have emitted its own
        // `finished` before it died; the attempt that completed the run emits
        // exactly one, as its last event.
        let mut finished_events = 0;
        let mut last_is_finish = false;
        let mut after = None;
        loop {
            let page = store.page_run_events(run_id, None, after, 100, Direction::Forward).await?;
            for e in &page.items {
                seqs.push(e.sequence);
                let final_finish =
                    e.event_type == "finished" && e.data["attempt"].as_i64() == Some(run.dispatch_attempts);
                if final_finish {
                    finished_events += 1;
                }
                last_is_finish = final_finish;
            }
            after = page.items.last().map(|e| e.sequence);
            if !page.has_more {
                break;
            }
        }
        events += seqs.len();
        if seqs.iter().enumerate().any(|(i, &s)| s != i as i64 + 1) {
            problems.push(format!("{run_id}: event sequences not contiguous from 1: {seqs:?}"));
        }
        if run.status == RunStatus::Completed && (finished_events != 1 || !last_is_finish) {
            problems.push(format!(
                "{run_id}: completed by attempt {} with {finished_events} 'finished' events of that attempt{}",
                run.dispatch_attempts,
                if last_is_finish { "" } else { ", not as its last event" }
            ));
        }
    }
    let mut finishes = 0;
    let mut reclaims = 0;
    for q in QUEUES {
        let now = Tally::of(&store.queue_stats(q, 0).await?).minus(&baseline[q]);
        finishes += now.finishes;
        reclaims += now.reclaimed;
    }
    if finishes != a.runs as i64 {
        problems.push(format!("{finishes} finishes recorded for {} runs", a.runs));
    }
    let mut samples: Vec<f64> = {
        let entered = lock(&entered);
        sent.iter()
            .filter_map(|(id, at)| entered.get(id).map(|e| e.duration_since(*at).as_secs_f64() * 1000.0))
            .collect()
    };
    samples.sort_by(|x, y| x.total_cmp(y));
    let summary = Summary {
        redis: redacted(&url),
        prefix,
        runs: a.runs,
        completed,
        failed,
        workers: a.workers,
        concurrency: a.concurrency,
        killed_workers: killed,
        wall_seconds: wall,
        throughput_runs_per_s: a.runs as f64 / wall,
        events,
        idle_claim_latency_ms_p50: percentile(&samples, 0.5),
        idle_claim_latency_ms_p99: percentile(&samples, 0.99),
        idle_claim_samples: samples.len(),
        reclaims,
        retries: extra_attempts,
        check_ok: problems.is_empty(),
        problems,
    };
    drop(server);
    if out.json {
        out.json(&summary);
    } else {
        print_summary(&summary);
    }
    if summary.check_ok {
        Ok(())
    } else {
        Err(Error::Server(format!("demo check failed: {}", summary.problems.join("; "))))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn print_summary(s: &Summary) {
    println!();
    println!("runledger demo summary");
    println!("  runs                {} (completed {}, failed after retries {})", s.runs, s.completed, s.failed);
    println!(
        "  workers             {} x concurrency {} ({} killed midway)",
        s.workers, s.concurrency, s.killed_workers
    );
    println!("  wall time           {:.1} s", s.wall_seconds);
    println!("  throughput          {:.1} runs/s", s.throughput_runs_per_s);
    println!("  events              {}", s.events);
    println!(
        "  idle claim latency  p50 {:.2} ms  p99 {:.2} ms  ({} runs enqueued one by one into idle workers)",
        s.idle_claim_latency_ms_p50, s.idle_claim_latency_ms_p99, s.idle_claim_samples
    );
    println!("  re-claims           {} (leases that expired, mostly the killed worker's)", s.reclaims);
    println!("  extra attempts      {} (retries and re-claims)", s.retries);
    if s.check_ok {
        println!("  check               OK: every run ended exactly once with a complete event stream");
    } else {
        println!("  check               FAILED:");
        for p in &s.problems {
            println!("    - {p}");
        }
    }
}
