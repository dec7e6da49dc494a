use crate::common;

// The runtime registry: register, heartbeat, staleness, listing, expiry.

use std::time::Duration;

use runledger::store::Conn;
use runledger::*;
use serde_json::json;

async fn now_ms(store: &Store) -> i64 {
    store.server_time_ms().await.expect("server time")
}

async fn hget_i64(raw: &mut Conn, key: &str, field: &str) -> i64 {
    let v: Option<i64> = redis::cmd("HGET").arg(key).arg(field).query_async(raw).await.expect("HGET");
    v.unwrap_or_else(|| panic!("{key} has no {field}"))
}

async fn exists(raw: &mut Conn, key: &str) -> bool {
    let n: i64 = redis::cmd("EXISTS").arg(key).query_async(raw).await.expect("EXISTS");
    n == 1
}

fn runtime(id: &str, deadline: Duration) -> RegisterRuntime {
    RegisterRuntime { heartbeat_deadline: deadline, ..RegisterRuntime::new(id) }
}

async fn register_records_fields_and_a_heartbeat() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let before = now_ms(&store).await;
    let mut reg = RegisterRuntime::new("rt-1");
    reg.display_name = Some("Worker one".into());
    reg.endpoint = Some("http://10.0.0.1:8080".into());
    reg.version = Some("1.2.3".into());
    reg.capabilities = Some(json!({"gpu": true}));
    reg.labels = Some(json!({"zone": "eu"}));
    reg.metadata = Some(json!({"pid": 42}));
    let rt = store.register_runtime(&reg).await.expect("register");
    let after = now_ms(&store).await;
    assert_eq!(rt.id, 1);
    assert_eq!(rt.runtime_id, "rt-1");
    assert_eq!(rt.status, "online");
    assert_eq!(rt.display_name.as_deref(), Some("Worker one"));
    assert_eq!(rt.endpoint.as_deref(), Some("http://10.0.0.1:8080"));
    assert_eq!(rt.version.as_deref(), Some("1.2.3"));
    assert_eq!(rt.capabilities, json!({"gpu": true}));
    assert_eq!(rt.labels, json!({"zone": "eu"}));
    assert_eq!(rt.metadata, json!({"pid": 42}));
    let hb = rt.last_heartbeat_at.expect("last_heartbeat_at");
    assert!(hb >= before / 1000 && hb <= after / 1000, "last_heartbeat_at {hb} is the registration's time");
    let hb_ms = hami(&mut raw, "last_heartbeat_at").await;
    let deadline_ms = hami(&mut raw, "heartbeat_deadline_at").await;
    assert_eq!(deadline_ms - hb_ms, 60_000, "the default deadline is 60 s after the heartbeat");
    assert_eq!(rt.heartbeat_deadline_at, Some(deadline_ms / 1000));
    assert_eq!(rt.created_at, hb);
    assert_eq!(rt.updated_at, hb);
    assert_eq!(store.get_runtime("rt-1").await.expect("get"), rt);

    // JSON has the seed's keys.
    let json = serde_json::to_value(&rt).expect("serialize");
    for key in common::SEED_RUNTIME_KEYS {
        assert!(json.get(key).is_some(), "key {key} missing from {json}");
    }

    // A second runtime gets the next id; registering again keeps id and created_at and
    // replaces the descriptive fields (the seed clears those not given).
    let rt2 = store.register_runtime(&RegisterRuntime::new("rt-2")).await.expect("register rt-2");
    assert_eq!(rt2.id, 2);
    assert_eq!(rt2.capabilities, json!({}));
    assert_eq!(rt2.display_name, None);
    let mut again = RegisterRuntime::new("rt-1");
    again.status = "busy".into();
    again.labels = Some(json!({"zone": "us"}));
    let re = store.register_runtime(&again).await.expect("register again");
    assert_eq!(re.id, 1);
    assert_eq!(re.created_at, rt.created_at);
    assert_eq!(re.status, "busy");
    assert_eq!(re.display_name, None);
    assert_eq!(re.capabilities, json!({}));
    assert_eq!(re.labels, json!({"zone": "us"}));
    assert_eq!(re.metadata, json!({}));
    let fields: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg("rl:runtime:rt-1").query_async(&mut raw).await.expect("HGETALL");
    assert!(
        !fields.contains_key("display_name") && !fields.contains_key("capabilities"),
        "cleared fields are not stored: {fields:?}"
    );

    async fn hami(raw: &mut Conn, field: &str) -> i64 {
        hget_i64(raw, "rl:runtime:rt-1", field).await
    }
}

