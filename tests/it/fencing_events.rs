use crate::common;

// Fencing by claim token, and the event stream's rules (idempotent retry,
// conflicts, order, finished runs, batch atomicity).

use std::time::Duration;

use runledger::store::Conn;
use runledger::*;
use serde_json::json;

const Q: &str = "q";

async fn create(store: &Store, run_id: &str) -> Run {
    store.create_run(&NewRun::new(run_id, "agent").queue(Q)).await.unwrap_or_else(|e| panic!("create {run_id}: {e}"))
}

async fn claim(store: &Store, runtime: &str, lease: Duration) -> Run {
    store
        .claim_next_run(&ClaimRequest::new(runtime).queue(Q).lease(lease))
        .await
        .expect("claim_next_run")
        .unwrap_or_else(|| panic!("{runtime} found nothing to claim"))
}

fn token(run: &Run) -> String {
    run.claim_token.clone().expect("claim result carries the token")
}

async fn xlen(raw: &mut Conn, run_id: &str) -> i64 {
    redis::cmd("XLEN").arg(format!("rl:{{q}}:events:{run_id}")).query_async(raw).await.expect("XLEN")
}

async fn stream_ids(raw: &mut Conn, run_id: &str) -> Vec<String> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("rl:{{q}}:events:{run_id}"))
        .arg("-")
        .arg("+")
        .query_async(raw)
        .await
        .expect("XRANGE");
    entries.into_iter().map(|(id, _)| id).collect()
}

async fn hgetall(raw: &mut Conn, key: &str) -> std::collections::BTreeMap<String, String> {
    redis::cmd("HGETALL").arg(key).query_async(raw).await.expect("HGETALL")
}

fn ev(seq: i64, kind: &str, data: serde_json::Value) -> NewEvent {
    NewEvent::new(seq, kind, data)
}

/// rt-1 claims with a short lease, lets it expire, rt-2 claims: returns (old token, new claim).
async fn lost_claim(store: &Store, run_id: &str) -> (String, Run) {
    create(store, run_id).await;
    let first = claim(store, "rt-1", Duration::from_millis(300)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = claim(store, "rt-2", Duration::from_secs(60)).await;
    assert_eq!(second.run_id, run_id);
    assert_eq!(second.dispatch_attempts, 2);
    assert_ne!(token(&first), token(&second));
    (token(&first), second)
}

async fn stale_token_is_refused_for_every_worker_write() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let (stale, current) = lost_claim(&store, "r1").await;
    let before = hgetall(&mut raw, "rl:{q}:run:r1").await;

    let err = store.renew_claim("r1", &stale, Duration::from_secs(60)).await.expect_err("stale renew");
    assert!(matches!(err, Error::StaleToken(_)), "renew: {err:?}");
    let err = store.release_claim("r1", &stale, &Release::default()).await.expect_err("stale release");
    assert!(matches!(err, Error::StaleToken(_)), "release: {err:?}");
    let err = store
        .release_claim("r1", &stale, &Release { status: RunStatus::Failed, ..Default::default() })
        .await
        .expect_err("stale terminal release");
    assert!(matches!(err, Error::StaleToken(_)), "terminal release: {err:?}");
    let err =
        store.append_event("r1", Some(&stale), &ev(1, "progress", json!({"p": 1}))).await.expect_err("stale append");
    assert!(matches!(err, Error::StaleToken(_)), "append: {err:?}");
    let err = store
        .finalize_run("r1", &Finish::new(RunStatus::Completed).metadata(json!({"by": "stale"})), Some(&stale))
        .await
        .expect_err("stale finalize");
    assert!(matches!(err, Error::StaleToken(_)), "finalize: {err:?}");

    // Nothing was written by the refused calls.
    assert_eq!(hgetall(&mut raw, "rl:{q}:run:r1").await, before, "the run hash is untouched");
    assert_eq!(xlen(&mut raw, "r1").await, 0, "no event was written");
    let lease: Option<f64> =
        redis::cmd("ZSCORE").arg("rl:{q}:leases").arg("r1").query_async(&mut raw).await.expect("ZSCORE");
    assert_eq!(lease.map(|l| l as i64), current.claim_lease_expires_at_ms, "the new holder's lease is untouched");

    // The current holder is unaffected.
    let t2 = token(&current);
    store.renew_claim("r1", &t2, Duration::from_secs(60)).await.expect("current holder renews");
    store.append_event("r1", Some(&t2), &ev(1, "progress", json!({"p": 1}))).await.expect("current holder appends");
    let done =
        store.finalize_run("r1", &Finish::new(RunStatus::Completed), Some(&t2)).await.expect("current holder finishes");
    assert_eq!(done.status, RunStatus::Completed);

    // After the run finished, the stale token is still refused, whatever status it asks for:
    // its finish would otherwise be reported as done while its usage and metadata are dropped.
    for status in [RunStatus::Completed, RunStatus::Failed] {
        let err = store
            .finalize_run("r1", &Finish::new(status).usage(json!({"tokens": 1})), Some(&stale))
            .await
            .expect_err("stale finalize after the run finished");
        assert!(matches!(err, Error::StaleToken(_)), "{status}: {err:?}");
    }
    // The finisher retrying its own finalize is an idempotent no-op; another status a conflict.
    let retry = store.finalize_run("r1", &Finish::new(RunStatus::Completed), Some(&t2)).await.expect("finisher retry");
    assert_eq!(retry, done);
    let err = store.finalize_run("r1", &Finish::new(RunStatus::Failed), Some(&t2)).await.expect_err("other status");
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    // Worker writes other than finalize are over for every token.
    for t in [&stale, &t2] {
        let err = store.renew_claim("r1", t, Duration::from_secs(1)).await.expect_err("renew finished run");
        assert!(matches!(err, Error::StaleToken(_)), "{err:?}");
        let err = store.append_event("r1", Some(t), &ev(2, "late", json!({}))).await.expect_err("append finished run");
        assert!(matches!(err, Error::StaleToken(_)), "{err:?}");
    }
    let final_run = store.get_run("r1").await.expect("get");
    assert_eq!(final_run.status, RunStatus::Completed);
    assert_eq!(final_run.usage, None, "the stale finish left no usage behind");
    assert_eq!(xlen(&mut raw, "r1").await, 1);
}

