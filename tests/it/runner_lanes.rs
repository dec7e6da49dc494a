//! A queue whose queued runs have one runner keeps no lane (`queued` is that
//! runner's lane); from the arrival of a second runner until `queued` is empty
//! again, every runner's run is also in its runner's lane. A random mix of
//! creates, filtered claims, releases (some delayed), cancels and finishes
//! checks after every step that `runners` counts exactly what `queued` holds,
//! that the lanes are there exactly when the mark says so and each matches
//! `queued`, that every claim takes the best run its filter allows, and that a
//! whole queue is copied (ZUNIONSTORE) only when a second runner arrives.
//! Queues of earlier builds (no mark; or a lane for every runner, always) are
//! served as they are.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use runledger::store::Conn;
use runledger::*;

const RUNNERS: [&str; 3] = ["alpha", "beta", "gamma"];
const BAND: f64 = 4_398_046_511_104.0;

/// A small deterministic generator, so a failure replays the same history.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

async fn zrange(raw: &mut Conn, key: &str) -> Vec<(String, f64)> {
    redis::cmd("ZRANGE").arg(key).arg(0).arg(-1).arg("WITHSCORES").query_async(raw).await.expect("ZRANGE")
}

/// `queued` as run_id -> (runner, score).
async fn queued(raw: &mut Conn) -> BTreeMap<String, (String, f64)> {
    let mut out = BTreeMap::new();
    for (rid, score) in zrange(raw, "rl:{q}:queued").await {
        let runner: String = redis::cmd("HGET")
            .arg(format!("rl:{{q}}:run:{rid}"))
            .arg("runner_id")
            .query_async(raw)
            .await
            .expect("HGET runner_id");
        out.insert(rid, (runner, score));
    }
    out
}

/// Checks the lanes against `queued`; returns whether the queue keeps lanes.
async fn check_lanes(store: &Store, raw: &mut Conn, step: usize) -> bool {
    let queued = queued(raw).await;
    let counts: HashMap<String, i64> =
        redis::cmd("HGETALL").arg("rl:{q}:runners").query_async(raw).await.expect("HGETALL");
    let mark: Option<String> = redis::cmd("HGET").arg("rl:{q}:meta").arg("lanes").query_async(raw).await.expect("HGET");
    let shared = mark.as_deref() == Some("1");
    if !shared {
        assert!(counts.len() <= 1, "step {step}: no lanes (mark {mark:?}) but runners {counts:?}");
    }
    let stats = store.queue_stats("q", 0).await.expect("queue_stats");
    assert_eq!(stats.queued_by_runner, counts.clone().into_iter().collect(), "step {step}: queue_stats by runner");
    assert_eq!(stats.queued, queued.len() as i64, "step {step}: queue_stats queued");
    for runner in RUNNERS {
        let expected: Vec<(String, f64)> =
            queued.iter().filter(|(_, (r, _))| r == runner).map(|(rid, (_, s))| (rid.clone(), *s)).collect();
        let count = counts.get(runner).copied();
        if expected.is_empty() {
            assert_eq!(count, None, "step {step}: {runner} has no queued run but counts {count:?}");
        } else {
            assert_eq!(count, Some(expected.len() as i64), "step {step}: queued runs of {runner}");
        }
        let mut lane = zrange(raw, &format!("rl:{{q}}:runner:{runner}")).await;
        lane.sort_by(|a, b| a.0.cmp(&b.0));
        if shared {
            assert_eq!(lane, expected, "step {step}: lane of {runner} with runners {counts:?}");
        } else {
            assert_eq!(lane, [], "step {step}: a lane of {runner} in a queue without lanes");
        }
    }
    shared
}

