//! What the ledger stores and returns. Results serialize to the seed store's
//! dicts: same keys, times in epoch seconds, JSON fields as JSON values.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Where a run is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Stored but not queued: no claim takes it; it only ends (finalize, cancel).
    Created,
    Queued,
    Running,
    Claimed,
    Completed,
    Failed,
    Cancelled,
    Timeout,
}

impl RunStatus {
    pub const ALL: [RunStatus; 8] = [
        RunStatus::Created,
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Claimed,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelled,
        RunStatus::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Created => "created",
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Claimed => "claimed",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Timeout => "timeout",
        }
    }

    /// Completed, failed, cancelled and timeout: a run never leaves these.
    pub fn is_terminal(self) -> bool {
        matches!(self, RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled | RunStatus::Timeout)
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        RunStatus::ALL.into_iter().find(|status| status.as_str() == s).ok_or_else(|| {
            Error::Invalid(format!(
                "Unknown run status: '{s}' (expected created, queued, running, claimed, completed, failed, cancelled or timeout)"
            ))
        })
    }
}

/// One run, as the seed's `_run_to_dict` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub id: i64,
    pub run_id: String,
    pub event_id: Option<String>,
    pub agent_id: Option<String>,
    pub binding_id: Option<String>,
    pub runner_id: String,
    pub conversation_id: Option<String>,
    pub thread_id: Option<String>,
    pub workspace_id: Option<String>,
    pub bot_id: Option<String>,
    pub status: RunStatus,
    pub status_reason: Option<String>,
    pub queue_name: String,
    pub priority: i64,
    pub requested_runtime_id: Option<String>,
    pub claimed_by_runtime_id: Option<String>,
    /// Only in the result of a claim: every other result (renew, release,
    /// finalize, reads) leaves the key out, as LangBot's store does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_token: Option<String>,
    pub claim_lease_expires_at: Option<i64>,
    pub dispatch_attempts: i64,
    pub last_claimed_at: Option<i64>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
    pub deadline_at: Option<i64>,
    pub cancel_requested_at: Option<i64>,
    pub usage: Option<Value>,
    pub cost: Option<Value>,
    pub metadata: Value,
    /// Beyond the seed: when a delayed run becomes claimable (epoch seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<i64>,
    /// Beyond the seed: claims allowed before an expiring lease makes the run dead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i64>,
    /// The run's group, when its queue groups runs (see [`crate::Store::set_groups`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_key: Option<String>,
    /// Only in the claimer's own results, like the claim token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Value>,
    /// The lease expiry in epoch milliseconds (the seconds field rounds down).
    #[serde(skip)]
    pub claim_lease_expires_at_ms: Option<i64>,
    /// created_at in epoch milliseconds.
    #[serde(skip)]
    pub created_at_ms: i64,
    /// In a claim result: the run's last event sequence, so a re-claimed run
    /// continues its stream. 0 elsewhere.
    #[serde(skip)]
    pub last_sequence: i64,
    /// In a claim result: when this process sent the claim (its own clock).
    /// The lease counts from here, so it ends locally before it does on the
    /// server, whatever the reply's delay.
    #[serde(skip)]
    pub claim_sent_at: Option<std::time::Instant>,
}

fn secs(ms: Option<i64>) -> Option<i64> {
    ms.map(|ms| ms.div_euclid(1000))
}

pub(crate) struct Fields(pub HashMap<String, String>);

impl Fields {
    fn text(&mut self, name: &str) -> Option<String> {
        self.0.remove(name)
    }
    fn int(&mut self, name: &str) -> Result<Option<i64>> {
        match self.0.remove(name) {
            None => Ok(None),
            Some(v) => {
                v.parse::<i64>().map(Some).map_err(|_| Error::Protocol(format!("field {name} is not an integer: {v}")))
            }
        }
    }
    fn json(&mut self, name: &str) -> Result<Option<Value>> {
        match self.0.remove(name) {
            None => Ok(None),
            Some(v) => serde_json::from_str(&v)
                .map(Some)
                .map_err(|e| Error::Protocol(format!("field {name} is not JSON: {e}"))),
        }
    }
    fn required(&mut self, name: &str) -> Result<String> {
        self.text(name).ok_or_else(|| Error::Protocol(format!("stored record lacks field {name}")))
    }
}