async fn host_calls_without_token_work_on_a_claimed_run() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, "r1").await;
    let c = claim(&store, "rt-1", Duration::from_secs(60)).await;
    let e = store.append_event("r1", None, &ev(1, "note", json!({"from": "host"}))).await.expect("host append");
    assert_eq!(e.sequence, 1);
    let a = store.append_audit_event("r1", "audit", Some(&json!({"x": 1})), None).await.expect("host audit");
    assert_eq!(a.sequence, 2);
    // The holder continues after the host's events.
    store.append_event("r1", Some(&token(&c)), &ev(3, "progress", json!({}))).await.expect("holder append");
    let done = store
        .finalize_run("r1", &Finish::new(RunStatus::Cancelled).reason("host stop"), None)
        .await
        .expect("host finalize");
    assert_eq!(done.status, RunStatus::Cancelled);
    assert_eq!(stream_ids(&mut raw, "r1").await, ["1-0", "2-0", "3-0"]);
    // The holder's token no longer works.
    let err = store.renew_claim("r1", &token(&c), Duration::from_secs(60)).await.expect_err("renew after host finish");
    assert!(matches!(err, Error::StaleToken(_)), "{err:?}");
}

async fn bogus_token_is_stale_and_unknown_run_is_not_found() {
    let (_redis, store) = common::store().await;
    create(&store, "r1").await;
    claim(&store, "rt-1", Duration::from_secs(60)).await;
    let bogus = "0123456789abcdef0123456789abcdef";
    let err = store.renew_claim("r1", bogus, Duration::from_secs(60)).await.expect_err("bogus renew");
    assert!(matches!(err, Error::StaleToken(_)), "{err:?}");
    let err =
        store.finalize_run("r1", &Finish::new(RunStatus::Completed), Some(bogus)).await.expect_err("bogus finalize");
    assert!(matches!(err, Error::StaleToken(_)), "{err:?}");
    // A queued run has no holder: any token is stale.
    create(&store, "r2").await;
    let err = store.append_event("r2", Some(bogus), &ev(1, "x", json!({}))).await.expect_err("token on queued run");
    assert!(matches!(err, Error::StaleToken(_)), "{err:?}");

    let err = store.renew_claim("ghost", bogus, Duration::from_secs(60)).await.expect_err("renew unknown");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let err = store.release_claim("ghost", bogus, &Release::default()).await.expect_err("release unknown");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
}

