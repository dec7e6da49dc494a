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
//! A master with replicas under Redis Sentinel is chosen by a
//! `redis+sentinel://host:port,host:port/<master-name>` URL naming the
//! sentinels, or by [`super::StoreConfig::sentinel_master`] with a plain URL
//! of them (see [`super::sentinel`]). Its connections are [`Conn::Single`]
//! ones to whichever server the sentinels name as master now.
//!
//! TLS: a `rediss://` (or `rediss+cluster://`, `rediss+sentinel://`) URL connects over TLS
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
        Some(("redis" | "rediss" | "redis+unix" | "unix" | "redis+sentinel" | "rediss+sentinel", _)) => {
            return Ok(None);
        }
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
    matches!(url.split_once("://"), Some(("rediss" | "rediss+cluster" | "rediss+sentinel", _)))
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

/// Where a Sentinel-managed master is found: the sentinels, the name they
/// monitor it by, and how to talk to the master and to the sentinels.
#[derive(Clone)]
pub struct SentinelTarget {
    /// `(host, port)` of each sentinel, in the URL's order (the first that
    /// answers is asked first).
    pub sentinels: Vec<(String, u16)>,
    /// The master's name in the sentinels' `sentinel monitor` line.
    pub master: String,
    /// TLS to the master and to the sentinels (`rediss+sentinel://`).
    pub tls: bool,
    /// `#insecure`: TLS without verifying the certificates.
    pub insecure: bool,
    /// The URL's user and password, for the master (and its replicas).
    pub username: Option<String>,
    pub password: Option<String>,
    /// `?sentinel_username=..&sentinel_password=..`: the sentinels' own
    /// credentials, which a deployment usually sets apart from the data
    /// nodes' (`requirepass` in sentinel.conf); none by default.
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
}

impl std::fmt::Debug for SentinelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the passwords: this ends up in logs.
        f.debug_struct("SentinelTarget")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// The port a sentinel listens on when the URL gives none.
pub const SENTINEL_PORT: u16 = 26379;

/// The Sentinel setup a URL names: a `redis+sentinel://` (or
/// `rediss+sentinel://`) URL `[user:password@]host:port,host:port/<master-name>`,
/// or a plain `redis://` / `rediss://` URL of the sentinels with the master's
/// name given apart (`master`, from `--sentinel-master`). `None` for any
/// other URL (one server, a cluster).
pub fn sentinel_target(url: &str, master: Option<&str>) -> Result<Option<SentinelTarget>> {
    let bad = |why: &str| Error::Invalid(format!("Sentinel URL {}: {why}", redact_url(url)));
    let (tls, rest) = match url.split_once("://") {
        Some(("redis+sentinel", rest)) => (false, rest),
        Some(("rediss+sentinel", rest)) => (true, rest),
        Some(("redis", rest)) if master.is_some() => (false, rest),
        Some(("rediss", rest)) if master.is_some() => (true, rest),
        _ if master.is_some() => {
            return Err(bad("a sentinel master name needs a redis:// URL of the sentinels"));
        }
        _ => return Ok(None),
    };
    let (rest, fragment) = match rest.split_once('#') {
        Some((rest, fragment)) => (rest, Some(fragment)),
        None => (rest, None),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((user, hosts)) => (Some(user), hosts),
        None => (None, authority),
    };
    let decode = |s: &str| -> Result<String> {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| bad("a percent-encoded part is not UTF-8"))
    };
    let nonempty = |s: String| (!s.is_empty()).then_some(s);
    let (username, password) = match userinfo {
        None => (None, None),
        Some(info) => match info.split_once(':') {
            Some((user, pass)) => (nonempty(decode(user)?), nonempty(decode(pass)?)),
            None => (nonempty(decode(info)?), None),
        },
    };
    let mut sentinels = Vec::new();
    for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        sentinels.push(host_port(host).ok_or_else(|| bad(&format!("{host:?} is not host:port")))?);
    }
    if sentinels.is_empty() {
        return Err(bad("it names no sentinel (expected host:port,host:port)"));
    }
    let named = decode(path.trim_end_matches('/'))?;
    let master = match (master, named.as_str()) {
        (Some(given), "") => given.to_string(),
        (Some(given), named) if given == named => given.to_string(),
        (Some(given), named) => {
            return Err(bad(&format!("it names master {named:?} but the sentinel master is {given:?}")));
        }
        (None, "") => return Err(bad("it names no master (expected .../<master-name>)")),
        (None, named) => named.to_string(),
    };
    if master.contains('/') {
        return Err(bad(&format!("{master:?} is not a master name")));
    }
    let (mut sentinel_username, mut sentinel_password) = (None, None);
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "sentinel_username" => sentinel_username = nonempty(decode(value)?),
            "sentinel_password" => sentinel_password = nonempty(decode(value)?),
            other => {
                return Err(bad(&format!("unknown parameter {other:?} (known: sentinel_username, sentinel_password)")));
            }
        }
    }
    let insecure = match fragment {
        None | Some("") => false,
        Some("insecure") if tls => true,
        Some(other) => return Err(bad(&format!("unknown fragment #{other}"))),
    };
    Ok(Some(SentinelTarget {
        sentinels,
        master,
        tls,
        insecure,
        username,
        password,
        sentinel_username,
        sentinel_password,
    }))
}

