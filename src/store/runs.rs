//! Run lifecycle: create, claim, renew, release, finalize, cancel, get.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::Value;

use super::locator::Reservation;
use super::partitions::placement_key;
use super::{Store, lock, reply};
use crate::error::{Error, Result};
use crate::keys::QueueKeys;
use crate::model::{ClaimRequest, Finish, NewRun, Run, RunStatus};
use crate::validate;

/// What one claim attempt on one queue found.
#[derive(Debug)]
pub enum ClaimOutcome {
    Claimed(Box<Run>),
    /// Nothing claimable; `next_due_ms` is when a delayed run or a lease falls
    /// due, `now_ms` the server's clock when the claim ran.
    Empty {
        next_due_ms: Option<i64>,
        now_ms: i64,
    },
}

/// How many times a create places runs of a partitioned queue whose group
/// setting changed under it (see `partitions.rs`) before it gives up.
const PLACEMENT_TRIES: u32 = 5;

/// The most runs one `create_runs` call takes: a batch is validated whole
/// and held in memory before anything is sent.
pub const MAX_RUNS_PER_BATCH: usize = 10_000;

/// A claim that was sent but never answered (the connection broke or the
/// reply timed out): it may have claimed a run that nobody knows of. The
/// store's next claim sends it again with the same token, and the script's
/// receipt (see lua/claim_next_run.lua) hands back that run.
pub(crate) struct Unanswered {
    queue: String,
    spec: Vec<String>,
    sent: Instant,
    /// The lease's end: after it, a run it claimed is taken back anyway.
    until: Instant,
}

/// How a claim is given back.
#[derive(Clone, Debug)]
pub struct Release {
    /// `Queued` (default) or a terminal status.
    pub status: RunStatus,
    pub status_reason: Option<String>,
    /// With `Queued`: claimable again only after this delay.
    pub retry_in: Option<Duration>,
    /// When given, the claim must be held by this runtime too (LangBot's
    /// `runtime_id` argument); else [`Error::StaleToken`].
    pub runtime_id: Option<String>,
}

impl Default for Release {
    fn default() -> Self {
        Release { status: RunStatus::Queued, status_reason: None, retry_in: None, runtime_id: None }
    }
}

/// Checks a claim request; returns its lease in ms.
fn check_claim(request: &ClaimRequest) -> Result<u64> {
    validate::id("runtime_id", &request.runtime_id)?;
    for runner in &request.runner_ids {
        validate::id("runner_id", runner)?;
    }
    for (name, value) in [
        ("conversation_id", &request.conversation_id),
        ("bot_id", &request.bot_id),
        ("workspace_id", &request.workspace_id),
        ("thread_id", &request.thread_id),
    ] {
        validate::opt_id(name, value.as_deref())?;
    }
    validate::lease_ms("lease", request.lease)
}

/// A run to create with its position in the caller's list and its script values.
type Indexed<'a> = (usize, (&'a NewRun, [String; 18]));

/// The run exactly as create_run.lua stores it (epoch ms rounded to seconds).
fn new_run_record(new: &NewRun, id: i64, now_ms: i64) -> Run {
    let status = new.status.unwrap_or(RunStatus::Queued);
    let secs = |ms: i64| ms.div_euclid(1000);
    let ms = |s: f64| (s * 1000.0).round() as i64;
    Run {
        id,
        run_id: new.run_id.clone(),
        event_id: new.event_id.clone(),
        agent_id: new.agent_id.clone(),
        binding_id: new.binding_id.clone(),
        runner_id: new.runner_id.clone(),
        conversation_id: new.conversation_id.clone(),
        thread_id: new.thread_id.clone(),
        workspace_id: new.workspace_id.clone(),
        bot_id: new.bot_id.clone(),
        status,
        status_reason: None,
        queue_name: new.queue_name().to_string(),
        priority: new.priority,
        requested_runtime_id: new.requested_runtime_id.clone(),
        claimed_by_runtime_id: None,
        claim_token: None,
        claim_lease_expires_at: None,
        dispatch_attempts: 0,
        last_claimed_at: None,
        created_at: secs(now_ms),
        started_at: (status == RunStatus::Running).then_some(secs(now_ms)),
        finished_at: None,
        updated_at: secs(now_ms),
        deadline_at: new.deadline_at.map(|s| secs(ms(s))),
        cancel_requested_at: None,
        usage: None,
        cost: None,
        metadata: new.metadata.clone().unwrap_or_else(|| Value::Object(Default::default())),
        not_before: new.not_before.map(|s| secs(ms(s))),
        max_attempts: (new.max_attempts > 0).then_some(i64::from(new.max_attempts)),
        authorization: None,
        group_key: None,
        claim_lease_expires_at_ms: None,
        created_at_ms: now_ms,
        last_sequence: 0,
        claim_sent_at: None,
    }
}

fn opt(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}

