use crate::common;

// The seed store's operations, checked for the results the seed would give
// (and, where the brief asks for more, for the stronger behaviour).

use std::time::Duration;

use runledger::store::Conn;
use runledger::*;
use serde_json::{Value, json};

const Q: &str = "q";

fn claim_req(runtime: &str) -> ClaimRequest {
    ClaimRequest::new(runtime).queue(Q).lease(Duration::from_secs(60))
}

async fn claim(store: &Store, runtime: &str) -> Option<Run> {
    store.claim_next_run(&claim_req(runtime)).await.expect("claim_next_run should not fail")
}

async fn claim_lease(store: &Store, runtime: &str, lease: Duration) -> Option<Run> {
    store
        .claim_next_run(&ClaimRequest::new(runtime).queue(Q).lease(lease))
        .await
        .expect("claim_next_run should not fail")
}

async fn create(store: &Store, run: NewRun) -> Run {
    let id = run.run_id.clone();
    store.create_run(&run).await.unwrap_or_else(|e| panic!("create_run {id}: {e}"))
}

async fn now_ms(store: &Store) -> i64 {
    store.server_time_ms().await.expect("server time")
}

/// Run ids in the finished index (a stream, field `r`) of queue q.
/// The id clock of queue `q` (the high part of its newest id).
async fn clock(raw: &mut Conn) -> i64 {
    let clock: String = redis::cmd("HGET").arg("rl:{q}:meta").arg("clock").query_async(raw).await.expect("HGET clock");
    clock.parse().expect("a number")
}

async fn finished_ids(raw: &mut Conn) -> Vec<String> {
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg("rl:{q}:finished").arg("-").arg("+").query_async(raw).await.expect("XRANGE");
    entries.into_iter().flat_map(|(_, fields)| fields.into_iter().map(|(_, v)| v)).collect()
}

async fn zscore(raw: &mut Conn, key: &str, member: &str) -> Option<f64> {
    redis::cmd("ZSCORE").arg(key).arg(member).query_async(raw).await.expect("ZSCORE")
}

async fn zcard(raw: &mut Conn, key: &str) -> i64 {
    redis::cmd("ZCARD").arg(key).query_async(raw).await.expect("ZCARD")
}

async fn hget(raw: &mut Conn, key: &str, field: &str) -> Option<String> {
    redis::cmd("HGET").arg(key).arg(field).query_async(raw).await.expect("HGET")
}

fn token_of(run: &Run) -> String {
    run.claim_token.clone().expect("a claim result carries the claim token")
}

async fn create_is_idempotent_by_run_id() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let first = create(&store, NewRun::new("r1", "agent").queue(Q).priority(3).metadata(json!({"a": 1}))).await;
    assert_eq!(first.status, RunStatus::Queued);
    assert!(first.id > 0);
    assert_eq!(first.id % 4096, 0, "the low part of an id is the queue's number; the first queue is 0");
    assert_eq!(first.dispatch_attempts, 0);
    assert_eq!(first.metadata, json!({"a": 1}));

    // Same run_id again, even with other arguments: the stored run comes back unchanged.
    let second = create(&store, NewRun::new("r1", "other-agent").queue(Q).priority(9).metadata(json!({"b": 2}))).await;
    assert_eq!(second, first, "a second create returns the stored run as it is");
    assert_eq!(clock(&mut raw).await, first.id / 4096, "an idempotent create does not consume an id");
    assert_eq!(zcard(&mut raw, "rl:{q}:queued").await, 1, "the run is queued once");

    // The next new run gets the next id.
    let other = create(&store, NewRun::new("r2", "agent").queue(Q)).await;
    assert!(other.id > first.id, "ids grow with creation within a queue");
    assert_eq!(other.id % 4096, 0);
    // The pipelined batch create is idempotent too.
    let batch = store
        .create_runs(&[NewRun::new("r1", "x").queue(Q), NewRun::new("r3", "agent").queue(Q)])
        .await
        .expect("create_runs");
    assert_eq!(batch[0], first);
    assert!(batch[1].id > other.id);

    // A run given twice in one batch is created once, with the first values.
    let batch = store
        .create_runs(&[
            NewRun::new("r4", "agent").queue(Q).priority(1),
            NewRun::new("r5", "agent").queue(Q),
            NewRun::new("r4", "other").queue(Q).priority(7),
        ])
        .await
        .expect("create_runs with a repeat");
    let (id4, id5) = (batch[0].id, batch[1].id);
    assert!(id4 > first.id && id5 > id4, "ids follow the batch order");
    assert_eq!(batch[2], store.get_run("r4").await.expect("get r4"), "the repeat returns the stored run");
    assert_eq!((batch[2].id, batch[2].priority, batch[2].runner_id.as_str()), (id4, 1, "agent"));
    assert_eq!(clock(&mut raw).await, id5 / 4096, "a repeat consumes no id");
    assert_eq!(zcard(&mut raw, "rl:{q}:queued").await, 5, "each run is queued once");
    let runs_index: i64 = redis::cmd("XLEN").arg("rl:{q}:runs").query_async(&mut raw).await.expect("XLEN");
    assert_eq!(runs_index, 5, "and listed once");
}

async fn create_running_is_started_and_not_claimable() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let before = now_ms(&store).await / 1000;
    let run = create(&store, NewRun::new("direct", "agent").queue(Q).status(RunStatus::Running)).await;
    let after = now_ms(&store).await / 1000;
    assert_eq!(run.status, RunStatus::Running);
    let started = run.started_at.expect("a running run has started_at");
    assert!(started >= before && started <= after, "started_at {started} is the server's now (in {before}..={after})");
    assert_eq!(run.started_at, Some(run.created_at));
    assert_eq!(zcard(&mut raw, "rl:{q}:queued").await, 0);
    assert!(claim(&store, "rt1").await.is_none(), "a running run is never handed out");

    // A queued run has no started_at until it is claimed.
    let queued = create(&store, NewRun::new("queued", "agent").queue(Q)).await;
    assert_eq!(queued.started_at, None);
    let claimed = claim(&store, "rt1").await.expect("the queued run is claimable");
    assert_eq!(claimed.run_id, "queued");
    assert!(claimed.started_at.is_some(), "claim sets started_at");

    // The running run is finished by the host, without a token.
    let done = store.finalize_run("direct", &Finish::new(RunStatus::Completed), None).await.expect("finalize running");
    assert_eq!(done.status, RunStatus::Completed);
    assert!(done.finished_at.is_some());
}

