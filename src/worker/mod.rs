//! The worker runtime: turns an async handler into a well-behaved, horizontally
//! scaled worker, as BullMQ's Worker or asynq's Server do.
//!
//! One [`Worker`] registers its runtime and heartbeats it, waits for runs
//! without polling (see [`crate::store::Waiter`]), runs up to `concurrency`
//! handlers at once, renews each lease every lease/3, delivers cancellation
//! within a pub/sub round trip, catches panics, retries with backoff, and on
//! shutdown releases what it still holds back to the queue.
//!
//! It records claim waits, handler durations, renewals and outcomes through
//! the `metrics` facade (see [`metrics`]): free until a recorder is installed.

mod context;
pub mod metrics;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use context::{Done, Failure, RunContext, StopReason};

use crate::error::{Error, Result};
use crate::model::{ClaimRequest, Finish, Heartbeat, RegisterRuntime, Run, RunStatus};
use crate::store::{Release, Store, Waiter, lock};

/// What a handler returns.
pub type HandlerResult = std::result::Result<Done, Failure>;
type BoxHandler = Arc<dyn Fn(RunContext) -> Pin<Box<dyn Future<Output = HandlerResult> + Send>> + Send + Sync>;

/// Retry delays: exponential with full jitter, capped.
#[derive(Clone, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// Claims a run may use before a retryable failure becomes final
    /// (a run's own `max_attempts` wins when set).
    pub max_attempts: i64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base: Duration::from_secs(1), max: Duration::from_secs(300), max_attempts: 5 }
    }
}

impl Backoff {
    /// The delay before attempt `attempt + 1`: base * 2^(attempt-1), jittered to 50..100 %.
    pub fn delay(&self, attempt: i64) -> Duration {
        let exp = self.base.saturating_mul(1u32 << (attempt.clamp(1, 20) - 1) as u32).min(self.max);
        exp.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

/// How a worker picks among its queues.
#[derive(Clone, Debug)]
pub enum QueueOrder {
    /// Always the first queue that has work.
    Strict,
    /// Each claim starts with a queue drawn with these relative weights.
    Weighted(Vec<u32>),
}

/// Builds a [`Worker`].
pub struct WorkerBuilder {
    store: Store,
    runtime_id: Option<String>,
    queues: Vec<String>,
    order: QueueOrder,
    runner_ids: Vec<String>,
    concurrency: usize,
    lease: Duration,
    renew_every: Option<Duration>,
    heartbeat: Duration,
    grace: Duration,
    backoff: Backoff,
    reap_every: Option<Duration>,
    shutdown: CancellationToken,
    handle_signals: bool,
    check_settings: bool,
}

impl WorkerBuilder {
    pub fn runtime_id(mut self, id: impl Into<String>) -> Self {
        self.runtime_id = Some(id.into());
        self
    }
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queues.push(queue.into());
        self
    }
    pub fn queues<I: IntoIterator<Item = S>, S: Into<String>>(mut self, queues: I) -> Self {
        self.queues.extend(queues.into_iter().map(Into::into));
        self
    }
    /// Weights, one per queue in the order given.
    pub fn weights(mut self, weights: Vec<u32>) -> Self {
        self.order = QueueOrder::Weighted(weights);
        self
    }
    pub fn runner(mut self, runner: impl Into<String>) -> Self {
        self.runner_ids.push(runner.into());
        self
    }
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
    /// How often leases are renewed (default lease/3).
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = Some(every);
        self
    }
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }
    /// How long in-flight handlers may run on after shutdown starts.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }
    /// Run a reaper pass this often (default 5 s; `None` = never).
    pub fn reap_every(mut self, every: Option<Duration>) -> Self {
        self.reap_every = every;
        self
    }
    /// Shut down when this token is cancelled.
    pub fn shutdown_token(mut self, token: CancellationToken) -> Self {
        self.shutdown = token;
        self
    }
    /// Also shut down on SIGINT / SIGTERM (default on).
    pub fn handle_signals(mut self, on: bool) -> Self {
        self.handle_signals = on;
        self
    }
    /// At start, read the server's settings (CONFIG GET) and warn about each one
    /// short of what runledger recommends (default on). Off for a user whose ACL
    /// has no CONFIG GET (each refusal is an ACL LOG entry), or for many workers
    /// in one process that would each say the same.
    pub fn check_settings(mut self, on: bool) -> Self {
        self.check_settings = on;
        self
    }

    /// The worker, with `handler` run once per claimed run.
    pub fn build<F, Fut>(self, handler: F) -> Result<Worker>
    where
        F: Fn(RunContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        if self.queues.is_empty() {
            return Err(Error::Invalid("a worker needs at least one queue".into()));
        }
        for queue in &self.queues {
            crate::validate::id("queue", queue)?;
        }
        if let QueueOrder::Weighted(w) = &self.order
            && (w.len() != self.queues.len() || w.iter().all(|&x| x == 0))
        {
            return Err(Error::Invalid("weights must be one per queue and not all zero".into()));
        }
        crate::validate::lease_ms("lease", self.lease)?;
        let runtime_id = self.runtime_id.unwrap_or_else(default_runtime_id);
        crate::validate::id("runtime_id", &runtime_id)?;
        let handler: BoxHandler = Arc::new(move |ctx| Box::pin(handler(ctx)));
        Ok(Worker {
            inner: Arc::new(Inner {
                renew_every: self.renew_every.unwrap_or(self.lease / 3),
                store: self.store,
                runtime_id,
                queues: self.queues,
                order: self.order,
                runner_ids: self.runner_ids,
                concurrency: self.concurrency,
                lease: self.lease,
                heartbeat: self.heartbeat,
                grace: self.grace,
                backoff: self.backoff,
                reap_every: self.reap_every,
                handler,
                in_flight: std::sync::Mutex::new(HashMap::new()),
            }),
            shutdown: self.shutdown,
            handle_signals: self.handle_signals,
            check_settings: self.check_settings,
        })
    }
}