/// The scripts' thread filter: '' = any thread (no strict_thread, as in the
/// seed), '-' = runs without a thread, '=' + id = that thread.
pub(crate) fn thread_filter(strict: bool, thread_id: Option<&str>) -> String {
    match (strict, thread_id) {
        (false, _) => String::new(),
        (true, None) => "-".into(),
        (true, Some(t)) => format!("={t}"),
    }
}

impl Store {
    /// Checks one run and returns its 18 script values (see lua/create_run.lua).
    fn create_values(&self, run: &NewRun) -> Result<[String; 18]> {
        validate::id("queue_name", run.queue_name())?;
        validate::id("run_id", &run.run_id)?;
        validate::id("runner_id", &run.runner_id)?;
        for (name, value) in [
            ("event_id", &run.event_id),
            ("binding_id", &run.binding_id),
            ("conversation_id", &run.conversation_id),
            ("thread_id", &run.thread_id),
            ("workspace_id", &run.workspace_id),
            ("bot_id", &run.bot_id),
            ("agent_id", &run.agent_id),
            ("requested_runtime_id", &run.requested_runtime_id),
            ("group_key", &run.group_key),
        ] {
            validate::opt_id(name, value.as_deref())?;
        }
        validate::priority(run.priority)?;
        let status = run.status.unwrap_or(RunStatus::Queued);
        // Every status LangBot's store takes at create, terminal ones too (its stats tests
        // create failed runs); not `claimed`: only a claim makes a holder and a lease.
        if status == RunStatus::Claimed {
            return Err(Error::Invalid(
                "a new run's status cannot be claimed (claim_next_run claims a queued run); use queued, running, created or a terminal status".into(),
            ));
        }
        let max = self.max_json();
        let authorization = validate::opt_object("authorization", run.authorization.as_ref(), max)?;
        let metadata = validate::opt_object("metadata", run.metadata.as_ref(), max)?;
        let deadline = run.deadline_at.map(|s| validate::epoch_ms("deadline_at", s)).transpose()?;
        let not_before = run.not_before.map(|s| validate::epoch_ms("not_before", s)).transpose()?;
        Ok([
            run.run_id.clone(),
            opt(&run.event_id),
            opt(&run.binding_id),
            run.runner_id.clone(),
            opt(&run.conversation_id),
            opt(&run.thread_id),
            opt(&run.workspace_id),
            opt(&run.bot_id),
            opt(&run.agent_id),
            deadline.map(|d| d.to_string()).unwrap_or_default(),
            authorization,
            metadata,
            status.as_str().to_string(),
            run.priority.to_string(),
            opt(&run.requested_runtime_id),
            not_before.map(|d| d.to_string()).unwrap_or_default(),
            run.max_attempts.to_string(),
            opt(&run.group_key),
        ])
    }