async fn heartbeat_refreshes_and_merges_metadata() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let mut reg = runtime("rt-1", Duration::from_secs(30));
    reg.metadata = Some(json!({"a": 1, "b": 1}));
    reg.capabilities = Some(json!({"gpu": false}));
    reg.labels = Some(json!({"zone": "eu"}));
    store.register_runtime(&reg).await.expect("register");
    let hb1 = hget_i64(&mut raw, "rl:runtime:rt-1", "last_heartbeat_at").await;
    tokio::time::sleep(Duration::from_millis(30)).await;

    let beat = Heartbeat {
        status: "busy".into(),
        heartbeat_deadline: Duration::from_secs(90),
        capabilities: None,
        labels: Some(json!({"zone": "us"})),
        metadata: Some(json!({"b": 2, "c": {"d": 3}})),
    };
    let rt = store.heartbeat_runtime("rt-1", &beat).await.expect("heartbeat");
    assert_eq!(rt.status, "busy");
    assert_eq!(rt.metadata, json!({"a": 1, "b": 2, "c": {"d": 3}}), "metadata is merged, top-level keys");
    assert_eq!(rt.capabilities, json!({"gpu": false}), "capabilities not given are kept");
    assert_eq!(rt.labels, json!({"zone": "us"}), "labels given are replaced");
    let hb2 = hget_i64(&mut raw, "rl:runtime:rt-1", "last_heartbeat_at").await;
    let deadline = hget_i64(&mut raw, "rl:runtime:rt-1", "heartbeat_deadline_at").await;
    assert!(hb2 > hb1, "the heartbeat time moved: {hb1} -> {hb2}");
    assert_eq!(deadline - hb2, 90_000);
    let score: f64 = redis::cmd("ZSCORE").arg("rl:runtimes").arg("rt-1").query_async(&mut raw).await.expect("ZSCORE");
    assert_eq!(score as i64, deadline, "the index follows the deadline");
    // A plain heartbeat keeps everything but refreshes the time and status.
    let plain = store.heartbeat_runtime("rt-1", &Heartbeat::default()).await.expect("plain heartbeat");
    assert_eq!(plain.status, "online");
    assert_eq!(plain.metadata, rt.metadata);
    assert_eq!(plain.labels, rt.labels);
    assert_eq!(plain.id, 1);
}

async fn heartbeat_of_an_unknown_runtime_is_not_found() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let err = store.heartbeat_runtime("ghost", &Heartbeat::default()).await.expect_err("unknown runtime");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let beat = Heartbeat { metadata: Some(json!({"x": 1})), ..Default::default() };
    let err = store.heartbeat_runtime("ghost", &beat).await.expect_err("unknown runtime with metadata");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let err = store.get_runtime("ghost").await.expect_err("get unknown");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let n: i64 = redis::cmd("DBSIZE").query_async(&mut raw).await.expect("DBSIZE");
    assert_eq!(n, 0, "a refused heartbeat creates nothing");
}