async fn claim_order_is_priority_desc_then_creation_order() {
    let (_redis, store) = common::store().await;
    let specs = [("a", 0), ("b", 5), ("c", 0), ("d", 10), ("e", 5), ("f", -3), ("g", 1000), ("h", -1000), ("i", 10)];
    for (id, priority) in specs {
        create(&store, NewRun::new(id, "agent").queue(Q).priority(priority)).await;
    }
    let mut order = Vec::new();
    while let Some(run) = claim(&store, "rt1").await {
        assert_eq!(run.status, RunStatus::Claimed);
        order.push(run.run_id);
    }
    assert_eq!(order, ["g", "d", "i", "b", "e", "a", "c", "f", "h"]);
}

async fn claim_result_fields_match_the_seed() {
    let (_redis, store) = common::store().await;
    create(&store, NewRun::new("r1", "agent").queue(Q)).await;
    let before = now_ms(&store).await;
    let run = claim_lease(&store, "rt-7", Duration::from_secs(30)).await.expect("claim");
    let after = now_ms(&store).await;
    assert_eq!(run.status, RunStatus::Claimed);
    assert_eq!(run.claimed_by_runtime_id.as_deref(), Some("rt-7"));
    let token = token_of(&run);
    assert_eq!(token.len(), 32, "the token is a uuid4 hex like the seed's");
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(run.dispatch_attempts, 1);
    let lease_ms = run.claim_lease_expires_at_ms.expect("lease expiry in ms");
    assert!(
        lease_ms >= before + 30_000 && lease_ms <= after + 30_000,
        "lease {lease_ms} is 30 s after the claim (in {before}..={after})"
    );
    assert_eq!(run.claim_lease_expires_at, Some(lease_ms / 1000), "seconds field is the ms field rounded down");
    let last = run.last_claimed_at.expect("last_claimed_at");
    assert!(last >= before / 1000 && last <= after / 1000, "last_claimed_at {last} is the claim's time");
    assert_eq!(run.updated_at, last);
}

async fn pinned_run_goes_only_to_its_runtime() {
    let (_redis, store) = common::store().await;
    create(&store, NewRun::new("pinned", "agent").queue(Q).requested_runtime("rt-a")).await;
    // It is the only queued run, and still nobody else gets it.
    assert!(claim(&store, "rt-b").await.is_none(), "rt-b must not get a run pinned to rt-a");
    assert!(claim(&store, "rt-c").await.is_none());
    let run = claim(&store, "rt-a").await.expect("rt-a gets its pinned run");
    assert_eq!(run.run_id, "pinned");
    assert_eq!(run.requested_runtime_id.as_deref(), Some("rt-a"));
    assert_eq!(run.claimed_by_runtime_id.as_deref(), Some("rt-a"));
}

async fn pinned_and_unpinned_runs_share_one_order() {
    let (_redis, store) = common::store().await;
    create(&store, NewRun::new("u-low", "agent").queue(Q).priority(1)).await;
    create(&store, NewRun::new("p-high", "agent").queue(Q).priority(5).requested_runtime("rt-a")).await;
    create(&store, NewRun::new("u-high", "agent").queue(Q).priority(5)).await;
    create(&store, NewRun::new("p-low", "agent").queue(Q).priority(0).requested_runtime("rt-a")).await;
    // rt-b sees only unpinned runs.
    assert_eq!(claim(&store, "rt-b").await.expect("rt-b claim").run_id, "u-high");
    // rt-a sees its pinned lane merged with the queue, in the seed's order.
    assert_eq!(claim(&store, "rt-a").await.expect("rt-a claim 1").run_id, "p-high");
    assert_eq!(claim(&store, "rt-a").await.expect("rt-a claim 2").run_id, "u-low");
    assert!(claim(&store, "rt-b").await.is_none(), "only rt-a's pinned run is left");
    assert_eq!(claim(&store, "rt-a").await.expect("rt-a claim 3").run_id, "p-low");
    assert!(claim(&store, "rt-a").await.is_none());
}

async fn runner_ids_filter_selects_runs_of_those_runners() {
    let (_redis, store) = common::store().await;
    create(&store, NewRun::new("x1", "runner-x").queue(Q).priority(9)).await;
    create(&store, NewRun::new("y1", "runner-y").queue(Q)).await;
    create(&store, NewRun::new("z1", "runner-z").queue(Q).priority(3)).await;
    create(&store, NewRun::new("y2", "runner-y").queue(Q).priority(2)).await;
    create(&store, NewRun::new("x-pinned", "runner-x").queue(Q).priority(100).requested_runtime("rt-a")).await;
    create(&store, NewRun::new("y-pinned", "runner-y").queue(Q).priority(-5).requested_runtime("rt-a")).await;

    let by = |rt: &str, runners: &[&str]| {
        let mut req = ClaimRequest::new(rt).queue(Q).lease(Duration::from_secs(60));
        for r in runners {
            req = req.runner(*r);
        }
        req
    };
    let take = |req: ClaimRequest| {
        let store = store.clone();
        async move { store.claim_next_run(&req).await.expect("claim with runner filter").map(|r| r.run_id) }
    };
    // Filter y: highest y first; x and z untouched.
    assert_eq!(take(by("rt-b", &["runner-y"])).await.as_deref(), Some("y2"));
    // Filter y on rt-a: the pinned x run is skipped even though its priority is highest.
    assert_eq!(take(by("rt-a", &["runner-y"])).await.as_deref(), Some("y1"));
    assert_eq!(take(by("rt-a", &["runner-y"])).await.as_deref(), Some("y-pinned"));
    assert_eq!(take(by("rt-a", &["runner-y"])).await, None, "no runner-y run is left");
    // Filter x,z on rt-b: the pinned x run belongs to rt-a; x1 (9) then z1 (3).
    assert_eq!(take(by("rt-b", &["runner-z", "runner-x"])).await.as_deref(), Some("x1"));
    assert_eq!(take(by("rt-b", &["runner-z", "runner-x"])).await.as_deref(), Some("z1"));
    assert_eq!(take(by("rt-b", &["runner-x"])).await, None, "x-pinned is rt-a's");
    // Filter x on rt-a: its pinned run.
    assert_eq!(take(by("rt-a", &["runner-x"])).await.as_deref(), Some("x-pinned"));
    assert_eq!(take(by("rt-a", &[])).await, None);
}

