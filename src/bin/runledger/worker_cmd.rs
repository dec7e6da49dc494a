//! `runledger worker`: a demo worker anyone can run to watch the system work,
//! optionally serving its metrics to Prometheus (`--metrics-listen`).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use runledger::{Backoff, Error, Result, RunFilter, Store, Worker, validate};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::output::Output;
use crate::simulate::{Simulation, handle};

#[derive(Args, Clone)]
pub struct WorkerArgs {
    /// Queues to serve (repeat), in order of preference.
    #[arg(long = "queue", required = true)]
    pub queues: Vec<String>,
    /// Relative weights, one per --queue (default: strict order).
    #[arg(long = "weight")]
    pub weights: Vec<u32>,
    /// Only runs of these runners (repeat).
    #[arg(long = "runner")]
    pub runners: Vec<String>,
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Lease length in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub lease: f64,
    /// Heartbeat interval in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub heartbeat: f64,
    /// Default: hostname-pid-random.
    #[arg(long)]
    pub runtime_id: Option<String>,
    /// Simulated work per run, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub work_ms: u64,
    /// Progress events per run.
    #[arg(long, default_value_t = 3)]
    pub steps: u32,
    /// Chance that an attempt fails (retryable).
    #[arg(long, default_value_t = 0.05)]
    pub fail_rate: f64,
    /// Seconds in-flight runs may finish after SIGTERM before they are released.
    #[arg(long, default_value_t = 10.0)]
    pub grace: f64,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9464;
    /// port 0 picks a free one, printed on stderr).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

pub fn build(store: &Store, a: &WorkerArgs, handle_signals: bool) -> Result<Worker> {
    let sim = Simulation { work_ms: a.work_ms, steps: a.steps, fail_rate: a.fail_rate };
    let mut builder = Worker::builder(store)
        .queues(a.queues.iter().cloned())
        .concurrency(a.concurrency)
        .lease(validate::seconds("--lease", a.lease)?)
        .heartbeat(validate::seconds("--heartbeat", a.heartbeat)?)
        .grace(Duration::from_secs_f64(a.grace.max(0.0)))
        .backoff(Backoff { base: Duration::from_millis(200), max: Duration::from_secs(10), max_attempts: 5 })
        .handle_signals(handle_signals);
    if !a.weights.is_empty() {
        builder = builder.weights(a.weights.clone());
    }
    for runner in &a.runners {
        builder = builder.runner(runner.clone());
    }
    if let Some(id) = &a.runtime_id {
        builder = builder.runtime_id(id.clone());
    }
    builder.build(move |ctx| handle(ctx, sim))
}

/// Reads the keys the worker is about to use (its queues', its runtime's):
/// a Redis user without the rights to them (an ACL user limited to another
/// prefix) fails here in one line, where the Worker would take the refusal
/// for an outage and retry for ever. Any other error is left to the Worker,
/// which waits out an outage.
async fn check_access(store: &Store, worker: &Worker, queues: &[String]) -> Result<()> {
    let filter = RunFilter { queues: queues.to_vec(), limit: 1, ..Default::default() };
    let probes = [store.list_runs(&filter).await.err(), store.get_runtime(worker.runtime_id()).await.err()];
    for e in probes.into_iter().flatten() {
        if let Error::Redis(r) = &e
            && matches!(r.kind(), redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm))
        {
            return Err(Error::Server(format!(
                "the Redis user may not use the keys of prefix {} ({e}); its ACL needs ~{0}:* and &{0}:* \
                 (README, \"Security: ACL user\")",
                store.config().prefix
            )));
        }
    }
    Ok(())
}

/// Histogram buckets of the worker's `_seconds` metrics: from a quick claim
/// (milliseconds) to a long handler (a minute).
const BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0];

/// How often the recorder's histograms are compacted between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// How long in-flight scrapes may take to end once the worker has stopped.
const SERVER_GRACE: Duration = Duration::from_secs(2);

/// The Prometheus endpoint of `--metrics-listen`: serves until `stop`.
struct MetricsServer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Installs the Prometheus recorder (for the whole process) and serves
    /// `GET /metrics` on `addr`; returns the server and the bound address.
    async fn start(addr: &str) -> Result<(MetricsServer, SocketAddr)> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Invalid(format!("--metrics-listen {addr}: cannot listen there: {e}")))?;
        let bound = listener.local_addr().map_err(|e| Error::Invalid(format!("--metrics-listen {addr}: {e}")))?;
        let handle = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .and_then(PrometheusBuilder::install_recorder)
            .map_err(|e| Error::Invalid(format!("--metrics-listen: cannot install the metrics recorder: {e}")))?;
        runledger::worker::metrics::describe_metrics();

        let stop = CancellationToken::new();
        let upkeep = {
            let (handle, stop) = (handle.clone(), stop.clone());
            async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(UPKEEP_EVERY) => handle.run_upkeep(),
                    }
                }
            }
        };
        let app = axum::Router::new().route("/metrics", axum::routing::get(move || scrape(handle.clone())));
        let serve = axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
        let task = tokio::spawn(async move {
            let (served, ()) = tokio::join!(serve, upkeep);
            if let Err(e) = served {
                tracing::warn!(error = %e, "the metrics endpoint stopped");
            }
        });
        Ok((MetricsServer { stop, task }, bound))
    }

    /// Stops serving: lets scrapes in flight end, briefly.
    async fn shutdown(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(SERVER_GRACE, &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// `GET /metrics`: the Prometheus text exposition format.
async fn scrape(handle: PrometheusHandle) -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render())
}

pub async fn run(store: &Store, out: &Output, a: WorkerArgs) -> Result<()> {
    let worker = build(store, &a, true)?;
    check_access(store, &worker, &a.queues).await?;
    let metrics = match &a.metrics_listen {
        Some(addr) => {
            let (server, bound) = MetricsServer::start(addr).await?;
            eprintln!("metrics on http://{bound}/metrics");
            Some(server)
        }
        None => None,
    };
    eprintln!("runledger worker {} serving {:?} (Ctrl-C to stop)", worker.runtime_id(), a.queues);
    let report = worker.run().await;
    if let Some(server) = metrics {
        server.shutdown().await;
    }
    let report = report?;
    if out.json {
        out.json(&serde_json::json!({
            "claimed": report.claimed, "completed": report.completed, "failed": report.failed,
            "retried": report.retried, "cancelled": report.cancelled, "lease_lost": report.lease_lost,
            "released_on_shutdown": report.released_on_shutdown,
        }));
    } else {
        println!(
            "claimed {}  completed {}  failed {}  retried {}  cancelled {}  lease lost {}  released {}",
            report.claimed,
            report.completed,
            report.failed,
            report.retried,
            report.cancelled,
            report.lease_lost,
            report.released_on_shutdown
        );
    }
    Ok(())
}
