//! Groups and pause: per-queue limits on how many runs of one group (a
//! conversation, thread, bot, workspace, or an explicit `group_key`) are
//! claimed at once, and pausing a queue or one group of it.
//!
//! The rules live in Redis, in the queue's slot (`lua/set_groups.lua`,
//! `lua/pause.lua`), and are enforced by the scripts that move runs: a run
//! of a group enters its claim lane only while its group has a free slot
//! (see "Groups" in `lua/include/queue.lua`), so the claim stays one
//! O(log n) pick and every host and worker sees the same limits. For a
//! partitioned queue each call applies to every partition, and its runs are
//! placed by their group (see `partitions.rs`), so a group's limit holds in
//! the one partition that holds the group.

use serde::Serialize;

use super::{Store, reply};
use crate::error::{Error, Result};
use crate::validate;

/// The run field that names a run's group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    ConversationId,
    ThreadId,
    BotId,
    WorkspaceId,
    /// The `group_key` given at create.
    GroupKey,
}

impl GroupBy {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::ConversationId => "conversation_id",
            GroupBy::ThreadId => "thread_id",
            GroupBy::BotId => "bot_id",
            GroupBy::WorkspaceId => "workspace_id",
            GroupBy::GroupKey => "group_key",
        }
    }
}

impl std::str::FromStr for GroupBy {
    type Err = Error;
    fn from_str(text: &str) -> Result<GroupBy> {
        Ok(match text {
            "conversation_id" | "conversation" => GroupBy::ConversationId,
            "thread_id" | "thread" => GroupBy::ThreadId,
            "bot_id" | "bot" => GroupBy::BotId,
            "workspace_id" | "workspace" => GroupBy::WorkspaceId,
            "group_key" => GroupBy::GroupKey,
            _ => {
                return Err(Error::Invalid(format!(
                    "group_by must be conversation_id, thread_id, bot_id, workspace_id or group_key, got {text:?}"
                )));
            }
        })
    }
}

/// A change of a queue's group settings; `None` keeps what is set.
#[derive(Clone, Debug, Default)]
pub struct GroupSettings {
    /// `Some(None)`: the queue no longer groups (waiting runs are admitted).
    pub group_by: Option<Option<GroupBy>>,
    /// Runs of one group claimed at once (1 ..= 1,000,000; default 1).
    pub concurrency: Option<u32>,
    /// Per-group limits: `Some(n)` sets one (0 holds the group), `None` drops it.
    pub overrides: Vec<(String, Option<u32>)>,
}

/// A queue's group settings as stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueGroups {
    pub queue_name: String,
    /// `None`: the queue does not group its runs.
    pub group_by: Option<String>,
    pub group_concurrency: u32,
    /// Groups with a limit of their own, sorted by name.
    pub group_limits: Vec<(String, u32)>,
}

const MAX_LIMIT: u32 = 1_000_000;

impl Store {
    /// Sets how runs of `queue` are grouped and limited. Takes effect for runs
    /// created from now on; groups with queued runs are rebalanced at once.
    pub async fn set_groups(&self, queue: &str, settings: &GroupSettings) -> Result<QueueGroups> {
        validate::id("queue_name", queue)?;
        if let Some(n) = settings.concurrency
            && !(1..=MAX_LIMIT).contains(&n)
        {
            return Err(Error::Invalid(format!("group concurrency must be in 1..={MAX_LIMIT}, got {n}")));
        }
        for (group, limit) in &settings.overrides {
            validate::id("group", group)?;
            if let Some(n) = limit
                && *n > MAX_LIMIT
            {
                return Err(Error::Invalid(format!("the limit of group {group} must be in 0..={MAX_LIMIT}, got {n}")));
            }
        }
        let by = match settings.group_by {
            None => "-".to_string(),
            Some(None) => String::new(),
            Some(Some(by)) => by.as_str().to_string(),
        };
        let mut last = None;
        let physical_queues = self.physical_queues(&[queue.to_string()]).await?;
        let partitioned = physical_queues.len() > 1;
        for physical in physical_queues {
            let keys = self.queue_keys(&physical);
            let mut args =
                vec![keys.base.clone(), by.clone(), settings.concurrency.map(|n| n.to_string()).unwrap_or_default()];
            for (group, limit) in &settings.overrides {
                args.push(group.clone());
                args.push(limit.map(|n| n.to_string()).unwrap_or_default());
            }
            last = Some(self.eval(&self.scripts().set_groups, &keys.fixed(), &args).await?);
        }
        let value = last.ok_or_else(|| Error::Protocol("set_groups: a queue without partitions".into()))?;
        let groups = parse_groups(queue, value)?;
        // This process places the queue's next runs by the new setting at once
        // (others within the partition cache's refresh, or at their next
        // create the script refuses as misplaced).
        if partitioned {
            self.remember_group_by(queue, groups.group_by.as_deref().unwrap_or_default());
        }
        Ok(groups)
    }