async fn expired_lease_is_claimable_again_with_a_new_token() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, NewRun::new("r1", "agent").queue(Q)).await;
    let first = claim_lease(&store, "rt-1", Duration::from_secs(60)).await.expect("first claim");
    assert_eq!(first.dispatch_attempts, 1);
    // While the lease is live nobody else gets it.
    assert!(claim(&store, "rt-2").await.is_none(), "a live lease is not claimable");
    // Shortened by its holder, then left to run out by the server's clock.
    let short = store.renew_claim("r1", &token_of(&first), Duration::from_millis(200)).await.expect("renew");
    common::until_server_passes(&store, short.claim_lease_expires_at_ms.expect("lease ms")).await;
    let second = claim(&store, "rt-2").await.expect("an expired lease is claimable again");
    assert_eq!(second.run_id, "r1");
    assert_eq!(second.dispatch_attempts, 2);
    assert_eq!(second.claimed_by_runtime_id.as_deref(), Some("rt-2"));
    assert_ne!(token_of(&second), token_of(&first), "each claim gets a new token");
    assert!(second.claim_lease_expires_at_ms > first.claim_lease_expires_at_ms);
    assert_eq!(hget(&mut raw, "rl:{q}:run:r1", "claim_token").await, Some(token_of(&second)));
    let lease = zscore(&mut raw, "rl:{q}:leases", "r1").await.expect("the run is in the lease index");
    assert_eq!(lease as i64, second.claim_lease_expires_at_ms.expect("lease ms"));
}

async fn release_claim_back_to_queue_and_with_retry_delay() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, NewRun::new("r1", "agent").queue(Q)).await;
    let c1 = claim(&store, "rt-1").await.expect("claim");
    let released = store
        .release_claim("r1", &token_of(&c1), &Release { status_reason: Some("busy".into()), ..Default::default() })
        .await
        .expect("release back to the queue");
    assert_eq!(released.status, RunStatus::Queued);
    assert_eq!(released.status_reason.as_deref(), Some("busy"));
    assert_eq!(released.claimed_by_runtime_id, None);
    assert_eq!(released.claim_token, None);
    assert_eq!(released.claim_lease_expires_at, None);
    assert_eq!(released.finished_at, None);
    assert_eq!(zscore(&mut raw, "rl:{q}:leases", "r1").await, None, "a released run leaves the lease index");
    assert!(zscore(&mut raw, "rl:{q}:queued", "r1").await.is_some(), "it is queued again");

    let c2 = claim(&store, "rt-2").await.expect("claimable again at once");
    assert_eq!(c2.dispatch_attempts, 2);

    // Release with a retry delay: not claimable until it is due.
    let delayed = store
        .release_claim("r1", &token_of(&c2), &Release { retry_in: Some(Duration::from_secs(60)), ..Default::default() })
        .await
        .expect("release with retry_in");
    assert_eq!(delayed.status, RunStatus::Queued);
    assert_eq!(delayed.status_reason, None, "a release without a reason clears the old one, as the seed does");
    assert!(delayed.not_before.is_some(), "the retry time is recorded");
    assert!(zscore(&mut raw, "rl:{q}:delayed", "r1").await.is_some(), "the run waits in the delayed set");
    assert_eq!(zscore(&mut raw, "rl:{q}:queued", "r1").await, None);
    assert!(claim(&store, "rt-3").await.is_none(), "not claimable before its retry time");
    match store.claim_from(Q, &claim_req("rt-3")).await.expect("claim_from") {
        ClaimOutcome::Empty { next_due_ms, .. } => {
            assert!(next_due_ms.is_some(), "an empty claim says when the delayed run falls due")
        }
        ClaimOutcome::Claimed(run) => panic!("claimed {} before its retry time", run.run_id),
    }
    // Once due (by the server's clock) it is claimable: a second run,
    // released with a short delay, shows it.
    create(&store, NewRun::new("r2", "agent").queue(Q)).await;
    let d1 = claim(&store, "rt-1").await.expect("claim r2");
    assert_eq!(d1.run_id, "r2", "r1 is still delayed");
    let soon = store
        .release_claim(
            "r2",
            &token_of(&d1),
            &Release { retry_in: Some(Duration::from_millis(300)), ..Default::default() },
        )
        .await
        .expect("release with a short retry_in");
    let due_ms = zscore(&mut raw, "rl:{q}:delayed", "r2").await.expect("r2 waits in the delayed set") as i64;
    assert!(soon.not_before.is_some());
    common::until_server_passes(&store, due_ms).await;
    let c3 = claim(&store, "rt-3").await.expect("claimable once due");
    assert_eq!(c3.run_id, "r2");
    assert_eq!(c3.dispatch_attempts, 2);
}

async fn release_claim_to_a_terminal_status() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, NewRun::new("r1", "agent").queue(Q)).await;
    let c = claim(&store, "rt-1").await.expect("claim");
    let run = store
        .release_claim(
            "r1",
            &token_of(&c),
            &Release { status: RunStatus::Failed, status_reason: Some("crashed".into()), ..Default::default() },
        )
        .await
        .expect("release to failed");
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.status_reason.as_deref(), Some("crashed"));
    assert!(run.finished_at.is_some(), "a terminal release sets finished_at");
    assert_eq!(run.claim_lease_expires_at, None);
    assert_eq!(run.claimed_by_runtime_id, None);
    assert_eq!(zcard(&mut raw, "rl:{q}:leases").await, 0);
    assert_eq!(zcard(&mut raw, "rl:{q}:queued").await, 0);
    assert!(finished_ids(&mut raw).await.contains(&"r1".to_string()));
    assert!(claim(&store, "rt-2").await.is_none(), "a finished run is never claimable");
    // A retry delay only makes sense with queued.
    create(&store, NewRun::new("r2", "agent").queue(Q)).await;
    let c2 = claim(&store, "rt-1").await.expect("claim r2");
    let err = store
        .release_claim(
            "r2",
            &token_of(&c2),
            &Release { status: RunStatus::Failed, retry_in: Some(Duration::from_secs(1)), ..Default::default() },
        )
        .await
        .expect_err("retry_in with a terminal status is refused");
    assert!(matches!(err, Error::Invalid(_)), "got {err:?}");
    assert_eq!(store.get_run("r2").await.expect("get r2").status, RunStatus::Claimed);
}

