use crate::common;

// list_runs (cursor paging by id, scope filters, statuses, several queues) and
// page_run_events (forward and backward cursors), against the seed's semantics.

use std::time::Duration;

use runledger::*;
use serde_json::json;

fn filter(limit: usize) -> RunFilter {
    RunFilter { limit, ..Default::default() }
}

async fn list(store: &Store, f: &RunFilter) -> RunPage {
    store.list_runs(f).await.unwrap_or_else(|e| panic!("list_runs {f:?}: {e}"))
}

/// The creation ordinal a test run's name carries: `r12` -> 12, `c` -> 3.
/// Run ids (`id`) are clock * 4096 + queue number, so tests compare these.
fn ordinal(run_id: &str) -> i64 {
    match run_id.strip_prefix('r').and_then(|n| n.parse().ok()) {
        Some(n) => n,
        None if run_id.len() == 1 => i64::from(run_id.as_bytes()[0] - b'a') + 1,
        None => panic!("run id {run_id} carries no ordinal"),
    }
}

fn ids(page: &RunPage) -> Vec<i64> {
    page.items.iter().map(|r| ordinal(&r.run_id)).collect()
}

/// The `id` of a run, for cursors.
async fn id_of(store: &Store, run_id: &str) -> i64 {
    store.get_run(run_id).await.unwrap_or_else(|e| panic!("get {run_id}: {e}")).id
}

fn run_ids(page: &RunPage) -> Vec<&str> {
    page.items.iter().map(|r| r.run_id.as_str()).collect()
}

/// Walks every page of a filter with before_id cursors; checks the cursor rules on the way.
async fn walk(store: &Store, mut f: RunFilter) -> Vec<i64> {
    let mut all = Vec::new();
    for _ in 0..1000 {
        let page = list(store, &f).await;
        assert!(page.items.len() <= f.limit.clamp(1, 100));
        if page.has_more {
            assert_eq!(page.items.len(), f.limit.clamp(1, 100), "a page with more after it is full");
            assert_eq!(page.next_cursor, page.items.last().map(|r| r.id), "next_cursor is the last id");
        } else {
            assert_eq!(page.next_cursor, None, "no cursor on the last page");
        }
        all.extend(ids(&page));
        match page.next_cursor {
            Some(c) => f.before_id = Some(c),
            None => return all,
        }
    }
    panic!("paging did not end");
}

async fn create_many(store: &Store, runs: Vec<NewRun>) -> Vec<Run> {
    let mut out = Vec::new();
    for chunk in runs.chunks(500) {
        out.extend(store.create_runs(chunk).await.expect("create_runs"));
    }
    out
}

async fn pages_newest_first_with_before_id_cursor() {
    let (_redis, store) = common::store().await;
    create_many(&store, (1..=25).map(|i| NewRun::new(format!("r{i}"), "agent").queue("q")).collect()).await;

    let p1 = list(&store, &filter(10)).await;
    assert_eq!(ids(&p1), (16..=25).rev().collect::<Vec<_>>());
    assert_eq!(run_ids(&p1)[0], "r25");
    assert!(p1.has_more);
    assert_eq!(p1.next_cursor, Some(id_of(&store, "r16").await));

    let p2 = list(&store, &RunFilter { before_id: p1.next_cursor, ..filter(10) }).await;
    assert_eq!(ids(&p2), (6..=15).rev().collect::<Vec<_>>());
    assert!(p2.has_more);
    assert_eq!(p2.next_cursor, Some(id_of(&store, "r6").await));

    let p3 = list(&store, &RunFilter { before_id: p2.next_cursor, ..filter(10) }).await;
    assert_eq!(ids(&p3), (1..=5).rev().collect::<Vec<_>>());
    assert!(!p3.has_more);
    assert_eq!(p3.next_cursor, None);

    // Exactly `limit` left: no more, no cursor (the seed fetches limit + 1).
    let exact = list(&store, &RunFilter { before_id: Some(id_of(&store, "r11").await), ..filter(10) }).await;
    assert_eq!(ids(&exact), (1..=10).rev().collect::<Vec<_>>());
    assert!(!exact.has_more);
    assert_eq!(exact.next_cursor, None);
    // Before the first id: empty.
    let empty = list(&store, &RunFilter { before_id: Some(id_of(&store, "r1").await), ..filter(10) }).await;
    assert!(empty.items.is_empty() && !empty.has_more && empty.next_cursor.is_none());
    // limit 0 means 1, like the seed's clamp.
    let one = list(&store, &filter(0)).await;
    assert_eq!(ids(&one), [25]);
    assert!(one.has_more);
    assert_eq!(walk(&store, filter(7)).await, (1..=25).rev().collect::<Vec<_>>());
}

