//! Partitioned queues: one logical queue spread over several physical queues
//! (`Q#0` .. `Q#P-1`), each in its own hash slot, so one hot queue can use
//! every shard of a cluster.
//!
//! A queue is partitioned by declaring it (`Store::declare_partitions`, the
//! CLI's `runledger partition Q N`), which records `Q -> P` in the HASH
//! `<P>:partitions`, so every host and worker agrees. The count is fixed once
//! declared (changing it would move run ids to other partitions). Runs sent
//! to `Q` land in the partition of their placement key (see
//! [`placement_key`]): the run's group when `Q` groups its runs, so that a
//! group lives in one partition and its limits are never multiplied; else
//! the caller's partition key (so related runs can share a partition and
//! keep their order), else the run id. Claims on `Q` go over its partitions.
//!
//! The placement follows `Q`'s `group_by` as this process last read it (from
//! partition 0's meta, at most [`REFRESH`] old). The create script checks it
//! against the partition's own setting before it writes anything and refuses
//! a run placed by another (`MISPLACED`): the store reads the setting again
//! and places the runs anew, so a change of `group_by` never leaves one
//! group in two partitions.
//!
//! Ordering: priority order (then creation order) holds within a partition,
//! not across partitions. Each claim starts at the next partition in
//! rotation and takes the best run of the first partition that has one, so
//! every partition with claimable runs is served at least once every P
//! claims of a worker, and a claim still costs O(log n) per partition tried.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{Store, lock};
use crate::error::{Error, Result};
use crate::model::NewRun;
use crate::validate;

/// The most partitions a queue may have.
pub const MAX_PARTITIONS: u32 = 256;

/// How long a process trusts its copy of `<P>:partitions`: a declaration
/// reaches every host and worker within this.
const REFRESH: Duration = Duration::from_secs(2);

/// The process's copy of `<P>:partitions`, and of the `group_by` of the
/// partitioned queues it placed runs in.
#[derive(Default)]
pub(crate) struct PartitionCache {
    read_at: Option<Instant>,
    counts: HashMap<String, u32>,
    /// Partitioned queue -> (when read, its `group_by`; '' = none).
    group_by: HashMap<String, (Instant, String)>,
}

/// The physical queue of partition `i` of `queue`.
pub fn partition_name(queue: &str, i: u32) -> String {
    format!("{queue}#{i}")
}

/// The partition a key falls in: FNV-1a, stable across processes and versions.
pub fn partition_index(key: &str, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u32
}

/// The key a new run of a partitioned queue is placed by, given the queue's
/// `group_by` ('' = none): the run's group (the value of that field, or its
/// `group_key`) when it has one, so every run of a group shares a partition
/// and the group's limits hold whole; else the caller's partition key, else
/// its `group_key`, else its run id. A grouped run's partition key is not
/// used: honouring it could split a group over partitions and multiply its
/// limit.
pub fn placement_key<'a>(run: &'a NewRun, group_by: &str) -> &'a str {
    let group = match group_by {
        "conversation_id" => run.conversation_id.as_deref(),
        "thread_id" => run.thread_id.as_deref(),
        "bot_id" => run.bot_id.as_deref(),
        "workspace_id" => run.workspace_id.as_deref(),
        "group_key" => run.group_key.as_deref(),
        _ => None,
    };
    group.filter(|g| !g.is_empty()).or(run.partition_key.as_deref()).or(run.group_key.as_deref()).unwrap_or(&run.run_id)
}

impl Store {
    /// Declares `queue` a logical queue of `partitions` physical queues.
    /// Idempotent with the same count; another count is [`Error::Conflict`].
    pub async fn declare_partitions(&self, queue: &str, partitions: u32) -> Result<()> {
        validate::id("queue_name", queue)?;
        if !(2..=MAX_PARTITIONS).contains(&partitions) {
            return Err(Error::Invalid(format!("partitions must be 2..={MAX_PARTITIONS}, got {partitions}")));
        }
        let mut conn = self.conn().await?;
        let key = self.global().partitions();
        let _: bool = redis::cmd("HSETNX")
            .arg(&key)
            .arg(queue)
            .arg(partitions)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        let stored: Option<u32> =
            redis::cmd("HGET").arg(&key).arg(queue).query_async(&mut conn).await.map_err(|e| self.failed(e))?;
        if stored != Some(partitions) {
            return Err(Error::Conflict(format!(
                "queue {queue} already has {} partitions; the count cannot change",
                stored.unwrap_or(0)
            )));
        }
        for i in 0..partitions {
            self.queue_number(&partition_name(queue, i)).await?;
        }
        let mut cache = lock(&self.inner.partitions);
        cache.counts.insert(queue.to_string(), partitions);
        Ok(())
    }

