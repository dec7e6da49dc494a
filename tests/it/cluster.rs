//! Behaviour that only a Redis Cluster shows: queues spread over the masters,
//! run ids unique across queues on different shards, one-round-trip lookups,
//! the CLI on a cluster URL, and no CROSSSLOT anywhere. The core operations
//! run on the cluster too, through `backend_tests!` in the other test files.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runledger::store::Conn;
use runledger::*;
use serde_json::json;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The masters of the cluster by port, with the slots each owns.
async fn master_of(raw: &mut Conn, key: &str) -> String {
    let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(raw).await.expect("CLUSTER KEYSLOT");
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(raw).await.expect("CLUSTER NODES");
    for line in nodes.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() < 9 || !parts[2].contains("master") {
            continue;
        }
        for range in &parts[8..] {
            let (lo, hi) = match range.split_once('-') {
                Some((lo, hi)) => (lo.parse::<i64>().unwrap_or(-1), hi.parse::<i64>().unwrap_or(-1)),
                None => (range.parse::<i64>().unwrap_or(-1), range.parse::<i64>().unwrap_or(-1)),
            };
            if (lo..=hi).contains(&slot) {
                return parts[1].split('@').next().unwrap_or_default().to_string();
            }
        }
    }
    panic!("no master owns slot {slot} of {key}");
}

async fn cluster_case() -> (common::TestRedis, Store, Conn) {
    let (redis, store) = common::store().await;
    assert!(store.is_cluster(), "{} should connect as a cluster", redis.url);
    let raw = common::raw(&redis).await;
    (redis, store, raw)
}

async fn queues_spread_over_every_master_and_a_worker_drains_them() {
    let (_redis, store, mut raw) = cluster_case().await;
    let queues: Vec<String> = (0..12).map(|i| format!("q{i}")).collect();
    let mut masters = HashSet::new();
    for q in &queues {
        masters.insert(master_of(&mut raw, &store.queue_keys(q).queued()).await);
    }
    assert_eq!(masters.len(), 3, "12 queues should land on all 3 masters: {masters:?}");
    let runs: Vec<NewRun> =
        (0..240).map(|i| NewRun::new(format!("spread-{i}"), "agent").queue(queues[i % 12].clone())).collect();
    store.create_runs(&runs).await.expect("batch create over 12 queues");
    let handled: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let seen = handled.clone();
    let worker = Worker::builder(&store)
        .runtime_id("spread-worker")
        .queues(queues.clone())
        .concurrency(8)
        .handle_signals(false)
        .build(move |ctx| {
            let seen = seen.clone();
            async move {
                *lock(&seen).entry(ctx.run_id().to_string()).or_default() += 1;
                ctx.emit("step", json!({ "n": 1 })).await?;
                Ok(Done::default())
            }
        })
        .expect("worker");
    let token = worker.shutdown_token();
    let task = tokio::spawn(worker.run());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = 0;
        for q in &queues {
            done += store.queue_stats(q, 0).await.expect("stats").counters.get("completed").copied().unwrap_or(0);
        }
        if done == 240 {
            break;
        }
        assert!(Instant::now() < deadline, "hang guard: only {done} of 240 runs completed after 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token.cancel();
    task.await.expect("worker task").expect("worker");
    let handled = lock(&handled).clone();
    assert_eq!(handled.len(), 240);
    assert!(handled.values().all(|&n| n == 1), "every run handled once");
    for i in 0..240 {
        let run = store.get_run(&format!("spread-{i}")).await.expect("get");
        assert_eq!(run.status, RunStatus::Completed);
        assert_eq!(run.queue_name, queues[i % 12]);
    }
}

async fn a_run_id_created_concurrently_in_two_queues_exists_once() {
    let (redis, store, mut raw) = cluster_case().await;
    // Two queues on different masters, so the race crosses shards.
    let (mut a, mut b) = (String::from("left"), String::new());
    let home = master_of(&mut raw, &store.queue_keys(&a).queued()).await;
    for i in 0..50 {
        let q = format!("right{i}");
        if master_of(&mut raw, &store.queue_keys(&q).queued()).await != home {
            b = q;
            break;
        }
    }
    assert!(!b.is_empty(), "no queue on another master");
    let other = Store::connect(&redis.url).await.expect("second host");
    for i in 0..100 {
        let id = format!("dup-{i}");
        if i % 2 == 1 {
            std::mem::swap(&mut a, &mut b);
        }
        let (in_left, in_right) =
            (NewRun::new(&id, "agent").queue(a.clone()), NewRun::new(&id, "agent").queue(b.clone()));
        let (x, y) = tokio::join!(store.create_run(&in_left), other.create_run(&in_right));
        let (x, y) = (x.expect("create in a"), y.expect("create in b"));
        assert_eq!(x.queue_name, y.queue_name, "both creates return the one run of {id}");
        assert_eq!(x.id, y.id);
        let in_a: bool =
            redis::cmd("EXISTS").arg(store.queue_keys(&a).run(&id)).query_async(&mut raw).await.expect("exists");
        let in_b: bool =
            redis::cmd("EXISTS").arg(store.queue_keys(&b).run(&id)).query_async(&mut raw).await.expect("exists");
        assert!(in_a ^ in_b, "{id} must exist in exactly one queue (a: {in_a}, b: {in_b})");
    }
    // A fresh host finds a run by id with one GET and one HGETALL: no probe of every queue.
    let fresh = Store::connect(&redis.url).await.expect("fresh host");
    let before = command_counts(&mut raw).await;
    let run = fresh.get_run("dup-7").await.expect("get");
    let after = command_counts(&mut raw).await;
    let delta = |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    assert_eq!(run.run_id, "dup-7");
    assert_eq!(delta("get"), 1, "one locator read");
    assert_eq!(delta("hgetall"), 1, "one read of the run");
    assert_eq!(delta("exists"), 0, "no probing of queues");
}

/// Calls per command summed over every master (INFO commandstats), minus
/// the INFO calls themselves.
async fn command_counts(raw: &mut Conn) -> HashMap<String, i64> {
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(raw).await.expect("CLUSTER NODES");
    let mut out = HashMap::new();
    for line in nodes.lines().filter(|l| l.contains("master")) {
        let addr = line.split_whitespace().nth(1).unwrap_or_default().split('@').next().unwrap_or_default();
        let client = redis::Client::open(format!("redis://{addr}/")).expect("node client");
        let mut conn = client.get_multiplexed_async_connection().await.expect("node connection");
        let text: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.expect("INFO");
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("cmdstat_") else { continue };
            let Some((name, stats)) = rest.split_once(':') else { continue };
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|n| n.parse::<i64>().ok())
                .unwrap_or(0);
            *out.entry(name.to_string()).or_default() += calls;
        }
    }
    out
}

