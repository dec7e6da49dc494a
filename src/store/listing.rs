//! Listing runs across queues and reading queue statistics.

use std::collections::BTreeMap;

use futures_util::future::try_join_all;

use super::runs::thread_filter;
use super::{Store, reply};
use crate::error::{Error, Result};
use crate::model::{LeaseHolder, QueueStats, Run, RunFilter, RunPage};
use crate::validate;

/// Index entries one script call looks at, at most.
const SCAN_BUDGET: usize = 2000;

/// Index entries one count_runs call looks at, at most: a total over a long
/// index takes several short scripts rather than one long one.
const COUNT_BUDGET: usize = 5000;

impl Store {
    /// Pages runs newest id first (the seed's list_runs, with LangBot's
    /// runner_id, binding_id and total). Each queue is walked through the most
    /// selective index the filter allows (thread, then conversation, bot,
    /// workspace, else all runs); the other filters and the statuses are
    /// checked on the runs that index yields. `limit` capped to 1..=100.
    /// `total` counts every match without `before_id`: O(1) per queue when the
    /// index's own filter is the only one, else one look per entry of the index.
    pub async fn list_runs(&self, filter: &RunFilter) -> Result<RunPage> {
        let limit = filter.limit.clamp(1, 100);
        for (name, value) in [
            ("conversation_id", &filter.conversation_id),
            ("bot_id", &filter.bot_id),
            ("workspace_id", &filter.workspace_id),
            ("thread_id", &filter.thread_id),
            ("runner_id", &filter.runner_id),
            ("binding_id", &filter.binding_id),
        ] {
            validate::opt_id(name, value.as_deref())?;
        }
        let queues = if filter.queues.is_empty() {
            self.known_queues().await?
        } else {
            self.physical_queues(&filter.queues).await?
        };
        let statuses = filter.statuses.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",");
        // The seed ignores thread_id unless strict_thread is set.
        let thread = thread_filter(filter.strict_thread, filter.thread_id.as_deref());
        let by_scope = thread.starts_with('=')
            || filter.conversation_id.is_some()
            || filter.bot_id.is_some()
            || filter.workspace_id.is_some();
        let filters = [
            !thread.is_empty(),
            filter.conversation_id.is_some(),
            filter.bot_id.is_some(),
            filter.workspace_id.is_some(),
            filter.runner_id.is_some(),
            filter.binding_id.is_some(),
            !filter.statuses.is_empty(),
        ]
        .iter()
        .filter(|set| **set)
        .count();
        // Filters the index does not answer by itself: each run must be read.
        let residual = filters > usize::from(by_scope);
        let checks = [
            statuses.clone(),
            filter.conversation_id.clone().unwrap_or_default(),
            filter.bot_id.clone().unwrap_or_default(),
            filter.workspace_id.clone().unwrap_or_default(),
            thread.clone(),
            filter.runner_id.clone().unwrap_or_default(),
            filter.binding_id.clone().unwrap_or_default(),
        ];
        let mut all: Vec<Run> = Vec::new();
        let mut total: u64 = 0;
        for queue in &queues {
            validate::id("queue_name", queue)?;
            let keys = self.queue_keys(queue);
            let index = match (&thread, &filter.conversation_id, &filter.bot_id, &filter.workspace_id) {
                (t, _, _, _) if t.starts_with('=') => keys.scope_index("thread", &t[1..]),
                (_, Some(c), _, _) => keys.scope_index("conversation", c),
                (_, _, Some(b), _) => keys.scope_index("bot", b),
                (_, _, _, Some(w)) => keys.scope_index("workspace", w),
                _ => keys.runs_index(),
            };
            // Walk this queue until it yields limit + 1 matches or ends.
            let mut before = filter.before_id;
            let mut found = 0;
            loop {
                let mut args = vec![
                    keys.base.clone(),
                    before.map(|b| b.to_string()).unwrap_or_default(),
                    (limit + 1 - found).to_string(),
                    SCAN_BUDGET.to_string(),
                ];
                args.extend(checks.iter().cloned());
                let value = self.eval(&self.scripts().list_runs, std::slice::from_ref(&index), &args).await?;
                let mut parts = reply::array(value)?.into_iter();
                let exhausted = parts.next().map(reply::int).transpose()?.unwrap_or(1) == 1;
                let lowest = parts.next().map(reply::opt_int).transpose()?.flatten();
                for item in parts {
                    all.push(Run::from_fields(reply::fields(item)?, false)?);
                    found += 1;
                }
                if exhausted || found > limit {
                    break;
                }
                match lowest {
                    Some(low) => before = Some(low),
                    None => break,
                }
            }
            total += self.count_runs(&keys.base, &index, residual, &checks).await?;
        }
        all.sort_by_key(|r| std::cmp::Reverse(r.id));
        let has_more = all.len() > limit;
        all.truncate(limit);
        let next_cursor = if has_more { all.last().map(|r| r.id) } else { None };
        Ok(RunPage { items: all, next_cursor, has_more, total })
    }

    /// The runs of one index matching `checks` (list_runs.lua's filters), in
    /// count_runs calls of COUNT_BUDGET entries each; XLEN when `residual` is
    /// false (the index is the whole filter).
    async fn count_runs(&self, base: &str, index: &str, residual: bool, checks: &[String]) -> Result<u64> {
        let mut total: u64 = 0;
        let mut cursor = String::new();
        loop {
            let mut args = vec![
                base.to_string(),
                if residual { "1" } else { "0" }.to_string(),
                cursor.clone(),
                COUNT_BUDGET.to_string(),
            ];
            args.extend(checks.iter().cloned());
            let value = self.eval(&self.scripts().count_runs, &[index.to_string()], &args).await?;
            let mut parts = reply::array(value)?.into_iter();
            let count = parts.next().map(reply::int).transpose()?.unwrap_or(0);
            let exhausted = parts.next().map(reply::int).transpose()?.unwrap_or(1) == 1;
            let last = parts.next().map(reply::string).transpose()?.unwrap_or_default();
            total += count.max(0) as u64;
            if exhausted || last.is_empty() {
                return Ok(total);
            }
            cursor = last;
        }
    }

    /// The stats of every known queue, up to `holders` lease holders each; a
    /// declared partitioned queue as one merged row followed by its
    /// partitions (`Q#0`, ...), then the other queues in name order.
    pub async fn queue_overview(&self, holders: usize) -> Result<Vec<QueueStats>> {
        let partitioned = self.partition_counts().await?;
        let queues = self.known_queues().await?;
        // Side by side, a few at a time: one round trip each would add up at 1,000 queues.
        let mut stats: Vec<QueueStats> = Vec::with_capacity(queues.len());
        for chunk in queues.chunks(16) {
            stats.extend(try_join_all(chunk.iter().map(|q| self.queue_stats(q, holders))).await?);
        }
        for s in &mut stats {
            // Only partitions of a declared queue count as such (a `#` alone does not).
            if s.partition_of.as_ref().is_none_or(|q| !partitioned.contains_key(q)) {
                s.partition_of = None;
            }
        }
        let mut rows = Vec::new();
        let mut logical: Vec<&String> = partitioned.keys().collect();
        logical.sort();
        for q in logical {
            let parts: Vec<QueueStats> = stats.iter().filter(|s| s.partition_of.as_ref() == Some(q)).cloned().collect();
            rows.push(QueueStats::merged(q, &parts));
            rows.extend(parts);
        }
        rows.extend(stats.into_iter().filter(|s| s.partition_of.is_none() && !partitioned.contains_key(&s.queue_name)));
        Ok(rows)
    }

    /// The newest `limit` (1..=1000) retained dead runs of one physical queue,
    /// with when they died (epoch ms), newest first.
    pub async fn dead_runs(&self, queue: &str, limit: usize) -> Result<Vec<(String, i64)>> {
        validate::id("queue_name", queue)?;
        let mut conn = self.conn().await?;
        let stop = limit.clamp(1, 1000) as i64 - 1;
        let pairs: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(self.queue_keys(queue).dead())
            .arg(0)
            .arg(stop)
            .arg("REV")
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(pairs.into_iter().map(|(rid, at)| (rid, at as i64)).collect())
    }

    /// Depths, oldest claimable run, lease holders and counters of one queue.
    pub async fn queue_stats(&self, queue: &str, holders: usize) -> Result<QueueStats> {
        validate::id("queue_name", queue)?;
        let keys = self.queue_keys(queue);
        let mut k: Vec<String> = keys.fixed().into();
        k.push(keys.pins());
        let args = vec![keys.base.clone(), holders.min(1000).to_string()];
        let value = self.eval(&self.scripts().queue_stats, &k, &args).await?;
        let mut parts = reply::array(value)?.into_iter();
        let mut next_int = || -> Result<i64> {
            parts.next().map(reply::int).transpose()?.ok_or_else(|| Error::Protocol("queue_stats: short reply".into()))
        };
        let queued = next_int()?;
        let pinned = next_int()?;
        let delayed = next_int()?;
        let claimed = next_int()?;
        let finished = next_int()?;
        let oldest = parts.next().map(reply::opt_int).transpose()?.flatten();
        let mut lease_holders = Vec::new();
        for item in parts.next().map(reply::array).transpose()?.unwrap_or_default() {
            let mut p = reply::array(item)?.into_iter();
            let run_id = p.next().map(reply::string).transpose()?.unwrap_or_default();
            let runtime_id = p.next().map(reply::string).transpose()?.unwrap_or_default();
            let expires = p.next().map(reply::int).transpose()?.unwrap_or(0);
            lease_holders.push(LeaseHolder { run_id, runtime_id, claim_lease_expires_at: expires as f64 / 1000.0 });
        }
        let counters = counts(parts.next())?;
        let now_ms = parts.next().map(reply::int).transpose()?.unwrap_or(0);
        let queued_by_runner = counts(parts.next())?;
        let running = parts.next().map(reply::int).transpose()?.unwrap_or(0);
        let oldest_running = parts.next().map(reply::opt_int).transpose()?.flatten();
        let dead = parts.next().map(reply::int).transpose()?.unwrap_or(0);
        let waiting_for_group = parts.next().map(reply::int).transpose()?.unwrap_or(0);
        let paused = parts.next().map(reply::int).transpose()?.unwrap_or(0) == 1;
        let paused_groups = parts.next().map(reply::int).transpose()?.unwrap_or(0);
        let age = |ms: i64| ((now_ms - ms).max(0)) as f64 / 1000.0;
        Ok(QueueStats {
            queue_name: queue.to_string(),
            queued: queued + waiting_for_group,
            waiting_for_group,
            paused,
            paused_groups,
            pinned,
            delayed,
            claimed,
            finished,
            dead,
            oldest_queued_age: oldest.map(age),
            running,
            oldest_running_age: oldest_running.map(age),
            lease_holders,
            counters,
            queued_by_runner,
            partition_of: queue.rsplit_once('#').map(|(logical, _)| logical.to_string()),
        })
    }
}

/// A HASH of counters as HGETALL returns it (absent = empty).
fn counts(value: Option<redis::Value>) -> Result<BTreeMap<String, i64>> {
    let fields = value.map(reply::fields).transpose()?;
    Ok(fields.map(|f| f.0).unwrap_or_default().into_iter().map(|(k, v)| (k, v.parse().unwrap_or(0))).collect())
}
