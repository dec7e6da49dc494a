use crate::common;

// Bad input is a clear `Error::Invalid` and writes nothing: checked through the
// library, and through the Lua scripts called directly with bad ARGV.

use std::collections::BTreeMap;
use std::time::Duration;

use runledger::keys::QueueKeys;
use runledger::scripts::Scripts;
use runledger::store::Conn;
use runledger::*;
use serde_json::json;

const Q: &str = "q";

/// Every key with its type and full content: equal snapshots mean nothing was written.
async fn snapshot(raw: &mut Conn) -> BTreeMap<String, String> {
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(raw).await.expect("KEYS");
    keys.sort();
    let mut out = BTreeMap::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(raw).await.expect("TYPE");
        let content: redis::Value = match kind.as_str() {
            "hash" => redis::cmd("HGETALL").arg(&key).query_async(raw).await,
            "zset" => redis::cmd("ZRANGE").arg(&key).arg(0).arg(-1).arg("WITHSCORES").query_async(raw).await,
            "set" => redis::cmd("SORT").arg(&key).arg("ALPHA").query_async(raw).await,
            "stream" => redis::cmd("XRANGE").arg(&key).arg("-").arg("+").query_async(raw).await,
            "list" => redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).query_async(raw).await,
            _ => redis::cmd("GET").arg(&key).query_async(raw).await,
        }
        .expect("read key content");
        let mut text = format!("{kind}: {content:?}");
        if kind == "hash" {
            // HGETALL order is not stable across rewrites; sort the pairs.
            let map: BTreeMap<String, String> =
                redis::cmd("HGETALL").arg(&key).query_async(raw).await.expect("HGETALL");
            text = format!("hash: {map:?}");
        }
        out.insert(key, text);
    }
    out
}

async fn dbsize(raw: &mut Conn) -> i64 {
    redis::cmd("DBSIZE").query_async(raw).await.expect("DBSIZE")
}

#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T>, what: &str) {
    match result {
        Err(Error::Invalid(msg)) => assert!(!msg.is_empty(), "{what}: the error says what was wrong"),
        other => panic!("{what}: expected Error::Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_ids_are_refused_and_nothing_is_written() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    assert_eq!(dbsize(&mut raw).await, 0);
    let long = "x".repeat(201);
    let bad = ["", long.as_str(), "a{b", "a}b", "{q}", "a\nb", "tab\there", "bell\x07", "del\x7f", "c1\u{85}"];
    for id in bad {
        assert_invalid(store.create_run(&NewRun::new(id, "agent").queue(Q)).await, &format!("run_id {id:?}"));
        assert_invalid(store.create_run(&NewRun::new("r", id).queue(Q)).await, &format!("runner_id {id:?}"));
        assert_invalid(store.create_run(&NewRun::new("r", "agent").queue(id)).await, &format!("queue {id:?}"));
        if !id.is_empty() {
            assert_invalid(
                store.create_run(&NewRun::new("r", "agent").queue(Q).conversation(id)).await,
                "conversation",
            );
            assert_invalid(store.create_run(&NewRun::new("r", "agent").queue(Q).thread(id)).await, "thread");
            assert_invalid(
                store.create_run(&NewRun::new("r", "agent").queue(Q).requested_runtime(id)).await,
                "requested_runtime_id",
            );
        }
        assert_invalid(
            store.claim_next_run(&ClaimRequest::new(id).queue(Q)).await,
            &format!("claim runtime_id {id:?}"),
        );
        assert_invalid(
            store.claim_next_run(&ClaimRequest::new("rt").queue(Q).runner(id)).await,
            &format!("claim runner {id:?}"),
        );
        assert_invalid(store.register_runtime(&RegisterRuntime::new(id)).await, &format!("runtime {id:?}"));
        assert_invalid(store.get_run(id).await, &format!("get_run {id:?}"));
    }
    assert_eq!(dbsize(&mut raw).await, 0, "no rejected call wrote a key");
    // The limits are inclusive: 200 bytes is fine.
    let max = "y".repeat(200);
    let run = store.create_run(&NewRun::new(max.clone(), max.clone()).queue(Q)).await.expect("200-byte ids");
    assert_eq!(run.run_id.len(), 200);
}

#[tokio::test]
async fn priority_out_of_range_is_refused() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    for p in [1001, -1001, i64::MAX, i64::MIN] {
        assert_invalid(
            store.create_run(&NewRun::new("r", "agent").queue(Q).priority(p)).await,
            &format!("priority {p}"),
        );
    }
    assert_eq!(dbsize(&mut raw).await, 0);
    for p in [1000, -1000] {
        let run = store
            .create_run(&NewRun::new(format!("r{p}"), "agent").queue(Q).priority(p))
            .await
            .unwrap_or_else(|e| panic!("priority {p} is allowed: {e}"));
        assert_eq!(run.priority, p);
    }
}

