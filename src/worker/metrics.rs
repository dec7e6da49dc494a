//! The worker's metrics, recorded through the [`metrics`] facade.
//!
//! A [`Worker`](super::Worker) records how long claims wait, how long
//! handlers run, lease renewals, lost leases and how each run ended. The
//! `metrics` macros are no-ops until a recorder is installed, so a library
//! user who installs none pays only a call per event; one who installs one
//! (`runledger worker --metrics-listen` installs a Prometheus exporter) gets
//! the series below. Call [`describe_metrics`] once, after installing the
//! recorder, to give them help texts and units.
//!
//! Names follow the Prometheus conventions: the unit in the name
//! (`_seconds`), `_total` on counters. Every series has a `queue` label, the
//! run's queue (a partition's own name for a partitioned queue).

use std::time::Duration;

use ::metrics::{Gauge, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

/// Histogram: from the start of a claim (its blocking wait included) to the
/// run it returned; successful claims only. A claim made by a finish (the
/// next run of the queue, in the same round trip) counts from that finish's
/// send. Labels: `queue`.
pub const CLAIM_WAIT_SECONDS: &str = "runledger_worker_claim_wait_seconds";
/// Histogram: how long a run's handler ran, from its start until it returned
/// or was aborted. Labels: `queue`, `outcome`.
pub const HANDLER_DURATION_SECONDS: &str = "runledger_worker_handler_duration_seconds";
/// Counter: lease renewals sent. Labels: `queue`, `result` (`ok` | `error`).
pub const LEASE_RENEWALS_TOTAL: &str = "runledger_worker_lease_renewals_total";
/// Counter: runs whose lease this worker lost: a renewal or the final write
/// found the claim stale, taken or gone, or the lease ran out by this
/// process's clock. Labels: `queue`.
pub const LEASES_LOST_TOTAL: &str = "runledger_worker_leases_lost_total";
/// Counter: runs this worker executed, by how they ended. Labels: `queue`, `outcome`.
pub const RUNS_TOTAL: &str = "runledger_worker_runs_total";
/// Gauge: runs being executed now (handler running or outcome being
/// written). Labels: `queue`.
pub const RUNS_IN_PROGRESS: &str = "runledger_worker_runs_in_progress";

/// The `queue` label.
pub const LABEL_QUEUE: &str = "queue";
/// The `outcome` label of [`RUNS_TOTAL`] and [`HANDLER_DURATION_SECONDS`].
pub const LABEL_OUTCOME: &str = "outcome";
/// The `result` label of [`LEASE_RENEWALS_TOTAL`].
pub const LABEL_RESULT: &str = "result";

/// `outcome` values: the run's terminal status as this worker wrote it...
pub const OUTCOME_COMPLETED: &str = "completed";
pub const OUTCOME_FAILED: &str = "failed";
pub const OUTCOME_CANCELLED: &str = "cancelled";
/// ...or: a retryable failure sent back to the queue with a backoff,
pub const OUTCOME_RETRIED: &str = "retried";
/// released back to the queue at shutdown,
pub const OUTCOME_RELEASED: &str = "released";
/// or abandoned: the lease was lost, or the outcome could not be written
/// (the lease then expires and the run is claimed again).
pub const OUTCOME_LOST: &str = "lost";

/// Registers the help text and unit of every worker metric with the
/// installed recorder. Call it once, after installing one.
pub fn describe_metrics() {
    describe_histogram!(
        CLAIM_WAIT_SECONDS,
        Unit::Seconds,
        "Time from the start of a claim (blocking wait included) to the run it returned."
    );
    describe_histogram!(HANDLER_DURATION_SECONDS, Unit::Seconds, "Time a run's handler ran, by how the run ended.");
    describe_counter!(LEASE_RENEWALS_TOTAL, Unit::Count, "Lease renewals sent, by result (ok, error).");
    describe_counter!(
        LEASES_LOST_TOTAL,
        Unit::Count,
        "Runs whose lease the worker lost (found stale, taken or gone, or expired)."
    );
    describe_counter!(
        RUNS_TOTAL,
        Unit::Count,
        "Runs executed, by outcome (completed, failed, cancelled, retried, released, lost)."
    );
    describe_gauge!(RUNS_IN_PROGRESS, Unit::Count, "Runs being executed now.");
}

/// Exports the per-queue series that would otherwise appear only with their
/// first event (lost leases, runs in progress) at zero, so that alerts on
/// them see a value from the start.
pub(crate) fn init_queues(queues: &[String]) {
    for queue in queues {
        counter!(LEASES_LOST_TOTAL, LABEL_QUEUE => queue.clone()).increment(0);
        gauge!(RUNS_IN_PROGRESS, LABEL_QUEUE => queue.clone()).increment(0.0);
    }
}

/// A claim returned a run of `queue` after waiting `waited`.
pub(crate) fn claimed(queue: &str, waited: Duration) {
    histogram!(CLAIM_WAIT_SECONDS, LABEL_QUEUE => queue.to_string()).record(waited.as_secs_f64());
}

/// A lease renewal of a run of `queue` came back (or failed).
pub(crate) fn renewal(queue: &str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    counter!(LEASE_RENEWALS_TOTAL, LABEL_QUEUE => queue.to_string(), LABEL_RESULT => result).increment(1);
}

/// The lease of a run of `queue` was lost.
pub(crate) fn lease_lost(queue: &str) {
    counter!(LEASES_LOST_TOTAL, LABEL_QUEUE => queue.to_string()).increment(1);
}

/// A run of `queue` ended with `outcome`, its handler having run for `handler`.
pub(crate) fn run_ended(queue: &str, outcome: &'static str, handler: Duration) {
    let labels = [(LABEL_QUEUE, queue.to_string()), (LABEL_OUTCOME, outcome.to_string())];
    histogram!(HANDLER_DURATION_SECONDS, &labels).record(handler.as_secs_f64());
    counter!(RUNS_TOTAL, &labels).increment(1);
}

/// Counts one run in [`RUNS_IN_PROGRESS`] while it lives: dropped when the
/// execution ends, however it ends (an aborted task included).
pub(crate) struct InProgress(Gauge);

impl InProgress {
    pub(crate) fn new(queue: &str) -> Self {
        let g = gauge!(RUNS_IN_PROGRESS, LABEL_QUEUE => queue.to_string());
        g.increment(1.0);
        InProgress(g)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
