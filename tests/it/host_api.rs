//! LangBot's host API beyond the seed: the `created` status, scope filters
//! on claims, and list_runs' runner/binding filters and total. Every case
//! runs on a private redis-server and on the local 6-node cluster.

use crate::common;

use std::time::Duration;

use runledger::*;

const Q: &str = "q";

fn run(id: &str) -> NewRun {
    NewRun::new(id, "agent").queue(Q)
}

fn req(runtime: &str) -> ClaimRequest {
    ClaimRequest::new(runtime).queue(Q).lease(Duration::from_secs(60))
}

async fn claim(store: &Store, request: &ClaimRequest) -> Option<String> {
    store.claim_next_run(request).await.expect("claim").map(|r| r.run_id)
}

async fn create(store: &Store, new: NewRun) {
    store.create_run(&new).await.unwrap_or_else(|e| panic!("create {}: {e}", new.run_id));
}

async fn status_of(store: &Store, run_id: &str) -> RunStatus {
    store.get_run(run_id).await.expect("get").status
}

async fn a_created_run_is_stored_but_never_claimed() {
    let (_redis, store) = common::store().await;
    let created = store.create_run(&run("c1").status(RunStatus::Created)).await.expect("create created");
    assert_eq!(created.status, RunStatus::Created);
    assert_eq!(created.started_at, None);
    assert_eq!(serde_json::to_value(&created).expect("json")["status"], "created");
    create(&store, run("c2").status(RunStatus::Created)).await;
    assert_eq!(claim(&store, &req("rt")).await, None, "a created run is not claimable");
    assert_eq!(claim(&store, &ClaimRequest::new("rt")).await, None, "not from every queue either");
    // Idempotent: creating it again returns it as stored.
    assert_eq!(store.create_run(&run("c1")).await.expect("again").status, RunStatus::Created);
    let stats = store.queue_stats(Q, 10).await.expect("stats");
    assert_eq!((stats.queued, stats.claimed, stats.running), (0, 0, 0));
    // Listed and read like any run.
    let page = store
        .list_runs(&RunFilter { statuses: vec![RunStatus::Created], limit: 10, ..Default::default() })
        .await
        .expect("list");
    let ids: Vec<&str> = page.items.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, ["c2", "c1"]);
    assert_eq!(page.total, 2);
    // It ends: finalize from created, and cancel (at once: nobody holds it).
    let done = store.finalize_run("c1", &Finish::new(RunStatus::Completed), None).await.expect("finalize");
    assert_eq!(done.status, RunStatus::Completed);
    assert!(done.finished_at.is_some());
    let cancelled = store.request_cancel("c2", None).await.expect("cancel");
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    assert!(cancelled.cancel_requested_at.is_some());
    assert_eq!(cancelled.status_reason.as_deref(), Some("cancelled while created"));
    // A queued run behind them is claimed as usual.
    create(&store, run("q1")).await;
    assert_eq!(claim(&store, &req("rt")).await.as_deref(), Some("q1"));
}