#[tokio::test]
async fn bad_leases_are_refused_and_the_run_stays_queued() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    // With no queue known yet the request is still checked.
    assert_invalid(store.claim_next_run(&ClaimRequest::new("rt").lease(Duration::ZERO)).await, "zero lease, no queues");
    store.create_run(&NewRun::new("r1", "agent").queue(Q)).await.expect("create");
    let before = snapshot(&mut raw).await;
    for lease in
        [Duration::ZERO, Duration::from_micros(999), Duration::from_secs(86_401), Duration::from_secs(u64::MAX / 4)]
    {
        assert_invalid(
            store.claim_next_run(&ClaimRequest::new("rt").queue(Q).lease(lease)).await,
            &format!("lease {lease:?}"),
        );
        assert_invalid(
            store.claim_next_run(&ClaimRequest::new("rt").lease(lease)).await,
            &format!("lease {lease:?}, any queue"),
        );
    }
    assert_eq!(snapshot(&mut raw).await, before, "no rejected claim wrote anything");
    let run = store.get_run("r1").await.expect("get");
    assert_eq!((run.status, run.dispatch_attempts), (RunStatus::Queued, 0));

    // Exactly one day is allowed.
    let c = store
        .claim_next_run(&ClaimRequest::new("rt").queue(Q).lease(Duration::from_secs(86_400)))
        .await
        .expect("one-day lease")
        .expect("claimed");
    let token = c.claim_token.clone().expect("token");
    let before = snapshot(&mut raw).await;
    for lease in [Duration::ZERO, Duration::from_secs(86_401)] {
        assert_invalid(store.renew_claim("r1", &token, lease).await, &format!("renew lease {lease:?}"));
    }
    assert_eq!(snapshot(&mut raw).await, before, "no rejected renew wrote anything");
}

#[tokio::test]
async fn metadata_must_be_an_object() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let not_objects = [json!([1, 2]), json!("text"), json!(3), json!(null), json!(true)];
    for value in &not_objects {
        assert_invalid(
            store.create_run(&NewRun::new("r", "agent").queue(Q).metadata(value.clone())).await,
            &format!("metadata {value}"),
        );
        let mut with_auth = NewRun::new("r", "agent").queue(Q);
        with_auth.authorization = Some(value.clone());
        assert_invalid(store.create_run(&with_auth).await, &format!("authorization {value}"));
        let mut rt = RegisterRuntime::new("rt");
        rt.capabilities = Some(value.clone());
        assert_invalid(store.register_runtime(&rt).await, &format!("capabilities {value}"));
    }
    assert_eq!(dbsize(&mut raw).await, 0);

    store.create_run(&NewRun::new("r1", "agent").queue(Q).metadata(json!({"a": 1}))).await.expect("create");
    let before = snapshot(&mut raw).await;
    for value in &not_objects {
        assert_invalid(
            store.finalize_run("r1", &Finish::new(RunStatus::Completed).metadata(value.clone()), None).await,
            &format!("finalize metadata {value}"),
        );
        assert_invalid(
            store.finalize_run("r1", &Finish::new(RunStatus::Completed).usage(value.clone()), None).await,
            &format!("finalize usage {value}"),
        );
        assert_invalid(
            store.append_event("r1", None, &NewEvent::new(1, "x", value.clone())).await,
            &format!("event data {value}"),
        );
        assert_invalid(store.append_audit_event("r1", "x", Some(value), None).await, &format!("audit data {value}"));
    }
    assert_eq!(snapshot(&mut raw).await, before, "nothing written by the rejected calls");
    assert_eq!(store.get_run("r1").await.expect("get").status, RunStatus::Queued);
}