/// `host:port`, `[v6]:port`, or a host alone (the sentinel port).
fn host_port(text: &str) -> Option<(String, u16)> {
    if let Some(v6) = text.strip_prefix('[') {
        let (host, rest) = v6.split_once(']')?;
        let port = match rest.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if rest.is_empty() => SENTINEL_PORT,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => Some((host.to_string(), port.parse().ok()?)),
        Some(_) => None,
        None => Some((text.to_string(), SENTINEL_PORT)),
    }
}

/// A URL with every password in it replaced by `***`, for error messages,
/// logs and whatever the CLI and the dashboard print: the user's password
/// (`user:***@`) and the sentinels' (`?sentinel_password=***`, a query
/// parameter, which stripping the userinfo alone would leave in plain view).
/// The user names and the hosts stay: they tell the reader which setup it is.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    // The authority ends at the first '/', '?' or '#'; a password may hold '@'.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((user, hosts)) => match user.split_once(':') {
            Some((name, _password)) => format!("{name}:***@{hosts}"),
            None => format!("{user}@{hosts}"),
        },
        None => authority.to_string(),
    };
    let (tail, fragment) = match tail.split_once('#') {
        Some((tail, fragment)) => (tail, Some(fragment)),
        None => (tail, None),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if name.to_ascii_lowercase().contains("password") => format!("{name}=***"),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", pairs.join("&"))
        }
        None => tail.to_string(),
    };
    match fragment {
        Some(fragment) => format!("{scheme}://{authority}{tail}#{fragment}"),
        None => format!("{scheme}://{authority}{tail}"),
    }
}