    /// One create_run call for runs of one queue.
    /// `placed_by`: the `group_by` a partition's runs were placed by, which
    /// the script checks (None: not a partition, nothing to check).
    fn create_call(
        &self,
        queue: &str,
        (number, fresh): (u32, bool),
        placed_by: Option<&str>,
        runs: &[Indexed<'_>],
    ) -> (Vec<String>, Vec<String>) {
        let keys = self.queue_keys(queue);
        let mut k: Vec<String> = keys.fixed().into();
        k.push(keys.meta());
        let mut args = Vec::with_capacity(6 + runs.len() * 18);
        args.extend([
            keys.base.clone(),
            queue.to_string(),
            self.max_json().to_string(),
            number.to_string(),
            if fresh { "1" } else { "0" }.to_string(),
            placed_by.unwrap_or("-").to_string(),
        ]);
        for (_, (run, values)) in runs {
            k.push(keys.run(&run.run_id));
            args.extend(values.iter().cloned());
        }
        if self.locators_in_script() {
            k.extend(runs.iter().map(|(_, (run, _))| self.global().locator(&run.run_id)));
        }
        (k, args)
    }

    /// The created run: read back when it already existed, else assembled from
    /// the request and the id and time the script assigned (a smaller reply);
    /// `Err(queue)` when the script found the run id's locator naming another queue.
    fn created(&self, new: &NewRun, value: redis::Value) -> Result<std::result::Result<Run, String>> {
        let mut parts = reply::array(value)?.into_iter();
        let code = parts.next().map(reply::int).transpose()?.unwrap_or(0);
        if code == 2 {
            let queue = parts.next().map(reply::string).transpose()?;
            return queue.map(Err).ok_or_else(|| Error::Protocol("create_run: no queue for a held run id".into()));
        }
        let run = if code == 1 {
            let id =
                parts.next().map(reply::int).transpose()?.ok_or_else(|| Error::Protocol("create_run: no id".into()))?;
            let now = parts.next().map(reply::int).transpose()?.unwrap_or(0);
            let group = parts.next().map(reply::string).transpose()?.filter(|g| !g.is_empty());
            Run { group_key: group, ..new_run_record(new, id, now) }
        } else {
            let fields = parts.next().ok_or_else(|| Error::Protocol("create_run: short reply".into()))?;
            Run::from_fields(reply::fields(fields)?, false)?
        };
        self.remember(&run.run_id, &run.queue_name);
        Ok(Ok(run))
    }

    /// Creates a run unless one with this run_id exists, in any queue; either
    /// way returns the stored run (the seed's create_run).
    pub async fn create_run(&self, run: &NewRun) -> Result<Run> {
        let mut runs = self.create_runs(std::slice::from_ref(run)).await?;
        runs.pop().ok_or_else(|| Error::Protocol("create_run: empty reply".into()))
    }

    /// Creates many runs in one round trip on a single server, two on a
    /// cluster (the run id locators first, see `locator.rs`): one script call per queue and per 100 runs,
    /// pipelined per queue (short scripts: Redis serves nobody else while
    /// one runs, and 500 runs took 10-20 ms). Every run is validated before anything is sent;
    /// results come back in the order given. A run id that exists in another
    /// queue (or comes twice in the batch) gives the run that holds it.
    pub async fn create_runs(&self, runs: &[NewRun]) -> Result<Vec<Run>> {
        if runs.len() > MAX_RUNS_PER_BATCH {
            return Err(Error::Invalid(format!(
                "at most {MAX_RUNS_PER_BATCH} runs per create_runs call, got {}",
                runs.len()
            )));
        }
        // A partition refuses runs placed by a group setting it no longer has
        // (MISPLACED, nothing written): placed again by the setting read anew.
        // Runs an earlier attempt created are returned as existing ones.
        let mut fresh = false;
        for attempt in 0..PLACEMENT_TRIES {
            match self.create_placed(runs, fresh).await {
                Err(Error::Redis(e)) if e.code() == Some("MISPLACED") => {
                    fresh = true;
                    // set_groups sets the partitions one after another: give it time to reach them all.
                    tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt + 1))).await;
                }
                other => return other,
            }
        }
        let queues: Vec<&str> = runs.iter().map(NewRun::queue_name).collect();
        Err(Error::Conflict(format!(
            "the group settings of a partitioned queue ({}) kept changing while its runs were placed; nothing more was created, send the same create again",
            queues.join(", ")
        )))
    }

    /// [`Store::create_runs`] with the runs of partitioned queues placed by
    /// their queue's `group_by` (read anew with `fresh`).
    async fn create_placed(&self, runs: &[NewRun], fresh: bool) -> Result<Vec<Run>> {
        const PER_CALL: usize = 100;
        // Runs sent to a partitioned queue go to one of its partitions.
        let counts = self.partition_counts().await?;
        let placed: Vec<NewRun>;
        // Physical queue -> the group_by its runs were placed by, which its create checks.
        let mut placed_by: HashMap<String, String> = HashMap::new();
        let runs = if runs.iter().any(|r| counts.get(r.queue_name()).is_some_and(|&p| p > 1)) {
            let mut group_by: HashMap<&str, String> = HashMap::new();
            for r in runs {
                let queue = r.queue_name();
                if counts.get(queue).is_some_and(|&p| p > 1) && !group_by.contains_key(queue) {
                    group_by.insert(queue, self.partition_group_by(queue, fresh).await?);
                }
            }
            placed = runs
                .iter()
                .map(|r| match group_by.get(r.queue_name()) {
                    Some(by) => {
                        let physical = Self::place(&counts, r.queue_name(), placement_key(r, by));
                        placed_by.insert(physical.clone(), by.clone());
                        NewRun { queue: Some(physical), ..r.clone() }
                    }
                    None => r.clone(),
                })
                .collect();
            &placed[..]
        } else {
            runs
        };
        let mut values = Vec::with_capacity(runs.len());
        for run in runs {
            values.push(self.create_values(run)?);
        }
        // The queue each distinct run id is created in: the first that names it.
        let mut owners: Vec<(&str, &str)> = Vec::new();
        let mut owner_of: HashMap<&str, usize> = HashMap::new();
        for run in runs {
            if !owner_of.contains_key(run.run_id.as_str()) {
                owner_of.insert(&run.run_id, owners.len());
                owners.push((&run.run_id, run.queue_name()));
            }
        }
        let reservations = self.reserve(&owners).await?;
        // Runs to create, grouped by queue, each with its position in `runs`.
        let mut by_queue: Vec<(&str, Vec<Indexed<'_>>)> = Vec::new();
        for (i, (run, values)) in runs.iter().zip(values).enumerate() {
            let owner = owner_of[run.run_id.as_str()];
            if !matches!(reservations[owner], Reservation::Ours | Reservation::Taken)
                || owners[owner].1 != run.queue_name()
            {
                continue;
            }
            let queue = run.queue_name();
            match by_queue.iter_mut().find(|(q, _)| *q == queue) {
                Some((_, group)) => group.push((i, (run, values))),
                None => by_queue.push((queue, vec![(i, (run, values))])),
            }
        }
        let mut out: Vec<Option<Run>> = vec![None; runs.len()];
        // Run ids whose locator the create script found naming another queue.
        let mut held_by: Vec<Option<String>> = vec![None; runs.len()];
        // Queues live in different slots: their calls go out side by side.
        let replies =
            join_all(by_queue.iter().map(|(queue, group)| {
                self.create_in(queue, group, PER_CALL, placed_by.get(*queue).map(String::as_str))
            }))
            .await;
        // A queue that refused its runs (a cap, a placement by an old group
        // setting) wrote nothing: the locators taken for them go too, so that
        // nothing of the refused create remains.
        for (result, (queue, group)) in replies.iter().zip(&by_queue) {
            let refused = match result {
                Err(Error::QueueFull(_)) => true,
                Err(Error::Redis(e)) => e.code() == Some("MISPLACED"),
                _ => false,
            };
            if refused {
                let taken: Vec<String> = group
                    .iter()
                    .filter(|(_, (run, _))| matches!(reservations[owner_of[run.run_id.as_str()]], Reservation::Taken))
                    .map(|(_, (run, _))| run.run_id.clone())
                    .collect();
                self.drop_locators(queue, &taken).await?;
            }
        }
        for (values, (_, group)) in replies.into_iter().zip(&by_queue) {
            let order = group.chunks(PER_CALL).map(|chunk| chunk.iter().map(|(i, _)| *i).collect::<Vec<_>>());
            for (value, indexes) in values?.into_iter().zip(order) {
                let replies = reply::array(value)?;
                if replies.len() != indexes.len() {
                    return Err(Error::Protocol("create_run: reply does not match the runs sent".into()));
                }
                for (reply, i) in replies.into_iter().zip(indexes) {
                    match self.created(&runs[i], reply)? {
                        Ok(run) => out[i] = Some(run),
                        Err(queue) => held_by[i] = Some(queue),
                    }
                }
            }
        }
        // Run ids held elsewhere: the run of the queue that holds them.
        for (i, run) in runs.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            let owner = owner_of[run.run_id.as_str()];
            let holder = runs
                .iter()
                .enumerate()
                .find(|(j, r)| r.run_id == run.run_id && held_by[*j].is_some())
                .and_then(|(j, _)| held_by[j].as_deref());
            let queue = match (&reservations[owner], holder) {
                (_, Some(queue)) => queue,
                (Reservation::Elsewhere(queue), None) => queue.as_str(),
                (Reservation::Ours | Reservation::Taken, None) => owners[owner].1,
            };
            let first = runs.iter().position(|r| r.run_id == run.run_id && r.queue_name() == queue);
            out[i] = match first.and_then(|j| out[j].clone()) {
                Some(existing) => Some(existing),
                None => Some(self.existing_run(&run.run_id, queue).await?),
            };
        }
        out.into_iter().map(|r| r.ok_or_else(|| Error::Protocol("create_run: missing reply".into()))).collect()
    }

    /// The create_run calls of one queue, `per_call` runs each, pipelined.
    /// A queue the server no longer knows (it restarted without its data)
    /// is registered again and the calls sent once more.
    async fn create_in(
        &self,
        queue: &str,
        group: &[Indexed<'_>],
        per_call: usize,
        placed_by: Option<&str>,
    ) -> Result<Vec<redis::Value>> {
        let mut number = self.queue_number_fresh(queue).await?;
        for attempt in 0..2 {
            let calls: Vec<_> =
                group.chunks(per_call).map(|chunk| self.create_call(queue, number, placed_by, chunk)).collect();
            let sent = match calls.len() {
                1 => self.eval(&self.scripts().create_run, &calls[0].0, &calls[0].1).await.map(|v| vec![v]),
                _ => self.eval_many(&self.scripts().create_run, &calls).await,
            };
            match sent {
                Err(Error::Redis(e)) if e.code() == Some("UNREGISTERED") && attempt == 0 => {
                    self.forget_queue(queue);
                    number = (self.register_queue(queue).await?, true);
                }
                other => return other,
            }
        }
        Err(Error::Protocol(format!("queue {queue} could not be registered")))
    }

    /// The run a locator names in another queue. Its create may still be on
    /// its way (the locator is taken first), so a missing run is looked for a
    /// few more times before the create gives up.
    async fn existing_run(&self, run_id: &str, queue: &str) -> Result<Run> {
        for attempt in 0..20 {
            match self.read_run(run_id, queue).await {
                Err(Error::NotFound(_)) if attempt < 19 => tokio::time::sleep(Duration::from_millis(25)).await,
                Err(Error::NotFound(_)) => break,
                other => {
                    self.remember(run_id, queue);
                    return other;
                }
            }
        }
        Err(Error::Conflict(format!(
            "run id {run_id} is held by queue {queue}, where its create has not completed; \
             repeat that create (same queue) to complete it"
        )))
    }

    /// Claims the next run for a runtime from the request's queues, in order
    /// (the seed's claim_next_run). `None` when nothing is claimable.
    pub async fn claim_next_run(&self, request: &ClaimRequest) -> Result<Option<Run>> {
        // Checked up front too: with no queue to try, a bad request must still fail.
        check_claim(request)?;
        let queues = if request.queues.is_empty() {
            self.known_queues().await?
        } else {
            self.claim_order(&request.queues).await?
        };
        for queue in &queues {
            if let ClaimOutcome::Claimed(run) = self.claim_from(queue, request).await? {
                return Ok(Some(*run));
            }
        }
        Ok(None)
    }

    /// One claim attempt on one queue. An earlier claim of this store that
    /// went unanswered is settled first: the run it claimed, if any, is
    /// returned instead.
    pub async fn claim_from(&self, queue: &str, request: &ClaimRequest) -> Result<ClaimOutcome> {
        validate::id("queue_name", queue)?;
        let spec = self.claim_spec(request)?;
        if let Some(run) = self.settle_unanswered().await? {
            return Ok(ClaimOutcome::Claimed(run));
        }
        self.send_claim(queue, spec, Instant::now()).await
    }

    /// Sends one claim; `sent` is when it was first sent (its lease counts from then).
    async fn send_claim(&self, queue: &str, spec: Vec<String>, sent: Instant) -> Result<ClaimOutcome> {
        let keys = self.queue_keys(queue);
        let mut args = vec![keys.base.clone()];
        args.extend(spec.iter().cloned());
        match self.eval(&self.scripts().claim_next_run, &keys.fixed(), &args).await {
            Ok(value) => self.claim_outcome(value, sent),
            Err(e) => {
                if e.is_transient() {
                    self.unanswered(queue, spec, sent);
                }
                Err(e)
            }
        }
    }

    /// Remembers a claim whose answer was lost, to be settled by the next claim.
    fn unanswered(&self, queue: &str, spec: Vec<String>, sent: Instant) {
        let lease = spec.get(1).and_then(|ms| ms.parse().ok()).map(Duration::from_millis).unwrap_or_default();
        tracing::debug!(queue, "claim unanswered; it is sent again with the next claim");
        lock(&self.inner.unanswered).push(Unanswered { queue: queue.to_string(), spec, sent, until: sent + lease });
    }

    /// Sends the unanswered claims again (same tokens): the first that had
    /// claimed a run hands it back. Those whose lease ran out are dropped.
    async fn settle_unanswered(&self) -> Result<Option<Box<Run>>> {
        let pending = std::mem::take(&mut *lock(&self.inner.unanswered));
        let mut pending = pending.into_iter();
        while let Some(claim) = pending.next() {
            if claim.until <= Instant::now() {
                continue;
            }
            let settled = self.send_claim(&claim.queue, claim.spec, claim.sent).await;
            if !matches!(settled, Ok(ClaimOutcome::Empty { .. })) {
                lock(&self.inner.unanswered).extend(pending.by_ref());
            }
            match settled {
                Ok(ClaimOutcome::Claimed(run)) => return Ok(Some(run)),
                Ok(ClaimOutcome::Empty { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// The claim spec of the scripts: runtime_id, lease ms, a new token,
    /// retention ms, the scope filters, runner ids (see lua/claim_next_run.lua).
    fn claim_spec(&self, request: &ClaimRequest) -> Result<Vec<String>> {
        let lease = check_claim(request)?;
        let mut spec = vec![
            request.runtime_id.clone(),
            lease.to_string(),
            uuid::Uuid::new_v4().simple().to_string(),
            self.retention_ms(),
            opt(&request.conversation_id),
            opt(&request.bot_id),
            opt(&request.workspace_id),
            thread_filter(request.strict_thread, request.thread_id.as_deref()),
        ];
        spec.extend(request.runner_ids.iter().cloned());
        Ok(spec)
    }

    /// Reads a claim reply: {1, HGETALL, last sequence} or {0, next due}.
    fn claim_outcome(&self, value: redis::Value, sent: Instant) -> Result<ClaimOutcome> {
        let mut parts = reply::array(value)?.into_iter();
        let claimed = parts.next().map(reply::int).transpose()?.unwrap_or(0);
        let rest = parts.next().ok_or_else(|| Error::Protocol("claim: short reply".into()))?;
        if claimed == 1 {
            let mut run = Run::from_fields(reply::fields(rest)?, true)?;
            run.last_sequence = parts.next().map(reply::int).transpose()?.unwrap_or(0);
            run.claim_sent_at = Some(sent);
            self.remember(&run.run_id, &run.queue_name);
            Ok(ClaimOutcome::Claimed(Box::new(run)))
        } else {
            let next_due_ms = reply::opt_int(rest)?;
            let now_ms = parts.next().map(reply::int).transpose()?.unwrap_or(0);
            Ok(ClaimOutcome::Empty { next_due_ms, now_ms })
        }
    }

    /// Extends the lease of a claim still held with `claim_token`. The result's
    /// `cancel_requested_at` tells the holder a cancellation was asked for.
    pub async fn renew_claim(&self, run_id: &str, claim_token: &str, lease: Duration) -> Result<Run> {
        self.renew_claim_by(run_id, claim_token, None, lease).await
    }

    /// Like [`Store::renew_claim`]; with `runtime_id` the claim must also be
    /// held by that runtime (an active claim in LangBot's sense).
    pub async fn renew_claim_by(
        &self,
        run_id: &str,
        claim_token: &str,
        runtime_id: Option<&str>,
        lease: Duration,
    ) -> Result<Run> {
        let lease = validate::lease_ms("lease", lease)?;
        validate::opt_id("runtime_id", runtime_id)?;
        let (keys, k) = self.run_keys(run_id).await?;
        let args = vec![
            keys.base.clone(),
            run_id.to_string(),
            claim_token.to_string(),
            lease.to_string(),
            self.retention_ms(),
            runtime_id.unwrap_or_default().to_string(),
        ];
        let value = self.eval(&self.scripts().renew_claim, &k, &args).await?;
        // The holder has its token already: only a claim hands it out.
        Run::from_fields(reply::fields(value)?, false)
    }

    /// Gives a claim back: to the queue (optionally after a delay) or to a
    /// terminal status.
    pub async fn release_claim(&self, run_id: &str, claim_token: &str, release: &Release) -> Result<Run> {
        if let Some(reason) = &release.status_reason {
            validate::text("status_reason", reason, 4096)?;
        }
        if release.status != RunStatus::Queued && !release.status.is_terminal() {
            return Err(Error::Invalid(format!("release status must be queued or terminal, got {}", release.status)));
        }
        validate::opt_id("runtime_id", release.runtime_id.as_deref())?;
        let delay = release.retry_in.map(|d| d.as_millis() as u64).unwrap_or(0);
        let (keys, k) = self.run_keys(run_id).await?;
        let args = vec![
            keys.base.clone(),
            run_id.to_string(),
            claim_token.to_string(),
            release.status.as_str().to_string(),
            opt(&release.status_reason),
            delay.to_string(),
            self.retention_ms(),
            opt(&release.runtime_id),
        ];
        let value = self.eval(&self.scripts().release_claim, &k, &args).await?;
        let run = Run::from_fields(reply::fields(value)?, false)?;
        if run.status.is_terminal() {
            self.expire_locators(std::slice::from_ref(&run.run_id)).await?;
        }
        Ok(run)
    }

    /// True when the run is held with `claim_token` (by `runtime_id`, when
    /// given) under a lease that has not expired by the server's clock: the
    /// active claim that renew, release, events and a fenced finish require.
    /// False for a run that does not exist. LangBot's `validate_active_claim`.
    pub async fn validate_active_claim(
        &self,
        run_id: &str,
        runtime_id: Option<&str>,
        claim_token: &str,
    ) -> Result<bool> {
        validate::id("run_id", run_id)?;
        validate::opt_id("runtime_id", runtime_id)?;
        if claim_token.is_empty() {
            return Err(Error::Invalid("claim token must not be empty".into()));
        }
        let k = match self.run_keys(run_id).await {
            Ok((_, k)) => k,
            Err(Error::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let args = vec![run_id.to_string(), claim_token.to_string(), runtime_id.unwrap_or_default().to_string()];
        let value = self.eval(&self.scripts().validate_active_claim, &k[7..8], &args).await?;
        Ok(reply::int(value)? == 1)
    }

    /// Takes back claims whose lease expired (the seed's release_expired_claims),
    /// over the given queues (empty = all). `now_ms` overrides the server clock.
    pub async fn release_expired_claims(
        &self,
        queues: &[String],
        now_ms: Option<i64>,
        status: RunStatus,
        status_reason: &str,
        limit: usize,
    ) -> Result<Vec<Run>> {
        if status != RunStatus::Queued && !status.is_terminal() {
            return Err(Error::Invalid(format!("status must be queued or terminal, got {status}")));
        }
        validate::text("status_reason", status_reason, 4096)?;
        let limit = limit.clamp(1, 500);
        let queues = if queues.is_empty() { self.known_queues().await? } else { self.physical_queues(queues).await? };
        let mut out = Vec::new();
        for queue in &queues {
            if out.len() >= limit {
                break;
            }
            let keys = self.queue_keys(queue);
            let args = vec![
                keys.base.clone(),
                now_ms.map(|n| n.to_string()).unwrap_or_default(),
                status.as_str().to_string(),
                status_reason.to_string(),
                (limit - out.len()).to_string(),
                self.retention_ms(),
            ];
            let value = self.eval(&self.scripts().release_expired_claims, &keys.fixed(), &args).await?;
            for item in reply::array(value)? {
                out.push(Run::from_fields(reply::fields(item)?, false)?);
            }
        }
        let finished: Vec<String> = out.iter().filter(|r| r.status.is_terminal()).map(|r| r.run_id.clone()).collect();
        self.expire_locators(&finished).await?;
        Ok(out)
    }

    /// Finishes a run (the seed's finalize_run, terminal statuses only). With a
    /// token it is fenced: a lost claim gives [`Error::StaleToken`]. Finishing
    /// a finished run again with the same status returns it unchanged; another
    /// status is [`Error::Conflict`].
    pub async fn finalize_run(&self, run_id: &str, finish: &Finish, claim_token: Option<&str>) -> Result<Run> {
        self.finalize(run_id, finish, claim_token, false, None)
            .await?
            .0
            .ok_or_else(|| Error::Protocol("finalize: reply without the run".into()))
    }

    /// Like [`Store::finalize_run`] but the reply leaves the run out: for
    /// workers, which do not read it back (a smaller reply, less Redis CPU).
    pub async fn finish_run(&self, run_id: &str, finish: &Finish, claim_token: Option<&str>) -> Result<()> {
        self.finalize(run_id, finish, claim_token, true, None).await.map(|_| ())
    }

    /// Finishes a run and claims the next run of the same queue for `next`, in
    /// one round trip. The claim happens only when this call finished the run
    /// (not on an idempotent repeat); `None` then, or when nothing is claimable.
    pub async fn finish_and_claim(
        &self,
        run_id: &str,
        finish: &Finish,
        claim_token: Option<&str>,
        next: &ClaimRequest,
    ) -> Result<Option<Run>> {
        match self.finalize(run_id, finish, claim_token, true, Some(next)).await?.1 {
            Some(ClaimOutcome::Claimed(run)) => Ok(Some(*run)),
            _ => Ok(None),
        }
    }

    async fn finalize(
        &self,
        run_id: &str,
        finish: &Finish,
        claim_token: Option<&str>,
        quiet: bool,
        next: Option<&ClaimRequest>,
    ) -> Result<(Option<Run>, Option<ClaimOutcome>)> {
        if !finish.status.is_terminal() {
            return Err(Error::Invalid(format!(
                "finalize status must be completed, failed, cancelled or timeout, got {}",
                finish.status
            )));
        }
        if let Some(reason) = &finish.status_reason {
            validate::text("status_reason", reason, 4096)?;
        }
        let max = self.max_json();
        let usage = validate::opt_object("usage", finish.usage.as_ref(), max)?;
        let cost = validate::opt_object("cost", finish.cost.as_ref(), max)?;
        if let Some(m) = &finish.metadata {
            validate::object("metadata", m, max)?;
        }
        let queue = self.locate(run_id).await?;
        let (keys, mut k) = self.run_keys(run_id).await?;
        // On one server the finish gives the run's locator its TTL itself.
        let locator_in_script = self.locators_in_script();
        if locator_in_script {
            k.push(self.global().locator(run_id));
        }
        // One token for the chained claim, however often the call is sent.
        let spec = next.map(|request| self.claim_spec(request)).transpose()?;
        for _ in 0..20 {
            let (flag, expected, merged) = match &finish.metadata {
                None => ("0", String::new(), String::new()),
                Some(patch) => {
                    let (expected, merged) = self.merged_metadata(&k[7], Some((&keys, run_id)), patch).await?;
                    ("1", expected, merged)
                }
            };
            let mut args = vec![
                keys.base.clone(),
                run_id.to_string(),
                finish.status.as_str().to_string(),
                opt(&finish.status_reason),
                usage.clone(),
                cost.clone(),
                flag.to_string(),
                expected,
                merged,
                claim_token.unwrap_or_default().to_string(),
                max.to_string(),
                self.retention_ms(),
                if quiet { "1" } else { "0" }.to_string(),
            ];
            if let Some(spec) = &spec {
                args.extend(spec.iter().cloned());
            }
            let sent = Instant::now();
            match self.eval_raw(&self.scripts().finalize_run, &k, &args).await {
                Ok(value) => {
                    let mut parts = reply::array(value)?.into_iter();
                    let finished_now = parts.next().map(reply::int).transpose()? == Some(1);
                    let fields = parts.next().ok_or_else(|| Error::Protocol("finalize: short reply".into()))?;
                    let run = if quiet { None } else { Some(Run::from_fields(reply::fields(fields)?, false)?) };
                    let claimed = match parts.next() {
                        Some(redis::Value::Int(0)) | None => None,
                        Some(v) => Some(self.claim_outcome(v, sent)?),
                    };
                    let purged = parts.map(reply::string).collect::<Result<Vec<_>>>()?;
                    if finished_now {
                        let expire = (!locator_in_script).then_some(run_id);
                        if quiet {
                            self.settle_locators_soon(&queue, expire, purged);
                        } else {
                            if let Some(run_id) = expire {
                                self.expire_locators(&[run_id.to_string()]).await?;
                            }
                            self.drop_locators(&queue, &purged).await?;
                        }
                    }
                    return Ok((run, claimed));
                }
                Err(e) if Error::is_retry(&e) => continue,
                Err(e) => {
                    let e = self.failed(e);
                    if let Some(spec) = spec.filter(|_| e.is_transient()) {
                        // The finish may have landed and claimed the next run.
                        self.unanswered(&queue, spec, sent);
                    }
                    return Err(e);
                }
            }
        }
        Err(Error::Conflict(format!("metadata of run {run_id} kept changing; finalize gave up")))
    }

    /// Reads a hash's `metadata` (from the docs of `run`, a run's queue keys
    /// and id, when the hash holds a mark: see [`crate::keys::DOCS_MARK`]) and
    /// merges `patch` into it (top-level keys). Returns (what was read, the
    /// merged JSON) for the script's compare-and-set.
    pub(crate) async fn merged_metadata(
        &self,
        key: &str,
        run: Option<(&QueueKeys, &str)>,
        patch: &Value,
    ) -> Result<(String, String)> {
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(key).arg("metadata");
        if let Some((keys, run_id)) = run {
            pipe.cmd("HGET").arg(keys.docs_hash()).arg(crate::keys::doc_field("metadata", run_id));
            pipe.cmd("GET").arg(keys.doc("metadata", run_id));
        }
        let read: Vec<Option<String>> = pipe.query_async(&mut conn).await.map_err(|e| self.failed(e))?;
        let mut read = read.into_iter();
        let stored = read.next().flatten().unwrap_or_default();
        let current = crate::keys::doc_text(stored, read.next().flatten(), read.next().flatten());
        let mut merged = match serde_json::from_str::<Value>(&current) {
            Ok(Value::Object(map)) => map,
            _ => Default::default(),
        };
        if let Value::Object(patch) = patch {
            for (k, v) in patch {
                merged.insert(k.clone(), v.clone());
            }
        }
        let merged = validate::sized("metadata", &Value::Object(merged), self.max_json())?;
        Ok((current, merged))
    }

    /// Cancels a queued run at once; for a claimed run records the request and
    /// notifies the worker holding it. A finished run is returned unchanged.
    pub async fn request_cancel(&self, run_id: &str, status_reason: Option<&str>) -> Result<Run> {
        if let Some(reason) = status_reason {
            validate::text("status_reason", reason, 4096)?;
        }
        let (keys, mut k) = self.run_keys(run_id).await?;
        k.push(keys.cancel_channel());
        let args = vec![
            keys.base.clone(),
            run_id.to_string(),
            status_reason.unwrap_or_default().to_string(),
            self.retention_ms(),
            self.publish_command().to_string(),
        ];
        let value = self.eval(&self.scripts().request_cancel, &k, &args).await?;
        let run = Run::from_fields(reply::fields(value)?, false)?;
        if run.status.is_terminal() {
            self.expire_locators(std::slice::from_ref(&run.run_id)).await?;
        }
        Ok(run)
    }

    /// One run by run_id (the claim token is never shown): its locator, then its hash.
    pub async fn get_run(&self, run_id: &str) -> Result<Run> {
        let queue = self.locate(run_id).await?;
        self.read_run(run_id, &queue).await
    }

    async fn read_run(&self, run_id: &str, queue: &str) -> Result<Run> {
        Run::from_fields(self.run_hash(run_id, queue).await?, false)
    }

    /// A run's hash, with its long documents read back from the docs hash
    /// (or an earlier build's doc keys; see `crate::keys::DOCUMENTS`), in one
    /// round trip. NOT_FOUND when it does not exist.
    pub(crate) async fn run_hash(&self, run_id: &str, queue: &str) -> Result<crate::model::Fields> {
        let keys = self.queue_keys(queue);
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(keys.run(run_id));
        pipe.cmd("HMGET").arg(keys.docs_hash()).arg(&crate::keys::doc_fields(run_id)[..]);
        pipe.cmd("MGET").arg(&keys.docs(run_id)[..]);
        let mut conn = self.conn().await?;
        let (value, in_hash, in_keys): (redis::Value, Vec<Option<String>>, Vec<Option<String>>) =
            pipe.query_async(&mut conn).await.map_err(|e| self.failed(e))?;
        let mut fields = reply::fields(value)?;
        if fields.0.is_empty() {
            return Err(Error::NotFound(format!("run {run_id} does not exist")));
        }
        // The key names these two (see run_fields in lua/include/common.lua).
        fields.0.entry("run_id".to_string()).or_insert_with(|| run_id.to_string());
        fields.0.entry("queue_name".to_string()).or_insert_with(|| queue.to_string());
        for ((field, in_hash), in_key) in crate::keys::DOCUMENTS.iter().zip(in_hash).zip(in_keys) {
            if let Some(stored) = fields.0.get_mut(*field) {
                *stored = crate::keys::doc_text(std::mem::take(stored), in_hash, in_key);
            }
        }
        Ok(fields)
    }
}
