//! Test harness: every test gets a private Redis.
//!
//! With `redis-server` on PATH it starts one on a free loopback port with its
//! own temp dir and kills it (by PID) when the test's handle drops. Without the
//! binary but with a reachable Docker engine it runs `redis:7` through
//! testcontainers. With neither it fails with a message saying what to install.
#![allow(dead_code)]

use runledger::embedded::{RedisServer, find_redis_server};
use runledger::{Store, StoreConfig};
use testcontainers::ImageExt;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage};

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

/// Starts a private Redis for one test.
pub async fn redis() -> TestRedis {
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

/// A raw connection for checking keys as an operator would.
pub async fn raw(redis: &TestRedis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

/// The seed's `_run_to_dict` keys: every run serialized to JSON has them all.
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
    "claim_token",
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
