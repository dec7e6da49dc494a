//! The standard bench on one server: the yardsticks, the enqueue rates, the
//! lifecycle at two worker counts, idle claim latency, claim cost at two
//! depths, the lifecycle step by step, memory per run and retention, into
//! the [`Figures`] that [`report`](super::report) prints.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::RngExt;
use runledger::{ClaimOutcome, ClaimRequest, Error, Finish, Result, RunStatus, Store};

use super::BenchArgs;
use super::limit::LIMIT_QUEUE;
use super::memory::PURGE_QUEUE;
use super::probe::{OPERATION_CALLS, Probe, commands_between, per_run};
use super::report::{Figures, na, print_check, print_table};
use super::steps::STEPS_QUEUE;
use super::workload::{self, enqueue_batched, enqueue_single, idle_latency, lifecycle, remove_prefix};
use crate::measure::percentile;
use crate::output::{Output, redacted};
use crate::private::PrivateRedis;
use crate::target::Target;

/// The queues the single-server bench fills (with `--shared`, under the given prefix).
const QUEUES: [&str; 9] = [
    "bench-single",
    "bench",
    "bench-many",
    "bench-idle",
    "bench-1k",
    "bench-deep",
    PURGE_QUEUE,
    STEPS_QUEUE,
    LIMIT_QUEUE,
];

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

/// The standard bench: every figure of the README's table on one server.
pub async fn run(target: &Target, out: &Output, a: BenchArgs) -> Result<()> {
    let prefix = target.prefix.as_str();
    workload::spread_over_runners(a.runners, a.runner_filter);
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
        let (queued, finished) = super::memory::stock_memory(target, &prefix, a.runs).await?;
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
    let limit = super::limit::limit(
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

    // 1. Enqueue, one call at a time; the commands of one create.
    let calls_before = probe.command_calls().await?;
    let spent =
        enqueue_single(&store, "bench-single", a.runs).await.map_err(|e| fresh_prefix_refused(e, fresh, &prefix))?;
    f.enqueue_single_per_s = a.runs as f64 / spent.as_secs_f64();
    if let (Some(before), Some(after)) = (calls_before, probe.command_calls().await?) {
        f.enqueue_single_commands = commands_between(&before, &after, a.runs).by_command.into_iter().collect();
    }
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
        let counted = commands_between(&calls_before, &calls_after, a.runs);
        f.command_breakdown = counted.by_command;
        f.command_us_breakdown = counted.us_by_command;
        f.script_us_per_lifecycle = Some(counted.script_us);
        f.commands_per_lifecycle = Some(counted.total);
        // Round trips: the commands only a client sends (scripts, blocking
        // waits, pool pings); commands run inside scripts are not round trips.
        f.round_trips_per_lifecycle = Some(
            OPERATION_CALLS
                .iter()
                .chain(&["blpop", "ping"])
                .map(|c| f.command_breakdown.get(*c).copied().unwrap_or(0.0))
                .sum(),
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
    let steps = super::steps::steps(&store, probe, a.runs).await?;
    let step = |name: &str, s: &super::steps::StepCost| {
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
    use super::memory::{longest_script_us, purge_backlog, purge_rate, reset_stats};
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
            let own: Vec<String> = run_ids
                .iter()
                .flat_map(|id| [keys.run(id), keys.events(id)].into_iter().chain(keys.docs(id)))
                .collect();
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
            keys.docs_hash(),
        ];
        for i in 0..workload::runner_count() {
            own.push(keys.runner_lane(&workload::bench_runner(i)));
            own.push(keys.runner_wake(&workload::bench_runner(i)));
        }
        let _: () = redis::cmd("DEL").arg(&own[..]).query_async(&mut conn).await?;
    }
    Ok(removed)
}