async fn runtime_reads_stale_after_its_deadline_and_list_filters_by_status() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    // Ids in registration order: rt-c 1, rt-a 2, rt-b 3.
    store.register_runtime(&runtime("rt-c", Duration::from_secs(60))).await.expect("register rt-c");
    store.register_runtime(&runtime("rt-a", Duration::from_secs(60))).await.expect("register rt-a");
    let mut busy = runtime("rt-b", Duration::from_secs(60));
    busy.status = "busy".into();
    store.register_runtime(&busy).await.expect("register rt-b");

    let all = store.list_runtimes(&[], 100).await.expect("list");
    assert_eq!(
        all.iter().map(|r| r.runtime_id.as_str()).collect::<Vec<_>>(),
        ["rt-c", "rt-a", "rt-b"],
        "ordered by id"
    );
    assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(store.get_runtime("rt-c").await.expect("get").status, "online");

    // A heartbeat with a short deadline, then the server's clock past it.
    let short = Heartbeat { heartbeat_deadline: Duration::from_millis(300), ..Heartbeat::default() };
    store.heartbeat_runtime("rt-c", &short).await.expect("heartbeat rt-c");
    let deadline_ms = hget_i64(&mut raw, "rl:runtime:rt-c", "heartbeat_deadline_at").await;
    common::until_server_passes(&store, deadline_ms).await;
    let c = store.get_runtime("rt-c").await.expect("get rt-c after its deadline");
    assert_eq!(c.status, "stale", "a runtime past its heartbeat deadline reads stale");
    let stored: String =
        redis::cmd("HGET").arg("rl:runtime:rt-c").arg("status").query_async(&mut raw).await.expect("HGET");
    assert_eq!(stored, "online", "reading does not write");

    let names = |v: Vec<Runtime>| v.into_iter().map(|r| r.runtime_id).collect::<Vec<_>>();
    assert_eq!(names(store.list_runtimes(&["stale".into()], 100).await.expect("stale")), ["rt-c"]);
    assert_eq!(names(store.list_runtimes(&["online".into()], 100).await.expect("online")), ["rt-a"]);
    assert_eq!(
        names(store.list_runtimes(&["busy".into(), "online".into()], 100).await.expect("busy")),
        ["rt-a", "rt-b"]
    );
    assert!(store.list_runtimes(&["offline".into()], 100).await.expect("offline").is_empty());
    assert_eq!(names(store.list_runtimes(&[], 2).await.expect("limit 2")), ["rt-c", "rt-a"]);
    assert_eq!(store.list_runtimes(&[], 0).await.expect("limit 0").len(), 1, "limit clamps to at least 1");

    // A heartbeat brings it back.
    let back = store
        .heartbeat_runtime("rt-c", &Heartbeat { heartbeat_deadline: Duration::from_secs(60), ..Default::default() })
        .await
        .expect("heartbeat rt-c");
    assert_eq!(back.status, "online");
    assert_eq!(names(store.list_runtimes(&["online".into()], 100).await.expect("online")), ["rt-c", "rt-a"]);
}

async fn mark_stale_runtimes_with_now_override() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    store.register_runtime(&runtime("rt-1", Duration::from_secs(30))).await.expect("register rt-1");
    store.register_runtime(&runtime("rt-2", Duration::from_secs(120))).await.expect("register rt-2");
    assert!(
        store.mark_stale_runtimes(None, "stale", None).await.expect("mark now").is_empty(),
        "nobody is overdue yet"
    );

    let now = now_ms(&store).await;
    let marked = store.mark_stale_runtimes(Some(now + 60_000), "stale", None).await.expect("mark in 60 s");
    assert_eq!(marked.iter().map(|r| r.runtime_id.as_str()).collect::<Vec<_>>(), ["rt-1"]);
    assert_eq!(marked[0].status, "stale");
    let stored: String =
        redis::cmd("HGET").arg("rl:runtime:rt-1").arg("status").query_async(&mut raw).await.expect("HGET");
    assert_eq!(stored, "stale", "mark_stale writes the status");
    assert_eq!(hget_i64(&mut raw, "rl:runtime:rt-1", "updated_at").await, now + 60_000, "updated_at is the given now");

    let far = now + 10 * 86_400_000;
    let marked = store.mark_stale_runtimes(Some(far), "stale", None).await.expect("mark far in the future");
    assert_eq!(marked.iter().map(|r| r.runtime_id.as_str()).collect::<Vec<_>>(), ["rt-2"], "rt-1 is already stale");
    assert!(store.mark_stale_runtimes(Some(far), "stale", None).await.expect("again").is_empty());
    // Another stale status marks them again.
    let lost = store.mark_stale_runtimes(Some(far), "lost", None).await.expect("mark lost");
    assert_eq!(lost.len(), 2);
    assert!(lost.iter().all(|r| r.status == "lost"));
    // By the real clock their deadlines have not passed, so reads show the stored status.
    let listed = store.list_runtimes(&["lost".into()], 100).await.expect("list lost");
    assert_eq!(listed.iter().map(|r| r.runtime_id.as_str()).collect::<Vec<_>>(), ["rt-1", "rt-2"]);
}

