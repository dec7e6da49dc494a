//! Groups and pause (issue 28): a group at its limit is not claimed and
//! blocks no other group, even with 10,000 of its runs ahead in priority; a
//! lapsed lease gives its slot back; limits change at once; many concurrent
//! Workers, some of whose claims are abandoned as a crashed worker's would
//! be, never hold more runs of one group than its limit over the whole
//! recorded history (server times); pause and resume of a queue and of a
//! group; refused settings write nothing. Both backends.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use runledger::*;

const Q: &str = "chat";

fn req(runtime: &str) -> ClaimRequest {
    ClaimRequest::new(runtime).queue(Q).lease(Duration::from_secs(60))
}

async fn claim(store: &Store, runtime: &str) -> Option<Run> {
    store.claim_next_run(&req(runtime)).await.expect("claim")
}

async fn group_by(store: &Store, by: GroupBy, concurrency: u32) {
    let settings = GroupSettings { group_by: Some(Some(by)), concurrency: Some(concurrency), ..Default::default() };
    store.set_groups(Q, &settings).await.expect("set groups");
}

fn msg(id: &str, conversation: &str, priority: i64) -> NewRun {
    NewRun::new(id, "agent").queue(Q).conversation(conversation).priority(priority)
}

async fn done(store: &Store, run: &Run) {
    store
        .finalize_run(&run.run_id, &Finish::new(RunStatus::Completed), run.claim_token.as_deref())
        .await
        .expect("finish");
}

async fn a_group_at_its_limit_blocks_no_other_group() {
    let (_redis, store) = common::store().await;
    group_by(&store, GroupBy::ConversationId, 1).await;
    // 10,000 runs of conversation A, all ahead of B's in priority.
    let many: Vec<NewRun> = (0..10_000).map(|i| msg(&format!("a{i}"), "A", 10)).collect();
    for chunk in many.chunks(runledger::store::MAX_RUNS_PER_BATCH) {
        store.create_runs(chunk).await.expect("create A's runs");
    }
    store.create_run(&msg("b0", "B", 0)).await.expect("create B's run");
    let first = claim(&store, "rt").await.expect("A's first run");
    assert_eq!((first.run_id.as_str(), first.group_key.as_deref()), ("a0", Some("A")));
    // One call takes the best run of a free group: B's, past A's 9,999.
    let second = claim(&store, "rt").await.expect("B's run in one claim");
    assert_eq!(second.run_id, "b0");
    assert!(claim(&store, "rt").await.is_none(), "A is at its limit, B has nothing left");
    // A's slot comes back with its finish: the next of A, in creation order.
    done(&store, &first).await;
    assert_eq!(claim(&store, "rt").await.expect("A again").run_id, "a1");
    let stats = store.queue_stats(Q, 10).await.expect("stats");
    assert_eq!(stats.claimed, 2);
}

async fn a_lapsed_lease_gives_its_slot_back() {
    let (_redis, store) = common::store().await;
    group_by(&store, GroupBy::ConversationId, 1).await;
    store.create_runs(&[msg("a0", "A", 0), msg("a1", "A", 0)]).await.expect("create");
    let short = req("crashed").lease(Duration::from_millis(600));
    let held = store.claim_next_run(&short).await.expect("claim").expect("a0");
    assert_eq!(held.run_id, "a0");
    assert!(claim(&store, "rt").await.is_none(), "A is held");
    // The holder dies (it never renews): once its lease ends by the server's clock,
    // the group has its slot again, with no reaper running.
    common::until_server_passes(&store, held.claim_lease_expires_at_ms.expect("lease")).await;
    let next = claim(&store, "rt").await.expect("A's slot is back");
    assert_eq!(next.run_id, "a0", "the lapsed run is first in its group again");
    assert_eq!(next.dispatch_attempts, 2);
    assert!(claim(&store, "rt").await.is_none(), "still one at a time");
    // The crashed holder cannot finish what it lost.
    let err = store.finalize_run("a0", &Finish::new(RunStatus::Completed), held.claim_token.as_deref()).await;
    assert!(matches!(err, Err(Error::StaleToken(_))), "{err:?}");
}

