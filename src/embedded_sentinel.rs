//! A private Redis Sentinel setup on free loopback ports, for the tests and
//! `runledger demo --sentinel`: a master, 2 replicas and 3 sentinels, each a
//! `redis-server` from PATH (the sentinels as `redis-server <conf>
//! --sentinel`, which every Redis install has, unlike `redis-sentinel`) in
//! its own temp dir. Everything is stopped (by PID) when the handle drops,
//! or when the thread that started it dies. The sentinels detect a dead
//! master after [`DOWN_AFTER_MS`], so a test can kill the master, wait for
//! a replica's promotion and restart the old master as a replica.
//!
//! [`SentinelOptions`] make it look like a production setup: a password on
//! the data nodes (the replicas and the sentinels authenticate with it),
//! more ACL users on every data node (ACL is not replicated), a password on
//! the sentinels, and TLS everywhere (every process listens on a TLS port
//! only, replication and the sentinels' links included).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::embedded::{INSTALL_HINT, die_with_parent, find_redis_server, free_port, server_command, wait_answering};
use crate::error::{Error, Result};

/// The name the sentinels monitor the master by.
pub const MASTER_NAME: &str = "runledger";
/// How long a master stays silent before a sentinel thinks it down: low, so
/// that a failover takes seconds in a test (production uses 5-30 s).
pub const DOWN_AFTER_MS: u64 = 1000;
/// Bounds a failover's steps, and how soon a failed one is tried again
/// (twice this).
pub const FAILOVER_TIMEOUT_MS: u64 = 3000;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Certificate files for a setup on TLS: every process presents `cert_file`
/// (its key in `key_file`; a certificate for 127.0.0.1) and trusts `ca_file`.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
}

/// How a [`RedisSentinel`] is set up.
#[derive(Clone, Debug)]
pub struct SentinelOptions {
    /// Replicas of the master (default 2).
    pub replicas: usize,
    /// Sentinels (default 3; quorum: a majority of them).
    pub sentinels: usize,
    /// `requirepass` of the data nodes (the `default` user's password). The
    /// replicas (`masterauth`) and the sentinels (`sentinel auth-pass`)
    /// authenticate with it. Default none.
    pub data_password: Option<String>,
    /// More users on every data node, each the rules of one `ACL SETUSER`
    /// (`"tenant on >pw resetkeys ~rl:* -@all +get"`), as `user` lines of
    /// their config: ACL is not replicated, so each node has its own.
    pub acl_users: Vec<String>,
    /// `requirepass` of the sentinels (clients then pass it as the URL's
    /// `sentinel_password`; the sentinels use it with each other too).
    pub sentinel_password: Option<String>,
    /// Every process on a TLS port only (`port 0`), replication and the
    /// sentinels' links over TLS too (`tls-replication yes`).
    pub tls: Option<TlsFiles>,
}

impl Default for SentinelOptions {
    fn default() -> Self {
        SentinelOptions {
            replicas: 2,
            sentinels: 3,
            data_password: None,
            acl_users: Vec::new(),
            sentinel_password: None,
            tls: None,
        }
    }
}

/// How this module talks to its own processes: the options' passwords
/// and CA, for its probes (`ROLE`, `INFO`, `SENTINEL ...`).
#[derive(Clone)]
struct Probe {
    options: SentinelOptions,
    /// The CA's PEM, read once.
    certs: Option<redis::TlsCertificates>,
}

/// What a process of the setup is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A data node (master or replica; which one changes with failovers).
    Data,
    Sentinel,
}

/// One process of a [`RedisSentinel`] setup.
pub struct SentinelNode {
    role: Role,
    port: u16,
    dir: TempDir,
    child: Child,
    running: bool,
}

impl SentinelNode {
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The PID of the current process (a restart gives a new one).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn stop(&mut self) {
        if self.running {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.running = false;
        }
    }
}

/// A running private Sentinel setup.
pub struct RedisSentinel {
    nodes: Vec<SentinelNode>,
    binary: PathBuf,
    probe: Probe,
}

