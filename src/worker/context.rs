//! What a handler gets for one run, and what it returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::model::{NewEvent, Run, RunEvent};
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
    next_sequence: Arc<AtomicI64>,
    stop: CancellationToken,
    reason: Arc<std::sync::Mutex<Option<StopReason>>>,
    /// An emit failed because Redis was away or in a failover, not because
    /// of the handler: its failure then sends the run back to the queue.
    store_trouble: Arc<AtomicBool>,
}

impl RunContext {
    pub(crate) fn new(store: Store, run: Run, stop: CancellationToken) -> Self {
        let token = run.claim_token.clone().unwrap_or_default();
        let next = run.last_sequence + 1;
        RunContext {
            run: Arc::new(run),
            store,
            token,
            next_sequence: Arc::new(AtomicI64::new(next)),
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
        let first = self.next_sequence.fetch_add(events.len() as i64, Ordering::SeqCst);
        let batch: Vec<NewEvent> = events
            .into_iter()
            .enumerate()
            .map(|(i, (event_type, data))| NewEvent::new(first + i as i64, event_type, data))
            .collect();
        self.noted(self.store.append_events(&self.run.run_id, Some(&self.token), &batch).await)
    }

    /// Appends fully built events; their sequence numbers are assigned here.
    pub async fn emit_events(&self, mut events: Vec<NewEvent>) -> Result<Vec<RunEvent>> {
        let first = self.next_sequence.fetch_add(events.len() as i64, Ordering::SeqCst);
        for (i, event) in events.iter_mut().enumerate() {
            event.sequence = first + i as i64;
        }
        self.noted(self.store.append_events(&self.run.run_id, Some(&self.token), &events).await)
    }

    /// Remembers a transient store failure (see [`crate::Error::is_transient`]).
    fn noted<T>(&self, result: Result<T>) -> Result<T> {
        if result.as_ref().is_err_and(crate::Error::is_transient) {
            self.store_trouble.store(true, Ordering::SeqCst);
        }
        result
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
