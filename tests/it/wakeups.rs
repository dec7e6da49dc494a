//! An idle worker starts a claimable run on its wake-up, never by the safety
//! poll, in the cases where a wake-up used to be lost: another worker that
//! cannot claim the run (a runner filter, another runtime's pin) takes the
//! token first, or a busy worker's BLPOP still in flight pops it. Each case
//! counts the claims that needed the safety poll (`Waiter::polled_claims`),
//! not the time they took; waits are hang guards.

use crate::common;

use std::time::Duration;

use runledger::*;

const Q: &str = "wq";
/// Longer than any case takes: a claim that needed the poll is counted, never timed.
const WAIT: Duration = Duration::from_secs(30);

fn request(runtime: &str, runners: &[&str]) -> ClaimRequest {
    let mut request = ClaimRequest::new(runtime).queue(Q).lease(Duration::from_secs(30));
    for runner in runners {
        request = request.runner(*runner);
    }
    request
}

/// Starts a waiter's blocking claim in the background, after a first empty
/// claim, and returns once Redis counts it among its blocked clients, so
/// that its BLPOP is in flight when this returns.
async fn waiting(
    redis: &common::TestRedis,
    store: &Store,
    request: ClaimRequest,
) -> tokio::task::JoinHandle<(Option<Run>, u64)> {
    let blocked_before = common::blocked_clients(&redis.url).await;
    let mut waiter = Waiter::new(store).await.expect("waiter");
    let task = tokio::spawn(async move {
        let run = waiter.claim(&request, WAIT).await.expect("claim");
        (run, waiter.polled_claims())
    });
    // An empty claim, then the block.
    common::until_blocked(&redis.url, blocked_before + 1).await;
    task
}

async fn a_filtered_worker_does_not_use_up_another_runners_wake_up() {
    let (redis, store) = common::store().await;
    // The filtered worker blocks first, so it would be served first on a shared list.
    let filtered = waiting(&redis, &store, request("filtered", &["other-runner"])).await;
    let any = waiting(&redis, &store, request("any", &[])).await;
    store.create_run(&NewRun::new("r1", "agent").queue(Q)).await.expect("create");
    let (run, polled) = tokio::time::timeout(WAIT * 2, any).await.expect("hang guard").expect("join");
    assert_eq!(run.expect("the unfiltered worker claims the run").run_id, "r1");
    assert_eq!(polled, 0, "the unfiltered worker needed the safety poll: its wake-up was used up");
    filtered.abort();
}

async fn a_filtered_worker_is_woken_for_its_own_runner() {
    let (redis, store) = common::store().await;
    let filtered = waiting(&redis, &store, request("filtered", &["mine"])).await;
    store.create_run(&NewRun::new("m1", "mine").queue(Q)).await.expect("create");
    let (run, polled) = tokio::time::timeout(WAIT * 2, filtered).await.expect("hang guard").expect("join");
    assert_eq!(run.expect("the filtered worker claims its run").run_id, "m1");
    assert_eq!(polled, 0, "the filtered worker needed the safety poll");
}

async fn a_pinned_run_wakes_its_runtime_even_when_another_worker_looks_first() {
    let (redis, store) = common::store().await;
    let other = waiting(&redis, &store, request("other", &[])).await;
    let pinned = waiting(&redis, &store, request("pinned-rt", &[])).await;
    store.create_run(&NewRun::new("p1", "agent").queue(Q).requested_runtime("pinned-rt")).await.expect("create");
    let (run, polled) = tokio::time::timeout(WAIT * 2, pinned).await.expect("hang guard").expect("join");
    assert_eq!(run.expect("the pinned runtime claims its run").run_id, "p1");
    assert_eq!(polled, 0, "the pinned runtime needed the safety poll");
    other.abort();
}

async fn a_busy_workers_blpop_hands_the_token_on() {
    let (redis, store) = common::store().await;
    // A worker whose wait ended (it went busy) leaves its BLPOP in flight.
    let mut busy = Waiter::new(&store).await.expect("waiter");
    let none = busy.claim(&request("busy", &[]), Duration::from_millis(200)).await.expect("claim");
    assert!(none.is_none());
    let idle = waiting(&redis, &store, request("idle", &[])).await;
    store.create_run(&NewRun::new("b1", "agent").queue(Q)).await.expect("create");
    let (run, polled) = tokio::time::timeout(WAIT * 2, idle).await.expect("hang guard").expect("join");
    assert_eq!(run.expect("the idle worker claims the run").run_id, "b1");
    assert_eq!(polled, 0, "the idle worker needed the safety poll: the busy one's BLPOP kept the token");
    drop(busy);
}

backend_tests!(
    a_filtered_worker_does_not_use_up_another_runners_wake_up,
    a_filtered_worker_is_woken_for_its_own_runner,
    a_pinned_run_wakes_its_runtime_even_when_another_worker_looks_first,
    a_busy_workers_blpop_hands_the_token_on,
);