#[tokio::test]
async fn json_over_the_size_limit_is_refused() {
    let (redis, store) = common::store_with(StoreConfig { max_json_bytes: 1000, ..Default::default() }).await;
    let mut raw = common::raw(&redis).await;
    // {"k":"..."} is 8 bytes plus the string.
    let fits = json!({"k": "x".repeat(992)});
    let over = json!({"k": "x".repeat(993)});
    assert_eq!(serde_json::to_string(&fits).expect("json").len(), 1000);
    assert_invalid(
        store.create_run(&NewRun::new("big", "agent").queue(Q).metadata(over.clone())).await,
        "metadata 1001 bytes",
    );
    assert_invalid(
        store.create_run(&NewRun::new("big", "agent").queue(Q).metadata(json!({"k": "x".repeat(100_000)}))).await,
        "metadata 100 kB",
    );
    assert_eq!(dbsize(&mut raw).await, 0, "an oversized create writes nothing");
    let run = store
        .create_run(&NewRun::new("fits", "agent").queue(Q).metadata(fits.clone()))
        .await
        .expect("exactly the limit");
    assert_eq!(run.metadata, fits);

    store.create_run(&NewRun::new("r1", "agent").queue(Q).metadata(json!({"a": 1}))).await.expect("create r1");
    let before = snapshot(&mut raw).await;
    assert_invalid(store.append_event("r1", None, &NewEvent::new(1, "x", over.clone())).await, "event data");
    assert_invalid(
        store.append_event("r1", None, &NewEvent::new(1, "x", json!({})).usage(over.clone())).await,
        "event usage",
    );
    assert_invalid(store.append_audit_event("r1", "x", Some(&over), None).await, "audit data");
    assert_invalid(store.finalize_run("r1", &Finish::new(RunStatus::Completed).cost(over.clone()), None).await, "cost");
    // The merged metadata counts: each half fits, the merge does not.
    let half = json!({"b": "y".repeat(600)});
    assert_invalid(
        store.finalize_run("fits", &Finish::new(RunStatus::Completed).metadata(half), None).await,
        "merged metadata over the limit",
    );
    let mut rt = RegisterRuntime::new("rt");
    rt.metadata = Some(over.clone());
    assert_invalid(store.register_runtime(&rt).await, "runtime metadata");
    assert_eq!(snapshot(&mut raw).await, before, "no oversized call wrote anything");
}

#[tokio::test]
async fn bad_status_strings_and_statuses_are_refused() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    for text in ["bogus", "", "Completed", "QUEUED", " queued", "done", "dead"] {
        let parsed = text.parse::<RunStatus>();
        // LangBot's hosts match the message's start (its ValueError text).
        assert!(
            matches!(&parsed, Err(Error::Invalid(m)) if m.starts_with("Unknown run status")),
            "status {text:?}: {parsed:?}"
        );
    }
    for s in RunStatus::ALL {
        assert_eq!(s.as_str().parse::<RunStatus>().expect("round trip"), s);
    }
    // Only a claim makes a claimed run; terminal statuses are taken at create (LangBot's).
    assert_invalid(
        store.create_run(&NewRun::new("r", "agent").queue(Q).status(RunStatus::Claimed)).await,
        "create with status claimed",
    );
    assert_eq!(dbsize(&mut raw).await, 0);

    store.create_run(&NewRun::new("r1", "agent").queue(Q)).await.expect("create");
    let c = store.claim_next_run(&ClaimRequest::new("rt").queue(Q)).await.expect("claim").expect("claimed");
    let token = c.claim_token.clone().expect("token");
    let before = snapshot(&mut raw).await;
    for status in [RunStatus::Queued, RunStatus::Running, RunStatus::Claimed] {
        assert_invalid(
            store.finalize_run("r1", &Finish::new(status), Some(&token)).await,
            &format!("finalize {status}"),
        );
    }
    for status in [RunStatus::Running, RunStatus::Claimed] {
        assert_invalid(
            store.release_claim("r1", &token, &Release { status, ..Default::default() }).await,
            &format!("release {status}"),
        );
        assert_invalid(
            store.release_expired_claims(&[], Some(i64::from(i32::MAX) * 1000), status, "x", 10).await,
            &format!("release_expired_claims {status}"),
        );
    }
    let mut rt = RegisterRuntime::new("rt");
    rt.status = String::new();
    assert_invalid(store.register_runtime(&rt).await, "empty runtime status");
    assert_invalid(store.mark_stale_runtimes(None, "", None).await, "empty stale status");
    assert_eq!(snapshot(&mut raw).await, before, "no rejected status wrote anything");
}

