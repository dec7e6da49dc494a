//! Every run has a documented end: a run pinned to a runtime that is gone
//! loses its pin and is claimed by another, and a `running` run (created for
//! direct execution, so with no lease) whose host never finished it times out.

use crate::common;

use std::time::Duration;

use runledger::*;

async fn pinned_to_a_gone_runtime_is_released_to_any_runtime() {
    let cfg = StoreConfig { pin_grace: Duration::ZERO, ..Default::default() };
    let (_redis, store) = common::store_with(cfg).await;
    store.register_runtime(&RegisterRuntime::new("alive")).await.expect("register");
    store.create_run(&NewRun::new("ghostly", "agent").queue("pq").requested_runtime("ghost")).await.expect("create");
    store.create_run(&NewRun::new("kept", "agent").queue("pq").requested_runtime("alive")).await.expect("create");
    let other = ClaimRequest::new("other").queue("pq").lease(Duration::from_secs(30));
    assert!(store.claim_next_run(&other).await.expect("claim").is_none(), "pinned runs wait for their runtime");

    let report = store.reap(&["pq".to_string()], None).await.expect("reap");
    assert_eq!(report.pins_released, 1, "{report:?}");
    let released = store.get_run("ghostly").await.expect("get");
    assert_eq!(released.requested_runtime_id, None);
    assert!(released.status_reason.as_deref().is_some_and(|r| r.contains("ghost")), "{released:?}");
    let claimed = store.claim_next_run(&other).await.expect("claim").expect("the released run");
    assert_eq!(claimed.run_id, "ghostly");
    // A run pinned to a runtime that is alive keeps its pin.
    assert_eq!(store.get_run("kept").await.expect("get").requested_runtime_id.as_deref(), Some("alive"));
    assert!(store.claim_next_run(&other).await.expect("claim").is_none());
}

async fn a_new_pin_waits_out_the_grace() {
    let cfg = StoreConfig { pin_grace: Duration::from_secs(3600), ..Default::default() };
    let (_redis, store) = common::store_with(cfg).await;
    store.create_run(&NewRun::new("early", "agent").queue("pq").requested_runtime("later")).await.expect("create");
    let report = store.reap(&["pq".to_string()], None).await.expect("reap");
    assert_eq!(report.pins_released, 0, "a runtime that has not registered yet keeps its new runs");
    assert_eq!(store.get_run("early").await.expect("get").requested_runtime_id.as_deref(), Some("later"));
}

async fn a_running_run_whose_host_is_gone_times_out() {
    let cfg = StoreConfig { running_timeout: Some(Duration::from_secs(60)), ..Default::default() };
    let (_redis, store) = common::store_with(cfg).await;
    store.create_run(&NewRun::new("direct", "agent").queue("rq").status(RunStatus::Running)).await.expect("create");
    let stats = store.queue_stats("rq", 0).await.expect("stats");
    assert_eq!(stats.running, 1);
    assert!(stats.oldest_running_age.is_some());

    let now = store.server_time_ms().await.expect("time");
    let report = store.reap(&["rq".to_string()], Some(now + 30_000)).await.expect("reap");
    assert_eq!(report.timed_out, 0, "not yet past the running timeout");
    let report = store.reap(&["rq".to_string()], Some(now + 61_000)).await.expect("reap");
    assert_eq!(report.timed_out, 1, "{report:?}");
    let run = store.get_run("direct").await.expect("get");
    assert_eq!(run.status, RunStatus::Timeout);
    assert!(run.status_reason.as_deref().is_some_and(|r| r.contains("running timeout")), "{run:?}");
    assert_eq!(store.queue_stats("rq", 0).await.expect("stats").running, 0);

    // A running run that its host finishes leaves the running index at once.
    store.create_run(&NewRun::new("done", "agent").queue("rq").status(RunStatus::Running)).await.expect("create");
    store.finalize_run("done", &Finish::new(RunStatus::Completed), None).await.expect("finalize");
    assert_eq!(store.queue_stats("rq", 0).await.expect("stats").running, 0);
}

backend_tests!(
    pinned_to_a_gone_runtime_is_released_to_any_runtime,
    a_new_pin_waits_out_the_grace,
    a_running_run_whose_host_is_gone_times_out,
);
