//! `runledger worker --metrics-listen`: the worker's Prometheus endpoint, end
//! to end. The real binary serves a private redis-server (see `common`),
//! completes a few runs, and its `/metrics` must count each of them once: in
//! the runs counter, the claim-wait and handler-duration histograms, and (a
//! lease short enough to be renewed during the work) the renewal counter.
//!
//! Timeouts are hang guards, not speed limits.

use crate::common;
use crate::common::monitor;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_parse::{Sample, Scrape, Value};
use runledger::{NewRun, Store};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const RUNS: usize = 5;
const QUEUE: &str = "metrics-q";
/// Hang guard for the runs to finish.
const FINISH_WITHIN: Duration = Duration::from_secs(60);
/// Hang guard for anything quicker: the address line, one scrape, the exit.
const STEP_WITHIN: Duration = Duration::from_secs(20);

/// The worker process: killed by its PID (SIGKILL) if the test ends before it
/// exited, and its stderr, kept for failure messages.
struct WorkerProcess {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl WorkerProcess {
    fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on the PID of a child this test started and
            // has not reaped (`id()` is None once it has been).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Starts `runledger worker --metrics-listen 127.0.0.1:0`; returns it and the
/// address it printed on stderr.
async fn start_worker(url: &str, prefix: &str) -> (WorkerProcess, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_runledger"))
        .args(["--redis", url, "--prefix", prefix, "worker", "--queue", QUEUE])
        .args(["--concurrency", "5", "--fail-rate", "0", "--runtime-id", "metrics-worker"])
        // Renewed every second (lease/3); each run works 1.5 to 4.5 s.
        .args(["--lease", "3", "--work-ms", "3000", "--steps", "2", "--heartbeat", "1", "--grace", "1"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env_remove("REDIS_URL")
        .env_remove("RUNLEDGER_PREFIX")
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn runledger worker");
    let stderr_pipe = child.stderr.take().expect("worker stderr");
    let stderr = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = tokio::sync::oneshot::channel();
    {
        // Drains stderr for as long as the worker lives, so it never blocks on it.
        let stderr = stderr.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stderr_pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("metrics on http://")
                    && let Some(addr) = rest.strip_suffix("/metrics")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.to_string());
                }
                let mut all = stderr.lock().unwrap_or_else(|p| p.into_inner());
                all.push_str(&line);
                all.push('\n');
            }
        });
    }
    let worker = WorkerProcess { child, stderr };
    let addr = match tokio::time::timeout(STEP_WITHIN, rx).await {
        Ok(Ok(addr)) => addr,
        Ok(Err(_)) => panic!("the worker's stderr ended without a `metrics on` line:\n{}", worker.stderr()),
        Err(_) => panic!("hang guard: no `metrics on` line after {STEP_WITHIN:?}:\n{}", worker.stderr()),
    };
    (worker, addr)
}

/// `GET /metrics` over HTTP/1.0; returns the content type and the body.
async fn get_metrics(addr: &str) -> (String, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(STEP_WITHIN, exchange)
        .await
        .unwrap_or_else(|_| panic!("hang guard: GET /metrics had no answer after {STEP_WITHIN:?}"))
        .unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let status = head.lines().next().unwrap_or_default();
    assert!(status.contains(" 200"), "GET /metrics answered {status:?}:\n{head}");
    let content_type = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.trim().to_string())
        .unwrap_or_default();
    (content_type, body.to_string())
}

fn parse(body: &str) -> Scrape {
    Scrape::parse(body.lines().map(|line| Ok(line.to_string())))
        .unwrap_or_else(|e| panic!("the /metrics body does not parse ({e}):\n{body}"))
}

/// The samples of `metric` for this test's queue, with these other labels.
fn samples<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && s.labels.get("queue") == Some(QUEUE))
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect()
}

/// The value of a counter (0 when it has no sample yet).
fn counter(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples(scrape, metric, labels)
        .iter()
        .map(|s| match s.value {
            Value::Counter(v) | Value::Untyped(v) => v,
            ref other => panic!("{metric} is not a counter: {other:?}"),
        })
        .sum()
}

