//! Every script is safe to resend: when a reply is lost, the library sends
//! the very same call again (same arguments, same claim token or request id),
//! and the second call must give the first call's answer and change nothing
//! more. Each case sends a script twice by hand, as the library's resend
//! does, and checks the answer and the keyspace.
//!
//! Also the active-claim rule: a lease that expired by the server's clock can
//! be neither renewed, finished, released nor written to, even when nobody
//! has claimed the run again.

use crate::common;

use std::time::Duration;

use redis::Value;
use runledger::scripts::{Lua, Scripts};
use runledger::store::Conn;
use runledger::*;

const Q: &str = "q";
const LEASE_MS: &str = "30000";
const RETENTION_MS: &str = "604800000";

/// Sends a script exactly as given (EVAL), twice when asked by the caller.
async fn send(raw: &mut Conn, lua: &Lua, keys: &[String], args: &[String]) -> redis::RedisResult<Value> {
    redis::cmd("EVAL").arg(lua.code).arg(keys.len()).arg(keys).arg(args).query_async(raw).await
}

fn queue_keys(store: &Store) -> Vec<String> {
    store.queue_keys(Q).fixed().to_vec()
}

fn run_keys(store: &Store, run_id: &str) -> Vec<String> {
    let mut keys = queue_keys(store);
    keys.push(store.queue_keys(Q).run(run_id));
    keys
}

/// A claim call's arguments with a fixed token.
fn claim_args(store: &Store, token: &str) -> Vec<String> {
    let base = store.queue_keys(Q).base;
    // Then the four scope filters (none) of claim_next_run.lua.
    let mut args = vec![base, "rt".into(), LEASE_MS.into(), token.into(), RETENTION_MS.into()];
    args.extend(std::iter::repeat_n(String::new(), 4));
    args
}

/// The run id and token of a claim reply {1, HGETALL..., last}, or None for {0, ...}.
fn claimed(value: &Value) -> Option<(String, String)> {
    let Value::Array(parts) = value else { panic!("claim reply is not an array: {value:?}") };
    if parts.first() != Some(&Value::Int(1)) {
        return None;
    }
    let Value::Array(fields) = &parts[1] else { panic!("claim reply without fields: {value:?}") };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        other => panic!("field is not a string: {other:?}"),
    };
    let field = |name: &str| {
        fields.chunks(2).find(|pair| text(&pair[0]) == name).map(|pair| text(&pair[1])).expect("field in reply")
    };
    Some((field("run_id"), field("claim_token")))
}

async fn create(store: &Store, run_id: &str) {
    store.create_run(&NewRun::new(run_id, "agent").queue(Q)).await.unwrap_or_else(|e| panic!("create {run_id}: {e}"));
}

/// Creates run `a` and claims it: the claim request and its token.
async fn claim_the_only_run(store: &Store) -> (ClaimRequest, String) {
    create(store, "a").await;
    let request = ClaimRequest::new("rt").queue(Q).lease(Duration::from_secs(30));
    let held = store.claim_next_run(&request).await.expect("claim").expect("a run");
    (request, held.claim_token.expect("token"))
}

async fn status(store: &Store, run_id: &str) -> Run {
    store.get_run(run_id).await.unwrap_or_else(|e| panic!("get {run_id}: {e}"))
}

async fn claim_resent_hands_out_the_same_run() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, "a").await;
    create(&store, "b").await;
    let scripts = Scripts::new();
    let token = "0123456789abcdef0123456789abcdef";
    let first = send(&mut raw, &scripts.claim_next_run, &queue_keys(&store), &claim_args(&store, token))
        .await
        .expect("first claim");
    // The reply was "lost": the same call again.
    let again = send(&mut raw, &scripts.claim_next_run, &queue_keys(&store), &claim_args(&store, token))
        .await
        .expect("resent claim");
    let first = claimed(&first).expect("the first call claims a run");
    assert_eq!(claimed(&again), Some(first.clone()), "a resend must hand out the same run");
    assert_eq!(status(&store, &first.0).await.dispatch_attempts, 1, "claimed once");
    let other = if first.0 == "a" { "b" } else { "a" };
    assert_eq!(status(&store, other).await.status, RunStatus::Queued, "no second run is claimed by the resend");

    // Once the run is given back, a late resend holds nothing.
    store.release_claim(&first.0, &first.1, &Release::default()).await.expect("release");
    let late = send(&mut raw, &scripts.claim_next_run, &queue_keys(&store), &claim_args(&store, token))
        .await
        .expect("late resend");
    assert_eq!(claimed(&late), None, "a released claim is not handed out again");
}