async fn connect_cluster_takes_every_seed_node() {
    let (redis, store, _raw) = cluster_case().await;
    let nodes = runledger::store::conn::cluster_nodes(&redis.url, false).expect("url").expect("nodes");
    assert_eq!(nodes.len(), 6);
    let other = Store::connect_cluster(&nodes, StoreConfig::default()).await.expect("connect_cluster");
    assert!(other.is_cluster());
    assert_eq!(other.cluster_nodes(), &nodes[..], "every seed node is kept");
    store.create_run(&NewRun::new("seeded", "agent").queue("s1")).await.expect("create");
    assert_eq!(other.get_run("seeded").await.expect("get through the other store").queue_name, "s1");
}

async fn the_cli_runs_on_a_cluster_url_and_with_the_cluster_flag() {
    let (redis, _store, _raw) = cluster_case().await;
    let bin = env!("CARGO_BIN_EXE_runledger");
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(bin);
        command.args(args).env_remove("REDIS_URL").env_remove("REDIS_CLUSTER");
        for (k, v) in env {
            command.env(k, v);
        }
        let out = command.output().expect("run the CLI");
        assert!(out.status.success(), "runledger {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let url = redis.url.clone();
    cli(&["--redis", &url, "--json", "enqueue", "--queue", "cq1", "--runner", "agent", "--run-id", "cli-1"], &[]);
    // Seed nodes as a plain URL with --cluster, and through the environment.
    let plain = url.replace("redis+cluster://", "redis://");
    let got = cli(&["--redis", &plain, "--cluster", "--json", "get", "cli-1"], &[]);
    let run: serde_json::Value = serde_json::from_str(&got).expect("get prints JSON");
    assert_eq!(run["queue_name"], "cq1");
    let claimed = cli(
        &["--json", "claim", "--runtime", "rt-cli", "--queue", "cq1"],
        &[("REDIS_URL", &plain), ("REDIS_CLUSTER", "1")],
    );
    let claimed: serde_json::Value = serde_json::from_str(&claimed).expect("claim prints JSON");
    assert_eq!(claimed["run_id"], "cli-1");
    let token = claimed["claim_token"].as_str().expect("token").to_string();
    cli(&["--redis", &url, "append", "cli-1", "--seq", "1", "--type", "step", "--token", &token], &[]);
    cli(&["--redis", &url, "finalize", "cli-1", "--status", "completed", "--token", &token], &[]);
    let queues = cli(&["--redis", &url, "queues"], &[]);
    assert!(queues.contains("cq1"), "queues lists cq1: {queues}");
    let runs = cli(&["--redis", &url, "--json", "runs", "--limit", "5"], &[]);
    assert!(runs.contains("cli-1"));
    let reap = cli(&["--redis", &url, "reap"], &[]);
    assert!(!reap.is_empty());
    // `--cluster` is a switch: the word after it is the command (README: `--cluster enqueue ...`).
    cli(&["--redis", &plain, "--cluster", "enqueue", "--queue", "cq2", "--runner", "agent", "--run-id", "cli-2"], &[]);
    // A plain URL of one node, no flag: the CLI sees a cluster node (INFO cluster) and
    // follows it to every master; queues of every shard are written and read back.
    let one_node = match plain.split_once("://").and_then(|(_, rest)| rest.split(',').next()) {
        Some(host) => format!("redis://{}/", host.trim_end_matches('/')),
        None => panic!("a cluster URL with nodes: {plain}"),
    };
    for i in 0..8 {
        let (queue, id) = (format!("detect-{i}"), format!("detect-run-{i}"));
        cli(&["--redis", &one_node, "enqueue", "--queue", &queue, "--runner", "agent", "--run-id", &id], &[]);
        let got = cli(&["--redis", &one_node, "--json", "get", &id], &[]);
        let run: serde_json::Value = serde_json::from_str(&got).expect("get prints JSON");
        assert_eq!(run["queue_name"], queue.as_str(), "{got}");
    }
    let one = Store::connect(&one_node).await.expect("connect to one node");
    assert!(one.is_cluster(), "a plain URL of a cluster node connects as a cluster");
}

/// Runs one of everything on the cluster, then reads every node's error
/// replies (INFO errorstats, which counts each error a node answered by its
/// code): the cluster refused nothing (no CROSSSLOT, no script error). The
/// only error allowed is NOSCRIPT, which loads a script on a node that does
/// not have it yet.
async fn no_operation_crosses_slots() {
    let (redis, store, mut raw) = cluster_case().await;
    // Opened before the reset: a new connection's own handshake (CLIENT
    // SETINFO, unknown to Redis 7.0) would otherwise count as an error.
    let mut nodes = node_connections(&redis.url);
    reset_error_stats(&mut nodes);
    for i in 0..9 {
        let q = format!("x{i}");
        let run =
            NewRun::new(format!("x-{i}"), "agent").queue(q.clone()).conversation("conv").deadline_at(4e9).priority(i);
        store.create_run(&run).await.expect("create");
    }
    store.register_runtime(&RegisterRuntime::new("rt-x")).await.expect("register");
    store.heartbeat_runtime("rt-x", &Heartbeat::default()).await.expect("heartbeat");
    let mut waiter = Waiter::new(&store).await.expect("waiter");
    let mut request = ClaimRequest::new("rt-x");
    request.queues = (0..9).map(|i| format!("x{i}")).collect();
    let run = waiter.claim(&request, Duration::from_secs(2)).await.expect("claim").expect("a run");
    let token = run.claim_token.clone().expect("token");
    store.renew_claim(&run.run_id, &token, Duration::from_secs(30)).await.expect("renew");
    store.append_event(&run.run_id, Some(&token), &NewEvent::new(1, "step", json!({}))).await.expect("append");
    store.append_audit_event(&run.run_id, "note", Some(&json!({})), None).await.expect("audit");
    store.finalize_run(&run.run_id, &Finish::new(RunStatus::Completed), Some(&token)).await.expect("finalize");
    store.request_cancel("x-1", None).await.expect("cancel");
    let page = store
        .list_runs(&RunFilter { conversation_id: Some("conv".into()), limit: 5, ..Default::default() })
        .await
        .expect("list");
    assert_eq!(page.items.len(), 5);
    let next = store
        .list_runs(&RunFilter {
            conversation_id: Some("conv".into()),
            limit: 5,
            before_id: page.next_cursor,
            ..Default::default()
        })
        .await
        .expect("page 2");
    assert_eq!(next.items.len(), 4, "9 runs over two pages");
    store.release_expired_claims(&[], None, RunStatus::Queued, "x", 100).await.expect("release expired");
    store.reap(&[], None).await.expect("reap");
    store.mark_stale_runtimes(None, "stale", Some(Duration::from_millis(1))).await.expect("mark stale");
    store.list_runtimes(&[], 10).await.expect("list runtimes");
    store.deregister_runtime("rt-x").await.expect("deregister");
    for q in store.known_queues().await.expect("queues") {
        store.queue_stats(&q, 10).await.expect("stats");
    }
    let _: String = redis::cmd("PING").query_async(&mut raw).await.expect("ping");
    let mut errors = error_replies(&mut nodes);
    errors.remove("NOSCRIPT");
    assert!(errors.is_empty(), "the cluster answered errors: {errors:?}; {}", failed_commands(&mut nodes));

    // The check sees what it looks for: a command across two slots, sent to
    // one node, is counted as CROSSSLOT.
    let refused: redis::RedisResult<()> = redis::cmd("MSET").arg("{a}x").arg(1).arg("{b}y").arg(1).query(&mut nodes[0]);
    assert!(refused.is_err(), "MSET across two slots is refused");
    assert!(error_replies(&mut nodes).contains_key("CROSSSLOT"), "errorstats counts a CROSSSLOT");
}

/// A connection to each node of the cluster (masters and replicas).
fn node_connections(url: &str) -> Vec<redis::Connection> {
    let nodes = runledger::store::conn::cluster_nodes(url, false).expect("url").expect("nodes");
    let first = redis::Client::open(nodes[0].as_str()).expect("client");
    let text: String =
        redis::cmd("CLUSTER").arg("NODES").query(&mut first.get_connection().expect("node")).expect("CLUSTER NODES");
    let mut conns = Vec::new();
    for line in text.lines() {
        let addr = line.split_whitespace().nth(1).expect("address field");
        let addr = addr.split('@').next().expect("host:port");
        if line.contains("fail") || line.contains("noaddr") {
            continue;
        }
        let client = redis::Client::open(format!("redis://{addr}/")).expect("node client");
        conns.push(client.get_connection().unwrap_or_else(|e| panic!("node {addr}: {e}")));
    }
    assert_eq!(conns.len(), 6, "every node of the test cluster answers: {text}");
    conns
}

fn reset_error_stats(nodes: &mut [redis::Connection]) {
    for conn in nodes {
        let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(conn).expect("CONFIG RESETSTAT");
    }
}

/// Error replies since the last reset, by code, summed over every node.
fn error_replies(nodes: &mut [redis::Connection]) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for conn in nodes {
        let text: String = redis::cmd("INFO").arg("errorstats").query(conn).expect("INFO errorstats");
        for line in text.lines() {
            let Some((name, value)) = line.trim().split_once(':') else { continue };
            let Some(code) = name.strip_prefix("errorstat_") else { continue };
            let count: u64 = value.strip_prefix("count=").and_then(|c| c.parse().ok()).expect("count=N");
            *out.entry(code.to_string()).or_default() += count;
        }
    }
    out
}

