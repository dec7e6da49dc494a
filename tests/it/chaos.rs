//! Chaos test: 5,000 runs through 4 `runledger worker` processes while the
//! test SIGKILLs workers, loses replies and cuts connections, then checks the
//! server's own record of everything that happened.
//!
//! The workers reach Redis through a fault-injecting proxy
//! (`common::proxy`); a MONITOR connection straight to Redis
//! (`common::monitor`) records every command the server executed, in the
//! server's order. The checks run on that record, on the final keys, and on
//! the workers' debug logs (each claim a worker received and how it ended):
//!
//! a. every run ends terminal exactly once;
//! b. per run, `dispatch_attempts` == claims in the history == claims workers
//!    knew of; a claim no worker heard of is allowed only from a runtime that
//!    was SIGKILLed (a crash can swallow a reply);
//! c. every completed run has its events 1..N without gap, ending with the
//!    `finished` event of its last attempt;
//! d. leases of one run never overlap, and every write made under a claim
//!    token (renewal, fenced finish, event) lands before that lease expires.
//!
//! Times in the checks are the server's: the clock reading each script
//! stored in the fields it wrote (`updated_at`, `created_at`, epoch ms), the
//! same reading the script decided with. Nothing depends on how fast the
//! machine is; the 4-minute timeout only guards against a hang.

use crate::common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::monitor::{self, RunWrite, Write};
use crate::common::proxy::{self, ConnEnd, End, Proxy};
use rand::RngExt;
use runledger::{NewRun, Store};

const QUEUE: &str = "chaos";
const PREFIX: &str = "rl";
const RUNS: usize = 5_000;
const SLOTS: usize = 4;
/// Kill one worker this often while runs remain.
const KILL_EVERY: Duration = Duration::from_millis(1500);
/// Cut every proxied connection after these kills.
const CUT_AFTER_KILLS: [u32; 2] = [3, 8];
const LOSE_REPLIES: f64 = 0.01;
const TERMINAL: [&str; 4] = ["completed", "failed", "cancelled", "timeout"];
/// Examples printed per failed check.
const EXAMPLES: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_lost_replies_and_cuts_keep_every_run_exact() {
    // A hang guard only: no check depends on elapsed time.
    tokio::time::timeout(Duration::from_secs(240), chaos()).await.expect("chaos test hung for 4 minutes");
}

async fn chaos() {
    let redis = common::redis().await;
    let redis_port = port_of(&redis.url);
    let recorder = monitor::Monitor::start(&format!("127.0.0.1:{redis_port}")).await;
    let proxy = Proxy::start(redis_port).await;
    let store = Store::connect(&redis.url).await.expect("store on the direct url");
    let run_ids = enqueue(&store).await;

    let logs = tempfile::tempdir().expect("temp dir for worker logs");
    let mut fleet = Fleet::new(proxy.url(), logs.path());
    for slot in 0..SLOTS {
        fleet.start(slot);
    }
    proxy.lose_replies(LOSE_REPLIES);
    let mut cuts = 0;
    while !all_terminal(&store).await {
        tokio::time::sleep(KILL_EVERY).await;
        let slot = rand::rng().random_range(0..SLOTS);
        fleet.kill_and_replace(slot);
        if CUT_AFTER_KILLS.contains(&fleet.kills) {
            proxy.cut_all();
            cuts += 1;
        }
    }
    proxy.lose_replies(0.0);
    fleet.stop_all().await;
    // A worker that ends on its own (a panic, a signal) is a bug, not chaos.
    assert!(fleet.died.is_empty(), "workers exited on their own: {:?}\n{}", fleet.died, fleet.died_log_tails());
    let lines = recorder.stop().await;
    let replies_dropped = proxy.replies_dropped();
    let conn_ends = proxy.connection_ends();
    drop(proxy);

    let cmds = monitor::commands(&lines);
    let histories = monitor::run_histories(&cmds, PREFIX, QUEUE);
    let finals = final_states(&redis.url, &run_ids).await;
    let worker_logs = fleet.read_logs();

    let mut findings = Findings::default();
    let analyses: BTreeMap<&str, RunAnalysis> = run_ids
        .iter()
        .map(|id| {
            let writes = histories.get(id).map(Vec::as_slice).unwrap_or_default();
            (id.as_str(), analyze_run(id, writes, &cmds, &mut findings))
        })
        .collect();
    check_terminal_once(&analyses, &finals, &mut findings);
    let sends = token_sends(&cmds);
    let calls = runtime_calls(&analyses, &cmds);
    let claims = check_claims(
        &analyses,
        &finals,
        &worker_logs,
        &fleet.killed,
        &Wire { conn_ends: &conn_ends, sends: &sends, calls: &calls },
        &mut findings,
    );
    check_events(&analyses, &finals, &mut findings);

    let reclaims: usize = analyses.values().map(|a| a.reclaims).sum();
    let lapsed_releases: usize = analyses.values().map(|a| a.lapsed_releases).sum();
    let fenced_checked: usize = analyses.values().map(|a| a.fenced_checked).sum();
    eprintln!(
        "chaos summary: runs {}  monitor lines {}  claims {} (known to workers {}, unknown by killed runtimes (crash) {}, \
         unknown by killed runtimes (lost while alive) {}, unknown by live runtimes {})  kills {}  cuts {}  replies dropped {}  re-claims after expiry {}  \
         releases after expiry {}  fenced writes checked {}",
        RUNS,
        lines.len(),
        claims.total,
        claims.known,
        claims.unknown_killed,
        claims.unknown_before_kill,
        claims.unknown_live,
        fleet.kills,
        cuts,
        replies_dropped,
        reclaims,
        lapsed_releases,
        fenced_checked,
    );
    for (cause, n) in &claims.unexcused_by_cause {
        eprintln!("chaos: unexcused unknown claims: {n} made by {cause}");
    }
    if !findings.by_check.is_empty() {
        // Keep the evidence: worker logs and the whole MONITOR record.
        std::fs::write(logs.path().join("monitor.log"), lines.join("\n")).expect("write monitor.log");
        eprintln!("chaos: worker logs and monitor.log kept in {}", logs.keep().display());
    }
    findings.assert_none();
}