async fn finish_and_claim_resent_hands_out_the_same_next_run() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    for id in ["a", "b", "c"] {
        create(&store, id).await;
    }
    let request = ClaimRequest::new("rt").queue(Q).lease(Duration::from_secs(30));
    let held = store.claim_next_run(&request).await.expect("claim").expect("a run");
    let token = held.claim_token.clone().expect("token");
    let next_token = "fedcba9876543210fedcba9876543210";
    let base = store.queue_keys(Q).base;
    let mut args: Vec<String> = vec![
        base.clone(),
        held.run_id.clone(),
        "completed".into(),
        String::new(),
        String::new(),
        String::new(),
        "0".into(),
        String::new(),
        String::new(),
        token.clone(),
        "1048576".into(),
        RETENTION_MS.into(),
        "1".into(),
    ];
    args.extend(claim_args(&store, next_token).into_iter().skip(1));
    let scripts = Scripts::new();
    let keys = run_keys(&store, &held.run_id);
    let first = send(&mut raw, &scripts.finalize_run, &keys, &args).await.expect("finish and claim");
    let again = send(&mut raw, &scripts.finalize_run, &keys, &args).await.expect("resent finish and claim");
    let next_of = |v: &Value| {
        let Value::Array(parts) = v else { panic!("finalize reply is not an array: {v:?}") };
        parts.get(2).and_then(claimed)
    };
    let next = next_of(&first).expect("the first call claims the next run");
    assert_eq!(next_of(&again), Some(next.clone()), "the resend hands out the run the first call claimed");
    assert_eq!(status(&store, &next.0).await.dispatch_attempts, 1);
    let queued = ["a", "b", "c"].iter().filter(|id| **id != held.run_id && **id != next.0).count();
    assert_eq!(queued, 1);
    for id in ["a", "b", "c"] {
        if id != held.run_id && id != next.0 {
            assert_eq!(status(&store, id).await.status, RunStatus::Queued, "the resend claims no third run");
        }
    }
}

async fn release_resent_is_not_a_stale_token() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let (_, token) = claim_the_only_run(&store).await;
    let args: Vec<String> = vec![
        store.queue_keys(Q).base,
        "a".into(),
        token,
        "queued".into(),
        "worker shut down".into(),
        "0".into(),
        RETENTION_MS.into(),
    ];
    let scripts = Scripts::new();
    let keys = run_keys(&store, "a");
    send(&mut raw, &scripts.release_claim, &keys, &args).await.expect("release");
    send(&mut raw, &scripts.release_claim, &keys, &args).await.expect("a resent release succeeds too");
    let run = status(&store, "a").await;
    assert_eq!(run.status, RunStatus::Queued);
    let stats = store.queue_stats(Q, 0).await.expect("stats");
    assert_eq!(stats.queued, 1, "queued once, not twice");
}

async fn audit_event_resent_is_written_once() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, "a").await;
    let mut keys = run_keys(&store, "a");
    keys.push(store.queue_keys(Q).events("a"));
    let args: Vec<String> = vec![
        store.queue_keys(Q).base,
        "a".into(),
        "note".into(),
        r#"{"by":"operator"}"#.into(),
        String::new(),
        "1048576".into(),
        "a1b2c3d4e5f60718293a4b5c6d7e8f90".into(),
        "100000".into(),
    ];
    let scripts = Scripts::new();
    let first = send(&mut raw, &scripts.append_audit_event, &keys, &args).await.expect("audit");
    let again = send(&mut raw, &scripts.append_audit_event, &keys, &args).await.expect("resent audit");
    assert_eq!(first, again, "the resend answers with the first event");
    let len: i64 = redis::cmd("XLEN").arg(store.queue_keys(Q).events("a")).query_async(&mut raw).await.expect("XLEN");
    assert_eq!(len, 1, "the audit event is written once");
}

/// Moves a held run's lease expiry into the past by hand, as if the lease
/// ran out while nobody claimed the run.
async fn expire_lease(raw: &mut Conn, store: &Store, run_id: &str) {
    let key = store.queue_keys(Q).run(run_id);
    let _: () =
        redis::cmd("HSET").arg(&key).arg("claim_lease_expires_at").arg("1").query_async(raw).await.expect("HSET");
    let leases = store.queue_keys(Q).fixed()[1].clone();
    let _: () = redis::cmd("ZADD").arg(&leases).arg("1").arg(run_id).query_async(raw).await.expect("ZADD");
    // The queue's hints cached the lease's real end, which this edit moved
    // into the past; deleting them is safe (the next claim probes again).
    let hints = store.queue_keys(Q).hints();
    let _: () = redis::cmd("DEL").arg(&hints).query_async(raw).await.expect("DEL hints");
}

async fn an_expired_lease_is_no_longer_an_active_claim() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let (request, token) = claim_the_only_run(&store).await;
    expire_lease(&mut raw, &store, "a").await;

    let lease = Duration::from_secs(30);
    let renew = store.renew_claim("a", &token, lease).await.expect_err("renew of an expired lease");
    assert!(matches!(renew, Error::StaleToken(_)), "{renew:?}");
    let event = NewEvent::new(1, "progress", serde_json::json!({}));
    let append = store.append_event("a", Some(&token), &event).await.expect_err("event under an expired lease");
    assert!(matches!(append, Error::StaleToken(_)), "{append:?}");
    let finish = store
        .finalize_run("a", &Finish::new(RunStatus::Completed), Some(&token))
        .await
        .expect_err("finish under an expired lease");
    assert!(matches!(finish, Error::StaleToken(_)), "{finish:?}");
    let release = store.release_claim("a", &token, &Release::default()).await.expect_err("release");
    assert!(matches!(release, Error::StaleToken(_)), "{release:?}");

    // Nothing was written by the refused calls, and the next claim takes the run back.
    let run = status(&store, "a").await;
    assert_eq!(run.status, RunStatus::Claimed);
    let again = store.claim_next_run(&request).await.expect("claim").expect("the expired run is claimable");
    assert_eq!(again.run_id, "a");
    assert_eq!(again.dispatch_attempts, 2);
    // Host calls (no token) are not fenced.
    store.append_audit_event("a", "note", None, None).await.expect("host audit");
}

backend_tests!(
    claim_resent_hands_out_the_same_run,
    finish_and_claim_resent_hands_out_the_same_next_run,
    release_resent_is_not_a_stale_token,
    audit_event_resent_is_written_once,
    an_expired_lease_is_no_longer_an_active_claim,
);