async fn copies(raw: &mut Conn) -> u64 {
    let stats: String = redis::cmd("INFO").arg("commandstats").query_async(raw).await.expect("INFO");
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_zunionstore:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// A claim must take a run of a wanted runner that nothing left in `queued`
/// beats; an empty claim must leave no run of a wanted runner in `queued`.
async fn check_claim(raw: &mut Conn, step: usize, filter: &[&str], claimed: Option<&Run>) {
    let wanted = |r: &str| filter.is_empty() || filter.contains(&r);
    let best_left = queued(raw).await.into_values().filter(|(r, _)| wanted(r)).map(|(_, s)| s).reduce(f64::min);
    match claimed {
        None => assert_eq!(best_left, None, "step {step}: claim for {filter:?} found nothing but runs wait"),
        Some(run) => {
            assert!(wanted(&run.runner_id), "step {step}: claim for {filter:?} took a run of {}", run.runner_id);
            // Within a priority, creation order: the id's clock (id = clock * 4096 + queue number).
            let score = (1000 - run.priority) as f64 * BAND + (run.id / 4096) as f64;
            if let Some(left) = best_left {
                assert!(score < left, "step {step}: claim for {filter:?} skipped a better run");
            }
        }
    }
}

#[tokio::test]
async fn runner_lanes_follow_the_runners_of_queued_runs() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut held: Vec<(String, String)> = Vec::new();
    let mut next = 0;
    let mut claims = 0;
    let (mut shared, mut arrivals) = (false, 0);
    for step in 0..400 {
        match rng.below(10) {
            0..=3 => {
                // One run or a batch of up to 4 (a batch queues each runner's runs in one go).
                let mut batch = Vec::new();
                for _ in 0..(if rng.below(3) == 0 { 1 + rng.below(4) } else { 1 }) {
                    next += 1;
                    // Mostly one runner, so the queue moves between one runner and several.
                    let runner = if rng.below(3) == 0 { RUNNERS[rng.below(3)] } else { "alpha" };
                    batch.push(NewRun::new(format!("r{next}"), runner).queue("q").priority(rng.below(4) as i64));
                }
                store.create_runs(&batch).await.expect("create");
            }
            4..=6 => {
                let filter: Vec<&str> = match rng.below(4) {
                    0 => vec![],
                    1 => vec![RUNNERS[rng.below(3)]],
                    _ => vec![RUNNERS[rng.below(3)], RUNNERS[rng.below(3)]],
                };
                let mut request = ClaimRequest::new("rt").queue("q");
                for r in &filter {
                    request = request.runner(*r);
                }
                let claimed = match store.claim_from("q", &request).await.expect("claim") {
                    ClaimOutcome::Claimed(run) => Some(*run),
                    ClaimOutcome::Empty { .. } => None,
                };
                check_claim(&mut raw, step, &filter, claimed.as_ref()).await;
                if let Some(run) = claimed {
                    claims += 1;
                    held.push((run.run_id.clone(), run.claim_token.clone().expect("claimer sees its token")));
                }
            }
            7 if !held.is_empty() => {
                let (rid, token) = held.swap_remove(rng.below(held.len()));
                let retry_in = (rng.below(3) == 0).then(|| Duration::from_millis(20));
                let release = Release { retry_in, ..Release::default() };
                store.release_claim(&rid, &token, &release).await.expect("release");
            }
            8 if !held.is_empty() => {
                let (rid, token) = held.swap_remove(rng.below(held.len()));
                store.finish_run(&rid, &Finish::new(RunStatus::Completed), Some(&token)).await.expect("finish");
            }
            _ => {
                if let Some((rid, _)) = queued(&mut raw).await.into_iter().nth(rng.below(3)) {
                    store.request_cancel(&rid, Some("test")).await.expect("cancel queued");
                }
            }
        }
        if step % 80 == 79 {
            // Drained now and then, so the queue goes back to keeping no lanes.
            let request = ClaimRequest::new("rt").queue("q");
            while let ClaimOutcome::Claimed(run) = store.claim_from("q", &request).await.expect("claim") {
                held.push((run.run_id.clone(), run.claim_token.clone().expect("token")));
            }
            assert!(!check_lanes(&store, &mut raw, step).await, "step {step}: drained, without lanes");
            shared = false;
        }
        let now_shared = check_lanes(&store, &mut raw, step).await;
        if now_shared && !shared {
            arrivals += 1;
        }
        shared = now_shared;
    }
    assert!(claims > 50, "the history should claim often, claimed {claims}");
    // Runners came and went; a queue was copied into a lane once per second runner's arrival.
    assert!(arrivals >= 3, "the history should move between one runner and several, moved {arrivals} times");
    assert_eq!(copies(&mut raw).await, arrivals, "one copy per arrival of a second runner");

    // Drained, the queue keeps no runner bookkeeping at all.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let request = ClaimRequest::new("rt").queue("q");
    while let ClaimOutcome::Claimed(run) = store.claim_from("q", &request).await.expect("claim") {
        store
            .finish_run(&run.run_id, &Finish::new(RunStatus::Completed), run.claim_token.as_deref())
            .await
            .expect("finish");
    }
    for key in ["rl:{q}:runners", "rl:{q}:runner:alpha", "rl:{q}:runner:beta", "rl:{q}:runner:gamma"] {
        let exists: i64 = redis::cmd("EXISTS").arg(key).query_async(&mut raw).await.expect("EXISTS");
        assert_eq!(exists, 0, "{key} should be gone once the queue is empty");
    }
    assert!(!check_lanes(&store, &mut raw, 400).await, "an empty queue keeps no lanes");
}

