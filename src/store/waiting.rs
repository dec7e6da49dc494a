//! Blocking claims: wait on the queues' wake-up lists instead of polling.
//!
//! Every enqueue (and every due delayed run the claim script promotes) pushes
//! one token onto the wake-up list of the workers that may claim the run
//! (each list capped at one element): `<P>:{Q}:wake` for workers without a
//! runner filter, `wake:runner:<r>` for those filtering on runner r (which
//! announce themselves in `listeners`), `wake:pin:<rt>` for a run pinned to
//! runtime rt. So a token is never used up by a worker that cannot claim the
//! run. An idle worker blocks in one BLPOP per queue on its lists; whoever
//! pops a token claims, and the claim script pushes a new one while runs
//! remain, so the wake-up chains from worker to worker. The BLPOP timeout is the time
//! until the next delayed run or lease falls due (at most `SAFETY_POLL`), so a
//! lost token costs at most one safety poll.
//!
//! Each BLPOP names one queue's list, on a connection of its own: the lists of
//! different queues live in different Redis Cluster slots, so one command may
//! not name two of them. A waiter keeps one BLPOP in flight per queue, across
//! calls. A token that such a BLPOP pops while nobody waits (its worker is
//! busy) is pushed back at once, so another idle worker gets it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::Conn;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Store;
use super::runs::ClaimOutcome;
use crate::error::{Error, Result};
use crate::model::{ClaimRequest, Run};

/// The longest an idle waiter sleeps without asking the queues.
pub const SAFETY_POLL: Duration = Duration::from_secs(2);

/// How long a filtered worker's entry in `listeners` holds after it
/// started a wait (renewed by every wait, at least every SAFETY_POLL).
const LISTENING_MS: i64 = 60_000;

/// How soon a waiter serving every known queue notices a new queue.
const NEW_QUEUE_POLL: Duration = Duration::from_millis(500);

/// What a finished BLPOP hands back: its queue, its connection (unless it
/// broke) and whether it popped a token.
type Popped = (String, Option<Conn>, Result<bool>);

/// Blocks on wake-up lists, one dedicated connection per queue.
pub struct Waiter {
    /// Whom the waits are for: the wake lists to block on follow from it.
    listener: Listener,
    /// Claims made after a wait that ended without a wake-up (the safety
    /// poll, or a run falling due): each one a wake-up that did not come.
    polled_claims: u64,
    store: Store,
    /// Connections not blocked right now, by queue.
    idle: HashMap<String, Conn>,
    /// BLPOPs in flight; they outlive a `block` call that timed out.
    in_flight: JoinSet<Popped>,
    /// Queues with a BLPOP in flight.
    blocked: HashSet<String>,
    /// True while a `block` call waits for the BLPOPs' tokens.
    waiting: Arc<AtomicBool>,
}

/// Marks a waiter as waiting for as long as it lives (a `block` future may be
/// dropped midway by a `select!`).
struct Waiting(Arc<AtomicBool>);

