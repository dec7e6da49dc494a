//! Groups and pause (issue 28): a group at its limit is not claimed and
//! blocks no other group, even with 10,000 of its runs ahead in priority; a
//! lapsed lease gives its slot back; limits change at once; many concurrent
//! Workers, some of whose claims are abandoned as a crashed worker's would
//! be, and real `runledger worker` processes SIGKILLed mid-run, never hold
//! more runs of one group than its limit over the whole history the server
//! recorded (MONITOR, server times); pause and resume of a queue and of a
//! group; refused settings write nothing. Both backends.

use crate::common;

use std::collections::{HashMap, HashSet};
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
/// whole recorded history (the server's, see [`ClaimRecorder`]), no
/// conversation ever has two runs held at once, every run completes exactly
/// once, and each abandoned claim's run is claimed again once its lease ran out.
async fn many_workers_never_exceed_a_group_limit() {
    const GROUPS: usize = 20;
    const PER: usize = 12;
    let (redis, store) = common::store().await;
    let recorder = ClaimRecorder::start(&redis.url).await;
    group_by(&store, GroupBy::ConversationId, 1).await;
    let runs: Vec<NewRun> =
        (0..GROUPS * PER).map(|i| msg(&format!("r{i:03}"), &format!("c{}", i % GROUPS), 0)).collect();
    store.create_runs(&runs).await.expect("create");
    // The crasher: takes a few runs and never comes back (its leases lapse).
    for _ in 0..5 {
        store.claim_next_run(&req("crasher").lease(Duration::from_millis(800))).await.expect("claim").expect("a run");
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
    let history = recorder.stop(&runs).await;
    history.assert_completed_once(&runs);
    history.assert_within_limits(|_| 1);
    assert_eq!(history.lapsed_claims_came_back(|rt| rt == "crasher"), 5, "the crasher's five claims lapsed");
}

/// Real `runledger worker` processes (the CLI, its simulated handler) on a
/// queue set up with `runledger queue set --group-by conversation_id
/// --group-concurrency 1` and two conversations of limit 2; the test
/// SIGKILLs workers while they hold runs and starts replacements. Over the
/// whole recorded history: no conversation ever held more than its limit (a
/// killed worker's claim counts until its lease ran out), every run
/// completed exactly once, and each killed worker's claims came back to
/// their groups once their leases ran out.
async fn killed_worker_processes_never_exceed_a_group_limit() {
    const GROUPS: usize = 15;
    const PER: usize = 8;
    const WORKERS: usize = 4;
    const KILLS: usize = 4;
    const WIDE: [&str; 2] = ["c0", "c1"];
    let redis = common::redis().await;
    let store = Store::connect(&redis.url).await.expect("connect");
    let recorder = ClaimRecorder::start(&redis.url).await;
    let mut set: Vec<String> =
        ["queue", "set", Q, "--group-by", "conversation_id", "--group-concurrency", "1"].map(String::from).into();
    for g in WIDE {
        set.extend(["--group-limit".to_string(), format!("{g}=2")]);
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runledger"))
        .args(["--redis", &redis.url])
        .args(&set)
        .env_remove("REDIS_URL")
        .output()
        .expect("run runledger queue set");
    assert!(out.status.success(), "queue set: {}", String::from_utf8_lossy(&out.stderr));
    // The wide groups' runs first in priority: their two slots fill at once.
    let runs: Vec<NewRun> = (0..GROUPS * PER)
        .map(|i| {
            let group = format!("c{}", i % GROUPS);
            let priority = if WIDE.contains(&group.as_str()) { 5 } else { 0 };
            msg(&format!("k{i:03}"), &group, priority)
        })
        .collect();
    store.create_runs(&runs).await.expect("create");

    let logs = tempfile::tempdir().expect("temp dir for worker logs");
    let mut fleet = Fleet::new(&redis.url, logs.path());
    for slot in 0..WORKERS {
        fleet.start(slot);
    }
    let completed = |stats: &QueueStats| stats.counters.get("completed").copied().unwrap_or(0) as usize;
    let hang_guard = tokio::time::Instant::now() + Duration::from_secs(180);
    while fleet.killed.len() < KILLS {
        let stats = store.queue_stats(Q, 100).await.expect("stats");
        if completed(&stats) == runs.len() {
            break;
        }
        // A worker holding a run right now: the kill lands mid-run.
        let victim = stats.lease_holders.iter().find_map(|h| fleet.slot_of(&h.runtime_id));
        if let Some(slot) = victim {
            fleet.kill_and_replace(slot);
        }
        assert!(tokio::time::Instant::now() < hang_guard, "hang guard: {} kills in 180 s", fleet.killed.len());
        tokio::time::sleep(Duration::from_millis(if victim.is_some() { 700 } else { 50 })).await;
    }
    loop {
        let stats = store.queue_stats(Q, 10).await.expect("stats");
        if completed(&stats) == runs.len() {
            break;
        }
        assert!(tokio::time::Instant::now() < hang_guard, "hang guard: not every run completed in 180 s: {stats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet.stop_all().await;
    assert!(fleet.died.is_empty(), "workers exited on their own: {:?}\n{}", fleet.died, fleet.log_tails());

    let history = recorder.stop(&runs).await;
    history.assert_completed_once(&runs);
    let peaks = history.assert_within_limits(|g| if WIDE.contains(&g) { 2 } else { 1 });
    assert!(WIDE.iter().any(|g| peaks.get(*g) == Some(&2)), "a group of limit 2 never held 2: {peaks:?}");
    let killed = fleet.killed.clone();
    let lapsed = history.lapsed_claims_came_back(|rt| killed.contains(rt));
    assert!(lapsed > 0, "no killed worker held a run when it died ({killed:?}): the kills tested nothing");
    eprintln!(
        "group kill test: {} runs, {} claims, {} kills, {lapsed} claims lapsed with their killed holders, peaks {peaks:?}",
        runs.len(),
        history.held.len(),
        killed.len()
    );
}

// ---------------------------------------------------------------- the recorded history

/// A run's claim as the server recorded it, in server ms: held from `from`
/// until `to`, its holder's finish or release, or else its lease's (last
/// renewed) expiry, after which the group's slot is free again.
#[derive(Clone, Debug)]
struct Held {
    run_id: String,
    group: String,
    runtime: String,
    from: i64,
    to: i64,
    /// Ended by its lease running out, not by its holder.
    lapsed: bool,
}

/// What the server did to the runs of [`Q`], from MONITOR on the node that
/// holds the queue's slot: a claim a SIGKILLed worker never heard the reply
/// to is there too.
struct ClaimRecorder {
    monitor: common::monitor::Monitor,
}

struct History {
    held: Vec<Held>,
    /// Run id -> the terminal statuses written to it, in order.
    terminal: HashMap<String, Vec<String>>,
}

const TERMINAL: [&str; 4] = ["completed", "failed", "cancelled", "timeout"];

impl ClaimRecorder {
    async fn start(redis_url: &str) -> ClaimRecorder {
        ClaimRecorder { monitor: common::monitor::Monitor::start(&queue_node(redis_url).await).await }
    }

    async fn stop(self, runs: &[NewRun]) -> History {
        let lines = self.monitor.stop().await;
        let cmds = common::monitor::commands(&lines);
        let histories = common::monitor::run_histories(&cmds, "rl", Q);
        let mut held = Vec::new();
        let mut terminal: HashMap<String, Vec<String>> = HashMap::new();
        for run in runs {
            let group = run.conversation_id.clone().expect("a conversation");
            let mut open: Option<Held> = None;
            for w in histories.get(&run.run_id).into_iter().flatten().filter(|w| w.is_hset()) {
                let t = server_ms(w);
                let expires = w.field("claim_lease_expires_at").and_then(|v| v.parse::<f64>().ok()).map(|v| v as i64);
                match w.field("status") {
                    Some("claimed") => {
                        // A claim over an open one: only its expiry can have ended that.
                        held.extend(open.take().map(|prev| Held { lapsed: true, ..prev }));
                        open = Some(Held {
                            run_id: run.run_id.clone(),
                            group: group.clone(),
                            runtime: w.field("claimed_by_runtime_id").unwrap_or_default().to_string(),
                            from: t,
                            to: expires.expect("a claim writes its lease expiry"),
                            lapsed: false,
                        });
                    }
                    Some(status) => {
                        if TERMINAL.contains(&status) {
                            terminal.entry(run.run_id.clone()).or_default().push(status.to_string());
                        }
                        if let Some(mut prev) = open.take() {
                            prev.lapsed = t >= prev.to;
                            prev.to = prev.to.min(t);
                            held.push(prev);
                        }
                    }
                    // A renewal extends the lease (a renewal the script should
                    // have refused would make the check stricter, not blind).
                    None => {
                        if let (Some(c), Some(e)) = (open.as_mut(), expires) {
                            c.to = e;
                        }
                    }
                }
            }
            held.extend(open.map(|prev| Held { lapsed: true, ..prev }));
        }
        History { held, terminal }
    }
}

/// The server clock reading a write carries: the `now` its script decided
/// with (`updated_at`, or `finished_at` on a finish, which drops
/// `updated_at`); else MONITOR's time, a few µs later.
fn server_ms(w: &common::monitor::RunWrite) -> i64 {
    ["updated_at", "finished_at"]
        .iter()
        .find_map(|f| w.field(f).and_then(|v| v.parse::<f64>().ok()))
        .map(|v| v as i64)
        .unwrap_or((w.time_us / 1000) as i64)
}

impl History {
    /// Each run was claimed, and finished once, completed.
    fn assert_completed_once(&self, runs: &[NewRun]) {
        for run in runs {
            assert!(self.held.iter().any(|h| h.run_id == run.run_id), "{}: no claim recorded", run.run_id);
            let ends = self.terminal.get(&run.run_id).map(Vec::as_slice).unwrap_or_default();
            assert_eq!(ends, ["completed"], "{}: terminal writes", run.run_id);
        }
    }

    /// The group-limit check: at no instant (each claim held over
    /// `[from, to)`) does a group hold more claims than `limit_of` it.
    /// Returns the most each group held at once.
    fn assert_within_limits(&self, limit_of: impl Fn(&str) -> usize) -> HashMap<String, usize> {
        assert!(!self.held.is_empty(), "no claim recorded: the check would be vacuous");
        let mut by_group: HashMap<&str, Vec<&Held>> = HashMap::new();
        for h in &self.held {
            by_group.entry(h.group.as_str()).or_default().push(h);
        }
        let mut peaks = HashMap::new();
        for (group, mut claims) in by_group {
            claims.sort_by_key(|h| (h.from, h.to));
            let mut active: Vec<&Held> = Vec::new();
            for h in claims {
                active.retain(|a| a.to > h.from);
                active.push(h);
                let limit = limit_of(group);
                assert!(
                    active.len() <= limit,
                    "group {group} (limit {limit}) held {} runs at once at {} ms: {active:#?}",
                    active.len(),
                    h.from
                );
                let peak = peaks.entry(group.to_string()).or_insert(0);
                *peak = active.len().max(*peak);
            }
        }
        peaks
    }

    /// Every claim of a runtime `gone` names that its lease ended (the holder
    /// died): its run was claimed again, from the lease's end on (the
    /// group's slot came back). Returns how many there were.
    fn lapsed_claims_came_back(&self, gone: impl Fn(&str) -> bool) -> usize {
        let lapsed: Vec<&Held> = self.held.iter().filter(|h| h.lapsed && gone(&h.runtime)).collect();
        for dead in &lapsed {
            let again = self.held.iter().find(|h| h.run_id == dead.run_id && h.from > dead.from);
            let again = again.unwrap_or_else(|| panic!("{} was never claimed again after {dead:?}", dead.run_id));
            assert!(
                again.from >= dead.to,
                "{} claimed again before the lapsed lease ended: {again:?} {dead:?}",
                dead.run_id
            );
        }
        lapsed.len()
    }
}

/// `host:port` of the node that runs the scripts of [`Q`]: the server, or
/// on a cluster the master of the queue's slot.
async fn queue_node(redis_url: &str) -> String {
    let Some(nodes) = runledger::store::conn::cluster_nodes(redis_url, false).expect("test url") else {
        let rest = redis_url.split_once("://").map(|(_, r)| r).unwrap_or(redis_url);
        return rest.trim_end_matches('/').rsplit('@').next().unwrap_or(rest).to_string();
    };
    let client = redis::Client::open(nodes[0].as_str()).expect("node client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("node connection");
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(format!("rl:{{{Q}}}:queued"))
        .query_async(&mut conn)
        .await
        .expect("CLUSTER KEYSLOT");
    let table: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut conn).await.expect("CLUSTER NODES");
    for line in table.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else { continue };
        if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
            continue;
        }
        let owns = fields.iter().skip(8).any(|range| {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
        });
        if owns {
            return addr.split('@').next().unwrap_or(addr).to_string();
        }
    }
    panic!("no master holds slot {slot}:\n{table}");
}

// ---------------------------------------------------------------- worker processes

/// `runledger worker` processes, one per slot, started and stopped by this
/// test only (by their PIDs, through their child handles).
struct Fleet {
    url: String,
    log_dir: std::path::PathBuf,
    slots: Vec<Option<(String, std::process::Child)>>,
    generation: u32,
    logs: Vec<(String, std::path::PathBuf)>,
    killed: HashSet<String>,
    /// Workers that exited before the test stopped or killed them.
    died: Vec<String>,
}

impl Fleet {
    fn new(url: &str, log_dir: &std::path::Path) -> Fleet {
        Fleet {
            url: url.to_string(),
            log_dir: log_dir.to_path_buf(),
            slots: Vec::new(),
            generation: 0,
            logs: Vec::new(),
            killed: HashSet::new(),
            died: Vec::new(),
        }
    }

    fn start(&mut self, slot: usize) {
        self.generation += 1;
        let runtime_id = format!("gk-{slot}-{}", self.generation);
        let log = self.log_dir.join(format!("{runtime_id}.log"));
        let stderr = std::fs::File::create(&log).expect("worker log file");
        // Short leases, so a killed worker's runs come back quickly; no
        // simulated failures, so every run completes.
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_runledger"))
            .args(["worker", "--redis", &self.url, "--queue", Q, "--concurrency", "3", "--runtime-id", &runtime_id])
            .args(["--lease", "2", "--heartbeat", "0.4", "--work-ms", "600", "--steps", "2"])
            .args(["--fail-rate", "0", "--grace", "1"])
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .env_remove("REDIS_URL")
            .env_remove("RUNLEDGER_PREFIX")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn runledger worker");
        self.logs.push((runtime_id.clone(), log));
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, || None);
        }
        self.slots[slot] = Some((runtime_id, child));
    }

    /// The slot of a live worker of this fleet with that runtime id.
    fn slot_of(&self, runtime_id: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.as_ref().is_some_and(|(id, _)| id == runtime_id))
    }

    fn kill_and_replace(&mut self, slot: usize) {
        if let Some((runtime_id, mut child)) = self.slots[slot].take() {
            if let Ok(Some(status)) = child.try_wait() {
                self.died.push(format!("{runtime_id} ({status})"));
            }
            // Child::kill is SIGKILL to its PID: no shutdown code runs, as in a crash.
            child.kill().expect("SIGKILL a worker");
            child.wait().expect("reap a killed worker");
            self.killed.insert(runtime_id);
        }
        self.start(slot);
    }

    /// SIGTERM to each worker, then waits for it (SIGKILL after 30 s).
    async fn stop_all(&mut self) {
        let mut workers: Vec<(String, std::process::Child)> = self.slots.iter_mut().filter_map(Option::take).collect();
        for (id, child) in &mut workers {
            if let Ok(Some(status)) = child.try_wait() {
                self.died.push(format!("{id} ({status})"));
                continue;
            }
            // SAFETY: kill(2) on the PID of a child we started and have not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        for (id, child) in &mut workers {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while child.try_wait().expect("wait for a worker").is_none() {
                if tokio::time::Instant::now() >= deadline {
                    eprintln!("worker {id} ignored SIGTERM for 30 s; killing it");
                    child.kill().expect("SIGKILL a stuck worker");
                    child.wait().expect("reap a stuck worker");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn log_tails(&self) -> String {
        let mut out = String::new();
        for (id, path) in &self.logs {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                out.push_str(&format!("--- {id}:\n{}\n", lines[lines.len().saturating_sub(10)..].join("\n")));
            }
        }
        out
    }
}

#[test]
fn the_limit_check_refuses_an_overlap_and_accepts_a_handover() {
    let claim = |run: &str, from: i64, to: i64| Held {
        run_id: run.into(),
        group: "g".into(),
        runtime: "rt".into(),
        from,
        to,
        lapsed: false,
    };
    let handover = History { held: vec![claim("a", 0, 10), claim("b", 10, 20)], terminal: HashMap::new() };
    assert_eq!(handover.assert_within_limits(|_| 1)["g"], 1, "a slot taken as it ends is no overlap");
    let overlap = History { held: vec![claim("a", 0, 10), claim("b", 9, 20)], terminal: HashMap::new() };
    assert!(std::panic::catch_unwind(|| overlap.assert_within_limits(|_| 1)).is_err(), "an overlap passed");
    assert_eq!(overlap.assert_within_limits(|_| 2)["g"], 2);
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
    killed_worker_processes_never_exceed_a_group_limit,
);