#[tokio::test]
async fn other_bad_arguments_are_refused() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    for t in [f64::NAN, f64::INFINITY, -1.0, 1e13] {
        assert_invalid(
            store.create_run(&NewRun::new("r", "agent").queue(Q).deadline_at(t)).await,
            &format!("deadline {t}"),
        );
        assert_invalid(
            store.create_run(&NewRun::new("r", "agent").queue(Q).not_before(t)).await,
            &format!("not_before {t}"),
        );
    }
    let mut rt = RegisterRuntime::new("rt");
    rt.heartbeat_deadline = Duration::ZERO;
    assert_invalid(store.register_runtime(&rt).await, "zero heartbeat deadline");
    rt.heartbeat_deadline = Duration::from_secs(60);
    rt.display_name = Some("n".repeat(5000));
    assert_invalid(store.register_runtime(&rt).await, "huge display name");
    assert_eq!(dbsize(&mut raw).await, 0);

    store.create_run(&NewRun::new("r1", "agent").queue(Q)).await.expect("create");
    let c = store.claim_next_run(&ClaimRequest::new("rt").queue(Q)).await.expect("claim").expect("claimed");
    let token = c.claim_token.clone().expect("token");
    let before = snapshot(&mut raw).await;
    let long_reason = "r".repeat(4097);
    assert_invalid(
        store.finalize_run("r1", &Finish::new(RunStatus::Failed).reason(long_reason.clone()), Some(&token)).await,
        "reason",
    );
    assert_invalid(
        store
            .release_claim("r1", &token, &Release { status_reason: Some(long_reason.clone()), ..Default::default() })
            .await,
        "release reason",
    );
    assert_invalid(store.request_cancel("r1", Some(&long_reason)).await, "cancel reason");
    assert_invalid(
        store.append_event("r1", Some(&token), &NewEvent::new(-1, "x", json!({}))).await,
        "negative sequence",
    );
    assert_invalid(store.append_event("r1", Some(&token), &NewEvent::new(1, "", json!({}))).await, "empty type");
    assert_invalid(
        store.append_event("r1", Some(&token), &NewEvent::new(1, "a{b", json!({}))).await,
        "type with brace",
    );
    assert_invalid(
        store.append_event("r1", Some(&token), &NewEvent::new(1, "x", json!({})).source("")).await,
        "empty source",
    );
    assert_invalid(
        store.list_runs(&RunFilter { conversation_id: Some("c{1}".into()), limit: 10, ..Default::default() }).await,
        "list with a bad conversation id",
    );
    assert_invalid(
        store.list_runs(&RunFilter { queues: vec!["".into()], limit: 10, ..Default::default() }).await,
        "list with an empty queue name",
    );
    assert_eq!(snapshot(&mut raw).await, before, "nothing written");
    // A store with an unusable prefix or JSON limit is refused up front.
    let err = Store::connect_with(&redis.url, StoreConfig { prefix: "a{b".into(), ..Default::default() }).await;
    assert!(matches!(err, Err(Error::Invalid(_))), "prefix with a brace");
    let err = Store::connect_with(&redis.url, StoreConfig { max_json_bytes: 0, ..Default::default() }).await;
    assert!(matches!(err, Err(Error::Invalid(_))), "zero JSON limit");
}

// ---- The scripts themselves, called with raw EVALSHA and bad ARGV ----

fn script_error(err: &redis::RedisError) -> String {
    format!("{} {}", err.code().unwrap_or("?"), err.detail().unwrap_or_default())
}

#[track_caller]
fn assert_script_invalid(result: redis::RedisResult<redis::Value>, what: &str) {
    match result {
        Err(e) => {
            let msg = script_error(&e);
            assert!(msg.starts_with("INVALID "), "{what}: expected an INVALID error, got {msg:?} ({e})");
        }
        Ok(v) => panic!("{what}: the script accepted it and returned {v:?}"),
    }
}

async fn eval(
    raw: &mut Conn,
    script: &redis::Script,
    keys: &[String],
    args: &[String],
) -> redis::RedisResult<redis::Value> {
    let mut inv = script.prepare_invoke();
    for k in keys {
        inv.key(k);
    }
    for a in args {
        inv.arg(a);
    }
    inv.invoke_async(raw).await
}

fn create_keys(qk: &QueueKeys, run_id: &str) -> Vec<String> {
    let mut keys: Vec<String> = qk.fixed().into();
    keys.push(qk.meta());
    keys.push(qk.run(run_id));
    keys
}