impl Waiting {
    fn new(flag: &Arc<AtomicBool>) -> Waiting {
        flag.store(true, Ordering::SeqCst);
        Waiting(flag.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// The runtime and runner filter a waiter waits for.
#[derive(Clone, Default, PartialEq)]
struct Listener {
    runtime_id: String,
    runner_ids: Vec<String>,
}

impl Waiter {
    pub async fn new(store: &Store) -> Result<Waiter> {
        Ok(Waiter {
            listener: Listener::default(),
            polled_claims: 0,
            store: store.clone(),
            idle: HashMap::new(),
            in_flight: JoinSet::new(),
            blocked: HashSet::new(),
            waiting: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Claims from the request's queues (in order), waiting up to `wait` for a
    /// run to arrive. `None` when the wait ends empty-handed.
    pub async fn claim(&mut self, request: &ClaimRequest, wait: Duration) -> Result<Option<Run>> {
        self.claim_unless(request, wait, &CancellationToken::new()).await
    }

    /// Like [`Waiter::claim`], and gives up (with `None`) when `stop` fires.
    /// Only the waiting is cut short, never a claim on its way: a run the
    /// server handed out is always returned, not dropped with its lease.
    pub async fn claim_unless(
        &mut self,
        request: &ClaimRequest,
        wait: Duration,
        stop: &CancellationToken,
    ) -> Result<Option<Run>> {
        let deadline = Instant::now() + wait;
        self.listen_for(request);
        let mut woken = true;
        // Without queues, every known queue is served; queues created while
        // waiting are found by reading the queue set again, at least every
        // NEW_QUEUE_POLL (their wake lists are not watched before).
        let implicit = request.queues.is_empty();
        let mut queues;
        loop {
            if stop.is_cancelled() {
                return Ok(None);
            }
            // Partitioned queues expand to their partitions, starting at the
            // next one each time (see partitions.rs).
            queues = if implicit {
                self.store.known_queues().await?
            } else {
                self.store.claim_order(&request.queues).await?
            };
            // Time left until the earliest due run or lease, by the server's clock.
            let mut next_due: Option<i64> = None;
            for queue in &queues {
                match self.store.claim_from(queue, request).await? {
                    ClaimOutcome::Claimed(run) => {
                        if !woken {
                            self.polled_claims += 1;
                        }
                        return Ok(Some(*run));
                    }
                    ClaimOutcome::Empty { next_due_ms, now_ms } => {
                        if let Some(due) = next_due_ms {
                            let left = due - now_ms;
                            next_due = Some(next_due.map_or(left, |d: i64| d.min(left)));
                        }
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let mut sleep = (deadline - now).min(if implicit { NEW_QUEUE_POLL } else { SAFETY_POLL });
            if let Some(until_due) = next_due {
                sleep = sleep.min(Duration::from_millis(until_due.clamp(1, i64::MAX) as u64));
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(None),
                popped = self.block(&queues, sleep) => woken = popped?,
            }
        }
    }

    /// How many claims came after a wait that no wake-up ended: the wake-ups
    /// that were missed (or runs that fell due meanwhile).
    pub fn polled_claims(&self) -> u64 {
        self.polled_claims
    }

    /// Waits from now on for this request's runtime and runner filter; BLPOPs
    /// started for another are given up (their connections closed).
    fn listen_for(&mut self, request: &ClaimRequest) {
        let listener = Listener { runtime_id: request.runtime_id.clone(), runner_ids: request.runner_ids.clone() };
        if listener != self.listener {
            self.in_flight.abort_all();
            self.blocked.clear();
            self.idle.clear();
            self.listener = listener;
        }
    }

    /// The wake lists one BLPOP of this waiter names on a queue (one slot).
    fn wake_keys(&self, queue: &str) -> Vec<String> {
        let keys = self.store.queue_keys(queue);
        let mut out: Vec<String> = if self.listener.runner_ids.is_empty() {
            vec![keys.wake()]
        } else {
            self.listener.runner_ids.iter().map(|r| keys.runner_wake(r)).collect()
        };
        if !self.listener.runtime_id.is_empty() {
            out.push(keys.pin_wake(&self.listener.runtime_id));
        }
        out
    }

    /// Blocks until a wake token arrives on one of the queues or `timeout` passes.
    pub async fn block(&mut self, queues: &[String], timeout: Duration) -> Result<bool> {
        if queues.is_empty() {
            tokio::time::sleep(timeout).await;
            return Ok(false);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let _waiting = Waiting::new(&self.waiting);
        loop {
            for queue in queues {
                if !self.blocked.contains(queue) {
                    self.start(queue).await?;
                }
            }
            let popped = match tokio::time::timeout_at(deadline, self.in_flight.join_next()).await {
                Err(_) => return Ok(false),
                Ok(None) => return Ok(false),
                Ok(Some(Err(join))) => return Err(Error::Protocol(format!("wake-up wait ended abnormally: {join}"))),
                Ok(Some(Ok(popped))) => popped,
            };
            let (queue, conn, result) = popped;
            self.blocked.remove(&queue);
            if let Some(conn) = conn {
                self.idle.insert(queue, conn);
            }
            // A BLPOP that timed out empty is simply started again.
            if result? {
                return Ok(true);
            }
        }
    }

    /// Starts a BLPOP on one queue's wake list, for at most the safety poll.
    async fn start(&mut self, queue: &str) -> Result<()> {
        let mut conn = match self.idle.remove(queue) {
            Some(conn) => conn,
            None => self.store.dedicated_conn().await?,
        };
        let wake_keys = self.wake_keys(queue);
        // Filtered workers say which runners they wait for, so that enqueues
        // of those runners push their lists (see lua/include/queue.lua).
        let listening = (!self.listener.runner_ids.is_empty()).then(|| {
            let until = chrono::Utc::now().timestamp_millis() + LISTENING_MS;
            let mut cmd = redis::cmd("HSET");
            cmd.arg(self.store.queue_keys(queue).listeners());
            for runner in &self.listener.runner_ids {
                cmd.arg(runner).arg(until);
            }
            cmd
        });
        let queue = queue.to_string();
        let waiting = self.waiting.clone();
        let store = self.store.clone();
        self.blocked.insert(queue.clone());
        self.in_flight.spawn(async move {
            if let Some(cmd) = listening
                && let Err(e) = cmd.query_async::<i64>(&mut conn).await
            {
                let kept = (!store.blocking_conn_lost(&e)).then_some(conn);
                return (queue, kept, Err(Error::from_redis(e)));
            }
            let mut cmd = redis::cmd("BLPOP");
            // BLPOP takes seconds with decimals; 0 would mean forever.
            cmd.arg(&wake_keys).arg(format!("{:.3}", SAFETY_POLL.as_secs_f64()));
            match cmd.query_async::<Option<(String, String)>>(&mut conn).await {
                Ok(Some((key, _))) if !waiting.load(Ordering::SeqCst) => {
                    // Nobody here wants it now: hand the wake-up on.
                    let pushed: redis::RedisResult<i64> =
                        redis::cmd("LPUSH").arg(&key).arg("1").query_async(&mut conn).await;
                    (queue, Some(conn), pushed.map(|_| false).map_err(Error::from_redis))
                }
                Ok(popped) => (queue, Some(conn), Ok(popped.is_some())),
                // A broken connection (or, under Sentinel, one to a demoted
                // master, which answers UNBLOCKED) is dropped; the next start
                // opens a new one, on the master the sentinels name then.
                Err(e) if store.blocking_conn_lost(&e) => (queue, None, Err(Error::from_redis(e))),
                Err(e) => (queue, Some(conn), Err(Error::from_redis(e))),
            }
        });
        Ok(())
    }
}
