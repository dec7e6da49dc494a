//! The Redis layer: one [`Store`] per process, shared by hosts and workers.
//!
//! Each operation is one script call (one round trip) on a multiplexed
//! connection, to a single server or to a Redis Cluster (see [`conn`]).
//! Single-server connections are created and health-checked by a
//! deadpool-redis pool; the store keeps a couple of them checked out and
//! shares them between tasks, because the pool's checkout pings the server (a
//! second round trip per operation). A connection that fails is dropped and
//! replaced from the pool. A cluster connection mostly repairs itself (it
//! follows MOVED/ASK and reconnects after a failover); one that still times
//! out or breaks is replaced by a new one, which reads the slots afresh.
//! Under Redis Sentinel the connections go to the master the sentinels
//! name, and are opened again on the new one after a failover (see
//! [`sentinel`]).

mod advice;
pub use advice::ConfigAdvice;
pub mod conn;
pub use conn::Conn;
mod events;
mod groups;
mod limits;
pub use events::{MAX_EVENTS_PER_CALL, MAX_SEQUENCE};
pub use groups::{GroupBy, GroupSettings, QueueGroups};
pub use limits::{LimitSettings, QueueLimits, RateLimit};
mod listing;
mod locator;
mod notices;
mod operator;
pub use operator::requeued_run_id;
pub mod partitions;
pub use notices::CancelNotices;
mod reaper;
pub(crate) mod reply;
mod runs;
pub use reaper::REAP_BATCH;
pub use runs::{ClaimOutcome, MAX_RUNS_PER_BATCH, Release};
mod waiting;
pub use waiting::{SAFETY_POLL, Waiter};
mod runtimes;
pub mod sentinel;
mod stats;
pub use stats::{RunStats, RunnerStats, RuntimeStats};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

use crate::error::{Error, Result};
use crate::keys::{GlobalKeys, QueueKeys};
use crate::scripts::{Lua, Scripts};

/// Settings of a [`Store`].
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Prefix of every key (default `rl`).
    pub prefix: String,
    /// Largest JSON document accepted for metadata, data, usage... (default 1 MiB).
    pub max_json_bytes: usize,
    /// The most events one run may hold, audit events included (default
    /// 100,000; at most 10,000,000). An append past it is [`Error::Limit`]
    /// and writes nothing.
    pub max_events_per_run: u32,
    /// How long finished runs and their events are kept (default 7 days).
    pub retention: Duration,
    /// How long a runtime's key outlives its heartbeat deadline, shown as `stale` (default 5 min).
    pub runtime_grace: Duration,
    /// Multiplexed connections kept checked out from the pool (default 2; single server only).
    pub connections: usize,
    /// Reply timeout of ordinary commands (default 30 s).
    pub response_timeout: Duration,
    /// Treat a plain `redis://` URL as the seed node(s) of a Redis Cluster
    /// (a `redis+cluster://` URL always is one). Default false.
    pub cluster: bool,
    /// Treat a plain `redis://` URL as the sentinels (`host:port,host:port`)
    /// of a Sentinel-managed master of this name (a
    /// `redis+sentinel://.../<name>` URL always is one). Default `None`.
    pub sentinel_master: Option<String>,
    /// Write concern: every acknowledged write waits (Redis `WAIT`) until this
    /// many replicas have it, at most `replica_timeout`. 0 (default) = off.
    pub wait_replicas: u32,
    /// How long a write waits for its replicas (default 1 s).
    pub replica_timeout: Duration,
    /// A `running` run (created for direct execution, so without a lease)
    /// that is not finished this long after its start ends `timeout` at the
    /// next reaper pass: its host is presumably gone. `None` = never.
    /// Default 24 h.
    pub running_timeout: Option<Duration>,
    /// A run pinned to a runtime whose key is gone (it stopped heartbeating
    /// and expired, or never registered) loses its pin at the next reaper
    /// pass once it is this old, and any runtime may claim it. Default 5 min.
    pub pin_grace: Duration,
    /// PEM file of the CA certificate(s) that sign the server's certificate,
    /// trusted instead of the system's roots on a `rediss://` URL (like
    /// redis-cli's `--cacert`); read once at connect, for every connection.
    /// `None` (default) = the system's roots (which honour `SSL_CERT_FILE`).
    pub tls_ca_file: Option<PathBuf>,
    /// Call the operations as Redis Functions (`FCALL` of this build's
    /// library, loaded where missing) while the server allows them; refused
    /// (an ACL without `FCALL` or `FUNCTION LOAD`, a server before 7.0), the
    /// store runs the same Lua as scripts (`EVALSHA`) from then on. False:
    /// scripts only. Default true.
    pub functions: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            prefix: "rl".into(),
            max_json_bytes: 1024 * 1024,
            max_events_per_run: 100_000,
            retention: Duration::from_secs(7 * 86_400),
            runtime_grace: Duration::from_secs(300),
            connections: 2,
            response_timeout: Duration::from_secs(30),
            cluster: false,
            sentinel_master: None,
            wait_replicas: 0,
            replica_timeout: Duration::from_secs(1),
            running_timeout: Some(Duration::from_secs(86_400)),
            pin_grace: Duration::from_secs(300),
            tls_ca_file: None,
            functions: true,
        }
    }
}

