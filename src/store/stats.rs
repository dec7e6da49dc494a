//! LangBot's stats: runs and runners over a creation window, and runtimes.
//!
//! Run and runner stats read every run created in the window: one read-only
//! script per queue (`lua/run_stats.lua`, each in its queue's slot) walks the
//! queue's `runs` index from the window's first id and returns each run's
//! runner, status and times; the sums, rates and percentiles are made here.
//! The cost is one HMGET per run created in the window, in scripts of
//! STATS_BUDGET runs, for every queue.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::{Store, reply};
use crate::error::{Error, Result};
use crate::model::{QueueStats, RunStatus};
use crate::validate;

/// Index entries one run_stats call looks at, at most.
const STATS_BUDGET: usize = 5000;

/// LangBot's `get_run_stats` dict.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunStats {
    pub start_time: i64,
    pub end_time: i64,
    pub total_count: u64,
    pub created_count: u64,
    pub queued_count: u64,
    pub claimed_count: u64,
    pub running_count: u64,
    pub completed_count: u64,
    pub failed_count: u64,
    pub cancelled_count: u64,
    pub timeout_count: u64,
    pub throughput_per_hour: f64,
    pub success_rate: Option<f64>,
    pub failure_rate: Option<f64>,
    pub avg_duration_seconds: Option<f64>,
    pub p50_duration_seconds: Option<f64>,
    pub p95_duration_seconds: Option<f64>,
    pub p99_duration_seconds: Option<f64>,
    pub avg_queue_wait_seconds: Option<f64>,
}

/// LangBot's `get_runtime_stats` dict.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuntimeStats {
    pub total_count: u64,
    pub online_count: u64,
    pub stale_count: u64,
    pub avg_heartbeat_age_seconds: Option<f64>,
    pub max_heartbeat_age_seconds: Option<f64>,
    /// Runs claimed or running, over every queue.
    pub active_runs: u64,
    pub claimed_runs: u64,
}

/// One item of LangBot's `get_runner_stats` list.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunnerStats {
    pub runner_id: String,
    pub total_runs: u64,
    /// Queued, claimed or running.
    pub active_runs: u64,
    pub completed_runs: u64,
    /// Failed or timeout.
    pub failed_runs: u64,
    pub success_rate: f64,
    pub avg_duration_seconds: Option<f64>,
    /// Always null, as upstream: runledger knows no runner labels.
    pub runner_label: Option<String>,
    /// Always null, as upstream: runledger knows no plugins.
    pub plugin_identity: Option<String>,
}

/// One run of the window, as run_stats.lua reports it (times in ms).
#[derive(Clone, Debug)]
struct WindowRun {
    runner_id: String,
    status: RunStatus,
    created_ms: i64,
    started_ms: Option<i64>,
    finished_ms: Option<i64>,
}

impl WindowRun {
    /// finished - started of a completed run, in seconds.
    fn duration(&self) -> Option<f64> {
        match (self.status, self.started_ms, self.finished_ms) {
            (RunStatus::Completed, Some(s), Some(f)) => Some((f - s) as f64 / 1000.0),
            _ => None,
        }
    }
}

/// Rounded to `places` decimals.
fn round(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}

/// The mean, rounded to 2 decimals as LangBot rounds its averages.
fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| round(values.iter().sum::<f64>() / values.len() as f64, 2))
}

/// Nearest-rank percentile of sorted values: the ceil(p/100 * n)-th smallest.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).map(|v| round(*v, 3))
}

fn ratio(part: u64, total: u64) -> Option<f64> {
    (total > 0).then(|| round(part as f64 / total as f64, 4))
}

fn check_window(start_time: i64, end_time: i64) -> Result<(i64, i64)> {
    const MAX_S: i64 = 1_000_000_000_000;
    for (name, value) in [("start_time", start_time), ("end_time", end_time)] {
        if !(0..=MAX_S).contains(&value) {
            return Err(Error::Invalid(format!("{name} must be epoch seconds in [0, {MAX_S}], got {value}")));
        }
    }
    if end_time < start_time {
        return Err(Error::Invalid(format!("end_time {end_time} is before start_time {start_time}")));
    }
    // Both ends inclusive, in whole seconds of created_at.
    Ok((start_time * 1000, end_time * 1000 + 999))
}

