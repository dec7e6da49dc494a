//! Rate limits and caps (issue 28): a claim past the queue's rate answers
//! when the next one is allowed and a waiting claimer sleeps until then; many
//! Workers keep the rate over the whole recorded history (server times); a
//! group's rate holds its runs back while other groups go on; a create past
//! the cap of the queue, a group or a workspace fails with `QueueFull` and
//! writes nothing, and the counts follow every way a run enters or leaves the
//! queue. Both backends.

use crate::common;

use std::time::Duration;

use runledger::*;

const Q: &str = "chat";

fn req(runtime: &str) -> ClaimRequest {
    ClaimRequest::new(runtime).queue(Q).lease(Duration::from_secs(60))
}

fn run(id: &str) -> NewRun {
    NewRun::new(id, "agent").queue(Q)
}

fn rate(max: u32, window_ms: u64) -> Option<Option<RateLimit>> {
    Some(Some(RateLimit { max, window: Duration::from_millis(window_ms) }))
}

/// When the run was first claimed, in server ms (the run hash's started_at).
async fn claimed_ms(store: &Store, run_id: &str) -> i64 {
    let mut conn = store.conn().await.expect("conn");
    let key = store.queue_keys(Q).run(run_id);
    let ms: Option<i64> = redis::cmd("HGET").arg(&key).arg("started_at").query_async(&mut conn).await.expect("HGET");
    ms.unwrap_or_else(|| panic!("{run_id} was never claimed"))
}

async fn claim(store: &Store) -> Option<Run> {
    store.claim_next_run(&req("rt")).await.expect("claim")
}

async fn a_claim_past_the_rate_answers_when_the_next_is_allowed() {
    const WINDOW: i64 = 1500;
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let limits = LimitSettings { rate: rate(2, WINDOW as u64), ..Default::default() };
    let shown = store.set_limits(Q, &limits).await.expect("set limits");
    assert_eq!(shown.rate, Some(RateLimit { max: 2, window: Duration::from_millis(WINDOW as u64) }));
    store.create_runs(&(0..5).map(|i| run(&format!("r{i}"))).collect::<Vec<_>>()).await.expect("create");
    let first = claim(&store).await.expect("first");
    claim(&store).await.expect("second");
    let started = claimed_ms(&store, &first.run_id).await;
    // The third is refused, and says when the window ends, by the server's clock.
    let ClaimOutcome::Empty { next_due_ms: Some(allowed), now_ms } =
        store.claim_from(Q, &req("rt")).await.expect("claim")
    else {
        panic!("a claim past the rate was not refused");
    };
    assert!(allowed > now_ms && allowed <= started + WINDOW + 1, "allowed at {allowed}, now {now_ms}");
    assert_eq!(store.get_run("r2").await.expect("get").status, RunStatus::Queued);
    // A waiter sleeps until then: the run comes after the window, with a
    // handful of claims sent (a polling waiter would send hundreds).
    let mut waiter = Waiter::new(&store).await.expect("waiter");
    let before = common::scripts_sent(&mut raw).await;
    let got = waiter.claim(&req("rt"), Duration::from_secs(30)).await.expect("wait").expect("a run");
    let sent = common::scripts_sent(&mut raw).await - before;
    assert_eq!(got.run_id, "r2");
    assert!(claimed_ms(&store, "r2").await >= allowed - 1, "claimed before the window ended");
    assert!(sent <= 4, "the waiter sent {sent} scripts while the rate held it");
    // Without the limit, everything left is claimable at once.
    let off = LimitSettings { rate: Some(None), ..Default::default() };
    assert_eq!(store.set_limits(Q, &off).await.expect("remove").rate, None);
    claim(&store).await.expect("fourth");
    claim(&store).await.expect("fifth");
}

