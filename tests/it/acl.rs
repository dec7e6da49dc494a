//! runledger as a Redis ACL user limited to its prefix (README, "Security:
//! ACL user"): keys `~P:*`, channels `&P:*` and only the commands of
//! [`ACL_COMMANDS`].
//!
//! - the list is the README's line, without duplicates or categories, and
//!   names exactly the commands `lua/` and the client send (no more, none
//!   missing), read from the sources;
//! - as such a user (prefix `a`) every CLI command, `runledger worker`, the
//!   demo, the bench and the library `Worker` (with a cancel notice and a
//!   purge) succeed, and a `--wait-replicas` write too; afterwards `ACL LOG`
//!   holds no refusal of it but the optional commands the README names (the
//!   Worker's settings check, the bench's figures), and none at all for the
//!   operator user that has them; and the server ran every command of the
//!   list (so none is there for nothing);
//! - two tenants (prefixes `a` and `b`) cannot read, write, script, publish
//!   or subscribe under each other's prefix, and runledger with the wrong
//!   prefix fails in one line;
//! - on a private cluster, with the user on every node, the CLI and a
//!   Worker (sharded cancel notice) run as it too.
//!
//! Every wait is a hang guard; processes are killed by PID when dropped.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use runledger::embedded::RedisServer;
use runledger::{Done, Failure, NewRun, RunStatus, Store, StoreConfig, Worker};
use serde_json::{Value, json};

/// The commands of the README's ACL line: everything the library, the CLI,
/// the Worker, the demo and the bench need (`-@all` first, then these).
const ACL_COMMANDS: &str = "+ping +time +wait +fcall +fcall_ro +evalsha +script|load +get +set +del +exists +pexpire +pttl +persist +copy \
    +rename +incr +mget +hget +hmget +hgetall +hkeys +hlen +hset +hsetnx +hdel +hincrby +lpush +llen +blpop +sadd +srem \
    +smembers +sscan +sismember +scard +zadd +zrem +zcard +zcount +zscore +zrange +zrangebyscore +zunionstore +xadd +xdel +xlen +xrange +xrevrange \
    +xread +xinfo|stream +publish +subscribe +spublish +ssubscribe +cluster|slots";

/// What an operator user adds for the bench's server-wide figures (and the
/// Worker's settings check). A tenant goes without them: refused, they cost
/// only figures and advice.
const OPERATOR_EXTRAS: &str = "+info +memory|purge +config|get +latency|histogram";

/// Commands the client sends that the list leaves out on purpose: the
/// Worker's settings check (`Store::config_advice`), and the load of the
/// Functions library, which an operator runs once (`runledger functions
/// load`); refused it, the client runs its scripts instead.
const OPTIONAL_CLIENT: &[&str] = &["config|get", "function|load"];

/// The commands only the Functions way in uses, and those only the scripts' fallback uses.
const FUNCTIONS_ONLY: &[&str] = &["fcall", "fcall_ro"];
const SCRIPTS_ONLY: &[&str] = &["evalsha", "script|load"];

/// How a tenant's calls go in.
#[derive(Clone, Copy, Debug, PartialEq)]
enum WayIn {
    /// The tenant has FCALL but not FUNCTION: an admin loaded the library.
    Functions,
    /// The tenant has neither: every call is a script (EVALSHA).
    Scripts,
}

impl WayIn {
    /// The tenant's list: the README's, or the README's without FCALL.
    fn list(self, full: &str) -> String {
        match self {
            WayIn::Functions => full.to_string(),
            WayIn::Scripts => full
                .split_whitespace()
                .filter(|t| !FUNCTIONS_ONLY.contains(&t.trim_start_matches('+')))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    /// What the tenant may see refused: the optional commands, and FCALL for a tenant without it.
    fn optional(self) -> Vec<&'static str> {
        let mut allowed = OPTIONAL_CLIENT.to_vec();
        if self == WayIn::Scripts {
            allowed.extend(FUNCTIONS_ONLY);
        }
        allowed
    }

    /// The commands of the list that this way in never sends.
    fn unused(self) -> &'static [&'static str] {
        match self {
            WayIn::Functions => SCRIPTS_ONLY,
            WayIn::Scripts => FUNCTIONS_ONLY,
        }
    }
}

/// Calls of `command` in an `INFO commandstats` text (0 when it never ran).
fn calls_of(stats: &str, command: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("cmdstat_{command}:")))
        .and_then(|f| f.split(',').find_map(|f| f.strip_prefix("calls=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Loads the Functions library as the admin, with the CLI (`runledger functions load`).
async fn load_functions(url: &str) {
    let out = rl(url, "a", &["functions", "load"]).await.ok();
    assert!(out.stdout.starts_with("loaded runledger_"), "{}", out.describe());
}

/// Commands sent by the redis crate on runledger's behalf rather than by a
/// `cmd(..)` of ours: pub/sub subscriptions and the cluster client's slot map.
const SENT_BY_THE_CRATE: &[&str] = &["subscribe", "ssubscribe", "cluster|slots"];

/// Commands the client sends to the sentinels of a Sentinel setup (to find
/// the master), never to a data server: not the tenant's list.
const SENT_TO_SENTINELS: &[&str] = &["sentinel"];

/// Commands of the bench beyond the list and the operator's extras: SCAN and
/// UNLINK remove the fresh prefix of a bench without `--shared`, which a user
/// limited to its prefix does not run.
const BENCH_FRESH_PREFIX: &[&str] = &["scan", "unlink"];

/// Commands only a Redis Cluster gets (sharded pub/sub, the slot map).
const CLUSTER_ONLY: &[&str] = &["spublish", "ssubscribe", "cluster|slots"];

/// Hang guard of one CLI call.
const CALL_TIMEOUT: Duration = Duration::from_secs(180);

fn tokens(list: &str) -> Vec<String> {
    list.split_whitespace().map(str::to_string).collect()
}

fn commands_of(list: &str) -> BTreeSet<String> {
    list.split_whitespace().map(|t| t.trim_start_matches('+').to_string()).collect()
}

// ---------------------------------------------------------------- the list

/// The `ACL SETUSER` lines of the README's section "Security: ACL user", from its fenced blocks.
pub(crate) fn readme_acl_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).expect("README.md");
    let start = readme.find("### Security: ACL user").expect("README has a section \"### Security: ACL user\"");
    let section = &readme[start + 3..];
    let end = section.find("\n## ").into_iter().chain(section.find("\n### ")).min().unwrap_or(section.len());
    let mut lines = Vec::new();
    let mut fenced = false;
    for line in section[..end].lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if fenced && line.trim_start().starts_with("ACL SETUSER") {
            lines.push(line.trim().to_string());
        }
    }
    lines
}

