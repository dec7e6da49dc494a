//! Test harness: every test gets a private Redis, on one of two backends.
//!
//! Single server: with `redis-server` on PATH it starts one on a free
//! loopback port with its own temp dir and kills it (by PID) when the test's
//! handle drops. Without the binary but with a reachable Docker engine it
//! runs `redis:7` through testcontainers. With neither it fails with a
//! message saying what to install.
//!
//! Cluster: one local 6-node Redis Cluster (3 masters, 3 replicas) per test
//! binary, started on first use by a thread that lives as long as the
//! process (its nodes die with the process). Cluster tests of one binary
//! take turns, and each starts on an empty cluster (FLUSHALL on every master).
//!
//! [`backend_tests!`] runs one list of test cases on both backends: a case is
//! a plain `async fn` that calls [`store`] / [`redis`] as usual, and the
//! backend it runs on is a task-local the macro sets.
#![allow(dead_code)]

pub mod dashboard;
pub mod monitor;
pub mod proxy;

use std::sync::{Mutex, MutexGuard, OnceLock};

use runledger::embedded::{RedisServer, find_redis_server};
use runledger::embedded_cluster::RedisCluster;
use runledger::store::Conn;
use runledger::{Store, StoreConfig};
use testcontainers::ImageExt;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage};

/// Where a test case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Single,
    Cluster,
}

tokio::task_local! {
    static BACKEND: Backend;
}

/// The backend of the running test case (single server outside [`backend_tests!`]).
pub fn backend() -> Backend {
    BACKEND.try_with(|b| *b).unwrap_or(Backend::Single)
}

/// Runs one test case on a backend. On the cluster it waits for its turn
/// and empties the cluster first. The turn is a std mutex held across the
/// case on purpose: each test has a runtime and thread of its own, and the
/// lock orders those threads, not tasks of one runtime.
#[allow(clippy::await_holding_lock)]
pub async fn run_on<F: std::future::Future<Output = ()>>(backend: Backend, case: F) {
    let _turn = match backend {
        Backend::Single => None,
        Backend::Cluster => {
            let turn = cluster_turn();
            flush_cluster().await;
            Some(turn)
        }
    };
    BACKEND.scope(backend, case).await
}

/// Generates, for each named case (an `async fn()` in scope), one
/// `#[tokio::test]` per backend: `single::<case>` and `cluster::<case>`.
macro_rules! backend_tests {
    ($($case:ident),* $(,)?) => {
        mod single {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::common::run_on($crate::common::Backend::Single, super::$case()).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::common::run_on($crate::common::Backend::Cluster, super::$case()).await
                }
            )*
        }
    };
}

/// The URL of this test binary's cluster, started on first use.
pub fn cluster_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        // The nodes die with the thread that started them: this one never ends.
        std::thread::spawn(move || match RedisCluster::start() {
            Ok(cluster) => {
                let _ = tx.send(Ok(cluster.url()));
                let _keep = cluster;
                loop {
                    std::thread::park();
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
            }
        });
        match rx.recv() {
            Ok(Ok(url)) => url,
            Ok(Err(e)) => panic!("starting the test cluster: {e}"),
            Err(_) => panic!("the thread starting the test cluster died"),
        }
    })
}

fn cluster_turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    // A failed case poisons nothing the next one depends on.
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

async fn flush_cluster() {
    let nodes = runledger::store::conn::cluster_nodes(cluster_url(), false).expect("cluster url").expect("nodes");
    let client = redis::cluster::ClusterClient::new(nodes).expect("cluster client");
    let mut conn = client.get_async_connection().await.expect("cluster connection");
    // FLUSHALL goes to every master; the replicas follow.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL on the cluster");
}

pub struct TestRedis {
    pub url: String,
    server: Option<RedisServer>,
    _container: Option<ContainerAsync<GenericImage>>,
}

impl TestRedis {
    pub fn server(&self) -> Option<&RedisServer> {
        self.server.as_ref()
    }

    /// Restarts the private redis-server on the same port (binary mode only).
    pub fn restart(&mut self) -> runledger::Result<()> {
        match self.server.as_mut() {
            Some(server) => server.restart(),
            None => Err(runledger::Error::Server("restart needs a redis-server binary, not a container".into())),
        }
    }
}

fn docker_reachable() -> bool {
    std::env::var_os("DOCKER_HOST").is_some() || std::path::Path::new("/var/run/docker.sock").exists()
}