/// The redis crate's Sentinel client for `target`: it asks the sentinels for
/// the master (checking with `ROLE` that the server it names is one) and
/// hands back a client for it, with the target's credentials and TLS.
pub(crate) fn sentinel_client(
    target: &SentinelTarget,
    certs: Option<redis::TlsCertificates>,
) -> Result<redis::sentinel::SentinelClient> {
    use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
    let addrs = target.sentinels.iter().map(|(host, port)| {
        if target.tls {
            redis::ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: target.insecure,
                tls_params: None,
            }
        } else {
            redis::ConnectionAddr::Tcp(host.clone(), *port)
        }
    });
    let mut builder = SentinelClientBuilder::new(addrs, &target.master, SentinelServerType::Master)?;
    if let Some(user) = &target.username {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = &target.password {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(user) = &target.sentinel_username {
        builder = builder.set_client_to_sentinel_username(user);
    }
    if let Some(password) = &target.sentinel_password {
        builder = builder.set_client_to_sentinel_password(password);
    }
    if target.tls {
        let mode = if target.insecure { redis::TlsMode::Insecure } else { redis::TlsMode::Secure };
        builder = builder.set_client_to_redis_tls_mode(mode).set_client_to_sentinel_tls_mode(mode);
        if let Some(certs) = certs {
            builder =
                builder.set_client_to_redis_certificates(certs.clone()).set_client_to_sentinel_certificates(certs);
        }
    }
    Ok(builder.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sentinel_urls() {
        let t = sentinel_target("redis+sentinel://a:26379,b:26380/mymaster", None).expect("ok").expect("sentinel");
        assert_eq!(t.sentinels, vec![("a".to_string(), 26379), ("b".to_string(), 26380)]);
        assert_eq!(t.master, "mymaster");
        assert!(!t.tls && t.username.is_none() && t.password.is_none());

        let t = sentinel_target("rediss+sentinel://app:p%40ss@[::1]:5000,c/m1/?sentinel_password=s3#insecure", None)
            .expect("ok")
            .expect("sentinel");
        assert_eq!(t.sentinels, vec![("::1".to_string(), 5000), ("c".to_string(), SENTINEL_PORT)]);
        assert_eq!((t.master.as_str(), t.tls, t.insecure), ("m1", true, true));
        assert_eq!((t.username.as_deref(), t.password.as_deref()), (Some("app"), Some("p@ss")));
        assert_eq!(t.sentinel_password.as_deref(), Some("s3"));
        assert!(!format!("{t:?}").contains("p@ss"), "no password in Debug");

        let t = sentinel_target("redis://:pw@h1:1,h2:2/", Some("mm")).expect("ok").expect("sentinel");
        assert_eq!((t.master.as_str(), t.password.as_deref(), t.sentinels.len()), ("mm", Some("pw"), 2));

        assert!(sentinel_target("redis://h:1/", None).expect("ok").is_none());
        assert!(sentinel_target("redis+cluster://h:1/", None).expect("ok").is_none());
        for bad in [
            "redis+sentinel://h:1/",
            "redis+sentinel:///m",
            "redis+sentinel://h:x/m",
            "redis+sentinel://h:1/m?db=2",
            "redis+sentinel://h:1/a/b",
        ] {
            assert!(matches!(sentinel_target(bad, None), Err(Error::Invalid(_))), "{bad}");
        }
        assert!(matches!(sentinel_target("redis+sentinel://h:1/a", Some("b")), Err(Error::Invalid(_))));
        assert!(matches!(sentinel_target("redis+cluster://h:1/", Some("b")), Err(Error::Invalid(_))));
        let err = sentinel_target("redis+sentinel://u:secret@h:x/m", None).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| !e.contains("secret")), "no password in errors");
        let err = sentinel_target("redis+sentinel://h:x/m?sentinel_password=sentpw", None).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| !e.contains("sentpw")), "no sentinel password in errors");
    }

    #[test]
    fn redacts_every_password() {
        for (url, shown) in [
            ("redis://h:1/", "redis://h:1/"),
            ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
            ("rediss://app:p@ss@h:1/", "rediss://app:***@h:1/"),
            ("redis://app@h:1/", "redis://app@h:1/"),
            (
                "redis+sentinel://app:pw@a:1,b:2/mm?sentinel_username=s&sentinel_password=sp#insecure",
                "redis+sentinel://app:***@a:1,b:2/mm?sentinel_username=s&sentinel_password=***#insecure",
            ),
            ("rediss+sentinel://a:1/mm/?sentinel_password=sp", "rediss+sentinel://a:1/mm/?sentinel_password=***"),
            ("redis://a:1,b:2?sentinel_password=sp", "redis://a:1,b:2?sentinel_password=***"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