/// The commands that failed or were refused since the last reset (INFO
/// commandstats), node by node: what a failed check prints.
fn failed_commands(nodes: &mut [redis::Connection]) -> String {
    let mut out = Vec::new();
    for conn in nodes {
        let text: String = redis::cmd("INFO").arg("commandstats").query(conn).expect("INFO commandstats");
        for line in text.lines() {
            let Some((name, fields)) = line.trim().split_once(':') else { continue };
            let count = |field: &str| {
                fields.split(',').find_map(|f| f.strip_prefix(field)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            };
            if count("failed_calls=") + count("rejected_calls=") > 0 {
                out.push(format!("{name} {fields}"));
            }
        }
    }
    format!("failed commands: [{}]", out.join("; "))
}

/// Lane position of a run: priority descending, then creation order.
fn lane(run: &Run) -> (i64, i64) {
    (-run.priority, run.id)
}

/// A queue of 4 partitions, 400 runs, 4 concurrent claimers: runs spread over
/// the partitions (and shards), each claimer sees each partition's runs in
/// priority order, every partition is served from the start, and every run
/// is claimed exactly once.
async fn a_partitioned_queue_keeps_order_within_partitions_and_starves_none() {
    let (redis, store, mut raw) = cluster_case().await;
    store.declare_partitions("hot", 4).await.expect("declare");
    store.declare_partitions("hot", 4).await.expect("declaring again with the same count is a no-op");
    assert!(matches!(store.declare_partitions("hot", 5).await, Err(Error::Conflict(_))));
    let parts = store.partitions("hot").await.expect("partitions");
    assert_eq!(parts, ["hot#0", "hot#1", "hot#2", "hot#3"]);
    let mut masters = HashSet::new();
    for p in &parts {
        masters.insert(master_of(&mut raw, &store.queue_keys(p).queued()).await);
    }
    assert!(masters.len() >= 2, "4 partitions should span shards: {masters:?}");
    let runs: Vec<NewRun> =
        (0..400).map(|i| NewRun::new(format!("hot-{i}"), "agent").queue("hot").priority((i * 7 % 5) as i64)).collect();
    let created = store.create_runs(&runs).await.expect("enqueue into the logical queue");
    let mut per_partition: HashMap<String, usize> = HashMap::new();
    for run in &created {
        *per_partition.entry(run.queue_name.clone()).or_default() += 1;
    }
    assert_eq!(per_partition.len(), 4, "runs spread over every partition: {per_partition:?}");
    assert!(per_partition.values().all(|&n| n >= 50), "no partition is nearly empty: {per_partition:?}");
    // A partition key keeps related runs together.
    let keyed: Vec<NewRun> = (0..10)
        .map(|i| NewRun::new(format!("conv-{i}"), "agent").queue("hot").partition_key("conversation-1"))
        .collect();
    let keyed = store.create_runs(&keyed).await.expect("keyed");
    assert!(keyed.iter().all(|r| r.queue_name == keyed[0].queue_name), "one partition for one key");

    let claims: Arc<Mutex<Vec<(usize, Run)>>> = Arc::default();
    let mut tasks = Vec::new();
    for c in 0..4 {
        let claims = claims.clone();
        let store = Store::connect(&redis.url).await.expect("claimer store");
        tasks.push(tokio::spawn(async move {
            let request = ClaimRequest::new(format!("claimer-{c}")).queue("hot");
            while let Some(run) = store.claim_next_run(&request).await.expect("claim") {
                lock(&claims).push((c, run));
            }
        }));
    }
    for t in tasks {
        t.await.expect("claimer");
    }
    let claims = lock(&claims).clone();
    let ids: Vec<&str> = claims.iter().map(|(_, r)| r.run_id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 410, "every run claimed");
    assert_eq!(unique.len(), 410, "no run claimed twice");
    for c in 0..4 {
        let mine: Vec<&Run> = claims.iter().filter(|(who, _)| *who == c).map(|(_, r)| r).collect();
        for p in &parts {
            let seen: Vec<(i64, i64)> = mine.iter().filter(|r| &r.queue_name == p).map(|r| lane(r)).collect();
            assert!(seen.windows(2).all(|w| w[0] < w[1]), "claimer {c} took {p}'s runs out of priority order");
        }
        // While every partition still holds runs, a claimer's claims rotate over all of them.
        let first: HashSet<&str> = mine.iter().take(8).map(|r| r.queue_name.as_str()).collect();
        assert_eq!(first.len(), 4, "claimer {c} served every partition in its first 8 claims: {first:?}");
    }
    // The CLI shows the logical queue with its partitions.
    let out = Command::new(env!("CARGO_BIN_EXE_runledger"))
        .args(["--redis", &redis.url, "queues"])
        .env_remove("REDIS_URL")
        .output()
        .expect("runledger queues");
    let text = String::from_utf8_lossy(&out.stdout);
    // Queue rows only (lease holders and totals are listed under each row).
    let rows: Vec<&str> =
        text.lines().filter(|l| l.trim_start().starts_with("hot") && !l.contains(" held by ")).collect();
    let hot = rows.iter().position(|l| l.starts_with("hot ")).expect("a row for the logical queue");
    assert!(rows[hot].split_whitespace().nth(4) == Some("410"), "the logical row sums its partitions: {text}");
    for (i, p) in parts.iter().enumerate() {
        assert!(
            rows.get(hot + 1 + i).is_some_and(|l| l.starts_with("  ") && l.trim_start().starts_with(p.as_str())),
            "{text}"
        );
    }
}

mod on_cluster {
    use super::*;

    macro_rules! cluster_only {
        ($($case:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    common::run_on(common::Backend::Cluster, super::$case()).await
                }
            )*
        };
    }

    cluster_only!(
        queues_spread_over_every_master_and_a_worker_drains_them,
        a_run_id_created_concurrently_in_two_queues_exists_once,
        the_cli_runs_on_a_cluster_url_and_with_the_cluster_flag,
        no_operation_crosses_slots,
        connect_cluster_takes_every_seed_node,
        a_partitioned_queue_keeps_order_within_partitions_and_starves_none,
    );
}
