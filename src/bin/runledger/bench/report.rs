//! The standard bench's figures, its table and `--check`: every figure beside
//! its target, each target a ratio to a yardstick of the same run.

use std::collections::HashMap;

use serde::Serialize;

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
    /// Calls per run of each command of the single enqueue, sorted by name.
    pub enqueue_single_commands: std::collections::BTreeMap<String, f64>,
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
    /// Microseconds per lifecycle spent in each command of `command_breakdown`
    /// (INFO commandstats; a script's figure includes the commands it called).
    pub command_us_breakdown: HashMap<String, f64>,
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
    pub steps: Option<super::steps::Steps>,
    /// The yardsticks of this run (round trip, minimal commands), which the
    /// `--check` targets are ratios to.
    pub limit: Option<super::limit::Limit>,
}

/// A figure, or `n/a` when it could not be read.
pub(crate) fn na(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.decimals$}"))
}

pub(crate) fn print_table(f: &Figures) {
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
fn two_trip_rate(l: &super::limit::Limit, workers: usize) -> Option<f64> {
    l.two_trip_lifecycle_per_s.iter().find(|(w, _)| *w == workers).map(|(_, r)| *r)
}

/// Prints figure vs target; returns how many fall short. Every speed target is
/// a ratio to a yardstick measured in this run (see `limit.rs`), never a
/// number from another machine or day.
pub(crate) fn print_check(f: &Figures, to_stderr: bool) -> usize {
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
