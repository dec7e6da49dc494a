//! The `runledger` command line, end to end: the real binary against a
//! private redis-server per test (see `common`), covering a whole session and
//! the exit-code contract of BRIEF section 5:
//! 0 ok, 1 Redis unreachable / other, 2 bad input, 3 not found, 4 conflict,
//! 5 claim lost. Every failure prints exactly one line on stderr, starting
//! with `runledger: `.
//!
//! A test fails on behaviour only: no assertion depends on how long a call
//! took (the one exception is a lower bound, "not before the wait asked
//! for", which slowness cannot fail). Timeouts are hang guards; how fast
//! things are is measured by `runledger bench`.

use crate::common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use runledger::{RegisterRuntime, Store};
use serde_json::{Value, json};

/// Hang guard: how long a CLI call may run before the test declares it hung.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary with a clean environment: no REDIS_URL, prefix or log filter
/// inherited from whoever runs the tests.
fn bin() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_runledger"));
    cmd.env_remove("REDIS_URL")
        .env_remove("RUNLEDGER_PREFIX")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// What one call of the binary did.
struct Out {
    args: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Out {
    fn from_output(args: String, output: std::process::Output, took: Duration) -> Out {
        Out {
            args,
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            took,
        }
    }

    fn describe(&self) -> String {
        format!(
            "`runledger {}` exited {:?} after {:?}\n--- stdout\n{}--- stderr\n{}",
            self.args, self.code, self.took, self.stdout, self.stderr
        )
    }

    /// Asserts exit 0; returns self for chaining.
    fn ok(self) -> Out {
        assert_eq!(self.code, Some(0), "expected success: {}", self.describe());
        self
    }

    /// Asserts exit 0 and parses stdout as one JSON document.
    fn json(self) -> Value {
        let out = self.ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}", out.describe()))
    }

    /// Asserts the exit code and that stderr is exactly one line starting
    /// with `runledger: `; returns that line.
    fn fails(self, code: i32) -> String {
        assert_eq!(self.code, Some(code), "expected exit {code}: {}", self.describe());
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected exactly one line on stderr: {}", self.describe());
        assert!(lines[0].starts_with("runledger: "), "stderr must start with `runledger: `: {}", self.describe());
        assert!(self.stderr.ends_with('\n'), "stderr line must end with a newline: {}", self.describe());
        lines[0].to_string()
    }
}

/// Runs `runledger --redis <url> <args>` to completion.
async fn rl(url: &str, args: &[&str]) -> Out {
    let mut cmd = bin();
    cmd.arg("--redis").arg(url).args(args);
    run_cmd(cmd, format!("--redis {url} {}", args.join(" "))).await
}

async fn run_cmd(mut cmd: tokio::process::Command, args: String) -> Out {
    let start = Instant::now();
    let output = tokio::time::timeout(CALL_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("hang guard: `runledger {args}` had not ended after {CALL_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("spawning `runledger {args}`: {e}"));
    Out::from_output(args, output, start.elapsed())
}

/// Starts `runledger --redis <url> <args>` in the background.
fn spawn(url: &str, args: &[&str]) -> (tokio::process::Child, String, Instant) {
    let mut cmd = bin();
    cmd.arg("--redis").arg(url).args(args);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning `runledger {}`: {e}", args.join(" ")));
    (child, format!("--redis {url} {}", args.join(" ")), Instant::now())
}

/// Waits for a background call to end; `within` is a hang guard.
async fn finish(child: tokio::process::Child, args: String, started: Instant, within: Duration) -> Out {
    let output = tokio::time::timeout(within, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("hang guard: `runledger {args}` had not ended after {within:?}"))
        .unwrap_or_else(|e| panic!("waiting for `runledger {args}`: {e}"));
    Out::from_output(args, output, started.elapsed())
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("`{key}` is not a string in {v:#}"))
}

fn int_of(v: &Value, key: &str) -> i64 {
    v[key].as_i64().unwrap_or_else(|| panic!("`{key}` is not an integer in {v:#}"))
}

fn items(page: &Value) -> &Vec<Value> {
    page["items"].as_array().unwrap_or_else(|| panic!("`items` is not an array in {page:#}"))
}

fn run_ids(page: &Value) -> Vec<String> {
    items(page).iter().map(|r| str_of(r, "run_id").to_string()).collect()
}

fn sequences(page: &Value) -> Vec<i64> {
    items(page).iter().map(|e| int_of(e, "sequence")).collect()
}

/// Claims with `--json` and returns (run, token).
async fn claim(url: &str, runtime: &str, queue: &str, lease: &str) -> (Value, String) {
    let run = rl(url, &["--json", "claim", "--runtime", runtime, "--queue", queue, "--lease", lease]).await.json();
    assert!(run.is_object(), "expected a claimed run, got {run}");
    let token = str_of(&run, "claim_token").to_string();
    (run, token)
}

fn assert_seed_run(run: &Value) {
    let obj = run.as_object().unwrap_or_else(|| panic!("a run must be a JSON object, got {run}"));
    for key in common::SEED_RUN_KEYS {
        assert!(obj.contains_key(*key), "run JSON lacks the seed's key `{key}`: {run:#}");
    }
}

// 1. enqueue: text, --json with the seed's keys, idempotent by run id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_text_json_and_idempotent() {
    let redis = common::redis().await;
    let url = redis.url.as_str();

    let text = rl(
        url,
        &[
            "enqueue",
            "--queue",
            "emails",
            "--runner",
            "agent",
            "--run-id",
            "t-1",
            "--priority",
            "5",
            "--metadata",
            r#"{"a":1}"#,
        ],
    )
    .await
    .ok();
    assert!(text.stdout.contains("run t-1"), "{}", text.describe());
    assert!(text.stdout.contains("queued"), "{}", text.describe());
    assert!(text.stdout.contains("queue emails"), "{}", text.describe());
    assert!(text.stdout.contains("priority 5"), "{}", text.describe());
    assert!(text.stderr.is_empty(), "nothing on stderr on success: {}", text.describe());

    let run = rl(
        url,
        &[
            "--json",
            "enqueue",
            "--queue",
            "emails",
            "--runner",
            "agent",
            "--run-id",
            "j-1",
            "--priority",
            "-3",
            "--metadata",
            r#"{"k":"v","n":[1,2]}"#,
            "--conversation",
            "c1",
            "--thread",
            "t1",
            "--workspace",
            "w1",
            "--bot",
            "b1",
            "--agent",
            "ag1",
            "--event-id",
            "ev1",
            "--binding",
            "bd1",
        ],
    )
    .await
    .json();
    assert_seed_run(&run);
    assert!(run["id"].as_i64().is_some_and(|id| id > 0), "id is a positive integer: {run:#}");
    assert_eq!(run["run_id"], "j-1");
    assert_eq!(run["status"], "queued");
    assert_eq!(run["queue_name"], "emails");
    assert_eq!(run["priority"], -3);
    assert_eq!(run["runner_id"], "agent");
    assert_eq!(run["metadata"], json!({ "k": "v", "n": [1, 2] }));
    assert!(run["metadata"].is_object());
    assert_eq!(run["claim_token"], Value::Null);
    assert_eq!(run["claimed_by_runtime_id"], Value::Null);
    assert_eq!(run["dispatch_attempts"], 0);
    assert_eq!(run["conversation_id"], "c1");
    assert_eq!(run["thread_id"], "t1");
    assert_eq!(run["workspace_id"], "w1");
    assert_eq!(run["bot_id"], "b1");
    assert_eq!(run["agent_id"], "ag1");
    assert_eq!(run["event_id"], "ev1");
    assert_eq!(run["binding_id"], "bd1");
    assert!(run["created_at"].as_i64().is_some_and(|t| t > 1_600_000_000), "created_at in epoch seconds: {run:#}");
    assert_eq!(run["started_at"], Value::Null);
    assert_eq!(run["finished_at"], Value::Null);
    assert!(run.get("authorization").is_none(), "no authorization was given: {run:#}");

    // Same run id again: the same run comes back, nothing is overwritten.
    let again =
        rl(url, &["--json", "enqueue", "--queue", "emails", "--runner", "agent", "--run-id", "j-1", "--priority", "7"])
            .await
            .json();
    assert_eq!(again["id"], run["id"], "idempotent enqueue returns the same id");
    assert_eq!(again["run_id"], "j-1");
    assert_eq!(again["priority"], -3, "the stored run is returned unchanged");
    assert_eq!(again["metadata"], run["metadata"]);
    let depth = rl(url, &["--json", "queues"]).await.json();
    let emails = depth
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["queue_name"] == "emails"))
        .unwrap_or_else(|| panic!("queue emails in {depth:#}"));
    assert_eq!(emails["queued"], 2, "t-1 and j-1, the retry added nothing: {depth:#}");

    // No --run-id: a fresh UUID; default queue and priority.
    let fresh = rl(url, &["--json", "enqueue", "--runner", "agent"]).await.json();
    assert_seed_run(&fresh);
    let id = str_of(&fresh, "run_id");
    assert_eq!(id.len(), 36, "a UUID run id: {id}");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "a UUID run id: {id}");
    assert_eq!(fresh["queue_name"], "default");
    assert_eq!(fresh["priority"], 0);
    assert_eq!(fresh["metadata"], json!({}));

    // --status running: a directly executed run, never claimed from the queue.
    let direct = rl(
        url,
        &["--json", "enqueue", "--queue", "direct", "--runner", "agent", "--run-id", "d-1", "--status", "running"],
    )
    .await
    .json();
    assert_eq!(direct["status"], "running");
    assert!(direct["started_at"].is_i64(), "a running run has started: {direct:#}");
    let none = rl(url, &["--json", "claim", "--runtime", "rt", "--queue", "direct"]).await.ok();
    assert_eq!(none.stdout, "null\n", "{}", none.describe());

    // Authorization is handed to the claimer only.
    let authz = rl(
        url,
        &[
            "--json",
            "enqueue",
            "--queue",
            "secret",
            "--runner",
            "agent",
            "--run-id",
            "a-1",
            "--authorization",
            r#"{"key":"s3"}"#,
        ],
    )
    .await
    .json();
    assert!(authz.get("authorization").is_none_or(Value::is_null), "enqueue does not echo authorization: {authz:#}");
    let (claimed, _) = claim(url, "rt", "secret", "60").await;
    assert_eq!(claimed["authorization"], json!({ "key": "s3" }), "the claimer gets the authorization");
    let read = rl(url, &["--json", "get", "a-1"]).await.json();
    assert!(read.get("authorization").is_none_or(Value::is_null), "get does not show authorization: {read:#}");
}