// ---------------------------------------------------------------- setup

fn port_of(url: &str) -> u16 {
    url.trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in redis url {url}"))
}

fn run_name(i: usize) -> String {
    format!("chaos-{i:05}")
}

async fn enqueue(store: &Store) -> Vec<String> {
    let runs: Vec<NewRun> = (0..RUNS).map(|i| NewRun::new(run_name(i), "agent").queue(QUEUE)).collect();
    for chunk in runs.chunks(500) {
        store.create_runs(chunk).await.expect("create_runs");
    }
    (0..RUNS).map(run_name).collect()
}

/// True when no run is left queued, delayed or claimed.
async fn all_terminal(store: &Store) -> bool {
    let stats = store.queue_stats(QUEUE, 1).await.expect("queue_stats on the direct url");
    stats.queued + stats.pinned + stats.delayed + stats.claimed == 0
}

/// The worker processes, one per slot, and every one that ever ran.
struct Fleet {
    proxy_url: String,
    log_dir: PathBuf,
    slots: Vec<Option<Worker>>,
    generations: Vec<u32>,
    /// (runtime id, log file) of every process started.
    started: Vec<(String, PathBuf)>,
    /// Runtime id of each process SIGKILLed -> when the signal was sent (µs since the epoch).
    killed: HashMap<String, u64>,
    /// Workers that exited before the test stopped or killed them, with their status.
    died: Vec<String>,
    kills: u32,
}

struct Worker {
    runtime_id: String,
    child: Child,
}

impl Fleet {
    fn new(proxy_url: String, log_dir: &Path) -> Fleet {
        Fleet {
            proxy_url,
            log_dir: log_dir.to_path_buf(),
            slots: (0..SLOTS).map(|_| None).collect(),
            generations: vec![0; SLOTS],
            started: Vec::new(),
            killed: HashMap::new(),
            died: Vec::new(),
            kills: 0,
        }
    }

    /// Starts the next generation in `slot`.
    fn start(&mut self, slot: usize) {
        self.generations[slot] += 1;
        let runtime_id = format!("chaos-{slot}-{}", self.generations[slot]);
        let log = self.log_dir.join(format!("{runtime_id}.log"));
        let stderr = std::fs::File::create(&log).expect("worker log file");
        let child = Command::new(env!("CARGO_BIN_EXE_runledger"))
            .args(["worker", "--redis", &self.proxy_url, "--queue", QUEUE, "--concurrency", "8"])
            .args(["--lease", "2", "--heartbeat", "0.5", "--work-ms", "30", "--steps", "3"])
            .args(["--fail-rate", "0.02", "--grace", "1", "--runtime-id", &runtime_id])
            .env("RUST_LOG", "runledger::worker=debug,warn")
            .env("NO_COLOR", "1")
            .env_remove("REDIS_URL")
            .env_remove("RUNLEDGER_PREFIX")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn runledger worker");
        self.started.push((runtime_id.clone(), log));
        self.slots[slot] = Some(Worker { runtime_id, child });
    }

    fn kill_and_replace(&mut self, slot: usize) {
        if let Some(mut worker) = self.slots[slot].take() {
            if let Ok(Some(status)) = worker.child.try_wait() {
                self.died.push(format!("{} ({status})", worker.runtime_id));
            }
            // Child::kill is SIGKILL: no shutdown code runs, as in a crash.
            let sent = proxy::now_us();
            worker.child.kill().expect("SIGKILL a worker");
            worker.child.wait().expect("reap a killed worker");
            self.killed.insert(worker.runtime_id, sent);
            self.kills += 1;
        }
        self.start(slot);
    }