/// LangBot's stats tests create failed runs directly: a run created with a
/// terminal status is stored as finished (no finished_at, as upstream), is
/// counted by the stats and the queue's finished counters, is never claimed,
/// and stays terminal.
async fn a_run_created_terminal_is_counted_and_never_claimed() {
    let (_redis, store) = common::store().await;
    let t0 = store.server_time_ms().await.expect("time") / 1000;
    for (id, status) in [
        ("f1", RunStatus::Failed),
        ("f2", RunStatus::Failed),
        ("c1", RunStatus::Completed),
        ("x1", RunStatus::Cancelled),
        ("t1", RunStatus::Timeout),
    ] {
        let created =
            store.create_run(&run(id).status(status).deadline_at((t0 + 1) as f64)).await.expect("create terminal");
        assert_eq!((created.status, created.finished_at, created.started_at), (status, None, None), "{id}");
    }
    assert_eq!(claim(&store, &req("rt")).await, None, "a terminal run is never claimable");
    assert_eq!(claim(&store, &ClaimRequest::new("rt")).await, None);
    let stats = store.get_run_stats(t0 - 5, t0 + 5, None).await.expect("run stats");
    assert_eq!(
        (stats.total_count, stats.failed_count, stats.completed_count, stats.cancelled_count, stats.timeout_count),
        (5, 2, 1, 1, 1)
    );
    assert_eq!((stats.success_rate, stats.failure_rate), (Some(0.2), Some(0.6)));
    assert_eq!(stats.avg_duration_seconds, None, "no finished_at: no duration");
    let runners = store.get_runner_stats(t0 - 5, t0 + 5, 10).await.expect("runner stats");
    assert_eq!((runners.len(), runners[0].failed_runs, runners[0].active_runs), (1, 3, 0));
    let queue = store.queue_stats(Q, 10).await.expect("queue stats");
    assert_eq!((queue.queued, queue.claimed, queue.running), (0, 0, 0));
    // Its deadline is not enforced on a run that is over already: the reaper leaves it.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    store.reap(&[Q.to_string()], None).await.expect("reap");
    assert_eq!(status_of(&store, "c1").await, RunStatus::Completed);
    // Terminal stays terminal: the same status again merges, another is a conflict.
    assert!(store.finalize_run("f1", &Finish::new(RunStatus::Failed), None).await.is_ok());
    let err = store.finalize_run("f1", &Finish::new(RunStatus::Completed), None).await.expect_err("conflict");
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
}

async fn an_unknown_status_lists_created() {
    let err = "nope".parse::<RunStatus>().expect_err("unknown status");
    let text = err.to_string();
    assert!(text.contains("Unknown run status"), "{text}");
    assert!(text.contains("created"), "{text}");
    assert_eq!(RunStatus::ALL.len(), 8);
    for status in RunStatus::ALL {
        assert_eq!(status.as_str().parse::<RunStatus>().expect("known"), status);
    }
    assert!(!RunStatus::Created.is_terminal());
}

/// Runs in one queue with scope values; returns nothing, the ids say it all.
async fn scoped_runs(store: &Store) {
    let mut a = run("a").priority(1).conversation("c1").bot("b1").workspace("w1").thread("t1");
    a.binding_id = Some("bind-1".into());
    create(store, a).await;
    create(store, run("b").conversation("c2").bot("b1").workspace("w2")).await;
    create(store, run("c").priority(5).conversation("c1").bot("b2").workspace("w1")).await;
    create(store, run("d").conversation("c1").bot("b1").workspace("w1").thread("t2")).await;
}

async fn claim_scope_filters_pick_the_first_matching_run_in_claim_order() {
    let (_redis, store) = common::store().await;
    scoped_runs(&store).await;
    // Claim order among matches: priority desc (c: 5, a: 1), then oldest (d).
    assert_eq!(claim(&store, &req("rt").conversation("c-none")).await, None);
    assert_eq!(claim(&store, &req("rt").conversation("c1").bot("b1")).await.as_deref(), Some("a"));
    assert_eq!(claim(&store, &req("rt").conversation("c1")).await.as_deref(), Some("c"));
    assert_eq!(claim(&store, &req("rt").workspace("w2")).await.as_deref(), Some("b"));
    assert_eq!(claim(&store, &req("rt").bot("b2")).await, None, "c was claimed already");
    assert_eq!(claim(&store, &req("rt").thread(Some("t1"))).await, None, "a was claimed already");
    // d is left queued by every filter it does not match.
    assert_eq!(status_of(&store, "d").await, RunStatus::Queued);
    assert_eq!(claim(&store, &req("rt").thread(Some("t2"))).await.as_deref(), Some("d"));
}

async fn strict_thread_without_a_thread_means_runs_without_one() {
    let (_redis, store) = common::store().await;
    create(&store, run("threaded").priority(9).thread("t1")).await;
    create(&store, run("plain")).await;
    // A thread without strict_thread is ignored, as in LangBot.
    let loose = ClaimRequest { thread_id: Some("t-other".into()), ..req("rt") };
    assert!(!loose.scoped());
    // strict_thread with no thread: only the run without a thread.
    assert_eq!(claim(&store, &req("rt").strict_thread(true)).await.as_deref(), Some("plain"));
    assert_eq!(claim(&store, &req("rt").thread(None::<String>)).await, None);
    assert_eq!(claim(&store, &req("rt").thread(Some("t2"))).await, None);
    assert_eq!(status_of(&store, "threaded").await, RunStatus::Queued);
    assert_eq!(claim(&store, &loose).await.as_deref(), Some("threaded"));
}

