//! A private Redis Cluster on free loopback ports, for the tests that need
//! slots, redirects and failover: by default 3 masters and 3 replicas, each
//! node a `redis-server` from PATH in its own temp dir, joined with
//! `redis-cli --cluster create`. Nodes are stopped (by PID) when the handle
//! drops, or when the thread that started them dies. A test can kill a node,
//! wait for its replica to take over, and restart it on its old port and dir.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::embedded::{
    INSTALL_HINT, die_with_parent, find_on_path, find_redis_server, free_port, server_command, wait_until_up,
};
use crate::error::{Error, Result};

/// The number of hash slots in every Redis Cluster.
pub const SLOTS: u16 = 16384;

pub const CLI_INSTALL_HINT: &str = "redis-cli was not found on PATH; it joins the nodes into a cluster. \
    Install it (Debian/Ubuntu: `sudo apt-get install -y redis-tools`; macOS: `brew install redis`).";

/// Short enough that a failover finishes within seconds of a kill.
const NODE_TIMEOUT_MS: u64 = 2000;
/// Redis puts each node's cluster bus on its port plus this.
const BUS_PORT_OFFSET: u16 = 10000;
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const CREATE_OK_TIMEOUT: Duration = Duration::from_secs(30);

/// A running private Redis Cluster.
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    binary: PathBuf,
    /// Holds the output of `redis-cli --cluster create`, which is no node's log.
    work: TempDir,
}

/// One `redis-server` of a [`RedisCluster`].
pub struct ClusterNode {
    port: u16,
    pid: u32,
    dir: TempDir,
    child: Child,
    running: bool,
}

impl ClusterNode {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PID of the current process (a restart gives a new one).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The node's dir: `nodes.conf`, the AOF and `redis.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// False between [`RedisCluster::kill`] and [`RedisCluster::restart_node`].
    pub fn is_running(&self) -> bool {
        self.running
    }

    pub fn url(&self) -> String {
        node_url(self.port)
    }

    fn stop(&mut self) {
        if self.running {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.running = false;
        }
    }
}

impl RedisCluster {
    /// 6 nodes: 3 masters, 3 replicas.
    pub fn start() -> Result<RedisCluster> {
        RedisCluster::start_with(3, 1)
    }

    /// `masters` masters (at least 3, as `redis-cli --cluster create` requires),
    /// each with `replicas_per_master` replicas.
    pub fn start_with(masters: usize, replicas_per_master: usize) -> Result<RedisCluster> {
        if masters < 3 {
            return Err(Error::Server(format!("a Redis Cluster needs at least 3 masters, not {masters}")));
        }
        // Both binaries are looked up before anything starts, so a missing
        // redis-cli does not leave the caller with nodes to explain.
        let binary = find_redis_server().ok_or_else(|| Error::Server(INSTALL_HINT.into()))?;
        let cli = find_on_path("redis-cli").ok_or_else(|| Error::Server(CLI_INSTALL_HINT.into()))?;
        let work = tempdir("runledger-cluster-")?;
        let total = masters * (1 + replicas_per_master);
        // Built before the nodes start so that Drop stops them on every error path.
        let mut cluster = RedisCluster { nodes: Vec::with_capacity(total), binary, work };
        for _ in 0..total {
            let node = cluster.spawn_new_node()?;
            cluster.nodes.push(node);
        }

        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        args.extend(["--cluster-replicas".into(), replicas_per_master.to_string(), "--cluster-yes".into()]);
        run_bounded(&cli, &args, &cluster.work.path().join("cluster-create.log"), CLI_TIMEOUT)?;

        cluster.wait_ok(CREATE_OK_TIMEOUT)?;
        // A failover test kills a master right away; its replica can only be
        // promoted once it has synced.
        cluster.wait_replicas_up(CREATE_OK_TIMEOUT)?;
        Ok(cluster)
    }