async fn limits_order_and_overrides_take_effect_at_once() {
    let (_redis, store) = common::store().await;
    group_by(&store, GroupBy::GroupKey, 2).await;
    let run = |id: &str, g: &str, p: i64| NewRun::new(id, "agent").queue(Q).group_key(g).priority(p);
    store.create_runs(&[run("g1", "G", 0), run("g2", "G", 0), run("g3", "G", 0)]).await.expect("create");
    // A better run arriving takes an admitted place: priority order holds within the group.
    store.create_run(&run("g-urgent", "G", 9)).await.expect("urgent");
    let a = claim(&store, "rt").await.expect("first");
    let b = claim(&store, "rt").await.expect("second");
    assert_eq!((a.run_id.as_str(), b.run_id.as_str()), ("g-urgent", "g1"));
    assert!(claim(&store, "rt").await.is_none(), "two at once");
    // A group's own limit, raised: admitted at once.
    let settings = GroupSettings { overrides: vec![("G".into(), Some(3))], ..Default::default() };
    let shown = store.set_groups(Q, &settings).await.expect("override");
    assert_eq!(shown.group_limits, vec![("G".to_string(), 3)]);
    assert_eq!(claim(&store, "rt").await.expect("third").run_id, "g2");
    assert!(claim(&store, "rt").await.is_none());
    // No grouping any more: everything waiting is claimable.
    store.set_groups(Q, &GroupSettings { group_by: Some(None), ..Default::default() }).await.expect("ungroup");
    assert_eq!(claim(&store, "rt").await.expect("the rest").run_id, "g3");
    assert_eq!(store.queue_groups(Q).await.expect("show").group_by, None);
}

async fn pause_and_resume_a_queue_and_a_group() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    group_by(&store, GroupBy::ConversationId, 1).await;
    store.create_runs(&[msg("a0", "A", 0), msg("b0", "B", 0)]).await.expect("create");
    assert!(store.pause(Q, None, Some("ops")).await.expect("pause"));
    assert!(!store.pause(Q, None, None).await.expect("pause again"), "paused already");
    assert!(claim(&store, "rt").await.is_none(), "a paused queue hands out nothing");
    assert_eq!(store.get_run("a0").await.expect("get").status, RunStatus::Queued);
    assert!(store.resume(Q, None, None).await.expect("resume"));
    assert!(store.pause(Q, Some("A"), None).await.expect("pause A"));
    assert_eq!(claim(&store, "rt").await.expect("B").run_id, "b0");
    assert!(claim(&store, "rt").await.is_none(), "A is paused");
    assert!(store.resume(Q, Some("A"), None).await.expect("resume A"));
    assert_eq!(claim(&store, "rt").await.expect("A").run_id, "a0");
    // Every change is an audit entry of the queue.
    let audit: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(store.queue_keys(Q).base.clone() + "audit")
        .arg("-")
        .arg("+")
        .query_async(&mut raw)
        .await
        .expect("XRANGE audit");
    let kinds: Vec<(&str, &str)> = audit.iter().map(|(_, f)| (f["type"].as_str(), f["group"].as_str())).collect();
    assert_eq!(kinds, [("paused", ""), ("resumed", ""), ("paused", "A"), ("resumed", "A")]);
    assert_eq!(audit[0].1["by"], "ops");
}

async fn refused_settings_write_nothing() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    store.create_run(&msg("a0", "A", 0)).await.expect("create");
    let before = common::keyspace(&mut raw).await;
    assert!("colour".parse::<GroupBy>().is_err());
    let bad = [
        GroupSettings { concurrency: Some(0), ..Default::default() },
        GroupSettings { overrides: vec![("x{y}".into(), Some(1))], ..Default::default() },
        GroupSettings { overrides: vec![("g".into(), Some(2_000_000))], ..Default::default() },
    ];
    for settings in &bad {
        let err = store.set_groups(Q, settings).await.expect_err("refused");
        assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    }
    for err in [
        store.pause(Q, Some("bad\ngroup"), None).await.expect_err("bad group"),
        store.pause("bad{queue}", None, None).await.expect_err("bad queue"),
        store.resume(Q, None, Some(&"x".repeat(300))).await.expect_err("long by"),
        store.create_run(&NewRun::new("z", "agent").queue(Q).group_key("g{1}")).await.expect_err("bad group_key"),
    ] {
        assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    }
    assert_eq!(common::keyspace(&mut raw).await, before, "a refused call wrote something");
}

