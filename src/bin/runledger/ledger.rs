//! The ledger commands: one function per command of BRIEF section 5.

use std::time::Duration;

use clap::Args;
use runledger::{
    ClaimRequest, Direction, Error, Finish, NewEvent, NewRun, Release, Result, RunFilter, RunStatus, Store, Waiter,
    validate,
};
use serde_json::Value;

use crate::output::Output;
use crate::target::Target;

pub async fn connect(url: &str, target: &Target) -> Result<Store> {
    // What the errors show (on stderr, in logs): never a password.
    let shown = crate::output::redacted(url);
    Store::connect_with(url, target.config(&target.prefix)).await.map_err(|e| match e {
        Error::Redis(err) if err.kind() == redis::ErrorKind::InvalidClientConfig => {
            Error::Invalid(format!("--redis / REDIS_URL is not a valid Redis URL: {shown} ({err})"))
        }
        // rustls reports an untrusted certificate as an I/O error: it is not
        // an outage, and waiting will not fix it.
        Error::Redis(err) if err.to_string().contains("certificate") => {
            Error::Invalid(format!("TLS: {shown} did not present a trusted certificate: {err} (see --tls-ca)"))
        }
        Error::Redis(err) if err.is_connection_refusal() || err.is_io_error() || err.is_timeout() => {
            Error::Unreachable { url: shown, reason: format!("{err} (set --redis or REDIS_URL)") }
        }
        other => other,
    })
}