    fn spawn_new_node(&self) -> Result<ClusterNode> {
        let taken: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
        let mut last_error = String::new();
        // Another process may take a free port before the node binds it.
        for _ in 0..5 {
            let port = free_cluster_port(&taken)?;
            let dir = tempdir("runledger-cluster-node-")?;
            match spawn_node(&self.binary, port, dir.path()) {
                Ok(child) => return Ok(ClusterNode { port, pid: child.id(), dir, child, running: true }),
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(Error::Server(format!("could not start a cluster node: {last_error}")))
    }

    /// Every node we started, killed or not.
    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    /// The ports of every node we started, killed or not.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// "redis+cluster://127.0.0.1:p1,127.0.0.1:p2,.../" listing every node
    /// (the URL form the store will accept).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}/", hosts.join(","))
    }

    /// Seed node URLs, "redis://127.0.0.1:p/" each.
    pub fn node_urls(&self) -> Vec<String> {
        self.nodes.iter().map(ClusterNode::url).collect()
    }

    /// Ports of the current masters, read from CLUSTER NODES (they change after
    /// a failover), sorted. A master flagged `fail` is left out: after a
    /// failover it is the dead one, which owns no slots.
    pub fn master_ports(&self) -> Result<Vec<u16>> {
        let (_, view) = self.view()?;
        let mut ports: Vec<u16> = view.iter().filter(|n| n.serves()).map(|n| n.port).collect();
        ports.sort_unstable();
        Ok(ports)
    }

    /// The port of the master that owns `slot` now.
    pub fn master_of_slot(&self, slot: u16) -> Result<u16> {
        if slot >= SLOTS {
            return Err(Error::Server(format!("slot {slot} is out of range 0-{}", SLOTS - 1)));
        }
        let (asked, view) = self.view()?;
        view.iter()
            .find(|n| n.serves() && n.owns(slot))
            .map(|n| n.port)
            .ok_or_else(|| Error::Server(format!("slot {slot} has no master in the view of 127.0.0.1:{asked}")))
    }

    /// SIGKILL one node we started (by its PID) and keep its dir, so that
    /// [`RedisCluster::restart_node`] can bring it back with its identity.
    pub fn kill(&mut self, port: u16) -> Result<()> {
        let node = self.node_mut(port)?;
        if !node.running {
            return Err(Error::Server(format!("node 127.0.0.1:{port} is not running")));
        }
        node.child.kill().map_err(|e| Error::Server(format!("kill node 127.0.0.1:{port} (pid {}): {e}", node.pid)))?;
        node.child.wait().map_err(|e| Error::Server(format!("wait for node 127.0.0.1:{port}: {e}")))?;
        node.running = false;
        Ok(())
    }

    /// Restart a killed node on its port and dir (it rejoins with its
    /// nodes.conf; a master that lost its slots comes back as a replica).
    pub fn restart_node(&mut self, port: u16) -> Result<()> {
        let binary = self.binary.clone();
        let node = self.node_mut(port)?;
        if node.running {
            return Err(Error::Server(format!("node 127.0.0.1:{port} is already running")));
        }
        let started = Instant::now();
        loop {
            // The old sockets may linger for a moment after the kill.
            match spawn_node(&binary, port, node.dir.path()) {
                Ok(child) => {
                    node.pid = child.id();
                    node.child = child;
                    node.running = true;
                    return Ok(());
                }
                Err(e) if started.elapsed() > STARTUP_TIMEOUT => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Wait until CLUSTER INFO says cluster_state:ok on every live node, in
    /// every live node's CLUSTER NODES every slot is served by a live master,
    /// and the live nodes agree on which nodes are masters (so that
    /// [`RedisCluster::master_ports`] then answers the same whoever it asks).
    /// Gives up after `timeout` with an error naming what is not ok.
    pub fn wait_ok(&self, timeout: Duration) -> Result<()> {
        self.wait_until("cluster not ok", timeout, || self.ok_problems())
    }

    /// Wait until every live replica reports `master_link_status:up` in INFO
    /// replication, so that it can take over from its master.
    pub fn wait_replicas_up(&self, timeout: Duration) -> Result<()> {
        self.wait_until("replicas not in sync", timeout, || self.replica_problems())
    }

    /// The concatenated log files of all nodes (tests grep them for errors),
    /// each after a `==> 127.0.0.1:p <==` header.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out.push_str(&format!("==> 127.0.0.1:{} <==\n", node.port));
            match std::fs::read_to_string(node.dir.path().join("redis.log")) {
                Ok(log) => out.push_str(&log),
                Err(e) => out.push_str(&format!("(no log: {e})\n")),
            }
        }
        out
    }

    fn node_mut(&mut self, port: u16) -> Result<&mut ClusterNode> {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .ok_or_else(|| Error::Server(format!("no node of this cluster listens on port {port}")))
    }

    fn running_ports(&self) -> Vec<u16> {
        self.nodes.iter().filter(|n| n.running).map(|n| n.port).collect()
    }

    /// CLUSTER NODES from the first live node that answers, and its port.
    fn view(&self) -> Result<(u16, Vec<NodeLine>)> {
        let mut errors = Vec::new();
        for port in self.running_ports() {
            match query(port, &["CLUSTER", "NODES"]).and_then(|text| parse_cluster_nodes(&text)) {
                Ok(view) => return Ok((port, view)),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if errors.is_empty() {
            return Err(Error::Server("no node of the cluster is running".into()));
        }
        Err(Error::Server(format!("no node answered CLUSTER NODES: {}", errors.join("; "))))
    }

    fn wait_until(&self, what: &str, timeout: Duration, problems: impl Fn() -> Vec<String>) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = problems();
            if found.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Server(format!("{what} after {timeout:?}: {}", found.join("; "))));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ok_problems(&self) -> Vec<String> {
        let live = self.running_ports();
        if live.is_empty() {
            return vec!["no node is running".into()];
        }
        let live_set: HashSet<u16> = live.iter().copied().collect();
        let mut problems = Vec::new();
        let mut views = Vec::new();
        for &port in &live {
            match query(port, &["CLUSTER", "INFO"]) {
                Ok(info) => {
                    let state = info_field(&info, "cluster_state").unwrap_or("missing");
                    if state != "ok" {
                        problems.push(format!("127.0.0.1:{port} has cluster_state:{state}"));
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
            match query(port, &["CLUSTER", "NODES"]).and_then(|text| parse_cluster_nodes(&text)) {
                Ok(view) => {
                    let mut served = vec![false; usize::from(SLOTS)];
                    // A node we killed may still look like a master to others
                    // until they flag it failed; it serves nothing.
                    for node in view.iter().filter(|n| n.serves() && live_set.contains(&n.port)) {
                        for &(first, last) in &node.slots {
                            for slot in first..=last.min(SLOTS - 1) {
                                served[usize::from(slot)] = true;
                            }
                        }
                    }
                    let unserved = slot_ranges(&served);
                    if !unserved.is_empty() {
                        problems.push(format!("127.0.0.1:{port} sees slots {unserved} without a live master"));
                    }
                    views.push((port, Topology::of(&view, &live_set)));
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        // Right after create (or a failover, or a restart) the nodes learn
        // who replicates whom by gossip, so one may still list a replica as a
        // master; until they agree, master_ports depends on whom it asks.
        if let Some(((first_port, first), rest)) = views.split_first() {
            for (port, topology) in rest {
                if topology != first {
                    problems.push(format!("127.0.0.1:{port} sees {topology} but 127.0.0.1:{first_port} sees {first}"));
                }
            }
        }
        problems
    }

    fn replica_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for port in self.running_ports() {
            match query(port, &["INFO", "replication"]) {
                Ok(info) => {
                    // INFO still says "slave" in Redis 7.
                    if info_field(&info, "role") == Some("slave") {
                        let link = info_field(&info, "master_link_status").unwrap_or("missing");
                        if link != "up" {
                            problems.push(format!("replica 127.0.0.1:{port} has master_link_status:{link}"));
                        }
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        problems
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }
}

fn node_url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}/")
}

fn tempdir(prefix: &str) -> Result<TempDir> {
    tempfile::Builder::new().prefix(prefix).tempdir().map_err(|e| Error::Server(format!("temp dir: {e}")))
}

/// A free port whose bus port (port + 10000) is free too, and that clashes
/// with no node already chosen, bus ports included.
fn free_cluster_port(taken: &[u16]) -> Result<u16> {
    for _ in 0..500 {
        let port = free_port()?;
        let Some(bus) = port.checked_add(BUS_PORT_OFFSET) else { continue };
        let clashes = taken.iter().any(|&t| t == port || t == bus || t.checked_add(BUS_PORT_OFFSET) == Some(port));
        if !clashes && std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return Ok(port);
        }
    }
    Err(Error::Server("no free port pair (port and port + 10000) found on 127.0.0.1".into()))
}

/// Starts one cluster node on `port` in `dir` and waits until it answers PING.
fn spawn_node(binary: &Path, port: u16, dir: &Path) -> Result<Child> {
    let mut command = server_command(binary, port, dir);
    command
        .args(["--cluster-enabled", "yes"])
        .args(["--cluster-config-file", "nodes.conf"])
        .arg("--cluster-node-timeout")
        .arg(NODE_TIMEOUT_MS.to_string())
        // So that a replica may always take over, however long its link was down.
        .args(["--cluster-replica-validity-factor", "0"])
        // A master otherwise waits 5 s for more replicas before it streams
        // the first sync, and a replica cannot take over until it has synced.
        .args(["--repl-diskless-sync-delay", "0"])
        // Acknowledged writes survive a restart of the node that took them.
        .args(["--appendonly", "yes", "--appendfsync", "always"]);
    let mut child = command.spawn().map_err(|e| Error::Server(format!("spawn {}: {e}", binary.display())))?;
    if let Err(e) = wait_until_up(&mut child, port, &dir.join("redis.log"), STARTUP_TIMEOUT) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}

/// Runs `program` with its output in `log`; kills it after `timeout`.
fn run_bounded(program: &Path, args: &[String], log: &Path, timeout: Duration) -> Result<()> {
    let name = program.display();
    let out = File::create(log).map_err(|e| Error::Server(format!("create {}: {e}", log.display())))?;
    let err = out.try_clone().map_err(|e| Error::Server(format!("clone {}: {e}", log.display())))?;
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    die_with_parent(&mut command);
    let mut child = command.spawn().map_err(|e| Error::Server(format!("spawn {name}: {e}")))?;
    let started = Instant::now();
    let output = || std::fs::read_to_string(log).unwrap_or_default().trim().to_string();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(Error::Server(format!("{name} {} exited with {status}:\n{}", args.join(" "), output())));
            }
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Server(format!(
                    "{name} {} killed after {timeout:?}:\n{}",
                    args.join(" "),
                    output()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Server(format!("wait for {name}: {e}")));
            }
        }
    }
}

/// One command to one node, on a fresh connection with timeouts, so that a
/// dead or hung node costs at most a few seconds.
fn query(port: u16, args: &[&str]) -> Result<String> {
    let failed = |e: redis::RedisError| Error::Server(format!("{} on 127.0.0.1:{port}: {e}", args.join(" ")));
    let client = redis::Client::open(node_url(port)).map_err(failed)?;
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
    cmd.query::<String>(&mut con).map_err(failed)
}

/// The value of `name:value` in an INFO-style reply.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
}

/// One line of CLUSTER NODES.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeLine {
    /// 0 for a node without an address yet (`noaddr`, or `:0@0`).
    port: u16,
    flags: Vec<String>,
    /// Inclusive ranges; a single slot is `(s, s)`.
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// A master that this view does not consider failed (a `fail?` suspicion
    /// is not enough: the cluster still routes to it until it is `fail`).
    fn serves(&self) -> bool {
        self.port != 0
            && self.has_flag("master")
            && !self.has_flag("fail")
            && !self.has_flag("noaddr")
            && !self.has_flag("handshake")
    }

    fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(first, last)| (first..=last).contains(&slot))
    }
}

/// What one node believes about the others, for comparing views.
#[derive(Debug, PartialEq, Eq)]
struct Topology {
    /// Every master the view does not consider failed, live or not.
    masters: BTreeSet<u16>,
    /// The role of each live node: true for a master. A live node missing
    /// from the view (not met yet) is missing here too.
    live_roles: BTreeMap<u16, bool>,
}

impl Topology {
    fn of(view: &[NodeLine], live: &HashSet<u16>) -> Topology {
        Topology {
            masters: view.iter().filter(|n| n.serves()).map(|n| n.port).collect(),
            live_roles: view
                .iter()
                .filter(|n| live.contains(&n.port) && !n.has_flag("handshake"))
                .map(|n| (n.port, n.has_flag("master")))
                .collect(),
        }
    }
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let replicas: Vec<u16> = self.live_roles.iter().filter(|(_, master)| !**master).map(|(p, _)| *p).collect();
        write!(f, "masters {:?}, live replicas {replicas:?}, {} live nodes", self.masters, self.live_roles.len())
    }
}

/// Parses CLUSTER NODES: `<id> <ip:port@cport[,hostname]> <flags> <master>
/// <ping-sent> <pong-recv> <config-epoch> <link-state> <slot>...`, where a
/// slot is `a-b`, `a`, or a `[slot->-id]` migration marker (skipped).
fn parse_cluster_nodes(text: &str) -> Result<Vec<NodeLine>> {
    let mut nodes = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return Err(Error::Server(format!("CLUSTER NODES line with {} fields: {line}", fields.len())));
        }
        let addr = fields[1].split(',').next().unwrap_or_default();
        let host_port = addr.split('@').next().unwrap_or_default();
        let port = host_port.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(0);
        let mut slots = Vec::new();
        for token in fields[8..].iter().filter(|t| !t.starts_with('[')) {
            let bad = || Error::Server(format!("CLUSTER NODES slot {token:?} in: {line}"));
            let range = match token.split_once('-') {
                Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
                None => {
                    let slot = token.parse().map_err(|_| bad())?;
                    (slot, slot)
                }
            };
            slots.push(range);
        }
        nodes.push(NodeLine { port, flags: fields[2].split(',').map(str::to_string).collect(), slots });
    }
    Ok(nodes)
}

