use crate::common;

// The Redis data layout is a contract: operators and other-language clients
// read it with plain redis-cli. These tests read it the same way.

use std::collections::HashMap;
use std::time::Duration;

use runledger::store::Conn;
use runledger::*;
use serde_json::json;

async fn hgetall(raw: &mut Conn, key: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL").arg(key).query_async(raw).await.expect("HGETALL")
}

/// A stream index as (entry id, run id) pairs, oldest first.
async fn stream_index(raw: &mut Conn, key: &str) -> Vec<(String, String)> {
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg(key).arg("-").arg("+").query_async(raw).await.expect("XRANGE");
    entries
        .into_iter()
        .map(|(id, fields)| {
            let run = fields.into_iter().find(|(k, _)| k == "r").map(|(_, v)| v).expect("index entry has field r");
            (id, run)
        })
        .collect()
}

async fn key_type(raw: &mut Conn, key: &str) -> String {
    redis::cmd("TYPE").arg(key).query_async(raw).await.expect("TYPE")
}

async fn zrange(raw: &mut Conn, key: &str) -> Vec<(String, f64)> {
    redis::cmd("ZRANGE").arg(key).arg(0).arg(-1).arg("WITHSCORES").query_async(raw).await.expect("ZRANGE")
}

async fn pttl(raw: &mut Conn, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(raw).await.expect("PTTL")
}

async fn xrange(raw: &mut Conn, key: &str) -> Vec<(String, HashMap<String, String>)> {
    redis::cmd("XRANGE").arg(key).arg("-").arg("+").query_async(raw).await.expect("XRANGE")
}

async fn all_keys(raw: &mut Conn) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(raw).await.expect("KEYS");
    keys.sort();
    keys
}

async fn now_ms(store: &Store) -> i64 {
    store.server_time_ms().await.expect("server time")
}

/// An epoch-milliseconds field, between `lo` and `hi`.
#[track_caller]
fn ms_field(h: &HashMap<String, String>, field: &str, lo: i64, hi: i64) -> i64 {
    let text = h.get(field).unwrap_or_else(|| panic!("field {field} missing from {h:?}"));
    let v: i64 = text.parse().unwrap_or_else(|_| panic!("{field} is not an integer: {text}"));
    assert_eq!(text.len(), 13, "{field} is epoch ms: {text}");
    assert!(v >= lo && v <= hi, "{field} = {v} is not within [{lo}, {hi}]");
    v
}

#[track_caller]
fn no_null_fields(h: &HashMap<String, String>) {
    for (k, v) in h {
        assert!(!v.is_empty() && v != "null" && v != "None" && v != "nil", "field {k} is stored as {v:?}");
    }
}

/// The hash tag of a key: what Redis Cluster hashes.
fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