/// A private Redis for one test: a server of its own, or the (emptied)
/// cluster when the case runs on the cluster backend.
pub async fn redis() -> TestRedis {
    if backend() == Backend::Cluster {
        return TestRedis { url: cluster_url().to_string(), server: None, _container: None };
    }
    if find_redis_server().is_some() {
        let server = RedisServer::start().unwrap_or_else(|e| panic!("starting redis-server: {e}"));
        return TestRedis { url: server.url(), server: Some(server), _container: None };
    }
    if docker_reachable() {
        let mut command = vec!["redis-server".to_string()];
        for (name, value) in runledger::embedded::RECOMMENDED_CONFIG {
            command.extend([format!("--{name}"), value.to_string()]);
        }
        let container = GenericImage::new("redis", "7.0")
            .with_exposed_port(6379.tcp())
            .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
            .with_cmd(command)
            .start()
            .await
            .unwrap_or_else(|e| panic!("starting redis:7.0 with testcontainers: {e}"));
        let port = container.get_host_port_ipv4(6379).await.expect("container port");
        return TestRedis { url: format!("redis://127.0.0.1:{port}/"), server: None, _container: Some(container) };
    }
    panic!(
        "these tests need Redis: no `redis-server` on PATH and no Docker engine. \
         Install it with `apt-get install -y redis-server` (or `brew install redis`)."
    );
}

/// A private Redis and a store on it.
pub async fn store() -> (TestRedis, Store) {
    let redis = redis().await;
    let store = Store::connect(&redis.url).await.expect("connect to the test redis");
    (redis, store)
}

pub async fn store_with(cfg: StoreConfig) -> (TestRedis, Store) {
    let redis = redis().await;
    let store = Store::connect_with(&redis.url, cfg).await.expect("connect to the test redis");
    (redis, store)
}

/// A raw connection for checking keys as an operator would (a cluster
/// connection, which routes each command by its key, on the cluster).
pub async fn raw(redis: &TestRedis) -> Conn {
    if let Some(nodes) = runledger::store::conn::cluster_nodes(&redis.url, false).expect("test url") {
        let client = redis::cluster::ClusterClient::new(nodes).expect("cluster client");
        return Conn::Cluster(client.get_async_connection().await.expect("raw cluster connection"));
    }
    Conn::Single(
        redis::Client::open(redis.url.as_str())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection"),
    )
}

/// Every key with its DUMP: what a refused call must leave untouched.
pub async fn keyspace(raw: &mut Conn) -> std::collections::BTreeMap<String, Vec<u8>> {
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(raw).await.expect("KEYS");
    let mut out = std::collections::BTreeMap::new();
    for key in keys {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP").arg(&key).query_async(raw).await.expect("DUMP");
        out.insert(key, dump.unwrap_or_default());
    }
    out
}

/// The seed's `_run_to_dict` keys: every run serialized to JSON has them all.
/// `claim_token` is not among them: as in LangBot's store it is only in a
/// claim's result (see CLAIM_TOKEN_KEY).
pub const SEED_RUN_KEYS: &[&str] = &[
    "id",
    "run_id",
    "event_id",
    "agent_id",
    "binding_id",
    "runner_id",
    "conversation_id",
    "thread_id",
    "workspace_id",
    "bot_id",
    "status",
    "status_reason",
    "queue_name",
    "priority",
    "requested_runtime_id",
    "claimed_by_runtime_id",
    "claim_lease_expires_at",
    "dispatch_attempts",
    "last_claimed_at",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
    "deadline_at",
    "cancel_requested_at",
    "usage",
    "cost",
    "metadata",
];

/// The key only a claim's result has.
pub const CLAIM_TOKEN_KEY: &str = "claim_token";

/// The seed's `_runtime_to_dict` keys.
pub const SEED_RUNTIME_KEYS: &[&str] = &[
    "id",
    "runtime_id",
    "status",
    "display_name",
    "endpoint",
    "version",
    "capabilities",
    "labels",
    "metadata",
    "last_heartbeat_at",
    "heartbeat_deadline_at",
    "created_at",
    "updated_at",
];

/// Every event of a run, oldest first.
pub async fn all_events(store: &runledger::Store, run_id: &str) -> Vec<runledger::RunEvent> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .page_run_events(run_id, None, after, 100, runledger::Direction::Forward)
            .await
            .unwrap_or_else(|e| panic!("events of {run_id}: {e}"));
        after = page.items.last().map(|e| e.sequence);
        out.extend(page.items);
        if !page.has_more {
            return out;
        }
    }
}

