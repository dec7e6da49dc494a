//! Connections to one Redis server or to a Redis Cluster, behind one type.
//!
//! Every operation talks to Redis through [`Conn`], which is either a
//! multiplexed connection to a single server or the redis crate's async
//! cluster connection (which follows MOVED/ASK redirections, resharding and
//! failovers by itself). Both are cheap to clone and share between tasks.
//!
//! A cluster is chosen by a `redis+cluster://host:port,host:port/` URL or by
//! [`super::StoreConfig::cluster`] with a plain `redis://` URL; either form
//! accepts several comma-separated seed nodes.
//!
//! TLS: a `rediss://` (or `rediss+cluster://`) URL connects over TLS
//! (rustls), verifying the server's certificate against the system's roots,
//! or against the CA of [`super::StoreConfig::tls_ca_file`] when set; the
//! redis crate's `rediss://host:port/#insecure` skips verification.

use std::path::Path;
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::error::{Error, Result};

/// A connection to a single server or to a cluster.
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Sends commands that may name keys of different slots, in one round
    /// trip on a single server (a pipeline) and concurrently on a cluster,
    /// where a pipeline must stay in one slot. Replies come in order.
    pub async fn query_all(&mut self, cmds: Vec<Cmd>) -> RedisResult<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Conn::Single(c) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query_async(c).await
            }
            Conn::Cluster(c) => {
                let replies = join_all(cmds.into_iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { cmd.query_async::<Value>(&mut c).await }
                }))
                .await;
                replies.into_iter().collect()
            }
        }
    }
}

/// True when the server is a node of a Redis Cluster that serves slots:
/// `CLUSTER SLOTS` answers a slot map (a single server refuses it, a
/// cluster node being set up answers an empty one). `CLUSTER SLOTS`, not
/// `INFO`: the README's tenant ACL has it. A user without it is taken for a
/// single server; its first key of another node's slot then answers MOVED,
/// which the CLI words as what to pass.
pub(crate) async fn is_cluster_node(conn: &mut impl ConnectionLike) -> bool {
    let slots: RedisResult<Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await;
    matches!(slots, Ok(Value::Array(ranges)) if !ranges.is_empty())
}

/// The seed nodes of a cluster URL (`redis+cluster://a:1,b:2/`), or of a
/// plain URL when `cluster` is set; `None` for a single server.
pub fn cluster_nodes(url: &str, cluster: bool) -> Result<Option<Vec<String>>> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("redis+cluster", rest)) => ("redis", rest),
        Some(("rediss+cluster", rest)) => ("rediss", rest),
        Some((scheme @ ("redis" | "rediss"), rest)) if cluster => (scheme, rest),
        Some(("redis" | "rediss" | "redis+unix" | "unix", _)) => return Ok(None),
        _ => return Err(Error::Invalid(format!("not a Redis URL: {url} (expected redis://host:port/)"))),
    };
    let (authority, _path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((user, hosts)) => (format!("{user}@"), hosts),
        None => (String::new(), authority),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{userinfo}{h}/"))
        .collect();
    if nodes.is_empty() {
        return Err(Error::Invalid(format!("cluster URL names no node: {url}")));
    }
    Ok(Some(nodes))
}

/// True for a URL that asks for TLS.
fn is_tls_url(url: &str) -> bool {
    matches!(url.split_once("://"), Some(("rediss" | "rediss+cluster", _)))
}

/// The TLS settings of every connection a store makes to `url`: `None` to
/// trust the system's roots (or for a plain URL), else the CA of
/// `ca_file`. Also installs rustls's process-wide crypto provider (ring)
/// unless the application installed one.
pub(crate) fn tls_certificates(url: &str, ca_file: Option<&Path>) -> Result<Option<redis::TlsCertificates>> {
    let tls = is_tls_url(url);
    if tls && rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: one provider is in place.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let Some(path) = ca_file else { return Ok(None) };
    if !tls {
        let scheme = url.split_once("://").map_or(url, |(scheme, _)| scheme);
        return Err(Error::Invalid(format!(
            "a TLS CA file ({}) needs a rediss:// URL, not {scheme}://",
            path.display()
        )));
    }
    let pem = std::fs::read(path)
        .map_err(|e| Error::Invalid(format!("cannot read the TLS CA file {}: {e}", path.display())))?;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| Error::Invalid(format!("TLS CA file {}: bad PEM certificate: {e}", path.display())))?;
        count += 1;
    }
    if count == 0 {
        return Err(Error::Invalid(format!("TLS CA file {} holds no PEM certificate", path.display())));
    }
    Ok(Some(redis::TlsCertificates { client_tls: None, root_cert: Some(pem) }))
}

/// The seed nodes of a cluster, with the TLS settings every connection to
/// the cluster uses.
pub(crate) struct Seeds {
    pub urls: Vec<String>,
    pub tls: Option<redis::TlsCertificates>,
}

/// Builds a cluster client. `response_timeout` None = no reply timeout (for
/// blocking commands); `push` carries pub/sub messages (RESP3).
pub(crate) fn cluster_client(
    nodes: &Seeds,
    response_timeout: Option<Duration>,
    push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
) -> Result<ClusterClient> {
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes.urls.clone())
        .connection_timeout(Duration::from_secs(5))
        // A failover takes a few seconds (node timeout + election): retries
        // with backoff ride it out instead of failing the call.
        .retries(8)
        .min_retry_wait(50)
        .max_retry_wait(1000);
    if let Some(timeout) = response_timeout {
        builder = builder.response_timeout(timeout);
    }
    if let Some(certs) = &nodes.tls {
        builder = builder.certs(certs.clone());
    }
    if let Some(push) = push {
        builder = builder.use_protocol(redis::ProtocolVersion::RESP3).push_sender(push);
    }
    Ok(builder.build()?)
}