impl Run {
    /// Builds a run from its hash. The claim token and authorization are kept
    /// only for the claimer (`for_holder`).
    pub(crate) fn from_fields(mut f: Fields, for_holder: bool) -> Result<Run> {
        let lease_ms = f.int("claim_lease_expires_at")?;
        let token = f.text("claim_token");
        let authorization = f.json("authorization")?;
        let created_ms = f.0.get("created_at").and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        let started_ms = f.int("started_at")?;
        let finished_ms = f.int("finished_at")?;
        let dispatch_attempts = f.int("dispatch_attempts")?.unwrap_or(0);
        let attempted = dispatch_attempts > 0;
        Ok(Run {
            id: f.int("id")?.ok_or_else(|| Error::Protocol("run without id".into()))?,
            run_id: f.required("run_id")?,
            event_id: f.text("event_id"),
            agent_id: f.text("agent_id"),
            binding_id: f.text("binding_id"),
            runner_id: f.required("runner_id")?,
            conversation_id: f.text("conversation_id"),
            thread_id: f.text("thread_id"),
            workspace_id: f.text("workspace_id"),
            bot_id: f.text("bot_id"),
            status: f.required("status")?.parse()?,
            status_reason: f.text("status_reason"),
            queue_name: f.required("queue_name")?,
            priority: f.int("priority")?.unwrap_or(0),
            requested_runtime_id: f.text("requested_runtime_id"),
            claimed_by_runtime_id: f.text("claimed_by_runtime_id"),
            claim_token: if for_holder { token } else { None },
            claim_lease_expires_at: secs(lease_ms),
            dispatch_attempts,
            // Written from the second claim on; the first claim's time is started_at.
            last_claimed_at: secs(f.int("last_claimed_at")?.or(attempted.then_some(started_ms).flatten())),
            created_at: secs(f.int("created_at")?).unwrap_or(0),
            started_at: secs(started_ms),
            finished_at: secs(finished_ms),
            // Absent until the run changes, and on a finished run: its finished_at, else its created_at.
            updated_at: secs(f.int("updated_at")?.or(finished_ms).or(Some(created_ms))).unwrap_or(0),
            deadline_at: secs(f.int("deadline_at")?),
            cancel_requested_at: secs(f.int("cancel_requested_at")?),
            usage: f.json("usage")?,
            cost: f.json("cost")?,
            metadata: f.json("metadata")?.unwrap_or_else(|| Value::Object(Default::default())),
            not_before: secs(f.int("not_before")?),
            max_attempts: f.int("max_attempts")?,
            authorization: if for_holder { authorization } else { None },
            group_key: f.text("group"),
            claim_lease_expires_at_ms: lease_ms,
            created_at_ms: created_ms,
            last_sequence: 0,
            claim_sent_at: None,
        })
    }
}

/// A run to create. Build it with [`NewRun::new`] and the `with_*` methods.
#[derive(Clone, Debug, Default)]
pub struct NewRun {
    pub run_id: String,
    pub runner_id: String,
    /// Queue name; `default` when not set.
    pub queue: Option<String>,
    pub event_id: Option<String>,
    pub binding_id: Option<String>,
    pub conversation_id: Option<String>,
    pub thread_id: Option<String>,
    pub workspace_id: Option<String>,
    pub bot_id: Option<String>,
    pub agent_id: Option<String>,
    /// Epoch seconds after which the run becomes `timeout`.
    pub deadline_at: Option<f64>,
    pub authorization: Option<Value>,
    pub metadata: Option<Value>,
    /// `Queued` (default: enters the queue), `Running` (executed directly) or
    /// `Created` (stored, not claimable).
    pub status: Option<RunStatus>,
    /// Higher first; within a priority, oldest first. Range -1000..=1000.
    pub priority: i64,
    /// Only this runtime may claim the run.
    pub requested_runtime_id: Option<String>,
    /// Epoch seconds before which the run is not claimable.
    pub not_before: Option<f64>,
    /// Claims allowed before a recurring lease expiry makes the run dead (0 = no limit).
    pub max_attempts: u32,
    /// For a partitioned queue: runs with the same key go to the same
    /// partition, so they keep their order (default: the group key, else the
    /// run id). Not used for a run of a grouped queue that has a group: its
    /// group chooses the partition (see `store::partitions::placement_key`).
    pub partition_key: Option<String>,
    /// The run's group in a queue grouped by `group_key` (see
    /// [`crate::Store::set_groups`]).
    pub group_key: Option<String>,
}

