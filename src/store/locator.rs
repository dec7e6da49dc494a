//! The run id locator: `<P>:locator:<run_id>` (STRING) names the queue a run
//! lives in, so a run id is unique across every queue and a run is found in
//! one round trip, on one server or a cluster.
//!
//! A create takes the locator with `SET NX GET`. On a cluster it does so
//! before its queue's script runs (the two live in different slots, so they
//! cannot be one script); on a single server the create script takes it
//! itself, in the same call (one round trip). Either way:
//! - nothing there: the id is ours; the script creates the run;
//! - our queue: a retry of our own create (or a race with another create in
//!   the same queue): the script is idempotent by run id, so it runs again
//!   and a create that crashed between the two steps is completed;
//! - another queue: the run is that queue's; the create returns it.
//!
//! A locator lives as long as its run: no TTL while the run is live, the
//! run's TTL once it is finished (set by the call that finished it), and the
//! reaper deletes it with the run it purges.

use std::time::Duration;

use futures_util::future::try_join_all;

use super::Store;
use crate::error::{Error, Result};

/// What taking a locator found.
#[derive(Clone)]
pub(crate) enum Reservation {
    /// The id is ours in this queue (a retry of our own create, or taken by
    /// the create script itself).
    Ours,
    /// The id is ours in this queue: this call took its locator just now.
    Taken,
    /// The run id belongs to another queue.
    Elsewhere(String),
}

impl Store {
    /// The queue a run lives in: the in-process cache, else one GET.
    pub async fn locate(&self, run_id: &str) -> Result<String> {
        crate::validate::id("run_id", run_id)?;
        if let Some(queue) = self.cached_location(run_id) {
            return Ok(queue);
        }
        let mut conn = self.conn().await?;
        let queue: Option<String> = redis::cmd("GET")
            .arg(self.global().locator(run_id))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        match queue {
            Some(queue) => {
                self.remember(run_id, &queue);
                Ok(queue)
            }
            None => Err(Error::NotFound(format!("run {run_id} does not exist"))),
        }
    }

    /// Takes the locators of runs about to be created on a cluster:
    /// `(run_id, queue)` pairs, concurrently. On a single server the create
    /// script takes them (see [`Store::locators_in_script`]) and every run
    /// is `Ours` until its reply says otherwise.
    pub(crate) async fn reserve(&self, runs: &[(&str, &str)]) -> Result<Vec<Reservation>> {
        if self.locators_in_script() {
            return Ok(vec![Reservation::Ours; runs.len()]);
        }
        let cmds = runs
            .iter()
            .map(|(run_id, queue)| {
                let mut cmd = redis::cmd("SET");
                cmd.arg(self.global().locator(run_id)).arg(*queue).arg("NX").arg("GET");
                cmd
            })
            .collect();
        let values = self.write_all(cmds).await?;
        let mut again = Vec::new();
        let reservations = values
            .into_iter()
            .zip(runs)
            .map(|(value, (run_id, queue))| match value {
                redis::Value::Nil => Ok(Reservation::Taken),
                other => {
                    let held = super::reply::string(other)?;
                    if held != *queue {
                        return Ok(Reservation::Elsewhere(held));
                    }
                    // Ours already: a retry, or the locator of a finished run
                    // whose TTL is running. A run about to be created here
                    // must not lose its locator to that TTL (a purge deletes
                    // it either way).
                    let mut cmd = redis::cmd("PERSIST");
                    cmd.arg(self.global().locator(run_id));
                    again.push(cmd);
                    Ok(Reservation::Ours)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        if !again.is_empty() {
            self.write_all(again).await?;
        }
        Ok(reservations)
    }

    /// True when the create script takes the run id locators itself: on a
    /// single server, where a script may touch keys of any slot.
    pub(crate) fn locators_in_script(&self) -> bool {
        !self.is_cluster()
    }

    /// Gives finished runs' locators the TTL of the runs themselves.
    pub(crate) async fn expire_locators(&self, run_ids: &[String]) -> Result<()> {
        let ttl = self.finished_ttl_ms();
        let cmds = run_ids
            .iter()
            .map(|run_id| {
                let mut cmd = redis::cmd("PEXPIRE");
                cmd.arg(self.global().locator(run_id)).arg(ttl);
                cmd
            })
            .collect();
        self.write_all(cmds).await?;
        Ok(())
    }

    /// Deletes the locators of runs purged from `queue`, each only while it
    /// still names that queue: a locator that expired before the purge may
    /// since name a newer run of the same id elsewhere.
    pub(crate) async fn drop_locators(&self, queue: &str, run_ids: &[String]) -> Result<()> {
        if run_ids.is_empty() {
            return Ok(());
        }
        // One call per locator, side by side: locators live in slots of their
        // own, and a pipeline across slots fails on a cluster (CROSSSLOT).
        let lua = &self.scripts().drop_locator;
        let args = [queue.to_string()];
        try_join_all(run_ids.iter().map(|run_id| {
            self.forget(run_id);
            let keys = vec![self.global().locator(run_id)];
            let args = &args;
            async move { self.eval(lua, &keys, args).await }
        }))
        .await?;
        Ok(())
    }

    /// After a finish: the finished run's locator gets its TTL (unless the
    /// finish gave it, `finished` None), and the runs the finish purged lose
    /// theirs, in the background (the worker's hot path). A failure leaves a
    /// locator to its TTL.
    pub(crate) fn settle_locators_soon(&self, queue: &str, finished: Option<&str>, purged: Vec<String>) {
        if finished.is_none() && purged.is_empty() {
            return;
        }
        let store = self.clone();
        let queue = queue.to_string();
        let finished: Vec<String> = finished.into_iter().map(str::to_string).collect();
        tokio::spawn(async move {
            let settle = async {
                store.expire_locators(&finished).await?;
                store.drop_locators(&queue, &purged).await
            };
            if !matches!(tokio::time::timeout(Duration::from_secs(10), settle).await, Ok(Ok(()))) {
                tracing::debug!(queue = %queue, "could not settle the locators of a finish");
            }
        });
    }
}
