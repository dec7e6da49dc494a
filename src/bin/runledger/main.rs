//! The `runledger` command line: host, operator and worker commands over the
//! ledger. Every command prints readable text, or the seed's JSON with `--json`.
//!
//! Exit codes: 0 ok, 1 Redis or other failure, 2 bad input, 3 not found,
//! 4 conflict (other terminal status, event content, out of order, finished),
//! 5 claim lost (stale token or deadline passed).

mod bench;
mod demo;
mod ledger;
mod measure;
mod output;
mod private;
mod queue_cmd;
mod simulate;
mod target;
mod ui;
mod worker_cmd;

use clap::{Parser, Subcommand};
use runledger::Error;
use target::Target;

#[derive(Parser)]
#[command(name = "runledger", version, about = "A Redis-backed distributed work queue and run ledger")]
pub struct Cli {
    /// Redis server URL [default: redis://127.0.0.1:6379/; demo and bench start a private
    /// redis-server when neither this nor REDIS_URL is given]. A cluster:
    /// redis+cluster://host:port,host:port/ (or --cluster with redis://host:port,host:port/).
    /// Redis Sentinel: redis+sentinel://host:port,host:port/MASTER-NAME, the sentinels'
    /// addresses (or --sentinel-master NAME with redis://host:port,host:port/).
    #[arg(long, global = true, env = "REDIS_URL")]
    redis: Option<String>,
    /// The URL names seed nodes of a Redis Cluster (demo and bench without a URL start a
    /// private 6-node cluster).
    /// A plain redis:// URL of a cluster node is detected (INFO cluster) without it.
    #[arg(long, global = true, env = "REDIS_CLUSTER", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    cluster: bool,
    /// The URL names the sentinels of a Redis Sentinel setup, which monitor the master by
    /// this name (like a redis+sentinel://.../NAME URL).
    #[arg(long, global = true, env = "REDIS_SENTINEL_MASTER", value_name = "NAME", conflicts_with = "cluster")]
    sentinel_master: Option<String>,
    /// Write concern: every write waits until N replicas have it (Redis WAIT, 1 s at most);
    /// fewer in time is an error. 0 = off.
    #[arg(long, global = true, env = "RUNLEDGER_WAIT_REPLICAS", default_value_t = 0)]
    wait_replicas: u32,
    /// PEM file of the CA that signs the server's certificate, for a rediss:// (TLS) URL
    /// [default: the system's roots]; like redis-cli's --cacert.
    #[arg(long, global = true, env = "RUNLEDGER_TLS_CA", value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// Prefix of every key.
    #[arg(long, global = true, env = "RUNLEDGER_PREFIX", default_value = "rl")]
    prefix: String,
    /// Print JSON (the seed's field names) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum Command {
    /// Create a run (idempotent by run id).
    Enqueue(ledger::EnqueueArgs),
    /// Claim the next run for a runtime; prints null when there is none.
    Claim(ledger::ClaimArgs),
    /// Extend a claim's lease.
    Renew(ledger::RenewArgs),
    /// Give a claim back to the queue or to a terminal status.
    Release(ledger::ReleaseArgs),
    /// Append a runner event.
    Append(ledger::AppendArgs),
    /// Append a host audit event after the last sequence.
    Audit(ledger::AuditArgs),
    /// Finish a run.
    Finalize(ledger::FinalizeArgs),
    /// Cancel a queued run, or ask the worker holding it to stop.
    Cancel(ledger::CancelArgs),
    /// Copy a failed, dead, timed-out or cancelled run into a new queued run (RUN_ID~r1).
    Requeue(ledger::RequeueArgs),
    /// Show one run.
    Get(ledger::GetArgs),
    /// List runs, newest first.
    Runs(ledger::RunsArgs),
    /// Show a run's events.
    Events(ledger::EventsArgs),
    /// List registered runtimes.
    Runtimes(ledger::RuntimesArgs),
    /// Depth per status, oldest queued age and lease holders of every queue.
    Queues,
    /// LangBot's stats: runs (default) or runners over a creation window, or runtimes.
    Stats(ledger::StatsArgs),
    /// Spread a logical queue over N physical queues (QUEUE#0..), e.g. over a cluster's shards.
    Partition(ledger::PartitionArgs),
    /// A queue's rules: groups (`queue set Q --group-by conversation_id --group-concurrency 1`),
    /// pause and resume.
    Queue(queue_cmd::QueueArgs),
    /// One pass of lease expiry, deadlines, delayed runs, stale runtimes, retention.
    Reap,
    /// Redis Functions: `functions load` loads this build's library (as an
    /// admin, once, for tenants that may FCALL but not FUNCTION LOAD).
    Functions(ledger::FunctionsArgs),
    /// Run a demo worker (simulated agent work) until SIGINT/SIGTERM.
    Worker(worker_cmd::WorkerArgs),
    /// The main job: host, workers (one killed midway), live progress, checked summary.
    Demo(demo::DemoArgs),
    /// Measure enqueue and lifecycle rates, idle claim latency, claim cost, memory.
    Bench(bench::BenchArgs),
    /// Web dashboard (queues, runs with live events, runtimes, actions) and /metrics.
    Ui(ui::UiArgs),
}