async fn event_retry_with_same_content_is_idempotent() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, "r1").await;
    let c = claim(&store, "rt", Duration::from_secs(60)).await;
    let t = token(&c);
    let e1 = ev(1, "progress", json!({"p": 1})).usage(json!({"tokens": 3}));
    let e2 = ev(2, "output", json!({"text": "hi"})).metadata(json!({"k": "v"}));
    let first = store.append_events("r1", Some(&t), &[e1.clone(), e2.clone()]).await.expect("append 1,2");
    assert_eq!(first.iter().map(|e| e.sequence).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(xlen(&mut raw, "r1").await, 2);

    let again = store.append_event("r1", Some(&t), &e2).await.expect("retry of 2 is accepted");
    assert_eq!(again.sequence, 2);
    assert_eq!(again.created_at, first[1].created_at, "the retry reports the stored event");
    let both = store.append_events("r1", Some(&t), &[e1.clone(), e2.clone()]).await.expect("retry of the batch");
    assert_eq!(both.len(), 2);
    assert_eq!(xlen(&mut raw, "r1").await, 2, "retries add nothing");
    // Empty metadata and no metadata are the same content.
    let e3 = ev(3, "progress", json!({"p": 3}));
    store.append_event("r1", Some(&t), &e3).await.expect("append 3");
    store.append_event("r1", Some(&t), &e3.clone().metadata(json!({}))).await.expect("retry of 3 spelled with {}");
    assert_eq!(xlen(&mut raw, "r1").await, 3);
    // A retry arriving after the run finished is still recognised.
    store.finalize_run("r1", &Finish::new(RunStatus::Completed), Some(&t)).await.expect("finalize");
    store.append_event("r1", None, &e2).await.expect("retry after finish");
    assert_eq!(xlen(&mut raw, "r1").await, 3);

    let page = store.page_run_events("r1", None, None, 10, Direction::Forward).await.expect("page");
    assert_eq!(page.items.len(), 3);
    let stored = &page.items[0];
    assert_eq!(stored.event_type, "progress");
    assert_eq!(stored.data, json!({"p": 1}));
    assert_eq!(stored.usage, Some(json!({"tokens": 3})));
    assert_eq!(stored.source, "runner");
    assert_eq!(stored.artifact_refs, json!([]));
    assert_eq!(stored.metadata, json!({}));
    assert_eq!(page.items[1].metadata, json!({"k": "v"}));
    assert_eq!(page.items[1].usage, None);
}

async fn same_sequence_with_other_content_is_a_conflict() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, "r1").await;
    let t = token(&claim(&store, "rt", Duration::from_secs(60)).await);
    store.append_event("r1", Some(&t), &ev(1, "progress", json!({"p": 1}))).await.expect("append 1");
    let variants = [
        ev(1, "progress", json!({"p": 2})),
        ev(1, "output", json!({"p": 1})),
        ev(1, "progress", json!({"p": 1})).source("host"),
        ev(1, "progress", json!({"p": 1})).usage(json!({"t": 1})),
        ev(1, "progress", json!({"p": 1})).metadata(json!({"m": 1})),
    ];
    for variant in &variants {
        let err = store.append_event("r1", Some(&t), variant).await.expect_err("different content, same sequence");
        assert!(matches!(err, Error::Conflict(_)), "{variant:?}: {err:?}");
    }
    assert_eq!(xlen(&mut raw, "r1").await, 1);
    let page = store.page_run_events("r1", None, None, 10, Direction::Forward).await.expect("page");
    assert_eq!(page.items[0].data, json!({"p": 1}), "the stored event is kept");

    // A host audit event takes the next sequence; a runner event racing for it is not dropped silently.
    let audit = store.append_audit_event("r1", "audit", Some(&json!({"note": "host"})), None).await.expect("audit");
    assert_eq!(audit.sequence, 2);
    let err = store.append_event("r1", Some(&t), &ev(2, "progress", json!({"p": 2}))).await.expect_err("lost race");
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    store.append_event("r1", Some(&t), &ev(3, "progress", json!({"p": 2}))).await.expect("the runner moves on");
}