impl NewRun {
    pub fn new(run_id: impl Into<String>, runner_id: impl Into<String>) -> Self {
        NewRun { run_id: run_id.into(), runner_id: runner_id.into(), ..Default::default() }
    }
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }
    pub fn priority(mut self, priority: i64) -> Self {
        self.priority = priority;
        self
    }
    pub fn metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata);
        self
    }
    pub fn requested_runtime(mut self, runtime_id: impl Into<String>) -> Self {
        self.requested_runtime_id = Some(runtime_id.into());
        self
    }
    pub fn not_before(mut self, epoch_seconds: f64) -> Self {
        self.not_before = Some(epoch_seconds);
        self
    }
    pub fn deadline_at(mut self, epoch_seconds: f64) -> Self {
        self.deadline_at = Some(epoch_seconds);
        self
    }
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }
    pub fn status(mut self, status: RunStatus) -> Self {
        self.status = Some(status);
        self
    }
    pub fn conversation(mut self, id: impl Into<String>) -> Self {
        self.conversation_id = Some(id.into());
        self
    }
    pub fn thread(mut self, id: impl Into<String>) -> Self {
        self.thread_id = Some(id.into());
        self
    }
    pub fn workspace(mut self, id: impl Into<String>) -> Self {
        self.workspace_id = Some(id.into());
        self
    }
    pub fn bot(mut self, id: impl Into<String>) -> Self {
        self.bot_id = Some(id.into());
        self
    }
    pub fn queue_name(&self) -> &str {
        self.queue.as_deref().unwrap_or(DEFAULT_QUEUE)
    }
    pub fn partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }
    /// The run's group in a queue grouped by `group_key`.
    pub fn group_key(mut self, key: impl Into<String>) -> Self {
        self.group_key = Some(key.into());
        self
    }
}

/// The queue of runs created without one.
pub const DEFAULT_QUEUE: &str = "default";

/// What a claim asks for.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    pub runtime_id: String,
    /// Queues to take from, in order of preference; empty = every known queue.
    pub queues: Vec<String>,
    /// Only runs of these runners; empty = any runner.
    pub runner_ids: Vec<String>,
    pub lease: Duration,
    /// Scope filters (LangBot's claim arguments): only runs with these values.
    pub conversation_id: Option<String>,
    pub bot_id: Option<String>,
    pub workspace_id: Option<String>,
    /// Applies only with `strict_thread`; then `None` means runs without a thread.
    pub thread_id: Option<String>,
    pub strict_thread: bool,
}

impl ClaimRequest {
    pub fn new(runtime_id: impl Into<String>) -> Self {
        ClaimRequest {
            runtime_id: runtime_id.into(),
            queues: Vec::new(),
            runner_ids: Vec::new(),
            lease: Duration::from_secs(60),
            conversation_id: None,
            bot_id: None,
            workspace_id: None,
            thread_id: None,
            strict_thread: false,
        }
    }
    pub fn conversation(mut self, id: impl Into<String>) -> Self {
        self.conversation_id = Some(id.into());
        self
    }
    pub fn bot(mut self, id: impl Into<String>) -> Self {
        self.bot_id = Some(id.into());
        self
    }
    pub fn workspace(mut self, id: impl Into<String>) -> Self {
        self.workspace_id = Some(id.into());
        self
    }
    /// Only runs of this thread, or (`None`) only runs without a thread:
    /// sets `strict_thread` too, since a thread filter means nothing without it.
    pub fn thread(mut self, id: Option<impl Into<String>>) -> Self {
        self.thread_id = id.map(Into::into);
        self.strict_thread = true;
        self
    }
    pub fn strict_thread(mut self, strict: bool) -> Self {
        self.strict_thread = strict;
        self
    }
    /// True when a scope filter narrows the claim (the claim then walks its lanes).
    pub fn scoped(&self) -> bool {
        self.conversation_id.is_some() || self.bot_id.is_some() || self.workspace_id.is_some() || self.strict_thread
    }
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queues.push(queue.into());
        self
    }
    pub fn runner(mut self, runner: impl Into<String>) -> Self {
        self.runner_ids.push(runner.into());
        self
    }
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
}