/// Four Workers of concurrency 2 over 24 runs at 4 claims per 400 ms. Over
/// the whole history (each run's claim time on the server's clock), fixed
/// windows hold: any 2N + 1 consecutive claims span more than a window (a
/// window's N plus the next one's N at most), and the whole takes at least
/// (runs / N - 1) windows. Every run is handled once.
async fn many_workers_keep_the_rate_over_the_whole_history() {
    const N: usize = 4;
    const WINDOW: i64 = 400;
    const RUNS: usize = 24;
    let (_redis, store) = common::store().await;
    store
        .set_limits(Q, &LimitSettings { rate: rate(N as u32, WINDOW as u64), ..Default::default() })
        .await
        .expect("set");
    let runs: Vec<NewRun> = (0..RUNS).map(|i| run(&format!("r{i:02}"))).collect();
    store.create_runs(&runs).await.expect("create");
    let handled =
        common::run_counting_workers(&store, Q, "rw", (4, 2), Duration::from_secs(10), Duration::ZERO, RUNS).await;
    assert_eq!(handled.len(), RUNS, "every run handled");
    assert!(handled.values().all(|&n| n == 1), "each run handled once: {handled:?}");
    let mut times = Vec::new();
    for r in &runs {
        let got = store.get_run(&r.run_id).await.expect("get");
        assert_eq!(got.dispatch_attempts, 1, "{} claimed again", r.run_id);
        times.push(claimed_ms(&store, &r.run_id).await);
    }
    times.sort();
    for span in times.windows(2 * N + 1) {
        assert!(span[2 * N] - span[0] > WINDOW - 2, "{} claims within {} ms: {span:?}", 2 * N + 1, WINDOW);
    }
    let least = (RUNS / N - 1) as i64 * WINDOW;
    assert!(times[RUNS - 1] - times[0] >= least - 2 * (RUNS / N) as i64, "claims too fast for the rate: {times:?}");
}

async fn a_group_rate_holds_its_group_and_not_the_others() {
    const WINDOW: u64 = 1000;
    let (_redis, store) = common::store().await;
    let groups =
        GroupSettings { group_by: Some(Some(GroupBy::ConversationId)), concurrency: Some(10), ..Default::default() };
    store.set_groups(Q, &groups).await.expect("groups");
    store.set_limits(Q, &LimitSettings { group_rate: rate(2, WINDOW), ..Default::default() }).await.expect("limits");
    let mut batch: Vec<NewRun> = (0..4).map(|i| run(&format!("a{i}")).conversation("A").priority(5)).collect();
    batch.extend((0..2).map(|i| run(&format!("b{i}")).conversation("B")));
    store.create_runs(&batch).await.expect("create");
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(claim(&store).await.expect("a run").run_id);
    }
    // A's two, then B's two: A's rate holds its other runs back, B's are not behind them.
    assert_eq!(got, ["a0", "a1", "b0", "b1"]);
    let ClaimOutcome::Empty { next_due_ms: Some(due), now_ms } = store.claim_from(Q, &req("rt")).await.expect("claim")
    else {
        panic!("A's window is full: nothing is claimable");
    };
    assert!(due > now_ms && due <= now_ms + WINDOW as i64, "due {due}, now {now_ms}");
    // At the window's end the claim that finds it due lets A's next runs in.
    common::until_server_passes(&store, due).await;
    assert_eq!(claim(&store).await.expect("A again").run_id, "a2");
    assert_eq!(claim(&store).await.expect("A again").run_id, "a3");
}