async fn mark_stale_runtimes_with_stale_after() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    store.register_runtime(&runtime("old", Duration::from_secs(3600))).await.expect("register old");
    tokio::time::sleep(Duration::from_millis(600)).await;
    store.register_runtime(&runtime("fresh", Duration::from_secs(3600))).await.expect("register fresh");
    let old_hb = hget_i64(&mut raw, "rl:runtime:old", "last_heartbeat_at").await;
    let fresh_hb = hget_i64(&mut raw, "rl:runtime:fresh", "last_heartbeat_at").await;
    assert!(fresh_hb - old_hb >= 500, "the heartbeats are apart: {old_hb} {fresh_hb}");
    // Both deadlines are an hour away; only the heartbeat age counts here.
    let at = fresh_hb + 100;
    let marked = store
        .mark_stale_runtimes(Some(at), "stale", Some(Duration::from_millis(300)))
        .await
        .expect("mark with stale_after");
    assert_eq!(marked.iter().map(|r| r.runtime_id.as_str()).collect::<Vec<_>>(), ["old"]);
    let none = store.mark_stale_runtimes(Some(at), "stale", None).await.expect("mark without stale_after");
    assert!(none.is_empty());
    // By the real clock, with a generous stale_after, nobody is stale.
    let none = store.mark_stale_runtimes(None, "idle", Some(Duration::from_secs(600))).await.expect("mark 10 min");
    assert!(none.is_empty());
}

async fn runtime_key_expires_after_deadline_plus_grace() {
    let (redis, store) =
        common::store_with(StoreConfig { runtime_grace: Duration::from_secs(4), ..Default::default() }).await;
    let mut raw = common::raw(&redis).await;
    store.register_runtime(&runtime("rt-1", Duration::from_secs(1))).await.expect("register");
    store.register_runtime(&runtime("keeper", Duration::from_secs(60))).await.expect("register keeper");
    let pttl: i64 = redis::cmd("PTTL").arg("rl:runtime:rt-1").query_async(&mut raw).await.expect("PTTL");
    assert!(pttl > 4000 && pttl <= 5000, "the runtime key expires after deadline + grace (PTTL {pttl})");
    let pttl: i64 = redis::cmd("PTTL").arg("rl:runtime:keeper").query_async(&mut raw).await.expect("PTTL");
    assert!(pttl > 63_000 && pttl <= 64_000, "deadline 60 s + grace 4 s (PTTL {pttl})");

    // Past the deadline (by the server's clock), within the grace (4 s of
    // slack): still there, read as stale.
    let deadline_ms = hget_i64(&mut raw, "rl:runtime:rt-1", "heartbeat_deadline_at").await;
    common::until_server_passes(&store, deadline_ms).await;
    assert!(exists(&mut raw, "rl:runtime:rt-1").await, "the key outlives its deadline by the grace");
    assert_eq!(store.get_runtime("rt-1").await.expect("get in grace").status, "stale");

    // Past the grace: gone (an expired key is gone to the first read after).
    common::until_server_passes(&store, deadline_ms + 4000).await;
    assert!(!exists(&mut raw, "rl:runtime:rt-1").await, "the key expired");
    let err = store.get_runtime("rt-1").await.expect_err("expired runtime");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let err = store.heartbeat_runtime("rt-1", &Heartbeat::default()).await.expect_err("heartbeat after expiry");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let listed = store.list_runtimes(&[], 100).await.expect("list");
    assert_eq!(listed.iter().map(|r| r.runtime_id.as_str()).collect::<Vec<_>>(), ["keeper"]);
    // The sweep drops the expired runtime from the index.
    store.mark_stale_runtimes(None, "stale", None).await.expect("mark stale");
    let score: Option<f64> =
        redis::cmd("ZSCORE").arg("rl:runtimes").arg("rt-1").query_async(&mut raw).await.expect("ZSCORE");
    assert_eq!(score, None, "the index forgets expired runtimes");
    // Registering again starts over with a new id.
    let again = store.register_runtime(&runtime("rt-1", Duration::from_secs(60))).await.expect("register again");
    assert_eq!(again.id, 3);
    assert_eq!(again.status, "online");
}

