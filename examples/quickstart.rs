//! The README's library example, compiled by `cargo test` so it stays true.
//! Run it against a Redis: `REDIS_URL=redis://127.0.0.1:6379/ cargo run --example quickstart`
//! (it serves the queue until Ctrl-C).

use std::time::Duration;

use runledger::{ClaimRequest, Done, Finish, NewRun, RunStatus, Store, Worker};
use serde_json::json;

#[tokio::main]
async fn main() -> runledger::Result<()> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let store = Store::connect(&url).await?;

    // Host side: enqueue (idempotent by run_id).
    store
        .create_run(&NewRun::new("run-42", "summarizer").queue("emails").priority(5).metadata(json!({"user": "ada"})))
        .await?;

    // Low level: claim, write fenced by the token, finish.
    if let Some(run) =
        store.claim_next_run(&ClaimRequest::new("box-1").queue("emails").lease(Duration::from_secs(30))).await?
    {
        let token = run.claim_token.as_deref();
        store.finalize_run(&run.run_id, &Finish::new(RunStatus::Completed), token).await?;
    }

    // Or let a Worker do the claiming, renewing, cancelling and retrying.
    let worker = Worker::builder(&store).queue("emails").concurrency(8).build(|ctx| async move {
        ctx.emit("progress", json!({"pct": 50})).await?; // sequenced and fenced
        Ok(Done { usage: Some(json!({"tokens": 812})), ..Default::default() })
    })?;
    worker.run().await?; // until SIGINT/SIGTERM or worker.shutdown_token()
    Ok(())
}