async fn caps_refuse_what_is_past_them_and_write_nothing() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let groups = GroupSettings { group_by: Some(Some(GroupBy::ConversationId)), ..Default::default() };
    store.set_groups(Q, &groups).await.expect("groups");
    // Runs queued before the first cap are counted when it is set.
    store
        .create_runs(&[run("w1-a").workspace("w1").conversation("c1"), run("w2-a").workspace("w2")])
        .await
        .expect("create");
    let caps = LimitSettings {
        cap: Some(Some(5)),
        group_cap: Some(Some(2)),
        workspace_cap: Some(Some(2)),
        ..Default::default()
    };
    let shown = store.set_limits(Q, &caps).await.expect("caps");
    assert_eq!((shown.cap, shown.group_cap, shown.workspace_cap), (Some(5), Some(2), Some(2)));
    store.create_run(&run("w1-b").workspace("w1").conversation("c2")).await.expect("w1's second");
    let refused = |what: &str, err: Error| {
        assert!(matches!(&err, Error::QueueFull(m) if m.contains(what)), "{what}: {err:?}");
    };
    let before = common::keyspace(&mut raw).await;
    // The workspace is full; a batch with one run too many is refused whole.
    refused("workspace w1", store.create_run(&run("w1-c").workspace("w1")).await.expect_err("w1 full"));
    let batch = [run("x1").conversation("c3"), run("x2").workspace("w1")];
    refused("workspace w1", store.create_runs(&batch).await.expect_err("batch"));
    // The group: c1 holds one; two more are one too many (the queue has room for them).
    let batch = [run("c1-b").conversation("c1"), run("c1-c").conversation("c1")];
    refused("group c1", store.create_runs(&batch).await.expect_err("group full"));
    assert_eq!(common::keyspace(&mut raw).await, before, "a refused create wrote something");
    // A run that exists already is returned, not counted again.
    assert_eq!(store.create_run(&run("w1-a").workspace("w1")).await.expect("existing").run_id, "w1-a");
    store.create_runs(&[run("other"), run("other2")]).await.expect("the queue's fourth and fifth");
    let before = common::keyspace(&mut raw).await;
    refused("queue chat", store.create_run(&run("fifth")).await.expect_err("queue full"));
    assert_eq!(common::keyspace(&mut raw).await, before, "a refused create wrote something");
    // A claim takes one out: room for one more.
    let held = claim(&store).await.expect("a run");
    store.create_run(&run("fifth")).await.expect("room after a claim");
    refused("queue chat", store.create_run(&run("sixth")).await.expect_err("full again"));
    // A release puts it back: full, and a cancel of a queued run makes room.
    store
        .release_claim(&held.run_id, held.claim_token.as_deref().expect("token"), &Release::default())
        .await
        .expect("release");
    store.request_cancel("fifth", None).await.expect("cancel");
    store.request_cancel("other", None).await.expect("cancel");
    store.create_run(&run("sixth")).await.expect("room after the cancels");
    // A lapsed lease counts its run back in as it is taken back (and out as it is claimed again).
    let short = req("crashed").lease(Duration::from_millis(300));
    let lost = store.claim_next_run(&short).await.expect("claim").expect("a run");
    store.create_run(&run("seventh")).await.expect("room while it is held");
    common::until_server_passes(&store, lost.claim_lease_expires_at_ms.expect("lease")).await;
    let retaken = claim(&store).await.expect("a run");
    assert_eq!(retaken.run_id, lost.run_id, "the lapsed run first");
    refused("queue chat", store.create_run(&run("eighth")).await.expect_err("full: the retaken run was counted in"));
    // Without caps nothing is counted, and anything goes.
    let off = LimitSettings { cap: Some(None), group_cap: Some(None), workspace_cap: Some(None), ..Default::default() };
    store.set_limits(Q, &off).await.expect("no caps");
    store
        .create_runs(&(0..5).map(|i| run(&format!("more{i}")).workspace("w1")).collect::<Vec<_>>())
        .await
        .expect("uncapped");
    let count: Option<String> =
        redis::cmd("TYPE").arg(store.queue_keys(Q).queued_count()).query_async(&mut raw).await.ok();
    assert_eq!(count.as_deref(), Some("none"), "the counts go with the last cap");
}