    /// The group settings of `queue` (of its first partition, which every
    /// call of [`Store::set_groups`] sets alike).
    pub async fn queue_groups(&self, queue: &str) -> Result<QueueGroups> {
        self.set_groups(queue, &GroupSettings::default()).await
    }

    /// Pauses `queue` (or one group of it, with `group`): claims skip it, its
    /// runs stay queued. `by` (who asks) goes into the queue's audit stream.
    /// Returns false when it was paused already.
    pub async fn pause(&self, queue: &str, group: Option<&str>, by: Option<&str>) -> Result<bool> {
        self.set_paused(queue, group, by, true).await
    }

    /// Resumes what [`Store::pause`] paused. Returns false when it was not paused.
    pub async fn resume(&self, queue: &str, group: Option<&str>, by: Option<&str>) -> Result<bool> {
        self.set_paused(queue, group, by, false).await
    }

    /// The paused groups of `queue` (of any of its partitions), sorted; at
    /// most `limit` of them (1 ..= 1000), which ones unspecified when more are
    /// paused. For the dashboard's list: [`QueueStats::paused_groups`] counts them all.
    ///
    /// [`QueueStats::paused_groups`]: crate::QueueStats::paused_groups
    pub async fn paused_groups(&self, queue: &str, limit: usize) -> Result<Vec<String>> {
        validate::id("queue_name", queue)?;
        let limit = limit.clamp(1, 1000);
        let mut found = std::collections::BTreeSet::new();
        let mut conn = self.conn().await?;
        for physical in self.physical_queues(&[queue.to_string()]).await? {
            let key = self.queue_keys(&physical).paused_groups();
            // SSCAN, not SMEMBERS: an operator may have paused any number of groups.
            let mut cursor = 0u64;
            loop {
                let (next, members): (u64, Vec<String>) = redis::cmd("SSCAN")
                    .arg(&key)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(100)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.failed(e))?;
                found.extend(members);
                cursor = next;
                if cursor == 0 || found.len() >= limit {
                    break;
                }
            }
        }
        Ok(found.into_iter().take(limit).collect())
    }

    async fn set_paused(&self, queue: &str, group: Option<&str>, by: Option<&str>, pause: bool) -> Result<bool> {
        validate::id("queue_name", queue)?;
        validate::opt_id("group", group)?;
        let by = by.unwrap_or_default();
        if by.len() > 200 || by.chars().any(char::is_control) {
            return Err(Error::Invalid("by must be at most 200 bytes of text without control characters".into()));
        }
        let mut changed = false;
        for physical in self.physical_queues(&[queue.to_string()]).await? {
            let keys = self.queue_keys(&physical);
            let args = vec![
                keys.base.clone(),
                if pause { "1" } else { "0" }.to_string(),
                group.unwrap_or_default().to_string(),
                by.to_string(),
            ];
            let value = self.eval(&self.scripts().pause, &keys.fixed(), &args).await?;
            let parts = reply::array(value)?;
            changed |= parts.into_iter().next().map(reply::int).transpose()?.unwrap_or(0) == 1;
        }
        Ok(changed)
    }
}

fn parse_groups(queue: &str, value: redis::Value) -> Result<QueueGroups> {
    let items = reply::array(value)?.into_iter().map(reply::string).collect::<Result<Vec<String>>>()?;
    let number = |v: &str| v.parse::<u32>().map_err(|_| Error::Protocol(format!("set_groups: not a limit: {v}")));
    let [by, limit, rest @ ..] = items.as_slice() else {
        return Err(Error::Protocol("set_groups: short reply".into()));
    };
    let mut group_limits = rest
        .chunks(2)
        .map(|pair| match pair {
            [g, n] => Ok((g.clone(), number(n)?)),
            _ => Err(Error::Protocol("set_groups: an odd list of group limits".into())),
        })
        .collect::<Result<Vec<_>>>()?;
    group_limits.sort();
    Ok(QueueGroups {
        queue_name: queue.to_string(),
        group_by: (!by.is_empty()).then(|| by.clone()),
        group_concurrency: number(limit)?,
        group_limits,
    })
}