/// ARGV of a valid create_run call for one run (see lua/create_run.lua):
/// base, queue, JSON limit, queue number, registered flag, placement, then the run's 18 values.
fn create_args(qk: &QueueKeys, run_id: &str) -> Vec<String> {
    let mut args = vec![String::new(); 24]; // the 18th value, group_key, stays empty
    args[0] = qk.base.clone();
    args[1] = Q.into(); // queue name
    args[2] = "1000".into(); // max JSON bytes
    args[3] = "0".into(); // queue number
    args[4] = "1".into(); // just registered
    args[5] = "-".into(); // not a partition: the placement is not checked
    args[at(3)] = run_id.into();
    args[at(6)] = "agent".into(); // runner_id
    args[at(14)] = r#"{"a":1}"#.into(); // metadata
    args[at(15)] = "queued".into();
    args[at(16)] = "0".into(); // priority
    args[at(19)] = "0".into(); // max_attempts
    args
}

/// Where value `i` of the cases below sits: the run's values start after
/// the queue number, its flag and the placement.
fn at(i: usize) -> usize {
    if i < 3 { i } else { i + 3 }
}

#[tokio::test]
async fn create_run_script_rejects_bad_argv_before_writing() {
    let (redis, _store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let scripts = Scripts::new();
    let qk = QueueKeys::new("rl", Q);
    let keys = create_keys(&qk, "r1");
    // (ARGV index, value, what)
    let over_limit = format!(r#"{{"k":"{}"}}"#, "x".repeat(1000));
    let cases: &[(usize, &str, &str)] = &[
        (14, over_limit.as_str(), "metadata over the byte limit"),
        (16, "abc", "non-numeric priority"),
        (16, "1001", "priority above 1000"),
        (16, "-1001", "priority below -1000"),
        (16, "1.5", "fractional priority"),
        (16, "", "missing priority"),
        (14, "[1]", "metadata that is an array"),
        (14, "\"text\"", "metadata that is a string"),
        (13, "[]", "authorization that is an array"),
        (15, "claimed", "status claimed"),
        (15, "", "empty status"),
        (3, "", "empty run_id"),
        (3, "a{b", "run_id with a brace"),
        (3, "a\nb", "run_id with a newline"),
        (6, "", "empty runner_id"),
        (1, "", "empty queue name"),
        (7, "c}", "conversation_id with a brace"),
        (12, "soon", "non-numeric deadline"),
        (18, "-5", "negative not_before"),
        (19, "-1", "negative max_attempts"),
        (19, "x", "non-numeric max_attempts"),
        (2, "0", "zero JSON limit"),
    ];
    for (i, value, what) in cases {
        let mut args = create_args(&qk, "r1");
        args[at(*i)] = value.to_string();
        assert_script_invalid(eval(&mut raw, &scripts.create_run.script, &keys, &args).await, what);
        assert_eq!(dbsize(&mut raw).await, 0, "{what}: the script wrote before failing");
    }
    for (value, what) in
        [("x", "non-numeric queue number"), ("4096", "queue number out of range"), ("", "no queue number")]
    {
        let mut args = create_args(&qk, "r1");
        args[3] = value.to_string();
        assert_script_invalid(eval(&mut raw, &scripts.create_run.script, &keys, &args).await, what);
        assert_eq!(dbsize(&mut raw).await, 0, "{what}: the script wrote before failing");
    }
    let long_id = "x".repeat(201);
    let mut args = create_args(&qk, &long_id);
    args[at(3)] = long_id.clone();
    assert_script_invalid(
        eval(&mut raw, &scripts.create_run.script, &create_keys(&qk, &long_id), &args).await,
        "201-byte run_id",
    );
    assert_eq!(dbsize(&mut raw).await, 0);

    // A placement by a group setting the queue does not have (a partition
    // whose group_by changed since the client read it) is refused, unwritten.
    for placed in ["conversation_id", "group_key"] {
        let mut args = create_args(&qk, "r1");
        args[5] = placed.into();
        let err = eval(&mut raw, &scripts.create_run.script, &keys, &args).await.expect_err("misplaced");
        assert_eq!(err.code(), Some("MISPLACED"), "{err:?}");
        assert_eq!(dbsize(&mut raw).await, 0, "a misplaced create wrote something");
    }

    // The same call with good arguments goes through: the harness above is right.
    let ok = eval(&mut raw, &scripts.create_run.script, &keys, &create_args(&qk, "r1")).await.expect("a valid create");
    assert!(matches!(ok, redis::Value::Array(_)), "{ok:?}");
    assert!(dbsize(&mut raw).await > 0);
    let status: Option<String> =
        redis::cmd("HGET").arg("rl:{q}:run:r1").arg("status").query_async(&mut raw).await.expect("HGET");
    assert_eq!(status.as_deref(), Some("queued"));
}

#[tokio::test]
async fn other_scripts_reject_bad_argv_before_writing() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let scripts = Scripts::new();
    let qk = QueueKeys::new("rl", Q);
    store.create_run(&NewRun::new("r1", "agent").queue(Q)).await.expect("create r1");
    store.create_run(&NewRun::new("r2", "agent").queue(Q)).await.expect("create r2");
    let c = store.claim_next_run(&ClaimRequest::new("rt").queue(Q)).await.expect("claim").expect("claimed");
    assert_eq!(c.run_id, "r1");
    let token = c.claim_token.clone().expect("token");
    let before = snapshot(&mut raw).await;
    let fixed: Vec<String> = qk.fixed().into();
    let with_run = |rid: &str| {
        let mut k = fixed.clone();
        k.push(qk.run(rid));
        k
    };
    let with_events = |rid: &str| {
        let mut k = with_run(rid);
        k.push(qk.events(rid));
        k
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let base = qk.base.as_str();
    let tok = token.as_str();
    let good_token = "0123456789abcdef0123456789abcdef";

    // claim_next_run: lease, token, runtime, runner filter.
    for (args, what) in [
        (s(&[base, "rt", "0", good_token, "1000"]), "lease ms 0"),
        (s(&[base, "rt", "86400001", good_token, "1000"]), "lease over a day"),
        (s(&[base, "rt", "soon", good_token, "1000"]), "non-numeric lease"),
        (s(&[base, "rt", "1000", "short", "1000"]), "short token"),
        (s(&[base, "", "1000", good_token, "1000"]), "empty runtime"),
    ] {
        assert_script_invalid(
            eval(&mut raw, &scripts.claim_next_run.script, &fixed, &args).await,
            &format!("claim: {what}"),
        );
    }
    // A runner id with a brace, after four valid (empty) scope filters, so
    // that it is the runner id that is refused, and the error says so.
    let args = s(&[base, "rt", "1000", good_token, "1000", "", "", "", "", "a{b"]);
    let refused = eval(&mut raw, &scripts.claim_next_run.script, &fixed, &args).await;
    let msg = refused.as_ref().map_err(script_error).err().unwrap_or_default();
    assert_script_invalid(refused, "claim: runner id with a brace");
    assert!(msg.contains("runner_id"), "claim: the refusal names the runner id: {msg}");
    // renew_claim / release_claim
    assert_script_invalid(
        eval(&mut raw, &scripts.renew_claim.script, &with_run("r1"), &s(&[base, "r1", tok, "0", "1000"])).await,
        "renew: lease 0",
    );
    assert_script_invalid(
        eval(&mut raw, &scripts.renew_claim.script, &with_run("r1"), &s(&[base, "r1", "", "1000", "1000"])).await,
        "renew: empty token",
    );
    for (args, what) in [
        (s(&[base, "r1", tok, "running", "", "0", "1000"]), "status running"),
        (s(&[base, "r1", tok, "failed", "", "1000", "1000"]), "retry delay with a terminal status"),
        (s(&[base, "r1", tok, "queued", "", "-1", "1000"]), "negative retry delay"),
    ] {
        assert_script_invalid(
            eval(&mut raw, &scripts.release_claim.script, &with_run("r1"), &args).await,
            &format!("release: {what}"),
        );
    }
    // finalize_run
    for (args, what) in [
        (s(&[base, "r1", "running", "", "", "", "0", "", "", tok, "1000", "1000"]), "status running"),
        (s(&[base, "r1", "completed", "", "[1]", "", "0", "", "", tok, "1000", "1000"]), "usage array"),
        (s(&[base, "r1", "completed", "", "", "", "1", "", "[1]", tok, "1000", "1000"]), "metadata array"),
    ] {
        assert_script_invalid(
            eval(&mut raw, &scripts.finalize_run.script, &with_run("r1"), &args).await,
            &format!("finalize: {what}"),
        );
    }
    // append_events: bad data, bad sequence, bad shape; a good first event does not land either.
    for (args, what) in [
        (s(&[base, "r1", tok, "1000", "100000", "1", "t", "[1]", "", "runner", "", ""]), "data array"),
        (s(&[base, "r1", tok, "1000", "100000", "1", "t", "", "", "runner", "", ""]), "empty data"),
        (s(&[base, "r1", tok, "1000", "100000", "x", "t", "{}", "", "runner", "", ""]), "non-numeric sequence"),
        (s(&[base, "r1", tok, "1000", "100000", "0", "t", "{}", "", "runner", "", ""]), "sequence 0"),
        (s(&[base, "r1", tok, "1000", "100000", "1", "t", "{}", "", "runner", "", ""][..11]), "6 values instead of 7"),
        (
            s(&[
                base, "r1", tok, "1000", "100000", "1", "t", "{}", "", "runner", "", "", "2", "t", "{}", "", "runner",
                "{}", "",
            ]),
            "artifact_refs object in the 2nd event",
        ),
    ] {
        assert_script_invalid(
            eval(&mut raw, &scripts.append_events.script, &with_events("r1"), &args).await,
            &format!("append: {what}"),
        );
    }
    assert_script_invalid(
        eval(
            &mut raw,
            &scripts.append_audit_event.script,
            &with_events("r1"),
            &s(&[base, "r1", "t", "[1]", "", "1000"]),
        )
        .await,
        "audit: data array",
    );
    // request_cancel, release_expired_claims, reap, list_runs
    assert_script_invalid(
        eval(
            &mut raw,
            &scripts.request_cancel.script,
            &{
                let mut k = with_run("r2");
                k.push(qk.cancel_channel());
                k
            },
            &s(&[base, "r2", "", "soon"]),
        )
        .await,
        "cancel: non-numeric retention",
    );
    assert_script_invalid(
        eval(
            &mut raw,
            &scripts.release_expired_claims.script,
            &fixed,
            &s(&[base, "9999999999999", "claimed", "", "10", "1000"]),
        )
        .await,
        "release_expired: status claimed",
    );
    assert_script_invalid(
        eval(
            &mut raw,
            &scripts.release_expired_claims.script,
            &fixed,
            &s(&[base, "9999999999999", "queued", "", "0", "1000"]),
        )
        .await,
        "release_expired: limit 0",
    );
    assert_script_invalid(
        eval(&mut raw, &scripts.reap.script, &fixed, &s(&[base, "yesterday", "10", "1000"])).await,
        "reap: non-numeric now",
    );
    assert_script_invalid(
        eval(&mut raw, &scripts.list_runs.script, &[qk.runs_index()], &s(&[base, "", "0", "100", "", "", "", "", ""]))
            .await,
        "list: limit 0",
    );
    // Runtimes.
    let rt_keys = s(&["rl:runtime:rt9"]);
    for (args, what) in [
        (s(&["rt9", "online", "", "", "", "", "", "", "0", "1000", "1000", "7"]), "heartbeat deadline 0"),
        (s(&["rt9", "online", "", "", "", "[]", "", "", "1000", "1000", "1000", "7"]), "capabilities array"),
        (s(&["rt9", "", "", "", "", "", "", "", "1000", "1000", "1000", "7"]), "empty status"),
        (s(&["r{9}", "online", "", "", "", "", "", "", "1000", "1000", "1000", "7"]), "runtime id with braces"),
        (s(&["rt9", "online", "", "", "", "", "", "", "1000", "1000", "1000", "x"]), "runtime number not a number"),
    ] {
        assert_script_invalid(
            eval(&mut raw, &scripts.register_runtime.script, &rt_keys, &args).await,
            &format!("register: {what}"),
        );
    }
    assert_script_invalid(
        eval(&mut raw, &scripts.mark_stale_runtime.script, &s(&["rl:runtime:rt9"]), &s(&["x", "stale", ""])).await,
        "mark_stale: non-numeric now",
    );

    assert_eq!(snapshot(&mut raw).await, before, "no script wrote anything before rejecting its arguments");
    let run = store.get_run("r1").await.expect("get r1");
    assert_eq!((run.status, run.dispatch_attempts), (RunStatus::Claimed, 1));
    let r2 = store.get_run("r2").await.expect("get r2");
    assert_eq!(r2.status, RunStatus::Queued);
}