/// One event of a run, as the seed's `_event_to_dict` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunEvent {
    /// The sequence again: an event is identified by run_id + sequence.
    pub id: i64,
    pub run_id: String,
    pub sequence: i64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: Value,
    pub usage: Option<Value>,
    pub created_at: i64,
    pub source: String,
    pub artifact_refs: Value,
    pub metadata: Value,
}

/// An event to append.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub sequence: i64,
    pub event_type: String,
    pub data: Value,
    pub usage: Option<Value>,
    pub source: String,
    pub artifact_refs: Vec<Value>,
    pub metadata: Option<Value>,
}

impl NewEvent {
    pub fn new(sequence: i64, event_type: impl Into<String>, data: Value) -> Self {
        NewEvent {
            sequence,
            event_type: event_type.into(),
            data,
            usage: None,
            source: "runner".into(),
            artifact_refs: Vec::new(),
            metadata: None,
        }
    }
    pub fn usage(mut self, usage: Value) -> Self {
        self.usage = Some(usage);
        self
    }
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }
    pub fn metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata);
        self
    }
}

impl RunEvent {
    pub(crate) fn from_entry(run_id: &str, sequence: i64, mut f: Fields) -> Result<RunEvent> {
        Ok(RunEvent {
            id: sequence,
            run_id: run_id.to_string(),
            sequence,
            event_type: f.required("type")?,
            data: f.json("data")?.unwrap_or_else(|| Value::Object(Default::default())),
            usage: f.json("usage")?,
            created_at: secs(f.int("created_at")?).unwrap_or(0),
            source: f.text("source").unwrap_or_else(|| "runner".into()),
            artifact_refs: f.json("artifact_refs")?.unwrap_or_else(|| Value::Array(Vec::new())),
            metadata: f.json("metadata")?.unwrap_or_else(|| Value::Object(Default::default())),
        })
    }
}

/// How to finish a run.
#[derive(Clone, Debug)]
pub struct Finish {
    pub status: RunStatus,
    pub status_reason: Option<String>,
    pub usage: Option<Value>,
    pub cost: Option<Value>,
    /// Merged into the run's metadata (top-level keys), as the seed does.
    pub metadata: Option<Value>,
}

impl Finish {
    pub fn new(status: RunStatus) -> Self {
        Finish { status, status_reason: None, usage: None, cost: None, metadata: None }
    }
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.status_reason = Some(reason.into());
        self
    }
    pub fn usage(mut self, usage: Value) -> Self {
        self.usage = Some(usage);
        self
    }
    pub fn cost(mut self, cost: Value) -> Self {
        self.cost = Some(cost);
        self
    }
    pub fn metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata);
        self
    }
}