/// Many concurrent Workers over 20 conversations of 12 runs each, plus a
/// crasher that claims runs under short leases and abandons them. Over the
/// whole history (server times from each run's hash and each abandoned
/// lease), no conversation ever has two runs held at once, and every run
/// completes exactly once.
async fn many_workers_never_exceed_a_group_limit() {
    const GROUPS: usize = 20;
    const PER: usize = 12;
    let (_redis, store) = common::store().await;
    group_by(&store, GroupBy::ConversationId, 1).await;
    let runs: Vec<NewRun> =
        (0..GROUPS * PER).map(|i| msg(&format!("r{i:03}"), &format!("c{}", i % GROUPS), 0)).collect();
    store.create_runs(&runs).await.expect("create");
    // The crasher: takes a few runs and never comes back (its leases lapse).
    let mut abandoned: Vec<(String, String, i64, i64)> = Vec::new(); // run, group, from ms, to ms
    for _ in 0..5 {
        let held = store
            .claim_next_run(&req("crasher").lease(Duration::from_millis(800)))
            .await
            .expect("claim")
            .expect("a run");
        let to = held.claim_lease_expires_at_ms.expect("lease");
        let from = to - 800;
        abandoned.push((held.run_id, held.group_key.expect("group"), from, to));
    }
    let handled = common::run_counting_workers(
        &store,
        Q,
        "gw",
        (6, 4),
        Duration::from_secs(5),
        Duration::from_millis(3),
        GROUPS * PER,
    )
    .await;
    assert_eq!(handled.len(), GROUPS * PER, "every run handled");
    assert!(handled.values().all(|&n| n == 1), "each run handled once: {handled:?}");
    // Intervals in server ms: each run from its last claim to its finish, and each abandoned lease.
    let mut by_group: HashMap<String, Vec<(i64, i64, String)>> = HashMap::new();
    for (run, group, from, to) in &abandoned {
        by_group.entry(group.clone()).or_default().push((*from, *to, format!("{run} (abandoned)")));
    }
    let mut raw = store.conn().await.expect("conn");
    for r in &runs {
        let key = store.queue_keys(Q).run(&r.run_id);
        let v: Vec<Option<i64>> = redis::cmd("HMGET")
            .arg(&key)
            .arg(&["last_claimed_at", "started_at", "finished_at"])
            .query_async(&mut raw)
            .await
            .expect("HMGET");
        let from = v[0].or(v[1]).expect("claimed");
        let to = v[2].expect("finished");
        by_group.entry(r.conversation_id.clone().expect("conversation")).or_default().push((
            from,
            to,
            r.run_id.clone(),
        ));
    }
    for (group, mut spans) in by_group {
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[1].0 >= pair[0].1, "group {group}: {} and {} held at once: {pair:?}", pair[0].2, pair[1].2);
        }
    }
}

/// A partitioned queue (4 partitions) grouped by conversation, concurrency
/// 1: every run of a conversation lands in one partition, chosen by the
/// conversation even where the caller gave another partition key, and many
/// concurrent Workers on the logical queue never hold two runs of one
/// conversation at once over the whole recorded history (server times).
/// Runs without a group keep their partition key.
async fn a_partitioned_queue_places_each_group_in_one_partition() {
    const P: &str = "pchat";
    const GROUPS: usize = 6;
    const PER: usize = 8;
    let (_redis, store) = common::store().await;
    store.declare_partitions(P, 4).await.expect("partitions");
    let settings =
        GroupSettings { group_by: Some(Some(GroupBy::ConversationId)), concurrency: Some(1), ..Default::default() };
    store.set_groups(P, &settings).await.expect("groups");
    let runs: Vec<NewRun> = (0..GROUPS * PER)
        .map(|i| {
            let run = NewRun::new(format!("p{i:03}"), "agent").queue(P).conversation(format!("c{}", i % GROUPS));
            // A partition key of its own on every third run: the group wins.
            if i % 3 == 0 { run.partition_key(format!("k{i}")) } else { run }
        })
        .collect();
    store.create_runs(&runs).await.expect("create");
    let mut partition_of: HashMap<String, String> = HashMap::new();
    for r in &runs {
        let got = store.get_run(&r.run_id).await.expect("get");
        let group = r.conversation_id.clone().expect("conversation");
        assert_eq!(got.group_key.as_deref(), Some(group.as_str()));
        let first = partition_of.entry(group.clone()).or_insert_with(|| got.queue_name.clone());
        assert_eq!(*first, got.queue_name, "{} of {group} is not in its group's partition", r.run_id);
    }
    let used: std::collections::HashSet<&String> = partition_of.values().collect();
    assert!(used.len() > 1, "the groups spread over the partitions: {partition_of:?}");
    // An ungrouped run (no conversation) is placed by its partition key, as before.
    let loose: Vec<NewRun> =
        (0..3).map(|i| NewRun::new(format!("loose{i}"), "agent").queue(P).partition_key("one-key")).collect();
    let created = store.create_runs(&loose).await.expect("create ungrouped");
    assert!(created.iter().all(|r| r.queue_name == created[0].queue_name && r.group_key.is_none()), "{created:?}");

    let handled = common::run_counting_workers(
        &store,
        P,
        "pw",
        (4, 3),
        Duration::from_secs(5),
        Duration::from_millis(3),
        GROUPS * PER + loose.len(),
    )
    .await;
    assert_eq!(handled.len(), GROUPS * PER + loose.len(), "every run handled");
    assert!(handled.values().all(|&n| n == 1), "each run handled once: {handled:?}");
    let mut by_group: HashMap<String, Vec<(i64, i64, String)>> = HashMap::new();
    let mut raw = store.conn().await.expect("conn");
    for r in &runs {
        let group = r.conversation_id.clone().expect("conversation");
        let key = store.queue_keys(&partition_of[&group]).run(&r.run_id);
        let v: Vec<Option<i64>> = redis::cmd("HMGET")
            .arg(&key)
            .arg(&["last_claimed_at", "started_at", "finished_at"])
            .query_async(&mut raw)
            .await
            .expect("HMGET");
        let from = v[0].or(v[1]).unwrap_or_else(|| panic!("{} was never claimed", r.run_id));
        let to = v[2].unwrap_or_else(|| panic!("{} never finished", r.run_id));
        by_group.entry(group).or_default().push((from, to, r.run_id.clone()));
    }
    for (group, mut spans) in by_group {
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[1].0 >= pair[0].1, "group {group}: {} and {} held at once: {pair:?}", pair[0].2, pair[1].2);
        }
    }
}