    /// SIGTERM to every worker, then waits for each (SIGKILL after 30 s).
    async fn stop_all(&mut self) {
        let mut workers: Vec<Worker> = self.slots.iter_mut().filter_map(Option::take).collect();
        for w in &mut workers {
            if let Ok(Some(status)) = w.child.try_wait() {
                self.died.push(format!("{} ({status})", w.runtime_id));
            }
        }
        for w in &workers {
            // SAFETY: kill(2) on the PID of a child we started and have not reaped.
            unsafe { libc::kill(w.child.id() as libc::pid_t, libc::SIGTERM) };
        }
        for w in &mut workers {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                if w.child.try_wait().expect("wait for a worker").is_some() {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    eprintln!("worker {} ignored SIGTERM for 30 s; killing it", w.runtime_id);
                    let sent = proxy::now_us();
                    w.child.kill().expect("SIGKILL a stuck worker");
                    w.child.wait().expect("reap a stuck worker");
                    self.killed.insert(w.runtime_id.clone(), sent);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// The last lines each worker that died on its own wrote, for the failure message.
    fn died_log_tails(&self) -> String {
        let mut out = String::new();
        for (id, path) in &self.started {
            if !self.died.iter().any(|d| d.starts_with(&format!("{id} "))) {
                continue;
            }
            let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(log unreadable: {e})"));
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- last lines of {id}'s log:\n"));
            for line in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    fn read_logs(&self) -> Vec<(String, String)> {
        self.started
            .iter()
            .map(|(id, path)| {
                let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                (id.clone(), strip_ansi(&String::from_utf8_lossy(&bytes)))
            })
            .collect()
    }
}

// ---------------------------------------------------------------- final state

/// A run's keys at the end.
struct FinalState {
    status: Option<String>,
    dispatch_attempts: i64,
    /// (entry id, fields) of its event stream, oldest first.
    events: Vec<(String, Vec<String>)>,
}

async fn final_states(url: &str, run_ids: &[String]) -> HashMap<String, FinalState> {
    let client = redis::Client::open(url).expect("redis client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("direct connection");
    let mut out = HashMap::new();
    for chunk in run_ids.chunks(250) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("HMGET").arg(format!("{PREFIX}:{{{QUEUE}}}:run:{id}")).arg("status").arg("dispatch_attempts");
            pipe.cmd("XRANGE").arg(format!("{PREFIX}:{{{QUEUE}}}:events:{id}")).arg("-").arg("+");
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await.expect("read the final run states");
        for (id, pair) in chunk.iter().zip(replies.chunks(2)) {
            let (status, attempts): (Option<String>, Option<i64>) =
                redis::from_redis_value(pair[0].clone()).expect("HMGET reply");
            let events: Vec<(String, Vec<String>)> = redis::from_redis_value(pair[1].clone()).expect("XRANGE reply");
            out.insert(id.clone(), FinalState { status, dispatch_attempts: attempts.unwrap_or(0), events });
        }
    }
    out
}

// ---------------------------------------------------------------- worker logs

/// Removes ANSI colour sequences (`ESC [ ... letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `key=value` of a tracing fmt line (values without spaces).
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))?;
    let rest = &line[at + key.len() + 2..];
    Some(rest.split_whitespace().next().unwrap_or(""))
}

/// A claim a worker logged: (runtime, attempt).
#[derive(Clone, Debug)]
struct KnownClaim {
    runtime: String,
    attempt: i64,
}

/// (run_id, token) -> the claim as the worker logged it.
fn known_claims(logs: &[(String, String)], findings: &mut Findings) -> HashMap<(String, String), KnownClaim> {
    let mut out = HashMap::new();
    for (runtime, text) in logs {
        for line in text.lines().filter(|l| l.contains("runledger::worker") && l.contains("run claimed")) {
            let (Some(run_id), Some(token), Some(attempt)) =
                (log_field(line, "run_id"), log_field(line, "token"), log_field(line, "attempt"))
            else {
                continue; // a line cut short by SIGKILL
            };
            let Ok(attempt) = attempt.parse() else { continue };
            let claim = KnownClaim { runtime: runtime.clone(), attempt };
            if let Some(earlier) = out.insert((run_id.to_string(), token.to_string()), claim) {
                findings.fail("b", format!("claim {run_id}/{token} logged twice ({} and {runtime})", earlier.runtime));
            }
        }
    }
    out
}

// ---------------------------------------------------------------- history

/// One claim in the history.
#[derive(Clone, Debug)]
struct Claim {
    token: String,
    runtime: String,
    attempt: i64,
    at_ms: i64,
    /// Position of its HSET in the MONITOR record (the server's order).
    index: usize,
    /// The script that made it (claim_next_run, or finalize_run chaining a claim).
    script: &'static str,
    /// The client port of the script call (the proxy's upstream side) and its MONITOR time.
    port: Option<u16>,
    monitor_us: u64,
}

/// The lease in force while walking a run's history.
#[derive(Clone, Debug)]
struct Lease {
    token: String,
    expires_ms: i64,
}

/// What one run's history shows.
#[derive(Default)]
struct RunAnalysis {
    claims: Vec<Claim>,
    /// Statuses of the terminal HSETs, in order.
    terminal_hsets: Vec<String>,
    /// Event sequence -> index in `claims` of the claim it was written under.
    event_claim: HashMap<i64, usize>,
    /// Claims that followed a lease that ended by expiring.
    reclaims: usize,
    /// Releases under a token whose lease had already expired (allowed: the
    /// run goes back to the queue, as the recovery would send it).
    lapsed_releases: usize,
    /// Writes under the current token checked against its lease expiry.
    fenced_checked: usize,
}

/// The server clock reading (epoch ms) a write carries: scripts store the
/// `now` they decided with in `updated_at` (HSET) or `created_at` (XADD).
/// Falls back to the MONITOR time, which is a few µs later.
fn server_ms(w: &RunWrite) -> i64 {
    let field = if w.is_hset() { "updated_at" } else { "created_at" };
    w.field(field).and_then(|v| v.parse::<f64>().ok()).map(|v| v as i64).unwrap_or((w.time_us / 1000) as i64)
}

fn parse_ms(v: Option<&str>) -> Option<i64> {
    v.and_then(|v| v.parse::<f64>().ok()).map(|v| v as i64)
}

/// The token a write was made under: a token issued to this run that the
/// script call which wrote it was given (a claim token is a random uuid, so
/// this needs no knowledge of each script's argument layout).
fn write_token<'a>(w: &RunWrite, cmds: &[monitor::Command], issued: &'a [Claim]) -> Option<&'a Claim> {
    let call = &cmds[w.script?];
    let (_, _, argv) = call.script_parts()?;
    // The newest first: a token is unique, so at most one matches anyway.
    issued.iter().rev().find(|c| argv.iter().any(|a| a == &c.token))
}