/// A run hash deleted by hand leaves dangling lane entries; the claim that
/// finds one drops it and keeps the runner count exact.
#[tokio::test]
async fn a_deleted_run_hash_leaves_the_counts_exact() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    for (rid, runner) in [("a1", "alpha"), ("b1", "beta"), ("a2", "alpha")] {
        store.create_run(&NewRun::new(rid, runner).queue("q").priority(5)).await.expect("create");
    }
    let _: i64 = redis::cmd("DEL").arg("rl:{q}:run:a1").query_async(&mut raw).await.expect("DEL");
    let request = ClaimRequest::new("rt").queue("q").runner("alpha");
    let ClaimOutcome::Claimed(run) = store.claim_from("q", &request).await.expect("claim") else {
        panic!("a2 is claimable");
    };
    assert_eq!(run.run_id, "a2");
    check_lanes(&store, &mut raw, 0).await;
    let counts: HashMap<String, i64> =
        redis::cmd("HGETALL").arg("rl:{q}:runners").query_async(&mut raw).await.expect("HGETALL");
    assert_eq!(counts, HashMap::from([("beta".to_string(), 1)]));
}

/// Queues as earlier builds left them. Without the mark: one runner's runs
/// in `queued` and no lane (the earliest build), which is this build's layout
/// for one runner and is marked so by the first call that asks; or two
/// runners with a lane each, marked as keeping lanes. With the mark of the
/// build before this one ('1': a lane for every runner, always): served with
/// its lanes until `queued` is empty, then without.
#[tokio::test]
async fn queues_of_earlier_builds_are_served_as_they_are() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let request = |runner: &str| ClaimRequest::new("rt").queue("q").runner(runner);
    for (rid, priority) in [("old1", 1), ("old-best", 9), ("old2", 3)] {
        store.create_run(&NewRun::new(rid, "alpha").queue("q").priority(priority)).await.expect("create");
    }
    let unmark = |raw: &mut Conn| {
        let mut raw = raw.clone();
        async move {
            for key in ["rl:{q}:meta", "rl:{q}:hints"] {
                let _: () = redis::cmd("HDEL").arg(key).arg("lanes").query_async(&mut raw).await.expect("HDEL");
            }
        }
    };
    unmark(&mut raw).await;
    store.create_run(&NewRun::new("new", "alpha").queue("q").priority(5)).await.expect("create");
    assert!(!check_lanes(&store, &mut raw, 0).await, "one runner, no mark: no lanes");
    let mut order = Vec::new();
    while let ClaimOutcome::Claimed(run) = store.claim_from("q", &request("alpha")).await.expect("claim") {
        order.push(run.run_id.clone());
        check_lanes(&store, &mut raw, order.len()).await;
    }
    assert_eq!(order, ["old-best", "new", "old2", "old1"], "the filtered claim reads `queued`");

    // Two runners with lanes, no mark: marked as keeping lanes.
    for (rid, runner) in [("a1", "alpha"), ("b1", "beta"), ("a2", "alpha")] {
        store.create_run(&NewRun::new(rid, runner).queue("q")).await.expect("create");
    }
    unmark(&mut raw).await;
    let ClaimOutcome::Claimed(run) = store.claim_from("q", &request("beta")).await.expect("claim") else {
        panic!("b1 waits");
    };
    assert_eq!(run.run_id, "b1");
    assert!(check_lanes(&store, &mut raw, 10).await, "marked as keeping lanes");

    // The mark of the build before ('1') on a queue of one runner with its lane.
    let ClaimOutcome::Claimed(_) = store.claim_from("q", &request("alpha")).await.expect("claim") else {
        panic!("a1 waits");
    };
    assert!(check_lanes(&store, &mut raw, 11).await, "lanes are kept until `queued` is empty");
    let ClaimOutcome::Claimed(_) = store.claim_from("q", &request("alpha")).await.expect("claim") else {
        panic!("a2 waits");
    };
    assert!(!check_lanes(&store, &mut raw, 12).await, "empty: no lanes any more");
    assert_eq!(copies(&mut raw).await, 1, "one copy in all: when beta's run arrived");
}
