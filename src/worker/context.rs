//! What a handler gets for one run, and what it returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::model::{Direction, NewEvent, Run, RunEvent};
use crate::store::{Store, lock};

/// Why a handler is asked to stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `request_cancel` was called on the run; it will end `cancelled`.
    Cancelled,
    /// The lease was lost (expired, or the run was taken over or finished
    /// elsewhere); nothing the handler writes lands any more.
    LeaseLost(String),
    /// The worker is shutting down; the run goes back to the queue.
    Shutdown,
}

/// The handle a handler works with: the run, event emission (sequenced and
/// fenced by the claim token) and the stop signal.
#[derive(Clone)]
pub struct RunContext {
    pub run: Arc<Run>,
    store: Store,
    token: String,
    /// The next event sequence. Held across an emit, so that emits of one
    /// handler land one after the other, in order.
    next_sequence: Arc<tokio::sync::Mutex<i64>>,
    /// When the lease ends by this process's clock (moved on by each renewal).
    lease_end: Arc<std::sync::Mutex<Instant>>,
    /// Fired with the lease's loss: the handler is then stopped at once.
    lease_gone: CancellationToken,
    stop: CancellationToken,
    reason: Arc<std::sync::Mutex<Option<StopReason>>>,
    /// An emit failed because Redis was away or in a failover, not because
    /// of the handler: its failure then sends the run back to the queue.
    store_trouble: Arc<AtomicBool>,
}

impl RunContext {
    pub(crate) fn new(store: Store, run: Run, stop: CancellationToken, lease_end: Instant) -> Self {
        let token = run.claim_token.clone().unwrap_or_default();
        let next = run.last_sequence + 1;
        RunContext {
            run: Arc::new(run),
            store,
            token,
            next_sequence: Arc::new(tokio::sync::Mutex::new(next)),
            lease_end: Arc::new(std::sync::Mutex::new(lease_end)),
            lease_gone: CancellationToken::new(),
            stop,
            reason: Arc::new(std::sync::Mutex::new(None)),
            store_trouble: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn run_id(&self) -> &str {
        &self.run.run_id
    }

    /// The claim token: for calls on the store that the context does not wrap.
    pub fn claim_token(&self) -> &str {
        &self.token
    }

    /// Appends one event with the next sequence number.
    pub async fn emit(&self, event_type: &str, data: Value) -> Result<RunEvent> {
        let mut events = self.emit_many(vec![(event_type.to_string(), data)]).await?;
        events.pop().ok_or_else(|| crate::Error::Protocol("emit: empty reply".into()))
    }

    /// Appends several events in one round trip, in order.
    pub async fn emit_many(&self, events: Vec<(String, Value)>) -> Result<Vec<RunEvent>> {
        let batch = events.into_iter().map(|(event_type, data)| NewEvent::new(0, event_type, data)).collect();
        self.emit_events(batch).await
    }

    /// Appends fully built events; their sequence numbers are assigned here.
    ///
    /// Emits of one handler land in the order they were made, one batch at a
    /// time, and a sequence number is used up only by a batch that landed, so
    /// a failed emit leaves no hole. A host's audit event may take the next
    /// number meanwhile: the batch then moves on after it, and the handler
    /// never sees that. While Redis is away (an outage, a failover) the same
    /// batch is sent again, which is idempotent, until the lease runs out.
    pub async fn emit_events(&self, mut events: Vec<NewEvent>) -> Result<Vec<RunEvent>> {
        let mut next = self.next_sequence.lock().await;
        let mut renumbered = 0;
        let mut pause = Duration::from_millis(50);
        loop {
            for (i, event) in events.iter_mut().enumerate() {
                event.sequence = *next + i as i64;
            }
            match self.store.append_events(&self.run.run_id, Some(&self.token), &events).await {
                Ok(landed) => {
                    *next += events.len() as i64;
                    return Ok(landed);
                }
                // The number is taken by an event that is not ours (an audit event).
                Err(Error::Conflict(_) | Error::OutOfOrder(_)) if renumbered < 10 => {
                    renumbered += 1;
                    *next = self.last_sequence().await? + 1;
                }
                Err(e) if e.is_transient() && !self.is_stopped() && Instant::now() + pause < self.lease_end() => {
                    tracing::debug!(run_id = %self.run.run_id, error = %e, "emit failed; sending it again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    if e.is_transient() {
                        self.store_trouble.store(true, Ordering::SeqCst);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// The sequence of the run's last event, as stored.
    async fn last_sequence(&self) -> Result<i64> {
        let page = self.store.page_run_events(&self.run.run_id, None, None, 1, Direction::Backward).await?;
        Ok(page.items.first().map_or(0, |event| event.sequence))
    }

    /// When the lease ends by this process's clock, as far as it knows now.
    pub fn lease_end(&self) -> Instant {
        *lock(&self.lease_end)
    }

    pub(crate) fn set_lease_end(&self, end: Instant) {
        *lock(&self.lease_end) = end;
    }

    /// Marks the lease lost and stops the handler at once.
    pub(crate) fn lease_lost(&self, why: String) {
        self.stop(StopReason::LeaseLost(why));
        self.lease_gone.cancel();
    }

    pub(crate) async fn lease_gone(&self) {
        self.lease_gone.cancelled().await
    }

    /// True once an emit failed for a reason of Redis's, not the handler's.
    pub fn store_trouble(&self) -> bool {
        self.store_trouble.load(Ordering::SeqCst)
    }

    /// Resolves when the handler should stop; see [`RunContext::stop_reason`].
    pub async fn stopped(&self) {
        self.stop.cancelled().await
    }

    pub fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        lock(&self.reason).clone()
    }

    /// Fires the stop signal; the first reason given wins.
    pub(crate) fn stop(&self, reason: StopReason) {
        let mut current = lock(&self.reason);
        if current.is_none() {
            *current = Some(reason);
        }
        drop(current);
        self.stop.cancel();
    }
}

/// A successful run's results.
#[derive(Clone, Debug, Default)]
pub struct Done {
    pub usage: Option<Value>,
    pub cost: Option<Value>,
    pub metadata: Option<Value>,
}

/// A failed run: `retryable` sends it back to the queue with a backoff while
/// attempts remain.
#[derive(Clone, Debug)]
pub struct Failure {
    pub message: String,
    pub retryable: bool,
}

impl Failure {
    pub fn fatal(message: impl Into<String>) -> Self {
        Failure { message: message.into(), retryable: false }
    }
    pub fn retryable(message: impl Into<String>) -> Self {
        Failure { message: message.into(), retryable: true }
    }
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(err: E) -> Self {
        Failure::fatal(err.to_string())
    }
}
