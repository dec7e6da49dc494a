//! `runledger bench --groups`: what groups cost. The claim (each followed by
//! its finish, which passes the group's slot on) on queues of 10,000 runs:
//! without groups, with 10,000 and with 100 groups, and with 1 and with 100
//! groups at their limit holding half the runs ahead in priority; then the
//! lifecycle with 4 Workers without groups and with `--group-concurrency 1`
//! over 100 conversations. Each round on a fresh private redis-server at
//! stock settings; the figures are medians over `--rounds`.

use std::time::{Duration, Instant};

use runledger::{ClaimOutcome, ClaimRequest, Error, Finish, GroupBy, GroupSettings, NewRun, Result, RunStatus, Store};
use serde::Serialize;

use super::BenchArgs;
use super::METADATA_PAD;
use super::probe::Probe;
use super::steps::{StepCost, measure};
use super::workload::lifecycle;
use crate::measure::percentile;
use crate::output::Output;
use crate::private::PrivateRedis;
use crate::target::Target;

const DEPTH: usize = 10_000;
const CLAIMS: usize = 2_000;
const WORKERS: usize = 4;
const CONVERSATIONS: usize = 100;

/// One queue's shape: how its runs are grouped, and which groups are held at their limit.
struct Case {
    name: &'static str,
    /// Conversations of the free runs (0: the queue does not group).
    free_groups: usize,
    /// Groups at their limit, each holding `DEPTH / 2 / held` runs ahead in priority.
    held: usize,
}

const CASES: [Case; 5] = [
    Case { name: "no groups", free_groups: 0, held: 0 },
    Case { name: "10,000 groups", free_groups: DEPTH, held: 0 },
    Case { name: "100 groups", free_groups: 100, held: 0 },
    Case { name: "1 group at its limit", free_groups: DEPTH / 2, held: 1 },
    Case { name: "100 groups at their limit", free_groups: DEPTH / 2, held: 100 },
];

#[derive(Serialize, Clone, Debug)]
pub struct ClaimRow {
    pub case: String,
    /// Redis commands of one claim and its finish.
    pub commands: Option<f64>,
    pub redis_cpu_us: Option<f64>,
    /// Median time of one claim, client side.
    pub claim_median_us: f64,
}

#[derive(Serialize, Clone, Debug)]
pub struct LifecycleRow {
    pub case: String,
    pub runs_per_s: f64,
    pub commands: Option<f64>,
    pub redis_cpu_us: Option<f64>,
}

#[derive(Serialize)]
pub struct GroupFigures {
    pub rounds: usize,
    pub claims: Vec<ClaimRow>,
    pub lifecycle: Vec<LifecycleRow>,
}

pub async fn run(target: &Target, out: &Output, a: &BenchArgs) -> Result<()> {
    if target.url.is_some() || target.cluster {
        return Err(Error::Invalid(
            "bench --groups starts a private redis-server of its own (it counts every command the server runs)".into(),
        ));
    }
    let runs = a.runs.clamp(100, 20_000);
    let rounds = a.rounds.max(1);
    let mut claims: Vec<Vec<ClaimRow>> = vec![Vec::new(); CASES.len()];
    let mut cycles: Vec<Vec<LifecycleRow>> = vec![Vec::new(); 2];
    for round in 1..=rounds {
        eprintln!("bench: groups, round {round} of {rounds}");
        let server = PrivateRedis::start(false)?;
        let store = Store::connect(&server.url()).await?;
        let probe = Probe::new(&store);
        for (i, case) in CASES.iter().enumerate() {
            claims[i].push(claim_case(&store, &probe, case, i).await?);
        }
        for (i, grouped) in [false, true].into_iter().enumerate() {
            cycles[i].push(lifecycle_case(&store, &probe, grouped, runs).await?);
        }
    }
    let figures = GroupFigures {
        rounds,
        claims: claims.iter().map(|rows| median_claim(rows)).collect(),
        lifecycle: cycles.iter().map(|rows| median_lifecycle(rows)).collect(),
    };
    if out.json {
        out.json(&figures);
        return Ok(());
    }
    let opt = |v: Option<f64>, digits: usize| v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "n/a".into());
    println!("claim + its finish, {DEPTH} queued runs (medians of {rounds} rounds)");
    println!("{:<28} {:>10} {:>14} {:>14}", "QUEUE", "COMMANDS", "REDIS CPU us", "CLAIM us");
    for r in &figures.claims {
        println!(
            "{:<28} {:>10} {:>14} {:>14.0}",
            r.case,
            opt(r.commands, 1),
            opt(r.redis_cpu_us, 1),
            r.claim_median_us
        );
    }
    println!("lifecycle, {WORKERS} workers, {runs} runs (claim, 3 events, finish)");
    println!("{:<28} {:>10} {:>14} {:>14}", "QUEUE", "COMMANDS", "REDIS CPU us", "RUNS/S");
    for r in &figures.lifecycle {
        println!("{:<28} {:>10} {:>14} {:>14.0}", r.case, opt(r.commands, 1), opt(r.redis_cpu_us, 1), r.runs_per_s);
    }
    Ok(())
}