/// (user name, the rules before `-@all`, the commands after it) of an `ACL SETUSER` line.
fn split_line(line: &str) -> (String, Vec<String>, Vec<String>) {
    let words: Vec<String> = tokens(line);
    assert!(words.len() > 3 && words[0] == "ACL" && words[1] == "SETUSER", "not an ACL SETUSER line: {line}");
    let all = words.iter().position(|w| w == "-@all").unwrap_or_else(|| panic!("no -@all in: {line}"));
    (words[2].clone(), words[3..all].to_vec(), words[all + 1..].to_vec())
}

#[test]
fn the_readme_line_is_the_list() {
    let lines = readme_acl_lines();
    assert_eq!(lines.len(), 2, "the README section shows the tenant's line and the operator's: {lines:#?}");
    let (user, rules, commands) = split_line(&lines[0]);
    assert_eq!(user, "runledger");
    assert_eq!(
        rules,
        tokens("on >CHANGE-ME resetkeys ~rl:* resetchannels &rl:*"),
        "the tenant's keys and channels are its prefix's, nothing else"
    );
    assert_eq!(commands, tokens(ACL_COMMANDS), "the README's ACL line and ACL_COMMANDS of tests/it/acl.rs differ");
    let (ops, ops_rules, ops_commands) = split_line(&lines[1]);
    assert_eq!(ops, "runledger-ops");
    assert_eq!(ops_rules, rules, "the operator's keys and channels are the tenant's");
    let expected: Vec<String> = tokens(ACL_COMMANDS).into_iter().chain(tokens(OPERATOR_EXTRAS)).collect();
    assert_eq!(ops_commands, expected, "the operator's line is the tenant's plus OPERATOR_EXTRAS");

    // Explicit commands only: no category, no duplicate, nothing taken away.
    let mut seen = BTreeSet::new();
    for t in &ops_commands {
        assert!(t.starts_with('+') && t.len() > 1, "only +command rules after -@all: {t}");
        assert!(!t.contains('@'), "a category ({t}) grants more than runledger sends");
        assert!(
            t.chars().skip(1).all(|c| c.is_ascii_lowercase() || c == '|' || c == '_'),
            "lower-case command names: {t}"
        );
        assert!(seen.insert(t.clone()), "{t} is listed twice");
    }
    for t in tokens(OPERATOR_EXTRAS) {
        assert!(!tokens(ACL_COMMANDS).contains(&t), "{t} is an operator's extra, not a tenant's command");
    }
}

/// Every source file under `dir` with the extension `ext`.
fn sources(dir: &Path, ext: &str, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, ext, out);
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
}

/// The string literals that follow `opener` in `text`: `redis.call('X', 'Y'` gives ["X", "Y"].
fn literal_args(text: &str, opener: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(opener) {
        rest = &rest[at + opener.len()..];
        let mut args = Vec::new();
        let mut s = rest.trim_start();
        while let Some(quote) = s.chars().next().filter(|c| *c == '\'' || *c == '"') {
            let Some(end) = s[1..].find(quote) else { break };
            args.push(s[1..1 + end].to_string());
            s = s[1 + end + 1..].trim_start();
            // Lua: `'X', 'Y'`; Rust: `cmd("X").arg("Y")`.
            s = s.strip_prefix(',').or_else(|| s.strip_prefix(").arg(")).unwrap_or("").trim_start();
        }
        out.push(args);
    }
    out
}

/// A command as ACL names it: `xinfo|stream` for the subcommand of a container command.
fn acl_name(args: &[String]) -> Option<String> {
    let name = args.first()?.to_ascii_lowercase();
    if ["xinfo", "script", "function", "cluster", "config", "memory", "client", "object", "acl", "latency"]
        .contains(&name.as_str())
    {
        return Some(format!("{name}|{}", args.get(1)?.to_ascii_lowercase()));
    }
    Some(name)
}

#[test]
fn the_list_is_what_the_code_sends() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The scripts: every redis.call / redis.pcall with a literal command.
    let mut lua_files = Vec::new();
    sources(&root.join("lua"), "lua", &mut lua_files);
    let mut by_scripts = BTreeSet::new();
    for file in &lua_files {
        let text = std::fs::read_to_string(file).expect("lua source");
        for opener in ["redis.call(", "redis.pcall("] {
            by_scripts.extend(literal_args(&text, opener).iter().filter_map(|a| acl_name(a)));
        }
    }
    assert!(by_scripts.contains("hset") && by_scripts.contains("xadd"), "the Lua parse found the scripts' commands");
    // The client: every cmd("X") of the library and the CLI, but the
    // private servers' control (src/embedded*) and the bench's figures.
    let mut rust_files = Vec::new();
    sources(&root.join("src"), "rs", &mut rust_files);
    let mut by_client = BTreeSet::new();
    for file in &rust_files {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("embedded") || file.starts_with(root.join("src/bin/runledger/bench")) {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("rust source");
        by_client.extend(literal_args(&text, "cmd(").iter().filter_map(|a| acl_name(a)));
        // The cancel notice's command, chosen per backend (Store::publish_command).
        for publish in ["\"PUBLISH\"", "\"SPUBLISH\""] {
            if text.contains(publish) {
                by_client.insert(publish.trim_matches('"').to_ascii_lowercase());
            }
        }
    }
    assert!(
        ["fcall", "fcall_ro", "evalsha", "function|load", "blpop"].iter().all(|c| by_client.contains(*c)),
        "the Rust parse found the client's commands: {by_client:?}"
    );

    let list = commands_of(ACL_COMMANDS);
    let sent: BTreeSet<String> =
        by_scripts.iter().chain(&by_client).cloned().chain(SENT_BY_THE_CRATE.iter().map(|c| c.to_string())).collect();
    let missing: Vec<&String> = sent
        .iter()
        .filter(|c| {
            !list.contains(*c) && !OPTIONAL_CLIENT.contains(&c.as_str()) && !SENT_TO_SENTINELS.contains(&c.as_str())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "runledger sends {missing:?}, which the ACL list lacks (add them to ACL_COMMANDS and the README's lines)"
    );
    // The standard bench (src/bin/runledger/bench/, but for the parts that
    // start servers of their own: peer, host, cluster, ui): the list plus the
    // operator's extras. `CONFIG RESETSTAT` only on the bench's own private
    // server, never on a given one.
    let bench = ["mod.rs", "probe.rs", "workload.rs", "standard.rs", "report.rs", "memory.rs", "limit.rs", "steps.rs"]
        .map(|f| std::fs::read_to_string(root.join("src/bin/runledger/bench").join(f)).expect("bench source"))
        .join("\n")
        .replace(r#"cmd("CONFIG").arg("RESETSTAT")"#, "");
    let extras = commands_of(OPERATOR_EXTRAS);
    let beyond: Vec<String> = literal_args(&bench, "cmd(")
        .iter()
        .filter_map(|a| acl_name(a))
        .filter(|c| !list.contains(c) && !extras.contains(c) && !BENCH_FRESH_PREFIX.contains(&c.as_str()))
        .collect();
    assert!(beyond.is_empty(), "the bench sends {beyond:?}, which neither the list nor OPERATOR_EXTRAS has");
    let unused: Vec<&String> = list.iter().filter(|c| !sent.contains(*c)).collect();
    assert!(unused.is_empty(), "the ACL list grants {unused:?}, which nothing sends any more: take them out");
}

// ---------------------------------------------------------------- helpers

async fn admin(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).expect("admin client").get_multiplexed_async_connection().await.expect("admin connection")
}

/// The server's version as (major, minor).
async fn version(conn: &mut redis::aio::MultiplexedConnection) -> (u32, u32) {
    let info: String = redis::cmd("INFO").arg("server").query_async(conn).await.expect("INFO server");
    let v = info.lines().find_map(|l| l.strip_prefix("redis_version:")).expect("redis_version").trim().to_string();
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The command list a user of this server gets: the README's, plus
/// `client|setinfo` on Redis 7.2 and later (see the README).
async fn list_for(conn: &mut redis::aio::MultiplexedConnection, extra: &str) -> String {
    let mut list = format!("{ACL_COMMANDS} {extra}");
    if version(conn).await >= (7, 2) {
        list.push_str(" +client|setinfo");
    }
    list
}

/// Creates (or resets) a user limited to `prefix`, as the README's line does for `rl`.
async fn set_user(conn: &mut redis::aio::MultiplexedConnection, user: &str, password: &str, prefix: &str, list: &str) {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER").arg(user).arg("reset").arg("on").arg(format!(">{password}"));
    cmd.arg("resetkeys").arg(format!("~{prefix}:*")).arg("resetchannels").arg(format!("&{prefix}:*")).arg("-@all");
    for t in list.split_whitespace() {
        cmd.arg(t);
    }
    let _: () = cmd.query_async(conn).await.unwrap_or_else(|e| panic!("ACL SETUSER {user}: {e}"));
}

fn user_url(port: u16, user: &str, password: &str) -> String {
    format!("redis://{user}:{password}@127.0.0.1:{port}/")
}

/// One refusal recorded by `ACL LOG`.
#[derive(Debug, Clone)]
struct Denial {
    username: String,
    reason: String,
    object: String,
}

fn text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Int(n) => n.to_string(),
        redis::Value::Double(d) => d.to_string(),
        other => format!("{other:?}"),
    }
}

