//! The simulated agent work that `runledger worker` and `runledger demo` run:
//! a few steps of sleep, a progress event per step, the odd retryable failure.

use std::time::Duration;

use rand::RngExt;
use runledger::{Done, Failure, HandlerResult, RunContext};
use serde_json::json;

#[derive(Clone, Copy, Debug)]
pub struct Simulation {
    /// Milliseconds of work per run (spread over the steps, jittered ±50 %).
    pub work_ms: u64,
    /// Progress events per run (plus one `started` and one `finished`).
    pub steps: u32,
    /// Chance that an attempt fails with a retryable error.
    pub fail_rate: f64,
}

pub async fn handle(ctx: RunContext, sim: Simulation) -> HandlerResult {
    let started = std::time::Instant::now();
    ctx.emit("started", json!({ "attempt": ctx.run.dispatch_attempts, "queue": ctx.run.queue_name })).await?;
    let steps = sim.steps.max(1);
    for step in 1..=steps {
        let ms = {
            let mut rng = rand::rng();
            let base = sim.work_ms as f64 / steps as f64;
            (base * rng.random_range(0.5..1.5)) as u64
        };
        tokio::select! {
            _ = ctx.stopped() => return Err(Failure::fatal("stopped")),
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
        }
        let fail = rand::rng().random_bool(sim.fail_rate.clamp(0.0, 1.0) / steps as f64);
        if fail {
            return Err(Failure::retryable(format!("simulated transient failure at step {step}")));
        }
        ctx.emit("progress", json!({ "step": step, "of": steps })).await?;
    }
    let tokens = rand::rng().random_range(100..2000);
    ctx.emit("finished", json!({ "tokens": tokens, "attempt": ctx.run.dispatch_attempts })).await?;
    Ok(Done {
        usage: Some(json!({ "tokens": tokens, "ms": started.elapsed().as_millis() as u64 })),
        cost: Some(json!({ "usd": tokens as f64 * 0.000002 })),
        metadata: None,
    })
}
