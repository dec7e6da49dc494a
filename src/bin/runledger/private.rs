//! The private Redis that `demo` and `bench` start when no URL is given: one
//! redis-server, or with `--cluster` a local 6-node Redis Cluster (3 masters,
//! 3 replicas), stopped when the command ends.

use runledger::Result;
use runledger::embedded::RedisServer;
use runledger::embedded_cluster::RedisCluster;

pub enum PrivateRedis {
    Server(RedisServer),
    Cluster(RedisCluster),
}

impl PrivateRedis {
    pub fn start(cluster: bool) -> Result<PrivateRedis> {
        Ok(if cluster {
            PrivateRedis::Cluster(RedisCluster::start()?)
        } else {
            PrivateRedis::Server(RedisServer::start()?)
        })
    }

    /// The URL to connect to (a `redis+cluster://` one for a cluster).
    pub fn url(&self) -> String {
        match self {
            PrivateRedis::Server(server) => server.url(),
            PrivateRedis::Cluster(cluster) => cluster.url(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            PrivateRedis::Server(_) => " (private redis-server, stopped at the end)".into(),
            PrivateRedis::Cluster(_) => " (private 6-node Redis Cluster, stopped at the end)".into(),
        }
    }
}