/// How many observations a histogram holds (its +Inf bucket), summed over its series.
fn histogram_count(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples(scrape, metric, labels)
        .iter()
        .map(|s| match &s.value {
            Value::Histogram(buckets) => buckets.iter().find(|b| b.less_than.is_infinite()).map_or(0.0, |b| b.count),
            other => panic!("{metric} is not a histogram: {other:?}"),
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_serves_prometheus_metrics_of_its_runs() {
    let redis = common::redis().await;
    let store = Store::connect(&redis.url).await.expect("connect to the test redis");
    let prefix = store.config().prefix.clone();
    // Every command Redis runs, to count the renewals the worker really sent.
    let port = redis.url.trim_end_matches('/').rsplit(':').next().expect("port in the url").to_string();
    let recorder = monitor::Monitor::start(&format!("127.0.0.1:{port}")).await;
    // Loaded up front, so that MONITOR shows one FCALL per renewal: a first
    // FCALL that finds no library is sent again once it is loaded.
    let renew = runledger::scripts::Scripts::new().renew_claim;
    store.load_functions().await.expect("FUNCTION LOAD");
    let (mut worker, addr) = start_worker(&redis.url, &prefix).await;

    // Served before any run: the endpoint is up, with the exposition content type.
    let (content_type, _) = get_metrics(&addr).await;
    assert_eq!(content_type, "text/plain; version=0.0.4");

    for i in 0..RUNS {
        store.create_run(&NewRun::new(format!("m-{i}"), "agent").queue(QUEUE)).await.expect("create run");
    }
    let finished = tokio::time::timeout(FINISH_WITHIN, async {
        loop {
            if store.queue_stats(QUEUE, 0).await.map(|s| s.finished).unwrap_or(0) == RUNS as i64 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if finished.is_err() {
        let stats = store.queue_stats(QUEUE, 0).await;
        panic!("hang guard: not all runs finished after {FINISH_WITHIN:?}: {stats:?}\n{}", worker.stderr());
    }

    // A run's metrics are recorded just after its finish landed: scrape
    // until the last one is in (bounded).
    let deadline = tokio::time::Instant::now() + STEP_WITHIN;
    let (scrape, body) = loop {
        let (_, body) = get_metrics(&addr).await;
        let scrape = parse(&body);
        let done = counter(&scrape, "runledger_worker_runs_total", &[]) >= RUNS as f64;
        if done || tokio::time::Instant::now() >= deadline {
            break (scrape, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let runs = RUNS as f64;
    let completed = [("outcome", "completed")];
    assert_eq!(counter(&scrape, "runledger_worker_runs_total", &completed), runs, "{body}");
    assert_eq!(counter(&scrape, "runledger_worker_runs_total", &[]), runs, "only completions: {body}");
    assert_eq!(histogram_count(&scrape, "runledger_worker_claim_wait_seconds", &[]), runs, "{body}");
    assert_eq!(
        counter(&scrape, "runledger_worker_claim_wait_seconds_count", &[]),
        runs,
        "the claim wait's _count: {body}"
    );
    assert_eq!(histogram_count(&scrape, "runledger_worker_handler_duration_seconds", &completed), runs, "{body}");
    // Every run worked for at least 1.5 s with a renewal due each second:
    // Redis ran a renewal of every run, and the counter counts each one.
    let commands = monitor::commands(&recorder.stop().await);
    let mut renewals: HashMap<String, usize> = HashMap::new();
    for cmd in &commands {
        if let Some((_, _keys, argv)) = cmd.script_parts()
            && cmd.calls(&renew)
            && let Some(run_id) = argv.iter().find(|a| a.starts_with("m-"))
        {
            *renewals.entry(run_id.clone()).or_default() += 1;
        }
    }
    for i in 0..RUNS {
        assert!(renewals.get(&format!("m-{i}")).is_some_and(|&n| n >= 1), "run m-{i} was renewed: {renewals:?}");
    }
    let sent: usize = renewals.values().sum();
    assert_eq!(
        counter(&scrape, "runledger_worker_lease_renewals_total", &[("result", "ok")]),
        sent as f64,
        "the renewal counter counts every renewal Redis ran: {body}"
    );
    // Exported at zero from the start, for alerts.
    assert_eq!(samples(&scrape, "runledger_worker_leases_lost_total", &[]).len(), 1, "{body}");
    assert_eq!(counter(&scrape, "runledger_worker_leases_lost_total", &[]), 0.0, "{body}");
    let in_progress: Vec<f64> = samples(&scrape, "runledger_worker_runs_in_progress", &[])
        .iter()
        .map(|s| match s.value {
            Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("runs_in_progress is not a gauge: {other:?}"),
        })
        .collect();
    assert_eq!(in_progress, [0.0], "{body}");
    // describe_metrics ran: the series have help texts.
    for name in [
        "runledger_worker_claim_wait_seconds",
        "runledger_worker_handler_duration_seconds",
        "runledger_worker_lease_renewals_total",
        "runledger_worker_leases_lost_total",
        "runledger_worker_runs_total",
        "runledger_worker_runs_in_progress",
    ] {
        assert!(scrape.docs.contains_key(name), "no HELP for {name}: {body}");
    }

    // SIGTERM: the worker stops, its metrics endpoint with it.
    let pid = worker.child.id().expect("the worker is running");
    // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let status = tokio::time::timeout(STEP_WITHIN, worker.child.wait())
        .await
        .unwrap_or_else(|_| panic!("hang guard: the worker ignored SIGTERM for {STEP_WITHIN:?}"))
        .expect("wait for the worker");
    assert!(status.success(), "worker exit {status}:\n{}", worker.stderr());
    let refused = tokio::time::timeout(STEP_WITHIN, tokio::net::TcpStream::connect(&addr)).await;
    assert!(matches!(refused, Ok(Err(_))), "the metrics endpoint outlived the worker: {refused:?}");
}