async fn release_expired_claims_with_now_override() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    for id in ["r1", "r2", "r3"] {
        create(&store, NewRun::new(id, "agent").queue(Q)).await;
    }
    let c1 = claim(&store, "rt-1").await.expect("claim r1");
    let c2 = claim(&store, "rt-1").await.expect("claim r2");
    assert_eq!((c1.run_id.as_str(), c2.run_id.as_str()), ("r1", "r2"));

    // At the real time nothing has expired.
    let none = store
        .release_expired_claims(&[], None, RunStatus::Queued, "claim lease expired", 100)
        .await
        .expect("release_expired_claims now");
    assert!(none.is_empty(), "live leases are not released: {none:?}");

    // Ten minutes from now both 60 s leases have expired; oldest lease first.
    let later = now_ms(&store).await + 600_000;
    let released = store
        .release_expired_claims(&[Q.to_string()], Some(later), RunStatus::Queued, "claim lease expired", 100)
        .await
        .expect("release_expired_claims with now override");
    let ids: Vec<_> = released.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, ["r1", "r2"]);
    for run in &released {
        assert_eq!(run.status, RunStatus::Queued);
        assert_eq!(run.status_reason.as_deref(), Some("claim lease expired"));
        assert_eq!(run.claim_token, None);
        assert_eq!(run.claimed_by_runtime_id, None);
        assert_eq!(run.claim_lease_expires_at, None);
    }
    assert_eq!(zcard(&mut raw, "rl:{q}:leases").await, 0);
    assert_eq!(zcard(&mut raw, "rl:{q}:queued").await, 3);
    // The old holder has lost the run.
    let err = store.renew_claim("r1", &token_of(&c1), Duration::from_secs(10)).await.expect_err("stale renew");
    assert!(matches!(err, Error::StaleToken(_)), "got {err:?}");
    // The seed's order holds again: r1 first.
    assert_eq!(claim(&store, "rt-2").await.expect("reclaim").run_id, "r1");
}

async fn release_expired_claims_by_the_server_clock_and_to_terminal_status() {
    let (_redis, store) = common::store().await;
    // The long lease is taken first, so no slow step can let the short one expire early.
    create(&store, NewRun::new("long", "agent").queue(Q)).await;
    create(&store, NewRun::new("short", "agent").queue(Q)).await;
    let long = claim_lease(&store, "rt-1", Duration::from_secs(60)).await.expect("claim long");
    let short = claim_lease(&store, "rt-1", Duration::from_millis(200)).await.expect("claim short");
    assert_eq!((long.run_id.as_str(), short.run_id.as_str()), ("long", "short"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released = store
        .release_expired_claims(&[], None, RunStatus::Timeout, "worker vanished", 100)
        .await
        .expect("release_expired_claims");
    assert_eq!(released.len(), 1, "only the expired lease: {released:?}");
    assert_eq!(released[0].run_id, "short");
    assert_eq!(released[0].status, RunStatus::Timeout);
    assert_eq!(released[0].status_reason.as_deref(), Some("worker vanished"));
    assert!(released[0].finished_at.is_some());
    assert_eq!(store.get_run("long").await.expect("get long").status, RunStatus::Claimed);
    let later = now_ms(&store).await + 600_000;
    let err = store
        .release_expired_claims(&[], Some(later), RunStatus::Running, "x", 100)
        .await
        .expect_err("running is not a release status");
    assert!(matches!(err, Error::Invalid(_)), "got {err:?}");
}

async fn release_expired_claims_respects_limit() {
    let (_redis, store) = common::store().await;
    for i in 0..5 {
        create(&store, NewRun::new(format!("r{i}"), "agent").queue(Q)).await;
        claim(&store, "rt").await.expect("claim");
    }
    let later = now_ms(&store).await + 600_000;
    let first =
        store.release_expired_claims(&[], Some(later), RunStatus::Queued, "expired", 2).await.expect("release 2");
    assert_eq!(first.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), ["r0", "r1"]);
    let rest =
        store.release_expired_claims(&[], Some(later), RunStatus::Queued, "expired", 100).await.expect("release rest");
    assert_eq!(rest.len(), 3);
}

async fn max_attempts_dead_letters_the_run() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, NewRun::new("flaky", "agent").queue(Q).max_attempts(2)).await;
    let c1 = claim(&store, "rt-1").await.expect("attempt 1");
    assert_eq!(c1.max_attempts, Some(2));
    let later = now_ms(&store).await + 600_000;
    let r = store
        .release_expired_claims(&[], Some(later), RunStatus::Queued, "claim lease expired", 100)
        .await
        .expect("expire attempt 1");
    assert_eq!(r[0].status, RunStatus::Queued, "one attempt left: back to the queue");
    let c2 = claim(&store, "rt-2").await.expect("attempt 2");
    assert_eq!(c2.dispatch_attempts, 2);
    let later = now_ms(&store).await + 600_000;
    let r = store
        .release_expired_claims(&[], Some(later), RunStatus::Queued, "claim lease expired", 100)
        .await
        .expect("expire attempt 2");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].status, RunStatus::Failed, "attempts used up: the run is dead");
    let reason = r[0].status_reason.clone().expect("a dead run says why");
    assert!(reason.starts_with("dead"), "reason {reason:?}");
    assert!(r[0].finished_at.is_some());
    assert!(claim(&store, "rt-3").await.is_none(), "a dead run is not claimable");
    assert_eq!(zcard(&mut raw, "rl:{q}:queued").await, 0);
    assert!(finished_ids(&mut raw).await.contains(&"flaky".to_string()));
    let stats = store.queue_stats(Q, 10).await.expect("queue stats");
    assert_eq!(stats.counters.get("dead"), Some(&1), "counters {:?}", stats.counters);
}

async fn max_attempts_dead_letters_through_real_lease_expiry() {
    let (_redis, store) = common::store().await;
    create(&store, NewRun::new("flaky", "agent").queue(Q).max_attempts(1)).await;
    let c1 = claim_lease(&store, "rt-1", Duration::from_millis(200)).await.expect("attempt 1");
    assert_eq!(c1.dispatch_attempts, 1);
    tokio::time::sleep(Duration::from_millis(450)).await;
    // The claim itself takes the expired lease back, finds the run dead, and has nothing to hand out.
    assert!(claim(&store, "rt-2").await.is_none(), "a run out of attempts is not handed out again");
    let run = store.get_run("flaky").await.expect("get");
    assert_eq!(run.status, RunStatus::Failed);
    assert!(run.status_reason.as_deref().unwrap_or_default().starts_with("dead"), "{:?}", run.status_reason);
    assert_eq!(run.dispatch_attempts, 1);
}