/// hostname-pid-random, unique enough to tell workers apart.
pub fn default_runtime_id() -> String {
    let host = hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "host".into());
    let host: String = host.chars().filter(|c| !c.is_control() && *c != '{' && *c != '}').take(100).collect();
    format!("{host}-{}-{:04x}", std::process::id(), rand::rng().random::<u16>())
}

/// A running worker; see the module docs.
pub struct Worker {
    inner: Arc<Inner>,
    shutdown: CancellationToken,
    handle_signals: bool,
    check_settings: bool,
}

struct Inner {
    store: Store,
    runtime_id: String,
    queues: Vec<String>,
    order: QueueOrder,
    runner_ids: Vec<String>,
    concurrency: usize,
    lease: Duration,
    renew_every: Duration,
    heartbeat: Duration,
    grace: Duration,
    backoff: Backoff,
    reap_every: Option<Duration>,
    handler: BoxHandler,
    /// run_id -> the context of the run being executed.
    in_flight: std::sync::Mutex<HashMap<String, RunContext>>,
}

/// What a worker did, returned when it stops. Every claimed run is counted in
/// exactly one outcome once its write has landed, so `claimed` is the sum of
/// the others (a run whose result could not be written counts as `lease_lost`).
#[derive(Clone, Debug, Default)]
pub struct WorkerReport {
    pub claimed: u64,
    pub completed: u64,
    pub failed: u64,
    pub retried: u64,
    pub cancelled: u64,
    pub lease_lost: u64,
    pub released_on_shutdown: u64,
}

impl Worker {
    pub fn builder(store: &Store) -> WorkerBuilder {
        WorkerBuilder {
            store: store.clone(),
            runtime_id: None,
            queues: Vec::new(),
            order: QueueOrder::Strict,
            runner_ids: Vec::new(),
            concurrency: 1,
            lease: Duration::from_secs(30),
            renew_every: None,
            heartbeat: Duration::from_secs(10),
            grace: Duration::from_secs(10),
            backoff: Backoff::default(),
            reap_every: Some(Duration::from_secs(5)),
            shutdown: CancellationToken::new(),
            handle_signals: true,
            check_settings: true,
        }
    }

    pub fn runtime_id(&self) -> &str {
        &self.inner.runtime_id
    }