async fn new_sequence_below_the_last_is_out_of_order() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, "r1").await;
    let t = token(&claim(&store, "rt", Duration::from_secs(60)).await);
    store.append_event("r1", Some(&t), &ev(1, "a", json!({}))).await.expect("1");
    store.append_event("r1", Some(&t), &ev(3, "a", json!({}))).await.expect("3 (gaps are allowed)");
    let err = store.append_event("r1", Some(&t), &ev(2, "a", json!({}))).await.expect_err("2 after 3");
    assert!(matches!(err, Error::OutOfOrder(_)), "{err:?}");
    // Inside one batch the sequences must rise too.
    let err = store
        .append_events("r1", Some(&t), &[ev(5, "a", json!({})), ev(4, "a", json!({}))])
        .await
        .expect_err("5 then 4");
    assert!(matches!(err, Error::OutOfOrder(_)), "{err:?}");
    assert_eq!(stream_ids(&mut raw, "r1").await, ["1-0", "3-0"], "nothing of the refused batch was written");
    let err = store.append_event("r1", Some(&t), &ev(0, "a", json!({}))).await.expect_err("sequence 0");
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
}

async fn runner_events_on_a_finished_run_are_refused_but_audit_works() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, "r1").await;
    let t = token(&claim(&store, "rt", Duration::from_secs(60)).await);
    store.append_events("r1", Some(&t), &[ev(1, "a", json!({})), ev(2, "a", json!({}))]).await.expect("append 1,2");
    store.finalize_run("r1", &Finish::new(RunStatus::Completed), Some(&t)).await.expect("finalize");

    let err = store.append_event("r1", None, &ev(3, "late", json!({}))).await.expect_err("runner event after finish");
    assert!(matches!(err, Error::Finished(_)), "{err:?}");
    let err =
        store.append_event("r1", Some(&t), &ev(3, "late", json!({}))).await.expect_err("holder event after finish");
    assert!(matches!(err, Error::StaleToken(_)), "{err:?}");
    assert_eq!(xlen(&mut raw, "r1").await, 2);

    let audit = store
        .append_audit_event("r1", "review", Some(&json!({"ok": true})), Some(&json!({"by": "ops"})))
        .await
        .expect("audit on a finished run");
    assert_eq!(audit.sequence, 3, "audit takes last + 1");
    assert_eq!(audit.source, "host");
    let audit2 = store.append_audit_event("r1", "review", None, None).await.expect("second audit");
    assert_eq!(audit2.sequence, 4);
    assert_eq!(stream_ids(&mut raw, "r1").await, ["1-0", "2-0", "3-0", "4-0"]);
    let page = store.page_run_events("r1", Some(5), Some(2), 10, Direction::Forward).await.expect("page");
    assert_eq!(page.items.len(), 2);
    assert_eq!(page.items[0].source, "host");
    assert_eq!(page.items[0].data, json!({"ok": true}));
    assert_eq!(page.items[0].metadata, json!({"by": "ops"}));
    assert_eq!(page.items[1].data, json!({}));
    // No TTL: the events go with their run when it is purged (tests/it/retention.rs).
    let ttl: i64 = redis::cmd("PTTL").arg("rl:{q}:events:r1").query_async(&mut raw).await.expect("PTTL");
    assert_eq!(ttl, -1, "the events of a finished run stay until its purge");

    // Audit on a run without events starts at 1.
    create(&store, "r2").await;
    let first = store.append_audit_event("r2", "created", None, None).await.expect("audit on fresh run");
    assert_eq!(first.sequence, 1);
}

async fn events_on_an_unknown_run_are_not_found() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, "exists").await;
    let err = store.append_event("ghost", None, &ev(1, "a", json!({}))).await.expect_err("append unknown");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let err = store.append_audit_event("ghost", "a", None, None).await.expect_err("audit unknown");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let err = store.page_run_events("ghost", None, None, 10, Direction::Forward).await.expect_err("page unknown");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let exists: i64 = redis::cmd("EXISTS").arg("rl:{q}:events:ghost").query_async(&mut raw).await.expect("EXISTS");
    assert_eq!(exists, 0, "no stream was created for the unknown run");
    // The script refuses too, even when the client thinks the run exists (the hash was deleted).
    store.append_event("exists", None, &ev(1, "a", json!({}))).await.expect("append");
    let _: i64 = redis::cmd("DEL").arg("rl:{q}:run:exists").query_async(&mut raw).await.expect("DEL");
    let err = store.append_event("exists", None, &ev(2, "a", json!({}))).await.expect_err("append to deleted run");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let err = store.append_audit_event("exists", "a", None, None).await.expect_err("audit to deleted run");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    assert_eq!(xlen(&mut raw, "exists").await, 1);
}