async fn reap_marks_stale_runtimes_and_deregister_removes_one() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    store.register_runtime(&runtime("rt-1", Duration::from_secs(30))).await.expect("register");
    store.register_runtime(&runtime("rt-2", Duration::from_secs(30))).await.expect("register");
    let now = now_ms(&store).await;
    let report = store.reap(&[], Some(now + 120_000)).await.expect("reap in 2 min");
    assert_eq!(report.stale_runtimes, 2, "{report:?}");
    store.deregister_runtime("rt-1").await.expect("deregister");
    assert!(!exists(&mut raw, "rl:runtime:rt-1").await);
    let score: Option<f64> =
        redis::cmd("ZSCORE").arg("rl:runtimes").arg("rt-1").query_async(&mut raw).await.expect("ZSCORE");
    assert_eq!(score, None);
    let err = store.get_runtime("rt-1").await.expect_err("deregistered");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    assert_eq!(store.list_runtimes(&[], 10).await.expect("list").len(), 1);
}

// Every case above, on a server of its own and on the test cluster.
/// LangBot's `list_runtimes(statuses, labels, limit)`: runtimes whose labels
/// hold every pair asked for, in id order, and a total of all that match.
async fn list_runtimes_filters_by_labels_with_a_total() {
    let (_redis, store) = common::store().await;
    for (id, labels) in [
        ("rt-a", json!({"zone": "eu", "gpu": true})),
        ("rt-b", json!({"zone": "eu"})),
        ("rt-c", json!({"zone": "us", "gpu": true})),
        ("rt-d", json!({})),
    ] {
        let mut reg = RegisterRuntime::new(id);
        reg.labels = Some(labels);
        store.register_runtime(&reg).await.expect("register");
    }
    let eu = json!({"zone": "eu"});
    let page = store.page_runtimes(&[], eu.as_object(), 100).await.expect("zone eu");
    assert_eq!(page.items.iter().map(|r| r.runtime_id.as_str()).collect::<Vec<_>>(), ["rt-a", "rt-b"]);
    assert_eq!(page.total, 2);
    let both = json!({"zone": "eu", "gpu": true});
    let page = store.page_runtimes(&[], both.as_object(), 100).await.expect("zone eu with a gpu");
    assert_eq!(page.items.iter().map(|r| r.runtime_id.as_str()).collect::<Vec<_>>(), ["rt-a"]);
    // The total counts every match, beyond the page.
    let gpu = json!({"gpu": true});
    let page = store.page_runtimes(&[], gpu.as_object(), 1).await.expect("a page of one");
    assert_eq!((page.items.len(), page.total), (1, 2));
    let all = store.page_runtimes(&[], None, 2).await.expect("all");
    assert_eq!((all.items.len(), all.total), (2, 4));
    let none = store.page_runtimes(&["stale".to_string()], None, 100).await.expect("stale");
    assert_eq!(none.total, 0);
}

backend_tests!(
    list_runtimes_filters_by_labels_with_a_total,
    register_records_fields_and_a_heartbeat,
    heartbeat_refreshes_and_merges_metadata,
    heartbeat_of_an_unknown_runtime_is_not_found,
    runtime_reads_stale_after_its_deadline_and_list_filters_by_status,
    mark_stale_runtimes_with_now_override,
    mark_stale_runtimes_with_stale_after,
    runtime_key_expires_after_deadline_plus_grace,
    reap_marks_stale_runtimes_and_deregister_removes_one,
);

/// `runledger runtimes --label KEY=VALUE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_runtimes_filter_by_label() {
    let (redis, store) = common::store().await;
    for (id, zone) in [("rt-eu", "eu"), ("rt-us", "us")] {
        let mut reg = RegisterRuntime::new(id);
        reg.labels = Some(json!({ "zone": zone, "slots": 4 }));
        store.register_runtime(&reg).await.expect("register");
    }
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_runledger"));
        cmd.arg("--redis").arg(&redis.url).args(args).env_remove("REDIS_URL");
        tokio::task::block_in_place(move || cmd.output().expect("run the CLI"))
    };
    let out = cli(&["--json", "runtimes", "--label", "zone=eu", "--label", "slots=4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let ids: Vec<&str> = listed.as_array().expect("a list").iter().filter_map(|r| r["runtime_id"].as_str()).collect();
    assert_eq!(ids, ["rt-eu"]);
    let out = cli(&["runtimes", "--label", "zone"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}
