//! One housekeeping pass: lease expiry, deadlines, delayed promotion,
//! retention, stale runtimes. Workers run it periodically; `runledger reap`
//! runs it once.

use super::{Store, reply};
use crate::error::Result;
use crate::model::ReapReport;

impl Store {
    /// Runs the reaper script on each queue (empty = every known queue), then
    /// marks overdue runtimes stale. `now_ms` overrides the server clock.
    pub async fn reap(&self, queues: &[String], now_ms: Option<i64>) -> Result<ReapReport> {
        let queues = if queues.is_empty() { self.known_queues().await? } else { queues.to_vec() };
        let mut report = ReapReport::default();
        for queue in &queues {
            crate::validate::id("queue_name", queue)?;
            let keys = self.queue_keys(queue);
            let args = vec![
                keys.base.clone(),
                now_ms.map(|n| n.to_string()).unwrap_or_default(),
                "500".to_string(),
                self.retention_ms(),
            ];
            let value = self.eval(&self.scripts().reap, &keys.fixed(), &args).await?;
            let counts = reply::array(value)?.into_iter().map(reply::int).collect::<Result<Vec<_>>>()?;
            if let [promoted, reclaimed, timed_out, purged] = counts[..] {
                report.promoted += promoted;
                report.reclaimed += reclaimed;
                report.timed_out += timed_out;
                report.purged += purged;
            }
        }
        report.stale_runtimes = self.mark_stale_runtimes(now_ms, "stale", None).await?.len() as i64;
        Ok(report)
    }
}