/// Another host changes the group setting of a partitioned queue while this
/// one's copy of it is fresh: this host's next create is refused by the
/// partition it chose by the old setting (nothing written), and placed anew
/// by the new one, so the group still lives in one partition.
async fn a_create_placed_by_an_old_group_setting_is_placed_anew() {
    const P: &str = "pmoved";
    let (redis, store) = common::store().await;
    let other = Store::connect(&redis.url).await.expect("a second host");
    store.declare_partitions(P, 4).await.expect("partitions");
    let by = |g: GroupBy| GroupSettings { group_by: Some(Some(g)), ..Default::default() };
    store.set_groups(P, &by(GroupBy::ConversationId)).await.expect("by conversation");
    // This host's copy: grouped by conversation.
    store.create_run(&NewRun::new("first", "agent").queue(P).conversation("c")).await.expect("create");
    other.set_groups(P, &by(GroupBy::GroupKey)).await.expect("by group_key, from the other host");
    let runs: Vec<NewRun> = (0..12)
        .map(|i| NewRun::new(format!("m{i}"), "agent").queue(P).group_key("G").conversation(format!("c{i}")))
        .collect();
    let created = store.create_runs(&runs).await.expect("create");
    assert!(created.iter().all(|r| r.group_key.as_deref() == Some("G")), "{created:?}");
    let partitions: std::collections::HashSet<&str> = created.iter().map(|r| r.queue_name.as_str()).collect();
    assert_eq!(partitions.len(), 1, "group G in one partition: {partitions:?}");
    assert_eq!(
        partitions.into_iter().next(),
        Some(
            store.partitions(P).await.expect("partitions")
                [runledger::store::partitions::partition_index("G", 4) as usize]
                .as_str()
        )
    );
}

/// The placement key, by the queue's group_by.
#[test]
fn the_placement_key_is_the_group_when_the_queue_groups() {
    use runledger::store::partitions::placement_key;
    let run = NewRun::new("r", "agent").conversation("c").bot("b").partition_key("k").group_key("g");
    assert_eq!(placement_key(&run, "conversation_id"), "c");
    assert_eq!(placement_key(&run, "bot_id"), "b");
    assert_eq!(placement_key(&run, "group_key"), "g");
    // A run without a value of the grouping field is not grouped: its partition key.
    assert_eq!(placement_key(&run, "thread_id"), "k");
    assert_eq!(placement_key(&run, ""), "k");
    let bare = NewRun::new("r", "agent").group_key("g");
    assert_eq!(placement_key(&bare, ""), "g");
    assert_eq!(placement_key(&NewRun::new("r", "agent"), "conversation_id"), "r");
}

backend_tests!(
    a_partitioned_queue_places_each_group_in_one_partition,
    a_create_placed_by_an_old_group_setting_is_placed_anew,
    a_group_at_its_limit_blocks_no_other_group,
    a_lapsed_lease_gives_its_slot_back,
    limits_order_and_overrides_take_effect_at_once,
    pause_and_resume_a_queue_and_a_group,
    refused_settings_write_nothing,
    many_workers_never_exceed_a_group_limit,
);