impl Store {
    /// Every run created in [start_ms, end_ms] over all queues (of one runner).
    async fn window_runs(&self, start_ms: i64, end_ms: i64, runner_id: Option<&str>) -> Result<Vec<WindowRun>> {
        let mut out = Vec::new();
        for queue in self.known_queues().await? {
            let keys = self.queue_keys(&queue);
            let index = [keys.runs_index()];
            let mut cursor = String::new();
            loop {
                let args = vec![
                    keys.base.clone(),
                    start_ms.to_string(),
                    end_ms.to_string(),
                    cursor.clone(),
                    STATS_BUDGET.to_string(),
                    runner_id.unwrap_or_default().to_string(),
                ];
                let value = self.eval(&self.scripts().run_stats, &index, &args).await?;
                let mut parts = reply::array(value)?.into_iter();
                let exhausted = parts.next().map(reply::int).transpose()?.unwrap_or(1) == 1;
                let last = parts.next().map(reply::string).transpose()?.unwrap_or_default();
                let values = parts.map(reply::string).collect::<Result<Vec<_>>>()?;
                for run in values.chunks(5) {
                    let [runner, status, created, started, finished] = run else {
                        return Err(Error::Protocol("run_stats: a run of fewer than five values".into()));
                    };
                    let time = |v: &String| -> Result<Option<i64>> {
                        if v.is_empty() {
                            return Ok(None);
                        }
                        v.parse()
                            .map(Some)
                            .map_err(|_| Error::Protocol(format!("run_stats: time is not an integer: {v}")))
                    };
                    out.push(WindowRun {
                        runner_id: runner.clone(),
                        status: status.parse()?,
                        created_ms: time(created)?.unwrap_or(0),
                        started_ms: time(started)?,
                        finished_ms: time(finished)?,
                    });
                }
                if exhausted || last.is_empty() {
                    break;
                }
                cursor = last;
            }
        }
        Ok(out)
    }

