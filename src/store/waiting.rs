//! Blocking claims: wait on the queues' wake-up lists instead of polling.
//!
//! Every enqueue (and every due delayed run the claim script promotes) pushes
//! one token onto `<P>:{Q}:wake`, a list capped at one element. An idle
//! worker blocks in BLPOP on the wake lists of its queues; whoever pops the
//! token claims, and the claim script pushes a new token while runs remain, so
//! the wake-up chains from worker to worker. The BLPOP timeout is the time
//! until the next delayed run or lease falls due (at most `SAFETY_POLL`), so a
//! lost token costs at most one safety poll. In Redis Cluster the lists of
//! different queues live in different slots, so a waiter there blocks per
//! queue; this implementation blocks on all queues at once (one server).

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use super::Store;
use super::runs::ClaimOutcome;
use crate::error::Result;
use crate::model::{ClaimRequest, Run};

/// The longest an idle waiter sleeps without asking the queues.
pub const SAFETY_POLL: Duration = Duration::from_secs(2);

/// A dedicated connection that blocks on wake-up lists.
pub struct Waiter {
    store: Store,
    conn: MultiplexedConnection,
}

impl Waiter {
    pub async fn new(store: &Store) -> Result<Waiter> {
        Ok(Waiter { store: store.clone(), conn: store.dedicated_conn().await? })
    }

    /// Claims from the request's queues (in order), waiting up to `wait` for a
    /// run to arrive. `None` when the wait ends empty-handed.
    pub async fn claim(&mut self, request: &ClaimRequest, wait: Duration) -> Result<Option<Run>> {
        let deadline = Instant::now() + wait;
        let queues = if request.queues.is_empty() {
            self.store.known_queues().await?
        } else {
            request.queues.clone()
        };
        loop {
            let mut next_due: Option<i64> = None;
            for queue in &queues {
                match self.store.claim_from(queue, request).await? {
                    ClaimOutcome::Claimed(run) => return Ok(Some(*run)),
                    ClaimOutcome::Empty { next_due_ms } => {
                        if let Some(due) = next_due_ms {
                            next_due = Some(next_due.map_or(due, |d: i64| d.min(due)));
                        }
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let mut sleep = (deadline - now).min(SAFETY_POLL);
            if let Some(due) = next_due {
                let until_due = due - self.store.server_time_ms().await?;
                sleep = sleep.min(Duration::from_millis(until_due.clamp(1, i64::MAX) as u64));
            }
            self.block(&queues, sleep).await?;
        }
    }

    /// Blocks until a wake token arrives on one of the queues or `timeout` passes.
    pub async fn block(&mut self, queues: &[String], timeout: Duration) -> Result<bool> {
        if queues.is_empty() {
            tokio::time::sleep(timeout).await;
            return Ok(false);
        }
        let mut cmd = redis::cmd("BLPOP");
        for queue in queues {
            cmd.arg(self.store.queue_keys(queue).wake());
        }
        // BLPOP takes seconds with decimals; 0 would mean forever.
        cmd.arg(format!("{:.3}", timeout.as_secs_f64().max(0.001)));
        let popped: Option<(String, String)> = match cmd.query_async(&mut self.conn).await {
            Ok(v) => v,
            Err(e) => {
                // Replace a broken connection so the next wait can work.
                if crate::error::Error::is_connection_failure(&e) {
                    self.conn = self.store.dedicated_conn().await?;
                }
                return Err(crate::error::Error::from_redis(e));
            }
        };
        Ok(popped.is_some())
    }
}