#[tokio::test]
async fn a_run_through_its_life_as_an_operator_sees_it() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let t0 = now_ms(&store).await;
    let deadline_s = t0 / 1000 + 3600;

    let mut reg = RegisterRuntime::new("rt-1");
    reg.heartbeat_deadline = Duration::from_secs(60);
    store.register_runtime(&reg).await.expect("register");
    let mut new = NewRun::new("r1", "agent").queue("q").priority(5).metadata(json!({"k": "v"})).conversation("c1");
    new.deadline_at = Some(deadline_s as f64);
    store.create_run(&new).await.expect("create r1");
    store.create_run(&NewRun::new("r2", "agent").queue("q").priority(10)).await.expect("create r2");
    store.create_run(&NewRun::new("r3", "agent").queue("q").priority(5)).await.expect("create r3");
    let t1 = now_ms(&store).await;

    // Global keys.
    let queues = hgetall(&mut raw, "rl:queues").await;
    assert_eq!(queues.into_iter().collect::<Vec<_>>(), [("q".to_string(), "0".to_string())], "q is queue number 0");
    let meta = hgetall(&mut raw, "rl:{q}:meta").await;
    assert_eq!(meta["number"], "0");
    let r3: String = redis::cmd("HGET").arg("rl:{q}:run:r3").arg("id").query_async(&mut raw).await.expect("HGET id");
    assert_eq!(meta["clock"], (r3.parse::<i64>().expect("id") / 4096).to_string(), "the clock of the newest id");
    for run in ["r1", "r2", "r3"] {
        let queue: String =
            redis::cmd("GET").arg(format!("rl:locator:{run}")).query_async(&mut raw).await.expect("GET");
        assert_eq!(queue, "q", "the locator of {run} names its queue");
    }

    // The queued run's hash.
    let rk = "rl:{q}:run:r1";
    assert_eq!(key_type(&mut raw, rk).await, "hash");
    let h = hgetall(&mut raw, rk).await;
    no_null_fields(&h);
    assert_eq!(h["id"].parse::<i64>().expect("id") % 4096, 0, "the low part of the id is q's number, 0");
    assert_eq!(h["runner_id"], "agent");
    assert_eq!(h["status"], "queued");
    assert_eq!(h["priority"], "5");
    assert_eq!(h["conversation_id"], "c1");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&h["metadata"]).expect("metadata is JSON"), json!({"k": "v"}));
    ms_field(&h, "created_at", t0, t1);
    assert_eq!(h["deadline_at"], (deadline_s * 1000).to_string(), "deadline in epoch ms");
    // Fields a new run does without: updated_at is created_at until the run
    // changes, dispatch_attempts is 0, run_id and queue_name are the key's
    // (the readers fill them in).
    for absent in [
        "run_id",
        "queue_name",
        "updated_at",
        "dispatch_attempts",
        "thread_id",
        "started_at",
        "finished_at",
        "claim_token",
        "claimed_by_runtime_id",
        "claim_lease_expires_at",
        "usage",
        "cost",
        "status_reason",
        "requested_runtime_id",
    ] {
        assert!(!h.contains_key(absent), "unset field {absent} is not stored");
    }
    assert_eq!(pttl(&mut raw, rk).await, -1, "a live run does not expire");

    // What is queued in q, in claim order.
    assert_eq!(key_type(&mut raw, "rl:{q}:queued").await, "zset");
    let queued: Vec<String> = zrange(&mut raw, "rl:{q}:queued").await.into_iter().map(|(m, _)| m).collect();
    assert_eq!(queued, ["r2", "r1", "r3"], "priority desc, then creation order");
    let deadlines = zrange(&mut raw, "rl:{q}:deadlines").await;
    assert_eq!(deadlines, [("r1".to_string(), (deadline_s * 1000) as f64)]);

    // Claim r2 and r1.
    let req = ClaimRequest::new("rt-1").queue("q").lease(Duration::from_secs(30));
    let c2 = store.claim_next_run(&req).await.expect("claim").expect("r2");
    let c1 = store.claim_next_run(&req).await.expect("claim").expect("r1");
    assert_eq!((c2.run_id.as_str(), c1.run_id.as_str()), ("r2", "r1"));
    let t2 = now_ms(&store).await;
    let h = hgetall(&mut raw, rk).await;
    no_null_fields(&h);
    assert_eq!(h["status"], "claimed");
    assert_eq!(h.get("claim_token"), c1.claim_token.as_ref(), "the token is stored in the hash");
    assert_eq!(h["claimed_by_runtime_id"], "rt-1");
    assert_eq!(h["dispatch_attempts"], "1");
    let lease = ms_field(&h, "claim_lease_expires_at", t1 + 30_000, t2 + 30_000);
    // The first claim's time is started_at; last_claimed_at comes with the second claim.
    let claimed_at = ms_field(&h, "started_at", t1, t2);
    assert_eq!(lease - claimed_at, 30_000);
    assert_eq!(ms_field(&h, "updated_at", t1, t2), claimed_at);
    assert!(!h.contains_key("last_claimed_at"), "{h:?}");
    let read = store.get_run("r1").await.expect("get r1");
    assert_eq!((read.last_claimed_at, read.started_at), (read.started_at, Some(claimed_at.div_euclid(1000))));
    // Who holds what, until when.
    assert_eq!(key_type(&mut raw, "rl:{q}:leases").await, "zset");
    let leases: HashMap<String, f64> = zrange(&mut raw, "rl:{q}:leases").await.into_iter().collect();
    assert_eq!(leases.len(), 2);
    assert_eq!(leases["r1"] as i64, lease, "the lease index score is the lease expiry in ms");
    let queued: Vec<String> = zrange(&mut raw, "rl:{q}:queued").await.into_iter().map(|(m, _)| m).collect();
    assert_eq!(queued, ["r3"]);

    // Events: a stream whose entry ids are the sequences.
    let token = c1.claim_token.clone().expect("token");
    store
        .append_events(
            "r1",
            Some(&token),
            &[
                NewEvent::new(1, "progress", json!({"p": 1})),
                NewEvent::new(2, "output", json!({"text": "hi"})).usage(json!({"tokens": 7})),
            ],
        )
        .await
        .expect("append");
    let sk = "rl:{q}:events:r1";
    assert_eq!(key_type(&mut raw, sk).await, "stream");
    let entries = xrange(&mut raw, sk).await;
    assert_eq!(entries.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["1-0", "2-0"]);
    let (_, e1) = &entries[0];
    assert_eq!(e1["type"], "progress");
    assert_eq!(e1["data"], r#"{"p":1}"#);
    assert_eq!(e1["source"], "runner");
    ms_field(e1, "created_at", t1, now_ms(&store).await);
    assert!(!e1.contains_key("usage") && !e1.contains_key("metadata") && !e1.contains_key("artifact_refs"), "{e1:?}");
    assert_eq!(entries[1].1["usage"], r#"{"tokens":7}"#);

    // Finish r1.
    store
        .finalize_run("r1", &Finish::new(RunStatus::Completed).usage(json!({"tokens": 9})), Some(&token))
        .await
        .expect("finalize");
    let t3 = now_ms(&store).await;
    let h = hgetall(&mut raw, rk).await;
    no_null_fields(&h);
    assert_eq!(h["status"], "completed");
    let finished_at = ms_field(&h, "finished_at", t2, t3);
    assert_eq!(h["usage"], r#"{"tokens":9}"#);
    for absent in ["claim_token", "claimed_by_runtime_id", "claim_lease_expires_at", "updated_at"] {
        assert!(!h.contains_key(absent), "{absent} is cleared when the run finishes: {h:?}");
    }
    let read = store.get_run("r1").await.expect("get r1");
    assert_eq!(read.updated_at, finished_at.div_euclid(1000), "a finished run's updated_at is its finished_at");
    assert_eq!(key_type(&mut raw, "rl:{q}:finished").await, "stream");
    let finished = stream_index(&mut raw, "rl:{q}:finished").await;
    assert_eq!(finished.len(), 1, "one finished run: {finished:?}");
    assert_eq!(finished[0].1, "r1");
    let entry_ms: i64 = finished[0].0.split('-').next().and_then(|ms| ms.parse().ok()).expect("entry id ms");
    assert!(
        (entry_ms - finished_at).abs() <= 1000,
        "finished entry id is the finish time: {entry_ms} vs {finished_at}"
    );
    let leases: Vec<String> = zrange(&mut raw, "rl:{q}:leases").await.into_iter().map(|(m, _)| m).collect();
    assert_eq!(leases, ["r2"]);
    assert!(zrange(&mut raw, "rl:{q}:deadlines").await.is_empty());
    // No key of a run expires on its own: a purge removes a finished run with
    // its list-index entries, which an expiry would leave behind. Its
    // locator has the TTL (retention + 1 day), in case no purge deletes it.
    for key in [rk, sk, "rl:{q}:run:r2"] {
        assert_eq!(pttl(&mut raw, key).await, -1, "{key} has no TTL");
    }
    let backstop = (7 + 1) * 86_400_000i64;
    let ttl = pttl(&mut raw, "rl:locator:r1").await;
    assert!(ttl > backstop - 60_000 && ttl <= backstop, "locator PTTL {ttl}");
    assert_eq!(pttl(&mut raw, "rl:locator:r2").await, -1, "a live run's locator does not expire");

    // Counters.
    let stats = hgetall(&mut raw, "rl:{q}:stats").await;
    assert_eq!(stats.get("created").map(String::as_str), Some("3"));
    assert_eq!(stats.get("completed").map(String::as_str), Some("1"));

    // Runtimes: an expiring hash and an index scored by heartbeat deadline.
    let rth = hgetall(&mut raw, "rl:runtime:rt-1").await;
    no_null_fields(&rth);
    assert_eq!(key_type(&mut raw, "rl:runtime:rt-1").await, "hash");
    assert_eq!(rth["runtime_id"], "rt-1");
    assert_eq!(rth["status"], "online");
    assert_eq!(rth["id"], "1");
    let hb = ms_field(&rth, "last_heartbeat_at", t0, t1);
    let hb_deadline = ms_field(&rth, "heartbeat_deadline_at", t0 + 60_000, t1 + 60_000);
    assert_eq!(hb_deadline - hb, 60_000);
    let ttl = pttl(&mut raw, "rl:runtime:rt-1").await;
    assert!(ttl > 0 && ttl <= 60_000 + 300_000, "runtime PTTL {ttl} is deadline + grace");
    let runtimes = zrange(&mut raw, "rl:runtimes").await;
    assert_eq!(runtimes, [("rt-1".to_string(), hb_deadline as f64)]);
    // Which runtimes are alive: ZRANGEBYSCORE rl:runtimes <now> +inf.
    let alive: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg("rl:runtimes")
        .arg(now_ms(&store).await)
        .arg("+inf")
        .query_async(&mut raw)
        .await
        .expect("ZRANGEBYSCORE");
    assert_eq!(alive, ["rt-1"]);

    // Every key is under the prefix; every queue key carries the queue's hash tag.
    let keys = all_keys(&mut raw).await;
    for key in &keys {
        assert!(key.starts_with("rl:"), "{key} is outside the prefix");
        if key.starts_with("rl:{") {
            assert_eq!(hash_tag(key), "q", "{key} is in the queue's slot");
        } else {
            assert!(
                ["rl:queues", "rl:partitions", "rl:runtimes", "rl:runtimes:seq"].contains(&key.as_str())
                    || key.starts_with("rl:runtime:")
                    || key.starts_with("rl:locator:"),
                "undocumented global key {key}"
            );
        }
    }
    for expected in [
        rk,
        sk,
        "rl:{q}:run:r2",
        "rl:{q}:run:r3",
        "rl:{q}:queued",
        "rl:{q}:leases",
        "rl:{q}:finished",
        "rl:{q}:stats",
        "rl:locator:r1",
        "rl:queues",
        "rl:runtime:rt-1",
        "rl:runtimes",
    ] {
        assert!(keys.iter().any(|k| k == expected), "{expected} missing from {keys:?}");
    }
    assert_layout(&keys, "q");
}

/// Every key of queue `q` is one of the documented kinds.
#[track_caller]
fn assert_layout(keys: &[String], q: &str) {
    let base = format!("rl:{{{q}}}:");
    for key in keys.iter().filter(|k| k.starts_with(&base)) {
        let rest = &key[base.len()..];
        let known = [
            "queued",
            "leases",
            "delayed",
            "deadlines",
            "finished",
            "stats",
            "wake",
            "runs",
            "pins",
            "hints",
            "runners",
            "meta",
            "running",
            "listeners",
            "docs",
        ]
        .contains(&rest)
            || ["run:", "events:", "doc:", "idx:", "runner:", "pinned:", "receipt:", "wake:runner:", "wake:pin:"]
                .iter()
                .any(|p| rest.starts_with(p));
        assert!(known, "undocumented queue key {key}");
    }
}

#[tokio::test]
async fn delayed_pinned_and_runner_lanes_are_visible() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let due_s = now_ms(&store).await / 1000 + 600;
    store
        .create_run(&NewRun::new("later", "agent").queue("jobs").not_before(due_s as f64))
        .await
        .expect("create delayed");
    store
        .create_run(&NewRun::new("mine", "agent").queue("jobs").requested_runtime("rt-9"))
        .await
        .expect("create pinned");
    store.create_run(&NewRun::new("any", "summarizer").queue("jobs")).await.expect("create");

    let delayed = zrange(&mut raw, "rl:{jobs}:delayed").await;
    assert_eq!(delayed, [("later".to_string(), (due_s * 1000) as f64)], "delayed runs scored by due time in ms");
    let h = hgetall(&mut raw, "rl:{jobs}:run:later").await;
    assert_eq!(h["not_before"], (due_s * 1000).to_string());
    assert_eq!(h["status"], "queued");
    let pinned: Vec<String> = zrange(&mut raw, "rl:{jobs}:pinned:rt-9").await.into_iter().map(|(m, _)| m).collect();
    assert_eq!(pinned, ["mine"], "a pinned run waits in its runtime's lane");
    let queued: Vec<String> = zrange(&mut raw, "rl:{jobs}:queued").await.into_iter().map(|(m, _)| m).collect();
    assert_eq!(queued, ["any"], "the shared queue holds only unpinned, due runs");
    let runners = hgetall(&mut raw, "rl:{jobs}:runners").await;
    assert_eq!(runners, HashMap::from([("summarizer".to_string(), "1".to_string())]), "queued runs per runner");
    assert_eq!(key_type(&mut raw, "rl:{jobs}:runner:summarizer").await, "none", "one runner: `queued` is its lane");
    assert_eq!(hgetall(&mut raw, "rl:{jobs}:meta").await["lanes"], "0");
    store.create_run(&NewRun::new("other", "agent").queue("jobs")).await.expect("create");
    let lane: Vec<String> = zrange(&mut raw, "rl:{jobs}:runner:summarizer").await.into_iter().map(|(m, _)| m).collect();
    assert_eq!(lane, ["any"], "a second runner: the first one's lane is a copy of `queued`");
    assert_eq!(hgetall(&mut raw, "rl:{jobs}:meta").await["lanes"], "1");
    let lane: Vec<String> = zrange(&mut raw, "rl:{jobs}:runner:agent").await.into_iter().map(|(m, _)| m).collect();
    assert_eq!(lane, ["other"]);
    assert_eq!(key_type(&mut raw, "rl:{jobs}:runs").await, "stream");
    let runs_index = stream_index(&mut raw, "rl:{jobs}:runs").await;
    let names: Vec<&str> = runs_index.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(names, ["later", "mine", "any", "other"], "all runs, in id order");
    for (entry, run) in &runs_index {
        let id: String = redis::cmd("HGET")
            .arg(format!("rl:{{jobs}}:run:{run}"))
            .arg("id")
            .query_async(&mut raw)
            .await
            .expect("HGET id");
        assert_eq!(entry, &format!("{id}-0"), "index entry id is <run id>-0");
    }
    let keys = all_keys(&mut raw).await;
    assert_layout(&keys, "jobs");
    for key in keys.iter().filter(|k| k.starts_with("rl:{")) {
        assert_eq!(hash_tag(key), "jobs", "{key}");
    }
    // Once claimed, the lanes are empty (Redis drops empty keys).
    let c = store
        .claim_next_run(&ClaimRequest::new("rt-9").queue("jobs").lease(Duration::from_secs(30)))
        .await
        .expect("claim")
        .expect("claimed");
    assert_eq!(c.run_id, "mine");
    let exists: i64 = redis::cmd("EXISTS").arg("rl:{jobs}:pinned:rt-9").query_async(&mut raw).await.expect("EXISTS");
    assert_eq!(exists, 0);
}

#[tokio::test]
async fn a_custom_prefix_moves_every_key() {
    let redis = common::redis().await;
    let store = Store::connect_with(&redis.url, StoreConfig { prefix: "app".into(), ..Default::default() })
        .await
        .expect("connect with prefix");
    let mut raw = common::raw(&redis).await;
    store.register_runtime(&RegisterRuntime::new("rt")).await.expect("register");
    store.create_run(&NewRun::new("r1", "agent").queue("q")).await.expect("create");
    let c = store.claim_next_run(&ClaimRequest::new("rt").queue("q")).await.expect("claim").expect("claimed");
    store.append_event("r1", c.claim_token.as_deref(), &NewEvent::new(1, "x", json!({}))).await.expect("append");
    store.finalize_run("r1", &Finish::new(RunStatus::Completed), c.claim_token.as_deref()).await.expect("finalize");
    let keys = all_keys(&mut raw).await;
    assert!(!keys.is_empty());
    for key in &keys {
        assert!(key.starts_with("app:"), "{key} ignores the prefix");
    }
    assert!(keys.iter().any(|k| k == "app:{q}:run:r1"));
    assert!(keys.iter().any(|k| k == "app:{q}:events:r1"));
    assert!(keys.iter().any(|k| k == "app:runtime:rt"));
    // And a store with the default prefix sees none of it.
    let other = Store::connect(&redis.url).await.expect("connect default");
    let err = other.get_run("r1").await.expect_err("other prefix");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn the_reaper_purges_finished_runs_after_retention() {
    let (redis, store) =
        common::store_with(StoreConfig { retention: Duration::from_secs(60), ..Default::default() }).await;
    let mut raw = common::raw(&redis).await;
    let mut new = NewRun::new("old", "agent").queue("q").conversation("c1");
    new.thread_id = Some("t1".into());
    store.create_run(&new).await.expect("create");
    store.append_event("old", None, &NewEvent::new(1, "x", json!({}))).await.expect("append");
    store.finalize_run("old", &Finish::new(RunStatus::Completed), None).await.expect("finalize");
    store.create_run(&NewRun::new("live", "agent").queue("q")).await.expect("create live");

    let report = store.reap(&[], None).await.expect("reap now");
    assert_eq!(report.purged, 0, "not yet past the retention");
    let later = now_ms(&store).await + 61_000;
    let report = store.reap(&[], Some(later)).await.expect("reap after retention");
    assert_eq!(report.purged, 1);
    let keys = all_keys(&mut raw).await;
    for gone in ["rl:{q}:run:old", "rl:{q}:events:old", "rl:{q}:idx:conversation:c1", "rl:{q}:idx:thread:t1"] {
        assert!(!keys.iter().any(|k| k == gone), "{gone} was purged: {keys:?}");
    }
    assert!(stream_index(&mut raw, "rl:{q}:finished").await.is_empty());
    let runs: Vec<String> = stream_index(&mut raw, "rl:{q}:runs").await.into_iter().map(|(_, r)| r).collect();
    assert_eq!(runs, ["live"]);
    assert!(keys.iter().any(|k| k == "rl:{q}:run:live"));
    let err = store.get_run("old").await.expect_err("purged");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
}

/// The wake list holds one token while claimable runs wait: a batch pushes
/// one, and each claim that leaves runs behind passes it on to the next idle
/// worker (with or without a runner filter, whether the claimed run was
/// pinned or not); the claim that finds nothing left clears it.
#[tokio::test]
async fn each_claim_passes_the_wake_token_on_while_runs_wait() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let runs = [
        NewRun::new("a", "agent").queue("w").priority(3),
        NewRun::new("b", "agent").queue("w").priority(2),
        NewRun::new("p", "agent").queue("w").priority(9).requested_runtime("rt"),
        NewRun::new("c", "other").queue("w").priority(1),
    ];
    store.create_runs(&runs).await.expect("create batch");
    async fn take_token(raw: &mut Conn) -> i64 {
        let popped: Option<String> = redis::cmd("LPOP").arg("rl:{w}:wake").query_async(raw).await.expect("LPOP");
        let left: i64 = redis::cmd("LLEN").arg("rl:{w}:wake").query_async(raw).await.expect("LLEN");
        assert_eq!(left, 0, "never more than one token");
        i64::from(popped.is_some())
    }
    assert_eq!(take_token(&mut raw).await, 1, "a batch leaves one token");
    // (claim filter, run it takes, token left for the next worker)
    let steps: [(&[&str], &str, i64); 5] = [
        (&[], "p", 1),        // pinned run first; a, b, c still wait
        (&["agent"], "a", 1), // through a runner lane; b and c wait
        (&[], "b", 1),        // c waits
        (&["agent"], "", 0),  // nothing of agent: no token is pushed
        (&[], "c", 0),        // the last run: nothing left to wake for
    ];
    for (filter, expected, token) in steps {
        let mut request = ClaimRequest::new("rt").queue("w");
        for r in filter {
            request = request.runner(*r);
        }
        let taken = match store.claim_from("w", &request).await.expect("claim") {
            ClaimOutcome::Claimed(run) => run.run_id,
            ClaimOutcome::Empty { .. } => String::new(),
        };
        assert_eq!(taken, expected, "claim with filter {filter:?}");
        assert_eq!(take_token(&mut raw).await, token, "token after claiming {expected:?} with {filter:?}");
    }
}

/// On one server a create is one round trip: the create script takes the run
/// id's locator itself (on a cluster the locator, in a slot of its own, is
/// taken first), and a finish gives it its TTL. A run id that another queue
/// holds is that queue's run.
#[tokio::test]
async fn a_create_and_a_finish_are_one_round_trip_each_on_one_server() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    // Queues are registered once per process (a round trip of its own).
    for queue in ["one", "two"] {
        store.create_run(&NewRun::new(format!("warm-{queue}"), "agent").queue(queue)).await.expect("warm up");
    }
    let port = redis.url.trim_end_matches('/').rsplit(':').next().expect("port").to_string();
    let recorder = common::monitor::Monitor::start(&format!("127.0.0.1:{port}")).await;
    let run = store.create_run(&NewRun::new("r1", "agent").queue("one")).await.expect("create");
    let sent: Vec<common::monitor::Command> = common::monitor::commands(&recorder.stop().await)
        .into_iter()
        .filter(|c| !c.is_inside_script() && !c.name_is("ECHO"))
        .collect();
    let create = &runledger::scripts::Scripts::new().create_run;
    assert_eq!(sent.len(), 1, "one command from the client: {:?}", sent.iter().map(|c| &c.args).collect::<Vec<_>>());
    assert!(sent[0].calls(create), "and it is the create: {:?}", sent[0].args);
    let locator = runledger::keys::GlobalKeys { prefix: store.config().prefix.clone() }.locator("r1");
    assert!(sent[0].script_parts().is_some_and(|(_, keys, _)| keys.contains(&locator)), "{:?}", sent[0].args);
    let held: String = redis::cmd("GET").arg(&locator).query_async(&mut raw).await.expect("GET locator");
    assert_eq!((held.as_str(), run.queue_name.as_str()), ("one", "one"));
    let ttl: i64 = redis::cmd("PTTL").arg(&locator).query_async(&mut raw).await.expect("PTTL");
    assert_eq!(ttl, -1, "a live run's locator has no TTL");

    // A finish is one call too: it gives the locator the run's TTL itself.
    let claimed = store.claim_next_run(&ClaimRequest::new("rt").queue("one")).await.expect("claim").expect("a run");
    let recorder = common::monitor::Monitor::start(&format!("127.0.0.1:{port}")).await;
    let finish = Finish::new(RunStatus::Completed);
    store.finalize_run(&claimed.run_id, &finish, claimed.claim_token.as_deref()).await.expect("finalize");
    let sent: Vec<common::monitor::Command> = common::monitor::commands(&recorder.stop().await)
        .into_iter()
        .filter(|c| !c.is_inside_script() && !c.name_is("ECHO"))
        .collect();
    assert_eq!(sent.len(), 1, "one command for a finish: {:?}", sent.iter().map(|c| &c.args).collect::<Vec<_>>());
    let finished_locator =
        runledger::keys::GlobalKeys { prefix: store.config().prefix.clone() }.locator(&claimed.run_id);
    let ttl: i64 = redis::cmd("PTTL").arg(&finished_locator).query_async(&mut raw).await.expect("PTTL");
    assert!(
        ttl > store.config().retention.as_millis() as i64,
        "a finished run's locator lives as long as the run: {ttl}"
    );

    // The same id in another queue: the run of the queue that holds it, nothing written in the other.
    let before = common::keyspace(&mut raw).await;
    let again = store.create_run(&NewRun::new("r1", "agent").queue("two")).await.expect("create elsewhere");
    assert_eq!((again.queue_name.as_str(), again.id), ("one", run.id));
    assert_eq!(common::keyspace(&mut raw).await, before, "the other queue wrote nothing");
}