async fn limit_is_capped_at_100() {
    let (_redis, store) = common::store().await;
    create_many(&store, (1..=130).map(|i| NewRun::new(format!("r{i}"), "agent").queue("q")).collect()).await;
    let page = list(&store, &filter(1000)).await;
    assert_eq!(page.items.len(), 100);
    assert!(page.has_more);
    assert_eq!(page.next_cursor, Some(id_of(&store, "r31").await));
    let rest = list(&store, &RunFilter { before_id: page.next_cursor, ..filter(1000) }).await;
    assert_eq!(ids(&rest), (1..=30).rev().collect::<Vec<_>>());
    assert!(!rest.has_more);
}

struct Spec {
    run_id: &'static str,
    conversation: Option<&'static str>,
    bot: Option<&'static str>,
    workspace: Option<&'static str>,
    thread: Option<&'static str>,
}

const SPECS: &[Spec] = &[
    Spec { run_id: "a", conversation: Some("c1"), bot: Some("b1"), workspace: Some("w1"), thread: Some("t1") },
    Spec { run_id: "b", conversation: Some("c1"), bot: Some("b1"), workspace: Some("w1"), thread: None },
    Spec { run_id: "c", conversation: Some("c2"), bot: Some("b1"), workspace: Some("w2"), thread: Some("t1") },
    Spec { run_id: "d", conversation: Some("c2"), bot: Some("b2"), workspace: Some("w1"), thread: Some("t2") },
    Spec { run_id: "e", conversation: None, bot: Some("b2"), workspace: None, thread: None },
    Spec { run_id: "f", conversation: Some("c1"), bot: Some("b2"), workspace: Some("w2"), thread: Some("t1") },
    Spec { run_id: "g", conversation: None, bot: None, workspace: None, thread: Some("t2") },
    Spec { run_id: "h", conversation: Some("c1"), bot: Some("b1"), workspace: Some("w1"), thread: Some("t1") },
];

async fn create_specs(store: &Store) {
    for s in SPECS {
        let mut run = NewRun::new(s.run_id, "agent").queue("q");
        run.conversation_id = s.conversation.map(Into::into);
        run.bot_id = s.bot.map(Into::into);
        run.workspace_id = s.workspace.map(Into::into);
        run.thread_id = s.thread.map(Into::into);
        store.create_run(&run).await.expect("create");
    }
}

/// The seed's filter on the specs, newest first.
fn expected(keep: impl Fn(&Spec) -> bool) -> Vec<&'static str> {
    SPECS.iter().rev().filter(|s| keep(s)).map(|s| s.run_id).collect()
}

async fn scope_filters_match_the_seed() {
    let (_redis, store) = common::store().await;
    create_specs(&store).await;
    let f = |f: RunFilter| RunFilter { limit: 50, ..f };
    let cases: Vec<(RunFilter, Vec<&str>)> = vec![
        (
            f(RunFilter { conversation_id: Some("c1".into()), ..Default::default() }),
            expected(|s| s.conversation == Some("c1")),
        ),
        (f(RunFilter { bot_id: Some("b2".into()), ..Default::default() }), expected(|s| s.bot == Some("b2"))),
        (
            f(RunFilter { workspace_id: Some("w1".into()), ..Default::default() }),
            expected(|s| s.workspace == Some("w1")),
        ),
        (
            f(RunFilter { thread_id: Some("t1".into()), strict_thread: true, ..Default::default() }),
            expected(|s| s.thread == Some("t1")),
        ),
        // strict_thread with no thread: only runs without a thread.
        (f(RunFilter { thread_id: None, strict_thread: true, ..Default::default() }), expected(|s| s.thread.is_none())),
        // Without strict_thread the seed ignores thread_id.
        (f(RunFilter { thread_id: Some("t1".into()), strict_thread: false, ..Default::default() }), expected(|_| true)),
        (
            f(RunFilter { conversation_id: Some("c1".into()), bot_id: Some("b1".into()), ..Default::default() }),
            expected(|s| s.conversation == Some("c1") && s.bot == Some("b1")),
        ),
        (
            f(RunFilter {
                conversation_id: Some("c1".into()),
                thread_id: None,
                strict_thread: true,
                ..Default::default()
            }),
            expected(|s| s.conversation == Some("c1") && s.thread.is_none()),
        ),
        (
            f(RunFilter {
                bot_id: Some("b1".into()),
                workspace_id: Some("w1".into()),
                thread_id: Some("t1".into()),
                strict_thread: true,
                ..Default::default()
            }),
            expected(|s| s.bot == Some("b1") && s.workspace == Some("w1") && s.thread == Some("t1")),
        ),
        (f(RunFilter { conversation_id: Some("nobody".into()), ..Default::default() }), vec![]),
        (f(RunFilter::default()), expected(|_| true)),
    ];
    for (flt, want) in cases {
        let page = list(&store, &flt).await;
        assert_eq!(run_ids(&page), want, "filter {flt:?}");
        assert!(!page.has_more);
    }
    // Filtered paging: conversation c1 two at a time.
    let all = walk(&store, RunFilter { conversation_id: Some("c1".into()), ..filter(2) }).await;
    assert_eq!(all, [8, 6, 2, 1]);
    let p = list(&store, &RunFilter { conversation_id: Some("c1".into()), ..filter(2) }).await;
    assert_eq!((run_ids(&p), p.has_more, p.next_cursor), (vec!["h", "f"], true, Some(id_of(&store, "f").await)));
}