/// Walks one run's writes in server order, rebuilding its leases, and
/// records every lease violation (check d).
fn analyze_run(run_id: &str, writes: &[RunWrite], cmds: &[monitor::Command], f: &mut Findings) -> RunAnalysis {
    let mut a = RunAnalysis::default();
    let mut lease: Option<Lease> = None;
    // How the previous lease ended: true when by expiry (recovered).
    let mut last_ended_by_expiry = false;
    for w in writes {
        let t = server_ms(w);
        let status = w.field("status");
        if status == Some("claimed") {
            let token = w.field("claim_token").unwrap_or_default().to_string();
            let expires = parse_ms(w.field("claim_lease_expires_at")).unwrap_or(0);
            if let Some(prev) = &lease {
                // Never ended by any write: only its expiry can have ended it.
                if t < prev.expires_ms {
                    f.fail(
                        "d",
                        format!(
                            "{run_id}: claimed at {t} while the lease of {} ran to {}",
                            prev.token, prev.expires_ms
                        ),
                    );
                }
                last_ended_by_expiry = true;
            }
            if last_ended_by_expiry {
                a.reclaims += 1;
            }
            a.claims.push(Claim {
                token: token.clone(),
                runtime: w.field("claimed_by_runtime_id").unwrap_or_default().to_string(),
                attempt: w.field("dispatch_attempts").and_then(|v| v.parse().ok()).unwrap_or(-1),
                at_ms: t,
                index: w.index,
                script: script_name(w, cmds),
                port: w.script.and_then(|i| cmds[i].source.rsplit(':').next()?.parse().ok()),
                monitor_us: w.time_us,
            });
            lease = Some(Lease { token, expires_ms: expires });
            last_ended_by_expiry = false;
            continue;
        }
        let is_status_change = status.is_some();
        let is_renewal = w.is_hset() && !is_status_change && w.field("claim_lease_expires_at").is_some();
        let is_event = !w.is_hset();
        if !(is_status_change || is_renewal || is_event) {
            continue; // usage, cost, metadata, not_before...: no lease meaning
        }
        if status.is_some_and(|s| TERMINAL.contains(&s)) {
            a.terminal_hsets.push(status.unwrap_or_default().to_string());
        }
        let under = write_token(w, cmds, &a.claims).map(|c| c.token.clone());
        let what = describe(w);
        match (&under, &lease) {
            (Some(token), Some(current)) if token == &current.token => {
                // The active-claim rule: a holder writes only before its lease expires.
                a.fenced_checked += 1;
                let lapsed = t >= current.expires_ms;
                if lapsed && status == Some("queued") {
                    a.lapsed_releases += 1;
                } else if lapsed {
                    f.fail(
                        "d",
                        format!("{run_id}: {what} at {t} under {token}, whose lease expired at {}", current.expires_ms),
                    );
                }
                if let Some(ft) = w.field("finish_token").filter(|ft| ft != token) {
                    f.fail("d", format!("{run_id}: {what} under {token} recorded finish_token {ft}"));
                }
            }
            (Some(token), _) => {
                f.fail("d", format!("{run_id}: {what} at {t} under {token}, which no longer held the run"));
            }
            (None, Some(current)) => {
                // An unfenced write (lease recovery) may end a lease only once it expired.
                if is_status_change && t < current.expires_ms {
                    f.fail(
                        "d",
                        format!(
                            "{run_id}: {what} at {t} without a token ended the lease of {} (to {})",
                            current.token, current.expires_ms
                        ),
                    );
                } else if is_renewal || is_event {
                    f.fail("d", format!("{run_id}: {what} at {t} made under no token of the run"));
                }
            }
            (None, None) => {
                if is_renewal || is_event {
                    f.fail("d", format!("{run_id}: {what} at {t} while the run was not claimed"));
                }
            }
        }
        if is_event && let Some(seq) = w.event_sequence() {
            let claim = under.as_ref().and_then(|tok| a.claims.iter().rposition(|c| &c.token == tok));
            if let Some(i) = claim {
                a.event_claim.insert(seq, i);
            }
        }
        if is_renewal {
            if let Some(current) = lease.as_mut().filter(|c| under.as_ref() == Some(&c.token)) {
                current.expires_ms = parse_ms(w.field("claim_lease_expires_at")).unwrap_or(current.expires_ms);
            }
        } else if is_status_change && let Some(current) = lease.take() {
            // A status change ends the lease: at once when made by its holder
            // in time, else it had ended at its expiry.
            last_ended_by_expiry = under.as_ref() != Some(&current.token) || t >= current.expires_ms;
        }
    }
    a
}