    /// A token that stops this worker when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until shutdown (token or, if enabled, SIGINT/SIGTERM).
    pub async fn run(self) -> Result<WorkerReport> {
        let inner = self.inner.clone();
        let shutdown = self.shutdown.clone();
        let store = &inner.store;
        let mut registration = RegisterRuntime::new(&inner.runtime_id);
        registration.heartbeat_deadline = inner.heartbeat * 3;
        registration.version = Some(env!("CARGO_PKG_VERSION").into());
        registration.capabilities = Some(serde_json::json!({
            "queues": inner.queues, "runner_ids": inner.runner_ids, "concurrency": inner.concurrency
        }));
        // Redis may be away or restarting as the worker starts: wait for it.
        let mut pause = Duration::from_millis(100);
        loop {
            match store.register_runtime(&registration).await {
                Ok(_) => break,
                Err(e) if e.is_transient() => {
                    warn!(error = %e, ?pause, "cannot register the runtime yet; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(WorkerReport::default()),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
        info!(runtime = %inner.runtime_id, queues = ?inner.queues, "worker started");
        metrics::init_queues(&inner.queues);
        let advice = if self.check_settings { store.config_advice().await.unwrap_or_default() } else { Vec::new() };
        for a in advice {
            warn!(
                "Redis has {} {}; runledger recommends {} (README, \"Redis settings\")",
                a.name, a.actual, a.recommended
            );
        }

        let background = CancellationToken::new();
        let mut tasks = JoinSet::new();
        if self.handle_signals {
            tasks.spawn(signals(shutdown.clone()));
        }
        tasks.spawn(heartbeats(inner.clone(), background.clone()));
        let listening = Arc::new(tokio::sync::Notify::new());
        tasks.spawn(cancel_listener(inner.clone(), background.clone(), listening.clone()));
        // Claim only once cancel notices can reach this worker: a notice
        // published before the subscription would be missed (renewals would
        // still report it, lease/3 later). Not for ever: Redis may be away.
        if tokio::time::timeout(LISTEN_WAIT, listening.notified()).await.is_err() {
            warn!("cancel notices are not subscribed yet; claiming anyway (renewals report cancellations too)");
        }
        if let Some(every) = inner.reap_every {
            tasks.spawn(reaper(inner.clone(), every, background.clone()));
        }

        let report = Arc::new(std::sync::Mutex::new(WorkerReport::default()));
        let result = claim_loop(inner.clone(), shutdown.clone(), report.clone()).await;

        background.cancel();
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        if let Err(e) = store.deregister_runtime(&inner.runtime_id).await {
            warn!(error = %e, "could not deregister runtime");
        }
        info!(runtime = %inner.runtime_id, "worker stopped");
        result?;
        Ok(lock(&report).clone())
    }
}

async fn signals(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    info!("signal received, shutting down");
    shutdown.cancel();
}

async fn heartbeats(inner: Arc<Inner>, stop: CancellationToken) {
    let beat = Heartbeat { heartbeat_deadline: inner.heartbeat * 3, ..Default::default() };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(inner.heartbeat) => {}
        }
        match inner.store.heartbeat_runtime(&inner.runtime_id, &beat).await {
            Ok(_) => {}
            Err(Error::NotFound(_)) => {
                // Expired while we were away (a long pause): register again.
                let mut registration = RegisterRuntime::new(&inner.runtime_id);
                registration.heartbeat_deadline = inner.heartbeat * 3;
                if let Err(e) = inner.store.register_runtime(&registration).await {
                    warn!(error = %e, "re-registering runtime failed");
                }
            }
            Err(e) => warn!(error = %e, "heartbeat failed"),
        }
    }
}

/// How long a starting worker waits for its cancel subscription before claiming.
const LISTEN_WAIT: Duration = Duration::from_secs(5);

/// Delivers `request_cancel` to the handler of the run within a pub/sub hop;
/// `listening` is notified each time the subscription is in place.
async fn cancel_listener(inner: Arc<Inner>, stop: CancellationToken, listening: Arc<tokio::sync::Notify>) {
    loop {
        let listen = async {
            let mut notices = inner.store.cancel_notices(&inner.queues).await?;
            listening.notify_one();
            while let Some(run_id) = notices.next().await {
                let ctx = lock(&inner.in_flight).get(&run_id).cloned();
                if let Some(ctx) = ctx {
                    debug!(run_id, "cancel requested");
                    ctx.stop(StopReason::Cancelled);
                }
            }
            Ok::<(), Error>(())
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            result = listen => {
                if let Err(e) = result {
                    warn!(error = %e, "cancel listener lost its connection; reconnecting");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn reaper(inner: Arc<Inner>, every: Duration, stop: CancellationToken) {
    loop {
        let jitter = every.mul_f64(rand::rng().random_range(0.8..1.2));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(jitter) => {}
        }
        if let Err(e) = inner.store.reap(&inner.queues, None).await {
            warn!(error = %e, "reaper pass failed");
        }
    }
}

fn queue_order(inner: &Inner) -> Vec<String> {
    match &inner.order {
        QueueOrder::Strict => inner.queues.clone(),
        QueueOrder::Weighted(weights) => {
            // Weighted draw without replacement: the first queue is drawn by
            // weight, the rest follow so no work is missed.
            let mut rng = rand::rng();
            let mut pool: Vec<(String, u32)> = inner.queues.iter().cloned().zip(weights.iter().copied()).collect();
            let mut out = Vec::with_capacity(pool.len());
            while !pool.is_empty() {
                let total: u32 = pool.iter().map(|(_, w)| *w).sum();
                let idx = if total == 0 {
                    0
                } else {
                    let mut pick = rng.random_range(0..total);
                    pool.iter()
                        .position(|(_, w)| {
                            if pick < *w {
                                true
                            } else {
                                pick -= *w;
                                false
                            }
                        })
                        .unwrap_or(0)
                };
                out.push(pool.remove(idx).0);
            }
            out
        }
    }
}

async fn claim_loop(
    inner: Arc<Inner>,
    shutdown: CancellationToken,
    report: Arc<std::sync::Mutex<WorkerReport>>,
) -> Result<()> {
    let slots = Arc::new(Semaphore::new(inner.concurrency));
    let mut waiter = Waiter::new(&inner.store).await?;
    let mut running = JoinSet::new();
    let mut failures = 0u32;
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => permit.map_err(|_| Error::Protocol("worker slots closed".into()))?,
        };
        let request = ClaimRequest {
            runtime_id: inner.runtime_id.clone(),
            queues: queue_order(&inner),
            runner_ids: inner.runner_ids.clone(),
            lease: inner.lease,
            ..ClaimRequest::new("")
        };
        // Shutdown cuts the wait short but never a claim in flight, whose run
        // would otherwise sit claimed until its lease expired.
        let claim_started = Instant::now();
        let claimed = waiter.claim_unless(&request, crate::store::SAFETY_POLL, &shutdown).await;
        match claimed {
            Ok(Some(run)) => {
                failures = 0;
                metrics::claimed(&run.queue_name, claim_started.elapsed());
                lock(&report).claimed += 1;
                running.spawn(execute(inner.clone(), run, shutdown.clone(), report.clone(), permit));
            }
            Ok(None) => {}
            Err(e) => {
                // Redis away: back off instead of spinning, then try again.
                failures += 1;
                let pause = Duration::from_millis(100 * u64::from(failures.min(50)));
                warn!(error = %e, ?pause, "claim failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
        // Reap finished executions so the set does not grow.
        while running.try_join_next().is_some() {}
    }
    // Shutdown: let handlers finish within the grace period, then stop them;
    // `execute` releases whatever is still held back to the queue.
    let grace_end = tokio::time::sleep(inner.grace);
    tokio::pin!(grace_end);
    loop {
        tokio::select! {
            next = running.join_next() => if next.is_none() { break },
            _ = &mut grace_end => {
                let contexts: Vec<RunContext> = lock(&inner.in_flight).values().cloned().collect();
                for ctx in contexts {
                    ctx.stop(StopReason::Shutdown);
                }
                while running.join_next().await.is_some() {}
                break;
            }
        }
    }
    Ok(())
}

/// Runs one claimed run to its end: handler, lease renewal, stop signals,
/// and the final write (finish, retry or release).
async fn execute(
    inner: Arc<Inner>,
    run: Run,
    shutdown: CancellationToken,
    report: Arc<std::sync::Mutex<WorkerReport>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    // A completed run's finish can claim the next run of its queue in the same
    // round trip; that run is executed here, on the same slot.
    let mut next = Some(run);
    while let Some(run) = next.take() {
        next = execute_one(&inner, run, &shutdown, &report).await;
        if next.is_some() {
            lock(&report).claimed += 1;
        }
    }
}

/// Whether finishing a run of `queue` may claim the next run of that queue
/// directly: not while shutting down, and with a strict order only on the
/// first queue (another queue would otherwise be passed over).
fn may_chain(inner: &Inner, queue: &str, shutdown: &CancellationToken) -> bool {
    // A partition (a queue the worker was not given by name) never chains:
    // the next claim must move on to the next partition.
    !shutdown.is_cancelled()
        && inner.queues.iter().any(|q| q == queue)
        && match inner.order {
            QueueOrder::Strict => inner.queues.first().is_some_and(|q| q == queue),
            QueueOrder::Weighted(_) => true,
        }
}

/// Executes one run; returns the next run when its finish claimed one.
async fn execute_one(
    inner: &Arc<Inner>,
    run: Run,
    shutdown: &CancellationToken,
    report: &Arc<std::sync::Mutex<WorkerReport>>,
) -> Option<Run> {
    let store = inner.store.clone();
    let queue = run.queue_name.clone();
    let _in_progress = metrics::InProgress::new(&queue);
    let run_id = run.run_id.clone();
    let token = run.claim_token.clone().unwrap_or_default();
    let attempts = run.dispatch_attempts;
    let max_attempts = run.max_attempts.filter(|&m| m > 0).unwrap_or(inner.backoff.max_attempts);
    // Parsed by the chaos test (tests/it/chaos.rs): every claim a worker knows of.
    debug!(run_id = %run_id, attempt = attempts, token = %token, "run claimed");
    let stop = CancellationToken::new();
    // The lease counts from the claim's send, by this process's clock: it
    // ends here before it ends on the server, however late the reply came.
    let lease_end = run.claim_sent_at.unwrap_or_else(Instant::now) + inner.lease;
    let ctx = RunContext::new(store.clone(), run, stop.clone(), lease_end);
    lock(&inner.in_flight).insert(run_id.clone(), ctx.clone());
    if ctx.run.cancel_requested_at.is_some() {
        ctx.stop(StopReason::Cancelled);
    }

    // Both tasks die with this one: a worker that is dropped mid-run (a crash,
    // as far as Redis can tell) must neither renew nor write any more.
    // The handler is spawned first, so that tokio starts the renewer first on
    // this thread: a handler that blocks the thread then blocks nothing else.
    let handler_started = Instant::now();
    let mut handler = AbortOnDrop(tokio::spawn((inner.handler)(ctx.clone())));
    let handler_done = CancellationToken::new();
    let mut renewer = AbortOnDrop(tokio::spawn(renew_lease(inner.clone(), ctx.clone(), handler_done.clone())));
    let mut joined = tokio::select! {
        joined = &mut handler.0 => Some(joined),
        _ = stop.cancelled() => None,
    };
    if joined.is_none() {
        // Stopped: give the handler a moment to see `stopped()` and return on
        // its own (clean up, record why), but never past the lease. Then it
        // is aborted and left behind: a handler that blocks its thread cannot
        // be aborted, and must not hold this slot (see the Worker docs).
        tokio::select! {
            result = &mut handler.0 => joined = Some(result),
            _ = tokio::time::sleep(STOP_WINDOW) => handler.0.abort(),
            _ = ctx.lease_gone() => handler.0.abort(),
        }
    }
    let handler_took = handler_started.elapsed();
    // No renewal races the outcome's write: the renewer stops at its next
    // sleep, and one already sent is waited for (its reply is due before the
    // write's on the same connection, and it is bounded by the lease), so
    // every renewal Redis ran is one the metrics count.
    handler_done.cancel();
    let _ = (&mut renewer.0).await;
    // Once the run was stopped, only a success stands; a failure (typically
    // the handler giving up because it was told to stop) is put down to the
    // stop, whose reason decides: cancelled, released, or abandoned.
    let outcome = match joined {
        Some(Ok(Ok(done))) => Some(Ok(Ok(done))),
        _ if ctx.is_stopped() => None,
        other => other,
    };
    lock(&inner.in_flight).remove(&run_id);

    // Each outcome is counted once its write has landed, so a report adds up:
    // claimed = completed + failed + retried + cancelled + lease_lost + released.
    let mut next = None;
    let (ended, result): (Ended, Result<()>) = match outcome {
        Some(Ok(Ok(done))) => {
            let mut finish = Finish::new(RunStatus::Completed);
            finish.usage = done.usage;
            finish.cost = done.cost;
            finish.metadata = done.metadata;
            if may_chain(inner, &queue, shutdown) {
                let request = ClaimRequest {
                    runtime_id: inner.runtime_id.clone(),
                    queues: vec![queue.clone()],
                    runner_ids: inner.runner_ids.clone(),
                    lease: inner.lease,
                    ..ClaimRequest::new("")
                };
                let claim_started = Instant::now();
                match settle(&ctx, || store.finish_and_claim(&run_id, &finish, Some(&token), &request)).await {
                    Ok(claimed) => {
                        if let Some(run) = &claimed {
                            metrics::claimed(&run.queue_name, claim_started.elapsed());
                        }
                        next = claimed;
                        (Ended::Completed, Ok(()))
                    }
                    Err(e) => (Ended::Completed, Err(e)),
                }
            } else {
                (Ended::Completed, settle(&ctx, || store.finish_run(&run_id, &finish, Some(&token))).await)
            }
        }
        // A failure that followed an emit Redis refused (an outage, a
        // failover) is the store's, not the run's: it is retried.
        Some(Ok(Err(failure))) if (failure.retryable || ctx.store_trouble()) && attempts < max_attempts => {
            let release = Release {
                status: RunStatus::Queued,
                status_reason: Some(format!("retrying after: {}", failure.message)),
                retry_in: Some(inner.backoff.delay(attempts)),
                runtime_id: Some(inner.runtime_id.clone()),
            };
            (Ended::Retried, settle(&ctx, || store.release_claim(&run_id, &token, &release)).await.map(|_| ()))
        }
        Some(Ok(Err(failure))) => {
            let finish = Finish::new(RunStatus::Failed).reason(failure.message);
            (Ended::Failed, settle(&ctx, || store.finish_run(&run_id, &finish, Some(&token))).await)
        }
        Some(Err(join_error)) => {
            let reason = if join_error.is_panic() {
                let payload = join_error.into_panic();
                let text = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-text panic".into());
                format!("handler panicked: {text}")
            } else {
                "handler was aborted".into()
            };
            let finish = Finish::new(RunStatus::Failed).reason(reason);
            (Ended::Failed, settle(&ctx, || store.finish_run(&run_id, &finish, Some(&token))).await)
        }
        None => match ctx.stop_reason() {
            Some(StopReason::Cancelled) => {
                let finish = Finish::new(RunStatus::Cancelled).reason("cancelled while running");
                (Ended::Cancelled, settle(&ctx, || store.finish_run(&run_id, &finish, Some(&token))).await)
            }
            Some(StopReason::Shutdown) => {
                let release = Release {
                    status: RunStatus::Queued,
                    status_reason: Some("worker shut down".into()),
                    retry_in: None,
                    runtime_id: Some(inner.runtime_id.clone()),
                };
                (Ended::Released, settle(&ctx, || store.release_claim(&run_id, &token, &release)).await.map(|_| ()))
            }
            Some(StopReason::LeaseLost(why)) => {
                warn!(run_id, why, "lease lost; run abandoned");
                (Ended::LeaseLost, Ok(()))
            }
            None => (Ended::LeaseLost, Err(Error::Protocol("stopped without a reason".into()))),
        },
    };
    // Renewed until the outcome is written: a write retried through an
    // outage must not lose the lease meanwhile.
    drop(renewer);
    // Lost once per run: by the renewer (the stop says so) or by the write.
    let lease_lost = match &result {
        Ok(()) => matches!(ended, Ended::LeaseLost),
        Err(e) => {
            matches!(e, Error::StaleToken(_) | Error::DeadlinePassed(_) | Error::Conflict(_) | Error::NotFound(_))
        }
    };
    if lease_lost {
        metrics::lease_lost(&queue);
    }
    let outcome = if result.is_ok() { ended.outcome() } else { metrics::OUTCOME_LOST };
    metrics::run_ended(&queue, outcome, handler_took);
    match result {
        Ok(()) => {
            *ended.counter(&mut lock(report)) += 1;
            debug!(run_id = %run_id, token = %token, outcome = ended.name(), "run ended");
        }
        Err(Error::StaleToken(msg)) | Err(Error::DeadlinePassed(msg)) => {
            lock(report).lease_lost += 1;
            warn!(run_id, msg, "lease lost before the result was written");
            debug!(run_id = %run_id, token = %token, outcome = "lease_lost", "run ended");
        }
        Err(e) => {
            // Conflict (finished elsewhere), Redis away...: the lease will expire
            // and the run be re-claimed, as after a crash.
            lock(report).lease_lost += 1;
            warn!(run_id, error = %e, "could not record the run's outcome; its lease will expire");
            debug!(run_id = %run_id, token = %token, outcome = "lease_lost", "run ended");
        }
    }
    next
}

/// Sends a run's final write (finish or release), and again while Redis is
/// away, until the lease runs out: the write is idempotent, and a run whose
/// outcome never landed would run a second time once its lease expired.
async fn settle<T, F, Fut>(ctx: &RunContext, mut write: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut pause = Duration::from_millis(100);
    loop {
        match write().await {
            Err(e) if e.is_transient() && Instant::now() + pause < ctx.lease_end() => {
                debug!(run_id = %ctx.run.run_id, error = %e, "writing the run's outcome failed; sending it again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// How a run's execution ended, as counted in the [`WorkerReport`].
#[derive(Clone, Copy)]
enum Ended {
    Completed,
    Failed,
    Retried,
    Cancelled,
    Released,
    LeaseLost,
}

impl Ended {
    fn counter(self, report: &mut WorkerReport) -> &mut u64 {
        match self {
            Ended::Completed => &mut report.completed,
            Ended::Failed => &mut report.failed,
            Ended::Retried => &mut report.retried,
            Ended::Cancelled => &mut report.cancelled,
            Ended::Released => &mut report.released_on_shutdown,
            Ended::LeaseLost => &mut report.lease_lost,
        }
    }

    /// The `outcome` label of the worker's metrics.
    fn outcome(self) -> &'static str {
        match self {
            Ended::Completed => metrics::OUTCOME_COMPLETED,
            Ended::Failed => metrics::OUTCOME_FAILED,
            Ended::Retried => metrics::OUTCOME_RETRIED,
            Ended::Cancelled => metrics::OUTCOME_CANCELLED,
            Ended::Released => metrics::OUTCOME_RELEASED,
            Ended::LeaseLost => metrics::OUTCOME_LOST,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Ended::Completed => "completed",
            Ended::Failed => "failed",
            Ended::Retried => "retried",
            Ended::Cancelled => "cancelled",
            Ended::Released => "released",
            Ended::LeaseLost => "lease_lost",
        }
    }
}

/// How long a stopped handler may take to return on its own before it is aborted.
const STOP_WINDOW: Duration = Duration::from_secs(1);

/// Aborts the task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Renews the lease every `renew_every`, each renewal counted from its own
/// send. Stops the handler at once when the lease is lost, or when this
/// process's clock reaches the lease's end without a renewal, whatever Redis
/// does meanwhile (a renewal still on its way is given up then). Returns
/// between renewals once `handler_done` is cancelled.
async fn renew_lease(inner: Arc<Inner>, ctx: RunContext, handler_done: CancellationToken) {
    let mut due = ctx.run.claim_sent_at.unwrap_or_else(Instant::now) + inner.renew_every;
    loop {
        let lease_end = ctx.lease_end();
        tokio::select! {
            _ = tokio::time::sleep_until(due.min(lease_end).into()) => {}
            _ = handler_done.cancelled() => return,
        }
        let sent = Instant::now();
        if sent >= lease_end {
            ctx.lease_lost("the lease ran out before it could be renewed".into());
            return;
        }
        let renewal = inner.store.renew_claim(&ctx.run.run_id, ctx.claim_token(), inner.lease);
        let answer = tokio::time::timeout_at(lease_end.into(), renewal).await;
        metrics::renewal(&ctx.run.queue_name, matches!(answer, Ok(Ok(_))));
        match answer {
            Err(_) => {
                ctx.lease_lost("the lease ran out while a renewal was on its way".into());
                return;
            }
            Ok(Ok(run)) => {
                due = sent + inner.renew_every;
                ctx.set_lease_end(sent + inner.lease);
                if run.cancel_requested_at.is_some() {
                    ctx.stop(StopReason::Cancelled);
                }
            }
            Ok(Err(Error::NotFound(msg))) => {
                // Only a Redis that lost its data (restarted without
                // persistence) or a hand-deleted key gets here.
                tracing::error!(
                    run_id = %ctx.run.run_id,
                    "run vanished from Redis while held ({msg}): was Redis restarted without persistence? \
                     The handler is stopped and its result dropped"
                );
                ctx.lease_lost(msg);
                return;
            }
            Ok(Err(Error::StaleToken(msg))) | Ok(Err(Error::DeadlinePassed(msg))) => {
                ctx.lease_lost(msg);
                return;
            }
            Ok(Err(e)) => {
                warn!(run_id = %ctx.run.run_id, error = %e, "lease renewal failed; retrying");
                // Not at once: Redis is likely away.
                due = Instant::now() + RENEW_RETRY.min(inner.renew_every);
            }
        }
    }
}

/// The pause before a failed renewal is tried again.
const RENEW_RETRY: Duration = Duration::from_millis(250);
