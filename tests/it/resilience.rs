//! Scripts survive SCRIPT FLUSH and a Redis restart: they are run by SHA and
//! loaded again on NOSCRIPT, and a dead connection is replaced.
use crate::common;

use std::time::Duration;

use runledger::*;
use serde_json::json;

/// Whether the server holds the create_run script.
async fn create_script_loaded(raw: &mut runledger::store::Conn) -> bool {
    let sha = runledger::scripts::Scripts::new().create_run.script.get_hash().to_string();
    let exists: Vec<i64> = redis::cmd("SCRIPT").arg("EXISTS").arg(&sha).query_async(raw).await.expect("SCRIPT EXISTS");
    exists == [1]
}

#[tokio::test]
async fn operations_survive_script_flush() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    store.create_run(&NewRun::new("a", "agent").queue("q")).await.expect("create a");
    assert!(create_script_loaded(&mut raw).await, "create_run is loaded once used");

    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut raw).await.expect("SCRIPT FLUSH");
    assert!(!create_script_loaded(&mut raw).await, "flushed");

    // Every kind of call still works: single scripts and the pipelined batch path.
    store.create_run(&NewRun::new("b", "agent").queue("q")).await.expect("create after flush");
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut raw).await.expect("SCRIPT FLUSH");
    let batch: Vec<NewRun> = ["c", "d"].iter().map(|id| NewRun::new(*id, "agent").queue("q")).collect();
    let mut more: Vec<NewRun> = ["e"].iter().map(|id| NewRun::new(*id, "agent").queue("other")).collect();
    let mut all = batch;
    all.append(&mut more);
    let created = store.create_runs(&all).await.expect("pipelined create after flush");
    assert_eq!(created.len(), 3);
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut raw).await.expect("SCRIPT FLUSH");
    let run = store
        .claim_next_run(&ClaimRequest::new("rt").queue("q").lease(Duration::from_secs(30)))
        .await
        .expect("claim after flush")
        .expect("a run");
    assert_eq!(run.run_id, "a");
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut raw).await.expect("SCRIPT FLUSH");
    store.append_event("a", run.claim_token.as_deref(), &NewEvent::new(1, "x", json!({}))).await.expect("append");
    store.finalize_run("a", &Finish::new(RunStatus::Completed), run.claim_token.as_deref()).await.expect("finalize");
    assert_eq!(store.get_run("a").await.expect("get").status, RunStatus::Completed);
}

#[tokio::test]
async fn operations_survive_a_redis_restart() {
    let (mut redis, store) = common::store().await;
    store.create_run(&NewRun::new("before", "agent").queue("q")).await.expect("create before restart");

    redis.restart().expect("restart redis-server on the same port");

    // The store's connections died with the old server and its scripts are
    // gone: the next call replaces the connection and reloads the script.
    let run = store.create_run(&NewRun::new("after", "agent").queue("q")).await.expect("create after restart");
    assert_eq!(run.id % 4096, 0, "a fresh server (no persistence) numbers its queues from 0 again");
    let claimed = store
        .claim_next_run(&ClaimRequest::new("rt").queue("q"))
        .await
        .expect("claim after restart")
        .expect("the new run");
    assert_eq!(claimed.run_id, "after");
    store
        .finalize_run("after", &Finish::new(RunStatus::Completed), claimed.claim_token.as_deref())
        .await
        .expect("finalize");

    // The pipelined batch path replaces a dead connection too.
    redis.restart().expect("restart before a batch");
    let batch = vec![NewRun::new("b1", "agent").queue("q"), NewRun::new("b2", "agent").queue("other")];
    let created = store.create_runs(&batch).await.expect("pipelined create after restart");
    assert_eq!(created.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), ["b1", "b2"]);

    // And the blocking waiter reconnects too.
    let mut waiter = Waiter::new(&store).await.expect("waiter");
    redis.restart().expect("second restart");
    // Its dedicated connection died with the server: the first wait may report
    // that, and the waiter has a new connection for the next one.
    if let Ok(found) = waiter.claim(&ClaimRequest::new("rt").queue("q"), Duration::from_millis(200)).await {
        assert!(found.is_none(), "nothing is queued on the fresh server");
    }
    let again = waiter.claim(&ClaimRequest::new("rt").queue("q"), Duration::from_millis(200)).await;
    assert!(again.expect("waiter after reconnect").is_none());
    store.create_run(&NewRun::new("late", "agent").queue("q")).await.expect("create after second restart");
    let got =
        waiter.claim(&ClaimRequest::new("rt").queue("q"), Duration::from_secs(2)).await.expect("claim").expect("late");
    assert_eq!(got.run_id, "late");
}
