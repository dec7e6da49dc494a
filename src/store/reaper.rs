//! One housekeeping pass: lease expiry, deadlines, delayed promotion,
//! running timeouts, retention, pins of runtimes that are gone, stale
//! runtimes. Workers run it periodically; `runledger reap` runs it once.

use super::{Store, reply};
use crate::error::{Error, Result};
use crate::model::ReapReport;

/// Most of each kind of work one reap script does: about a millisecond of
/// Redis time (`runledger bench` reports the longest).
pub const REAP_BATCH: i64 = 100;
/// Scripts per queue and pass at most, while a batch comes back full.
const REAP_ROUNDS: usize = 200;

impl Store {
    /// Runs the reaper script on each queue (empty = every known queue), then
    /// marks overdue runtimes stale. `now_ms` overrides the server clock.
    pub async fn reap(&self, queues: &[String], now_ms: Option<i64>) -> Result<ReapReport> {
        let queues = if queues.is_empty() { self.known_queues().await? } else { self.physical_queues(queues).await? };
        let mut report = ReapReport::default();
        for queue in &queues {
            crate::validate::id("queue_name", queue)?;
            let keys = self.queue_keys(queue);
            let args = vec![
                keys.base.clone(),
                now_ms.map(|n| n.to_string()).unwrap_or_default(),
                REAP_BATCH.to_string(),
                self.retention_ms(),
                self.publish_command().to_string(),
                self.inner.cfg.running_timeout.map(|t| t.as_millis().to_string()).unwrap_or_default(),
            ];
            // Short scripts, as many as the backlog needs: a full batch of
            // any kind means more may be waiting.
            for _ in 0..REAP_ROUNDS {
                let value = self.eval(&self.scripts().reap, &keys.fixed(), &args).await?;
                let mut parts = reply::array(value)?.into_iter();
                let mut count = || -> Result<i64> {
                    parts.next().map(reply::int).transpose()?.ok_or_else(|| Error::Protocol("reap: short reply".into()))
                };
                let counts = [count()?, count()?, count()?, count()?];
                report.promoted += counts[0];
                report.reclaimed += counts[1];
                report.timed_out += counts[2];
                report.purged += counts[3];
                let purged = parts.map(reply::string).collect::<Result<Vec<_>>>()?;
                self.drop_locators(queue, &purged).await?;
                if counts.iter().all(|&n| n < REAP_BATCH) {
                    break;
                }
            }
            report.pins_released += self.release_pins(queue).await?;
        }
        report.stale_runtimes = self.mark_stale_runtimes(now_ms, "stale", None).await?.len() as i64;
        Ok(report)
    }

    /// Releases the runs of `queue` pinned to runtimes whose key is gone.
    async fn release_pins(&self, queue: &str) -> Result<i64> {
        let keys = self.queue_keys(queue);
        let mut conn = self.conn().await?;
        let pins: Vec<String> =
            redis::cmd("SMEMBERS").arg(keys.pins()).query_async(&mut conn).await.map_err(|e| self.failed(e))?;
        if pins.is_empty() {
            return Ok(0);
        }
        // Runtime keys live in other slots than the queue: one EXISTS each.
        let probes = pins.iter().map(|rt| redis::cmd("EXISTS").arg(self.global().runtime(rt)).clone()).collect();
        let alive = conn.query_all(probes).await.map_err(|e| self.failed(e))?;
        let mut released = 0;
        for (runtime, alive) in pins.iter().zip(alive) {
            if reply::int(alive)? == 1 {
                continue;
            }
            let args = vec![
                keys.base.clone(),
                runtime.clone(),
                self.inner.cfg.pin_grace.as_millis().to_string(),
                "500".to_string(),
            ];
            released += reply::int(self.eval(&self.scripts().release_pins, &keys.fixed(), &args).await?)?;
        }
        Ok(released)
    }
}