async fn scope_filters_combine_with_runner_filters_and_pins() {
    let (_redis, store) = common::store().await;
    // Two runners (the queue keeps lanes), one run pinned.
    create(&store, NewRun::new("x1", "r1").queue(Q).conversation("c1")).await;
    create(&store, NewRun::new("x2", "r2").queue(Q).conversation("c1").priority(3)).await;
    create(&store, NewRun::new("x3", "r1").queue(Q).conversation("c2").priority(7)).await;
    create(&store, NewRun::new("x4", "r1").queue(Q).conversation("c1").priority(9).requested_runtime("rt-pin")).await;
    let r1 = |rt: &str| req(rt).runner("r1").conversation("c1");
    // rt cannot take the pinned x4; among r1's c1 runs x1 is the one left.
    assert_eq!(claim(&store, &r1("rt")).await.as_deref(), Some("x1"));
    assert_eq!(claim(&store, &r1("rt")).await, None, "x2 is r2's, x3 is c2's");
    assert_eq!(claim(&store, &r1("rt-pin")).await.as_deref(), Some("x4"), "the pinned run, for its runtime");
    assert_eq!(claim(&store, &req("rt").runner("r2").conversation("c2")).await, None);
    assert_eq!(claim(&store, &req("rt").runner("r2").conversation("c1")).await.as_deref(), Some("x2"));
    assert_eq!(status_of(&store, "x3").await, RunStatus::Queued);
    // Without a scope filter the plain claim still takes what is left.
    assert_eq!(claim(&store, &req("rt")).await.as_deref(), Some("x3"));
}

async fn a_filtered_claim_walks_a_bounded_head() {
    let (_redis, store) = common::store().await;
    // 600 runs of another conversation ahead of the one that matches: past
    // the budget of 500 entries, so that claim does not find it.
    let mut batch: Vec<NewRun> = (0..600).map(|i| run(&format!("o{i}")).priority(1).conversation("other")).collect();
    batch.push(run("mine").conversation("c1"));
    store.create_runs(&batch).await.expect("create");
    assert_eq!(claim(&store, &req("rt").conversation("c1")).await, None, "beyond the budget");
    // Once enough runs ahead of it are gone, it is found.
    for _ in 0..200 {
        claim(&store, &req("other-rt").conversation("other")).await.expect("an other run");
    }
    assert_eq!(claim(&store, &req("rt").conversation("c1")).await.as_deref(), Some("mine"));
}

async fn a_filtered_waiter_is_woken_by_its_run_and_does_not_spin() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, run("foreign").conversation("c2")).await;
    let request = req("rt").conversation("c1");
    let mut waiter = Waiter::new(&store).await.expect("waiter");
    // A run that does not match: the wait ends empty, after few claims.
    let before = common::scripts_sent(&mut raw).await;
    let got = waiter.claim(&request, Duration::from_secs(3)).await.expect("wait");
    assert_eq!(got.map(|r| r.run_id), None);
    let sent = common::scripts_sent(&mut raw).await - before;
    // A busy-polling waiter sends thousands in 3 s; wake-ups and the safety poll a handful.
    assert!(sent <= 10, "the filtered waiter sent {sent} claims while nothing matched");
    // A matching run created during the wait is claimed.
    let store2 = store.clone();
    let maker = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        create(&store2, run("mine").conversation("c1")).await;
    });
    let got = waiter.claim(&request, Duration::from_secs(30)).await.expect("wait");
    maker.await.expect("maker");
    assert_eq!(got.map(|r| r.run_id).as_deref(), Some("mine"));
    assert_eq!(status_of(&store, "foreign").await, RunStatus::Queued);
}

