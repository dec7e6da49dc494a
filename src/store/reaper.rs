//! One housekeeping pass: lease expiry, deadlines, delayed promotion,
//! retention, stale runtimes. Workers run it periodically; `runledger reap`
//! runs it once.

use super::{Store, reply};
use crate::error::{Error, Result};
use crate::model::ReapReport;

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
                "500".to_string(),
                self.retention_ms(),
                self.publish_command().to_string(),
            ];
            let value = self.eval(&self.scripts().reap, &keys.fixed(), &args).await?;
            let mut parts = reply::array(value)?.into_iter();
            let mut count = || -> Result<i64> {
                parts.next().map(reply::int).transpose()?.ok_or_else(|| Error::Protocol("reap: short reply".into()))
            };
            report.promoted += count()?;
            report.reclaimed += count()?;
            report.timed_out += count()?;
            report.purged += count()?;
            let purged = parts.map(reply::string).collect::<Result<Vec<_>>>()?;
            self.drop_locators(&purged).await?;
        }
        report.stale_runtimes = self.mark_stale_runtimes(now_ms, "stale", None).await?.len() as i64;
        Ok(report)
    }
}
