//! `runledger bench --host-shape`: what the Python binding costs. The host's
//! own workload (LangBot executes runs directly: `create_run` as `running`,
//! three `append_event`, `finalize_run`) from 32 concurrent tasks, once with
//! this library on tokio and once with the Python package on one asyncio loop
//! (`python -m runledger.bench`, a child process), on the same Redis, in
//! alternating rounds. The ratio of the two rates is the binding's overhead.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use runledger::{Error, Finish, NewEvent, NewRun, Result, RunStatus, Store};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::probe::Probe;
use super::workload::remove_prefix;
use super::{BenchArgs, METADATA_PAD};
use crate::measure::median;
use crate::output::Output;
use crate::output::redacted;
use crate::private::PrivateRedis;
use crate::target::Target;

/// The queue the host-shaped runs are created in.
const QUEUE: &str = "bench-host";

/// One lifecycle's arguments, the same for both sides: the Python side gets
/// them as JSON, so neither does more work than the other.
#[derive(Serialize, Deserialize, Clone)]
struct Workload {
    runner_id: String,
    queue_name: String,
    conversation_id: String,
    bot_id: String,
    metadata: Value,
    event_type: String,
    event_data: Value,
    usage: Value,
}

impl Workload {
    fn standard() -> Workload {
        Workload {
            runner_id: "bench-agent".into(),
            queue_name: QUEUE.into(),
            conversation_id: "bench-conversation".into(),
            bot_id: "bench-bot".into(),
            // ~200 bytes of metadata and ~100-byte events, as in the lifecycle bench.
            metadata: json!({ "user": "bench", "text": &METADATA_PAD[..150] }),
            event_type: "message.delta".into(),
            event_data: json!({ "text": &METADATA_PAD[..80] }),
            usage: json!({ "input_tokens": 120, "output_tokens": 48 }),
        }
    }
}

#[derive(Serialize)]
pub struct HostFigures {
    pub redis_version: String,
    pub runs: usize,
    pub tasks: usize,
    pub rounds: usize,
    /// Lifecycles per second of each round, in round order.
    pub rust_per_s: Vec<f64>,
    pub python_per_s: Vec<f64>,
    pub rust_median_per_s: f64,
    pub python_median_per_s: f64,
    /// Median over the rounds of Python's rate / Rust's rate in that round.
    pub python_over_rust: f64,
    pub python: String,
}

/// What `python -m runledger.bench` prints.
#[derive(Deserialize)]
struct PythonRound {
    runs: usize,
    per_s: f64,
}

pub async fn run(target: &Target, out: &Output, a: &BenchArgs) -> Result<()> {
    if a.shared {
        return Err(Error::Invalid("bench --host-shape uses a fresh prefix of its own; drop --shared".into()));
    }
    if a.runs == 0 || a.tasks == 0 || a.rounds == 0 {
        return Err(Error::Invalid("--runs, --tasks and --rounds must be at least 1".into()));
    }
    let python = Python::new(a.python.clone().unwrap_or_else(|| PathBuf::from("python3")))?;
    python.check()?;
    let (server, url, prefix) = match target.url.clone() {
        Some(url) => {
            (None, url, format!("{}-bench-{}", target.prefix, &uuid::Uuid::new_v4().simple().to_string()[..8]))
        }
        None => {
            let server = PrivateRedis::start(target.cluster)?;
            let url = server.url();
            (Some(server), url, target.prefix.clone())
        }
    };
    let store = Store::connect_with(&url, target.config(&prefix)).await?;
    let redis_version = match Probe::new(&store).info("server").await? {
        Some(info) => info.get("redis_version").cloned().unwrap_or_default(),
        None => "n/a".into(),
    };
    eprintln!(
        "bench: host shape, Redis {redis_version} at {}{}, {} runs x {} rounds, {} tasks, key prefix {prefix}",
        redacted(&url),
        server.as_ref().map(PrivateRedis::describe).unwrap_or_default(),
        a.runs,
        a.rounds,
        a.tasks
    );
    let workload = Workload::standard();
    let measured = rounds(&store, &url, &prefix, target, &python, &workload, a).await;
    if server.is_none() {
        match remove_prefix(&store, &prefix).await {
            Ok(removed) => eprintln!("bench: removed {removed} keys under prefix {prefix}"),
            Err(e) => eprintln!("bench: note: could not remove the keys under prefix {prefix}: {e}"),
        }
    }
    let (rust_per_s, python_per_s) = measured?;
    drop(server);
    let ratios: Vec<f64> = python_per_s.iter().zip(&rust_per_s).map(|(p, r)| p / r).collect();
    let f = HostFigures {
        redis_version,
        runs: a.runs,
        tasks: a.tasks,
        rounds: a.rounds,
        rust_median_per_s: median(&rust_per_s).unwrap_or(0.0),
        python_median_per_s: median(&python_per_s).unwrap_or(0.0),
        python_over_rust: median(&ratios).unwrap_or(0.0),
        rust_per_s,
        python_per_s,
        python: python.exe.display().to_string(),
    };
    if out.json {
        out.json(&f);
    } else {
        print_table(&f);
    }
    Ok(())
}