/// A registered runtime, as the seed's `_runtime_to_dict` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Runtime {
    pub id: i64,
    pub runtime_id: String,
    /// The stored status, or `stale` once the heartbeat deadline has passed.
    pub status: String,
    pub display_name: Option<String>,
    pub endpoint: Option<String>,
    pub version: Option<String>,
    pub capabilities: Value,
    pub labels: Value,
    pub metadata: Value,
    pub last_heartbeat_at: Option<i64>,
    pub heartbeat_deadline_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Runtime {
    pub(crate) fn from_fields(mut f: Fields, now_ms: i64) -> Result<Runtime> {
        let deadline_ms = f.int("heartbeat_deadline_at")?;
        let mut status = f.required("status")?;
        if deadline_ms.is_some_and(|d| d < now_ms) {
            status = "stale".into();
        }
        let empty = || Value::Object(Default::default());
        Ok(Runtime {
            id: f.int("id")?.unwrap_or(0),
            runtime_id: f.required("runtime_id")?,
            status,
            display_name: f.text("display_name"),
            endpoint: f.text("endpoint"),
            version: f.text("version"),
            capabilities: f.json("capabilities")?.unwrap_or_else(empty),
            labels: f.json("labels")?.unwrap_or_else(empty),
            metadata: f.json("metadata")?.unwrap_or_else(empty),
            last_heartbeat_at: secs(f.int("last_heartbeat_at")?),
            heartbeat_deadline_at: secs(deadline_ms),
            created_at: secs(f.int("created_at")?).unwrap_or(0),
            updated_at: secs(f.int("updated_at")?).unwrap_or(0),
        })
    }
}

/// A runtime to register.
#[derive(Clone, Debug)]
pub struct RegisterRuntime {
    pub runtime_id: String,
    pub status: String,
    pub display_name: Option<String>,
    pub endpoint: Option<String>,
    pub version: Option<String>,
    pub capabilities: Option<Value>,
    pub labels: Option<Value>,
    pub metadata: Option<Value>,
    pub heartbeat_deadline: Duration,
}

impl RegisterRuntime {
    pub fn new(runtime_id: impl Into<String>) -> Self {
        RegisterRuntime {
            runtime_id: runtime_id.into(),
            status: "online".into(),
            display_name: None,
            endpoint: None,
            version: None,
            capabilities: None,
            labels: None,
            metadata: None,
            heartbeat_deadline: Duration::from_secs(60),
        }
    }
}

/// A heartbeat; `None` fields keep what is stored, metadata is merged.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    pub status: String,
    pub heartbeat_deadline: Duration,
    pub capabilities: Option<Value>,
    pub labels: Option<Value>,
    pub metadata: Option<Value>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            status: "online".into(),
            heartbeat_deadline: Duration::from_secs(60),
            capabilities: None,
            labels: None,
            metadata: None,
        }
    }
}

/// A page of runtimes (LangBot's `(items, total)`).
#[derive(Clone, Debug, Serialize)]
pub struct RuntimePage {
    pub items: Vec<Runtime>,
    /// Every runtime matching the filters, however many the page holds.
    pub total: usize,
}

/// One page of runs, newest first (LangBot's `(items, next_cursor, has_more, total)`).
#[derive(Clone, Debug, Serialize)]
pub struct RunPage {
    pub items: Vec<Run>,
    pub next_cursor: Option<i64>,
    pub has_more: bool,
    /// Every run matching the filters without `before_id`: the same on every page.
    pub total: u64,
}

/// Filters of `list_runs`; the seed's arguments.
#[derive(Clone, Debug, Default)]
pub struct RunFilter {
    /// Queues to list; empty = every known queue.
    pub queues: Vec<String>,
    pub conversation_id: Option<String>,
    pub statuses: Vec<RunStatus>,
    pub before_id: Option<i64>,
    pub limit: usize,
    pub bot_id: Option<String>,
    pub workspace_id: Option<String>,
    pub thread_id: Option<String>,
    pub strict_thread: bool,
    pub runner_id: Option<String>,
    pub binding_id: Option<String>,
}

/// One page of events (the seed's `(items, next_cursor, prev_cursor, has_more)`).
#[derive(Clone, Debug, Serialize)]
pub struct EventPage {
    pub items: Vec<RunEvent>,
    pub next_cursor: Option<i64>,
    pub prev_cursor: Option<i64>,
    pub has_more: bool,
}

/// Direction of an event page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Direction {
    #[default]
    Forward,
    Backward,
}