async fn list_runs_filters_by_runner_and_binding_with_a_total_on_every_page() {
    let (_redis, store) = common::store().await;
    let mut batch = Vec::new();
    for i in 0..25 {
        let mut r = NewRun::new(format!("r{i}"), if i % 2 == 0 { "even" } else { "odd" }).queue(if i % 3 == 0 {
            "q-a"
        } else {
            "q-b"
        });
        r.binding_id = Some(if i % 5 == 0 { "b5" } else { "b-other" }.into());
        batch.push(r);
    }
    store.create_runs(&batch).await.expect("create");
    let page_through = |filter: RunFilter| {
        let store = store.clone();
        async move {
            let mut ids = Vec::new();
            let mut numbers = Vec::new();
            let mut totals = Vec::new();
            let mut before = None;
            loop {
                let page =
                    store.list_runs(&RunFilter { before_id: before, ..filter.clone() }).await.expect("list_runs");
                ids.extend(page.items.iter().map(|r| r.run_id.clone()));
                numbers.extend(page.items.iter().map(|r| r.id));
                totals.push(page.total);
                if !page.has_more {
                    // Newest id first, across queues and pages, each run once.
                    assert!(numbers.windows(2).all(|w| w[0] > w[1]), "not newest first: {numbers:?}");
                    ids.sort();
                    return (ids, totals);
                }
                before = page.next_cursor;
            }
        }
    };
    let expect = |pred: &dyn Fn(usize) -> bool| -> Vec<String> {
        let mut ids: Vec<String> = (0..25).filter(|i| pred(*i)).map(|i| format!("r{i}")).collect();
        ids.sort();
        ids
    };
    let (ids, totals) = page_through(RunFilter { limit: 4, ..Default::default() }).await;
    assert_eq!(ids, expect(&|_| true));
    assert!(totals.iter().all(|t| *t == 25), "{totals:?}");
    assert_eq!(totals.len(), 7);
    let (ids, totals) =
        page_through(RunFilter { runner_id: Some("even".into()), limit: 3, ..Default::default() }).await;
    assert_eq!(ids, expect(&|i| i % 2 == 0));
    assert!(totals.iter().all(|t| *t == 13), "{totals:?}");
    let (ids, totals) = page_through(RunFilter { binding_id: Some("b5".into()), limit: 2, ..Default::default() }).await;
    assert_eq!(ids, expect(&|i| i % 5 == 0));
    assert!(totals.iter().all(|t| *t == 5), "{totals:?}");
    let (ids, totals) = page_through(RunFilter {
        runner_id: Some("odd".into()),
        binding_id: Some("b5".into()),
        queues: vec!["q-b".into()],
        limit: 1,
        ..Default::default()
    })
    .await;
    assert_eq!(ids, expect(&|i| i % 2 == 1 && i % 5 == 0 && i % 3 != 0));
    assert!(totals.iter().all(|t| *t == ids.len() as u64), "{totals:?}");
    // A status filter counts through the index; nothing matches: total 0.
    let page = store
        .list_runs(&RunFilter { statuses: vec![RunStatus::Completed], limit: 10, ..Default::default() })
        .await
        .expect("list");
    assert_eq!((page.items.len(), page.total), (0, 0));
    store.finalize_run("r4", &Finish::new(RunStatus::Completed), None).await.expect("finish");
    let page = store
        .list_runs(&RunFilter {
            statuses: vec![RunStatus::Completed],
            runner_id: Some("even".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!((page.items.len(), page.total), (1, 1));
    // Unknown runner: nothing, total 0. A bad runner id: one clear error.
    let none = store.list_runs(&RunFilter { runner_id: Some("nobody".into()), limit: 5, ..Default::default() }).await;
    assert_eq!(none.expect("list").total, 0);
    let bad = store.list_runs(&RunFilter { runner_id: Some("a{b}".into()), limit: 5, ..Default::default() }).await;
    assert!(matches!(bad, Err(Error::Invalid(_))), "{bad:?}");
}

async fn list_runs_ignores_a_thread_without_strict_thread() {
    let (_redis, store) = common::store().await;
    create(&store, run("t1").thread("t1").conversation("c")).await;
    create(&store, run("t2").thread("t2").conversation("c")).await;
    create(&store, run("none").conversation("c")).await;
    let list = |filter: RunFilter| {
        let store = store.clone();
        async move {
            let page = store.list_runs(&filter).await.expect("list");
            (page.items.into_iter().map(|r| r.run_id).collect::<Vec<_>>(), page.total)
        }
    };
    let base = RunFilter { conversation_id: Some("c".into()), limit: 10, ..Default::default() };
    assert_eq!(
        list(RunFilter { thread_id: Some("t1".into()), ..base.clone() }).await,
        (vec!["none".into(), "t2".into(), "t1".into()], 3),
        "the seed ignores thread_id without strict_thread"
    );
    assert_eq!(
        list(RunFilter { thread_id: Some("t1".into()), strict_thread: true, ..base.clone() }).await,
        (vec!["t1".into()], 1)
    );
    assert_eq!(list(RunFilter { strict_thread: true, ..base.clone() }).await, (vec!["none".into()], 1));
}

async fn a_bad_claim_filter_is_refused_with_nothing_written() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, run("a").conversation("c1")).await;
    let before = common::keyspace(&mut raw).await;
    for bad in [
        req("rt").conversation("c{1}"),
        req("rt").bot(""),
        req("rt").workspace("w\u{7}"),
        req("rt").thread(Some("t\n")),
        req("rt").conversation("x".repeat(201)),
    ] {
        let err = store.claim_next_run(&bad).await.expect_err("a bad filter");
        assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    }
    let mut bad = Finish::new(RunStatus::Completed);
    bad.status_reason = Some("r".into());
    let err = store.finish_and_claim("a", &bad, None, &req("rt").bot("b{")).await.expect_err("bad chained claim");
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert_eq!(common::keyspace(&mut raw).await, before, "a refused claim wrote something");
    // A bad create status writes nothing either.
    assert!("paused".parse::<RunStatus>().is_err());
    let err = store.create_run(&run("z").status(RunStatus::Claimed)).await.expect_err("claimed at create");
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert_eq!(common::keyspace(&mut raw).await, before);
}

/// The CLI's new flags: `enqueue --status created`, `claim --conversation
/// --bot --workspace --thread --strict-thread` (also with `--wait`), `runs
/// --runner --binding` with the total in JSON and text.
async fn the_cli_flags() {
    let (redis, store) = common::store().await;
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_runledger"));
        cmd.arg("--redis").arg(&redis.url).args(args).env_remove("REDIS_URL").env_remove("RUNLEDGER_PREFIX");
        tokio::task::block_in_place(move || cmd.output().expect("run the CLI"))
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let out = cli(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e})"))
    };
    let created =
        json(&["--json", "enqueue", "--queue", Q, "--runner", "agent", "--run-id", "c1", "--status", "created"]);
    assert_eq!(created["status"], "created");
    let out = cli(&["enqueue", "--queue", Q, "--runner", "agent", "--status", "paused"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Unknown run status") && stderr.contains("created"), "{stderr}");
    for (id, extra) in [
        ("s1", vec!["--conversation", "c1", "--bot", "b1", "--workspace", "w1", "--thread", "t1", "--binding", "bd"]),
        ("s2", vec!["--conversation", "c1", "--bot", "b1", "--workspace", "w1"]),
        ("s3", vec!["--conversation", "c2", "--priority", "9"]),
    ] {
        let mut args = vec!["--json", "enqueue", "--queue", Q, "--runner", "agent", "--run-id", id];
        args.extend(extra);
        json(&args);
    }
    let claim = |extra: &[&str]| {
        let mut args = vec!["--json", "claim", "--runtime", "rt", "--queue", Q];
        args.extend_from_slice(extra);
        json(&args)
    };
    assert!(claim(&["--conversation", "nobody"]).is_null(), "nothing matches: null");
    let got = claim(&["--conversation", "c1", "--bot", "b1", "--workspace", "w1", "--strict-thread"]);
    assert_eq!(got["run_id"], "s2", "strict thread without --thread: runs without a thread");
    let got = claim(&["--conversation", "c1", "--thread", "t1", "--strict-thread", "--wait", "1"]);
    assert_eq!(got["run_id"], "s1");
    assert_eq!(store.get_run("s3").await.expect("get").status, RunStatus::Queued, "s3 was left queued");
    // runs --runner / --binding, with the total.
    let page = json(&["--json", "runs", "--runner", "agent", "--limit", "2"]);
    assert_eq!(page["total"], 4);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2));
    let page = json(&["--json", "runs", "--binding", "bd"]);
    assert_eq!(page["total"], 1);
    assert_eq!(page["items"][0]["run_id"], "s1");
    assert_eq!(json(&["--json", "runs", "--runner", "nobody"])["total"], 0);
    // --thread alone is ignored (the seed), with --strict-thread it filters.
    assert_eq!(json(&["--json", "runs", "--thread", "t1"])["total"], 4);
    assert_eq!(json(&["--json", "runs", "--thread", "t1", "--strict-thread"])["total"], 1);
    let out = cli(&["runs", "--runner", "agent", "--limit", "3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("3 of 4 matching runs"), "{text}");
}

/// The scripts check their new arguments themselves (another client may
/// call them): a bad scope filter or cursor is INVALID, with nothing written.
async fn the_scripts_refuse_bad_new_arguments() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    create(&store, run("a").conversation("c1")).await;
    let scripts = runledger::scripts::Scripts::new();
    let keys = store.queue_keys(Q);
    let before = common::keyspace(&mut raw).await;
    let claim = |scope: [&str; 4]| {
        let mut args: Vec<String> = [keys.base.as_str(), "rt", "30000", "0123456789abcdef0123456789abcdef", "0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(scope.iter().map(|s| s.to_string()));
        args
    };
    for scope in [["", "", "", "t1"], ["c{1}", "", "", ""], ["", "", "w\n", ""], ["", "", "", "=t\u{1}"]] {
        let args = claim(scope);
        let err = eval(&mut raw, scripts.claim_next_run.code, &keys.fixed(), &args).await.expect_err("bad scope");
        assert!(err.to_string().contains("INVALID"), "{scope:?}: {err}");
    }
    // A spec without the scope filters (the old layout) is refused too.
    let mut short = claim(["", "", "", ""]);
    short.truncate(5);
    let err = eval(&mut raw, scripts.claim_next_run.code, &keys.fixed(), &short).await.expect_err("short spec");
    assert!(err.to_string().contains("INVALID"), "{err}");
    assert_eq!(common::keyspace(&mut raw).await, before, "a refused claim wrote something");
    // The read-only scripts refuse bad cursors and windows.
    let index = [keys.runs_index()];
    let count = [&keys.base, "1", "not-a-cursor", "100", "", "", "", "", "", "", ""].map(|s| s.to_string());
    let err = eval(&mut raw, scripts.count_runs.code, &index, &count).await.expect_err("bad cursor");
    assert!(err.to_string().contains("INVALID"), "{err}");
    let stats = [&keys.base, "x", "10", "", "100", ""].map(|s| s.to_string());
    let err = eval(&mut raw, scripts.run_stats.code, &index, &stats).await.expect_err("bad window");
    assert!(err.to_string().contains("INVALID"), "{err}");
    assert_eq!(common::keyspace(&mut raw).await, before);
}

async fn eval(
    raw: &mut runledger::store::Conn,
    code: &str,
    keys: &[String],
    args: &[String],
) -> redis::RedisResult<redis::Value> {
    redis::cmd("EVAL").arg(code).arg(keys.len()).arg(keys).arg(args).query_async(raw).await
}

backend_tests!(
    the_scripts_refuse_bad_new_arguments,
    the_cli_flags,
    a_created_run_is_stored_but_never_claimed,
    a_run_created_terminal_is_counted_and_never_claimed,
    an_unknown_status_lists_created,
    claim_scope_filters_pick_the_first_matching_run_in_claim_order,
    strict_thread_without_a_thread_means_runs_without_one,
    scope_filters_combine_with_runner_filters_and_pins,
    a_filtered_claim_walks_a_bounded_head,
    a_filtered_waiter_is_woken_by_its_run_and_does_not_spin,
    list_runs_filters_by_runner_and_binding_with_a_total_on_every_page,
    list_runs_ignores_a_thread_without_strict_thread,
    a_bad_claim_filter_is_refused_with_nothing_written,
);