async fn status_filter() {
    let (_redis, store) = common::store().await;
    create_specs(&store).await;
    // a, b claimed; a completed; c cancelled while queued; e running.
    let req = ClaimRequest::new("rt").queue("q").lease(Duration::from_secs(60));
    let mut claimed = Vec::new();
    for _ in 0..2 {
        claimed.push(store.claim_next_run(&req).await.expect("claim").expect("claimed"));
    }
    assert_eq!(claimed.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    store
        .finalize_run("a", &Finish::new(RunStatus::Completed), claimed[0].claim_token.as_deref())
        .await
        .expect("finalize a");
    store.request_cancel("c", None).await.expect("cancel c");
    store.create_run(&NewRun::new("direct", "agent").queue("q").status(RunStatus::Running)).await.expect("running");

    let by = |statuses: Vec<RunStatus>| RunFilter { statuses, ..filter(50) };
    assert_eq!(run_ids(&list(&store, &by(vec![RunStatus::Completed])).await), ["a"]);
    assert_eq!(run_ids(&list(&store, &by(vec![RunStatus::Claimed])).await), ["b"]);
    assert_eq!(run_ids(&list(&store, &by(vec![RunStatus::Running])).await), ["direct"]);
    assert_eq!(
        run_ids(&list(&store, &by(vec![RunStatus::Completed, RunStatus::Cancelled, RunStatus::Claimed])).await),
        ["c", "b", "a"]
    );
    assert_eq!(run_ids(&list(&store, &by(vec![RunStatus::Queued])).await), ["h", "g", "f", "e", "d"]);
    assert!(list(&store, &by(vec![RunStatus::Timeout])).await.items.is_empty());
    // Status plus a scope.
    let f = RunFilter { conversation_id: Some("c1".into()), statuses: vec![RunStatus::Queued], ..filter(50) };
    assert_eq!(run_ids(&list(&store, &f).await), ["h", "f"]);
}

async fn sparse_matches_are_found_past_the_scan_budget() {
    let (_redis, store) = common::store().await;
    // The two oldest of 2600 runs are the only completed ones.
    create_many(&store, (1..=2600).map(|i| NewRun::new(format!("r{i}"), "agent").queue("q")).collect()).await;
    for id in ["r1", "r2"] {
        store.finalize_run(id, &Finish::new(RunStatus::Completed), None).await.expect("finalize");
    }
    let page = list(&store, &RunFilter { statuses: vec![RunStatus::Completed], ..filter(10) }).await;
    assert_eq!(run_ids(&page), ["r2", "r1"]);
    assert!(!page.has_more);
    assert_eq!(page.next_cursor, None);
    let page = list(&store, &RunFilter { statuses: vec![RunStatus::Completed], ..filter(1) }).await;
    assert_eq!((run_ids(&page), page.has_more, page.next_cursor), (vec!["r2"], true, Some(id_of(&store, "r2").await)));
    let all = walk(&store, RunFilter { statuses: vec![RunStatus::Queued], ..filter(100) }).await;
    assert_eq!(all.len(), 2598);
    assert!(all.windows(2).all(|w| w[0] > w[1]), "ids strictly descending across pages");
}

async fn two_queues_are_merged_by_id() {
    let (_redis, store) = common::store().await;
    for i in 1..=20 {
        let queue = if i % 3 == 0 { "qb" } else { "qa" };
        let mut run = NewRun::new(format!("r{i}"), "agent").queue(queue);
        if i % 2 == 0 {
            run.conversation_id = Some("even".into());
        }
        store.create_run(&run).await.expect("create");
        // Across queues ids follow creation by the millisecond (see create_run.lua).
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let p = list(&store, &filter(5)).await;
    assert_eq!(ids(&p), [20, 19, 18, 17, 16]);
    assert_eq!(p.items[2].queue_name, "qb");
    assert_eq!(p.items[0].queue_name, "qa");
    assert!(p.has_more);
    assert_eq!(walk(&store, filter(5)).await, (1..=20).rev().collect::<Vec<_>>());
    assert_eq!(walk(&store, filter(3)).await, (1..=20).rev().collect::<Vec<_>>());
    // One queue only.
    let qb = walk(&store, RunFilter { queues: vec!["qb".into()], ..filter(4) }).await;
    assert_eq!(qb, [18, 15, 12, 9, 6, 3]);
    let both = walk(&store, RunFilter { queues: vec!["qb".into(), "qa".into()], ..filter(4) }).await;
    assert_eq!(both, (1..=20).rev().collect::<Vec<_>>());
    // A scope filter over both queues.
    let even = walk(&store, RunFilter { conversation_id: Some("even".into()), ..filter(3) }).await;
    assert_eq!(even, (1..=10).rev().map(|i| i * 2).collect::<Vec<_>>());
    // An unknown queue lists nothing.
    let none = list(&store, &RunFilter { queues: vec!["nope".into()], ..filter(5) }).await;
    assert!(none.items.is_empty() && !none.has_more);
}

// ---- page_run_events ----

async fn run_with_events(store: &Store, run_id: &str, n: i64) {
    store.create_run(&NewRun::new(run_id, "agent").queue("q")).await.expect("create");
    let events: Vec<_> = (1..=n).map(|s| NewEvent::new(s, "step", json!({"s": s}))).collect();
    for chunk in events.chunks(50) {
        store.append_events(run_id, None, chunk).await.expect("append");
    }
}

async fn page(store: &Store, before: Option<i64>, after: Option<i64>, limit: usize, dir: Direction) -> EventPage {
    store
        .page_run_events("r1", before, after, limit, dir)
        .await
        .unwrap_or_else(|e| panic!("page_run_events before={before:?} after={after:?}: {e}"))
}

fn seqs(p: &EventPage) -> Vec<i64> {
    p.items.iter().map(|e| e.sequence).collect()
}

async fn event_pages_forward() {
    let (_redis, store) = common::store().await;
    run_with_events(&store, "r1", 150).await;
    let p1 = page(&store, None, None, 50, Direction::Forward).await;
    assert_eq!(seqs(&p1), (1..=50).collect::<Vec<_>>());
    assert_eq!((p1.next_cursor, p1.prev_cursor, p1.has_more), (Some(50), Some(1), true));
    assert_eq!(p1.items[4].data, json!({"s": 5}));
    assert_eq!(p1.items[4].id, 5);
    assert_eq!(p1.items[4].run_id, "r1");

    let p2 = page(&store, None, p1.next_cursor, 50, Direction::Forward).await;
    assert_eq!(seqs(&p2), (51..=100).collect::<Vec<_>>());
    assert_eq!((p2.next_cursor, p2.prev_cursor, p2.has_more), (Some(100), Some(51), true));
    let p3 = page(&store, None, p2.next_cursor, 50, Direction::Forward).await;
    assert_eq!(seqs(&p3), (101..=150).collect::<Vec<_>>());
    assert_eq!((p3.next_cursor, p3.prev_cursor, p3.has_more), (None, Some(101), false));
    let p4 = page(&store, None, Some(150), 50, Direction::Forward).await;
    assert!(p4.items.is_empty());
    assert_eq!((p4.next_cursor, p4.prev_cursor, p4.has_more), (None, None, false));

    // Limit capped at 100, and at least 1.
    let big = page(&store, None, None, 10_000, Direction::Forward).await;
    assert_eq!(seqs(&big), (1..=100).collect::<Vec<_>>());
    assert_eq!((big.next_cursor, big.has_more), (Some(100), true));
    let one = page(&store, None, None, 0, Direction::Forward).await;
    assert_eq!(seqs(&one), [1]);
    // A window: after 10, before 20.
    let w = page(&store, Some(20), Some(10), 50, Direction::Forward).await;
    assert_eq!(seqs(&w), (11..=19).collect::<Vec<_>>());
    assert_eq!((w.next_cursor, w.prev_cursor, w.has_more), (None, Some(11), false));
    let w = page(&store, Some(20), Some(10), 5, Direction::Forward).await;
    assert_eq!(seqs(&w), (11..=15).collect::<Vec<_>>());
    assert_eq!((w.next_cursor, w.has_more), (Some(15), true));
    // Cursors at and below the start.
    let below = page(&store, None, Some(0), 3, Direction::Forward).await;
    assert_eq!(seqs(&below), [1, 2, 3]);
    let neg = page(&store, None, Some(-5), 3, Direction::Forward).await;
    assert_eq!(seqs(&neg), [1, 2, 3]);
}

async fn event_pages_backward() {
    let (_redis, store) = common::store().await;
    run_with_events(&store, "r1", 150).await;
    let p1 = page(&store, None, None, 50, Direction::Backward).await;
    assert_eq!(seqs(&p1), (101..=150).rev().collect::<Vec<_>>());
    assert_eq!((p1.next_cursor, p1.prev_cursor, p1.has_more), (Some(101), Some(150), true));
    let p2 = page(&store, p1.next_cursor, None, 50, Direction::Backward).await;
    assert_eq!(seqs(&p2), (51..=100).rev().collect::<Vec<_>>());
    assert_eq!((p2.next_cursor, p2.prev_cursor, p2.has_more), (Some(51), Some(100), true));
    let p3 = page(&store, p2.next_cursor, None, 50, Direction::Backward).await;
    assert_eq!(seqs(&p3), (1..=50).rev().collect::<Vec<_>>());
    assert_eq!((p3.next_cursor, p3.prev_cursor, p3.has_more), (None, Some(50), false));
    for before in [1, 0, -3] {
        let p = page(&store, Some(before), None, 50, Direction::Backward).await;
        assert!(p.items.is_empty(), "before {before}");
        assert_eq!((p.next_cursor, p.prev_cursor, p.has_more), (None, None, false));
    }
    let big = page(&store, None, None, 500, Direction::Backward).await;
    assert_eq!(seqs(&big), (51..=150).rev().collect::<Vec<_>>());
    assert_eq!((big.next_cursor, big.has_more), (Some(51), true));
    let w = page(&store, Some(20), Some(10), 4, Direction::Backward).await;
    assert_eq!(seqs(&w), [19, 18, 17, 16]);
    assert_eq!((w.next_cursor, w.prev_cursor, w.has_more), (Some(16), Some(19), true));
    let w = page(&store, w.next_cursor, Some(10), 4, Direction::Backward).await;
    assert_eq!(seqs(&w), [15, 14, 13, 12]);
    assert!(w.has_more);
    let w = page(&store, w.next_cursor, Some(10), 4, Direction::Backward).await;
    assert_eq!(seqs(&w), [11]);
    assert_eq!((w.next_cursor, w.prev_cursor, w.has_more), (None, Some(11), false));
}

async fn event_pages_of_a_run_without_events() {
    let (_redis, store) = common::store().await;
    store.create_run(&NewRun::new("r1", "agent").queue("q")).await.expect("create");
    for dir in [Direction::Forward, Direction::Backward] {
        let p = page(&store, None, None, 50, dir).await;
        assert!(p.items.is_empty());
        assert_eq!((p.next_cursor, p.prev_cursor, p.has_more), (None, None, false));
    }
    // With gaps the cursors are the sequences themselves.
    store
        .append_events(
            "r1",
            None,
            &[NewEvent::new(2, "a", json!({})), NewEvent::new(5, "a", json!({})), NewEvent::new(9, "a", json!({}))],
        )
        .await
        .expect("append");
    let p = page(&store, None, None, 2, Direction::Forward).await;
    assert_eq!((seqs(&p), p.next_cursor, p.has_more), (vec![2, 5], Some(5), true));
    let p = page(&store, None, Some(5), 2, Direction::Forward).await;
    assert_eq!((seqs(&p), p.next_cursor, p.has_more), (vec![9], None, false));
    let p = page(&store, Some(9), None, 5, Direction::Backward).await;
    assert_eq!((seqs(&p), p.prev_cursor), (vec![5, 2], Some(5)));
}

// Every case above, on a server of its own and on the test cluster.
backend_tests!(
    pages_newest_first_with_before_id_cursor,
    limit_is_capped_at_100,
    scope_filters_match_the_seed,
    status_filter,
    sparse_matches_are_found_past_the_scan_budget,
    two_queues_are_merged_by_id,
    event_pages_forward,
    event_pages_backward,
    event_pages_of_a_run_without_events,
);