/// The name of the operation that made a write, by the SHA of its EVALSHA or the name of its FCALL.
fn script_name(w: &RunWrite, cmds: &[monitor::Command]) -> &'static str {
    static NAMES: std::sync::OnceLock<HashMap<String, &'static str>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| {
        let s = runledger::scripts::Scripts::new();
        [
            (&s.claim_next_run, "claim_next_run"),
            (&s.finalize_run, "finalize_run"),
            (&s.renew_claim, "renew_claim"),
            (&s.release_claim, "release_claim"),
            (&s.release_expired_claims, "release_expired_claims"),
            (&s.append_events, "append_events"),
            (&s.reap, "reap"),
            (&s.create_run, "create_run"),
        ]
        .into_iter()
        .flat_map(|(lua, name)| [(lua.script.get_hash().to_string(), name), (lua.function.to_ascii_lowercase(), name)])
        .collect()
    });
    w.script
        .and_then(|i| cmds[i].script_parts())
        .and_then(|(id, _, _)| names.get(&id.to_ascii_lowercase()).copied())
        .unwrap_or("?")
}

fn describe(w: &RunWrite) -> String {
    match &w.write {
        Write::Xadd { id, fields } => {
            let ty = fields.iter().find(|(k, _)| k == "type").map(|(_, v)| v.as_str()).unwrap_or("?");
            format!("event {id} ({ty}) [monitor #{}]", w.index)
        }
        Write::Hset(_) => match w.field("status") {
            Some(s) => format!("status -> {s} [monitor #{}]", w.index),
            None => format!("renewal to {} [monitor #{}]", w.field("claim_lease_expires_at").unwrap_or("?"), w.index),
        },
    }
}

// ---------------------------------------------------------------- checks

/// a. Every run ends terminal exactly once, and all of them do.
fn check_terminal_once(analyses: &BTreeMap<&str, RunAnalysis>, finals: &HashMap<String, FinalState>, f: &mut Findings) {
    let mut terminal = 0;
    for (run_id, a) in analyses {
        let status = finals[*run_id].status.as_deref().unwrap_or("<missing>");
        if TERMINAL.contains(&status) {
            terminal += 1;
        } else {
            f.fail("a", format!("{run_id}: final status {status}"));
        }
        if a.terminal_hsets.len() != 1 {
            f.fail(
                "a",
                format!("{run_id}: {} terminal writes in the history: {:?}", a.terminal_hsets.len(), a.terminal_hsets),
            );
        }
    }
    if terminal != RUNS {
        f.fail("a", format!("{terminal} of {RUNS} runs are terminal"));
    }
}

#[derive(Default)]
struct ClaimCounts {
    total: usize,
    known: usize,
    unknown_killed: usize,
    unknown_live: usize,
    /// Unknown claims by killed runtimes whose reply the network lost while they lived on.
    unknown_before_kill: usize,
    /// Unknown claims not excused, by (script that made it, how its connection ended).
    unexcused_by_cause: BTreeMap<String, usize>,
}

/// What the proxies and MONITOR saw on the wire: how each connection ended,
/// how often each claim token was sent, and each runtime's calls.
struct Wire<'a> {
    conn_ends: &'a [ConnEnd],
    sends: &'a HashMap<String, usize>,
    calls: &'a HashMap<String, Vec<u64>>,
}

/// b. Claims: the run's counter, the history and the workers agree; a claim
/// no worker knew of comes only from a runtime that was SIGKILLed.
fn check_claims(
    analyses: &BTreeMap<&str, RunAnalysis>,
    finals: &HashMap<String, FinalState>,
    logs: &[(String, String)],
    killed: &HashMap<String, u64>,
    wire: &Wire<'_>,
    f: &mut Findings,
) -> ClaimCounts {
    let Wire { conn_ends, sends, calls } = *wire;
    let known = known_claims(logs, f);
    let mut counts = ClaimCounts::default();
    let mut in_history = HashSet::new();
    let last_known = last_known_claim(analyses, &known);
    let token_runs = runs_per_token(analyses);
    // Why a claim may have gone unheard of: which script made it, and
    // whether its token was also given to another run (a resent claim).
    let how = |run_id: &str, c: &Claim| {
        let others: Vec<&str> = token_runs[c.token.as_str()].iter().copied().filter(|r| *r != run_id).collect();
        let end = c.port.and_then(|p| proxy::end_of(conn_ends, p, c.monitor_us));
        format!("made by {}; same token claimed on {others:?}; its connection ended {end:?}", c.script)
    };
    let cause = |c: &Claim| {
        let end = c.port.and_then(|p| proxy::end_of(conn_ends, p, c.monitor_us)).map(|e| e.end);
        let resent = if token_runs[c.token.as_str()].len() > 1 { ", token reused" } else { "" };
        format!("{} / connection end {end:?}{resent}", c.script)
    };
    for (run_id, a) in analyses {
        let attempts = finals[*run_id].dispatch_attempts;
        // Unknown claims are judged one by one below; a counter that
        // disagrees with the history is wrong whatever the workers saw.
        if attempts != a.claims.len() as i64 {
            f.fail("b", format!("{run_id}: dispatch_attempts {attempts}, claims in the history {}", a.claims.len()));
        }
        for c in &a.claims {
            counts.total += 1;
            let key = (run_id.to_string(), c.token.clone());
            in_history.insert(key.clone());
            match known.get(&key) {
                Some(k) => {
                    counts.known += 1;
                    if k.runtime != c.runtime || k.attempt != c.attempt {
                        f.fail(
                            "b",
                            format!(
                                "{run_id}/{}: history says runtime {} attempt {}, the worker log {} attempt {}",
                                c.token, c.runtime, c.attempt, k.runtime, k.attempt
                            ),
                        );
                    }
                }
                None if killed.contains_key(&c.runtime)
                    && (crash_swallowed(c, killed[&c.runtime], last_known.get(&c.runtime), conn_ends)
                        || died_before_resend(c, sends, killed[&c.runtime], conn_ends, &calls[&c.runtime])) =>
                {
                    counts.unknown_killed += 1
                }
                None if killed.contains_key(&c.runtime) => {
                    counts.unknown_before_kill += 1;
                    *counts.unexcused_by_cause.entry(cause(c)).or_default() += 1;
                    f.fail(
                        "b",
                        format!(
                            "{run_id}: unknown claim by {} (killed later, but its reply was lost while the process \
                             lived on and logged later claims; attempt {}, token {}, at {}; {})",
                            c.runtime,
                            c.attempt,
                            c.token,
                            c.at_ms,
                            how(run_id, c)
                        ),
                    );
                }
                None => {
                    counts.unknown_live += 1;
                    *counts.unexcused_by_cause.entry(cause(c)).or_default() += 1;
                    f.fail(
                        "b",
                        format!(
                            "{run_id}: unknown claim by live runtime {} (attempt {}, token {}, at {}; {})",
                            c.runtime,
                            c.attempt,
                            c.token,
                            c.at_ms,
                            how(run_id, c)
                        ),
                    );
                }
            }
        }
    }
    for ((run_id, token), k) in &known {
        if !in_history.contains(&(run_id.clone(), token.clone())) {
            f.fail("b", format!("{run_id}: {} logged claim {token}, which the history does not have", k.runtime));
        }
    }
    counts
}