async fn request_cancel_on_a_queued_run_cancels_it_at_once() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, NewRun::new("r1", "agent").queue(Q)).await;
    let run = store.request_cancel("r1", Some("user pressed stop")).await.expect("cancel queued");
    assert_eq!(run.status, RunStatus::Cancelled);
    assert_eq!(run.status_reason.as_deref(), Some("user pressed stop"));
    assert!(run.cancel_requested_at.is_some());
    assert!(run.finished_at.is_some());
    assert_eq!(zscore(&mut raw, "rl:{q}:queued", "r1").await, None, "it left the queue");
    assert_eq!(zcard(&mut raw, "rl:{q}:runner:agent").await, 0, "and its runner lane");
    assert!(claim(&store, "rt").await.is_none(), "a cancelled run is not claimable");
    // Cancelling again returns it unchanged.
    let again = store.request_cancel("r1", None).await.expect("cancel again");
    assert_eq!(again, run);
    // A delayed run is cancelled too.
    let due = now_ms(&store).await as f64 / 1000.0 + 60.0;
    create(&store, NewRun::new("later", "agent").queue(Q).not_before(due)).await;
    let later = store.request_cancel("later", None).await.expect("cancel delayed");
    assert_eq!(later.status, RunStatus::Cancelled);
    assert_eq!(zcard(&mut raw, "rl:{q}:delayed").await, 0);
    let err = store.request_cancel("nope", None).await.expect_err("unknown run");
    assert!(matches!(err, Error::NotFound(_)), "got {err:?}");
}

async fn request_cancel_on_a_claimed_run_reaches_the_holder() {
    let (_redis, store) = common::store().await;
    create(&store, NewRun::new("r1", "agent").queue(Q)).await;
    let c = claim(&store, "rt-1").await.expect("claim");
    let token = token_of(&c);
    assert_eq!(c.cancel_requested_at, None);
    // The holder hears the cancel on the queue's channel.
    let mut notices = store.cancel_notices(&[Q.to_string()]).await.expect("subscribe to cancel notices");
    let run = store.request_cancel("r1", Some("stop")).await.expect("cancel claimed");
    assert_eq!(run.status, RunStatus::Claimed, "a claimed run keeps running until its holder stops");
    assert!(run.cancel_requested_at.is_some());
    assert_eq!(run.status_reason.as_deref(), Some("stop"));
    assert_eq!(run.claim_token, None, "request_cancel does not hand out the token");
    let renewed = store.renew_claim("r1", &token, Duration::from_secs(60)).await.expect("renew");
    assert_eq!(renewed.cancel_requested_at, run.cancel_requested_at, "renew tells the holder about the cancel");
    let notice = tokio::time::timeout(Duration::from_secs(5), notices.next())
        .await
        .expect("a cancel notice (waited 5 s)")
        .expect("notice stream open");
    assert_eq!(notice, "r1");
    let done = store
        .finalize_run("r1", &Finish::new(RunStatus::Cancelled), Some(&token))
        .await
        .expect("the holder finishes it as cancelled");
    assert_eq!(done.status, RunStatus::Cancelled);
}

async fn finalize_terminal_stays_terminal() {
    let (_redis, store) = common::store().await;
    create(&store, NewRun::new("r1", "agent").queue(Q)).await;
    let c = claim(&store, "rt").await.expect("claim");
    let token = token_of(&c);
    let done = store
        .finalize_run("r1", &Finish::new(RunStatus::Completed).reason("ok"), Some(&token))
        .await
        .expect("finalize");
    assert_eq!(done.status, RunStatus::Completed);
    let finished_at = done.finished_at.expect("finished_at");

    // Same status again (host, and the holder retrying): idempotent, nothing changes.
    let again = store.finalize_run("r1", &Finish::new(RunStatus::Completed), None).await.expect("same status again");
    assert_eq!(again, done);
    let retry = store
        .finalize_run("r1", &Finish::new(RunStatus::Completed), Some(&token))
        .await
        .expect("the finisher retrying with its token");
    assert_eq!(retry, done);
    assert_eq!(retry.finished_at, Some(finished_at));

    // Another status: a conflict, and nothing changes.
    for status in [RunStatus::Failed, RunStatus::Cancelled, RunStatus::Timeout] {
        let err = store
            .finalize_run("r1", &Finish::new(status).reason("late"), None)
            .await
            .expect_err("a terminal run cannot change status");
        assert!(
            matches!(err, Error::Conflict(ref m) if m.starts_with("Cannot transition terminal run")),
            "{status}: got {err:?}"
        );
    }
    let now = store.get_run("r1").await.expect("get");
    assert_eq!(now.status, RunStatus::Completed);
    assert_eq!(now.status_reason.as_deref(), Some("ok"));

    // Same status with more to say (LangBot's host does this): metadata is
    // merged, usage replaced, finished_at kept, the reason kept when none is given.
    let more = Finish::new(RunStatus::Completed).metadata(json!({"review": "done"})).usage(json!({"tokens": 7}));
    let merged = store.finalize_run("r1", &more, None).await.expect("same status with metadata");
    assert_eq!(merged.status, RunStatus::Completed);
    assert_eq!(merged.metadata["review"], json!("done"));
    assert_eq!(merged.usage, Some(json!({"tokens": 7})));
    assert_eq!(merged.finished_at, Some(finished_at));
    assert_eq!(merged.status_reason.as_deref(), Some("ok"));
    let replaced = store
        .finalize_run("r1", &Finish::new(RunStatus::Completed).usage(json!({"tokens": 9})).reason("rechecked"), None)
        .await
        .expect("usage replaced");
    assert_eq!(replaced.usage, Some(json!({"tokens": 9})));
    assert_eq!(replaced.metadata["review"], json!("done"), "metadata stays merged");
    assert_eq!(replaced.status_reason.as_deref(), Some("rechecked"));
    // Non-terminal statuses are not finalize statuses.
    let err = store.finalize_run("r1", &Finish::new(RunStatus::Queued), None).await.expect_err("queued");
    assert!(matches!(err, Error::Invalid(_)), "got {err:?}");
    let err = store.finalize_run("nope", &Finish::new(RunStatus::Completed), None).await.expect_err("unknown");
    assert!(matches!(err, Error::NotFound(_)), "got {err:?}");
}