    /// LangBot's `get_run_stats`: counts, rates and durations of the runs
    /// created between `start_time` and `end_time` (epoch seconds, both
    /// inclusive), of one runner when given. Reads every run of the window.
    pub async fn get_run_stats(&self, start_time: i64, end_time: i64, runner_id: Option<&str>) -> Result<RunStats> {
        let (start_ms, end_ms) = check_window(start_time, end_time)?;
        validate::opt_id("runner_id", runner_id)?;
        let runs = self.window_runs(start_ms, end_ms, runner_id).await?;
        let mut counts: HashMap<RunStatus, u64> = HashMap::new();
        for run in &runs {
            *counts.entry(run.status).or_default() += 1;
        }
        let count = |s: RunStatus| counts.get(&s).copied().unwrap_or(0);
        let total = runs.len() as u64;
        let mut durations: Vec<f64> = runs.iter().filter_map(WindowRun::duration).collect();
        durations.sort_by(f64::total_cmp);
        // A wait below zero (a clock set back between create and claim) says nothing: skipped.
        let waits: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.started_ms.map(|s| (s - r.created_ms) as f64 / 1000.0))
            .filter(|w| *w >= 0.0)
            .collect();
        // As LangBot: the window counts as 0.001 h at least.
        let hours = ((end_time - start_time) as f64 / 3600.0).max(0.001);
        Ok(RunStats {
            start_time,
            end_time,
            total_count: total,
            created_count: count(RunStatus::Created),
            queued_count: count(RunStatus::Queued),
            claimed_count: count(RunStatus::Claimed),
            running_count: count(RunStatus::Running),
            completed_count: count(RunStatus::Completed),
            failed_count: count(RunStatus::Failed),
            cancelled_count: count(RunStatus::Cancelled),
            timeout_count: count(RunStatus::Timeout),
            throughput_per_hour: round(total as f64 / hours, 2),
            success_rate: ratio(count(RunStatus::Completed), total),
            failure_rate: ratio(count(RunStatus::Failed) + count(RunStatus::Timeout), total),
            avg_duration_seconds: mean(&durations),
            p50_duration_seconds: percentile(&durations, 50.0),
            p95_duration_seconds: percentile(&durations, 95.0),
            p99_duration_seconds: percentile(&durations, 99.0),
            avg_queue_wait_seconds: mean(&waits),
        })
    }

    /// LangBot's `get_runner_stats`: one item per runner with runs created in
    /// the window, most runs first (then by runner id), at most `limit`
    /// (clamped to 1..=100, as LangBot). Reads every run of the window.
    pub async fn get_runner_stats(&self, start_time: i64, end_time: i64, limit: usize) -> Result<Vec<RunnerStats>> {
        let (start_ms, end_ms) = check_window(start_time, end_time)?;
        let limit = limit.clamp(1, 100);
        let runs = self.window_runs(start_ms, end_ms, None).await?;
        let mut by_runner: BTreeMap<&str, Vec<&WindowRun>> = BTreeMap::new();
        for run in runs.iter().filter(|r| !r.runner_id.is_empty()) {
            by_runner.entry(&run.runner_id).or_default().push(run);
        }
        let mut out: Vec<RunnerStats> = by_runner
            .into_iter()
            .map(|(runner_id, runs)| {
                let total = runs.len() as u64;
                let with = |statuses: &[RunStatus]| runs.iter().filter(|r| statuses.contains(&r.status)).count() as u64;
                let completed = with(&[RunStatus::Completed]);
                let durations: Vec<f64> = runs.iter().filter_map(|r| r.duration()).collect();
                RunnerStats {
                    runner_id: runner_id.to_string(),
                    total_runs: total,
                    active_runs: with(&[RunStatus::Queued, RunStatus::Claimed, RunStatus::Running]),
                    completed_runs: completed,
                    failed_runs: with(&[RunStatus::Failed, RunStatus::Timeout]),
                    success_rate: ratio(completed, total).unwrap_or(0.0),
                    avg_duration_seconds: mean(&durations),
                    runner_label: None,
                    plugin_identity: None,
                }
            })
            .collect();
        out.sort_by(|a, b| b.total_runs.cmp(&a.total_runs).then_with(|| a.runner_id.cmp(&b.runner_id)));
        out.truncate(limit);
        Ok(out)
    }

    /// LangBot's `get_runtime_stats`: the registered runtimes (online, stale,
    /// heartbeat ages by the server's clock) and the runs claimed or running
    /// over every queue (one queue_stats script per queue).
    pub async fn get_runtime_stats(&self) -> Result<RuntimeStats> {
        let mut queues = Vec::new();
        for queue in self.known_queues().await? {
            queues.push(self.queue_stats(&queue, 0).await?);
        }
        self.runtime_stats_with(&queues).await
    }

    /// `get_runtime_stats` with the stats of every physical queue already
    /// read (a dashboard or a scrape that has them saves a second pass).
    pub async fn runtime_stats_with(&self, queues: &[QueueStats]) -> Result<RuntimeStats> {
        let everyone = self.runtimes_matching(&[], None).await?;
        let now_s = self.server_time_ms().await? as f64 / 1000.0;
        let ages: Vec<f64> =
            everyone.iter().filter_map(|r| r.last_heartbeat_at.map(|hb| (now_s - hb as f64).max(0.0))).collect();
        let claimed: u64 = queues.iter().map(|s| s.claimed.max(0) as u64).sum();
        let running: u64 = queues.iter().map(|s| s.running.max(0) as u64).sum();
        Ok(RuntimeStats {
            total_count: everyone.len() as u64,
            online_count: everyone.iter().filter(|r| r.status == "online").count() as u64,
            stale_count: everyone.iter().filter(|r| r.status == "stale").count() as u64,
            avg_heartbeat_age_seconds: mean(&ages),
            max_heartbeat_age_seconds: ages.iter().copied().reduce(f64::max).map(|a| round(a, 2)),
            active_runs: claimed + running,
            claimed_runs: claimed,
        })
    }
}
