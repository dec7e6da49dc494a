//! Rate limits and caps: at most N claims per window of a queue or of one of
//! its groups, and at most N queued runs in a queue, a group or a workspace.
//!
//! Like groups, the rules live in the queue's slot (`lua/set_limits.lua`)
//! and are enforced by the scripts themselves (see "Limits" in
//! `lua/include/queue.lua`): a claim past the queue's rate answers when the
//! next one is allowed (a [`super::Waiter`] sleeps until then), a group past
//! its rate leaves the claim lanes until its window ends, and a create past
//! a cap fails with [`Error::QueueFull`] having written nothing.
//!
//! A partitioned queue holds its runs in several slots: its queue-wide rate
//! limit and cap are split over the partitions (their sum is the limit, so
//! partitions never multiply it). Groups and workspaces are counted where
//! their runs live: a run of a grouped queue is placed by its group, so a
//! group lives in one partition and its limits (its own ones too) hold
//! whole; a workspace that spans partitions is capped in each.

use std::time::Duration;

use serde::Serialize;

use super::{Store, reply};
use crate::error::{Error, Result};
use crate::validate;

/// At most `max` claims per `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    pub max: u32,
    #[serde(serialize_with = "window_seconds")]
    pub window: Duration,
}

fn window_seconds<S: serde::Serializer>(window: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(window.as_secs_f64())
}

/// A change of a queue's limits: `None` keeps what is set, `Some(None)`
/// removes it.
#[derive(Clone, Debug, Default)]
pub struct LimitSettings {
    /// Claims of the whole queue per window.
    pub rate: Option<Option<RateLimit>>,
    /// Claims of each group per window.
    pub group_rate: Option<Option<RateLimit>>,
    /// Queued runs in the queue.
    pub cap: Option<Option<u32>>,
    /// Queued runs of one group.
    pub group_cap: Option<Option<u32>>,
    /// Queued runs of one workspace (`workspace_id`).
    pub workspace_cap: Option<Option<u32>>,
    /// Groups' own rate limits, in place of `group_rate` for them: `Some`
    /// sets one (a `max` of 0 holds the group's claims), `None` drops it.
    pub group_rate_overrides: Vec<(String, Option<RateLimit>)>,
    /// Groups' own caps, in place of `group_cap` for them: `Some(n)` sets
    /// one (0 refuses every new queued run of the group), `None` drops it.
    pub group_cap_overrides: Vec<(String, Option<u32>)>,
}

/// A queue's limits as stored (for a partitioned queue: the sum over its partitions).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct QueueLimits {
    pub queue_name: String,
    pub rate: Option<RateLimit>,
    pub group_rate: Option<RateLimit>,
    pub cap: Option<u32>,
    pub group_cap: Option<u32>,
    pub workspace_cap: Option<u32>,
    /// Groups with a rate limit of their own, sorted by name.
    pub group_rate_limits: Vec<(String, RateLimit)>,
    /// Groups with a cap of their own, sorted by name.
    pub group_caps: Vec<(String, u32)>,
}

/// The most per-group overrides of one kind in one call (one script call
/// carries them all).
pub const MAX_OVERRIDES: usize = 1000;

const MAX_LIMIT: u32 = 1_000_000_000;
const MAX_WINDOW: Duration = Duration::from_secs(86_400);