/// The larger of two optional ages.
fn oldest(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// The state of one queue, for operators.
#[derive(Clone, Debug, Serialize)]
pub struct QueueStats {
    pub queue_name: String,
    /// Unpinned queued runs that are due, with those waiting for a slot of their group.
    pub queued: i64,
    /// Of `queued`, the runs whose group is at its limit (or paused).
    pub waiting_for_group: i64,
    /// The queue is paused: claims hand out nothing.
    pub paused: bool,
    /// Groups of the queue that are paused.
    pub paused_groups: i64,
    pub pinned: i64,
    pub delayed: i64,
    pub claimed: i64,
    pub finished: i64,
    /// Retained runs that died: failed after their lease expired on the last
    /// of `max_attempts` (a subset of `finished`).
    pub dead: i64,
    /// Age in seconds of the oldest claimable run, if any.
    pub oldest_queued_age: Option<f64>,
    /// Runs created `running` (direct execution) and not finished yet; the
    /// reaper times them out after the store's `running_timeout`.
    pub running: i64,
    /// Seconds since the oldest of them started.
    pub oldest_running_age: Option<f64>,
    pub lease_holders: Vec<LeaseHolder>,
    /// Cumulative counters: created, completed, failed, cancelled, timeout, dead, reclaimed.
    pub counters: std::collections::BTreeMap<String, i64>,
    /// Runs in `queued` (unpinned, due) by runner_id.
    pub queued_by_runner: std::collections::BTreeMap<String, i64>,
    /// For a partition (`Q#i`), the logical queue `Q` it belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_of: Option<String>,
}

impl QueueStats {
    /// The physical queues of a `queue_overview`: without the merged row of
    /// a partitioned queue, which would count its partitions' runs twice.
    pub fn physical(rows: &[QueueStats]) -> Vec<&QueueStats> {
        let merged: std::collections::HashSet<&str> = rows.iter().filter_map(|s| s.partition_of.as_deref()).collect();
        rows.iter().filter(|s| !merged.contains(s.queue_name.as_str())).collect()
    }

    /// The stats of a logical queue: the sums of its partitions' stats
    /// (oldest age the largest, lease holders and counters merged).
    pub fn merged(queue_name: &str, parts: &[QueueStats]) -> QueueStats {
        let mut out = QueueStats {
            queue_name: queue_name.to_string(),
            queued: 0,
            waiting_for_group: 0,
            // Paused when every partition is (pause applies to them all).
            paused: !parts.is_empty(),
            paused_groups: 0,
            pinned: 0,
            delayed: 0,
            claimed: 0,
            finished: 0,
            dead: 0,
            oldest_queued_age: None,
            running: 0,
            oldest_running_age: None,
            lease_holders: Vec::new(),
            counters: Default::default(),
            queued_by_runner: Default::default(),
            partition_of: None,
        };
        for p in parts {
            out.queued += p.queued;
            out.waiting_for_group += p.waiting_for_group;
            out.paused &= p.paused;
            out.paused_groups = out.paused_groups.max(p.paused_groups);
            out.pinned += p.pinned;
            out.delayed += p.delayed;
            out.claimed += p.claimed;
            out.finished += p.finished;
            out.dead += p.dead;
            out.oldest_queued_age = oldest(out.oldest_queued_age, p.oldest_queued_age);
            out.running += p.running;
            out.oldest_running_age = oldest(out.oldest_running_age, p.oldest_running_age);
            out.lease_holders.extend(p.lease_holders.iter().cloned());
            for (k, v) in &p.counters {
                *out.counters.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &p.queued_by_runner {
                *out.queued_by_runner.entry(k.clone()).or_default() += v;
            }
        }
        out
    }
}

/// Who holds a run and until when.
#[derive(Clone, Debug, Serialize)]
pub struct LeaseHolder {
    pub run_id: String,
    pub runtime_id: String,
    pub claim_lease_expires_at: f64,
}

/// What one reaper pass did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ReapReport {
    pub promoted: i64,
    pub reclaimed: i64,
    pub timed_out: i64,
    pub purged: i64,
    pub stale_runtimes: i64,
    /// Runs pinned to a runtime that is gone, released to any runtime.
    pub pins_released: i64,
}