impl RedisSentinel {
    /// A master, 2 replicas and 3 sentinels (quorum 2), ready: the replicas
    /// are in sync and every sentinel knows the replicas and the other
    /// sentinels, so a failover can start at once.
    pub fn start() -> Result<RedisSentinel> {
        RedisSentinel::start_with(2, 3)
    }

    /// A master with `replicas` replicas, watched by `sentinels` sentinels
    /// (quorum: a majority of them).
    pub fn start_with(replicas: usize, sentinels: usize) -> Result<RedisSentinel> {
        RedisSentinel::start_with_options(SentinelOptions { replicas, sentinels, ..Default::default() })
    }

    /// A setup as `options` say, ready as [`RedisSentinel::start`]'s is.
    pub fn start_with_options(options: SentinelOptions) -> Result<RedisSentinel> {
        if options.sentinels == 0 {
            return Err(Error::Server("a Sentinel setup needs at least one sentinel".into()));
        }
        let binary = find_redis_server().ok_or_else(|| Error::Server(INSTALL_HINT.into()))?;
        let certs = match &options.tls {
            Some(tls) => crate::store::conn::tls_certificates("rediss://", Some(&tls.ca_file))?,
            None => None,
        };
        let probe = Probe { options: options.clone(), certs };
        // Built first so that Drop stops whatever started on every error path.
        let mut setup = RedisSentinel { nodes: Vec::new(), binary, probe: probe.clone() };
        let master = setup.spawn(Role::Data, |binary, port, dir| spawn_data(binary, port, dir, None, &probe))?;
        for _ in 0..options.replicas {
            setup.spawn(Role::Data, |binary, port, dir| spawn_data(binary, port, dir, Some(master), &probe))?;
        }
        let quorum = options.sentinels / 2 + 1;
        for _ in 0..options.sentinels {
            setup
                .spawn(Role::Sentinel, |binary, port, dir| spawn_sentinel(binary, port, dir, master, quorum, &probe))?;
        }
        setup.wait_ready(READY_TIMEOUT)?;
        Ok(setup)
    }

    /// Starts one process on a free port (another process may take the
    /// port first: a few tries).
    fn spawn(&mut self, role: Role, start: impl Fn(&Path, u16, &Path) -> Result<Child>) -> Result<u16> {
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            if self.nodes.iter().any(|n| n.port == port) {
                continue;
            }
            let dir = tempdir(match role {
                Role::Data => "runledger-sentinel-data-",
                Role::Sentinel => "runledger-sentinel-",
            })?;
            match start(&self.binary, port, dir.path()) {
                Ok(child) => {
                    self.nodes.push(SentinelNode { role, port, dir, child, running: true });
                    return Ok(port);
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(Error::Server(format!("could not start a {role:?} node: {last_error}")))
    }

    /// `redis+sentinel://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3/runledger`
    /// (`rediss+sentinel://` on TLS), with no credentials (see
    /// [`RedisSentinel::url_as`]).
    pub fn url(&self) -> String {
        let scheme = if self.probe.options.tls.is_some() { "rediss+sentinel" } else { "redis+sentinel" };
        format!("{scheme}://{}/{MASTER_NAME}", self.sentinel_hosts())
    }

    /// [`RedisSentinel::url`] as the data nodes' user `user` with `password`,
    /// passing the sentinels' password (when they have one) as
    /// `sentinel_password`. Both are percent-encoded.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        let scheme = if self.probe.options.tls.is_some() { "rediss+sentinel" } else { "redis+sentinel" };
        let enc = |s: &str| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
        let mut url = format!("{scheme}://{}:{}@{}/{MASTER_NAME}", enc(user), enc(password), self.sentinel_hosts());
        if let Some(sentinel) = &self.probe.options.sentinel_password {
            url.push_str(&format!("?sentinel_password={}", enc(sentinel)));
        }
        url
    }

    /// `127.0.0.1:p1,127.0.0.1:p2,...`: the sentinels, as a URL lists them.
    pub fn sentinel_hosts(&self) -> String {
        let hosts: Vec<String> = self.sentinel_ports().iter().map(|p| format!("127.0.0.1:{p}")).collect();
        hosts.join(",")
    }

    pub fn master_name(&self) -> &str {
        MASTER_NAME
    }

    /// Every process started, killed or not.
    pub fn nodes(&self) -> &[SentinelNode] {
        &self.nodes
    }

    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.ports(Role::Sentinel)
    }