fn run_in(queue: &str, id: String, conversation: Option<String>, priority: i64) -> NewRun {
    let mut run = NewRun::new(id, "bench-agent")
        .queue(queue)
        .priority(priority)
        .metadata(serde_json::json!({ "user": "bench", "text": &METADATA_PAD[..150] }));
    run.conversation_id = conversation;
    run
}

async fn group_by_conversation(store: &Store, queue: &str) -> Result<()> {
    let settings =
        GroupSettings { group_by: Some(Some(GroupBy::ConversationId)), concurrency: Some(1), ..Default::default() };
    store.set_groups(queue, &settings).await.map(|_| ())
}

async fn create_all(store: &Store, runs: Vec<NewRun>) -> Result<()> {
    for chunk in runs.chunks(1000) {
        store.create_runs(chunk).await?;
    }
    Ok(())
}

async fn claim_case(store: &Store, probe: &Probe<'_>, case: &Case, n: usize) -> Result<ClaimRow> {
    let queue = format!("bench-groups-{n}");
    if case.free_groups > 0 {
        group_by_conversation(store, &queue).await?;
    }
    let mut runs = Vec::with_capacity(DEPTH);
    if let Some(per) = (DEPTH / 2).checked_div(case.held) {
        for g in 0..case.held {
            runs.extend((0..per).map(|i| run_in(&queue, format!("held-{g}-{i}"), Some(format!("held-{g}")), 10)));
        }
    }
    let free = DEPTH - runs.len();
    for i in 0..free {
        let conversation = (case.free_groups > 0).then(|| format!("c{}", i % case.free_groups));
        runs.push(run_in(&queue, format!("free-{n}-{i}"), conversation, 0));
    }
    create_all(store, runs).await?;
    let request = ClaimRequest::new("bench-claimer").queue(&queue).lease(Duration::from_secs(600));
    // The held groups' first runs, claimed and kept: those groups are at their limit.
    for _ in 0..case.held {
        store.claim_from(&queue, &request).await?;
    }
    let mut times = Vec::with_capacity(CLAIMS);
    let (samples, queue, request) = (&mut times, &queue, &request);
    let cost: StepCost = measure(probe, CLAIMS, move || async move {
        for _ in 0..CLAIMS {
            let start = Instant::now();
            let outcome = store.claim_from(queue, request).await?;
            samples.push(start.elapsed().as_secs_f64() * 1e6);
            let ClaimOutcome::Claimed(run) = outcome else {
                return Err(Error::Server(format!("bench: {queue} ({}) had nothing claimable", case.name)));
            };
            if run.run_id.starts_with("held-") {
                return Err(Error::Server(format!("bench: {queue} handed out a run of a group at its limit")));
            }
            store.finalize_run(&run.run_id, &Finish::new(RunStatus::Completed), run.claim_token.as_deref()).await?;
        }
        Ok(())
    })
    .await?;
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(ClaimRow {
        case: case.name.to_string(),
        commands: cost.commands,
        redis_cpu_us: cost.redis_cpu_us,
        claim_median_us: percentile(&times, 0.5),
    })
}

async fn lifecycle_case(store: &Store, probe: &Probe<'_>, grouped: bool, runs: usize) -> Result<LifecycleRow> {
    let queue = if grouped { "bench-groups-lifecycle-grouped" } else { "bench-groups-lifecycle" };
    if grouped {
        group_by_conversation(store, queue).await?;
    }
    let batch = (0..runs)
        .map(|i| run_in(queue, format!("{queue}-{i}"), grouped.then(|| format!("c{}", i % CONVERSATIONS)), 0))
        .collect();
    create_all(store, batch).await?;
    let mut elapsed = Duration::ZERO;
    let took = &mut elapsed;
    let cost = measure(probe, runs, move || async move {
        *took = lifecycle(store, queue, WORKERS, runs).await?;
        Ok(())
    })
    .await?;
    let case =
        if grouped { format!("group-concurrency 1, {CONVERSATIONS} conversations") } else { "no groups".to_string() };
    Ok(LifecycleRow {
        case,
        runs_per_s: runs as f64 / elapsed.as_secs_f64(),
        commands: cost.commands,
        redis_cpu_us: cost.redis_cpu_us,
    })
}

fn median(values: Vec<f64>) -> f64 {
    let mut values = values;
    values.sort_by(|a, b| a.total_cmp(b));
    percentile(&values, 0.5)
}

fn median_opt(values: Vec<Option<f64>>) -> Option<f64> {
    values.into_iter().collect::<Option<Vec<f64>>>().map(median)
}

fn median_claim(rows: &[ClaimRow]) -> ClaimRow {
    ClaimRow {
        case: rows[0].case.clone(),
        commands: median_opt(rows.iter().map(|r| r.commands).collect()),
        redis_cpu_us: median_opt(rows.iter().map(|r| r.redis_cpu_us).collect()),
        claim_median_us: median(rows.iter().map(|r| r.claim_median_us).collect()),
    }
}

fn median_lifecycle(rows: &[LifecycleRow]) -> LifecycleRow {
    LifecycleRow {
        case: rows[0].case.clone(),
        runs_per_s: median(rows.iter().map(|r| r.runs_per_s).collect()),
        commands: median_opt(rows.iter().map(|r| r.commands).collect()),
        redis_cpu_us: median_opt(rows.iter().map(|r| r.redis_cpu_us).collect()),
    }
}