    /// Every partitioned queue with its partition count.
    pub async fn partition_counts(&self) -> Result<HashMap<String, u32>> {
        {
            let cache = lock(&self.inner.partitions);
            if cache.read_at.is_some_and(|at| at.elapsed() < REFRESH) {
                return Ok(cache.counts.clone());
            }
        }
        let mut conn = self.conn().await?;
        let counts: HashMap<String, u32> = redis::cmd("HGETALL")
            .arg(self.global().partitions())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        let mut cache = lock(&self.inner.partitions);
        cache.counts = counts.clone();
        cache.read_at = Some(Instant::now());
        Ok(counts)
    }

    /// The physical queues of one queue: its partitions, or itself.
    pub async fn partitions(&self, queue: &str) -> Result<Vec<String>> {
        Ok(match self.partition_counts().await?.get(queue) {
            Some(&p) if p > 1 => (0..p).map(|i| partition_name(queue, i)).collect(),
            _ => vec![queue.to_string()],
        })
    }

    /// The physical queues of several queues, in order (partitions of one
    /// queue together, in partition order).
    pub async fn physical_queues(&self, queues: &[String]) -> Result<Vec<String>> {
        let counts = self.partition_counts().await?;
        let mut out = Vec::with_capacity(queues.len());
        for queue in queues {
            match counts.get(queue) {
                Some(&p) if p > 1 => out.extend((0..p).map(|i| partition_name(queue, i))),
                _ => out.push(queue.clone()),
            }
        }
        Ok(out)
    }

    /// Like [`Store::physical_queues`] for a claim: each queue's partitions
    /// start at the next one in rotation, so no partition starves.
    pub(crate) async fn claim_order(&self, queues: &[String]) -> Result<Vec<String>> {
        let counts = self.partition_counts().await?;
        let turn = self.inner.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as u32;
        let mut out = Vec::with_capacity(queues.len());
        for queue in queues {
            match counts.get(queue) {
                Some(&p) if p > 1 => out.extend((0..p).map(|i| partition_name(queue, (i + turn) % p))),
                _ => out.push(queue.clone()),
            }
        }
        Ok(out)
    }

    /// The `group_by` of partitioned `queue` ('' = none), as stored in its
    /// first partition (every call of `set_groups` sets them all alike), at
    /// most [`REFRESH`] old; `fresh` reads it again.
    pub(crate) async fn partition_group_by(&self, queue: &str, fresh: bool) -> Result<String> {
        if !fresh {
            let cache = lock(&self.inner.partitions);
            if let Some((at, by)) = cache.group_by.get(queue)
                && at.elapsed() < REFRESH
            {
                return Ok(by.clone());
            }
        }
        let mut conn = self.conn().await?;
        let by: Option<String> = redis::cmd("HGET")
            .arg(self.queue_keys(&partition_name(queue, 0)).meta())
            .arg("group_by")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        let by = by.unwrap_or_default();
        self.remember_group_by(queue, &by);
        Ok(by)
    }

    /// What this process just set as `queue`'s `group_by` (see `set_groups`).
    pub(crate) fn remember_group_by(&self, queue: &str, by: &str) {
        lock(&self.inner.partitions).group_by.insert(queue.to_string(), (Instant::now(), by.to_string()));
    }

    /// The physical queue a new run of `queue` goes to.
    pub(crate) fn place(counts: &HashMap<String, u32>, queue: &str, key: &str) -> String {
        match counts.get(queue) {
            Some(&p) if p > 1 => partition_name(queue, partition_index(key, p)),
            _ => queue.to_string(),
        }
    }
}