    /// The ports of the master and the replicas (in start order: the first
    /// was the master at the start).
    pub fn data_ports(&self) -> Vec<u16> {
        self.ports(Role::Data)
    }

    fn ports(&self, role: Role) -> Vec<u16> {
        self.nodes.iter().filter(|n| n.role == role).map(|n| n.port).collect()
    }

    /// The PID of the process on `port`.
    pub fn pid(&self, port: u16) -> Result<u32> {
        self.node(port).map(SentinelNode::pid)
    }

    /// The master's port as every live sentinel names it, once they agree
    /// and the server says it is a master (`ROLE`).
    pub fn master_port(&self) -> Result<u16> {
        let mut named = HashMap::new();
        for port in self.running(Role::Sentinel) {
            let addr = self.probe.query(Role::Sentinel, port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME])?;
            let master = match addr.as_slice() {
                [_, p] => p.parse::<u16>().map_err(|_| Error::Server(format!("sentinel {port} named port {p:?}")))?,
                other => return Err(Error::Server(format!("sentinel {port} names no master: {other:?}"))),
            };
            named.insert(port, master);
        }
        let mut masters: Vec<u16> = named.values().copied().collect();
        masters.sort_unstable();
        masters.dedup();
        match masters.as_slice() {
            [master] if self.role_of(*master).as_deref() == Some("master") => Ok(*master),
            [master] => Err(Error::Server(format!("the sentinels name {master}, which is not a master (yet)"))),
            [] => Err(Error::Server("no sentinel is running".into())),
            _ => Err(Error::Server(format!("the sentinels disagree on the master: {named:?}"))),
        }
    }

    /// Waits until the sentinels agree on a master other than `old` that
    /// says it is one, and returns its port.
    pub fn wait_new_master(&self, old: u16, timeout: Duration) -> Result<u16> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.master_port() {
                Ok(port) if port != old => return Ok(port),
                Ok(port) => format!("the sentinels still name {port}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(Error::Server(format!("no new master after {timeout:?}: {last}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL one process (by its PID), keeping its dir.
    pub fn kill(&mut self, port: u16) -> Result<()> {
        let node = self.node_mut(port)?;
        if !node.running {
            return Err(Error::Server(format!("127.0.0.1:{port} is not running")));
        }
        node.child.kill().map_err(|e| Error::Server(format!("kill 127.0.0.1:{port} (pid {}): {e}", node.pid())))?;
        node.child.wait().map_err(|e| Error::Server(format!("wait for 127.0.0.1:{port}: {e}")))?;
        node.running = false;
        Ok(())
    }

    /// Restarts a killed data node on its port and dir as a replica of the
    /// server on `master` (what the sentinels would turn it into anyway; as
    /// a replica from its first second, it never serves as a second master).
    pub fn restart_as_replica(&mut self, port: u16, master: u16) -> Result<()> {
        let binary = self.binary.clone();
        let probe = self.probe.clone();
        let node = self.node_mut(port)?;
        if node.running || node.role != Role::Data {
            return Err(Error::Server(format!("127.0.0.1:{port} is running or not a data node")));
        }
        let started = Instant::now();
        loop {
            // The old socket may linger for a moment after the kill.
            match spawn_data(&binary, port, node.dir.path(), Some(master), &probe) {
                Ok(child) => {
                    node.child = child;
                    node.running = true;
                    return Ok(());
                }
                Err(e) if started.elapsed() > STARTUP_TIMEOUT => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// A planned switch: `SENTINEL FAILOVER` on the first live sentinel.
    pub fn failover(&self) -> Result<()> {
        let port = self
            .running(Role::Sentinel)
            .first()
            .copied()
            .ok_or_else(|| Error::Server("no sentinel is running".into()))?;
        let reply = self.probe.query(Role::Sentinel, port, &["SENTINEL", "FAILOVER", MASTER_NAME])?;
        match reply.first().map(String::as_str) {
            Some("OK") => Ok(()),
            other => Err(Error::Server(format!("SENTINEL FAILOVER answered {other:?}"))),
        }
    }

    /// Waits until the setup can fail over again: the sentinels agree on a
    /// master, every live data node other than it is its replica with the
    /// link up, the master counts them all, and every sentinel knows the
    /// other sentinels and the live replicas (flags without `s_down`).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let problems = self.problems();
            if problems.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Server(format!(
                    "Sentinel setup not ready after {timeout:?}: {}",
                    problems.join("; ")
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn problems(&self) -> Vec<String> {
        let master = match self.master_port() {
            Ok(port) => port,
            Err(e) => return vec![e.to_string()],
        };
        let mut problems = Vec::new();
        let replicas: Vec<u16> = self.running(Role::Data).into_iter().filter(|&p| p != master).collect();
        for &port in &replicas {
            match self.probe.query(Role::Data, port, &["INFO", "replication"]).map(|lines| lines.join("\n")) {
                Ok(info) => {
                    let field = |name: &str| info_field(&info, name).map(str::to_string);
                    if field("role").as_deref() != Some("slave") || field("master_port") != Some(master.to_string()) {
                        problems.push(format!("{port} is not a replica of {master}"));
                    } else if field("master_link_status").as_deref() != Some("up") {
                        problems.push(format!("{port}: link to {master} not up"));
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        match self.probe.query(Role::Data, master, &["INFO", "replication"]).map(|lines| lines.join("\n")) {
            Ok(info) => {
                let connected = info_field(&info, "connected_slaves").and_then(|n| n.parse::<usize>().ok());
                if connected != Some(replicas.len()) {
                    problems.push(format!("master {master} has {connected:?} replicas, not {}", replicas.len()));
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
        let sentinels = self.running(Role::Sentinel);
        for &port in &sentinels {
            match self.probe.query_map(port, &["SENTINEL", "MASTER", MASTER_NAME]) {
                Ok(info) => {
                    let others = info.get("num-other-sentinels").and_then(|n| n.parse::<usize>().ok());
                    if others != Some(sentinels.len() - 1) {
                        problems.push(format!("sentinel {port} knows {others:?} other sentinels"));
                    }
                    if info.get("flags").is_some_and(|f| f.contains("down")) {
                        problems.push(format!("sentinel {port} flags the master {:?}", info.get("flags")));
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
            match self.probe.query_maps(port, &["SENTINEL", "REPLICAS", MASTER_NAME]) {
                Ok(known) => {
                    for &replica in &replicas {
                        let seen =
                            known.iter().find(|r| r.get("port").map(String::as_str) == Some(&replica.to_string()));
                        match seen.and_then(|r| r.get("flags")) {
                            Some(flags) if !flags.contains("down") && !flags.contains("disconnected") => {}
                            other => problems.push(format!("sentinel {port} sees replica {replica} as {other:?}")),
                        }
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        problems
    }

    /// `ROLE`'s first word (`master`, `slave`), or None when it does not answer.
    fn role_of(&self, port: u16) -> Option<String> {
        self.probe.query(Role::Data, port, &["ROLE"]).ok().and_then(|words| words.into_iter().next())
    }

    /// Every process's log, each after a `==> role 127.0.0.1:p <==` header.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out.push_str(&format!("==> {:?} 127.0.0.1:{} <==\n", node.role, node.port));
            match std::fs::read_to_string(node.dir.path().join("redis.log")) {
                Ok(log) => out.push_str(&log),
                Err(e) => out.push_str(&format!("(no log: {e})\n")),
            }
        }
        out
    }

    fn running(&self, role: Role) -> Vec<u16> {
        self.nodes.iter().filter(|n| n.role == role && n.running).map(|n| n.port).collect()
    }

    fn node(&self, port: u16) -> Result<&SentinelNode> {
        self.nodes.iter().find(|n| n.port == port).ok_or_else(|| Error::Server(format!("no process on port {port}")))
    }

    fn node_mut(&mut self, port: u16) -> Result<&mut SentinelNode> {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .ok_or_else(|| Error::Server(format!("no process of this setup listens on port {port}")))
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        // Sentinels first, so that none starts a failover while the data nodes stop.
        for node in self.nodes.iter_mut().rev() {
            node.stop();
        }
    }
}

fn tempdir(prefix: &str) -> Result<TempDir> {
    tempfile::Builder::new().prefix(prefix).tempdir().map_err(|e| Error::Server(format!("temp dir: {e}")))
}

/// A data node: a master, or with `master` a replica of 127.0.0.1:`master`.
fn spawn_data(binary: &Path, port: u16, dir: &Path, master: Option<u16>, probe: &Probe) -> Result<Child> {
    let options = &probe.options;
    let mut command = server_command(binary, port, dir);
    // No persistence: a killed master comes back as a replica and takes
    // the new master's data; a replica that was promoted has what it had.
    command
        .args(["--appendonly", "no"])
        // A master otherwise waits 5 s for more replicas before it streams
        // the first sync, and a replica cannot take over until it has synced.
        .args(["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]);
    if let Some(master) = master {
        command.args(["--replicaof", "127.0.0.1"]).arg(master.to_string());
    }
    if let Some(password) = &options.data_password {
        // Any node may become the master: each replica can authenticate to any.
        command.arg("--requirepass").arg(password).arg("--masterauth").arg(password);
    }
    if !options.acl_users.is_empty() {
        // In a file of their own: a rule may hold characters a command line would split.
        let file = dir.join("users.conf");
        let lines: String = options.acl_users.iter().map(|rules| format!("user {rules}\n")).collect();
        std::fs::write(&file, lines).map_err(|e| Error::Server(format!("write {}: {e}", file.display())))?;
        command.arg("--include").arg(&file);
    }
    if let Some(tls) = &options.tls {
        command.args(["--port", "0", "--tls-port"]).arg(port.to_string());
        command.arg("--tls-cert-file").arg(&tls.cert_file).arg("--tls-key-file").arg(&tls.key_file);
        command.arg("--tls-ca-cert-file").arg(&tls.ca_file);
        command.args(["--tls-auth-clients", "no", "--tls-replication", "yes"]);
    }
    let mut child = command.spawn().map_err(|e| Error::Server(format!("spawn {}: {e}", binary.display())))?;
    if let Err(e) = wait_answers(&mut child, Role::Data, port, &dir.join("redis.log"), probe) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}

/// A sentinel (`redis-server <dir>/sentinel.conf --sentinel`): it rewrites
/// its config file as it learns the setup, so the file lives in its dir.
fn spawn_sentinel(binary: &Path, port: u16, dir: &Path, master: u16, quorum: usize, probe: &Probe) -> Result<Child> {
    let options = &probe.options;
    let conf = dir.join("sentinel.conf");
    let log = dir.join("redis.log");
    let mut text = format!(
        "bind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
         sentinel monitor {MASTER_NAME} 127.0.0.1 {master} {quorum}\n\
         sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
         sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n\
         sentinel parallel-syncs {MASTER_NAME} 2\n",
        dir = dir.display(),
        log = log.display(),
    );
    match &options.tls {
        // tls-replication: the sentinels reach the data nodes and each other over TLS.
        Some(tls) => text.push_str(&format!(
            "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
             tls-auth-clients no\ntls-replication yes\n",
            tls.cert_file.display(),
            tls.key_file.display(),
            tls.ca_file.display()
        )),
        None => text.push_str(&format!("port {port}\n")),
    }
    if let Some(password) = &options.data_password {
        text.push_str(&format!("sentinel auth-pass {MASTER_NAME} {password}\n"));
    }
    if let Some(password) = &options.sentinel_password {
        // Also what a sentinel sends the other sentinels (no sentinel-pass set).
        text.push_str(&format!("requirepass {password}\n"));
    }
    std::fs::write(&conf, text).map_err(|e| Error::Server(format!("write {}: {e}", conf.display())))?;
    let mut command = Command::new(binary);
    command.arg(&conf).arg("--sentinel").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    die_with_parent(&mut command);
    let mut child =
        command.spawn().map_err(|e| Error::Server(format!("spawn {} --sentinel: {e}", binary.display())))?;
    if let Err(e) = wait_answers(&mut child, Role::Sentinel, port, &log, probe) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}

/// Waits until a just-spawned process answers `PING` as this module talks
/// to it (its password, TLS), for at most [`STARTUP_TIMEOUT`].
fn wait_answers(child: &mut Child, role: Role, port: u16, log: &Path, probe: &Probe) -> Result<()> {
    wait_answering(child, port, log, STARTUP_TIMEOUT, || {
        probe.query(role, port, &["PING"]).map(|_| ()).map_err(|e| e.to_string())
    })
}

impl Probe {
    /// One command on a fresh connection with timeouts, its reply as words
    /// (a bulk string's lines, an array's items; nil is empty).
    fn query(&self, role: Role, port: u16, args: &[&str]) -> Result<Vec<String>> {
        let value = self.query_value(role, port, args)?;
        let failed = |e: redis::ParsingError| Error::Server(format!("{} on 127.0.0.1:{port}: {e}", args.join(" ")));
        Ok(match value {
            redis::Value::Nil => Vec::new(),
            redis::Value::Array(items) => {
                let mut words = Vec::new();
                for item in items {
                    match item {
                        // ROLE's nested arrays (a master's replicas) are not needed here.
                        redis::Value::Array(_) => {}
                        redis::Value::Int(n) => words.push(n.to_string()),
                        other => words.push(redis::from_redis_value::<String>(other).map_err(failed)?),
                    }
                }
                words
            }
            redis::Value::Okay => vec!["OK".to_string()],
            redis::Value::SimpleString(s) => vec![s],
            other => redis::from_redis_value::<String>(other).map_err(failed)?.lines().map(str::to_string).collect(),
        })
    }

    /// A sentinel's reply that is one field/value map (`SENTINEL MASTER`).
    fn query_map(&self, port: u16, args: &[&str]) -> Result<HashMap<String, String>> {
        let value = self.query_value(Role::Sentinel, port, args)?;
        redis::from_redis_value(value)
            .map_err(|e| Error::Server(format!("{} on 127.0.0.1:{port}: {e}", args.join(" "))))
    }

    /// A sentinel's reply that is a list of field/value maps (`SENTINEL REPLICAS`).
    fn query_maps(&self, port: u16, args: &[&str]) -> Result<Vec<HashMap<String, String>>> {
        let value = self.query_value(Role::Sentinel, port, args)?;
        redis::from_redis_value(value)
            .map_err(|e| Error::Server(format!("{} on 127.0.0.1:{port}: {e}", args.join(" "))))
    }

    fn query_value(&self, role: Role, port: u16, args: &[&str]) -> Result<redis::Value> {
        let failed = |e: redis::RedisError| Error::Server(format!("{} on 127.0.0.1:{port}: {e}", args.join(" ")));
        let password = match role {
            Role::Data => self.options.data_password.as_deref(),
            Role::Sentinel => self.options.sentinel_password.as_deref(),
        };
        let addr = match self.options.tls {
            Some(_) => {
                redis::ConnectionAddr::TcpTls { host: "127.0.0.1".into(), port, insecure: false, tls_params: None }
            }
            None => redis::ConnectionAddr::Tcp("127.0.0.1".into(), port),
        };
        let mut redis_settings = redis::RedisConnectionInfo::default();
        if let Some(password) = password {
            redis_settings = redis_settings.set_password(password);
        }
        let info =
            redis::IntoConnectionInfo::into_connection_info(addr).map_err(failed)?.set_redis_settings(redis_settings);
        let client = match &self.certs {
            Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
            None => redis::Client::open(info),
        }
        .map_err(failed)?;
        let mut con = client.get_connection_with_timeout(QUERY_TIMEOUT).map_err(failed)?;
        con.set_read_timeout(Some(QUERY_TIMEOUT)).map_err(failed)?;
        con.set_write_timeout(Some(QUERY_TIMEOUT)).map_err(failed)?;
        let Some((name, rest)) = args.split_first() else {
            return Err(Error::Server("empty command".into()));
        };
        let mut cmd = redis::cmd(name);
        for arg in rest {
            cmd.arg(*arg);
        }
        cmd.query::<redis::Value>(&mut con).map_err(failed)
    }
}

/// The value of `name:value` in an INFO-style reply.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
}
