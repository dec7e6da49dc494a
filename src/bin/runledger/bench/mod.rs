//! `runledger bench`: the benchmark. Enqueue rates, lifecycle rates with the
//! library's Worker, idle claim latency, claim cost against queue depth,
//! memory per run and Redis commands / CPU per lifecycle.
//!
//! This module holds what the parts share: the arguments, the workload
//! ([`workload`]: runs, enqueues, the lifecycle, idle waiters) and the
//! server's figures ([`probe`]: INFO, CONFIG GET, commandstats). Each part is
//! a file of its own and uses only these: [`standard`] (the default figures,
//! with [`report`] printing them and `--check`), [`limit`] (the yardsticks),
//! [`memory`], [`steps`], [`peer`] (`--peer`), [`host`] (`--host-shape`),
//! [`cluster`] (`--cluster`), [`ui`] (`--dashboard`) and [`groups`] (`--groups`). The CLI's `main.rs`
//! picks the part the flags name.

pub mod cluster;
pub mod groups;
pub mod host;
pub mod limit;
pub mod memory;
pub mod peer;
pub mod probe;
pub mod report;
pub mod standard;
pub mod steps;
pub mod ui;
pub mod workload;

use clap::Args;

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Runs per phase.
    #[arg(long, default_value_t = 20_000)]
    pub runs: usize,
    /// Workers (one process, library Worker) of the main lifecycle phase.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Workers of the second lifecycle phase (0 = skip).
    #[arg(long, default_value_t = 32)]
    pub many_workers: usize,
    /// Queue depth of the deep claim-cost measurement (0 = skip).
    #[arg(long, default_value_t = 1_000_000)]
    pub depth: usize,
    /// Single enqueues of the idle-latency phase.
    #[arg(long, default_value_t = 1_000)]
    pub latency_samples: usize,
    /// Print each figure next to its target and say which fall short.
    #[arg(long)]
    pub check: bool,
    /// With --redis: use --prefix as it is instead of a fresh prefix, so an ACL user limited to
    /// its prefix (README, "Security: ACL user") can run the bench. Its runs go to the queues
    /// bench, bench-single, bench-many, bench-idle, bench-1k and bench-deep of that prefix, which
    /// must hold no runs; they are emptied again at the end (the queue names stay registered).
    #[arg(long)]
    pub shared: bool,
    /// Only the binding's overhead: the host's workload (create_run as running, append_event x3,
    /// finalize_run) from --tasks concurrent tasks, with this library and with the Python
    /// package (`python -m runledger.bench`) on the same Redis, in --rounds alternating rounds.
    #[arg(long)]
    pub host_shape: bool,
    /// Concurrent tasks of --host-shape (tokio tasks; asyncio tasks on one loop in Python).
    #[arg(long, default_value_t = 32)]
    pub tasks: usize,
    /// Rounds of --host-shape and --peer; the figures are their medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The Python interpreter of --host-shape, with the runledger package installed
    /// (pip install ./python) [default: python3].
    #[arg(long, value_name = "PATH")]
    pub python: Option<std::path::PathBuf>,
    /// Only runledger beside a peer queue, side by side in --rounds alternating rounds, each
    /// side on a fresh private redis-server at Redis's stock settings, with the same workload:
    /// `bullmq` (BullMQ's Queue and Worker, run by Node.js from --peer-dir).
    #[arg(long, value_name = "PEER")]
    pub peer: Option<String>,
    /// The folder of --peer's side: the repository's `bench/bullmq`, after `npm ci` in it.
    #[arg(long, value_name = "DIR")]
    pub peer_dir: Option<std::path::PathBuf>,
    /// The Node.js of --peer bullmq [default: node].
    #[arg(long, value_name = "PATH")]
    pub node: Option<std::path::PathBuf>,
    /// Runner ids the runs spread over (`bench-agent-0` ..), to measure the claim with several.
    #[arg(long, default_value_t = 1)]
    pub runners: usize,
    /// The lifecycle workers claim with a runner filter naming every runner of --runners.
    #[arg(long)]
    pub runner_filter: bool,
    /// Only the dashboard's cost: Redis commands and time of one /metrics scrape and of each
    /// page of `runledger ui`, at 10 and at 1,000 queues (a private redis-server).
    #[arg(long)]
    pub dashboard: bool,
    /// Only what groups cost: the claim on 10,000 runs without groups, with 10,000 and 100
    /// groups and with 1 and 100 groups at their limit, and the lifecycle (4 workers, --runs)
    /// without groups and with --group-concurrency 1 over 100 conversations, in --rounds rounds.
    #[arg(long)]
    pub groups: bool,
}

pub(crate) const METADATA_PAD: &str = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation";