/// Waits until the server's clock is past `ms` (Unix ms). A test measures
/// its windows on the server's clock this way, so a slow machine makes it
/// slower, never red.
pub async fn until_server_passes(store: &Store, ms: i64) {
    let now = store.server_time_ms().await.expect("server time");
    assert!(ms - now < 120_000, "waiting until {ms} would take minutes (now {now})");
    while store.server_time_ms().await.expect("server time") <= ms {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Clients blocked in a command (`blocked_clients` of INFO clients) on the
/// Redis of `url`, summed over every node named in it on a cluster.
pub async fn blocked_clients(url: &str) -> usize {
    let nodes =
        runledger::store::conn::cluster_nodes(url, false).expect("test url").unwrap_or_else(|| vec![url.to_string()]);
    let mut blocked = 0;
    for node in &nodes {
        let client = redis::Client::open(node.as_str()).expect("client");
        let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
        let info: String = redis::cmd("INFO").arg("clients").query_async(&mut conn).await.expect("INFO clients");
        blocked += info
            .lines()
            .find_map(|l| l.trim().strip_prefix("blocked_clients:"))
            .and_then(|v| v.parse::<usize>().ok())
            .expect("blocked_clients in INFO clients");
    }
    blocked
}

/// Waits until at least `n` clients are blocked in a command on the Redis of
/// `url`: a waiter is then really waiting, not about to. A hang guard of
/// 30 s, not a speed limit.
pub async fn until_blocked(url: &str, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let blocked = blocked_clients(url).await;
        if blocked >= n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "hang guard: {blocked} of {n} waiters blocked after 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// How many scripts the server (every master) ran, from INFO commandstats.
pub async fn scripts_sent(raw: &mut runledger::store::Conn) -> u64 {
    let mut text = String::new();
    match raw {
        runledger::store::Conn::Single(_) => {
            text = redis::cmd("INFO").arg("commandstats").query_async(raw).await.expect("INFO");
        }
        runledger::store::Conn::Cluster(_) => {
            let nodes = runledger::store::conn::cluster_nodes(cluster_url(), false).expect("url").expect("nodes");
            for node in nodes {
                let client = redis::Client::open(node).expect("node");
                let mut conn = client.get_multiplexed_async_connection().await.expect("node conn");
                let part: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.expect("INFO");
                text.push_str(&part);
            }
        }
    }
    text.lines()
        .filter(|l| ["evalsha", "eval", "fcall", "fcall_ro"].iter().any(|c| l.starts_with(&format!("cmdstat_{c}:"))))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

/// Runs `workers` Workers (each of `concurrency`, leases of `lease`, named
/// `<name>-<i>`) on `queue` until its `completed` counter reaches `expected`,
/// then stops them; returns how many times each run id was handled. Each
/// handler sleeps `work` first. A 120 s hang guard, not a speed limit.
pub async fn run_counting_workers(
    store: &runledger::Store,
    queue: &str,
    name: &str,
    (workers, concurrency): (usize, usize),
    lease: std::time::Duration,
    work: std::time::Duration,
    expected: usize,
) -> std::collections::HashMap<String, u32> {
    use std::time::Duration;
    let handled: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>> = Default::default();
    let mut running = Vec::new();
    for w in 0..workers {
        let handled = handled.clone();
        let worker = runledger::Worker::builder(store)
            .runtime_id(format!("{name}-{w}"))
            .queue(queue)
            .concurrency(concurrency)
            .lease(lease)
            .handle_signals(false)
            .build(move |ctx| {
                let handled = handled.clone();
                async move {
                    *handled.lock().expect("lock").entry(ctx.run_id().to_string()).or_default() += 1;
                    if !work.is_zero() {
                        tokio::time::sleep(work).await;
                    }
                    Ok(runledger::Done::default())
                }
            })
            .expect("build worker");
        let token = worker.shutdown_token();
        running.push((token, tokio::spawn(worker.run())));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    // A partitioned queue's runs complete in its partitions.
    let physical = store.partitions(queue).await.expect("partitions");
    loop {
        let mut completed = 0;
        let mut all = Vec::new();
        for q in &physical {
            let stats = store.queue_stats(q, 10).await.expect("stats");
            completed += stats.counters.get("completed").copied().unwrap_or(0);
            all.push(stats);
        }
        if completed == expected as i64 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "hang guard: not every run completed: {all:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (token, task) in running {
        token.cancel();
        tokio::time::timeout(Duration::from_secs(20), task).await.expect("worker stops").expect("join").expect("run");
    }
    handled.lock().expect("lock").clone()
}
