//! The lifecycle split into its steps: Redis commands and Redis CPU per
//! claim, per batch of 3 events and per finish, each step run over all the
//! phase's runs before the next starts, so each is measured on its own.
//! (The Worker chains the next claim into its finish; these are the separate
//! calls a host or another client makes.)

use runledger::{ClaimOutcome, ClaimRequest, Error, Finish, NewEvent, Result, RunStatus, Store};
use serde::Serialize;
use serde_json::json;

use super::METADATA_PAD;
use super::probe::{Probe, commands_between, per_run};
use super::workload::enqueue_batched;

/// The queue of the steps phase (one of the bench's queues, see `standard.rs`).
pub const STEPS_QUEUE: &str = "bench-steps";

/// Concurrent callers of each step.
const CALLERS: usize = 4;

#[derive(Serialize, Default, Clone, Debug)]
pub struct StepCost {
    pub commands: Option<f64>,
    /// Calls per run of each command (those inside scripts included), sorted by name.
    pub by_command: std::collections::BTreeMap<String, f64>,
    pub redis_cpu_us: Option<f64>,
    pub script_us: Option<f64>,
}

#[derive(Serialize, Default, Clone, Debug)]
pub struct Steps {
    pub claim: StepCost,
    pub event_batch: StepCost,
    pub finish: StepCost,
}

/// Runs `work` and returns what it cost Redis per run.
pub(crate) async fn measure<F, Fut>(probe: &Probe<'_>, runs: usize, work: F) -> Result<StepCost>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let (calls_before, cpu_before) = (probe.command_calls().await?, probe.redis_cpu().await?);
    work().await?;
    let (calls_after, cpu_after) = (probe.command_calls().await?, probe.redis_cpu().await?);
    let counted = match (calls_before, calls_after) {
        (Some(before), Some(after)) => Some(commands_between(&before, &after, runs)),
        _ => None,
    };
    let redis_cpu_us = per_run(cpu_before, cpu_after, 1e6, runs);
    Ok(match counted {
        Some(c) => StepCost {
            commands: Some(c.total),
            by_command: c.by_command.into_iter().collect(),
            redis_cpu_us,
            script_us: Some(c.script_us),
        },
        None => StepCost { redis_cpu_us, ..StepCost::default() },
    })
}

/// Runs `step` on every item from CALLERS concurrent tasks.
async fn each<T, F, Fut>(items: Vec<T>, step: F) -> Result<()>
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let mut chunks: Vec<Vec<T>> = (0..CALLERS).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        chunks[i % CALLERS].push(item);
    }
    let mut tasks = Vec::new();
    for chunk in chunks {
        let step = step.clone();
        tasks.push(tokio::spawn(async move {
            for item in chunk {
                step(item).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| Error::Protocol(format!("bench step task: {e}")))??;
    }
    Ok(())
}

/// Enqueues `runs` runs, then claims them all, then appends 3 events to each,
/// then finishes each: the cost of each step per run.
pub async fn steps(store: &Store, probe: &Probe<'_>, runs: usize) -> Result<Steps> {
    enqueue_batched(store, STEPS_QUEUE, runs).await?;
    let claimed = std::sync::Arc::new(std::sync::Mutex::new(Vec::with_capacity(runs)));
    let request = ClaimRequest::new("bench-steps").queue(STEPS_QUEUE).lease(std::time::Duration::from_secs(300));
    let claim = measure(probe, runs, || {
        let (store, claimed) = (store.clone(), claimed.clone());
        each(vec![(); runs], move |()| {
            let (store, claimed, request) = (store.clone(), claimed.clone(), request.clone());
            async move {
                match store.claim_from(STEPS_QUEUE, &request).await? {
                    ClaimOutcome::Claimed(run) => {
                        let token = run.claim_token.clone().unwrap_or_default();
                        claimed
                            .lock()
                            .map_err(|_| Error::Protocol("claimed runs poisoned".into()))?
                            .push((run.run_id, token));
                        Ok(())
                    }
                    _ => Err(Error::Server(format!("bench: a queued run of {STEPS_QUEUE} was not claimable"))),
                }
            }
        })
    })
    .await?;
    let claimed: Vec<(String, String)> =
        std::mem::take(&mut *claimed.lock().map_err(|_| Error::Protocol("claimed runs poisoned".into()))?);
    let pad = &METADATA_PAD[..70];
    let event_batch = measure(probe, runs, || {
        let store = store.clone();
        each(claimed.clone(), move |(run_id, token)| {
            let store = store.clone();
            async move {
                let events: Vec<NewEvent> =
                    (1..=3).map(|s| NewEvent::new(s, "progress", json!({ "step": s, "text": pad }))).collect();
                store.append_events(&run_id, Some(&token), &events).await.map(|_| ())
            }
        })
    })
    .await?;
    let finish = measure(probe, runs, || {
        let store = store.clone();
        each(claimed, move |(run_id, token)| {
            let store = store.clone();
            async move { store.finish_run(&run_id, &Finish::new(RunStatus::Completed), Some(&token)).await }
        })
    })
    .await?;
    Ok(Steps { claim, event_batch, finish })
}