// 2. claim: JSON with the token, `null` on an empty queue, bounded and woken waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_null_wait_and_wake() {
    let redis = common::redis().await;
    let url = redis.url.as_str();

    // Empty: `null` and exit 0 in JSON, a short sentence in text.
    let empty = rl(url, &["--json", "claim", "--runtime", "rt-1", "--queue", "jobs"]).await.ok();
    assert_eq!(empty.stdout, "null\n", "{}", empty.describe());
    assert!(empty.stderr.is_empty(), "{}", empty.describe());
    let empty = rl(url, &["claim", "--runtime", "rt-1", "--queue", "jobs"]).await.ok();
    assert_eq!(empty.stdout.trim(), "nothing to claim", "{}", empty.describe());
    // With no --queue and no queue at all.
    let empty = rl(url, &["--json", "claim", "--runtime", "rt-1"]).await.ok();
    assert_eq!(empty.stdout, "null\n", "{}", empty.describe());

    // A bounded wait on an empty queue returns, empty-handed, and not before
    // the wait (a lower bound: slowness cannot fail it; how soon after is for
    // `runledger bench`, and the hang guard of `rl`).
    let waited = rl(url, &["claim", "--runtime", "rt-1", "--queue", "jobs", "--wait", "0.5"]).await.ok();
    assert_eq!(waited.stdout.trim(), "nothing to claim", "{}", waited.describe());
    assert!(waited.took >= Duration::from_millis(450), "returned before the wait: {}", waited.describe());
    let waited = rl(url, &["--json", "claim", "--runtime", "rt-1", "--queue", "jobs", "--wait", "0.5"]).await.ok();
    assert_eq!(waited.stdout, "null\n", "{}", waited.describe());
    assert!(waited.took >= Duration::from_millis(450), "returned before the wait: {}", waited.describe());
    // --wait 0: one attempt, no wait.
    let now = rl(url, &["--json", "claim", "--runtime", "rt-1", "--queue", "jobs", "--wait", "0"]).await.ok();
    assert_eq!(now.stdout, "null\n", "{}", now.describe());

    // A waiting claim is woken by an enqueue from another process.
    let (child, args, started) =
        spawn(url, &["--json", "claim", "--runtime", "rt-2", "--queue", "jobs", "--wait", "5", "--lease", "30"]);
    common::until_blocked(url, 1).await;
    rl(url, &["enqueue", "--queue", "jobs", "--runner", "agent", "--run-id", "woken"]).await.ok();
    // The waiting claim ends with the run (how soon is measured by `runledger bench`).
    let woke = finish(child, args, started, Duration::from_secs(30)).await;
    let run = woke.json();
    assert_seed_run(&run);
    assert_eq!(run["run_id"], "woken");
    assert_eq!(run["status"], "claimed");
    assert_eq!(run["claimed_by_runtime_id"], "rt-2");
    assert_eq!(run["dispatch_attempts"], 1);
    let token = str_of(&run, "claim_token");
    assert!(!token.is_empty(), "a claim token: {run:#}");
    let expires = int_of(&run, "claim_lease_expires_at");
    let claimed_at = int_of(&run, "last_claimed_at");
    assert!((29..=31).contains(&(expires - claimed_at)), "a 30 s lease: {run:#}");

    // Waiting on a queue that already holds a run claims it at once.
    rl(url, &["enqueue", "--queue", "jobs", "--runner", "agent", "--run-id", "ready"]).await.ok();
    let ready = rl(url, &["--json", "claim", "--runtime", "rt-3", "--queue", "jobs", "--wait", "5"]).await;
    assert_eq!(ready.json()["run_id"], "ready");

    // Without --queue, a wait covers every known queue.
    let (child, args, started) = spawn(url, &["--json", "claim", "--runtime", "rt-4", "--wait", "5"]);
    common::until_blocked(url, 1).await;
    rl(url, &["enqueue", "--queue", "jobs", "--runner", "agent", "--run-id", "any-queue"]).await.ok();
    let woke = finish(child, args, started, Duration::from_secs(30)).await;
    assert_eq!(woke.json()["run_id"], "any-queue");

    // Reads never show the token; the text claim does (it is the claimer's result).
    let read = rl(url, &["--json", "get", "woken"]).await.json();
    assert_eq!(read["claim_token"], Value::Null, "get hides the claim token: {read:#}");
    assert_eq!(read["claimed_by_runtime_id"], "rt-2");
    rl(url, &["enqueue", "--queue", "jobs", "--runner", "agent", "--run-id", "texty"]).await.ok();
    let text = rl(url, &["claim", "--runtime", "rt-5", "--queue", "jobs"]).await.ok();
    assert!(text.stdout.contains("run texty"), "{}", text.describe());
    assert!(text.stdout.contains("claim token "), "{}", text.describe());
    assert!(text.stdout.contains("held by rt-5"), "{}", text.describe());

    // Priority first, then creation order; --runner filters.
    for (id, prio, runner) in [("p-low", "1", "a"), ("p-high", "9", "a"), ("p-mid", "5", "b"), ("p-high2", "9", "a")] {
        rl(url, &["enqueue", "--queue", "prio", "--runner", runner, "--run-id", id, "--priority", prio]).await.ok();
    }
    let only_b = rl(url, &["--json", "claim", "--runtime", "rt", "--queue", "prio", "--runner", "b"]).await.json();
    assert_eq!(only_b["run_id"], "p-mid");
    let mut order = Vec::new();
    for _ in 0..3 {
        let (run, _) = claim(url, "rt", "prio", "60").await;
        order.push(str_of(&run, "run_id").to_string());
    }
    assert_eq!(order, ["p-high", "p-high2", "p-low"]);
}