/// Like [`connect`], and keeps trying while Redis is unreachable (a worker
/// started with, or just before, its Redis), until SIGINT/SIGTERM. `None`
/// when a signal ended the wait. Bad URLs and refusals still fail at once.
pub async fn connect_waiting(url: &str, target: &Target) -> Result<Option<Store>> {
    let mut pause = Duration::from_millis(100);
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        match connect(url, target).await {
            Ok(store) => return Ok(Some(store)),
            Err(e) if starting_up(&e) => {
                tracing::warn!(error = %e, ?pause, "cannot reach Redis yet; retrying");
                tokio::select! {
                    _ = &mut stop => return Ok(None),
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Redis away, or up but not serving yet (loading its data, a cluster
/// electing a primary): worth waiting for. Not a bad password or URL.
fn starting_up(e: &Error) -> bool {
    match e {
        Error::Unreachable { .. } => true,
        Error::Redis(err) => matches!(err.code(), Some("LOADING" | "BUSY" | "MASTERDOWN" | "CLUSTERDOWN" | "TRYAGAIN")),
        _ => false,
    }
}

/// Resolves on the first SIGINT or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn json_arg(name: &str, text: &Option<String>) -> Result<Option<Value>> {
    text.as_deref().map(|t| validate::parse_object(name, t)).transpose()
}

fn status_arg(text: &str) -> Result<RunStatus> {
    text.parse()
}

#[derive(Args)]
pub struct EnqueueArgs {
    #[arg(long, default_value = "default")]
    queue: String,
    #[arg(long)]
    runner: String,
    /// Defaults to a new UUID.
    #[arg(long)]
    run_id: Option<String>,
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    priority: i64,
    /// A JSON object.
    #[arg(long)]
    metadata: Option<String>,
    #[arg(long)]
    requested_runtime: Option<String>,
    /// Epoch seconds.
    #[arg(long)]
    deadline: Option<f64>,
    /// Epoch seconds.
    #[arg(long)]
    not_before: Option<f64>,
    #[arg(long, default_value_t = 0)]
    max_attempts: u32,
    #[arg(long)]
    conversation: Option<String>,
    #[arg(long)]
    thread: Option<String>,
    #[arg(long)]
    workspace: Option<String>,
    #[arg(long)]
    bot: Option<String>,
    #[arg(long)]
    agent: Option<String>,
    #[arg(long)]
    event_id: Option<String>,
    #[arg(long)]
    binding: Option<String>,
    /// A JSON object, handed only to the claimer.
    #[arg(long)]
    authorization: Option<String>,
    /// queued (enters the queue), running (executed directly), created (stored, not claimable),
    /// or a terminal status (recorded as finished: counted by the stats, never claimable).
    #[arg(long, default_value = "queued")]
    status: String,
    /// For a partitioned queue: runs with the same key share a partition (default: the group
    /// key, else the run id).
    #[arg(long)]
    partition_key: Option<String>,
    /// The run's group, in a queue grouped by group_key (`runledger queue set Q --group-by group_key`).
    #[arg(long)]
    group_key: Option<String>,
}

pub async fn enqueue(store: &Store, out: &Output, a: EnqueueArgs) -> Result<()> {
    let run = NewRun {
        run_id: a.run_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        runner_id: a.runner,
        queue: Some(a.queue),
        event_id: a.event_id,
        binding_id: a.binding,
        conversation_id: a.conversation,
        thread_id: a.thread,
        workspace_id: a.workspace,
        bot_id: a.bot,
        agent_id: a.agent,
        deadline_at: a.deadline,
        authorization: json_arg("--authorization", &a.authorization)?,
        metadata: json_arg("--metadata", &a.metadata)?,
        status: Some(status_arg(&a.status)?),
        priority: a.priority,
        requested_runtime_id: a.requested_runtime,
        not_before: a.not_before,
        max_attempts: a.max_attempts,
        partition_key: a.partition_key,
        group_key: a.group_key,
    };
    out.run(&store.create_run(&run).await?);
    Ok(())
}

#[derive(Args)]
pub struct ClaimArgs {
    #[arg(long)]
    runtime: String,
    /// Queues in order of preference (repeat); default: every known queue.
    #[arg(long = "queue")]
    queues: Vec<String>,
    /// Only runs of these runners (repeat).
    #[arg(long = "runner")]
    runners: Vec<String>,
    /// Lease length in seconds.
    #[arg(long, default_value_t = 60.0)]
    lease: f64,
    /// Wait up to this many seconds for a run (blocking, no polling).
    #[arg(long)]
    wait: Option<f64>,
    /// Only runs of this conversation.
    #[arg(long)]
    conversation: Option<String>,
    /// Only runs of this bot.
    #[arg(long)]
    bot: Option<String>,
    /// Only runs of this workspace.
    #[arg(long)]
    workspace: Option<String>,
    /// With --strict-thread: only runs of this thread (without --thread: runs without a thread).
    #[arg(long)]
    thread: Option<String>,
    /// Apply the thread filter (as in LangBot, --thread alone is ignored).
    #[arg(long)]
    strict_thread: bool,
}

pub async fn claim(store: &Store, out: &Output, a: ClaimArgs) -> Result<()> {
    let request = ClaimRequest {
        runtime_id: a.runtime,
        queues: a.queues,
        runner_ids: a.runners,
        lease: validate::seconds("--lease", a.lease)?,
        conversation_id: a.conversation,
        bot_id: a.bot,
        workspace_id: a.workspace,
        thread_id: a.thread,
        strict_thread: a.strict_thread,
    };
    let run = match a.wait {
        Some(wait) => {
            let wait = if wait == 0.0 { Duration::ZERO } else { validate::seconds("--wait", wait)? };
            Waiter::new(store).await?.claim(&request, wait).await?
        }
        None => store.claim_next_run(&request).await?,
    };
    match run {
        Some(run) => out.run(&run),
        None if out.json => println!("null"),
        None => println!("nothing to claim"),
    }
    Ok(())
}

#[derive(Args)]
pub struct RenewArgs {
    run_id: String,
    #[arg(long)]
    token: String,
    #[arg(long, default_value_t = 60.0)]
    lease: f64,
    /// The claim must be held by this runtime too.
    #[arg(long)]
    runtime: Option<String>,
}

pub async fn renew(store: &Store, out: &Output, a: RenewArgs) -> Result<()> {
    let lease = validate::seconds("--lease", a.lease)?;
    let run = store.renew_claim_by(&a.run_id, &a.token, a.runtime.as_deref(), lease).await?;
    out.run(&run);
    Ok(())
}

#[derive(Args)]
pub struct ReleaseArgs {
    run_id: String,
    /// The claim's token (a worker giving its run back).
    #[arg(long, required_unless_present = "attempt", conflicts_with = "attempt")]
    token: Option<String>,
    /// Operator release of a stuck claim, without its token: the dispatch_attempts
    /// of the claim to take away (`runledger get` shows it); records an audit event.
    #[arg(long, conflicts_with_all = ["status", "retry_in", "runtime"])]
    attempt: Option<i64>,
    #[arg(long, default_value = "queued")]
    status: String,
    #[arg(long)]
    reason: Option<String>,
    /// Claimable again only after this many seconds.
    #[arg(long)]
    retry_in: Option<f64>,
    /// The claim must be held by this runtime too.
    #[arg(long)]
    runtime: Option<String>,
}

pub async fn release(store: &Store, out: &Output, a: ReleaseArgs) -> Result<()> {
    let token = match (a.token, a.attempt) {
        (Some(token), _) => token,
        (None, Some(attempt)) => {
            out.run(&store.release_stuck_claim(&a.run_id, attempt, a.reason.as_deref(), "cli").await?);
            return Ok(());
        }
        (None, None) => return Err(Error::Invalid("release needs --token or --attempt".into())),
    };
    let release = Release {
        status: status_arg(&a.status)?,
        status_reason: a.reason,
        retry_in: a.retry_in.map(|s| validate::seconds("--retry-in", s)).transpose()?,
        runtime_id: a.runtime,
    };
    out.run(&store.release_claim(&a.run_id, &token, &release).await?);
    Ok(())
}

#[derive(Args)]
pub struct AppendArgs {
    run_id: String,
    #[arg(long)]
    seq: i64,
    #[arg(long = "type")]
    event_type: String,
    /// A JSON object (default {}).
    #[arg(long)]
    data: Option<String>,
    /// A JSON object.
    #[arg(long)]
    usage: Option<String>,
    #[arg(long, default_value = "runner")]
    source: String,
    /// Fence the write with this claim token.
    #[arg(long)]
    token: Option<String>,
}

pub async fn append(store: &Store, out: &Output, a: AppendArgs) -> Result<()> {
    let mut event =
        NewEvent::new(a.seq, a.event_type, json_arg("--data", &a.data)?.unwrap_or(Value::Object(Default::default())))
            .source(a.source);
    event.usage = json_arg("--usage", &a.usage)?;
    let event = store.append_event(&a.run_id, a.token.as_deref(), &event).await?;
    if out.json {
        out.json(&event)
    } else {
        out.event(&event)
    }
    Ok(())
}

#[derive(Args)]
pub struct AuditArgs {
    run_id: String,
    #[arg(long = "type")]
    event_type: String,
    #[arg(long)]
    data: Option<String>,
}

pub async fn audit(store: &Store, out: &Output, a: AuditArgs) -> Result<()> {
    let data = json_arg("--data", &a.data)?;
    let event = store.append_audit_event(&a.run_id, &a.event_type, data.as_ref(), None).await?;
    if out.json {
        out.json(&event)
    } else {
        out.event(&event)
    }
    Ok(())
}

#[derive(Args)]
pub struct FinalizeArgs {
    run_id: String,
    /// completed, failed, cancelled or timeout.
    #[arg(long)]
    status: String,
    #[arg(long)]
    reason: Option<String>,
    #[arg(long)]
    usage: Option<String>,
    #[arg(long)]
    cost: Option<String>,
    /// Merged into the run's metadata.
    #[arg(long)]
    metadata: Option<String>,
    #[arg(long)]
    token: Option<String>,
}

pub async fn finalize(store: &Store, out: &Output, a: FinalizeArgs) -> Result<()> {
    let finish = Finish {
        status: status_arg(&a.status)?,
        status_reason: a.reason,
        usage: json_arg("--usage", &a.usage)?,
        cost: json_arg("--cost", &a.cost)?,
        metadata: json_arg("--metadata", &a.metadata)?,
    };
    out.run(&store.finalize_run(&a.run_id, &finish, a.token.as_deref()).await?);
    Ok(())
}

#[derive(Args)]
pub struct CancelArgs {
    run_id: String,
    #[arg(long)]
    reason: Option<String>,
}

pub async fn cancel(store: &Store, out: &Output, a: CancelArgs) -> Result<()> {
    out.run(&store.request_cancel(&a.run_id, a.reason.as_deref()).await?);
    Ok(())
}

#[derive(Args)]
pub struct RequeueArgs {
    /// A run that ended failed (dead included), timeout or cancelled.
    run_id: String,
}

/// A new run copied from one that ended badly (`<id>~r1`, ...); the old one
/// stays as it ended and gets an audit event.
pub async fn requeue(store: &Store, out: &Output, a: RequeueArgs) -> Result<()> {
    out.run(&store.requeue_run(&a.run_id, "cli").await?);
    Ok(())
}

#[derive(Args)]
pub struct GetArgs {
    run_id: String,
}

pub async fn get(store: &Store, out: &Output, a: GetArgs) -> Result<()> {
    out.run(&store.get_run(&a.run_id).await?);
    Ok(())
}

#[derive(Args)]
pub struct RunsArgs {
    #[arg(long = "queue")]
    queues: Vec<String>,
    #[arg(long = "status")]
    statuses: Vec<String>,
    #[arg(long)]
    conversation: Option<String>,
    #[arg(long)]
    bot: Option<String>,
    #[arg(long)]
    workspace: Option<String>,
    /// With --strict-thread: only runs of this thread (as in the seed, --thread alone is ignored).
    #[arg(long)]
    thread: Option<String>,
    /// Apply the thread filter: runs of exactly --thread, or without a thread when --thread is absent.
    #[arg(long)]
    strict_thread: bool,
    /// Only runs of this runner.
    #[arg(long)]
    runner: Option<String>,
    /// Only runs of this binding.
    #[arg(long)]
    binding: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Only runs with a smaller id (the previous page's next_cursor).
    #[arg(long)]
    before: Option<i64>,
}

pub async fn runs(store: &Store, out: &Output, a: RunsArgs) -> Result<()> {
    let filter = RunFilter {
        queues: a.queues,
        conversation_id: a.conversation,
        statuses: a.statuses.iter().map(|s| status_arg(s)).collect::<Result<_>>()?,
        before_id: a.before,
        limit: a.limit,
        bot_id: a.bot,
        workspace_id: a.workspace,
        strict_thread: a.strict_thread,
        thread_id: a.thread,
        runner_id: a.runner,
        binding_id: a.binding,
    };
    out.runs(&store.list_runs(&filter).await?);
    Ok(())
}

#[derive(Args)]
pub struct EventsArgs {
    run_id: String,
    #[arg(long)]
    after: Option<i64>,
    #[arg(long)]
    before: Option<i64>,
    #[arg(long, default_value_t = 50)]
    limit: usize,
    #[arg(long)]
    backward: bool,
    /// Keep printing new events until the run finishes.
    #[arg(long)]
    follow: bool,
}

pub async fn events(store: &Store, out: &Output, a: EventsArgs) -> Result<()> {
    let direction = if a.backward { Direction::Backward } else { Direction::Forward };
    if !a.follow {
        out.events(&store.page_run_events(&a.run_id, a.before, a.after, a.limit, direction).await?);
        return Ok(());
    }
    let mut after = a.after;
    loop {
        let page = store.page_run_events(&a.run_id, None, after, 100, Direction::Forward).await?;
        for event in &page.items {
            out.event(event);
            after = Some(event.sequence);
        }
        if page.has_more {
            continue;
        }
        if store.get_run(&a.run_id).await?.status.is_terminal() {
            // One more read: events written just before the finish.
            let page = store.page_run_events(&a.run_id, None, after, 100, Direction::Forward).await?;
            for event in &page.items {
                out.event(event);
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Args)]
pub struct RuntimesArgs {
    #[arg(long = "status")]
    statuses: Vec<String>,
    /// Only runtimes whose labels hold KEY=VALUE (repeat; the value is JSON, or text).
    #[arg(long = "label")]
    labels: Vec<String>,
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

pub async fn runtimes(store: &Store, out: &Output, a: RuntimesArgs) -> Result<()> {
    let mut labels = serde_json::Map::new();
    for pair in &a.labels {
        let (key, value) =
            pair.split_once('=').ok_or_else(|| Error::Invalid(format!("--label must be KEY=VALUE, got {pair:?}")))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
        labels.insert(key.to_string(), value);
    }
    let page = store.page_runtimes(&a.statuses, (!labels.is_empty()).then_some(&labels), a.limit).await?;
    out.runtimes(&page.items);
    if !out.json && page.total > page.items.len() {
        println!("({} of {} runtimes; --limit shows more)", page.items.len(), page.total);
    }
    Ok(())
}

/// Every queue; a partitioned queue as one row with its partitions below it.
pub async fn queues(store: &Store, out: &Output) -> Result<()> {
    out.queues(&store.queue_overview(10).await?);
    Ok(())
}

#[derive(Args)]
pub struct PartitionArgs {
    /// The logical queue.
    queue: String,
    /// How many physical queues (QUEUE#0 .. QUEUE#N-1) it spreads over, 2..=256; fixed once set.
    partitions: u32,
}

pub async fn partition(store: &Store, out: &Output, a: PartitionArgs) -> Result<()> {
    store.declare_partitions(&a.queue, a.partitions).await?;
    let parts = store.partitions(&a.queue).await?;
    if out.json {
        out.json(&serde_json::json!({ "queue_name": a.queue, "partitions": parts }));
    } else {
        println!("{} is partitioned over {}", a.queue, parts.join(", "));
    }
    Ok(())
}

#[derive(Args)]
pub struct FunctionsArgs {
    #[command(subcommand)]
    action: FunctionsAction,
}

#[derive(clap::Subcommand)]
enum FunctionsAction {
    /// Load this build's library (runledger_<hash>) on the server, or on every master of a
    /// cluster; loading it again is a no-op. Needs FUNCTION LOAD.
    Load,
}

pub async fn functions(store: &Store, out: &Output, a: FunctionsArgs) -> Result<()> {
    match a.action {
        FunctionsAction::Load => {
            let library = store.load_functions().await?;
            if out.json {
                out.json(&serde_json::json!({ "library": library }));
            } else {
                println!("loaded {library}");
            }
        }
    }
    Ok(())
}

pub async fn reap(store: &Store, out: &Output) -> Result<()> {
    let report = store.reap(&[], None).await?;
    if out.json {
        out.json(&report);
    } else {
        println!(
            "promoted {}  reclaimed {}  timed out {}  purged {}  stale runtimes {}",
            report.promoted, report.reclaimed, report.timed_out, report.purged, report.stale_runtimes
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct StatsArgs {
    /// Run stats over the window (the default).
    #[arg(long, conflicts_with_all = ["runtimes", "runners"])]
    runs: bool,
    /// Runtime stats (no window).
    #[arg(long, conflicts_with = "runners")]
    runtimes: bool,
    /// Stats per runner over the window, most runs first.
    #[arg(long)]
    runners: bool,
    /// Window start, epoch seconds, inclusive [default: --to minus 24 h].
    #[arg(long)]
    from: Option<i64>,
    /// Window end, epoch seconds, inclusive [default: now].
    #[arg(long)]
    to: Option<i64>,
    /// With --runs: only runs of this runner.
    #[arg(long)]
    runner: Option<String>,
    /// With --runners: at most this many runners (1..=500).
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

/// Seconds with three decimals, or `-`.
fn secs(value: Option<f64>) -> String {
    value.map(|v| format!("{v:.3} s")).unwrap_or_else(|| "-".into())
}

fn percent(value: Option<f64>) -> String {
    value.map(|v| format!("{:.2}%", v * 100.0)).unwrap_or_else(|| "-".into())
}

pub async fn stats(store: &Store, out: &Output, a: StatsArgs) -> Result<()> {
    if a.runtimes {
        let s = store.get_runtime_stats().await?;
        if out.json {
            out.json(&s);
        } else {
            println!("runtimes {}  online {}  stale {}", s.total_count, s.online_count, s.stale_count);
            println!(
                "heartbeat age: avg {}  max {}",
                secs(s.avg_heartbeat_age_seconds),
                secs(s.max_heartbeat_age_seconds)
            );
            println!("active runs {} (claimed {})", s.active_runs, s.claimed_runs);
        }
        return Ok(());
    }
    let to = match a.to {
        Some(to) => to,
        None => store.server_time_ms().await?.div_euclid(1000),
    };
    let from = a.from.unwrap_or(to - 24 * 3600);
    if a.runners {
        let items = store.get_runner_stats(from, to, a.limit).await?;
        if out.json {
            out.json(&items);
        } else {
            println!("runs created {} .. {}", crate::output::time(Some(from)), crate::output::time(Some(to)));
            println!(
                "{:<24}  {:>7}  {:>7}  {:>9}  {:>7}  {:>8}  {:>12}",
                "RUNNER", "TOTAL", "ACTIVE", "COMPLETED", "FAILED", "SUCCESS", "AVG DURATION"
            );
            for r in &items {
                println!(
                    "{:<24}  {:>7}  {:>7}  {:>9}  {:>7}  {:>8}  {:>12}",
                    r.runner_id,
                    r.total_runs,
                    r.active_runs,
                    r.completed_runs,
                    r.failed_runs,
                    percent(Some(r.success_rate)),
                    secs(r.avg_duration_seconds)
                );
            }
        }
        return Ok(());
    }
    let s = store.get_run_stats(from, to, a.runner.as_deref()).await?;
    if out.json {
        out.json(&s);
    } else {
        println!("runs created {} .. {}", crate::output::time(Some(from)), crate::output::time(Some(to)));
        println!("total {}  throughput {:.4} per hour", s.total_count, s.throughput_per_hour);
        println!(
            "created {}  queued {}  claimed {}  running {}  completed {}  failed {}  cancelled {}  timeout {}",
            s.created_count,
            s.queued_count,
            s.claimed_count,
            s.running_count,
            s.completed_count,
            s.failed_count,
            s.cancelled_count,
            s.timeout_count
        );
        println!("success rate {}  failure rate {}", percent(s.success_rate), percent(s.failure_rate));
        println!(
            "duration: avg {}  p50 {}  p95 {}  p99 {}",
            secs(s.avg_duration_seconds),
            secs(s.p50_duration_seconds),
            secs(s.p95_duration_seconds),
            secs(s.p99_duration_seconds)
        );
        println!("queue wait: avg {}", secs(s.avg_queue_wait_seconds));
    }
    Ok(())
}