/// Claim token -> the runs claimed with it (a token is meant for one claim).
fn runs_per_token<'a>(analyses: &'a BTreeMap<&str, RunAnalysis>) -> HashMap<&'a str, Vec<&'a str>> {
    let mut out: HashMap<&str, Vec<&str>> = HashMap::new();
    for (run_id, a) in analyses {
        for c in &a.claims {
            out.entry(c.token.as_str()).or_default().push(run_id);
        }
    }
    out
}

/// Whether the SIGKILL (sent at `killed_us`) can be what swallowed the reply
/// to claim `c`, which no worker log mentions. Yes when the claim's
/// connection was closed by the client side at or after the kill (the dying
/// process's sockets), or had not ended at all. When it was closed earlier,
/// by the proxy (lost reply, cut) or by the live client, the reply was lost
/// to the network and the library had to recover it; that is excused only if
/// the process made no later claim it logged (it may have died recovering).
fn crash_swallowed(c: &Claim, killed_us: u64, last_known: Option<&usize>, conn_ends: &[ConnEnd]) -> bool {
    let end = c.port.and_then(|p| proxy::end_of(conn_ends, p, c.monitor_us));
    match end {
        None => true,
        Some(e) if e.end == End::Client && e.ended_us >= killed_us => true,
        Some(_) => last_known.is_none_or(|&i| c.index > i),
    }
}

/// How many script calls sent each claim token (a claim's own call, then any
/// resend of it: the library resends a call whose reply was lost).
fn token_sends(cmds: &[monitor::Command]) -> HashMap<String, usize> {
    let mut out: HashMap<String, usize> = HashMap::new();
    for cmd in cmds.iter().filter(|c| c.source != "lua" && c.script_parts().is_some()) {
        for arg in cmd.args.iter().filter(|a| a.len() == 32 && a.bytes().all(|b| b.is_ascii_hexdigit())) {
            *out.entry(arg.clone()).or_default() += 1;
        }
    }
    out
}

/// Per runtime, the MONITOR times of the script calls its process sent: the
/// calls from any client port that carried one of its claims or one of its
/// claim tokens.
fn runtime_calls(analyses: &BTreeMap<&str, RunAnalysis>, cmds: &[monitor::Command]) -> HashMap<String, Vec<u64>> {
    let mut runtime_of_token: HashMap<&str, &str> = HashMap::new();
    let mut runtime_of_port: HashMap<u16, String> = HashMap::new();
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for a in analyses.values() {
        for c in &a.claims {
            runtime_of_token.insert(c.token.as_str(), c.runtime.as_str());
            if let Some(port) = c.port {
                runtime_of_port.insert(port, c.runtime.clone());
            }
            out.entry(c.runtime.clone()).or_default();
        }
    }
    let port_of = |cmd: &monitor::Command| cmd.source.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
    let script_calls = || cmds.iter().filter(|c| c.source != "lua" && c.script_parts().is_some());
    for cmd in script_calls() {
        if let (Some(port), Some(runtime)) =
            (port_of(cmd), cmd.args.iter().find_map(|a| runtime_of_token.get(a.as_str())))
        {
            runtime_of_port.entry(port).or_insert_with(|| runtime.to_string());
        }
    }
    for cmd in script_calls() {
        if let Some(runtime) = port_of(cmd).and_then(|p| runtime_of_port.get(&p)) {
            out.entry(runtime.clone()).or_default().push(cmd.time_us);
        }
    }
    out
}