async fn acl_log(conn: &mut redis::aio::MultiplexedConnection) -> Vec<Denial> {
    let entries: Vec<redis::Value> = redis::cmd("ACL").arg("LOG").arg(1000).query_async(conn).await.expect("ACL LOG");
    entries
        .into_iter()
        .map(|entry| {
            let pairs: Vec<(String, String)> = match entry {
                redis::Value::Array(items) => items.chunks(2).map(|p| (text(&p[0]), text(&p[1]))).collect(),
                redis::Value::Map(items) => items.iter().map(|(k, v)| (text(k), text(v))).collect(),
                other => panic!("unexpected ACL LOG entry {other:?}"),
            };
            let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_default();
            Denial { username: get("username"), reason: get("reason"), object: get("object") }
        })
        .collect()
}

async fn acl_log_reset(conn: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::cmd("ACL").arg("LOG").arg("RESET").query_async(conn).await.expect("ACL LOG RESET");
}

/// The refusals of `user`, asserting that each is a command in `allowed`.
async fn denials_only_of(conn: &mut redis::aio::MultiplexedConnection, user: &str, allowed: &[&str], when: &str) {
    let mine: Vec<Denial> = acl_log(conn).await.into_iter().filter(|d| d.username == user).collect();
    let unexpected: Vec<&Denial> =
        mine.iter().filter(|d| d.reason != "command" || !allowed.contains(&d.object.as_str())).collect();
    assert!(
        unexpected.is_empty(),
        "{when}: ACL LOG refused {user} more than {allowed:?}: {unexpected:#?} (all of its entries: {mine:#?})"
    );
}

/// What one call of the binary did.
struct Out {
    args: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn describe(&self) -> String {
        format!(
            "`runledger {}` exited {:?}\n--- stdout\n{}--- stderr\n{}",
            self.args, self.code, self.stdout, self.stderr
        )
    }

    fn ok(self) -> Out {
        assert_eq!(self.code, Some(0), "expected success: {}", self.describe());
        self
    }

    fn json(self) -> Value {
        let out = self.ok();
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", out.describe()))
    }

    /// Exit `code`, and one line on stderr naming the refusal.
    fn refused(self, code: i32) -> Out {
        assert_eq!(self.code, Some(code), "expected exit {code}: {}", self.describe());
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr: {}", self.describe());
        assert!(lines[0].starts_with("runledger: "), "the line starts with `runledger: `: {}", self.describe());
        self
    }
}