async fn stream_entry_ids_are_the_sequences() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, "r1").await;
    let t = token(&claim(&store, "rt", Duration::from_secs(60)).await);
    let batch: Vec<_> = (1..=10).map(|s| ev(s, "step", json!({"s": s}))).collect();
    store.append_events("r1", Some(&t), &batch).await.expect("append 10");
    let ids = stream_ids(&mut raw, "r1").await;
    assert_eq!(ids, (1..=10).map(|s| format!("{s}-0")).collect::<Vec<_>>());
    // XRANGE key 5 7 shows events 5..7, as the brief promises operators.
    let some: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg("rl:{q}:events:r1").arg("5").arg("7").query_async(&mut raw).await.expect("XRANGE 5 7");
    assert_eq!(some.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["5-0", "6-0", "7-0"]);
    let fields: std::collections::HashMap<_, _> = some[0].1.iter().cloned().collect();
    assert_eq!(fields.get("type").map(String::as_str), Some("step"));
    assert_eq!(fields.get("data").map(String::as_str), Some(r#"{"s":5}"#));
    assert_eq!(fields.get("source").map(String::as_str), Some("runner"));
    assert!(fields.get("created_at").is_some_and(|c| c.len() == 13), "created_at in epoch ms: {fields:?}");
}

async fn a_batch_lands_whole_or_not_at_all() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, "r1").await;
    let t = token(&claim(&store, "rt", Duration::from_secs(60)).await);
    store
        .append_events("r1", Some(&t), &[ev(1, "a", json!({"n": 1})), ev(2, "a", json!({"n": 2}))])
        .await
        .expect("append 1,2");
    // Second event conflicts with the stored 1: the new 3 must not be written either.
    let err = store
        .append_events("r1", Some(&t), &[ev(3, "a", json!({"n": 3})), ev(1, "a", json!({"n": 999}))])
        .await
        .expect_err("batch with a conflicting second event");
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert_eq!(stream_ids(&mut raw, "r1").await, ["1-0", "2-0"], "nothing of the batch was written");
    // A batch whose second event is malformed is refused before anything is sent.
    let err = store
        .append_events("r1", Some(&t), &[ev(3, "a", json!({"n": 3})), ev(4, "a", json!([1, 2]))])
        .await
        .expect_err("batch with non-object data");
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert_eq!(xlen(&mut raw, "r1").await, 2);
    // A batch of retries and new events: the retries are recognised, the new ones appended.
    let out = store
        .append_events(
            "r1",
            Some(&t),
            &[ev(2, "a", json!({"n": 2})), ev(3, "a", json!({"n": 3})), ev(4, "a", json!({"n": 4}))],
        )
        .await
        .expect("retry + new");
    assert_eq!(out.iter().map(|e| e.sequence).collect::<Vec<_>>(), [2, 3, 4]);
    assert_eq!(stream_ids(&mut raw, "r1").await, ["1-0", "2-0", "3-0", "4-0"]);
    // An empty batch is a no-op.
    assert!(store.append_events("r1", Some(&t), &[]).await.expect("empty batch").is_empty());
}

// Every case above, on a server of its own and on the test cluster.
backend_tests!(
    stale_token_is_refused_for_every_worker_write,
    host_calls_without_token_work_on_a_claimed_run,
    bogus_token_is_stale_and_unknown_run_is_not_found,
    event_retry_with_same_content_is_idempotent,
    same_sequence_with_other_content_is_a_conflict,
    new_sequence_below_the_last_is_out_of_order,
    runner_events_on_a_finished_run_are_refused_but_audit_works,
    events_on_an_unknown_run_are_not_found,
    stream_entry_ids_are_the_sequences,
    a_batch_lands_whole_or_not_at_all,
);