// 3. A whole worker session: renew, append, conflicts, audit, events, finalize.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_session_events_and_finalize() {
    let redis = common::redis().await;
    let url = redis.url.as_str();
    rl(url, &["enqueue", "--queue", "q", "--runner", "agent", "--run-id", "s-1", "--metadata", r#"{"m":1}"#])
        .await
        .ok();
    let (run, token) = claim(url, "rt-1", "q", "20").await;
    assert_eq!(run["run_id"], "s-1");
    let first_expiry = int_of(&run, "claim_lease_expires_at");

    // renew: the claimer's result, lease extended.
    let renewed = rl(url, &["--json", "renew", "s-1", "--token", &token, "--lease", "120"]).await.json();
    assert_seed_run(&renewed);
    assert_eq!(renewed["status"], "claimed");
    assert_eq!(renewed["claimed_by_runtime_id"], "rt-1");
    assert!(int_of(&renewed, "claim_lease_expires_at") >= first_expiry + 90, "lease extended: {renewed:#}");
    let text = rl(url, &["renew", "s-1", "--token", &token]).await.ok();
    assert!(text.stdout.contains("run s-1"), "{}", text.describe());

    // append with the token; JSON event with the seed's keys.
    let ev = rl(
        url,
        &["--json", "append", "s-1", "--seq", "1", "--type", "progress", "--data", r#"{"pct":10}"#, "--token", &token],
    )
    .await
    .json();
    for key in
        ["id", "run_id", "sequence", "type", "data", "usage", "created_at", "source", "artifact_refs", "metadata"]
    {
        assert!(ev.get(key).is_some(), "event lacks `{key}`: {ev:#}");
    }
    assert_eq!(ev["run_id"], "s-1");
    assert_eq!(ev["sequence"], 1);
    assert_eq!(ev["type"], "progress");
    assert_eq!(ev["data"], json!({ "pct": 10 }));
    assert_eq!(ev["source"], "runner");
    let text =
        rl(url, &["append", "s-1", "--seq", "2", "--type", "output", "--data", r#"{"text":"hi"}"#, "--token", &token])
            .await
            .ok();
    assert!(text.stdout.contains("output"), "{}", text.describe());
    assert!(text.stdout.contains(r#"{"text":"hi"}"#), "{}", text.describe());
    // Same sequence, same content: an idempotent retry.
    let retry = rl(
        url,
        &["--json", "append", "s-1", "--seq", "2", "--type", "output", "--data", r#"{"text":"hi"}"#, "--token", &token],
    )
    .await
    .json();
    assert_eq!(retry["sequence"], 2);
    // Same sequence, other content: a conflict, exit 4.
    let line = rl(
        url,
        &["append", "s-1", "--seq", "2", "--type", "output", "--data", r#"{"text":"other"}"#, "--token", &token],
    )
    .await
    .fails(4);
    assert!(line.contains("conflict"), "{line}");
    assert!(line.contains("s-1"), "names the run: {line}");
    // Without a token (host-side) it is still fenced by content.
    rl(url, &["append", "s-1", "--seq", "1", "--type", "progress", "--data", r#"{"pct":99}"#]).await.fails(4);
    // Events for an unknown run: not found.
    let line = rl(url, &["append", "ghost", "--seq", "1", "--type", "x"]).await.fails(3);
    assert!(line.contains("ghost"), "{line}");

    // audit: a host event after the last sequence.
    let audit = rl(url, &["--json", "audit", "s-1", "--type", "note", "--data", r#"{"by":"ops"}"#]).await.json();
    assert_eq!(audit["sequence"], 3);
    assert_eq!(audit["type"], "note");
    assert_eq!(audit["data"], json!({ "by": "ops" }));
    assert_ne!(audit["source"], "runner", "an audit event is the host's: {audit:#}");
    let text = rl(url, &["audit", "s-1", "--type", "note2"]).await.ok();
    assert!(text.stdout.contains("note2"), "{}", text.describe());
    rl(url, &["append", "s-1", "--seq", "5", "--type", "progress", "--data", r#"{"pct":50}"#, "--token", &token])
        .await
        .ok();

    // events: a forward page.
    let page = rl(url, &["--json", "events", "s-1", "--limit", "2"]).await.json();
    for key in ["items", "next_cursor", "prev_cursor", "has_more"] {
        assert!(page.get(key).is_some(), "event page lacks `{key}`: {page:#}");
    }
    assert_eq!(sequences(&page), [1, 2]);
    assert_eq!(page["has_more"], true);
    assert_eq!(page["next_cursor"], 2);
    let cursor = int_of(&page, "next_cursor").to_string();
    let page2 = rl(url, &["--json", "events", "s-1", "--limit", "2", "--after", &cursor]).await.json();
    assert_eq!(sequences(&page2), [3, 4]);
    assert_eq!(page2["has_more"], true);
    let cursor = int_of(&page2, "next_cursor").to_string();
    let page3 = rl(url, &["--json", "events", "s-1", "--limit", "2", "--after", &cursor]).await.json();
    assert_eq!(sequences(&page3), [5]);
    assert_eq!(page3["has_more"], false);
    let all = rl(url, &["--json", "events", "s-1"]).await.json();
    assert_eq!(sequences(&all), [1, 2, 3, 4, 5]);
    assert_eq!(all["has_more"], false);
    // Backward: newest first.
    let back = rl(url, &["--json", "events", "s-1", "--backward", "--limit", "2"]).await.json();
    assert_eq!(sequences(&back), [5, 4]);
    assert_eq!(back["has_more"], true);
    let cursor = int_of(&back, "next_cursor").to_string();
    let back2 = rl(url, &["--json", "events", "s-1", "--backward", "--limit", "10", "--before", &cursor]).await.json();
    assert_eq!(sequences(&back2), [3, 2, 1]);
    assert_eq!(back2["has_more"], false);
    // --after in text: one line per event.
    let text = rl(url, &["events", "s-1", "--after", "3"]).await.ok();
    let lines: Vec<&str> = text.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "events 4 and 5: {}", text.describe());
    assert!(lines[0].trim_start().starts_with("4 "), "{}", text.describe());
    assert!(lines[1].trim_start().starts_with("5 "), "{}", text.describe());
    assert!(text.stdout.contains("note2") && text.stdout.contains(r#"{"pct":50}"#), "{}", text.describe());
    let text = rl(url, &["events", "s-1", "--limit", "2"]).await.ok();
    assert!(text.stdout.contains("more after cursor 2"), "{}", text.describe());
    // Events of an unknown run: not found.
    let line = rl(url, &["events", "ghost"]).await.fails(3);
    assert!(line.contains("ghost"), "{line}");

    // finalize with the token: completed, out of every index.
    let done = rl(
        url,
        &[
            "--json",
            "finalize",
            "s-1",
            "--status",
            "completed",
            "--token",
            &token,
            "--usage",
            r#"{"tokens":12}"#,
            "--cost",
            r#"{"usd":0.5}"#,
        ],
    )
    .await
    .json();
    assert_seed_run(&done);
    assert_eq!(done["status"], "completed");
    assert!(done["finished_at"].is_i64(), "{done:#}");
    assert_eq!(done["usage"], json!({ "tokens": 12 }));
    assert_eq!(done["cost"], json!({ "usd": 0.5 }));
    assert_eq!(done["claim_lease_expires_at"], Value::Null, "a finished run holds no lease: {done:#}");
    // Same status again: an idempotent no-op.
    let again = rl(url, &["--json", "finalize", "s-1", "--status", "completed"]).await.json();
    assert_eq!(again["status"], "completed");
    // Another terminal status: a conflict, exit 4, the run stays completed.
    let line = rl(url, &["finalize", "s-1", "--status", "failed"]).await.fails(4);
    assert!(line.contains("s-1"), "names the run: {line}");
    assert_eq!(rl(url, &["--json", "get", "s-1"]).await.json()["status"], "completed");
    // A runner event after the finish: refused (with the old token the claim
    // is gone, exit 5; without a token the run is finished, exit 4); host
    // audit events stay possible.
    rl(url, &["append", "s-1", "--seq", "6", "--type", "late", "--token", &token]).await.fails(5);
    let line = rl(url, &["append", "s-1", "--seq", "6", "--type", "late"]).await.fails(4);
    assert!(line.contains("s-1"), "{line}");
    let late_audit = rl(url, &["--json", "audit", "s-1", "--type", "post-mortem"]).await.json();
    assert_eq!(late_audit["sequence"], 6);
    let queues = rl(url, &["--json", "queues"]).await.json();
    let q = &queues.as_array().expect("queues is an array")[0];
    assert_eq!(q["claimed"], 0, "{queues:#}");
    assert_eq!(q["finished"], 1, "{queues:#}");
    assert_eq!(q["lease_holders"], json!([]), "{queues:#}");

    // get in text.
    let text = rl(url, &["get", "s-1"]).await.ok();
    assert!(text.stdout.contains("run s-1") && text.stdout.contains("completed"), "{}", text.describe());
    assert!(text.stdout.contains(r#"usage {"tokens":12}"#), "{}", text.describe());

    // release: back to the queue with a retry delay, then to a terminal status.
    rl(url, &["enqueue", "--queue", "q", "--runner", "agent", "--run-id", "s-2"]).await.ok();
    let (_, token2) = claim(url, "rt-1", "q", "60").await;
    let released =
        rl(url, &["--json", "release", "s-2", "--token", &token2, "--retry-in", "30", "--reason", "busy"]).await.json();
    assert_eq!(released["status"], "queued");
    assert_eq!(released["claimed_by_runtime_id"], Value::Null);
    assert_eq!(released["status_reason"], "busy");
    assert!(released["not_before"].is_i64(), "a delayed run: {released:#}");
    let none = rl(url, &["--json", "claim", "--runtime", "rt-1", "--queue", "q"]).await.ok();
    assert_eq!(none.stdout, "null\n", "a delayed run is not claimable yet: {}", none.describe());
    rl(url, &["release", "s-2", "--token", &token2]).await.fails(5);
}

// 4. Lease lost: a stale token on renew/append/finalize/release exits 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_token_exits_5() {
    let redis = common::redis().await;
    let url = redis.url.as_str();
    rl(url, &["enqueue", "--queue", "q", "--runner", "agent", "--run-id", "l-1"]).await.ok();
    let (_, old) = claim(url, "rt-a", "q", "1").await;
    rl(url, &["append", "l-1", "--seq", "1", "--type", "progress", "--token", &old]).await.ok();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (run, new) = claim(url, "rt-b", "q", "60").await;
    assert_eq!(run["run_id"], "l-1", "the expired run is claimable again");
    assert_eq!(run["claimed_by_runtime_id"], "rt-b");
    assert_eq!(run["dispatch_attempts"], 2);
    assert_ne!(old, new, "a new token per claim");

    for args in [
        vec!["renew", "l-1", "--token", &old],
        vec!["append", "l-1", "--seq", "2", "--type", "progress", "--token", &old],
        vec!["finalize", "l-1", "--status", "completed", "--token", &old],
        vec!["release", "l-1", "--token", &old],
    ] {
        let line = rl(url, &args).await.fails(5);
        assert!(line.contains("l-1"), "names the run: {line}");
    }
    // Nothing of the stale writes landed; the new holder carries on.
    let after = rl(url, &["--json", "get", "l-1"]).await.json();
    assert_eq!(after["status"], "claimed");
    assert_eq!(after["claimed_by_runtime_id"], "rt-b");
    rl(url, &["append", "l-1", "--seq", "2", "--type", "progress", "--token", &new]).await.ok();
    let done = rl(url, &["--json", "finalize", "l-1", "--status", "completed", "--token", &new]).await.json();
    assert_eq!(done["status"], "completed");
    let page = rl(url, &["--json", "events", "l-1"]).await.json();
    assert_eq!(sequences(&page), [1, 2]);

    // A passed deadline is a lost claim too (exit 5); the run becomes timeout.
    // The deadline is in whole epoch seconds: 2 s ahead leaves at least 1 s
    // for the claim; then wait until it has surely passed.
    let deadline = chrono::Utc::now().timestamp() + 2;
    let deadline_s = deadline.to_string();
    rl(url, &["enqueue", "--queue", "q", "--runner", "agent", "--run-id", "l-2", "--deadline", &deadline_s]).await.ok();
    let (run, token) = claim(url, "rt-a", "q", "60").await;
    assert_eq!(run["deadline_at"], deadline, "{run:#}");
    let left_ms = (deadline * 1000 - chrono::Utc::now().timestamp_millis()).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(left_ms + 200)).await;
    rl(url, &["renew", "l-2", "--token", &token]).await.fails(5);
    assert_eq!(rl(url, &["--json", "get", "l-2"]).await.json()["status"], "timeout");
}

// 5. events --follow prints events as they come and ends when the run finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_ends_after_finalize() {
    let redis = common::redis().await;
    let url = redis.url.as_str();
    rl(url, &["enqueue", "--queue", "q", "--runner", "agent", "--run-id", "f-1"]).await.ok();
    let (_, token) = claim(url, "rt", "q", "60").await;
    rl(url, &["append", "f-1", "--seq", "1", "--type", "progress", "--data", r#"{"n":1}"#, "--token", &token])
        .await
        .ok();

    let (json_follow, json_args, json_started) = spawn(url, &["--json", "events", "f-1", "--follow"]);
    let (text_follow, text_args, text_started) = spawn(url, &["events", "f-1", "--follow", "--after", "1"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for seq in 2..=4 {
        let seq_s = seq.to_string();
        let data = format!(r#"{{"n":{seq}}}"#);
        rl(url, &["append", "f-1", "--seq", &seq_s, "--type", "progress", "--data", &data, "--token", &token])
            .await
            .ok();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    rl(url, &["audit", "f-1", "--type", "note"]).await.ok();
    rl(url, &["finalize", "f-1", "--status", "completed", "--token", &token]).await.ok();

    // --json: one JSON event per line, every event exactly once.
    let out = finish(json_follow, json_args, json_started, Duration::from_secs(15)).await.ok();
    let events: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON event line ({e}): {l}\n{}", out.describe()))
        })
        .collect();
    let seqs: Vec<i64> = events.iter().map(|e| int_of(e, "sequence")).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5], "{}", out.describe());
    assert_eq!(events[4]["type"], "note");
    assert_eq!(events[2]["data"], json!({ "n": 3 }));

    // Text, from --after 1.
    let out = finish(text_follow, text_args, text_started, Duration::from_secs(15)).await.ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "events 2..=5: {}", out.describe());
    for (line, seq) in lines.iter().zip(2..) {
        assert!(line.trim_start().starts_with(&format!("{seq} ")), "{}", out.describe());
    }

    // Following a finished run prints what it has and ends by itself (`rl`
    // waits for the process to exit, under its hang guard).
    let done = rl(url, &["events", "f-1", "--follow"]).await.ok();
    assert_eq!(done.stdout.lines().count(), 5, "{}", done.describe());
    // Following an unknown run: not found.
    rl(url, &["events", "ghost", "--follow"]).await.fails(3);
}

// 6. cancel, not found, bad input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_not_found_and_bad_input() {
    let redis = common::redis().await;
    let url = redis.url.as_str();

    // cancel on a queued run: cancelled at once and gone from the queue.
    rl(url, &["enqueue", "--queue", "q", "--runner", "agent", "--run-id", "c-1"]).await.ok();
    let cancelled = rl(url, &["--json", "cancel", "c-1", "--reason", "user asked"]).await.json();
    assert_seed_run(&cancelled);
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["cancel_requested_at"].is_i64(), "{cancelled:#}");
    assert!(cancelled["finished_at"].is_i64(), "{cancelled:#}");
    let none = rl(url, &["--json", "claim", "--runtime", "rt", "--queue", "q"]).await.ok();
    assert_eq!(none.stdout, "null\n", "a cancelled run is not claimable: {}", none.describe());
    // Again: still cancelled, exit 0.
    assert_eq!(rl(url, &["--json", "cancel", "c-1"]).await.json()["status"], "cancelled");
    // cancel on a claimed run: recorded for the worker, the run stays claimed.
    rl(url, &["enqueue", "--queue", "q", "--runner", "agent", "--run-id", "c-2"]).await.ok();
    claim(url, "rt", "q", "60").await;
    let asked = rl(url, &["--json", "cancel", "c-2"]).await.json();
    assert_eq!(asked["status"], "claimed");
    assert!(asked["cancel_requested_at"].is_i64(), "{asked:#}");
    let text = rl(url, &["cancel", "c-2"]).await.ok();
    assert!(text.stdout.contains("cancel requested"), "{}", text.describe());

    // Not found: exit 3 naming the id.
    for args in [
        vec!["get", "no-such-run"],
        vec!["--json", "get", "no-such-run"],
        vec!["cancel", "no-such-run"],
        vec!["renew", "no-such-run", "--token", "t"],
        vec!["finalize", "no-such-run", "--status", "completed"],
        vec!["audit", "no-such-run", "--type", "note"],
    ] {
        let line = rl(url, &args).await.fails(3);
        assert!(line.contains("no-such-run"), "the message names the id: {line}");
        assert!(line.contains("not found"), "{line}");
    }

    // Bad input: exit 2, one line saying what was wrong, nothing written.
    let bad: &[(&[&str], &str)] = &[
        (&["enqueue", "--runner", "agent", "--run-id", "b-1", "--metadata", "[1]"], "--metadata"),
        (&["enqueue", "--runner", "agent", "--run-id", "b-2", "--metadata", "{not json"], "--metadata"),
        (&["enqueue", "--runner", "agent", "--run-id", "b-3", "--authorization", "42"], "--authorization"),
        (&["enqueue", "--runner", "agent", "--run-id", "b-4", "--priority", "5000"], "priority"),
        (&["enqueue", "--runner", "agent", "--run-id", "b-5", "--priority", "-5000"], "priority"),
        (&["enqueue", "--runner", "agent", "--run-id", "b-6", "--status", "bogus"], "bogus"),
        (&["enqueue", "--runner", "agent", "--run-id", "b-7", "--status", "claimed"], "status"),
        (&["--json", "enqueue", "--runner", "agent", "--run-id", "b-8", "--metadata", "[1]"], "--metadata"),
        (&["claim", "--runtime", "rt", "--lease", "0"], "--lease"),
        (&["claim", "--runtime", "rt", "--lease=-1"], "--lease"),
        (&["claim", "--runtime", "rt", "--wait=-1"], "--wait"),
        (&["renew", "c-2", "--token", "t", "--lease", "0"], "--lease"),
        (&["runs", "--status", "bogus"], "bogus"),
        (&["finalize", "c-2", "--status", "bogus"], "bogus"),
        (&["append", "c-2", "--seq", "1", "--type", "x", "--data", "[]"], "--data"),
        (&["audit", "c-2", "--type", "x", "--data", "\"text\""], "--data"),
    ];
    for (args, mentions) in bad {
        let line = rl(url, args).await.fails(2);
        assert!(line.contains("invalid input"), "{line}");
        assert!(line.contains(mentions), "`{}` should mention {mentions}: {line}", args.join(" "));
    }
    let runs = rl(url, &["--json", "runs"]).await.json();
    assert_eq!(run_ids(&runs), ["c-2", "c-1"], "no bad input left a run behind");
    let events = rl(url, &["--json", "events", "c-2"]).await.json();
    assert_eq!(sequences(&events), Vec::<i64>::new(), "no bad event was written");

    // Arguments clap itself rejects exit 2 too (clap prints its usage hint).
    for args in [
        vec!["enqueue", "--runner", "agent", "--priority", "abc"],
        vec!["enqueue", "--queue", "q"],
        vec!["claim", "--runtime", "rt", "--lease", "soon"],
        vec!["no-such-command"],
    ] {
        let out = rl(url, &args).await;
        assert_eq!(out.code, Some(2), "{}", out.describe());
        assert!(!out.stderr.is_empty(), "{}", out.describe());
        assert!(out.stdout.is_empty(), "{}", out.describe());
    }
}

// 7. Redis unreachable: exit 1 with a readable line; REDIS_URL is the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_and_redis_url() {
    let dead = "redis://127.0.0.1:1/";
    for args in [
        vec!["get", "x"],
        vec!["enqueue", "--runner", "agent"],
        vec!["--json", "claim", "--runtime", "rt", "--wait", "1"],
        vec!["runs"],
        vec!["queues"],
    ] {
        // It gives up by itself: `rl` waits for the exit, under its hang guard.
        let out = rl(dead, &args).await;
        assert!(out.stdout.is_empty(), "nothing on stdout: {}", out.describe());
        let line = out.fails(1);
        assert!(line.contains("Redis"), "mentions Redis: {line}");
        assert!(line.contains("127.0.0.1:1"), "names the address: {line}");
    }

    // REDIS_URL is the default for --redis ...
    let mut cmd = bin();
    cmd.env("REDIS_URL", dead).args(["get", "x"]);
    let line = run_cmd(cmd, format!("get x (REDIS_URL={dead})")).await.fails(1);
    assert!(line.contains("127.0.0.1:1"), "{line}");

    let redis = common::redis().await;
    let mut cmd = bin();
    cmd.env("REDIS_URL", &redis.url).args(["--json", "enqueue", "--runner", "agent", "--run-id", "env-1"]);
    let run = run_cmd(cmd, format!("--json enqueue ... (REDIS_URL={})", redis.url)).await.json();
    assert_eq!(run["run_id"], "env-1");
    // ... and --redis wins over it.
    let mut cmd = bin();
    cmd.env("REDIS_URL", dead).args(["--redis", &redis.url, "--json", "get", "env-1"]);
    let run = run_cmd(cmd, "--redis <test> --json get env-1 (REDIS_URL dead)".into()).await.json();
    assert_eq!(run["run_id"], "env-1");

    // --prefix separates ledgers on one server.
    let other = rl(&redis.url, &["--prefix", "other", "get", "env-1"]).await.fails(3);
    assert!(other.contains("env-1"), "{other}");
    rl(&redis.url, &["--prefix", "other", "enqueue", "--runner", "agent", "--run-id", "env-1", "--priority", "3"])
        .await
        .ok();
    assert_eq!(rl(&redis.url, &["--json", "get", "env-1"]).await.json()["priority"], 0);
    assert_eq!(rl(&redis.url, &["--prefix", "other", "--json", "get", "env-1"]).await.json()["priority"], 3);
}

// 8. runs: filters and cursor paging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_filters_and_paging() {
    let redis = common::redis().await;
    let url = redis.url.as_str();
    // 5 runs in `alpha` (3 of conversation c1), 2 in `beta`.
    for (id, queue, conv) in [
        ("r-1", "alpha", Some("c1")),
        ("r-2", "alpha", None),
        ("r-3", "beta", Some("c1")),
        ("r-4", "alpha", Some("c1")),
        ("r-5", "beta", None),
        ("r-6", "alpha", Some("c1")),
        ("r-7", "alpha", None),
    ] {
        let mut args = vec!["enqueue", "--queue", queue, "--runner", "agent", "--run-id", id, "--bot", "bot-1"];
        if let Some(c) = conv {
            args.extend(["--conversation", c]);
        }
        rl(url, &args).await.ok();
    }
    // r-1 claimed, r-2 completed, r-5 failed.
    let (first, _) = claim(url, "rt", "alpha", "60").await;
    assert_eq!(first["run_id"], "r-1");
    let (second, token) = claim(url, "rt", "alpha", "60").await;
    assert_eq!(second["run_id"], "r-2");
    rl(url, &["finalize", "r-2", "--status", "completed", "--token", &token]).await.ok();
    let (third, token) = claim(url, "rt", "beta", "60").await;
    assert_eq!(third["run_id"], "r-3");
    rl(url, &["finalize", "r-3", "--status", "failed", "--token", &token, "--reason", "boom"]).await.ok();

    // Everything, newest first, in the seed's page shape.
    let all = rl(url, &["--json", "runs"]).await.json();
    assert!(all.get("items").is_some() && all.get("next_cursor").is_some() && all.get("has_more").is_some(), "{all:#}");
    assert_eq!(run_ids(&all), ["r-7", "r-6", "r-5", "r-4", "r-3", "r-2", "r-1"]);
    assert_eq!(all["has_more"], false);
    for run in items(&all) {
        assert_seed_run(run);
        assert_eq!(run["claim_token"], Value::Null, "listings hide the claim token: {run:#}");
    }

    // Filters.
    let alpha = rl(url, &["--json", "runs", "--queue", "alpha"]).await.json();
    assert_eq!(run_ids(&alpha), ["r-7", "r-6", "r-4", "r-2", "r-1"]);
    let both = rl(url, &["--json", "runs", "--queue", "alpha", "--queue", "beta"]).await.json();
    assert_eq!(run_ids(&both).len(), 7);
    let queued = rl(url, &["--json", "runs", "--status", "queued"]).await.json();
    assert_eq!(run_ids(&queued), ["r-7", "r-6", "r-5", "r-4"]);
    let finished = rl(url, &["--json", "runs", "--status", "completed", "--status", "failed"]).await.json();
    assert_eq!(run_ids(&finished), ["r-3", "r-2"]);
    let claimed = rl(url, &["--json", "runs", "--status", "claimed"]).await.json();
    assert_eq!(run_ids(&claimed), ["r-1"]);
    let conv = rl(url, &["--json", "runs", "--conversation", "c1"]).await.json();
    assert_eq!(run_ids(&conv), ["r-6", "r-4", "r-3", "r-1"]);
    let conv_alpha_queued =
        rl(url, &["--json", "runs", "--conversation", "c1", "--queue", "alpha", "--status", "queued"]).await.json();
    assert_eq!(run_ids(&conv_alpha_queued), ["r-6", "r-4"]);
    let bot = rl(url, &["--json", "runs", "--bot", "bot-1"]).await.json();
    assert_eq!(run_ids(&bot).len(), 7);
    let none = rl(url, &["--json", "runs", "--conversation", "nobody"]).await.json();
    assert_eq!(run_ids(&none), Vec::<String>::new());
    assert_eq!(none["has_more"], false);
    let unknown_queue = rl(url, &["--json", "runs", "--queue", "nowhere"]).await.json();
    assert_eq!(run_ids(&unknown_queue), Vec::<String>::new());

    // Paging with --limit 2 --before <next_cursor>: every run once, in order.
    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    for page_no in 0.. {
        assert!(page_no < 10, "paging does not end: {seen:?}");
        let mut args = vec!["--json", "runs", "--limit", "2"];
        if let Some(b) = &before {
            args.extend(["--before", b.as_str()]);
        }
        let page = rl(url, &args).await.json();
        let ids = run_ids(&page);
        assert!(ids.len() <= 2, "{page:#}");
        seen.extend(ids);
        if page["has_more"] == false {
            break;
        }
        before = Some(int_of(&page, "next_cursor").to_string());
    }
    assert_eq!(seen, ["r-7", "r-6", "r-5", "r-4", "r-3", "r-2", "r-1"]);
    // Paging a filtered listing.
    let page = rl(url, &["--json", "runs", "--conversation", "c1", "--limit", "2"]).await.json();
    assert_eq!(run_ids(&page), ["r-6", "r-4"]);
    assert_eq!(page["has_more"], true);
    let cursor = int_of(&page, "next_cursor").to_string();
    let page = rl(url, &["--json", "runs", "--conversation", "c1", "--limit", "2", "--before", &cursor]).await.json();
    assert_eq!(run_ids(&page), ["r-3", "r-1"]);

    // Text: a table with a hint for the next page.
    let text = rl(url, &["runs", "--limit", "2"]).await.ok();
    let lines: Vec<&str> = text.stdout.lines().collect();
    assert!(lines[0].contains("RUN") && lines[0].contains("STATUS"), "{}", text.describe());
    assert!(lines[1].contains("r-7") && lines[2].contains("r-6"), "{}", text.describe());
    assert!(lines.last().is_some_and(|l| l.starts_with("more: --before ")), "{}", text.describe());
}

// 9. runtimes, queues and reap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtimes_queues_and_reap() {
    let (redis, store): (_, Store) = common::store().await;
    let url = redis.url.as_str();

    assert_eq!(rl(url, &["--json", "runtimes"]).await.json(), json!([]));
    assert_eq!(rl(url, &["--json", "queues"]).await.json(), json!([]));

    let mut reg = RegisterRuntime::new("rt-lib-1");
    reg.display_name = Some("library runtime".into());
    reg.version = Some("1.2.3".into());
    reg.labels = Some(json!({ "zone": "a" }));
    store.register_runtime(&reg).await.expect("register_runtime");
    let runtimes = rl(url, &["--json", "runtimes"]).await.json();
    let list = runtimes.as_array().unwrap_or_else(|| panic!("runtimes is an array: {runtimes:#}"));
    assert_eq!(list.len(), 1, "{runtimes:#}");
    let rt = &list[0];
    for key in common::SEED_RUNTIME_KEYS {
        assert!(rt.get(key).is_some(), "runtime lacks the seed's key `{key}`: {rt:#}");
    }
    assert_eq!(rt["runtime_id"], "rt-lib-1");
    assert_eq!(rt["status"], "online");
    assert_eq!(rt["display_name"], "library runtime");
    assert_eq!(rt["version"], "1.2.3");
    assert_eq!(rt["labels"], json!({ "zone": "a" }));
    let online = rl(url, &["--json", "runtimes", "--status", "online"]).await.json();
    assert_eq!(online.as_array().map(Vec::len), Some(1), "{online:#}");
    let stale = rl(url, &["--json", "runtimes", "--status", "stale"]).await.json();
    assert_eq!(stale, json!([]));
    let text = rl(url, &["runtimes"]).await.ok();
    assert!(text.stdout.contains("rt-lib-1") && text.stdout.contains("online"), "{}", text.describe());

    // Queue depth per queue.
    for i in 0..3 {
        rl(url, &["enqueue", "--queue", "mail", "--runner", "agent", "--run-id", &format!("m-{i}")]).await.ok();
    }
    rl(url, &["enqueue", "--queue", "sms", "--runner", "agent", "--run-id", "s-0"]).await.ok();
    let not_before = (chrono::Utc::now().timestamp() + 3600).to_string();
    rl(url, &["enqueue", "--queue", "sms", "--runner", "agent", "--run-id", "s-later", "--not-before", &not_before])
        .await
        .ok();
    // A long lease, so the first reap below cannot find it expired however slow
    // the machine; it is shortened by a renewal before the second.
    let (_, token) = claim(url, "rt-lib-1", "mail", "600").await;
    let queues = rl(url, &["--json", "queues"]).await.json();
    let find = |qs: &Value, name: &str| -> Value {
        qs.as_array()
            .and_then(|a| a.iter().find(|q| q["queue_name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("queue {name} in {qs:#}"))
    };
    let mail = find(&queues, "mail");
    for key in [
        "queue_name",
        "queued",
        "pinned",
        "delayed",
        "claimed",
        "finished",
        "oldest_queued_age",
        "lease_holders",
        "counters",
    ] {
        assert!(mail.get(key).is_some(), "queue stats lack `{key}`: {mail:#}");
    }
    assert_eq!(mail["queued"], 2, "{mail:#}");
    assert_eq!(mail["claimed"], 1, "{mail:#}");
    assert_eq!(mail["finished"], 0, "{mail:#}");
    assert!(mail["oldest_queued_age"].as_f64().is_some_and(|a| a >= 0.0), "{mail:#}");
    let holders = mail["lease_holders"].as_array().expect("lease_holders is an array");
    assert_eq!(holders.len(), 1, "{mail:#}");
    assert_eq!(holders[0]["runtime_id"], "rt-lib-1");
    assert_eq!(holders[0]["run_id"], "m-0");
    let sms = find(&queues, "sms");
    assert_eq!(sms["queued"], 1, "{sms:#}");
    assert_eq!(sms["delayed"], 1, "{sms:#}");
    assert_eq!(sms["claimed"], 0, "{sms:#}");
    let text = rl(url, &["queues"]).await.ok();
    assert!(
        text.stdout.contains("QUEUE") && text.stdout.contains("mail") && text.stdout.contains("sms"),
        "{}",
        text.describe()
    );
    assert!(text.stdout.contains("m-0 held by rt-lib-1"), "{}", text.describe());

    // reap: the report's fields; an expired lease goes back to the queue.
    let report = rl(url, &["--json", "reap"]).await.json();
    for key in ["promoted", "reclaimed", "timed_out", "purged", "stale_runtimes"] {
        assert!(report[key].is_i64(), "reap report lacks `{key}`: {report:#}");
    }
    assert_eq!(report["reclaimed"], 0, "the 600 s lease has not expired: {report:#}");
    // A renewal sets the lease to 1 s from now; reap until it has expired.
    rl(url, &["renew", "m-0", "--token", &token, "--lease", "1"]).await.ok();
    let mut reclaimed = 0;
    let hang_guard = Instant::now() + Duration::from_secs(60);
    while reclaimed == 0 {
        assert!(Instant::now() < hang_guard, "hang guard: the 1 s lease of m-0 never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let report = rl(url, &["--json", "reap"]).await.json();
        reclaimed = int_of(&report, "reclaimed");
    }
    assert_eq!(reclaimed, 1, "the expired lease of m-0, once");
    let m0 = rl(url, &["--json", "get", "m-0"]).await.json();
    assert_eq!(m0["status"], "queued", "{m0:#}");
    rl(url, &["renew", "m-0", "--token", &token]).await.fails(5);
    let mail = find(&rl(url, &["--json", "queues"]).await.json(), "mail");
    assert_eq!(mail["queued"], 3, "{mail:#}");
    assert_eq!(mail["claimed"], 0, "{mail:#}");
    let text = rl(url, &["reap"]).await.ok();
    assert!(text.stdout.contains("reclaimed 0"), "{}", text.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argument_errors_are_one_line_and_exit_2() {
    let redis = common::redis().await;
    let url = redis.url.as_str();
    let line = rl(url, &["enqueue", "--queue", "q"]).await.fails(2);
    assert!(line.contains("--runner"), "names the missing flag: {line}");
    let line = rl(url, &["enqueue", "--runner", "a", "--priority", "abc"]).await.fails(2);
    assert!(line.contains("--priority"), "names the bad flag: {line}");
    let line = rl(url, &["get", "x", "--bogus"]).await.fails(2);
    assert!(line.contains("--bogus"), "{line}");
    let line = rl("notaurl", &["get", "x"]).await.fails(2);
    assert!(line.contains("notaurl"), "names the bad URL: {line}");
    // --help still prints the whole help on stdout and exits 0.
    let help = rl(url, &["enqueue", "--help"]).await.ok();
    assert!(help.stdout.contains("--runner"), "{}", help.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_wait_without_queue_notices_a_new_queue() {
    let redis = common::redis().await;
    let url = redis.url.clone();
    // No queue exists yet; the waiter serves "every known queue", so it
    // blocks in no command: it reads the queue registry again and again.
    let port = url.trim_end_matches('/').rsplit(':').next().expect("port in the url").to_string();
    let recorder = common::monitor::Monitor::start(&format!("127.0.0.1:{port}")).await;
    let (child, args, started) = spawn(&url, &["--json", "claim", "--runtime", "rt", "--wait", "8"]);
    // Two reads: it found no queue, and is waiting for one.
    recorder
        .until_seen(2, "reads of the queue registry", |c| {
            c.name_is("HGETALL") && c.args.get(1).is_some_and(|k| k.ends_with(":queues"))
        })
        .await;
    drop(recorder.stop().await);
    rl(&url, &["enqueue", "--queue", "brand-new", "--runner", "a", "--run-id", "fresh"]).await.ok();
    // The wait ends with the new queue's run, not `null` (how soon is for `runledger bench`).
    let out = finish(child, args, started, Duration::from_secs(30)).await;
    let run: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("JSON ({e}): {}", out.describe()));
    assert_eq!(str_of(&run, "run_id"), "fresh", "{}", out.describe());
}

// `queue pause`/`resume` show in `queue show` (text and JSON) and in
// `queues`: the queue's pause and each paused group, gone again on resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_show_and_queues_show_what_is_paused() {
    let redis = common::redis().await;
    let url = redis.url.as_str();
    rl(url, &["queue", "set", "q", "--group-by", "conversation_id"]).await.ok();
    rl(url, &["enqueue", "--queue", "q", "--runner", "r", "--run-id", "a", "--conversation", "c1"]).await.ok();
    let shown = rl(url, &["--json", "queue", "show", "q"]).await.json();
    assert_eq!((&shown["paused"], &shown["paused_groups"]), (&json!(false), &json!([])), "{shown}");
    rl(url, &["queue", "pause", "q"]).await.ok();
    rl(url, &["queue", "pause", "q", "--group", "c2"]).await.ok();
    rl(url, &["queue", "pause", "q", "--group", "c1"]).await.ok();
    let shown = rl(url, &["--json", "queue", "show", "q"]).await.json();
    assert_eq!(shown["paused"], json!(true), "{shown}");
    assert_eq!(shown["paused_groups"], json!(["c1", "c2"]), "{shown}");
    assert_eq!(shown["paused_group_count"], json!(2), "{shown}");
    let text = rl(url, &["queue", "show", "q"]).await.ok();
    for line in ["q: paused", "group c1: paused", "group c2: paused"] {
        assert!(text.stdout.contains(line), "{line:?} missing: {}", text.describe());
    }
    let listed = rl(url, &["queues"]).await.ok();
    assert!(listed.stdout.contains("paused: claims hand out nothing"), "{}", listed.describe());
    assert!(listed.stdout.contains("2 paused group(s)"), "{}", listed.describe());
    rl(url, &["queue", "resume", "q"]).await.ok();
    rl(url, &["queue", "resume", "q", "--group", "c1"]).await.ok();
    let shown = rl(url, &["--json", "queue", "show", "q"]).await.json();
    assert_eq!((&shown["paused"], &shown["paused_groups"]), (&json!(false), &json!(["c2"])), "{shown}");
    let text = rl(url, &["queue", "show", "q"]).await.ok();
    assert!(!text.stdout.contains("q: paused") && !text.stdout.contains("c1: paused"), "{}", text.describe());
    let listed = rl(url, &["queues"]).await.ok();
    assert!(!listed.stdout.contains("paused: claims"), "{}", listed.describe());
    assert!(listed.stdout.contains("1 paused group(s)"), "{}", listed.describe());
}

// `queue set` with groups' own rate limits and caps: shown in JSON and
// text, a group's own cap of 0 refuses its runs (exit 6), bad values exit 2
// and write nothing, `GROUP=` drops one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_overrides() {
    let redis = common::redis().await;
    let url = redis.url.as_str();
    let args = [
        "--json",
        "queue",
        "set",
        "q",
        "--group-by",
        "conversation_id",
        "--group-rate-limit-for",
        "vip=5/60",
        "--group-cap-for",
        "vip=2",
        "--group-cap-for",
        "closed=0",
    ];
    let shown = rl(url, &args).await.json();
    assert_eq!(shown["group_rate_limits"], serde_json::json!([["vip", {"max": 5, "window": 60.0}]]), "{shown}");
    assert_eq!(shown["group_caps"], serde_json::json!([["closed", 0], ["vip", 2]]), "{shown}");
    let text = rl(url, &["queue", "show", "q"]).await.ok();
    assert!(text.stdout.contains("rate limit of group vip: 5 claims per 60 s"), "{}", text.describe());
    assert!(text.stdout.contains("cap of group closed: 0 queued runs"), "{}", text.describe());
    rl(url, &["enqueue", "--queue", "q", "--runner", "r", "--run-id", "a", "--conversation", "vip"]).await.ok();
    let mut raw = common::raw(&redis).await;
    let before = common::keyspace(&mut raw).await;
    let line = rl(url, &["enqueue", "--queue", "q", "--runner", "r", "--run-id", "b", "--conversation", "closed"])
        .await
        .fails(6);
    assert!(line.contains("group closed"), "{line}");
    for bad in [
        ["--group-rate-limit-for", "vip"],
        ["--group-rate-limit-for", "vip=3/0"],
        ["--group-cap-for", "vip=x"],
        ["--group-cap-for", "a{b}=1"],
    ] {
        let mut args = vec!["queue", "set", "q"];
        args.extend(bad);
        let out = rl(url, &args).await;
        assert_eq!(out.code, Some(2), "{}", out.describe());
    }
    assert_eq!(common::keyspace(&mut raw).await, before, "a refused call wrote something");
    let args = ["--json", "queue", "set", "q", "--group-cap-for", "closed=", "--group-rate-limit-for", "vip="];
    let shown = rl(url, &args).await.json();
    assert_eq!(shown["group_caps"], serde_json::json!([["vip", 2]]), "{shown}");
    assert_eq!(shown["group_rate_limits"], serde_json::json!([]), "{shown}");
    rl(url, &["enqueue", "--queue", "q", "--runner", "r", "--run-id", "b", "--conversation", "closed"]).await.ok();
}

// `queue set` with a rate limit and caps; a create past a cap exits 6, one
// line, and writes nothing; bad limits exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_limits_and_a_full_queue_exit_6() {
    let redis = common::redis().await;
    let url = redis.url.as_str();
    let args = ["--json", "queue", "set", "q", "--rate-limit", "3/2", "--cap", "1", "--workspace-cap", "1"];
    let shown = rl(url, &args).await.json();
    assert_eq!((shown["rate"]["max"].as_i64(), shown["rate"]["window"].as_f64()), (Some(3), Some(2.0)), "{shown}");
    assert_eq!((shown["cap"].as_i64(), shown["workspace_cap"].as_i64()), (Some(1), Some(1)), "{shown}");
    let text = rl(url, &["queue", "show", "q"]).await.ok();
    assert!(text.stdout.contains("rate limit: 3 claims per 2 s"), "{}", text.describe());
    rl(url, &["enqueue", "--queue", "q", "--runner", "r", "--run-id", "a"]).await.ok();
    let mut raw = common::raw(&redis).await;
    let before = common::keyspace(&mut raw).await;
    let line = rl(url, &["enqueue", "--queue", "q", "--runner", "r", "--run-id", "b"]).await.fails(6);
    assert!(line.contains("queue q holds 1 queued runs (its cap is 1)"), "{line}");
    for bad in [["--rate-limit", "3/0"], ["--rate-limit", "x"], ["--cap", "-1"]] {
        let mut args = vec!["queue", "set", "q"];
        args.extend(bad);
        let out = rl(url, &args).await;
        assert_eq!(out.code, Some(2), "{}", out.describe());
    }
    assert_eq!(common::keyspace(&mut raw).await, before, "a refused call wrote something");
    rl(url, &["queue", "set", "q", "--cap", "0"]).await.ok();
    rl(url, &["enqueue", "--queue", "q", "--runner", "r", "--run-id", "b"]).await.ok();
}
