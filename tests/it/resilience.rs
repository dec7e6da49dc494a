//! Operations survive the loss of their code and a Redis restart: the
//! Functions library is loaded again where a call finds it missing (after
//! `FUNCTION FLUSH`, a restart, a failover to a node that never had it), the
//! scripts of the fallback on NOSCRIPT (after `SCRIPT FLUSH`), and a dead
//! connection is replaced.
use crate::common;

use std::time::Duration;

use runledger::*;
use serde_json::json;

/// Whether the server holds the code the store calls: this build's library,
/// or the create_run script.
async fn code_loaded(raw: &mut runledger::store::Conn, functions: bool) -> bool {
    if functions {
        let name = &runledger::scripts::library().name;
        let libraries: redis::Value = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg(name)
            .query_async(raw)
            .await
            .expect("FUNCTION LIST");
        !matches!(libraries, redis::Value::Array(ref items) if items.is_empty())
    } else {
        let sha = runledger::scripts::Scripts::new().create_run.script.get_hash().to_string();
        let exists: Vec<i64> =
            redis::cmd("SCRIPT").arg("EXISTS").arg(&sha).query_async(raw).await.expect("SCRIPT EXISTS");
        exists == [1]
    }
}

async fn flush(raw: &mut runledger::store::Conn, functions: bool) {
    let what = if functions { "FUNCTION" } else { "SCRIPT" };
    let _: () = redis::cmd(what).arg("FLUSH").query_async(raw).await.unwrap_or_else(|e| panic!("{what} FLUSH: {e}"));
    assert!(!code_loaded(raw, functions).await, "{what} FLUSH emptied it");
}

#[tokio::test]
async fn operations_survive_function_flush() {
    survive_flush(true).await;
}

#[tokio::test]
async fn operations_survive_script_flush() {
    survive_flush(false).await;
}

async fn survive_flush(functions: bool) {
    let (redis, store) = common::store_with(StoreConfig { functions, ..Default::default() }).await;
    let mut raw = common::raw(&redis).await;
    store.create_run(&NewRun::new("a", "agent").queue("q")).await.expect("create a");
    assert!(code_loaded(&mut raw, functions).await, "the code is loaded once used");
    assert_eq!(store.uses_functions(), functions, "the store calls its operations the way it was set to");

    flush(&mut raw, functions).await;
    // Every kind of call still works: single calls and the pipelined batch path.
    store.create_run(&NewRun::new("b", "agent").queue("q")).await.expect("create after flush");
    flush(&mut raw, functions).await;
    let batch: Vec<NewRun> = ["c", "d"].iter().map(|id| NewRun::new(*id, "agent").queue("q")).collect();
    let mut more: Vec<NewRun> = ["e"].iter().map(|id| NewRun::new(*id, "agent").queue("other")).collect();
    let mut all = batch;
    all.append(&mut more);
    let created = store.create_runs(&all).await.expect("pipelined create after flush");
    assert_eq!(created.len(), 3);
    flush(&mut raw, functions).await;
    let run = store
        .claim_next_run(&ClaimRequest::new("rt").queue("q").lease(Duration::from_secs(30)))
        .await
        .expect("claim after flush")
        .expect("a run");
    assert_eq!(run.run_id, "a");
    flush(&mut raw, functions).await;
    store.append_event("a", run.claim_token.as_deref(), &NewEvent::new(1, "x", json!({}))).await.expect("append");
    store.finalize_run("a", &Finish::new(RunStatus::Completed), run.claim_token.as_deref()).await.expect("finalize");
    assert_eq!(store.get_run("a").await.expect("get").status, RunStatus::Completed);
    // Still the same way in: a lost library is loaded again, not a reason to fall back.
    assert_eq!(store.uses_functions(), functions);
}

/// Another build's library (another hash) loaded beside this one: neither
/// replaces the other, and this build calls its own.
#[tokio::test]
async fn another_builds_library_stays_beside_this_one() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let ours = runledger::scripts::library();
    let hash = ours.name.trim_start_matches("runledger_");
    let theirs =
        ours.code.replace(hash, "0123456789abcdef").replace("local QUEUES = 4096", "local QUEUES = 4096 -- v2");
    let _: String = redis::cmd("FUNCTION").arg("LOAD").arg(&theirs).query_async(&mut raw).await.expect("load theirs");
    store.create_run(&NewRun::new("x", "agent").queue("q")).await.expect("create beside another build");
    let run = store.claim_next_run(&ClaimRequest::new("rt").queue("q")).await.expect("claim").expect("x");
    store.finalize_run("x", &Finish::new(RunStatus::Completed), run.claim_token.as_deref()).await.expect("finalize");
    for name in [ours.name.as_str(), "runledger_0123456789abcdef"] {
        let found: redis::Value =
            redis::cmd("FUNCTION").arg("LIST").arg("LIBRARYNAME").arg(name).query_async(&mut raw).await.expect("LIST");
        assert!(!matches!(found, redis::Value::Array(ref items) if items.is_empty()), "{name} is loaded");
    }
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