/// A run an earlier build wrote, its documents inline in the hash, is read,
/// merged and finished as one of this build's: the finish moves its long
/// metadata out to the queue's docs hash (an upgrade in place), and a purge
/// leaves no key or docs field of it behind.
#[tokio::test]
async fn a_run_with_inline_documents_is_upgraded_in_place() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let keys = store.queue_keys("old");
    let metadata = json!({ "user": "ada", "text": "x".repeat(200) });
    store.create_run(&NewRun::new("r", "agent").queue("old")).await.expect("create");
    let inline = serde_json::to_string(&metadata).expect("json");
    // An earlier build also stored run_id and queue_name, which the key names.
    let _: () = redis::cmd("HSET")
        .arg(keys.run("r"))
        .arg("metadata")
        .arg(&inline)
        .arg("run_id")
        .arg("r")
        .arg("queue_name")
        .arg("old")
        .query_async(&mut raw)
        .await
        .expect("HSET");
    assert_eq!(key_type(&mut raw, &keys.doc("metadata", "r")).await, "none", "as an earlier build left it");
    let listed = store.list_runs(&RunFilter { limit: 10, ..Default::default() }).await.expect("list");
    assert_eq!(listed.items.len(), 1, "{listed:?}");
    assert_eq!((listed.items[0].run_id.as_str(), listed.items[0].queue_name.as_str()), ("r", "old"));

    let claimed = store.claim_next_run(&ClaimRequest::new("rt").queue("old")).await.expect("claim").expect("r");
    assert_eq!(claimed.metadata, metadata, "inline metadata reads as it is");
    assert_eq!(store.get_run("r").await.expect("get").metadata, metadata);
    let finish = Finish::new(RunStatus::Completed).metadata(json!({ "done": 1 }));
    store
        .finalize_run("r", &finish, claimed.claim_token.as_deref())
        .await
        .expect("finalize merges into inline metadata");
    let stored = hgetall(&mut raw, &keys.run("r")).await;
    assert_eq!(stored["metadata"], runledger::keys::DOCS_MARK, "the finish moved the long metadata out");
    let mut merged = metadata.clone();
    merged["done"] = json!(1);
    assert_eq!(store.get_run("r").await.expect("get").metadata, merged);

    let later = now_ms(&store).await + store.config().retention.as_millis() as i64 + 86_400_000;
    let report = store.reap(&[], Some(later)).await.expect("reap");
    assert_eq!(report.purged, 1, "{report:?}");
    let left: Vec<String> = all_keys(&mut raw).await.into_iter().filter(|k| k.ends_with(":r")).collect();
    assert!(left.is_empty(), "the purge left {left:?}");
    assert_eq!(key_type(&mut raw, &keys.docs_hash()).await, "none", "the purge left the docs of r");
}