/// The unset runs of `set` as "a-b,c,..." (empty when every slot is set),
/// cut short so an error message stays readable.
fn slot_ranges(set: &[bool]) -> String {
    let mut ranges = Vec::new();
    let mut slot = 0;
    while slot < set.len() {
        if set[slot] {
            slot += 1;
            continue;
        }
        let first = slot;
        while slot < set.len() && !set[slot] {
            slot += 1;
        }
        let last = slot - 1;
        ranges.push(if first == last { first.to_string() } else { format!("{first}-{last}") });
    }
    if ranges.len() > 8 {
        let more = ranges.len() - 8;
        ranges.truncate(8);
        ranges.push(format!("and {more} more ranges"));
    }
    ranges.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383 [16383->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 master,fail - 0 1426238316232 5 disconnected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5459 5460
a1b2 :0@0 master,noaddr - 0 0 0 disconnected
";

    #[test]
    fn parses_cluster_nodes() {
        let nodes = parse_cluster_nodes(SAMPLE).expect("parse");
        assert_eq!(nodes.len(), 6);
        assert_eq!(nodes[0].port, 30004);
        assert!(nodes[0].has_flag("slave") && !nodes[0].serves());
        assert_eq!(nodes[2].slots, vec![(10923, 16383)]);
        assert!(!nodes[3].serves(), "a failed master serves nothing");
        assert_eq!(nodes[4].slots, vec![(0, 5459), (5460, 5460)]);
        assert!(nodes[4].serves() && nodes[4].owns(5460) && !nodes[4].owns(5461));
        assert_eq!(nodes[5].port, 0);
        assert!(!nodes[5].serves());
    }

    #[test]
    fn compares_views_of_live_nodes() {
        let nodes = parse_cluster_nodes(SAMPLE).expect("parse");
        let live: HashSet<u16> = [30001, 30002, 30003, 30004].into();
        let topology = Topology::of(&nodes, &live);
        assert_eq!(topology.masters, [30001, 30002, 30003].into());
        assert_eq!(topology.live_roles, [(30001, true), (30002, true), (30003, true), (30004, false)].into());
        let mut lagging = nodes.clone();
        lagging[0].flags = vec!["master".into()];
        assert_ne!(Topology::of(&lagging, &live), topology, "a replica still listed as master is a disagreement");
    }

    #[test]
    fn names_unset_slot_ranges() {
        let mut set = vec![true; 20];
        set[3] = false;
        set[10..15].iter_mut().for_each(|s| *s = false);
        assert_eq!(slot_ranges(&set), "3,10-14");
        assert_eq!(slot_ranges(&[true; 4]), "");
    }

    #[test]
    fn reads_info_fields() {
        let info = "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\n";
        assert_eq!(info_field(info, "role"), Some("slave"));
        assert_eq!(info_field(info, "master_link_status"), Some("up"));
        assert_eq!(info_field(info, "master"), None);
    }
}