impl Store {
    /// Sets the rate limits and caps of `queue`. A rate limit holds from the
    /// next claim; a cap refuses creates from now on (runs queued past a
    /// lower cap stay queued).
    pub async fn set_limits(&self, queue: &str, settings: &LimitSettings) -> Result<QueueLimits> {
        validate::id("queue_name", queue)?;
        check_rate("rate limit", settings.rate)?;
        check_rate("group rate limit", settings.group_rate)?;
        for (name, cap) in
            [("cap", settings.cap), ("group cap", settings.group_cap), ("workspace cap", settings.workspace_cap)]
        {
            if let Some(Some(n)) = cap
                && !(1..=MAX_LIMIT).contains(&n)
            {
                return Err(Error::Invalid(format!("{name} must be in 1..={MAX_LIMIT}, got {n}")));
            }
        }
        check_overrides(settings)?;
        let partitions = self.physical_queues(&[queue.to_string()]).await?;
        let count = partitions.len() as u32;
        for (name, limit) in [("rate limit", settings.rate.flatten().map(|r| r.max)), ("cap", settings.cap.flatten())] {
            if let Some(n) = limit
                && n < count
            {
                return Err(Error::Invalid(format!(
                    "the {name} of {queue} ({n}) is split over its {count} partitions: it must be at least {count}"
                )));
            }
        }
        let mut total: Option<QueueLimits> = None;
        for (i, physical) in partitions.iter().enumerate() {
            let share = |n: u32| n / count + u32::from((i as u32) < n % count);
            let keys = self.queue_keys(physical);
            let (rate, window) = rate_args(settings.rate, share);
            let (group_rate, group_window) = rate_args(settings.group_rate, |n| n);
            let mut args = vec![
                keys.base.clone(),
                rate,
                window,
                group_rate,
                group_window,
                cap_arg(settings.cap, share),
                cap_arg(settings.group_cap, |n| n),
                cap_arg(settings.workspace_cap, |n| n),
                settings.group_rate_overrides.len().to_string(),
            ];
            // A group lives in one partition (see runs.rs, placement): its own
            // limits are not split.
            for (group, rate) in &settings.group_rate_overrides {
                args.push(group.clone());
                match rate {
                    Some(r) => args.extend([r.max.to_string(), r.window.as_millis().to_string()]),
                    None => args.extend([String::new(), String::new()]),
                }
            }
            for (group, cap) in &settings.group_cap_overrides {
                args.push(group.clone());
                args.push(cap.map(|n| n.to_string()).unwrap_or_default());
            }
            let value = self.eval(&self.scripts().set_limits, &keys.fixed(), &args).await?;
            let limits = parse_limits(queue, value)?;
            total = Some(match total {
                None => limits,
                Some(sum) => QueueLimits {
                    rate: sum.rate.zip(limits.rate).map(|(a, b)| RateLimit { max: a.max + b.max, ..a }),
                    cap: sum.cap.zip(limits.cap).map(|(a, b)| a + b),
                    ..sum
                },
            });
        }
        total.ok_or_else(|| Error::Protocol("set_limits: a queue without partitions".into()))
    }

    /// The limits of `queue`.
    pub async fn queue_limits(&self, queue: &str) -> Result<QueueLimits> {
        self.set_limits(queue, &LimitSettings::default()).await
    }
}

fn check_overrides(settings: &LimitSettings) -> Result<()> {
    for (what, n) in
        [("rate limits", settings.group_rate_overrides.len()), ("caps", settings.group_cap_overrides.len())]
    {
        if n > MAX_OVERRIDES {
            return Err(Error::Invalid(format!("at most {MAX_OVERRIDES} groups' own {what} per call, got {n}")));
        }
    }
    for (group, rate) in &settings.group_rate_overrides {
        validate::id("group", group)?;
        if let Some(rate) = rate {
            if rate.max > MAX_LIMIT {
                return Err(Error::Invalid(format!(
                    "the rate limit of group {group} must be in 0..={MAX_LIMIT} claims, got {}",
                    rate.max
                )));
            }
            check_window(&format!("rate limit of group {group}"), rate.window)?;
        }
    }
    for (group, cap) in &settings.group_cap_overrides {
        validate::id("group", group)?;
        if let Some(n) = cap
            && *n > MAX_LIMIT
        {
            return Err(Error::Invalid(format!("the cap of group {group} must be in 0..={MAX_LIMIT}, got {n}")));
        }
    }
    Ok(())
}

fn check_window(name: &str, window: Duration) -> Result<()> {
    // Whole milliseconds: the script stores ms, and a window that rounds to 0 would never end.
    if window < Duration::from_millis(1) || window > MAX_WINDOW {
        return Err(Error::Invalid(format!("the window of the {name} must be 1 ms ..= 24 h, got {window:?}")));
    }
    Ok(())
}