/// The binary with a clean environment, on `url` with `--prefix prefix`.
fn bin(url: &str, prefix: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_runledger"));
    cmd.env_remove("REDIS_URL")
        .env_remove("RUNLEDGER_PREFIX")
        .env_remove("REDIS_CLUSTER")
        .env_remove("RUNLEDGER_WAIT_REPLICAS")
        .env_remove("RUST_LOG")
        .args(["--redis", url, "--prefix", prefix])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn finish(args: String, child: tokio::process::Child) -> Out {
    let output = tokio::time::timeout(CALL_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("hang guard: `runledger {args}` still running after {CALL_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("`runledger {args}`: {e}"));
    Out {
        args,
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn rl(url: &str, prefix: &str, args: &[&str]) -> Out {
    let child = bin(url, prefix, args).spawn().expect("spawn runledger");
    finish(args.join(" "), child).await
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Polls `check` every 100 ms until it holds; panics after `limit` (a hang guard).
async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let done = tokio::time::timeout(limit, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(done.is_ok(), "hang guard: {what} not after {limit:?}");
}

/// Waits until `queue` has `finished` runs finished, then stops the Worker and returns its report.
async fn finish_worker(
    store: &Store,
    queue: &str,
    finished: i64,
    stop: tokio_util::sync::CancellationToken,
    running: tokio::task::JoinHandle<runledger::Result<runledger::WorkerReport>>,
) -> runledger::WorkerReport {
    wait_for(&format!("the Worker finishing {finished} runs of {queue}"), Duration::from_secs(120), || {
        let store = store.clone();
        let queue = queue.to_string();
        async move { store.queue_stats(&queue, 0).await.map(|s| s.finished == finished).unwrap_or(false) }
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("hang guard: the Worker did not stop")
        .expect("worker task")
        .expect("worker run")
}

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("the child is running");
    // SAFETY: kill(2) on our own child's PID.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "SIGTERM to {pid}");
}

// ---------------------------------------------------------------- as the tenant

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_fcall_runs_everything_as_its_acl_user() {
    tenant_runs_everything(WayIn::Functions).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_without_functions_runs_everything_as_scripts() {
    tenant_runs_everything(WayIn::Scripts).await;
}

async fn tenant_runs_everything(way: WayIn) {
    let redis = common::redis().await;
    let server = redis.server().expect("this test starts a replica beside a private redis-server binary");
    let port = server.port();
    let mut root = admin(&redis.url).await;
    let tenant_list = way.list(&list_for(&mut root, "").await);
    let ops_list = way.list(&list_for(&mut root, OPERATOR_EXTRAS).await);
    set_user(&mut root, "tenant_a", "pw_a", "a", &tenant_list).await;
    set_user(&mut root, "ops_a", "pw_ops", "a", &ops_list).await;
    if way == WayIn::Functions {
        load_functions(&redis.url).await;
    }
    let optional = way.optional();
    // A replica, for the write concern's WAIT (it syncs as the default user).
    let port_arg = port.to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port_arg]).expect("replica");
    acl_log_reset(&mut root).await;
    let url = user_url(port, "tenant_a", "pw_a");
    let a = |args: &'static [&'static str]| rl(&url, "a", args);

    // 1. Every ledger command of the README's CLI section.
    let deadline = (now_s() + 3600).to_string();
    let not_before = (now_s() + 3600).to_string();
    let out = rl(
        &url,
        "a",
        &[
            "enqueue",
            "--queue",
            "q1",
            "--runner",
            "r1",
            "--run-id",
            "run-1",
            "--priority",
            "5",
            "--metadata",
            r#"{"user":"ada"}"#,
            "--conversation",
            "c1",
            "--thread",
            "t1",
            "--workspace",
            "w1",
            "--bot",
            "b1",
            "--agent",
            "ag",
            "--event-id",
            "e1",
            "--binding",
            "bd",
            "--authorization",
            r#"{"k":"v"}"#,
            "--max-attempts",
            "3",
        ],
    )
    .await
    .ok();
    assert!(out.stdout.contains("run run-1"), "{}", out.describe());
    // The same run again: idempotent (the locator is kept, PERSIST).
    let again = a(&["--json", "enqueue", "--queue", "q1", "--runner", "r1", "--run-id", "run-1"]).await.json();
    assert_eq!(again["run_id"], "run-1");
    rl(&url, "a", &["enqueue", "--queue", "q1", "--runner", "r2", "--run-id", "run-2", "--deadline", &deadline])
        .await
        .ok();
    rl(&url, "a", &["enqueue", "--queue", "q1", "--runner", "r1", "--run-id", "run-3", "--not-before", &not_before])
        .await
        .ok();
    a(&["enqueue", "--queue", "q1", "--runner", "r1", "--run-id", "run-4", "--requested-runtime", "box-9"]).await.ok();
    a(&["enqueue", "--queue", "q1", "--runner", "r1", "--run-id", "run-5", "--status", "running"]).await.ok();

    let claimed =
        a(&["--json", "claim", "--runtime", "box-1", "--queue", "q1", "--runner", "r1", "--lease", "30"]).await.json();
    assert_eq!(claimed["run_id"], "run-1", "{claimed}");
    let token = claimed["claim_token"].as_str().expect("claim token").to_string();
    rl(&url, "a", &["renew", "run-1", "--token", &token, "--lease", "30"]).await.ok();
    let appended = rl(
        &url,
        "a",
        &[
            "append",
            "run-1",
            "--seq",
            "1",
            "--type",
            "progress",
            "--data",
            r#"{"pct":50}"#,
            "--usage",
            r#"{"t":1}"#,
            "--source",
            "runner",
            "--token",
            &token,
        ],
    )
    .await
    .ok();
    assert!(appended.stdout.contains("progress"), "{}", appended.describe());
    a(&["audit", "run-1", "--type", "note", "--data", r#"{"by":"op"}"#]).await.ok();
    let events = a(&["--json", "events", "run-1"]).await.json();
    assert_eq!(events["items"].as_array().map(Vec::len), Some(2), "{events}");
    a(&["events", "run-1", "--after", "0", "--limit", "1", "--backward"]).await.ok();
    // --follow prints until the run finishes.
    let follow = bin(&url, "a", &["events", "run-1", "--follow"]).spawn().expect("spawn events --follow");
    tokio::time::sleep(Duration::from_millis(500)).await;
    rl(
        &url,
        "a",
        &[
            "finalize",
            "run-1",
            "--status",
            "completed",
            "--reason",
            "done",
            "--usage",
            r#"{"tokens":812}"#,
            "--cost",
            r#"{"usd":1}"#,
            "--metadata",
            r#"{"m":1}"#,
            "--token",
            &token,
        ],
    )
    .await
    .ok();
    let followed = finish("events run-1 --follow".into(), follow).await.ok();
    assert!(followed.stdout.contains("progress") && followed.stdout.contains("note"), "{}", followed.describe());

    let second = a(&["--json", "claim", "--runtime", "box-1", "--queue", "q1", "--lease", "30"]).await.json();
    assert_eq!(second["run_id"], "run-2", "{second}");
    let token2 = second["claim_token"].as_str().expect("claim token").to_string();
    rl(&url, "a", &["release", "run-2", "--token", &token2, "--reason", "back", "--retry-in", "1"]).await.ok();
    // A blocking claim with a runner filter (listeners, wake lists), woken by an enqueue.
    let waiting =
        bin(&url, "a", &["--json", "claim", "--runtime", "box-2", "--queue", "q1", "--runner", "r2", "--wait", "20"])
            .spawn()
            .expect("spawn claim --wait");
    tokio::time::sleep(Duration::from_millis(500)).await;
    a(&["enqueue", "--queue", "q1", "--runner", "r2", "--run-id", "run-6"]).await.ok();
    let woken: Value = serde_json::from_str(&finish("claim --wait".into(), waiting).await.ok().stdout).expect("json");
    assert_eq!(woken["runner_id"], "r2", "{woken}");
    // Cancelling a claimed run publishes a notice; a delayed one is cancelled at once.
    let held = woken["run_id"].as_str().expect("run id").to_string();
    rl(&url, "a", &["cancel", &held, "--reason", "stop"]).await.ok();
    let cancelled = a(&["--json", "cancel", "run-3"]).await.json();
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let got = a(&["--json", "get", "run-1"]).await.json();
    assert_eq!(got["status"], "completed", "{got}");
    let runs = a(&["--json", "runs"]).await.json();
    assert!(runs["items"].as_array().is_some_and(|r| r.len() >= 6), "{runs}");
    for filter in [
        &["runs", "--queue", "q1", "--status", "completed", "--limit", "5"][..],
        &["runs", "--conversation", "c1"],
        &["runs", "--bot", "b1"],
        &["runs", "--workspace", "w1"],
        &["runs", "--thread", "t1", "--strict-thread"],
    ] {
        let out = rl(&url, "a", filter).await.ok();
        assert!(out.stdout.contains("run-1"), "{}", out.describe());
    }
    a(&["runtimes"]).await.ok();
    let out = a(&["partition", "hot", "2"]).await.ok();
    assert!(out.stdout.contains("hot#0"), "{}", out.describe());
    a(&["enqueue", "--queue", "hot", "--runner", "r1", "--partition-key", "k"]).await.ok();
    // Groups and pause (one run per conversation; a paused group, resumed).
    a(&["queue", "set", "chat", "--group-by", "conversation_id", "--group-concurrency", "1"]).await.ok();
    a(&["enqueue", "--queue", "chat", "--runner", "r1", "--run-id", "chat-1", "--conversation", "c"]).await.ok();
    a(&["enqueue", "--queue", "chat", "--runner", "r1", "--run-id", "chat-2", "--conversation", "c"]).await.ok();
    let held = a(&["--json", "claim", "--runtime", "rt-chat", "--queue", "chat"]).await.json();
    assert_eq!(held["run_id"], "chat-1");
    a(&["queue", "pause", "chat", "--group", "c"]).await.ok();
    // The dashboard's list of paused groups (SSCAN), through the library as the tenant.
    let tenant = Store::connect_with(&url, StoreConfig { prefix: "a".into(), ..Default::default() })
        .await
        .expect("the library as tenant_a");
    assert_eq!(tenant.paused_groups("chat", 10).await.expect("paused groups"), vec!["c".to_string()]);
    a(&["queue", "resume", "chat", "--group", "c"]).await.ok();
    a(&["queue", "pause", "chat"]).await.ok();
    a(&["queue", "resume", "chat"]).await.ok();
    // Rate limits and caps: a claim refused by the rate reads its window's end (PTTL).
    a(&["queue", "set", "limited", "--rate-limit", "1/60", "--group-rate-limit", "1/60", "--cap", "3"]).await.ok();
    a(&["enqueue", "--queue", "limited", "--runner", "r1", "--run-id", "lim-1"]).await.ok();
    a(&["enqueue", "--queue", "limited", "--runner", "r1", "--run-id", "lim-2"]).await.ok();
    a(&["claim", "--runtime", "rt-lim", "--queue", "limited"]).await.ok();
    let refused = a(&["--json", "claim", "--runtime", "rt-lim", "--queue", "limited"]).await.json();
    assert!(refused.is_null(), "the rate allows one claim a minute: {refused}");
    a(&["queue", "set", "limited", "--rate-limit", "0", "--cap", "0"]).await.ok();
    let queues = a(&["queues"]).await.ok();
    assert!(queues.stdout.contains("q1") && queues.stdout.contains("hot"), "{}", queues.describe());
    a(&["reap"]).await.ok();
    // A pinned run cancelled while queued empties its lane (SREM from `pins`).
    a(&["enqueue", "--queue", "q1", "--runner", "r1", "--run-id", "run-7", "--requested-runtime", "box-8"]).await.ok();
    a(&["cancel", "run-7"]).await.ok();
    // A claim meeting a run hash deleted by hand, in a queue of two runners,
    // finds the runner by its lane (ZSCORE) and claims the next run.
    a(&["enqueue", "--queue", "gone", "--runner", "r1", "--run-id", "g1"]).await.ok();
    a(&["enqueue", "--queue", "gone", "--runner", "r2", "--run-id", "g2", "--priority", "9"]).await.ok();
    let _: i64 = redis::cmd("DEL").arg("a:{gone}:run:g2").query_async(&mut root).await.expect("DEL by hand");
    let next = a(&["--json", "claim", "--runtime", "box-1", "--queue", "gone"]).await.json();
    assert_eq!(next["run_id"], "g1", "{next}");
    // The write concern: every write waits for the replica (WAIT).
    let mut replica_conn = admin(&replica.url()).await;
    wait_for("the replica in sync", Duration::from_secs(30), || {
        let mut root = root.clone();
        async move {
            let info: String = redis::cmd("INFO").arg("replication").query_async(&mut root).await.unwrap_or_default();
            info.contains("connected_slaves:1") && info.contains("state=online")
        }
    })
    .await;
    let concerned =
        a(&["--wait-replicas", "1", "--json", "enqueue", "--queue", "q1", "--runner", "r1", "--run-id", "run-w"])
            .await
            .json();
    assert_eq!(concerned["run_id"], "run-w");
    wait_for("run-w on the replica", Duration::from_secs(30), || {
        let mut c = replica_conn.clone();
        async move { redis::cmd("EXISTS").arg("a:locator:run-w").query_async::<i64>(&mut c).await.unwrap_or(0) == 1 }
    })
    .await;
    let _: () = redis::cmd("PING").query_async(&mut replica_conn).await.expect("replica up");
    // A queue as an earlier build left it (one runner's runs and no lane, no
    // `lanes` mark): its next claim, as the tenant, copies it into the lane.
    rl(&url, "a", &["enqueue", "--queue", "legacy", "--runner", "lr", "--run-id", "old-1"]).await.ok();
    let _: () = redis::cmd("DEL").arg("a:{legacy}:runner:lr").query_async(&mut root).await.expect("DEL");
    for key in ["a:{legacy}:meta", "a:{legacy}:hints"] {
        let _: () = redis::cmd("HDEL").arg(key).arg("lanes").query_async(&mut root).await.expect("HDEL");
    }
    let old = a(&["--json", "claim", "--runtime", "box-1", "--queue", "legacy", "--runner", "lr"]).await.json();
    assert_eq!(old["run_id"], "old-1", "the upgraded queue hands out its run to a filtered claim: {old}");
    // None of that asked for anything outside the list (but FCALL, for a tenant without it).
    let no_fcall: &[&str] = if way == WayIn::Scripts { FUNCTIONS_ONLY } else { &[] };
    denials_only_of(&mut root, "tenant_a", no_fcall, "after the ledger commands").await;

    // 2. `runledger worker`: completes runs, stops on SIGTERM.
    for i in 0..6 {
        rl(&url, "a", &["enqueue", "--queue", "w", "--runner", "rr", "--run-id", &format!("w-{i}")]).await.ok();
    }
    let worker = bin(
        &url,
        "a",
        &[
            "worker",
            "--queue",
            "w",
            "--concurrency",
            "2",
            "--work-ms",
            "50",
            "--steps",
            "2",
            "--fail-rate",
            "0",
            "--lease",
            "5",
            "--heartbeat",
            "1",
            "--grace",
            "2",
        ],
    )
    .spawn()
    .expect("spawn worker");
    let store = Store::connect_with(&url, StoreConfig { prefix: "a".into(), ..Default::default() })
        .await
        .expect("the library as tenant_a");
    wait_for("the worker finishing 6 runs", Duration::from_secs(120), || {
        let store = store.clone();
        async move { store.queue_stats("w", 0).await.map(|s| s.finished == 6).unwrap_or(false) }
    })
    .await;
    let runtimes = a(&["--json", "runtimes"]).await.json();
    assert!(runtimes.as_array().is_some_and(|r| !r.is_empty()), "the worker registered: {runtimes}");
    sigterm(&worker);
    let stopped = finish("worker".into(), worker).await.ok();
    assert!(stopped.stdout.contains("completed 6"), "{}", stopped.describe());

    // 2b. `runledger ui`: every page, /metrics, a run's live events (XREAD) and an action.
    let ui = common::dashboard::Dashboard::start(&url, &["--prefix", "a"]).await;
    let http = common::dashboard::client();
    for path in ["/", "/metrics", "/queues/w", "/runs?queue=w", "/runs/w-0", "/runtimes"] {
        let response = http.get(ui.url(path)).send().await.expect("dashboard GET");
        assert_eq!(response.status().as_u16(), 200, "GET {path} as tenant_a");
    }
    let live = http.get(ui.url("/runs/w-0/live")).send().await.expect("live view").text().await.expect("body");
    assert!(live.contains("event: run-event") && live.contains("event: end"), "{live}");
    let requeue = http.post(ui.url("/runs/run-7/requeue")).form(&[("token", "")]).send().await.expect("requeue");
    assert_eq!(requeue.status().as_u16(), 303, "requeue as tenant_a");
    drop(ui);

    // 3. The demo, in the tenant's prefix.
    let demo = a(&[
        "demo",
        "--shared",
        "--runs",
        "12",
        "--workers",
        "2",
        "--concurrency",
        "2",
        "--work-ms",
        "20",
        "--lease",
        "1",
        "--timeout",
        "150",
    ])
    .await
    .ok();
    assert!(demo.stdout.contains("OK: every run ended exactly once"), "{}", demo.describe());

    // 4. The library Worker: runs, a cancel notice, then a reaper pass that purges.
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let worker = Worker::builder(&store)
        .queue("lib")
        .concurrency(2)
        .lease(Duration::from_secs(10))
        .handle_signals(false)
        .build(move |ctx| {
            let started = started_tx.clone();
            async move {
                if ctx.run.run_id == "lib-cancel" {
                    let _ = started.send(ctx.run.run_id.clone());
                    let _ = tokio::time::timeout(Duration::from_secs(60), ctx.stopped()).await;
                    // Told to stop: giving up leaves the outcome to the stop's reason.
                    return Err(Failure::fatal(format!("stopped: {:?}", ctx.stop_reason())));
                }
                ctx.emit_many(vec![("progress".into(), json!({"p": 1})), ("result".into(), json!({"p": 2}))]).await?;
                Ok(Done { usage: Some(json!({"tokens": 1})), ..Default::default() })
            }
        })
        .expect("worker");
    let stop = worker.shutdown_token();
    let running = tokio::spawn(worker.run());
    store.create_run(&NewRun::new("lib-cancel", "agent").queue("lib")).await.expect("create lib-cancel");
    let started = tokio::time::timeout(Duration::from_secs(60), started_rx.recv()).await;
    assert!(matches!(started, Ok(Some(_))), "hang guard: the handler of lib-cancel did not start");
    store.request_cancel("lib-cancel", Some("test")).await.expect("cancel lib-cancel");
    let batch: Vec<NewRun> = (0..5).map(|i| NewRun::new(format!("lib-{i}"), "agent").queue("lib")).collect();
    store.create_runs(&batch).await.expect("create lib runs");
    let report = finish_worker(&store, "lib", 6, stop, running).await;
    assert_eq!(store.get_run("lib-cancel").await.expect("lib-cancel").status, RunStatus::Cancelled);
    assert_eq!((report.completed, report.cancelled), (5, 1), "{report:?}");
    // Far in the future: purges every finished run, times out run-5, releases run-4's pin, marks stale runtimes.
    let later =
        store.server_time_ms().await.expect("TIME") + store.config().retention.as_millis() as i64 + 3 * 86_400_000;
    let reaped = store.reap(&[], Some(later)).await.expect("reap as tenant_a");
    assert!(reaped.purged >= 6, "{reaped:?}");
    store.list_runtimes(&[], 10).await.expect("list runtimes as tenant_a");
    // The Workers' settings check (CONFIG GET) is the only refusal: optional, and only logged.
    denials_only_of(&mut root, "tenant_a", &optional, "after the worker, the demo and the Worker").await;

    // 5. The bench in the tenant's prefix: the figures that need INFO are n/a, not fatal.
    const SMALLEST: &[&str] = &[
        "--json",
        "bench",
        "--shared",
        "--runs",
        "1",
        "--workers",
        "1",
        "--many-workers",
        "0",
        "--depth",
        "0",
        "--latency-samples",
        "1",
    ];
    let bench = rl(&url, "a", SMALLEST).await;
    let stderr = bench.stderr.clone();
    let figures = bench.json();
    assert!(figures["enqueue_single_per_s"].as_f64().is_some_and(|v| v > 0.0), "{figures}");
    assert!(figures["lifecycle_per_s"].as_f64().is_some_and(|v| v > 0.0), "{figures}");
    assert_eq!(figures["redis_version"], "n/a", "{figures}");
    assert!(figures["memory_per_queued_run"].is_null(), "{figures}");
    assert!(stderr.contains("bench: note: the server refuses INFO"), "{stderr}");
    assert!(stderr.contains("bench: note: the server refuses CONFIG GET"), "{stderr}");
    let bench_refusals: Vec<&str> =
        optional.iter().copied().chain(["info", "memory|purge", "latency|histogram"]).collect();
    denials_only_of(&mut root, "tenant_a", &bench_refusals, "after the bench").await;

    // The operator user has the extras: every figure, and no refusal at all.
    acl_log_reset(&mut root).await;
    let ops_url = user_url(port, "ops_a", "pw_ops");
    let bench = rl(&ops_url, "a", SMALLEST).await;
    let stderr = bench.stderr.clone();
    let figures = bench.json();
    assert!(!stderr.contains("refuses"), "{stderr}");
    assert!(figures["memory_per_queued_run"].as_f64().is_some(), "{figures}");
    assert!(figures["redis_version"].as_str().is_some_and(|v| v.starts_with('7') || v.starts_with('8')), "{figures}");
    denials_only_of(&mut root, "ops_a", no_fcall, "after the operator's bench").await;
    denials_only_of(&mut root, "tenant_a", &[], "after the operator's bench").await;
    // And the other way round: the server ran every command of the list (the
    // test's own connection sent only INFO, ACL and one DEL so far), but those of a
    // cluster and those ahead of their use.
    let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut root).await.expect("INFO commandstats");
    let ran: BTreeSet<String> = stats
        .lines()
        .filter_map(|l| l.trim().strip_prefix("cmdstat_")?.split_once(':'))
        .filter(|(_, fields)| fields.split(',').any(|f| f.strip_prefix("calls=").is_some_and(|n| n != "0")))
        .map(|(name, _)| name.to_string())
        .collect();
    let idle: Vec<String> = commands_of(ACL_COMMANDS)
        .into_iter()
        .filter(|c| !ran.contains(c) && !CLUSTER_ONLY.contains(&c.as_str()) && !way.unused().contains(&c.as_str()))
        .collect();
    assert!(idle.is_empty(), "nothing this test ran used {idle:?}: exercise them, or take them out of the list");
    // Every call went in the one way: no script ran where the library was
    // loaded, and no function where FCALL was refused.
    for command in way.unused() {
        assert_eq!(calls_of(&stats, command), 0, "{way:?}: the server ran {command}:\n{stats}");
    }
    // The bench emptied its own queues and left the tenant's runs alone.
    for queue in ["bench", "bench-single", "bench-idle", "bench-1k"] {
        let n: i64 = redis::cmd("XLEN").arg(format!("a:{{{queue}}}:runs")).query_async(&mut root).await.expect("XLEN");
        assert_eq!(n, 0, "the bench left runs in {queue}");
    }
    let kept: i64 = redis::cmd("EXISTS").arg("a:locator:run-4").query_async(&mut root).await.expect("EXISTS");
    assert_eq!(kept, 1, "the bench kept to its own queues");
}

// ---------------------------------------------------------------- two tenants

/// A refusal by ACL: NOPERM, or (Redis 7.0, inside a script) "can't access".
fn is_noperm(e: &redis::RedisError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    matches!(e.kind(), redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm))
        || text.contains("no permissions")
        || text.contains("can't access at least one of the keys")
}

/// Runs `cmd` as `conn`'s user and asserts it is refused.
async fn refused(conn: &mut redis::aio::MultiplexedConnection, cmd: &redis::Cmd, what: &str) {
    match cmd.query_async::<redis::Value>(conn).await {
        Err(e) if is_noperm(&e) => {}
        other => panic!("{what}: expected NOPERM, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cannot_touch_each_other() {
    let redis = common::redis().await;
    let port = redis.server().expect("a private redis-server").port();
    let mut root = admin(&redis.url).await;
    let list = list_for(&mut root, "").await;
    set_user(&mut root, "tenant_a", "pw_a", "a", &list).await;
    set_user(&mut root, "tenant_b", "pw_b", "b", &list).await;
    let url_a = user_url(port, "tenant_a", "pw_a");
    let url_b = user_url(port, "tenant_b", "pw_b");
    rl(&url_a, "a", &["enqueue", "--queue", "q", "--runner", "r", "--run-id", "run-a1"]).await.ok();
    rl(&url_a, "a", &["claim", "--runtime", "box", "--queue", "q"]).await.ok();
    rl(&url_a, "a", &["append", "run-a1", "--seq", "1", "--type", "x"]).await.ok();

    // tenant_b, by hand: nothing of prefix a can be read or written.
    let mut b = admin(&url_b).await;
    let scripts = runledger::scripts::Scripts::new();
    let a_queue = runledger::keys::QueueKeys::new("a", "q");
    let checks: Vec<(redis::Cmd, &str)> = vec![
        (redis::cmd("GET").arg("a:locator:run-a1").clone(), "GET a's locator"),
        (redis::cmd("HGETALL").arg(a_queue.run("run-a1")).clone(), "HGETALL a's run"),
        (redis::cmd("XRANGE").arg(a_queue.events("run-a1")).arg("-").arg("+").clone(), "XRANGE a's events"),
        (redis::cmd("ZRANGE").arg(a_queue.queued()).arg(0).arg(-1).clone(), "ZRANGE a's queue"),
        (redis::cmd("SET").arg("a:locator:evil").arg("q").clone(), "SET under a"),
        (redis::cmd("DEL").arg(a_queue.run("run-a1")).clone(), "DEL a's run"),
        (redis::cmd("HSET").arg(a_queue.run("run-a1")).arg("status").arg("completed").clone(), "HSET a's run"),
        (redis::cmd("PUBLISH").arg(a_queue.cancel_channel()).arg("run-a1").clone(), "PUBLISH on a's cancel channel"),
        (redis::cmd("SCAN").arg(0).clone(), "SCAN (key names of every tenant)"),
        (redis::cmd("KEYS").arg("a:*").clone(), "KEYS"),
        (redis::cmd("CONFIG").arg("GET").arg("requirepass").clone(), "CONFIG GET"),
        (redis::cmd("INFO").clone(), "INFO"),
        (redis::cmd("FLUSHALL").clone(), "FLUSHALL"),
    ];
    for (cmd, what) in &checks {
        refused(&mut b, cmd, what).await;
    }
    // Scripts: runledger's own, with a's keys, and one that reaches for a's key from inside.
    let _: String =
        redis::cmd("SCRIPT").arg("LOAD").arg(scripts.queue_stats.code).query_async(&mut b).await.expect("SCRIPT LOAD");
    let mut evalsha = redis::cmd("EVALSHA");
    evalsha.arg(scripts.queue_stats.script.get_hash()).arg(7).arg(&a_queue.fixed()[..]).arg("0");
    refused(&mut b, &evalsha, "EVALSHA runledger's script on a's keys").await;
    // Functions: runledger's library, loaded by an admin, called with a's keys; and the load itself.
    load_functions(&redis.url).await;
    let mut fcall = redis::cmd("FCALL");
    fcall.arg(&scripts.queue_stats.function).arg(7).arg(&a_queue.fixed()[..]).arg("0");
    refused(&mut b, &fcall, "FCALL runledger's function on a's keys").await;
    let load = redis::cmd("FUNCTION").arg("LOAD").arg(&runledger::scripts::library().code).clone();
    refused(&mut b, &load, "FUNCTION LOAD (a tenant's library could replace another's code)").await;
    let sneak = "return redis.call('GET', ARGV[1])";
    let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(sneak).query_async(&mut b).await.expect("SCRIPT LOAD");
    let sneaky = redis::cmd("EVALSHA").arg(&sha).arg(1).arg("b:own").arg("a:locator:run-a1").clone();
    refused(&mut b, &sneaky, "a script of b reading a's key by ARGV").await;
    // SUBSCRIBE to a's cancel channel.
    let mut pubsub = redis::Client::open(url_b.as_str()).expect("client").get_async_pubsub().await.expect("pubsub");
    match tokio::time::timeout(Duration::from_secs(10), pubsub.subscribe(a_queue.cancel_channel())).await {
        Ok(Err(e)) if is_noperm(&e) => {}
        other => panic!("SUBSCRIBE to a's cancel channel: expected NOPERM, got {other:?}"),
    }
    // The same the other way: a cannot read b's keys.
    rl(&url_b, "b", &["enqueue", "--queue", "q", "--runner", "r", "--run-id", "run-b1"]).await.ok();
    let mut a = admin(&url_a).await;
    refused(&mut a, redis::cmd("GET").arg("b:locator:run-b1"), "a reading b's locator").await;

    // runledger as tenant_b with --prefix a: one line, exit 1, for every kind of command.
    for args in [
        &["get", "run-a1"][..],
        &["enqueue", "--queue", "q", "--runner", "r"],
        &["cancel", "run-a1"],
        &["queues"],
        &["runs"],
        &["worker", "--queue", "q"],
    ] {
        let out = rl(&url_b, "a", args).await.refused(1);
        assert!(out.stderr.contains("NoPerm"), "the line names the refusal: {}", out.describe());
    }
    let wrong = Store::connect_with(&url_b, StoreConfig { prefix: "a".into(), ..Default::default() })
        .await
        .expect("connecting only PINGs");
    match wrong.get_run("run-a1").await {
        Err(runledger::Error::Redis(e)) if is_noperm(&e) => {}
        other => panic!("the library as b on prefix a: expected NOPERM, got {other:?}"),
    }
    // The library Worker takes a refusal for what it is, not for an outage
    // to wait out: its run ends with the error.
    let worker = runledger::Worker::builder(&wrong)
        .queue("q")
        .handle_signals(false)
        .build(|_ctx| async { Ok(runledger::Done::default()) })
        .expect("worker");
    match tokio::time::timeout(Duration::from_secs(60), worker.run()).await {
        Ok(Err(e)) => assert!(!e.is_transient(), "NOPERM is not transient: {e:?}"),
        Ok(Ok(report)) => panic!("the Worker ran as b on prefix a: {report:?}"),
        Err(_) => panic!("hang guard: the Worker kept retrying a NOPERM for 60 s"),
    }
    // Each tenant's own ledger works, and holds only its own runs.
    let own = rl(&url_b, "b", &["--json", "get", "run-b1"]).await.json();
    assert_eq!(own["status"], "queued", "{own}");
    rl(&url_b, "b", &["get", "run-a1"]).await.refused(3);
    let a_run = rl(&url_a, "a", &["--json", "get", "run-a1"]).await.json();
    assert_eq!(a_run["status"], "claimed", "tenant b changed nothing of a: {a_run}");
    let events = rl(&url_a, "a", &["--json", "events", "run-a1"]).await.json();
    assert_eq!(events["items"].as_array().map(Vec::len), Some(1), "{events}");
    let n: i64 = redis::cmd("EXISTS").arg("a:locator:evil").query_async(&mut root).await.expect("EXISTS");
    assert_eq!(n, 0);
}

// ---------------------------------------------------------------- on a cluster

/// The same user on every node of a private cluster (ACL is per node): the
/// CLI and a Worker with a cancel notice (sharded pub/sub) run as it, with no
/// refusal but the settings check, and the cluster-only commands of the list
/// are the ones that ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_runs_on_a_cluster() {
    // Started on the test's own thread: the nodes die with the thread that started them.
    let cluster = runledger::embedded_cluster::RedisCluster::start().expect("a private 6-node cluster");
    let mut nodes = Vec::new();
    for url in cluster.node_urls() {
        let mut conn = admin(&url).await;
        let list = list_for(&mut conn, "").await;
        set_user(&mut conn, "tenant_a", "pw_a", "a", &list).await;
        acl_log_reset(&mut conn).await;
        let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut conn).await.expect("CONFIG RESETSTAT");
        nodes.push(conn);
    }
    let hosts: Vec<String> = cluster.ports().iter().map(|p| format!("127.0.0.1:{p}")).collect();
    // The admin loads the library on every master; the tenant calls it.
    load_functions(&format!("redis+cluster://{}/", hosts.join(","))).await;
    let url = format!("redis+cluster://tenant_a:pw_a@{}/", hosts.join(","));

    rl(&url, "a", &["enqueue", "--queue", "q1", "--runner", "r1", "--run-id", "run-1"]).await.ok();
    rl(&url, "a", &["partition", "hot", "3"]).await.ok();
    rl(&url, "a", &["enqueue", "--queue", "hot", "--runner", "r1", "--run-id", "run-h"]).await.ok();
    let claimed = rl(&url, "a", &["--json", "claim", "--runtime", "box-1", "--queue", "q1"]).await.json();
    assert_eq!(claimed["run_id"], "run-1", "{claimed}");
    rl(&url, "a", &["cancel", "run-1"]).await.ok();
    let got = rl(&url, "a", &["--json", "get", "run-h"]).await.json();
    assert_eq!(got["status"], "queued", "{got}");
    for args in [&["queues"][..], &["runs"], &["runtimes"], &["reap"]] {
        rl(&url, "a", args).await.ok();
    }

    let store = Store::connect_with(&url, StoreConfig { prefix: "a".into(), ..Default::default() })
        .await
        .expect("the library as tenant_a on the cluster");
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let worker = Worker::builder(&store)
        .queue("lib")
        .concurrency(2)
        // Long enough that the cancel arrives as a notice, not with a renewal.
        .lease(Duration::from_secs(60))
        .handle_signals(false)
        .build(move |ctx| {
            let started = started_tx.clone();
            async move {
                if ctx.run.run_id == "lib-cancel" {
                    let _ = started.send(());
                    let _ = tokio::time::timeout(Duration::from_secs(60), ctx.stopped()).await;
                    return Err(Failure::fatal(format!("stopped: {:?}", ctx.stop_reason())));
                }
                ctx.emit("progress", json!({"p": 1})).await?;
                Ok(Done::default())
            }
        })
        .expect("worker");
    let stop = worker.shutdown_token();
    let running = tokio::spawn(worker.run());
    store.create_run(&NewRun::new("lib-cancel", "agent").queue("lib")).await.expect("create lib-cancel");
    let started = tokio::time::timeout(Duration::from_secs(60), started_rx.recv()).await;
    assert!(matches!(started, Ok(Some(_))), "hang guard: the handler of lib-cancel did not start");
    store.request_cancel("lib-cancel", None).await.expect("cancel lib-cancel");
    for i in 0..3 {
        store.create_run(&NewRun::new(format!("lib-{i}"), "agent").queue("lib")).await.expect("create");
    }
    let report = finish_worker(&store, "lib", 4, stop, running).await;
    assert_eq!((report.completed, report.cancelled), (3, 1), "{report:?}");

    let mut ran = BTreeSet::new();
    for conn in &mut nodes {
        denials_only_of(conn, "tenant_a", &["config|get"], "on a cluster node").await;
        let stats: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.expect("INFO commandstats");
        assert_eq!(calls_of(&stats, "evalsha"), 0, "the library is on every master: no script ran\n{stats}");
        ran.extend(
            stats
                .lines()
                .filter_map(|l| l.trim().strip_prefix("cmdstat_")?.split_once(':'))
                .filter(|(_, f)| f.split(',').any(|f| f.strip_prefix("calls=").is_some_and(|n| n != "0")))
                .map(|(name, _)| name.to_string()),
        );
    }
    let idle: Vec<&&str> = CLUSTER_ONLY.iter().chain(FUNCTIONS_ONLY).filter(|c| !ran.contains(**c)).collect();
    assert!(idle.is_empty(), "the cluster never ran {idle:?}");
    drop(cluster);
}
