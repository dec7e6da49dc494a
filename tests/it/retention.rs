//! Memory stays bounded with no reaper running, and retention keeps up.
//!
//! - Every finish purges up to two runs past the retention, so the finished
//!   backlog shrinks at least as fast as it grows: a backlog of 600 runs
//!   finished under a long retention is gone after 300 lifecycles under a
//!   short one, with no reaper, and the locators of purged runs go with them.
//! - Lifecycles in rounds with a zero retention and no reaper: after a
//!   warm-up round, no round leaves more keys, no key holds more entries or
//!   bytes, and `used_memory` does not grow.
//! - The reaper drains a backlog larger than one script's batch in one
//!   pass, in short scripts.
//! - A run holds at most `max_events_per_run` events: past it an append or
//!   an audit event is `Error::Limit` and writes nothing.
//!
//! Counts, not clocks: nothing here depends on how fast the machine is.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use runledger::store::Conn;
use runledger::*;
use serde_json::json;

const Q: &str = "ret";

fn short(retention: Duration) -> StoreConfig {
    StoreConfig { retention, ..Default::default() }
}

/// Creates `n` runs named `<tag>-<i>`, then claims, emits 3 events and
/// finalizes each (the host call, which waits for the locators to settle).
async fn lifecycles(store: &Store, tag: &str, n: usize) {
    let runs: Vec<NewRun> = (0..n)
        .map(|i| {
            let mut run =
                NewRun::new(format!("{tag}-{i}"), "agent").queue(Q).metadata(json!({ "pad": "x".repeat(150) }));
            run.conversation_id = Some(format!("conv-{}", i % 7));
            run
        })
        .collect();
    store.create_runs(&runs).await.expect("create_runs");
    let request = ClaimRequest::new("rt").queue(Q).lease(Duration::from_secs(60));
    for _ in 0..n {
        let run = store.claim_next_run(&request).await.expect("claim").expect("a queued run");
        let token = run.claim_token.clone().expect("token");
        let events: Vec<NewEvent> = (1..=3).map(|s| NewEvent::new(s, "progress", json!({ "step": s }))).collect();
        store.append_events(&run.run_id, Some(&token), &events).await.expect("append");
        store.finalize_run(&run.run_id, &Finish::new(RunStatus::Completed), Some(&token)).await.expect("finalize");
    }
}

/// Every key with its entry count and MEMORY USAGE.
async fn sizes(raw: &mut Conn) -> BTreeMap<String, (i64, i64)> {
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(raw).await.expect("KEYS");
    let mut out = BTreeMap::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(raw).await.expect("TYPE");
        let len_cmd = match kind.as_str() {
            "stream" => "XLEN",
            "zset" => "ZCARD",
            "hash" => "HLEN",
            "set" => "SCARD",
            "list" => "LLEN",
            "string" => "STRLEN",
            "none" => continue,
            other => panic!("unexpected type {other} of {key}"),
        };
        let len: i64 = redis::cmd(len_cmd).arg(&key).query_async(raw).await.expect("length");
        let bytes: Option<i64> =
            redis::cmd("MEMORY").arg("USAGE").arg(&key).arg("SAMPLES").arg(0).query_async(raw).await.expect("MEMORY");
        out.insert(key, (len, bytes.unwrap_or(0)));
    }
    out
}

async fn used_memory(raw: &mut Conn) -> i64 {
    let info: String = redis::cmd("INFO").arg("memory").query_async(raw).await.expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO memory")
}