fn check_rate(name: &str, rate: Option<Option<RateLimit>>) -> Result<()> {
    let Some(Some(rate)) = rate else { return Ok(()) };
    if !(1..=MAX_LIMIT).contains(&rate.max) {
        return Err(Error::Invalid(format!("{name} must be in 1..={MAX_LIMIT} claims, got {}", rate.max)));
    }
    check_window(name, rate.window)
}

/// The script's limit and window arguments: '' keeps, '0' removes.
fn rate_args(rate: Option<Option<RateLimit>>, share: impl Fn(u32) -> u32) -> (String, String) {
    match rate {
        None => (String::new(), String::new()),
        Some(None) => ("0".into(), String::new()),
        Some(Some(r)) => (share(r.max).to_string(), r.window.as_millis().to_string()),
    }
}

fn cap_arg(cap: Option<Option<u32>>, share: impl Fn(u32) -> u32) -> String {
    match cap {
        None => String::new(),
        Some(None) => "0".into(),
        Some(Some(n)) => share(n).to_string(),
    }
}

fn parse_limits(queue: &str, value: redis::Value) -> Result<QueueLimits> {
    let mut parts = reply::array(value)?;
    if parts.len() != 9 {
        return Err(Error::Protocol("set_limits: a reply of the wrong length".into()));
    }
    let own_caps = strings(parts.pop())?;
    let own_rates = strings(parts.pop())?;
    let items = parts.into_iter().map(reply::string).collect::<Result<Vec<String>>>()?;
    let number = |v: &String| -> Result<Option<u32>> {
        if v.is_empty() {
            return Ok(None);
        }
        v.parse::<u32>().map(Some).map_err(|_| Error::Protocol(format!("set_limits: not a limit: {v}")))
    };
    let [rate, window, group_rate, group_window, cap, group_cap, workspace_cap] = items.as_slice() else {
        return Err(Error::Protocol("set_limits: a reply of the wrong length".into()));
    };
    let rate_of = |max: &String, window: &String| -> Result<Option<RateLimit>> {
        Ok(match (number(max)?, number(window)?) {
            (Some(max), Some(ms)) => Some(RateLimit { max, window: Duration::from_millis(u64::from(ms)) }),
            (Some(max), None) => Some(RateLimit { max, window: Duration::from_secs(1) }),
            _ => None,
        })
    };
    let mut group_rate_limits = own_rates
        .chunks(2)
        .map(|pair| {
            let bad = || Error::Protocol(format!("set_limits: not a group rate limit: {pair:?}"));
            let [group, value] = pair else { return Err(bad()) };
            let (max, ms) = value.split_once('/').ok_or_else(bad)?;
            let max = max.parse::<u32>().map_err(|_| bad())?;
            let ms = ms.parse::<u64>().map_err(|_| bad())?;
            Ok((group.clone(), RateLimit { max, window: Duration::from_millis(ms) }))
        })
        .collect::<Result<Vec<_>>>()?;
    group_rate_limits.sort_by(|a, b| a.0.cmp(&b.0));
    let mut group_caps = own_caps
        .chunks(2)
        .map(|pair| match pair {
            [group, n] => number(n)?
                .map(|n| (group.clone(), n))
                .ok_or_else(|| Error::Protocol(format!("set_limits: an empty cap of group {group}"))),
            _ => Err(Error::Protocol("set_limits: an odd list of group caps".into())),
        })
        .collect::<Result<Vec<_>>>()?;
    group_caps.sort();
    Ok(QueueLimits {
        queue_name: queue.to_string(),
        rate: rate_of(rate, window)?,
        group_rate: rate_of(group_rate, group_window)?,
        cap: number(cap)?,
        group_cap: number(group_cap)?,
        workspace_cap: number(workspace_cap)?,
        group_rate_limits,
        group_caps,
    })
}

fn strings(value: Option<redis::Value>) -> Result<Vec<String>> {
    let value = value.ok_or_else(|| Error::Protocol("set_limits: short reply".into()))?;
    reply::array(value)?.into_iter().map(reply::string).collect()
}