async fn refused_limits_write_nothing() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    store.create_run(&run("a")).await.expect("create");
    store.declare_partitions("wide", 4).await.expect("partitions");
    let before = common::keyspace(&mut raw).await;
    let bad = [
        (Q, LimitSettings { rate: rate(0, 1000), ..Default::default() }),
        (Q, LimitSettings { rate: rate(5, 0), ..Default::default() }),
        (Q, LimitSettings { group_rate: rate(5, 90_000_000), ..Default::default() }),
        (Q, LimitSettings { cap: Some(Some(0)), ..Default::default() }),
        (Q, LimitSettings { workspace_cap: Some(Some(2_000_000_000)), ..Default::default() }),
        ("bad{queue}", LimitSettings { cap: Some(Some(1)), ..Default::default() }),
        // A partitioned queue's cap is split over its partitions: 4 at least.
        ("wide", LimitSettings { cap: Some(Some(3)), ..Default::default() }),
    ];
    for (queue, settings) in &bad {
        let err = store.set_limits(queue, settings).await.expect_err("refused");
        assert!(matches!(err, Error::Invalid(_)), "{settings:?}: {err:?}");
    }
    assert_eq!(common::keyspace(&mut raw).await, before, "a refused setting wrote something");
    // Split, the partitions' shares add up to the limit.
    let wide = LimitSettings { cap: Some(Some(10)), rate: rate(6, 1000), ..Default::default() };
    let shown = store.set_limits("wide", &wide).await.expect("split");
    assert_eq!((shown.cap, shown.rate.map(|r| r.max)), (Some(10), Some(6)));
}

/// Groups' own rate limits and caps take the place of the queue's for
/// them: a group with a higher rate gets more claims in the window, one at 0
/// gets none (and its runs wait, blocking no one), and dropping an override
/// puts the group back on the queue's limit at once. Caps likewise: a group's
/// own cap lets more of its runs in, 0 refuses every one, and a refused
/// create writes nothing. `queue_limits` shows them, sorted.
async fn a_groups_own_rate_and_cap_take_the_place_of_the_queues() {
    const WINDOW: u64 = 60_000;
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let groups =
        GroupSettings { group_by: Some(Some(GroupBy::ConversationId)), concurrency: Some(10), ..Default::default() };
    store.set_groups(Q, &groups).await.expect("groups");
    let window = Duration::from_millis(WINDOW);
    let limits = LimitSettings {
        group_rate: rate(1, WINDOW),
        group_rate_overrides: vec![
            ("vip".into(), Some(RateLimit { max: 3, window })),
            ("held".into(), Some(RateLimit { max: 0, window })),
        ],
        group_cap: Some(Some(4)),
        group_cap_overrides: vec![("vip".into(), Some(6)), ("closed".into(), Some(0))],
        ..Default::default()
    };
    let shown = store.set_limits(Q, &limits).await.expect("limits");
    assert_eq!(
        shown.group_rate_limits,
        vec![("held".to_string(), RateLimit { max: 0, window }), ("vip".to_string(), RateLimit { max: 3, window })]
    );
    assert_eq!(shown.group_caps, vec![("closed".to_string(), 0), ("vip".to_string(), 6)]);
    assert_eq!(store.queue_limits(Q).await.expect("show"), shown);
    let conv = |id: &str, c: &str| run(id).conversation(c);
    let mut batch: Vec<NewRun> = (0..4).map(|i| conv(&format!("a{i}"), "A")).collect();
    batch.extend((0..5).map(|i| conv(&format!("v{i}"), "vip")));
    batch.extend((0..2).map(|i| conv(&format!("h{i}"), "held")));
    store.create_runs(&batch).await.expect("create: vip's own cap lets five in");

    // Caps: the queue's 4 for A, vip's own 6, nothing at all for closed.
    let before = common::keyspace(&mut raw).await;
    for (refused, what) in [
        (vec![conv("a4", "A")], "group A"),
        (vec![conv("v5", "vip"), conv("v6", "vip")], "group vip"),
        (vec![conv("x0", "closed")], "group closed"),
    ] {
        let err = store.create_runs(&refused).await.expect_err(what);
        assert!(matches!(&err, Error::QueueFull(m) if m.contains(what)), "{what}: {err:?}");
    }
    assert_eq!(common::keyspace(&mut raw).await, before, "a refused create wrote something");
    store.create_run(&conv("v5", "vip")).await.expect("vip's sixth");

    // Rates: one of A in the window, three of vip, none of held.
    let mut got = Vec::new();
    while let Some(r) = claim(&store).await {
        got.push(r.run_id);
        assert!(got.len() <= 10, "claims past every rate: {got:?}");
    }
    got.sort();
    assert_eq!(got, ["a0", "v0", "v1", "v2"]);
    // held's own limit dropped: the queue's (one per window) holds for it now, at once.
    let drop = LimitSettings { group_rate_overrides: vec![("held".into(), None)], ..Default::default() };
    let shown = store.set_limits(Q, &drop).await.expect("drop held's own");
    assert_eq!(shown.group_rate_limits, vec![("vip".to_string(), RateLimit { max: 3, window })]);
    assert_eq!(claim(&store).await.expect("held's first").run_id, "h0");
    assert!(claim(&store).await.is_none(), "held is at the queue's rate now");
    // Without the queue's group rate, only vip's own holds: A's and held's runs are free.
    let base_off = LimitSettings { group_rate: Some(None), ..Default::default() };
    assert_eq!(store.set_limits(Q, &base_off).await.expect("no base").group_rate, None);
    let mut rest = Vec::new();
    while let Some(r) = claim(&store).await {
        rest.push(r.run_id);
        assert!(rest.len() <= 10, "too many: {rest:?}");
    }
    rest.sort();
    assert_eq!(rest, ["a1", "a2", "a3", "h1"], "vip's own rate still holds v3..v5");
    // Every override dropped: nothing of them is left in the keyspace.
    let all_off = LimitSettings {
        group_rate_overrides: vec![("vip".into(), None)],
        group_cap_overrides: vec![("vip".into(), None), ("closed".into(), None)],
        group_cap: Some(None),
        ..Default::default()
    };
    let shown = store.set_limits(Q, &all_off).await.expect("all off");
    assert!(shown.group_rate_limits.is_empty() && shown.group_caps.is_empty(), "{shown:?}");
    let keys = store.queue_keys(Q);
    for key in [keys.group_rate_limits(), keys.group_caps()] {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut raw).await.expect("TYPE");
        assert_eq!(kind, "none", "{key}");
    }
    let marks: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(keys.meta())
        .arg(&["group_rate_overrides", "group_cap_overrides", "limits"])
        .query_async(&mut raw)
        .await
        .expect("HMGET meta");
    assert_eq!(marks, [None, None, None], "no mark left once nothing is set");
    assert_eq!(claim(&store).await.expect("vip is free").run_id, "v3");
}

