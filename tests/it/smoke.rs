use crate::common;
use runledger::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn lifecycle_smoke() {
    let (_r, store) = common::store().await;
    let run =
        store.create_run(&NewRun::new("r1", "agent").queue("q").priority(5).metadata(json!({"a": 1}))).await.unwrap();
    assert_eq!(run.status, RunStatus::Queued);
    let claimed = store
        .claim_next_run(&ClaimRequest::new("rt1").queue("q").lease(Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap();
    let token = claimed.claim_token.clone().unwrap();
    assert_eq!(claimed.dispatch_attempts, 1);
    let ev = store
        .append_events(
            "r1",
            Some(&token),
            &[NewEvent::new(1, "progress", json!({"p": 1})), NewEvent::new(2, "progress", json!({"p": 2}))],
        )
        .await
        .unwrap();
    assert_eq!(ev.len(), 2);
    store.renew_claim("r1", &token, Duration::from_secs(30)).await.unwrap();
    let done = store
        .finalize_run("r1", &Finish::new(RunStatus::Completed).metadata(json!({"b": 2})), Some(&token))
        .await
        .unwrap();
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(done.metadata, json!({"a": 1, "b": 2}));
    let page = store.page_run_events("r1", None, None, 10, Direction::Forward).await.unwrap();
    assert_eq!(page.items.len(), 2);
    let runs = store.list_runs(&RunFilter { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(runs.items.len(), 1);
    let stats = store.queue_stats("q", 10).await.unwrap();
    assert_eq!(stats.finished, 1);
    let rt = store.register_runtime(&RegisterRuntime::new("rt1")).await.unwrap();
    assert_eq!(rt.status, "online");
    let rep = store.reap(&[], None).await.unwrap();
    assert_eq!(rep.timed_out, 0);
}