async fn finalize_leaves_every_queue_and_lease_index() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let deadline = now_ms(&store).await as f64 / 1000.0 + 3600.0;
    create(&store, NewRun::new("claimed", "agent").queue(Q).deadline_at(deadline)).await;
    create(&store, NewRun::new("queued", "agent").queue(Q)).await;
    create(&store, NewRun::new("pinned", "agent").queue(Q).requested_runtime("rt-x")).await;
    let later = now_ms(&store).await as f64 / 1000.0 + 3600.0;
    create(&store, NewRun::new("delayed", "agent").queue(Q).not_before(later)).await;
    let c = claim(&store, "rt").await.expect("claim");
    assert_eq!(c.run_id, "claimed");
    assert!(zscore(&mut raw, "rl:{q}:leases", "claimed").await.is_some());
    assert!(zscore(&mut raw, "rl:{q}:deadlines", "claimed").await.is_some());

    let done = store
        .finalize_run("claimed", &Finish::new(RunStatus::Completed), Some(&token_of(&c)))
        .await
        .expect("finalize claimed");
    assert_eq!(done.claim_lease_expires_at, None, "finalize clears the lease fields");
    assert_eq!(done.claimed_by_runtime_id, None);
    assert_eq!(zscore(&mut raw, "rl:{q}:leases", "claimed").await, None);
    assert_eq!(zscore(&mut raw, "rl:{q}:deadlines", "claimed").await, None);
    assert_eq!(zcard(&mut raw, "rl:{q}:leases").await, 0);
    assert_eq!(hget(&mut raw, "rl:{q}:run:claimed", "claim_lease_expires_at").await, None);
    assert_eq!(hget(&mut raw, "rl:{q}:run:claimed", "claimed_by_runtime_id").await, None);

    for id in ["queued", "pinned", "delayed"] {
        store.finalize_run(id, &Finish::new(RunStatus::Cancelled), None).await.expect("host finalize");
    }
    assert_eq!(zcard(&mut raw, "rl:{q}:queued").await, 0);
    assert_eq!(zcard(&mut raw, "rl:{q}:runner:agent").await, 0);
    assert_eq!(zcard(&mut raw, "rl:{q}:pinned:rt-x").await, 0);
    assert_eq!(zcard(&mut raw, "rl:{q}:delayed").await, 0);
    assert_eq!(zcard(&mut raw, "rl:{q}:deadlines").await, 0);
    assert_eq!(finished_ids(&mut raw).await.len(), 4);
    assert!(claim(&store, "rt-x").await.is_none());
    let stats = store.queue_stats(Q, 10).await.expect("stats");
    assert_eq!((stats.queued, stats.pinned, stats.delayed, stats.claimed, stats.finished), (0, 0, 0, 0, 4));
}

async fn finalize_merges_metadata_and_stores_usage_and_cost() {
    let (_redis, store) = common::store().await;
    create(&store, NewRun::new("r1", "agent").queue(Q).metadata(json!({"a": 1, "b": {"x": 1}}))).await;
    let c = claim(&store, "rt").await.expect("claim");
    let done = store
        .finalize_run(
            "r1",
            &Finish::new(RunStatus::Completed)
                .metadata(json!({"b": {"y": 2}, "c": [1, 2]}))
                .usage(json!({"tokens": 42}))
                .cost(json!({"usd": 0.5})),
            Some(&token_of(&c)),
        )
        .await
        .expect("finalize with metadata");
    assert_eq!(done.metadata, json!({"a": 1, "b": {"y": 2}, "c": [1, 2]}), "top-level keys merged like dict.update");
    assert_eq!(done.usage, Some(json!({"tokens": 42})));
    assert_eq!(done.cost, Some(json!({"usd": 0.5})));
    assert_eq!(store.get_run("r1").await.expect("get"), done);

    // A run created without metadata gets the patch as its metadata.
    create(&store, NewRun::new("r2", "agent").queue(Q)).await;
    let fresh = store.get_run("r2").await.expect("get r2");
    assert_eq!(fresh.metadata, json!({}), "absent metadata reads as {{}} like the seed");
    assert_eq!(fresh.usage, None);
    let done = store
        .finalize_run("r2", &Finish::new(RunStatus::Failed).metadata(json!({"k": "v"})), None)
        .await
        .expect("finalize r2");
    assert_eq!(done.metadata, json!({"k": "v"}));
}

async fn not_before_delays_a_new_run() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let due = now_ms(&store).await as f64 / 1000.0 + 60.0;
    let run = create(&store, NewRun::new("later", "agent").queue(Q).not_before(due)).await;
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(run.not_before, Some(((due * 1000.0).round() as i64).div_euclid(1000)));
    assert!(zscore(&mut raw, "rl:{q}:delayed", "later").await.is_some());
    create(&store, NewRun::new("now", "agent").queue(Q).priority(-10)).await;
    assert_eq!(claim(&store, "rt").await.expect("the due run").run_id, "now", "the delayed run is skipped");
    assert!(claim(&store, "rt").await.is_none(), "the delayed run is not claimable yet");
    // A run due shortly is claimable once the server's clock reaches it.
    let soon_ms = now_ms(&store).await + 300;
    create(&store, NewRun::new("soon", "agent").queue(Q).not_before(soon_ms as f64 / 1000.0)).await;
    assert!(zscore(&mut raw, "rl:{q}:delayed", "soon").await.is_some());
    common::until_server_passes(&store, soon_ms).await;
    let c = claim(&store, "rt").await.expect("claimable once due");
    assert_eq!(c.run_id, "soon");
    assert_eq!(zscore(&mut raw, "rl:{q}:delayed", "soon").await, None, "it left the delayed set");
    assert_eq!(zcard(&mut raw, "rl:{q}:delayed").await, 1, "the later run still waits");

    // A not_before in the past is claimable at once.
    let past = now_ms(&store).await as f64 / 1000.0 - 10.0;
    create(&store, NewRun::new("past", "agent").queue(Q).not_before(past)).await;
    assert_eq!(claim(&store, "rt").await.expect("past not_before").run_id, "past");
}

async fn deadline_passed_before_claim_becomes_timeout() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let now = now_ms(&store).await as f64 / 1000.0;
    create(&store, NewRun::new("late", "agent").queue(Q).priority(10).deadline_at(now - 5.0)).await;
    create(&store, NewRun::new("fine", "agent").queue(Q).deadline_at(now + 3600.0)).await;
    let c = claim(&store, "rt").await.expect("the run within its deadline");
    assert_eq!(c.run_id, "fine", "the claim skips the run past its deadline");
    let late = store.get_run("late").await.expect("get late");
    assert_eq!(late.status, RunStatus::Timeout);
    assert!(late.finished_at.is_some());
    assert_eq!(late.dispatch_attempts, 0, "it was never dispatched");
    assert!(late.status_reason.as_deref().unwrap_or_default().contains("deadline"), "{:?}", late.status_reason);
    assert_eq!(zscore(&mut raw, "rl:{q}:queued", "late").await, None);
    assert!(finished_ids(&mut raw).await.contains(&"late".to_string()));
}