async fn refused_overrides_write_nothing() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    store.create_run(&run("a")).await.expect("create");
    let before = common::keyspace(&mut raw).await;
    let second = Duration::from_secs(1);
    let bad = [
        LimitSettings { group_rate_overrides: vec![("g{1}".into(), None)], ..Default::default() },
        LimitSettings {
            group_rate_overrides: vec![("g".into(), Some(RateLimit { max: 1, window: Duration::ZERO }))],
            ..Default::default()
        },
        LimitSettings {
            group_rate_overrides: vec![("g".into(), Some(RateLimit { max: 2_000_000_000, window: second }))],
            ..Default::default()
        },
        LimitSettings { group_cap_overrides: vec![("".into(), Some(1))], ..Default::default() },
        LimitSettings { group_cap_overrides: vec![("g".into(), Some(2_000_000_000))], ..Default::default() },
        // A good override beside a bad one: the whole call is refused.
        LimitSettings {
            group_cap_overrides: vec![("ok".into(), Some(1)), ("bad\ngroup".into(), Some(1))],
            ..Default::default()
        },
        LimitSettings {
            group_cap_overrides: (0..1001).map(|i| (format!("g{i}"), Some(1))).collect(),
            ..Default::default()
        },
    ];
    for settings in &bad {
        let err = store.set_limits(Q, settings).await.expect_err("refused");
        assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    }
    assert_eq!(common::keyspace(&mut raw).await, before, "a refused override wrote something");
}