/// A claim whose reply was lost is sent again at once, the same call with the
/// same token on a new connection, by a process that lives on. A token sent
/// only once is excused when the record shows that the process did not live
/// on: between the end of the claim's connection and its SIGKILL it sent no
/// script call at all, so it died before it could resend. A process that
/// went on sending calls and never resent the claim is a lost claim.
fn died_before_resend(
    c: &Claim,
    sends: &HashMap<String, usize>,
    killed_us: u64,
    conn_ends: &[ConnEnd],
    calls: &[u64],
) -> bool {
    if sends.get(&c.token).copied().unwrap_or(0) > 1 {
        return false; // it was resent: whether the crash swallowed that reply is crash_swallowed's call
    }
    let Some(end) = c.port.and_then(|p| proxy::end_of(conn_ends, p, c.monitor_us)) else { return false };
    !calls.iter().any(|&t| t > end.ended_us && t < killed_us)
}

/// Per runtime, the MONITOR position of the last claim its log mentions.
fn last_known_claim(
    analyses: &BTreeMap<&str, RunAnalysis>,
    known: &HashMap<(String, String), KnownClaim>,
) -> HashMap<String, usize> {
    let mut last: HashMap<String, usize> = HashMap::new();
    for (run_id, a) in analyses {
        for c in &a.claims {
            if known.contains_key(&(run_id.to_string(), c.token.clone())) {
                let at = last.entry(c.runtime.clone()).or_default();
                *at = (*at).max(c.index);
            }
        }
    }
    last
}

/// c. A completed run's stream is 1..N, ending with its last attempt's `finished`.
fn check_events(analyses: &BTreeMap<&str, RunAnalysis>, finals: &HashMap<String, FinalState>, f: &mut Findings) {
    for (run_id, a) in analyses {
        let fin = &finals[*run_id];
        if fin.status.as_deref() != Some("completed") {
            continue;
        }
        let ids: Vec<&str> = fin.events.iter().map(|(id, _)| id.as_str()).collect();
        let expected: Vec<String> = (1..=ids.len()).map(|s| format!("{s}-0")).collect();
        if ids != expected {
            f.fail("c", format!("{run_id}: event ids {ids:?} are not 1..{}", ids.len()));
        }
        let Some((last_id, fields)) = fin.events.last() else {
            f.fail("c", format!("{run_id}: completed without events"));
            continue;
        };
        let field = |name: &str| fields.chunks(2).find(|p| p[0] == name).map(|p| p[1].clone());
        let attempt = field("data")
            .and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok())
            .and_then(|d| d["attempt"].as_i64());
        if field("type").as_deref() != Some("finished") || attempt != Some(fin.dispatch_attempts) {
            f.fail(
                "c",
                format!(
                    "{run_id}: last event {last_id} is {:?} of attempt {attempt:?}, not `finished` of attempt {}",
                    field("type"),
                    fin.dispatch_attempts
                ),
            );
        }
        let seq: i64 = last_id.trim_end_matches("-0").parse().unwrap_or(0);
        let written_under = a.event_claim.get(&seq).copied();
        if written_under != Some(a.claims.len().saturating_sub(1)) {
            f.fail(
                "c",
                format!(
                    "{run_id}: last event {last_id} was written under claim #{written_under:?}, not the last one (#{})",
                    a.claims.len().saturating_sub(1)
                ),
            );
        }
    }
}

// ---------------------------------------------------------------- findings

/// Failures per check, reported together at the end.
#[derive(Default)]
struct Findings {
    by_check: BTreeMap<&'static str, Vec<String>>,
}

impl Findings {
    fn fail(&mut self, check: &'static str, what: String) {
        self.by_check.entry(check).or_default().push(what);
    }

    fn assert_none(&self) {
        if self.by_check.is_empty() {
            eprintln!("chaos: every check passed");
            return;
        }
        let mut report = String::new();
        for (check, items) in &self.by_check {
            report.push_str(&format!("\ncheck {check}: {} failure(s)\n", items.len()));
            for item in items.iter().take(EXAMPLES) {
                report.push_str(&format!("  {item}\n"));
            }
            if items.len() > EXAMPLES {
                report.push_str(&format!("  ... and {} more\n", items.len() - EXAMPLES));
            }
        }
        eprintln!("{report}");
        panic!("chaos checks failed: {}", self.by_check.keys().copied().collect::<Vec<_>>().join(", "));
    }
}

#[test]
fn monitor_lines_parse_with_escapes() {
    let line = r#"1733142727.123457 [0 lua] "HSET" "rl:{q}:run:abc" "a" "x\"y\\z\n\x41""#;
    let cmd = monitor::parse_line(line).expect("a monitor line");
    assert_eq!(cmd.time_us, 1_733_142_727_123_457);
    assert_eq!(cmd.source, "lua");
    assert_eq!(cmd.args, ["HSET", "rl:{q}:run:abc", "a", "x\"y\\z\nA"]);
}

// ---------------------------------------------------------------- the checker on made-up histories

/// Runs the lease analysis (check d) on MONITOR lines for run `r1`.
fn analyze_lines(lines: &[&str]) -> (RunAnalysis, Findings) {
    let lines: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let cmds = monitor::commands(&lines);
    let histories = monitor::run_histories(&cmds, PREFIX, QUEUE);
    let mut findings = Findings::default();
    let analysis = analyze_run("r1", &histories["r1"], &cmds, &mut findings);
    (analysis, findings)
}

