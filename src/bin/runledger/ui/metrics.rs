//! `/metrics`: queue depths, counters and runtimes in the Prometheus text
//! format, read from Redis at scrape time. Its cost is bounded: one
//! `queue_stats` script per physical queue (a few ZCARDs and HGETALLs, never
//! a walk over runs), plus the queue list, the partition table and the
//! runtime stats.
//!
//! Labels: `queue` is the logical queue, `partition` the physical one (the
//! same name for a queue that is not partitioned), so `sum by (queue)` adds
//! up a partitioned queue. The text is written by the
//! `metrics-exporter-prometheus` encoder, through a recorder made for the
//! scrape.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;
use runledger::QueueStats;
use runledger::RuntimeStats;

use super::Shared;

pub const QUEUE_RUNS: &str = "runledger_queue_runs";
pub const OLDEST_QUEUED: &str = "runledger_queue_oldest_queued_age_seconds";
pub const LEASES: &str = "runledger_queue_leases";
pub const RUNS_TOTAL: &str = "runledger_runs_total";
pub const RUNTIMES: &str = "runledger_runtimes";
pub const QUEUES: &str = "runledger_queues";
pub const PAUSED: &str = "runledger_queue_paused";
pub const PAUSED_GROUPS: &str = "runledger_queue_paused_groups";
pub const WAITING_FOR_GROUP: &str = "runledger_queue_waiting_for_group";

pub async fn scrape(State(ui): State<Shared>) -> Response {
    let read = async {
        let rows = ui.store.queue_overview(0).await?;
        let runtimes =
            ui.store.runtime_stats_with(&QueueStats::physical(&rows).into_iter().cloned().collect::<Vec<_>>()).await?;
        Ok::<_, runledger::Error>((rows, runtimes))
    };
    match read.await {
        Ok((rows, runtimes)) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], render(&rows, &runtimes))
                .into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("# reading Redis failed: {e}\n")).into_response(),
    }
}

/// The exposition of one scrape: physical queues only (a merged row of a
/// partitioned queue would count its runs twice).
pub fn render(rows: &[QueueStats], runtimes: &RuntimeStats) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        describe_gauge!(QUEUE_RUNS, "Runs in a queue now, by status (dead and finished are retained runs).");
        describe_gauge!(OLDEST_QUEUED, Unit::Seconds, "Age of the oldest claimable run.");
        describe_gauge!(LEASES, "Claims held under a lease.");
        describe_counter!(
            RUNS_TOTAL,
            "Runs by what happened to them: created, completed, failed, cancelled, timeout, dead, reclaimed."
        );
        describe_gauge!(RUNTIMES, "Registered runtimes by status.");
        describe_gauge!(QUEUES, "Logical queues.");
        describe_gauge!(PAUSED, "1 while the queue is paused (claims hand out nothing), else 0.");
        describe_gauge!(PAUSED_GROUPS, "Paused groups of the queue.");
        describe_gauge!(WAITING_FOR_GROUP, "Queued runs waiting for a slot of their group (at its limit or paused).");
        gauge!(QUEUES).set(rows.iter().filter(|s| s.partition_of.is_none()).count() as f64);
        for s in QueueStats::physical(rows) {
            let queue = s.partition_of.clone().unwrap_or_else(|| s.queue_name.clone());
            let partition = s.queue_name.clone();
            for (status, n) in [
                ("queued", s.queued),
                ("delayed", s.delayed),
                ("pinned", s.pinned),
                ("claimed", s.claimed),
                ("running", s.running),
                ("dead", s.dead),
                ("finished", s.finished),
            ] {
                gauge!(QUEUE_RUNS, "queue" => queue.clone(), "partition" => partition.clone(), "status" => status)
                    .set(n as f64);
            }
            gauge!(OLDEST_QUEUED, "queue" => queue.clone(), "partition" => partition.clone())
                .set(s.oldest_queued_age.unwrap_or(0.0));
            gauge!(LEASES, "queue" => queue.clone(), "partition" => partition.clone()).set(s.claimed as f64);
            gauge!(PAUSED, "queue" => queue.clone(), "partition" => partition.clone())
                .set(f64::from(u8::from(s.paused)));
            gauge!(PAUSED_GROUPS, "queue" => queue.clone(), "partition" => partition.clone())
                .set(s.paused_groups as f64);
            gauge!(WAITING_FOR_GROUP, "queue" => queue.clone(), "partition" => partition.clone())
                .set(s.waiting_for_group as f64);
            for (status, n) in &s.counters {
                counter!(RUNS_TOTAL, "queue" => queue.clone(), "partition" => partition.clone(), "status" => status.clone())
                    .absolute(*n as u64);
            }
        }
        gauge!(RUNTIMES, "status" => "online").set(runtimes.online_count as f64);
        gauge!(RUNTIMES, "status" => "stale").set(runtimes.stale_count as f64);
    });
    handle.render()
}