/// The rounds, Rust first in even rounds and Python first in odd ones, so
/// neither side always runs on the warmer (or the more loaded) minute.
async fn rounds(
    store: &Store,
    url: &str,
    prefix: &str,
    target: &Target,
    python: &Python,
    workload: &Workload,
    a: &BenchArgs,
) -> Result<(Vec<f64>, Vec<f64>)> {
    // Connections made and scripts loaded before the clock starts, as in the child.
    rust_lifecycles(store, workload, a.tasks, a.tasks).await?;
    let (mut rust, mut py) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        for side in if round % 2 == 0 { ["rust", "python"] } else { ["python", "rust"] } {
            if side == "rust" {
                let start = Instant::now();
                rust_lifecycles(store, workload, a.runs, a.tasks).await?;
                rust.push(a.runs as f64 / start.elapsed().as_secs_f64());
            } else {
                py.push(python_round(python, url, prefix, target, workload, a).await?);
            }
        }
        eprintln!(
            "bench: round {}: Rust library {:.0} runs/s, Python package {:.0} runs/s",
            round + 1,
            rust[round],
            py[round]
        );
    }
    Ok((rust, py))
}

/// `n` host-shaped lifecycles from `tasks` concurrent tokio tasks.
async fn rust_lifecycles(store: &Store, w: &Workload, n: usize, tasks: usize) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (store, w, next) = (store.clone(), w.clone(), next.clone());
        handles.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let run_id = uuid::Uuid::new_v4().to_string();
                let run = NewRun::new(&run_id, &w.runner_id)
                    .queue(&w.queue_name)
                    .conversation(&w.conversation_id)
                    .bot(&w.bot_id)
                    .metadata(w.metadata.clone())
                    .status(RunStatus::Running);
                store.create_run(&run).await?;
                for sequence in 1..=3 {
                    let event = NewEvent::new(sequence, &w.event_type, w.event_data.clone());
                    store.append_event(&run_id, None, &event).await?;
                }
                let mut finish = Finish::new(RunStatus::Completed);
                finish.usage = Some(w.usage.clone());
                store.finalize_run(&run_id, &finish, None).await?;
            }
            Ok::<(), Error>(())
        }));
    }
    for handle in handles {
        handle.await.map_err(|e| Error::Protocol(format!("bench task failed: {e}")))??;
    }
    Ok(())
}

/// One round of the Python side: its rate, as the child measured it (from
/// its first call to its last, after a warm-up like ours).
async fn python_round(
    python: &Python,
    url: &str,
    prefix: &str,
    target: &Target,
    w: &Workload,
    a: &BenchArgs,
) -> Result<f64> {
    let workload = serde_json::to_string(w).map_err(|e| Error::Protocol(e.to_string()))?;
    let mut command = python.command();
    command
        .args(["-m", "runledger.bench", "--redis", url, "--prefix", prefix])
        .args(["--runs", &a.runs.to_string(), "--tasks", &a.tasks.to_string(), "--workload", &workload])
        .env_remove("REDIS_URL");
    if target.cluster {
        command.arg("--cluster");
    }
    let shown = python.exe.display().to_string();
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| Error::Protocol(format!("bench: waiting for {shown}: {e}")))?
        .map_err(|e| Error::Invalid(format!("bench: could not start {}: {e}", python.exe.display())))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        return Err(Error::Protocol(format!(
            "bench: `{} -m runledger.bench` failed ({}): {last}",
            python.exe.display(),
            output.status
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let round: PythonRound =
        stdout.lines().rev().find_map(|line| serde_json::from_str(line).ok()).ok_or_else(|| {
            Error::Protocol(format!("bench: no figures from `{} -m runledger.bench`: {stdout}", python.exe.display()))
        })?;
    if round.runs != a.runs {
        return Err(Error::Protocol(format!("bench: the Python side ran {} runs, not {}", round.runs, a.runs)));
    }
    Ok(round.per_s)
}

/// The interpreter of the Python side. It runs in an empty directory of its
/// own: Python puts the working directory first on `sys.path`, and run from
/// the repository's `python/` the source tree (without its compiled module)
/// would shadow the installed package.
struct Python {
    exe: PathBuf,
    dir: tempfile::TempDir,
}

impl Python {
    fn new(exe: PathBuf) -> Result<Python> {
        let dir = tempfile::tempdir().map_err(|e| Error::Protocol(format!("bench: a scratch directory: {e}")))?;
        Ok(Python { exe, dir })
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.exe);
        command.current_dir(self.dir.path());
        command
    }

    /// Fails early, with what to do, when the interpreter cannot import the package.
    fn check(&self) -> Result<()> {
        let output = self.command().args(["-c", "import runledger.bench"]).output().map_err(|e| {
            Error::Invalid(format!(
                "bench --host-shape: could not start {}: {e} (pass --python PATH)",
                self.exe.display()
            ))
        })?;
        if output.status.success() {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "bench --host-shape: {} cannot import runledger (pip install ./python into it, or pass --python PATH to one that can)",
            self.exe.display()
        )))
    }
}

fn print_table(f: &HostFigures) {
    let rounds = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" / ");
    println!(
        "runledger bench --host-shape: Redis {}, create_run(running) + append_event x3 + finalize_run, {} tasks, {} runs per round, medians of {} rounds",
        f.redis_version, f.tasks, f.runs, f.rounds
    );
    println!("| side | lifecycles/s | rounds |");
    println!("| --- | --- | --- |");
    println!("| Rust library (tokio) | {:.0} | {} |", f.rust_median_per_s, rounds(&f.rust_per_s));
    println!("| Python package (one asyncio loop) | {:.0} | {} |", f.python_median_per_s, rounds(&f.python_per_s));
    println!("| Python / Rust | {:.2} | |", f.python_over_rust);
}