/// A run the previous build wrote, its long documents in keys of their own
/// (`@doc` in the hash), reads as it did through every reader, takes a
/// metadata merge and a finish, and its purge deletes those keys too.
#[tokio::test]
async fn a_run_with_documents_in_doc_keys_is_read_and_purged() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let keys = store.queue_keys("prev");
    let metadata = json!({ "user": "ada", "text": "x".repeat(200) });
    let authorization = json!({ "token": "t".repeat(100) });
    store.create_run(&NewRun::new("p", "agent").queue("prev")).await.expect("create");
    // As the previous build left it: the marks in the hash, the documents in doc keys.
    for (field, doc) in [("metadata", &metadata), ("authorization", &authorization)] {
        let text = serde_json::to_string(doc).expect("json");
        let _: () = redis::cmd("SET").arg(keys.doc(field, "p")).arg(&text).query_async(&mut raw).await.expect("SET");
        let _: () = redis::cmd("HSET")
            .arg(keys.run("p"))
            .arg(field)
            .arg(runledger::keys::DOC_MARK)
            .query_async(&mut raw)
            .await
            .expect("HSET");
    }
    assert_eq!(store.get_run("p").await.expect("get").metadata, metadata, "get_run reads the doc key");
    let listed = store.list_runs(&RunFilter { limit: 10, ..Default::default() }).await.expect("list");
    assert_eq!(listed.items[0].metadata, metadata, "list_runs reads the doc key");
    let claimed = store.claim_next_run(&ClaimRequest::new("rt").queue("prev")).await.expect("claim").expect("p");
    assert_eq!(claimed.metadata, metadata, "the claim reads the doc key");
    let finish = Finish::new(RunStatus::Completed).metadata(json!({ "done": 1 }));
    store.finalize_run("p", &finish, claimed.claim_token.as_deref()).await.expect("finalize merges");
    let mut merged = metadata.clone();
    merged["done"] = json!(1);
    assert_eq!(store.get_run("p").await.expect("get").metadata, merged, "merged into the doc key's document");
    assert_eq!(hgetall(&mut raw, &keys.run("p")).await["metadata"], runledger::keys::DOCS_MARK, "rewritten here");

    let later = now_ms(&store).await + store.config().retention.as_millis() as i64 + 86_400_000;
    let report = store.reap(&[], Some(later)).await.expect("reap");
    assert_eq!(report.purged, 1, "{report:?}");
    let left: Vec<String> = all_keys(&mut raw).await.into_iter().filter(|k| k.ends_with(":p")).collect();
    assert!(left.is_empty(), "the purge left {left:?}");
    assert_eq!(key_type(&mut raw, &keys.docs_hash()).await, "none", "the purge left the docs of p");
}
