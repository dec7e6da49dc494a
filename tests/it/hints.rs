//! The queue's hints (`<P>:{Q}:hints`) let a claim skip the probes of
//! `delayed`, `leases` and its pinned lane while nothing there can be due.
//! They are a cache of lower bounds: every write that could make something
//! due sooner must lower them, or a due run waits. Each case sets the hints
//! to their most optimistic state first (a claim on an empty queue writes
//! "nothing due for a second, no pinned runs"), then makes something due
//! before that second ends, and checks that the next claim finds it.

use crate::common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use runledger::store::Conn;
use runledger::*;

const Q: &str = "q";

fn request(runtime: &str) -> ClaimRequest {
    ClaimRequest::new(runtime).queue(Q).lease(Duration::from_secs(30))
}

/// The hints hash as the scripts left it: (next_due, pinned).
async fn hints(raw: &mut Conn, store: &Store) -> (Option<i64>, Option<String>) {
    let key = store.queue_keys(Q).hints();
    let (due, pinned): (Option<i64>, Option<String>) =
        redis::cmd("HMGET").arg(&key).arg("next_due").arg("pinned").query_async(raw).await.expect("HMGET hints");
    (due, pinned)
}

/// A claim on the empty queue: the hints say nothing is due for a while.
async fn settle_on_empty(raw: &mut Conn, store: &Store) -> i64 {
    assert!(store.claim_next_run(&request("idle")).await.expect("claim").is_none());
    let (due, pinned) = hints(raw, store).await;
    assert_eq!(pinned.as_deref(), Some("0"), "an empty queue has no pinned runs");
    due.expect("a claim writes next_due")
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64()
}

async fn a_short_lease_lowers_the_hint_and_is_taken_back_when_it_ends() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let hinted = settle_on_empty(&mut raw, &store).await;
    store.create_run(&NewRun::new("a", "agent").queue(Q)).await.expect("create");
    let held =
        store.claim_next_run(&request("first").lease(Duration::from_millis(200))).await.expect("claim").expect("a run");
    let lease_end = held.claim_lease_expires_at_ms.expect("lease end");
    let (due, _) = hints(&mut raw, &store).await;
    let due = due.expect("next_due");
    assert!(due <= lease_end && due < hinted, "next_due {due} must not pass the lease's end {lease_end}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = store.claim_next_run(&request("second")).await.expect("claim").expect("the run whose lease ended");
    assert_eq!((again.run_id.as_str(), again.dispatch_attempts), ("a", 2));
}

async fn a_delayed_run_lowers_the_hint_and_is_claimed_when_due() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let hinted = settle_on_empty(&mut raw, &store).await;
    let now_ms = store.server_time_ms().await.expect("server time");
    store.create_run(&NewRun::new("later", "agent").queue(Q).not_before(now_s() + 3600.0)).await.expect("create");
    assert!(store.claim_next_run(&request("w")).await.expect("claim").is_none(), "not due yet");
    // Due shortly by the server's clock: it lowers the hint, and is claimed
    // once the server's clock reaches it.
    let soon_ms = now_ms + 300;
    store.create_run(&NewRun::new("soon", "agent").queue(Q).not_before(soon_ms as f64 / 1000.0)).await.expect("create");
    let (due, _) = hints(&mut raw, &store).await;
    assert!(due.expect("next_due") < hinted, "a run due sooner than the hint lowers it");
    common::until_server_passes(&store, soon_ms).await;
    let run = store.claim_next_run(&request("w")).await.expect("claim").expect("the delayed run, now due");
    assert_eq!(run.run_id, "soon");
}

async fn a_pinned_run_raises_the_pinned_hint_and_its_runtime_claims_it() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    settle_on_empty(&mut raw, &store).await;
    store.create_run(&NewRun::new("p", "agent").queue(Q).requested_runtime("rt-p")).await.expect("create");
    assert_eq!(hints(&mut raw, &store).await.1.as_deref(), Some("1"));
    assert!(store.claim_next_run(&request("other")).await.expect("claim").is_none(), "pinned to another runtime");
    let run = store.claim_next_run(&request("rt-p")).await.expect("claim").expect("its pinned run");
    assert_eq!(run.run_id, "p");
    assert_eq!(hints(&mut raw, &store).await.1.as_deref(), Some("0"), "its last pinned lane is gone");
}

async fn deleting_the_hints_is_safe() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    settle_on_empty(&mut raw, &store).await;
    store.create_run(&NewRun::new("p", "agent").queue(Q).requested_runtime("rt-p")).await.expect("create");
    store.create_run(&NewRun::new("q", "agent").queue(Q)).await.expect("create");
    let key = store.queue_keys(Q).hints();
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut raw).await.expect("DEL hints");
    // The next claim probes everything and writes the hints again.
    let run = store.claim_next_run(&request("rt-p")).await.expect("claim").expect("a run");
    assert_eq!(run.run_id, "p", "created first, so claimed first: the pinned lane was read");
    let (due, pinned) = hints(&mut raw, &store).await;
    assert!(due.is_some());
    assert_eq!(pinned.as_deref(), Some("0"));
    let run = store.claim_next_run(&request("rt-p")).await.expect("claim").expect("a run");
    assert_eq!(run.run_id, "q");
}

backend_tests!(
    a_short_lease_lowers_the_hint_and_is_taken_back_when_it_ends,
    a_delayed_run_lowers_the_hint_and_is_claimed_when_due,
    a_pinned_run_raises_the_pinned_hint_and_its_runtime_claims_it,
    deleting_the_hints_is_safe,
);