/// A handle on the ledger; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// How the store reaches Redis (one per store, so the size of a variant does not matter).
#[allow(clippy::large_enum_variant)]
enum Backend {
    Single {
        client: redis::Client,
        pool: deadpool_redis::Pool,
        conns: Vec<Mutex<Option<MultiplexedConnection>>>,
        next: AtomicUsize,
    },
    Cluster {
        nodes: conn::Seeds,
        client: redis::cluster::ClusterClient,
        /// Shared; replaced (with a fresh look at the slots) when a call on
        /// it times out or finds it broken, as around a failover.
        conn: Mutex<Option<redis::cluster_async::ClusterConnection>>,
        /// Without reply timeout: BLPOP waits longer than ordinary replies.
        blocking: redis::cluster::ClusterClient,
    },
    /// A master with replicas under Redis Sentinel.
    Sentinel(sentinel::SentinelLink),
}

struct Inner {
    cfg: StoreConfig,
    backend: Backend,
    scripts: Scripts,
    global: GlobalKeys,
    /// run_id -> queue, learned from creates, claims and lookups.
    locator: Mutex<HashMap<String, String>>,
    /// Queues this process knows exist, with their numbers (a cache of `<P>:queues`).
    queues: Mutex<HashMap<String, u32>>,
    /// Partitioned queues (a cache of `<P>:partitions`).
    partitions: Mutex<partitions::PartitionCache>,
    /// Rotates the partition a claim starts at.
    turn: AtomicUsize,
    /// Claims sent whose answer was lost (see `runs::Unanswered`).
    unanswered: Mutex<Vec<runs::Unanswered>>,
    /// How operations are called: [`FUNCTIONS`] until the server refuses
    /// them, then [`SCRIPTS`] for the life of the store.
    way_in: AtomicU8,
}

/// Operations are called with `FCALL` (the library is loaded where missing).
const FUNCTIONS: u8 = 0;
/// Operations are run as scripts with `EVALSHA`: `FUNCTION LOAD` or `FCALL`
/// was refused (an ACL without them, a server before 7.0).
const SCRIPTS: u8 = 1;

/// How the server answered a call whose function or script it lacked.
enum Missing {
    /// The library is loaded now (or was already): send again.
    Loaded,
    /// Functions are refused here: send again as scripts.
    Refused,
}

const LOCATOR_CAP: usize = 200_000;

/// Resends of a call that met a cluster in motion (MOVED, CLUSTERDOWN...),
/// with [`cluster_backoff`] between them: about 7 s in all, longer than a
/// failover takes.
const CLUSTER_RETRIES: u32 = 16;

fn cluster_backoff(attempt: u32) -> Duration {
    Duration::from_millis((50 * u64::from(attempt)).min(1000))
}

