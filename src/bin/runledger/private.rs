//! The private Redis that `demo` and `bench` start when no URL is given: one
//! redis-server, with `--cluster` a local 6-node Redis Cluster (3 masters,
//! 3 replicas), or with `demo --sentinel` a master, 2 replicas and 3
//! sentinels; stopped when the command ends.

use runledger::Result;
use runledger::embedded::RedisServer;
use runledger::embedded_cluster::RedisCluster;
use runledger::embedded_sentinel::RedisSentinel;

pub enum PrivateRedis {
    Server(RedisServer),
    Cluster(RedisCluster),
    Sentinel(RedisSentinel),
}

impl PrivateRedis {
    pub fn start(cluster: bool) -> Result<PrivateRedis> {
        Ok(if cluster {
            PrivateRedis::Cluster(RedisCluster::start()?)
        } else {
            PrivateRedis::Server(RedisServer::start()?)
        })
    }

    /// A master with 2 replicas under 3 sentinels.
    pub fn start_sentinel() -> Result<PrivateRedis> {
        Ok(PrivateRedis::Sentinel(RedisSentinel::start()?))
    }

    /// The URL to connect to (a `redis+cluster://` or `redis+sentinel://` one).
    pub fn url(&self) -> String {
        match self {
            PrivateRedis::Server(server) => server.url(),
            PrivateRedis::Cluster(cluster) => cluster.url(),
            PrivateRedis::Sentinel(sentinel) => sentinel.url(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            PrivateRedis::Server(_) => " (private redis-server, stopped at the end)".into(),
            PrivateRedis::Cluster(_) => " (private 6-node Redis Cluster, stopped at the end)".into(),
            PrivateRedis::Sentinel(_) => {
                " (private Redis Sentinel setup: a master, 2 replicas, 3 sentinels; stopped at the end)".into()
            }
        }
    }
}