fn count(sizes: &BTreeMap<String, (i64, i64)>, part: &str) -> usize {
    sizes.keys().filter(|k| k.contains(part)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finishes_drain_a_backlog_without_a_reaper() {
    let redis = common::redis().await;
    let keep = Store::connect_with(&redis.url, short(Duration::from_secs(7 * 86_400))).await.expect("connect");
    lifecycles(&keep, "old", 600).await;
    let mut raw = common::raw(&redis).await;
    let before = sizes(&mut raw).await;
    assert_eq!(count(&before, ":run:"), 600, "the backlog is there");

    // The same queue under a zero retention: each finish purges two.
    let drain = Store::connect_with(&redis.url, short(Duration::ZERO)).await.expect("connect");
    lifecycles(&drain, "new", 300).await;
    let after = sizes(&mut raw).await;
    // 300 finishes purged 600 runs: the whole backlog. The new runs, finished
    // last, may stay (each finish had its two purges taken by older runs).
    for family in [":run:old-", ":events:old-", "locator:old-"] {
        assert_eq!(count(&after, family), 0, "{family} keys left");
    }
    let finished = after.get(&format!("rl:{{{Q}}}:finished")).map_or(0, |s| s.0);
    assert!(finished <= 300, "finished entries left: {finished}");
    let runs_index = after.get(&format!("rl:{{{Q}}}:runs")).map_or(0, |s| s.0);
    assert!(runs_index <= 300, "runs index entries left: {runs_index}");
    let listed = drain.list_runs(&RunFilter { limit: 1000, ..Default::default() }).await.expect("list");
    assert!(listed.items.iter().all(|r| r.run_id.starts_with("new-")), "an old run is still listed");
    // Then, with no backlog left, the next finishes purge the new runs too.
    lifecycles(&drain, "next", 150).await;
    let last = sizes(&mut raw).await;
    assert_eq!(count(&last, ":run:new-"), 0, "the runs after the backlog are purged as well");
    assert!(count(&last, ":run:") <= 150, "{} run hashes left", count(&last, ":run:"));
    let err = drain.get_run("old-0").await.expect_err("purged");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stops_growing_without_a_reaper() {
    let (redis, store) = common::store_with(short(Duration::ZERO)).await;
    let mut raw = common::raw(&redis).await;
    lifecycles(&store, "warm", 300).await;
    let warm = sizes(&mut raw).await;
    let warm_memory = used_memory(&mut raw).await;
    let mut peak_memory = warm_memory;
    for round in 0..8 {
        lifecycles(&store, &format!("r{round}"), 300).await;
        let now = sizes(&mut raw).await;
        // The last run of a round may outlive its own finish (by a millisecond
        // of the clock), with its hash, events, locator and scope index: 4
        // keys (its metadata is a field of the docs hash), 5 for a run of an
        // earlier build with a doc key.
        assert!(
            now.len() <= warm.len() + 5,
            "round {round}: {} keys, {} after warm-up: {:?}",
            now.len(),
            warm.len(),
            now.keys()
        );
        for (key, (len, bytes)) in &now {
            // The run keys of the last finish may differ by name; the rest must be the warm-up's.
            let Some((warm_len, warm_bytes)) = warm.get(key) else {
                let one_run = [":run:", ":doc:", ":events:", "locator:", ":idx:"].iter().any(|f| key.contains(f));
                // The docs hash goes when its last field does, and comes back with the next long document.
                let last_docs = key.ends_with(":docs") && *len <= 1;
                assert!(one_run || last_docs, "round {round}: new key {key} ({len} entries)");
                continue;
            };
            // The indexes of runs (finished, runs, idx:*) may name that last run
            // too, and the docs hash may hold its metadata.
            let indexes_runs =
                key.ends_with(":finished") || key.ends_with(":runs") || key.contains(":idx:") || key.ends_with(":docs");
            let slack = if indexes_runs { 1 } else { 0 };
            assert!(*len <= warm_len + slack, "round {round}: {key} holds {len} entries, {warm_len} after warm-up");
            // A stream keeps a node of deleted entries until the node is empty: one node of slack.
            assert!(
                *bytes <= warm_bytes + 8192,
                "round {round}: {key} takes {bytes} bytes, {warm_bytes} after warm-up"
            );
        }
        peak_memory = peak_memory.max(used_memory(&mut raw).await);
    }
    let end_memory = used_memory(&mut raw).await;
    eprintln!("used_memory: warm-up {warm_memory}, peak {peak_memory}, end {end_memory} ({} keys)", warm.len());
    // 2,400 more lifecycles; the allocator and client buffers move a little, the data does not.
    assert!(end_memory <= warm_memory + 512 * 1024, "used_memory grew from {warm_memory} to {end_memory}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reap_drains_more_than_a_batch() {
    let (_redis, store) = common::store().await;
    lifecycles(&store, "b", 450).await;
    let now = store.server_time_ms().await.expect("time");
    // 450 runs past the retention, more than twice one script's batch.
    let later = now + 8 * 86_400 * 1000;
    let report = store.reap(&[Q.to_string()], Some(later)).await.expect("reap");
    assert_eq!(report.purged, 450, "{report:?}");
    const { assert!(runledger::store::REAP_BATCH < 450) };
    let listed = store.list_runs(&RunFilter { limit: 1000, ..Default::default() }).await.expect("list");
    assert!(listed.items.is_empty(), "{} runs still listed", listed.items.len());
}

async fn events_per_run_are_capped() {
    let (redis, store) = common::store_with(StoreConfig { max_events_per_run: 5, ..Default::default() }).await;
    let mut raw = common::raw(&redis).await;
    store.create_run(&NewRun::new("capped", "agent").queue(Q)).await.expect("create");
    let request = ClaimRequest::new("rt").queue(Q).lease(Duration::from_secs(60));
    let run = store.claim_next_run(&request).await.expect("claim").expect("run");
    let token = run.claim_token.expect("token");
    let event = |s: i64| NewEvent::new(s, "step", json!({ "s": s }));
    store.append_events("capped", Some(&token), &(1..=4).map(event).collect::<Vec<_>>()).await.expect("4 events");

    let before = common::keyspace(&mut raw).await;
    let err = store.append_events("capped", Some(&token), &[event(5), event(6)]).await.expect_err("past the cap");
    assert!(matches!(err, Error::Limit(_)), "{err:?}");
    assert!(err.to_string().contains("5 events per run"), "names the limit: {err}");
    assert_eq!(common::keyspace(&mut raw).await, before, "a refused batch wrote nothing");

    store.append_event("capped", Some(&token), &event(5)).await.expect("the 5th event");
    // At the cap a resend of a stored event is still an idempotent retry.
    store.append_event("capped", Some(&token), &event(5)).await.expect("a retry at the cap");
    let before = common::keyspace(&mut raw).await;
    let err = store.append_event("capped", Some(&token), &event(6)).await.expect_err("the 6th");
    assert!(matches!(err, Error::Limit(_)), "{err:?}");
    let err = store.append_audit_event("capped", "note", Some(&json!({})), None).await.expect_err("audit past the cap");
    assert!(matches!(err, Error::Limit(_)), "{err:?}");
    assert_eq!(common::keyspace(&mut raw).await, before, "refused appends wrote nothing");

    let bad = Store::connect_with(&redis.url, StoreConfig { max_events_per_run: 0, ..Default::default() }).await;
    assert!(matches!(bad, Err(Error::Invalid(_))), "a cap of 0 is refused at connect");
}

/// A finish that purges older runs drops their locators, which live in
/// other slots than the queue (and than each other) on a cluster: each goes
/// in a call of its own, never in one pipeline across slots (CROSSSLOT).
async fn purged_runs_lose_their_locators() {
    let redis = common::redis().await;
    let keep = Store::connect_with(&redis.url, short(Duration::from_secs(7 * 86_400))).await.expect("connect");
    lifecycles(&keep, "old", 6).await;
    let drain = Store::connect_with(&redis.url, short(Duration::ZERO)).await.expect("connect");
    // Each of these finishes purges two old runs.
    lifecycles(&drain, "new", 3).await;
    let mut raw = common::raw(&redis).await;
    for i in 0..6 {
        let locator = format!("rl:locator:old-{i}");
        let exists: i64 = redis::cmd("EXISTS").arg(&locator).query_async(&mut raw).await.expect("EXISTS");
        assert_eq!(exists, 0, "{locator} outlived its run");
        let err = drain.get_run(&format!("old-{i}")).await.expect_err("purged");
        assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    }
}

backend_tests!(events_per_run_are_capped, purged_runs_lose_their_locators);

/// A purged run's locator that outlived the purge (its delete was lost)
/// still names the queue, with the TTL of a finished run. A new run of the
/// same id created there takes it over without that TTL, so the live run
/// cannot lose its locator (and its id become free in another queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_run_takes_a_lingering_locator_without_its_ttl() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    lifecycles(&store, "again", 1).await;
    let later = store.server_time_ms().await.expect("time") + 8 * 86_400 * 1000;
    assert_eq!(store.reap(&[Q.to_string()], Some(later)).await.expect("reap").purged, 1);
    // The purge's locator delete, as if lost: the locator is back with a TTL.
    let _: () = redis::cmd("SET")
        .arg("rl:locator:again-0")
        .arg(Q)
        .arg("PX")
        .arg(600_000)
        .query_async(&mut raw)
        .await
        .expect("SET");

    let run = store.create_run(&NewRun::new("again-0", "agent").queue(Q)).await.expect("create again");
    assert_eq!(run.status, RunStatus::Queued, "a new run, not the purged one");
    let ttl: i64 = redis::cmd("PTTL").arg("rl:locator:again-0").query_async(&mut raw).await.expect("PTTL");
    assert_eq!(ttl, -1, "the live run's locator does not expire");
    let existing = store.create_run(&NewRun::new("again-0", "agent").queue("elsewhere")).await;
    assert_eq!(existing.expect("create elsewhere returns the existing run").queue_name, Q);
}
