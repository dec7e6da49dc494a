//! A master with replicas under Redis Sentinel: where the store's
//! connections go, and how they find the new master after a failover.
//!
//! The store keeps the client of the master the sentinels named last, and
//! a few multiplexed connections to it (as for a single server). Whoever
//! meets a sign that this server is no longer the master (the connection
//! broke or timed out; `READONLY`, `UNBLOCKED`, `NOREPLICAS`, `MASTERDOWN`,
//! `LOADING`) calls [`SentinelLink::forget`]; the next connection asks the
//! sentinels again, and waits with a backoff (a failover takes a few
//! seconds: `down-after-milliseconds`, then an election and a promotion) for
//! at most [`FAILOVER_WAIT`]. Lookups are serialised, so a failover seen by
//! a hundred tasks at once costs one round of questions to the sentinels.
//!
//! Connections that outlive a call (blocking waits, pub/sub) are opened on
//! the master known at the time; [`SentinelLink::switches`] tells their
//! owners when the master moved, so that a subscription left on a demoted
//! master (which stays up, now as a replica) is opened again on the new one.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::sentinel::SentinelClient;
use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::watch;

use super::conn::SentinelTarget;
use super::lock;
use crate::error::{Error, Result};

/// How long a connection waits for the sentinels to name a master that
/// answers as one: longer than a failover takes with the usual settings
/// (`down-after-milliseconds` 5-30 s in production is the user's; with the
/// private setup's 1 s it takes 2-4 s).
pub const FAILOVER_WAIT: Duration = Duration::from_secs(60);

/// How the store reaches a Sentinel-managed master.
pub(crate) struct SentinelLink {
    pub target: SentinelTarget,
    /// The redis crate's lookup (it caches its connections to the sentinels);
    /// behind an async lock so lookups are serialised.
    lookup: tokio::sync::Mutex<SentinelClient>,
    /// The master named last; `None` once forgotten.
    master: Mutex<Option<Master>>,
    /// Shared connections to it for ordinary commands.
    conns: Vec<Mutex<Option<MultiplexedConnection>>>,
    next: AtomicUsize,
    /// Bumped each time a lookup names another server than before.
    switched: watch::Sender<u64>,
    /// The last master named, kept across a forget, to tell a new master
    /// from the same one named again after a blip.
    last: Mutex<Option<String>>,
    response_timeout: Duration,
}

#[derive(Clone)]
struct Master {
    client: redis::Client,
    /// `host:port`, for logs and for noticing a switch.
    addr: String,
}