#[tokio::main]
async fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version go to stdout as usual.
            let _ = err.print();
            std::process::exit(0);
        }
        Err(err) if err.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            std::process::exit(2);
        }
        Err(err) => {
            // Bad arguments: one line, like every other error, exit 2.
            let detail = err.to_string();
            let message: Vec<&str> = detail
                .lines()
                .map(str::trim)
                .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
                .filter(|line| !line.is_empty())
                .collect();
            eprintln!("runledger: {} (see runledger --help)", message.join(" ").trim_start_matches("error: "));
            std::process::exit(2);
        }
    };
    // Printing into a closed pipe (`runledger runs | head`) ends quietly, as
    // other CLIs do. Not for the long-running commands: with SIGPIPE at its
    // default, a write into a socket that Redis (or the network) closed kills
    // the process silently instead of failing one call, which the library
    // retries (found by tests/it/chaos.rs).
    #[cfg(unix)]
    if !matches!(cli.command, Command::Worker(_) | Command::Demo(_) | Command::Bench(_)) {
        // SAFETY: signal(2) only changes how this process takes SIGPIPE.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(err) = run(cli).await {
        match &err {
            Error::Redis(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Moved) => eprintln!(
                "runledger: the server is a Redis Cluster node (it answered MOVED): pass --cluster, or a redis+cluster://host:port/ URL"
            ),
            _ => eprintln!("runledger: {err}"),
        }
        std::process::exit(exit_code(&err));
    }
}

async fn run(cli: Cli) -> runledger::Result<()> {
    let out = output::Output { json: cli.json };
    let target = Target {
        url: cli.redis.clone(),
        prefix: cli.prefix.clone(),
        cluster: cli.cluster,
        sentinel_master: cli.sentinel_master.clone(),
        wait_replicas: cli.wait_replicas,
        tls_ca: cli.tls_ca.clone(),
    };
    let url = cli.redis.clone().unwrap_or_else(|| "redis://127.0.0.1:6379/".to_string());
    let store = || ledger::connect(&url, &target);
    match cli.command {
        Command::Enqueue(a) => ledger::enqueue(&store().await?, &out, a).await,
        Command::Claim(a) => ledger::claim(&store().await?, &out, a).await,
        Command::Renew(a) => ledger::renew(&store().await?, &out, a).await,
        Command::Release(a) => ledger::release(&store().await?, &out, a).await,
        Command::Append(a) => ledger::append(&store().await?, &out, a).await,
        Command::Audit(a) => ledger::audit(&store().await?, &out, a).await,
        Command::Finalize(a) => ledger::finalize(&store().await?, &out, a).await,
        Command::Cancel(a) => ledger::cancel(&store().await?, &out, a).await,
        Command::Requeue(a) => ledger::requeue(&store().await?, &out, a).await,
        Command::Get(a) => ledger::get(&store().await?, &out, a).await,
        Command::Runs(a) => ledger::runs(&store().await?, &out, a).await,
        Command::Events(a) => ledger::events(&store().await?, &out, a).await,
        Command::Runtimes(a) => ledger::runtimes(&store().await?, &out, a).await,
        Command::Queues => ledger::queues(&store().await?, &out).await,
        Command::Stats(a) => ledger::stats(&store().await?, &out, a).await,
        Command::Partition(a) => ledger::partition(&store().await?, &out, a).await,
        Command::Queue(a) => queue_cmd::run(&store().await?, &out, a).await,
        Command::Reap => ledger::reap(&store().await?, &out).await,
        Command::Functions(a) => ledger::functions(&store().await?, &out, a).await,
        Command::Worker(a) => match ledger::connect_waiting(&url, &target).await? {
            Some(store) => worker_cmd::run(&store, &out, a).await,
            None => Ok(()),
        },
        Command::Demo(a) => demo::run(&target, &out, a).await,
        Command::Bench(a) => run_bench(&target, &out, a).await,
        Command::Ui(a) => ui::run(&store().await?, a).await,
    }
}

/// `runledger bench`: the part of the bench its flags name, else the standard one.
async fn run_bench(target: &Target, out: &output::Output, a: bench::BenchArgs) -> runledger::Result<()> {
    if a.host_shape {
        return bench::host::run(target, out, &a).await;
    }
    if a.dashboard {
        return bench::ui::run(target, out).await;
    }
    if a.groups {
        return bench::groups::run(target, out, &a).await;
    }
    if a.peer.is_some() {
        return bench::peer::run(target, out, &a).await;
    }
    if target.cluster || target.url.as_deref().is_some_and(|u| u.contains("+cluster://")) {
        if a.shared {
            return Err(Error::Invalid("bench --cluster uses prefixes of its own; --shared is for one server".into()));
        }
        return bench::cluster::run(target, out, &a).await;
    }
    bench::standard::run(target, out, a).await
}

fn exit_code(err: &Error) -> i32 {
    match err {
        Error::Invalid(_) => 2,
        Error::NotFound(_) => 3,
        Error::Conflict(_) | Error::Finished(_) | Error::OutOfOrder(_) | Error::Limit(_) => 4,
        Error::StaleToken(_) | Error::DeadlinePassed(_) => 5,
        Error::QueueFull(_) => 6,
        Error::Redis(_)
        | Error::WriteConcern(_)
        | Error::Protocol(_)
        | Error::Server(_)
        | Error::Unreachable { .. } => 1,
    }
}