async fn reap_enforces_deadlines_on_claimed_runs() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let now = now_ms(&store).await;
    create(&store, NewRun::new("r1", "agent").queue(Q).deadline_at(now as f64 / 1000.0 + 2.0)).await;
    create(&store, NewRun::new("r2", "agent").queue(Q).deadline_at(now as f64 / 1000.0 + 3600.0)).await;
    let c1 = claim(&store, "rt").await.expect("claim r1");
    let c2 = claim(&store, "rt").await.expect("claim r2");
    assert_eq!(c1.run_id, "r1");
    // Before the deadline: reaped at the server time the deadline was set from.
    let report = store.reap(&[], Some(now)).await.expect("reap before the deadline");
    assert_eq!(report.timed_out, 0);
    common::until_server_passes(&store, now + 2_000).await;
    let report = store.reap(&[], None).await.expect("reap after the deadline");
    assert_eq!(report.timed_out, 1, "{report:?}");
    let r1 = store.get_run("r1").await.expect("get r1");
    assert_eq!(r1.status, RunStatus::Timeout);
    assert!(r1.finished_at.is_some());
    assert_eq!(zscore(&mut raw, "rl:{q}:leases", "r1").await, None);
    assert_eq!(store.get_run("r2").await.expect("get r2").status, RunStatus::Claimed);
    // The holder of r1 learns it lost the run.
    let err = store.renew_claim("r1", &token_of(&c1), Duration::from_secs(60)).await.expect_err("renew timed out run");
    assert!(matches!(err, Error::StaleToken(_)), "got {err:?}");
    // With a clock override the other deadline is enforced too.
    let report = store.reap(&[Q.to_string()], Some(now + 3_700_000)).await.expect("reap in the future");
    assert_eq!(report.timed_out, 1);
    assert_eq!(store.get_run("r2").await.expect("get r2").status, RunStatus::Timeout);
    let err = store
        .finalize_run("r2", &Finish::new(RunStatus::Completed), Some(&token_of(&c2)))
        .await
        .expect_err("finishing a timed-out run");
    assert!(matches!(err, Error::StaleToken(_) | Error::Conflict(_)), "got {err:?}");
}

async fn renew_past_the_deadline_times_the_run_out() {
    let (_redis, store) = common::store().await;
    let now = now_ms(&store).await as f64 / 1000.0;
    create(&store, NewRun::new("r1", "agent").queue(Q).deadline_at(now + 5.0)).await;
    let c = claim(&store, "rt").await.expect("claim");
    let renewed = store.renew_claim("r1", &token_of(&c), Duration::from_secs(60)).await.expect("renew in time");
    assert_eq!(renewed.status, RunStatus::Claimed);
    common::until_server_passes(&store, (now * 1000.0) as i64 + 5_000).await;
    let err = store.renew_claim("r1", &token_of(&c), Duration::from_secs(60)).await.expect_err("renew too late");
    assert!(matches!(err, Error::DeadlinePassed(_)), "got {err:?}");
    assert_eq!(store.get_run("r1").await.expect("get").status, RunStatus::Timeout);
}

async fn renew_extends_the_lease() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, NewRun::new("r1", "agent").queue(Q)).await;
    let c = claim_lease(&store, "rt", Duration::from_secs(4)).await.expect("claim");
    let token = token_of(&c);
    let first_end = c.claim_lease_expires_at_ms.expect("lease");
    // Renewed each second (3 s of slack each time) until the server's clock
    // is past the first lease's end.
    while now_ms(&store).await <= first_end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = store.renew_claim("r1", &token, Duration::from_secs(4)).await.expect("renew within the lease");
        assert_eq!(r.claim_token, None, "only a claim hands out the token (LangBot's renew leaves it out)");
        let json = serde_json::to_value(&r).expect("serialize");
        assert!(json.get("claim_token").is_none(), "the key is absent, not null: {json}");
        let score = zscore(&mut raw, "rl:{q}:leases", "r1").await.expect("lease index");
        assert_eq!(Some(score as i64), r.claim_lease_expires_at_ms);
    }
    // The first lease is over: the renewals kept it.
    assert!(claim(&store, "other").await.is_none(), "a renewed lease is not claimable");
    let r = store.renew_claim("r1", &token, Duration::from_secs(120)).await.expect("renew longer");
    let now = now_ms(&store).await;
    let exp = r.claim_lease_expires_at_ms.expect("lease");
    assert!(exp > now + 100_000 && exp <= now + 121_000);
    assert_eq!(r.dispatch_attempts, 1, "renew is not a new dispatch");
}

async fn get_run_never_shows_the_claim_token() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let mut new = NewRun::new("r1", "agent").queue(Q);
    new.authorization = Some(json!({"bearer": "secret"}));
    let created = create(&store, new).await;
    assert_eq!(created.claim_token, None);
    assert_eq!(created.authorization, None, "authorization is for the claimer only");
    let c = claim(&store, "rt").await.expect("claim");
    let token = token_of(&c);
    assert_eq!(c.authorization, Some(json!({"bearer": "secret"})), "the claimer gets the authorization");
    assert_eq!(hget(&mut raw, "rl:{q}:run:r1", "claim_token").await.as_deref(), Some(token.as_str()));

    let read = store.get_run("r1").await.expect("get");
    assert_eq!(read.status, RunStatus::Claimed);
    assert_eq!(read.claim_token, None, "get_run hides the token");
    assert_eq!(read.authorization, None);
    assert_eq!(read.claimed_by_runtime_id.as_deref(), Some("rt"), "reads show who holds the run");
    assert_eq!(read.claim_lease_expires_at, c.claim_lease_expires_at, "and until when");
    let json = serde_json::to_value(&read).expect("serialize");
    assert!(json.get("claim_token").is_none(), "the key is absent, not null: {json}");
    assert!(serde_json::to_value(&c).expect("serialize").get("claim_token").is_some(), "a claim's result has it");
    assert!(!json.to_string().contains(&token), "the token appears nowhere in a read");

    let page = store.list_runs(&RunFilter { limit: 10, ..Default::default() }).await.expect("list");
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].claim_token, None, "list_runs hides the token");
    let cancelled = store.request_cancel("r1", None).await.expect("cancel");
    assert_eq!(cancelled.claim_token, None);
}

