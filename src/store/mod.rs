//! The Redis layer: one [`Store`] per process, shared by hosts and workers.
//!
//! Each operation is one script call (one round trip) on a multiplexed
//! connection. Connections are created and health-checked by a deadpool-redis
//! pool; the store keeps a couple of them checked out and shares them between
//! tasks, because the pool's checkout pings the server (a second round trip per
//! operation). A connection that fails is dropped and replaced from the pool.

mod advice;
pub use advice::ConfigAdvice;
mod events;
mod listing;
mod reaper;
pub(crate) mod reply;
mod runs;
pub use runs::{ClaimOutcome, Release};
mod waiting;
pub use waiting::{SAFETY_POLL, Waiter};
mod runtimes;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// How long finished runs and their events are kept (default 7 days).
    pub retention: Duration,
    /// How long a runtime's key outlives its heartbeat deadline, shown as `stale` (default 5 min).
    pub runtime_grace: Duration,
    /// Multiplexed connections kept checked out from the pool (default 2).
    pub connections: usize,
    /// Reply timeout of ordinary commands (default 30 s).
    pub response_timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            prefix: "rl".into(),
            max_json_bytes: 1024 * 1024,
            retention: Duration::from_secs(7 * 86_400),
            runtime_grace: Duration::from_secs(300),
            connections: 2,
            response_timeout: Duration::from_secs(30),
        }
    }
}

/// A handle on the ledger; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: StoreConfig,
    client: redis::Client,
    pool: deadpool_redis::Pool,
    conns: Vec<Mutex<Option<MultiplexedConnection>>>,
    next: AtomicUsize,
    scripts: Scripts,
    global: GlobalKeys,
    /// run_id -> queue, learned from creates, claims and lookups.
    locator: Mutex<HashMap<String, String>>,
    /// Queues this process knows exist (a cache of `<P>:queues`).
    queues: Mutex<HashSet<String>>,
}

const LOCATOR_CAP: usize = 200_000;

impl Store {
    /// Connects with the default settings.
    pub async fn connect(url: &str) -> Result<Store> {
        Store::connect_with(url, StoreConfig::default()).await
    }