/// The inner commands of a create and a claim, with the queue's name
/// replaced, so runs of two queues compare (single server: MONITOR).
async fn create_and_claim_commands(store: &Store, port: &str, queue: &str) -> Vec<(String, String)> {
    let recorder = common::monitor::Monitor::start(&format!("127.0.0.1:{port}")).await;
    let new = |i: u32| NewRun::new(format!("{queue}-r{i}"), "agent").queue(queue).conversation("A");
    store.create_runs(&[new(1), new(2)]).await.expect("create");
    store.claim_next_run(&ClaimRequest::new("rt").queue(queue)).await.expect("claim").expect("a run");
    common::monitor::commands(&recorder.stop().await)
        .into_iter()
        .filter(|c| c.is_inside_script())
        .map(|c| {
            let key = c.args.get(1).cloned().unwrap_or_default().replace(queue, "Q");
            // A claim's receipt is named by its random token.
            let key = key.split("receipt:").next().unwrap_or_default().to_string();
            (c.args[0].to_ascii_uppercase(), key)
        })
        .collect()
}

/// A queue without overrides runs the commands it ran before they existed:
/// the same as a queue whose overrides were set and dropped, and none of
/// them reads the override hashes; a queue with an override (of another
/// group) reads them.
#[tokio::test]
async fn a_queue_without_overrides_runs_the_same_commands() {
    let (redis, store) = common::store().await;
    let port = redis.url.trim_end_matches('/').rsplit(':').next().expect("port").to_string();
    let limits = LimitSettings { group_rate: rate(5, 60_000), group_cap: Some(Some(10)), ..Default::default() };
    let groups = GroupSettings { group_by: Some(Some(GroupBy::ConversationId)), ..Default::default() };
    for queue in ["plain", "dropped", "other"] {
        store.set_groups(queue, &groups).await.expect("groups");
        store.set_limits(queue, &limits).await.expect("limits");
        // Registered and warm: the first create of a queue registers it.
        let warm = NewRun::new(format!("{queue}-warm"), "agent").queue(queue).status(RunStatus::Running);
        store.create_run(&warm).await.expect("warm");
    }
    let some = LimitSettings {
        group_rate_overrides: vec![("B".into(), Some(RateLimit { max: 1, window: Duration::from_secs(1) }))],
        group_cap_overrides: vec![("B".into(), Some(1))],
        ..Default::default()
    };
    let none = LimitSettings {
        group_rate_overrides: vec![("B".into(), None)],
        group_cap_overrides: vec![("B".into(), None)],
        ..Default::default()
    };
    store.set_limits("dropped", &some).await.expect("set");
    store.set_limits("dropped", &none).await.expect("drop");
    store.set_limits("other", &some).await.expect("set");
    let plain = create_and_claim_commands(&store, &port, "plain").await;
    let dropped = create_and_claim_commands(&store, &port, "dropped").await;
    let other = create_and_claim_commands(&store, &port, "other").await;
    let reads_overrides = |cmds: &[(String, String)]| {
        cmds.iter().any(|(_, k)| k.ends_with(":group-rate-limits") || k.ends_with(":group-caps"))
    };
    assert!(plain.len() > 10, "recorded too little: {plain:?}");
    assert!(!reads_overrides(&plain), "{plain:?}");
    assert_eq!(dropped, plain, "a queue whose overrides were dropped runs other commands");
    assert!(reads_overrides(&other), "an override is read where one is set: {other:?}");
}

backend_tests!(
    a_groups_own_rate_and_cap_take_the_place_of_the_queues,
    refused_overrides_write_nothing,
    a_claim_past_the_rate_answers_when_the_next_is_allowed,
    many_workers_keep_the_rate_over_the_whole_history,
    a_group_rate_holds_its_group_and_not_the_others,
    caps_refuse_what_is_past_them_and_write_nothing,
    refused_limits_write_nothing,
);