/// A claim of r1 with `token` by `runtime` at `at` ms, lease to `expires` ms.
fn claim_lines(token: &str, runtime: &str, at: i64, expires: i64) -> [String; 2] {
    [
        format!(r#"{at}.000000 [0 127.0.0.1:1] "EVALSHA" "c" "1" "k" "rl:{{chaos}}:" "{runtime}" "2000" "{token}""#),
        format!(
            r#"{at}.000001 [0 lua] "HSET" "rl:{{chaos}}:run:r1" "status" "claimed" "claimed_by_runtime_id" "{runtime}" "claim_token" "{token}" "claim_lease_expires_at" "{expires}" "dispatch_attempts" "1" "last_claimed_at" "{at}" "updated_at" "{at}""#
        ),
    ]
}

/// A script call given `token` that runs `write` (one lua line's command part) at `at` ms.
fn fenced_lines(token: &str, at: i64, write: &str) -> [String; 2] {
    [
        format!(r#"{at}.000000 [0 127.0.0.1:1] "EVALSHA" "f" "1" "k" "rl:{{chaos}}:" "r1" "{token}""#),
        format!(r#"{at}.000001 [0 lua] {write}"#),
    ]
}

fn lines_of(parts: &[[String; 2]]) -> Vec<String> {
    parts.iter().flatten().cloned().collect()
}

fn check_d(parts: &[[String; 2]]) -> (RunAnalysis, Vec<String>) {
    let lines = lines_of(parts);
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let (a, f) = analyze_lines(&refs);
    (a, f.by_check.get("d").cloned().unwrap_or_default())
}

#[test]
fn lease_check_accepts_a_clean_history() {
    let (a, d) = check_d(&[
        claim_lines("t1", "w1", 1000, 3000),
        fenced_lines("t1", 1500, r#""XADD" "rl:{chaos}:events:r1" "1-0" "type" "started" "created_at" "1500""#),
        fenced_lines("t1", 2900, r#""HSET" "rl:{chaos}:run:r1" "claim_lease_expires_at" "4900" "updated_at" "2900""#),
        fenced_lines(
            "t1",
            4800,
            r#""HSET" "rl:{chaos}:run:r1" "status" "completed" "updated_at" "4800" "finish_token" "t1""#,
        ),
    ]);
    assert!(d.is_empty(), "{d:?}");
    assert_eq!((a.claims.len(), a.terminal_hsets.len(), a.fenced_checked), (1, 1, 3));
}

#[test]
fn lease_check_refuses_writes_after_expiry_without_a_reclaim() {
    let (_, d) = check_d(&[
        claim_lines("t1", "w1", 1000, 3000),
        fenced_lines("t1", 3000, r#""HSET" "rl:{chaos}:run:r1" "claim_lease_expires_at" "5000" "updated_at" "3000""#),
    ]);
    assert_eq!(d.len(), 1, "a renewal at the expiry instant: {d:?}");
    let (_, d) = check_d(&[
        claim_lines("t1", "w1", 1000, 3000),
        fenced_lines("t1", 3500, r#""XADD" "rl:{chaos}:events:r1" "1-0" "type" "started" "created_at" "3500""#),
        fenced_lines(
            "t1",
            3600,
            r#""HSET" "rl:{chaos}:run:r1" "status" "completed" "updated_at" "3600" "finish_token" "t1""#,
        ),
    ]);
    assert_eq!(d.len(), 2, "an event and a finish after expiry: {d:?}");
}

#[test]
fn lease_check_refuses_overlaps_and_stale_tokens() {
    let (_, d) = check_d(&[claim_lines("t1", "w1", 1000, 3000), claim_lines("t2", "w2", 2500, 4500)]);
    assert_eq!(d.len(), 1, "a claim inside a live lease: {d:?}");
    let recovery = [
        "3000.000000 [0 127.0.0.1:2] \"EVALSHA\" \"c\" \"1\" \"k\" \"x\"".to_string(),
        r#"3000.000001 [0 lua] "HSET" "rl:{chaos}:run:r1" "status" "queued" "status_reason" "claim lease expired" "updated_at" "3000""#.to_string(),
    ];
    let (a, d) = check_d(&[
        claim_lines("t1", "w1", 1000, 3000),
        recovery,
        claim_lines("t2", "w2", 3000, 5000),
        fenced_lines("t1", 3100, r#""XADD" "rl:{chaos}:events:r1" "2-0" "type" "progress" "created_at" "3100""#),
    ]);
    assert_eq!(a.reclaims, 1);
    assert_eq!(d.len(), 1, "the old holder's event after the re-claim: {d:?}");
    let early = [
        "2000.000000 [0 127.0.0.1:2] \"EVALSHA\" \"c\" \"1\" \"k\" \"x\"".to_string(),
        r#"2000.000001 [0 lua] "HSET" "rl:{chaos}:run:r1" "status" "queued" "updated_at" "2000""#.to_string(),
    ];
    let (_, d) = check_d(&[claim_lines("t1", "w1", 1000, 3000), early]);
    assert_eq!(d.len(), 1, "a recovery of a live lease: {d:?}");
}