impl SentinelLink {
    pub fn new(
        target: SentinelTarget,
        certs: Option<redis::TlsCertificates>,
        connections: usize,
        response_timeout: Duration,
    ) -> Result<SentinelLink> {
        let lookup = super::conn::sentinel_client(&target, certs)?;
        Ok(SentinelLink {
            target,
            lookup: tokio::sync::Mutex::new(lookup),
            master: Mutex::new(None),
            conns: (0..connections.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            switched: watch::Sender::new(0),
            last: Mutex::new(None),
            response_timeout,
        })
    }

    /// Fails at once, rather than after [`FAILOVER_WAIT`], when the first
    /// sentinel that answers monitors no master of the target's name (a
    /// typo in the URL is not a failover to wait out).
    pub async fn check_master_name(&self) -> Result<()> {
        let sentinel = self.lookup.lock().await.async_get_sentinel_client().await?;
        let mut conn = sentinel
            .get_multiplexed_async_connection_with_config(
                &AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(Duration::from_secs(5))),
            )
            .await?;
        let addr: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.target.master)
            .query_async(&mut conn)
            .await?;
        match addr {
            Some(_) => Ok(()),
            None => Err(Error::Invalid(format!(
                "the sentinel at {} monitors no master named {:?}",
                sentinel.get_connection_info().addr(),
                self.target.master
            ))),
        }
    }

    /// The master's `host:port` as last named (None before the first lookup
    /// or after a [`SentinelLink::forget`]).
    pub fn master_addr(&self) -> Option<String> {
        lock(&self.master).as_ref().map(|m| m.addr.clone())
    }

    /// Changes each time the sentinels name another master.
    pub fn switches(&self) -> watch::Receiver<u64> {
        self.switched.subscribe()
    }

    /// A shared connection to the master for ordinary commands.
    pub async fn shared(&self) -> Result<MultiplexedConnection> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        if let Some(conn) = lock(&self.conns[slot]).as_ref() {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(self.response_timeout));
        let conn = self.open(&config).await?;
        *lock(&self.conns[slot]) = Some(conn.clone());
        Ok(conn)
    }

    /// A connection of its own to the master, without reply timeout (for
    /// blocking commands).
    pub async fn dedicated(&self) -> Result<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(None);
        self.open(&config).await
    }

    /// A pub/sub connection to the master.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub> {
        self.on_master(|client| async move { client.get_async_pubsub().await }).await
    }

    /// Opens a connection to the master.
    async fn open(&self, config: &AsyncConnectionConfig) -> Result<MultiplexedConnection> {
        self.on_master(|client| async move { client.get_multiplexed_async_connection_with_config(config).await }).await
    }

    /// Runs `connect` on the master's client, asking the sentinels again
    /// while the one they named cannot be reached (it died, they have not
    /// noticed yet), with a backoff, for at most [`FAILOVER_WAIT`].
    async fn on_master<T, F, Fut>(&self, connect: F) -> Result<T>
    where
        F: Fn(redis::Client) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let deadline = Instant::now() + FAILOVER_WAIT;
        let mut pause = Duration::from_millis(50);
        loop {
            let master = self.master().await?;
            match connect(master.client.clone()).await {
                Ok(conn) => return Ok(conn),
                Err(e) if Error::is_connection_failure(&e) && Instant::now() + pause < deadline => {
                    self.forget_if(&master.addr, &e);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Forgets the master and drops the shared connections: the next
    /// connection asks the sentinels which server is the master now.
    pub fn forget(&self, why: &RedisError) {
        let was = lock(&self.master).take();
        for slot in &self.conns {
            *lock(slot) = None;
        }
        if let Some(was) = was {
            tracing::info!(master = %was.addr, error = %why, "the Sentinel master failed or stepped down; asking the sentinels again");
        }
    }

    /// [`SentinelLink::forget`], unless another task already found a new master.
    fn forget_if(&self, addr: &str, why: &RedisError) {
        if self.master_addr().as_deref() == Some(addr) {
            self.forget(why);
        }
    }

    /// The master's client: the one named last, else the sentinels' answer,
    /// waited for (with a backoff) while a failover is under way.
    async fn master(&self) -> Result<Master> {
        if let Some(master) = lock(&self.master).clone() {
            return Ok(master);
        }
        let mut lookup = self.lookup.lock().await;
        // Found by another task while this one waited for the lock.
        if let Some(master) = lock(&self.master).clone() {
            return Ok(master);
        }
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        let mut tries = 0u32;
        loop {
            tries += 1;
            match lookup.async_get_client().await {
                Ok(client) => {
                    let addr = client.get_connection_info().addr().to_string();
                    let master = Master { client, addr: addr.clone() };
                    let previous = self.last_addr(&addr);
                    *lock(&self.master) = Some(master.clone());
                    if previous.is_some_and(|p| p != addr) {
                        self.switched.send_modify(|n| *n += 1);
                        tracing::info!(master = %addr, waited = ?started.elapsed(), tries, "the sentinels name a new master");
                    }
                    return Ok(master);
                }
                Err(e) if lookup_transient(&e) && started.elapsed() + pause < FAILOVER_WAIT => {
                    tracing::debug!(error = %e, ?pause, "no master named by the sentinels yet; asking again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::warn!(error = %e, waited = ?started.elapsed(), master = %self.target.master, "the sentinels name no reachable master");
                    return Err(e.into());
                }
            }
        }
    }

    /// Remembers `addr` as the last master seen and returns the one before.
    fn last_addr(&self, addr: &str) -> Option<String> {
        lock(&self.last).replace(addr.to_string())
    }
}

/// A lookup that may succeed a moment later: no master named yet (it is
/// down, being elected, or just promoted), a sentinel or the named master
/// unreachable, a master still loading its data. Not a wrong password, a
/// server that is not a sentinel, or a bad configuration.
fn lookup_transient(e: &RedisError) -> bool {
    matches!(e.kind(), redis::ErrorKind::MasterNameNotFoundBySentinel)
        || Error::is_connection_failure(e)
        || matches!(e.code(), Some("LOADING" | "MASTERDOWN" | "BUSY"))
}

/// True for an answer that means the server is not (or no longer) a usable
/// master: it was demoted (`READONLY` to a write, `UNBLOCKED` to a blocked
/// command), it lost its replicas (`NOREPLICAS`, `MASTERDOWN`), or it is
/// loading its data after a restart. The command was not run.
pub(crate) fn is_role_change(e: &RedisError) -> bool {
    matches!(e.code(), Some("READONLY" | "UNBLOCKED" | "NOREPLICAS" | "MASTERDOWN" | "LOADING"))
}