async fn run_json_has_the_seed_keys() {
    let (_redis, store) = common::store().await;
    let mut new = NewRun::new("r1", "agent").queue(Q).priority(4).conversation("c1").bot("b1");
    new.event_id = Some("ev-1".into());
    let created = create(&store, new).await;
    let claimed = claim(&store, "rt").await.expect("claim");
    let seed_keys = common::SEED_RUN_KEYS;
    for run in [&created, &claimed] {
        let json = serde_json::to_value(run).expect("serialize run");
        let obj = json.as_object().expect("a run serializes to an object");
        for key in seed_keys {
            assert!(obj.contains_key(*key), "key {key} missing from {json}");
        }
        assert_eq!(
            obj.contains_key(common::CLAIM_TOKEN_KEY),
            std::ptr::eq(run, &claimed),
            "only a claim has the token"
        );
        for key in obj.keys() {
            assert!(
                seed_keys.contains(&key.as_str())
                    || ["not_before", "max_attempts", "authorization", common::CLAIM_TOKEN_KEY].contains(&key.as_str()),
                "unexpected key {key}"
            );
        }
        assert!(!obj.contains_key("claim_lease_expires_at_ms"), "the ms field is internal");
    }
    let json = serde_json::to_value(&claimed).expect("serialize claimed");
    assert_eq!(json["id"], json!(claimed.id));
    assert!(claimed.id > 0 && claimed.id < (1i64 << 53), "an exact integer in JSON");
    assert_eq!(json["run_id"], json!("r1"));
    assert_eq!(json["status"], json!("claimed"));
    assert_eq!(json["claim_token"], json!(claimed.claim_token.clone().expect("token")));
    assert_eq!(json["dispatch_attempts"], json!(1));
    assert_eq!(json["queue_name"], json!("q"));
    assert_eq!(json["priority"], json!(4));
    assert_eq!(json["event_id"], json!("ev-1"));
    assert_eq!(json["metadata"], json!({}));
    assert_eq!(json["usage"], Value::Null);
    assert!(json["claim_lease_expires_at"].is_i64(), "epoch seconds as an integer");
    let created_at = json["created_at"].as_i64().expect("created_at");
    assert!(created_at > 1_600_000_000 && created_at < 10_000_000_000, "epoch seconds, not ms: {created_at}");
    // And back: the JSON is a Run again.
    let back: Run = serde_json::from_value(json).expect("deserialize");
    assert_eq!(back.run_id, "r1");
}

async fn runs_without_queue_go_to_default() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let run = create(&store, NewRun::new("r1", "agent")).await;
    assert_eq!(run.queue_name, "default");
    assert!(zscore(&mut raw, "rl:{default}:queued", "r1").await.is_some());
    // A claim without queues looks at every known queue.
    let c = store
        .claim_next_run(&ClaimRequest::new("rt").lease(Duration::from_secs(10)))
        .await
        .expect("claim any queue")
        .expect("the default queue's run");
    assert_eq!(c.run_id, "r1");
}

async fn finish_and_claim_takes_the_next_run_in_the_same_call() {
    let (_redis, store) = common::store().await;
    for (id, priority) in [("a", 0), ("b", 5), ("c", 1)] {
        store.create_run(&NewRun::new(id, "agent").queue("q").priority(priority)).await.expect("create");
    }
    let request = ClaimRequest::new("rt").queue("q").lease(Duration::from_secs(30));
    let first = store.claim_next_run(&request).await.expect("claim").expect("a run");
    assert_eq!(first.run_id, "b");
    let token = first.claim_token.clone().expect("token");

    // Finishing b claims c (priority 1) in the same call, under a new token.
    let next = store
        .finish_and_claim("b", &Finish::new(RunStatus::Completed), Some(&token), &request)
        .await
        .expect("finish and claim")
        .expect("the next run");
    assert_eq!(next.run_id, "c");
    assert_eq!(next.status, RunStatus::Claimed);
    assert_ne!(next.claim_token.as_deref(), Some(token.as_str()));
    assert_eq!(store.get_run("b").await.expect("get b").status, RunStatus::Completed);

    // A repeat of the same finish is a no-op and claims nothing.
    let again = store
        .finish_and_claim("b", &Finish::new(RunStatus::Completed), Some(&token), &request)
        .await
        .expect("idempotent repeat");
    assert!(again.is_none());
    assert_eq!(store.get_run("a").await.expect("get a").status, RunStatus::Queued);

    // A stale token finishes nothing and claims nothing.
    let err = store
        .finish_and_claim("c", &Finish::new(RunStatus::Completed), Some("0123456789abcdef0123456789abcdef"), &request)
        .await
        .expect_err("stale token");
    assert!(matches!(err, Error::StaleToken(_)), "{err:?}");
    assert_eq!(store.get_run("a").await.expect("get a").status, RunStatus::Queued);
    assert_eq!(store.get_run("c").await.expect("get c").status, RunStatus::Claimed);

    // With the queue empty after the last finish, nothing more is claimed.
    let c_token = next.claim_token.clone().expect("token");
    let a = store
        .finish_and_claim("c", &Finish::new(RunStatus::Completed), Some(&c_token), &request)
        .await
        .expect("finish c")
        .expect("claims a");
    assert_eq!(a.run_id, "a");
    let none = store
        .finish_and_claim("a", &Finish::new(RunStatus::Completed), a.claim_token.as_deref(), &request)
        .await
        .expect("finish a");
    assert!(none.is_none());
}

// Every case above, on a server of its own and on the test cluster.
backend_tests!(
    create_is_idempotent_by_run_id,
    create_running_is_started_and_not_claimable,
    claim_order_is_priority_desc_then_creation_order,
    claim_result_fields_match_the_seed,
    pinned_run_goes_only_to_its_runtime,
    pinned_and_unpinned_runs_share_one_order,
    runner_ids_filter_selects_runs_of_those_runners,
    expired_lease_is_claimable_again_with_a_new_token,
    release_claim_back_to_queue_and_with_retry_delay,
    release_claim_to_a_terminal_status,
    release_expired_claims_with_now_override,
    release_expired_claims_by_the_server_clock_and_to_terminal_status,
    release_expired_claims_respects_limit,
    max_attempts_dead_letters_the_run,
    max_attempts_dead_letters_through_real_lease_expiry,
    request_cancel_on_a_queued_run_cancels_it_at_once,
    request_cancel_on_a_claimed_run_reaches_the_holder,
    finalize_terminal_stays_terminal,
    finalize_leaves_every_queue_and_lease_index,
    finalize_merges_metadata_and_stores_usage_and_cost,
    not_before_delays_a_new_run,
    deadline_passed_before_claim_becomes_timeout,
    reap_enforces_deadlines_on_claimed_runs,
    renew_past_the_deadline_times_the_run_out,
    renew_extends_the_lease,
    get_run_never_shows_the_claim_token,
    run_json_has_the_seed_keys,
    runs_without_queue_go_to_default,
    finish_and_claim_takes_the_next_run_in_the_same_call,
);