    /// Connects and checks that the server answers.
    pub async fn connect_with(url: &str, cfg: StoreConfig) -> Result<Store> {
        crate::validate::id("prefix", &cfg.prefix)?;
        if cfg.max_json_bytes == 0 {
            return Err(Error::Invalid("max_json_bytes must be more than 0".into()));
        }
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(cfg.response_timeout));
        let manager = deadpool_redis::Manager::new_with_config(url, connection_config)?;
        let pool = deadpool_redis::Pool::builder(manager)
            .max_size(cfg.connections.max(1) * 2)
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Invalid(format!("connection pool: {e}")))?;
        let client = redis::Client::open(url)?;
        let store = Store {
            inner: Arc::new(Inner {
                conns: (0..cfg.connections.max(1)).map(|_| Mutex::new(None)).collect(),
                global: GlobalKeys { prefix: cfg.prefix.clone() },
                cfg,
                client,
                pool,
                next: AtomicUsize::new(0),
                scripts: Scripts::new(),
                locator: Mutex::new(HashMap::new()),
                queues: Mutex::new(HashSet::new()),
            }),
        };
        let mut conn = store.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await.map_err(Error::from_redis)?;
        Ok(store)
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.cfg
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

    /// A shared multiplexed connection for ordinary commands.
    pub async fn conn(&self) -> Result<MultiplexedConnection> {
        let slot = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.conns.len();
        if let Some(conn) = lock(&self.inner.conns[slot]).as_ref() {
            return Ok(conn.clone());
        }
        let pooled = self.inner.pool.get().await.map_err(|e| match e {
            deadpool_redis::PoolError::Backend(e) => Error::Redis(e),
            other => Error::Server(format!("connection pool: {other}")),
        })?;
        let conn = deadpool_redis::Connection::take(pooled);
        *lock(&self.inner.conns[slot]) = Some(conn.clone());
        Ok(conn)
    }

    /// A connection of its own, without reply timeout, for blocking commands
    /// (BLPOP) that would stall the shared ones.
    pub async fn dedicated_conn(&self) -> Result<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(None);
        Ok(self.inner.client.get_multiplexed_async_connection_with_config(&config).await?)
    }

    /// A pub/sub connection (cancel notices).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub> {
        Ok(self.inner.client.get_async_pubsub().await?)
    }

    /// Records a failed command; a broken connection is dropped from its slot.
    pub(crate) fn failed(&self, err: redis::RedisError) -> Error {
        if Error::is_connection_failure(&err) {
            self.drop_connections();
        }
        Error::from_redis(err)
    }

    fn drop_connections(&self) {
        for slot in &self.inner.conns {
            *lock(slot) = None;
        }
    }

    /// Runs one script by SHA (loading it on NOSCRIPT).
    pub(crate) async fn eval(&self, lua: &Lua, keys: &[String], args: &[String]) -> Result<Value> {
        self.eval_raw(lua, keys, args).await.map_err(Error::from_redis)
    }

    /// Like [`Store::eval`] but hands back the raw Redis error, for callers
    /// that retry on `RETRY`. A connection that turns out dead (Redis
    /// restarted, network dropped) is replaced and the call tried once more;
    /// a reply timeout is not retried, since the script may be running.
    pub(crate) async fn eval_raw(
        &self,
        lua: &Lua,
        keys: &[String],
        args: &[String],
    ) -> std::result::Result<Value, redis::RedisError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut conn = self.conn().await.map_err(|e| match e {
                Error::Redis(e) => e,
                other => redis::RedisError::from((redis::ErrorKind::Io, "connection", other.to_string())),
            })?;
            let mut invocation = lua.script.prepare_invoke();
            for key in keys {
                invocation.key(key);
            }
            for arg in args {
                invocation.arg(arg);
            }
            match invocation.invoke_async(&mut conn).await {
                Ok(value) => return Ok(value),
                Err(e) if Error::is_connection_failure(&e) => {
                    self.drop_connections();
                    if attempt >= 2 || e.is_timeout() {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "connection lost; retrying once on a new one");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs a pipeline of EVALSHA calls of one script (one round trip),
    /// loading the script when the server does not have it and replacing a
    /// dead connection once, as [`Store::eval_raw`] does. Only for scripts
    /// that are safe to send twice (create_run is idempotent by run_id).
    pub(crate) async fn eval_many(&self, lua: &Lua, calls: &[(Vec<String>, Vec<String>)]) -> Result<Vec<Value>> {
        let mut pipe = redis::pipe();
        for (keys, args) in calls {
            pipe.cmd("EVALSHA").arg(lua.script.get_hash()).arg(keys.len()).arg(keys).arg(args);
        }
        let (mut loaded, mut reconnected) = (false, false);
        loop {
            let mut conn = self.conn().await?;
            match pipe.query_async::<Vec<Value>>(&mut conn).await {
                Ok(values) => return Ok(values),
                Err(e) if !loaded && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                    loaded = true;
                    let _: String = redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(lua.code)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| self.failed(e))?;
                }
                Err(e) if !reconnected && Error::is_connection_failure(&e) && !e.is_timeout() => {
                    reconnected = true;
                    self.drop_connections();
                }
                Err(e) => return Err(self.failed(e)),
            }
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

    pub(crate) fn note_queue(&self, queue: &str) {
        lock(&self.inner.queues).insert(queue.to_string());
    }

    /// Every queue ever used under this prefix, sorted.
    pub async fn known_queues(&self) -> Result<Vec<String>> {
        let mut conn = self.conn().await?;
        let mut queues: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.inner.global.queues())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        queues.sort();
        let mut known = lock(&self.inner.queues);
        known.extend(queues.iter().cloned());
        Ok(queues)
    }

    /// The queue a run lives in. Run ids are unique per queue; a run id used
    /// in two queues resolves to the first in name order.
    pub async fn locate(&self, run_id: &str) -> Result<String> {
        crate::validate::id("run_id", run_id)?;
        if let Some(queue) = lock(&self.inner.locator).get(run_id) {
            return Ok(queue.clone());
        }
        let queues = self.known_queues().await?;
        if !queues.is_empty() {
            let mut pipe = redis::pipe();
            for queue in &queues {
                pipe.cmd("EXISTS").arg(self.queue_keys(queue).run(run_id));
            }
            let mut conn = self.conn().await?;
            let found: Vec<i64> = pipe.query_async(&mut conn).await.map_err(|e| self.failed(e))?;
            if let Some(pos) = found.iter().position(|&n| n == 1) {
                self.remember(run_id, &queues[pos]);
                return Ok(queues[pos].clone());
            }
        }
        Err(Error::NotFound(format!("run {run_id} does not exist")))
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

    pub(crate) fn max_json(&self) -> usize {
        self.inner.cfg.max_json_bytes
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the maps inconsistent.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