impl Store {
    /// Connects with the default settings; a `redis+cluster://` URL connects to a cluster.
    pub async fn connect(url: &str) -> Result<Store> {
        Store::connect_with(url, StoreConfig::default()).await
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port/` each).
    pub async fn connect_cluster(nodes: &[String], cfg: StoreConfig) -> Result<Store> {
        // One URL naming every node: the scheme (and credentials) of the first, each node's host:port.
        let (scheme, _) = nodes
            .first()
            .and_then(|n| n.split_once("://"))
            .ok_or_else(|| Error::Invalid("connect_cluster needs at least one redis:// node URL".into()))?;
        let hosts: Vec<&str> = nodes
            .iter()
            .map(|n| n.split_once("://").map_or(n.as_str(), |(_, rest)| rest).trim_end_matches('/'))
            .collect();
        Store::connect_with(&format!("{scheme}://{}/", hosts.join(",")), StoreConfig { cluster: true, ..cfg }).await
    }

    /// Connects and checks that the server answers.
    pub async fn connect_with(url: &str, cfg: StoreConfig) -> Result<Store> {
        crate::validate::prefix(&cfg.prefix)?;
        if !(1..=10_000_000).contains(&cfg.max_events_per_run) {
            return Err(Error::Invalid(format!(
                "max_events_per_run must be in 1..=10000000, got {}",
                cfg.max_events_per_run
            )));
        }
        if cfg.max_json_bytes == 0 {
            return Err(Error::Invalid("max_json_bytes must be more than 0".into()));
        }
        if cfg.wait_replicas > 0 && cfg.replica_timeout.is_zero() {
            return Err(Error::Invalid("replica_timeout must be more than 0 with wait_replicas".into()));
        }
        let tls = conn::tls_certificates(url, cfg.tls_ca_file.as_deref())?;
        let functions = cfg.functions;
        let sentinel = conn::sentinel_target(url, cfg.sentinel_master.as_deref())?;
        if sentinel.is_some() && cfg.cluster {
            return Err(Error::Invalid("a Sentinel master and a Redis Cluster exclude each other".into()));
        }
        let backend = match conn::cluster_nodes(url, cfg.cluster)? {
            _ if sentinel.is_some() => {
                let target = sentinel.ok_or_else(|| Error::Invalid("no Sentinel target".into()))?;
                let link = sentinel::SentinelLink::new(target, tls, cfg.connections, cfg.response_timeout)?;
                link.check_master_name().await?;
                Backend::Sentinel(link)
            }
            Some(urls) => {
                let nodes = conn::Seeds { urls, tls };
                let client = conn::cluster_client(&nodes, Some(cfg.response_timeout), None)?;
                let conn = client.get_async_connection().await?;
                let blocking = conn::cluster_client(&nodes, None, None)?;
                Backend::Cluster { nodes, client, conn: Mutex::new(Some(conn)), blocking }
            }
            None => {
                let connection_config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(cfg.response_timeout));
                let client = match tls {
                    Some(certs) => redis::Client::build_with_tls(url, certs)?,
                    None => redis::Client::open(url)?,
                };
                let manager =
                    deadpool_redis::Manager::new_with_config(client.get_connection_info().clone(), connection_config)?;
                let pool = deadpool_redis::Pool::builder(manager)
                    .max_size(cfg.connections.max(1) * 2)
                    .runtime(deadpool_redis::Runtime::Tokio1)
                    .build()
                    .map_err(|e| Error::Invalid(format!("connection pool: {e}")))?;
                Backend::Single {
                    client,
                    pool,
                    conns: (0..cfg.connections.max(1)).map(|_| Mutex::new(None)).collect(),
                    next: AtomicUsize::new(0),
                }
            }
        };
        let store = Store {
            inner: Arc::new(Inner {
                global: GlobalKeys { prefix: cfg.prefix.clone() },
                cfg,
                backend,
                scripts: Scripts::new(),
                locator: Mutex::new(HashMap::new()),
                queues: Mutex::new(HashMap::new()),
                partitions: Mutex::new(Default::default()),
                turn: AtomicUsize::new(0),
                unanswered: Mutex::new(Vec::new()),
                way_in: AtomicU8::new(if functions { FUNCTIONS } else { SCRIPTS }),
            }),
        };
        let mut conn = store.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await.map_err(Error::from_redis)?;
        if !store.is_cluster() && !store.is_sentinel() && conn::is_cluster_node(&mut conn).await {
            // A plain URL of a cluster node: every key of another node's slots would answer
            // MOVED, so talk to it as the cluster it belongs to (it seeds the slot map).
            tracing::info!("the server is a Redis Cluster node; connecting to its cluster");
            let cfg = StoreConfig { cluster: true, ..store.inner.cfg.clone() };
            drop(conn);
            return Box::pin(Store::connect_with(url, cfg)).await;
        }
        Ok(store)
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.cfg
    }

    /// True when the store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.backend, Backend::Cluster { .. })
    }

    /// True when the store finds its master through Redis Sentinel.
    pub fn is_sentinel(&self) -> bool {
        matches!(self.inner.backend, Backend::Sentinel(_))
    }

    /// Under Sentinel, the master's `host:port` as the sentinels named it
    /// last (`None` while a failover is being waited out, and elsewhere).
    pub fn sentinel_master_addr(&self) -> Option<String> {
        match &self.inner.backend {
            Backend::Sentinel(link) => link.master_addr(),
            _ => None,
        }
    }

    /// The seed nodes of a cluster store (empty for a single server).
    pub fn cluster_nodes(&self) -> &[String] {
        match &self.inner.backend {
            Backend::Cluster { nodes, .. } => &nodes.urls,
            Backend::Single { .. } | Backend::Sentinel(_) => &[],
        }
    }

    pub(crate) fn scripts(&self) -> &Scripts {
        &self.inner.scripts
    }

    pub(crate) fn global(&self) -> &GlobalKeys {
        &self.inner.global
    }

    /// The keys of one queue.
    pub fn queue_keys(&self, queue: &str) -> QueueKeys {
        QueueKeys::new(&self.inner.cfg.prefix, queue)
    }

    /// A shared connection for ordinary commands.
    pub async fn conn(&self) -> Result<Conn> {
        let (pool, conns, next) = match &self.inner.backend {
            Backend::Cluster { client, conn, .. } => {
                if let Some(conn) = lock(conn).as_ref() {
                    return Ok(Conn::Cluster(conn.clone()));
                }
                let fresh = client.get_async_connection().await?;
                *lock(conn) = Some(fresh.clone());
                return Ok(Conn::Cluster(fresh));
            }
            Backend::Sentinel(link) => return Ok(Conn::Single(link.shared().await?)),
            Backend::Single { pool, conns, next, .. } => (pool, conns, next),
        };
        let slot = next.fetch_add(1, Ordering::Relaxed) % conns.len();
        if let Some(conn) = lock(&conns[slot]).as_ref() {
            return Ok(Conn::Single(conn.clone()));
        }
        let pooled = pool.get().await.map_err(|e| match e {
            deadpool_redis::PoolError::Backend(e) => Error::Redis(e),
            other => Error::Server(format!("connection pool: {other}")),
        })?;
        let conn = deadpool_redis::Connection::take(pooled);
        *lock(&conns[slot]) = Some(conn.clone());
        Ok(Conn::Single(conn))
    }

    /// A connection of its own, without reply timeout, for blocking commands
    /// (BLPOP) that would stall the shared ones. On a cluster it routes each
    /// command to the node that owns its key, and follows a failover.
    pub async fn dedicated_conn(&self) -> Result<Conn> {
        match &self.inner.backend {
            Backend::Single { client, .. } => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(None);
                Ok(Conn::Single(client.get_multiplexed_async_connection_with_config(&config).await?))
            }
            Backend::Cluster { blocking, .. } => Ok(Conn::Cluster(blocking.get_async_connection().await?)),
            Backend::Sentinel(link) => Ok(Conn::Single(link.dedicated().await?)),
        }
    }

    /// Records a failed command; a broken connection is dropped from its slot.
    pub(crate) fn failed(&self, err: redis::RedisError) -> Error {
        if Error::is_connection_failure(&err) {
            self.drop_connections();
        } else if let Backend::Sentinel(link) = &self.inner.backend
            && sentinel::is_role_change(&err)
        {
            link.forget(&err);
        }
        Error::from_redis(err)
    }

    /// True when a connection of its own (a blocking wait's) must be
    /// dropped after `err`: it broke, or under Sentinel it leads to a
    /// server that is no longer the master, which is then forgotten.
    pub(crate) fn blocking_conn_lost(&self, err: &redis::RedisError) -> bool {
        match &self.inner.backend {
            Backend::Sentinel(link) if Error::is_connection_failure(err) || sentinel::is_role_change(err) => {
                link.forget(err);
                true
            }
            _ => Error::is_connection_failure(err),
        }
    }

    /// True when, under Sentinel, `err` says the server is no longer the
    /// master (it has been forgotten, and the call may be sent again).
    fn master_moved(&self, err: &redis::RedisError) -> bool {
        match &self.inner.backend {
            Backend::Sentinel(link) if sentinel::is_role_change(err) => {
                link.forget(err);
                true
            }
            _ => false,
        }
    }

    fn drop_connections(&self) {
        match &self.inner.backend {
            Backend::Single { conns, .. } => {
                for slot in conns {
                    *lock(slot) = None;
                }
            }
            Backend::Cluster { conn, .. } => *lock(conn) = None,
            Backend::Sentinel(link) => link.forget(&redis::RedisError::from((
                redis::ErrorKind::Io,
                "connection",
                "connection lost or reply timed out".to_string(),
            ))),
        }
    }

    /// Runs one script by SHA (loading it on NOSCRIPT).
    pub(crate) async fn eval(&self, lua: &Lua, keys: &[String], args: &[String]) -> Result<Value> {
        self.eval_raw(lua, keys, args).await.map_err(|e| self.failed(e))
    }

    /// Like [`Store::eval`] but hands back the raw Redis error, for callers
    /// that retry on `RETRY`. A connection that turns out dead (Redis
    /// restarted, network dropped) or a reply that timed out is given up, and
    /// the call sent once more on a new connection: every script is safe to
    /// resend (the same request gives the first call's answer; see the
    /// receipts in lua/include/common.lua), so a call whose reply was lost
    /// is settled rather than left in doubt.
    pub(crate) async fn eval_raw(
        &self,
        lua: &Lua,
        keys: &[String],
        args: &[String],
    ) -> std::result::Result<Value, redis::RedisError> {
        let call = vec![(keys.to_vec(), args.to_vec())];
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.eval_pipelined(lua, &call).await {
                Ok(mut values) => return values.pop().ok_or_else(|| short_reply("script")),
                Err(e) if Error::is_connection_failure(&e) => {
                    self.drop_connections();
                    if attempt >= 2 {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "connection lost or reply timed out; resending once on a new one");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs calls of one script that all name keys of ONE slot (one queue)
    /// as one pipeline (one round trip), loading the script when the server
    /// does not have it. With the write concern on, a `WAIT` ends the
    /// pipeline, on the same node, and a write that too few replicas
    /// acknowledged is an [`Error::WriteConcern`]-shaped error.
    async fn eval_pipelined(
        &self,
        lua: &Lua,
        calls: &[(Vec<String>, Vec<String>)],
    ) -> std::result::Result<Vec<Value>, redis::RedisError> {
        let wait = self.inner.cfg.wait_replicas;
        let concern = wait > 0 && lua.writes;
        let pipeline = |way_in: u8| {
            let mut pipe = redis::pipe();
            for (keys, args) in calls {
                if way_in == FUNCTIONS && lua.writes {
                    pipe.cmd("FCALL").arg(&lua.function);
                } else if way_in == FUNCTIONS {
                    // A no-writes function: also callable where only reads are allowed.
                    pipe.cmd("FCALL_RO").arg(&lua.function);
                } else {
                    pipe.cmd("EVALSHA").arg(lua.script.get_hash());
                }
                pipe.arg(keys.len()).arg(keys).arg(args);
            }
            if concern {
                pipe.cmd("WAIT").arg(wait).arg(self.inner.cfg.replica_timeout.as_millis() as u64);
            }
            pipe
        };
        let (mut library_loaded, mut script_loaded) = (false, false);
        let mut moved = 0;
        loop {
            let way_in = self.inner.way_in.load(Ordering::Relaxed);
            let mut conn = self.conn().await.map_err(into_redis_error)?;
            match pipeline(way_in).query_async::<Vec<Value>>(&mut conn).await.map_err(first_server_error) {
                Ok(mut values) => {
                    if concern {
                        let acked = match values.pop() {
                            Some(Value::Int(n)) => n,
                            _ => 0,
                        };
                        if acked < i64::from(wait) {
                            return Err(redis::RedisError::from((
                                redis::ErrorKind::Client,
                                "write concern",
                                format!(
                                    "WRITE_CONCERN the write was applied but only {acked} of {wait} replicas \
                                     acknowledged it within {} ms",
                                    self.inner.cfg.replica_timeout.as_millis()
                                ),
                            )));
                        }
                    }
                    return Ok(values);
                }
                Err(e) if way_in == FUNCTIONS && functions_refused(&e) => self.use_scripts(&e),
                // The node lacks the library (new, restarted empty, flushed,
                // promoted from a replica that never had it): loaded and sent again.
                Err(e) if way_in == FUNCTIONS && !library_loaded && is_function_missing(&e) => {
                    library_loaded = true;
                    match load_library(&mut conn).await? {
                        Missing::Loaded => {}
                        Missing::Refused => self.use_scripts(&e),
                    }
                }
                Err(e)
                    if way_in == SCRIPTS
                        && !script_loaded
                        && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    script_loaded = true;
                    // On a cluster SCRIPT LOAD goes to every master.
                    let _: Value = redis::cmd("SCRIPT").arg("LOAD").arg(lua.code).query_async(&mut conn).await?;
                }
                // A pipeline is not redirected by the cluster client: read
                // the slots again and resend, for up to about 7 s (a failover).
                Err(e) if Error::is_cluster_transient(&e) && moved < CLUSTER_RETRIES => {
                    moved += 1;
                    self.drop_connections();
                    tokio::time::sleep(cluster_backoff(moved)).await;
                }
                // A demoted (or not yet writable) Sentinel master refused the
                // call without running it: ask the sentinels again and resend.
                Err(e) if moved < CLUSTER_RETRIES && self.master_moved(&e) => {
                    moved += 1;
                    tracing::debug!(error = %e, "the Sentinel master refused the call; resending to the new one");
                    tokio::time::sleep(cluster_backoff(moved)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// From now on this store runs its operations as scripts.
    fn use_scripts(&self, why: &redis::RedisError) {
        if self.inner.way_in.swap(SCRIPTS, Ordering::Relaxed) == FUNCTIONS {
            tracing::info!(reason = %why, "Redis Functions are refused here; running the operations as scripts (EVALSHA)");
        }
    }

    /// True when operations go in as `FCALL` (false: as `EVALSHA` scripts).
    pub fn uses_functions(&self) -> bool {
        self.inner.way_in.load(Ordering::Relaxed) == FUNCTIONS
    }

    /// Loads this build's Functions library (on every master of a cluster),
    /// as `runledger functions load` does for an operator whose tenants may
    /// call `FCALL` but not `FUNCTION`. Returns the library's name; loading
    /// it again is a no-op.
    pub async fn load_functions(&self) -> Result<String> {
        let mut conn = self.conn().await?;
        let name = crate::scripts::library().name.clone();
        match redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg(&crate::scripts::library().code)
            .query_async::<Value>(&mut conn)
            .await
        {
            Ok(_) => Ok(name),
            Err(e) if is_already_loaded(&e) => Ok(name),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Sends plain write commands that may name keys of different slots
    /// (see [`Conn::query_all`]); with the write concern on, each waits for
    /// its replicas like a script call does.
    /// The commands must be safe to send twice (SET NX, PEXPIRE, DEL): a
    /// connection found dead is replaced and they are sent once more.
    pub(crate) async fn write_all(&self, cmds: Vec<redis::Cmd>) -> Result<Vec<Value>> {
        let mut moved = 0;
        loop {
            match self.write_all_once(cmds.clone()).await {
                Err(Error::Redis(e)) if Error::is_connection_failure(&e) && moved == 0 => {
                    moved += 1;
                    self.drop_connections();
                }
                Err(Error::Redis(e)) if Error::is_cluster_transient(&e) && moved < CLUSTER_RETRIES => {
                    moved += 1;
                    self.drop_connections();
                    tokio::time::sleep(cluster_backoff(moved)).await;
                }
                Err(Error::Redis(e)) if moved < CLUSTER_RETRIES && self.master_moved(&e) => {
                    moved += 1;
                    tokio::time::sleep(cluster_backoff(moved)).await;
                }
                other => return other,
            }
        }
    }

    async fn write_all_once(&self, cmds: Vec<redis::Cmd>) -> Result<Vec<Value>> {
        let wait = self.inner.cfg.wait_replicas;
        let mut conn = self.conn().await?;
        if wait == 0 || cmds.is_empty() {
            return conn.query_all(cmds).await.map_err(|e| self.failed(e));
        }
        let timeout = self.inner.cfg.replica_timeout.as_millis() as u64;
        let n = cmds.len();
        // WAIT goes with each command to the node that took the write.
        let pipes = cmds.into_iter().map(|cmd| {
            let mut pipe = redis::pipe();
            pipe.add_command(cmd).cmd("WAIT").arg(wait).arg(timeout);
            let mut conn = conn.clone();
            async move { pipe.query_async::<(Value, i64)>(&mut conn).await }
        });
        let mut out = Vec::with_capacity(n);
        for reply in futures_util::future::join_all(pipes).await {
            let (value, acked) = reply.map_err(|e| self.failed(first_server_error(e)))?;
            if acked < i64::from(wait) {
                return Err(Error::WriteConcern(format!(
                    "the write was applied but only {acked} of {wait} replicas acknowledged it within {timeout} ms"
                )));
            }
            out.push(value);
        }
        Ok(out)
    }

    /// Runs calls of one script on one queue as one pipeline (one round trip);
    /// a dead connection or a lost reply is retried once, as in [`Store::eval_raw`].
    pub(crate) async fn eval_many(&self, lua: &Lua, calls: &[(Vec<String>, Vec<String>)]) -> Result<Vec<Value>> {
        match self.eval_pipelined(lua, calls).await {
            Err(e) if Error::is_connection_failure(&e) => {
                self.drop_connections();
                self.eval_pipelined(lua, calls).await.map_err(|e| self.failed(e))
            }
            other => other.map_err(|e| self.failed(e)),
        }
    }

    /// Current server time in epoch milliseconds.
    pub async fn server_time_ms(&self) -> Result<i64> {
        let mut conn = self.conn().await?;
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.map_err(|e| self.failed(e))?;
        Ok(secs * 1000 + micros / 1000)
    }

    pub(crate) fn remember(&self, run_id: &str, queue: &str) {
        let mut map = lock(&self.inner.locator);
        if map.len() >= LOCATOR_CAP {
            map.clear();
        }
        map.insert(run_id.to_string(), queue.to_string());
    }

    /// Drops the cached number of a queue the server no longer knows (it restarted empty).
    pub(crate) fn forget_queue(&self, queue: &str) {
        lock(&self.inner.queues).remove(queue);
    }

    pub(crate) fn forget(&self, run_id: &str) {
        lock(&self.inner.locator).remove(run_id);
    }

    pub(crate) fn cached_location(&self, run_id: &str) -> Option<String> {
        lock(&self.inner.locator).get(run_id).cloned()
    }

    /// Every queue ever used under this prefix, sorted.
    pub async fn known_queues(&self) -> Result<Vec<String>> {
        let mut conn = self.conn().await?;
        let numbers: HashMap<String, u32> = redis::cmd("HGETALL")
            .arg(self.inner.global.queues())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        let mut queues: Vec<String> = numbers.keys().cloned().collect();
        queues.sort();
        lock(&self.inner.queues).extend(numbers);
        Ok(queues)
    }

    /// The number of a queue (part of every run id it creates), registering
    /// the queue on first use. Cached: one round trip per queue and process.
    pub(crate) async fn queue_number(&self, queue: &str) -> Result<u32> {
        Ok(self.queue_number_fresh(queue).await?.0)
    }

    /// The queue's number, and whether it was registered (read from Redis)
    /// just now rather than taken from the cache.
    pub(crate) async fn queue_number_fresh(&self, queue: &str) -> Result<(u32, bool)> {
        if let Some(n) = lock(&self.inner.queues).get(queue) {
            return Ok((*n, false));
        }
        self.register_queue(queue).await.map(|n| (n, true))
    }

    /// Registers a queue (idempotent) and caches its number.
    pub(crate) async fn register_queue(&self, queue: &str) -> Result<u32> {
        let args = vec![queue.to_string(), crate::keys::MAX_QUEUES.to_string()];
        let value = self.eval(&self.scripts().register_queue, &[self.inner.global.queues()], &args).await?;
        let n = u32::try_from(reply::int(value)?).map_err(|_| Error::Protocol("register_queue: bad number".into()))?;
        lock(&self.inner.queues).insert(queue.to_string(), n);
        Ok(n)
    }

    /// Where a run lives: its queue's keys, and the KEYS of a script on it
    /// (the queue's fixed keys, then the run hash).
    pub(crate) async fn run_keys(&self, run_id: &str) -> Result<(QueueKeys, Vec<String>)> {
        let queue = self.locate(run_id).await?;
        let keys = self.queue_keys(&queue);
        let mut k: Vec<String> = keys.fixed().into();
        k.push(keys.run(run_id));
        Ok((keys, k))
    }

    pub(crate) fn retention_ms(&self) -> String {
        self.inner.cfg.retention.as_millis().to_string()
    }

    /// How long a finished run's keys live: the retention plus a day, after
    /// which the TTL removes what no reaper purged.
    pub(crate) fn finished_ttl_ms(&self) -> u64 {
        self.inner.cfg.retention.as_millis() as u64 + 86_400_000
    }

    pub(crate) fn max_json(&self) -> usize {
        self.inner.cfg.max_json_bytes
    }

    /// The command the scripts publish cancel notices with: sharded pub/sub
    /// on a cluster (the channel lives in the queue's slot, so the notice
    /// stays on that shard), classic pub/sub on one server.
    pub(crate) fn publish_command(&self) -> &'static str {
        if self.is_cluster() { "SPUBLISH" } else { "PUBLISH" }
    }
}

/// `FCALL` of a function no library on this node defines.
fn is_function_missing(e: &redis::RedisError) -> bool {
    e.code() == Some("ERR") && e.detail().is_some_and(|d| d.starts_with("Function not found"))
}

/// `FCALL` refused: by the ACL (NOPERM), or by a server without Functions.
fn functions_refused(e: &redis::RedisError) -> bool {
    e.code() == Some("NOPERM")
        || (e.code() == Some("ERR")
            && e.detail().is_some_and(|d| d.to_ascii_lowercase().starts_with("unknown command")))
}

/// `FUNCTION LOAD` of a library that is there already (another client loaded it first).
fn is_already_loaded(e: &redis::RedisError) -> bool {
    e.detail().is_some_and(|d| d.contains("already exists"))
}

/// Loads the library where a call found it missing.
async fn load_library(conn: &mut Conn) -> std::result::Result<Missing, redis::RedisError> {
    let library = crate::scripts::library();
    match redis::cmd("FUNCTION").arg("LOAD").arg(&library.code).query_async::<Value>(conn).await {
        Ok(_) => Ok(Missing::Loaded),
        Err(e) if is_already_loaded(&e) => Ok(Missing::Loaded),
        Err(e) if functions_refused(&e) => Ok(Missing::Refused),
        Err(e) => Err(e),
    }
}

/// A pipeline reports its failing command inside a list; the scripts'
/// error codes (`STALE_TOKEN ...`) are read from the first one.
fn first_server_error(e: redis::RedisError) -> redis::RedisError {
    match e.clone().into_server_errors() {
        Some(items) if !items.is_empty() => redis::RedisError::from(items[0].1.clone()),
        _ => e,
    }
}

fn short_reply(what: &str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Client, "short reply", what.to_string()))
}

fn into_redis_error(e: Error) -> redis::RedisError {
    match e {
        Error::Redis(e) => e,
        other => redis::RedisError::from((redis::ErrorKind::Io, "connection", other.to_string())),
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the maps inconsistent.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
