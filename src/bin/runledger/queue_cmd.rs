//! `runledger queue`: a queue's rules. `set` configures its groups (which
//! run field is the group, how many runs of one group are claimed at once,
//! per-group limits), its rate limits and its caps; `pause` and `resume` stop
//! and restart its claims (the whole queue or one group), `show` prints the
//! settings and what is paused.

use std::time::Duration;

use clap::{Args, Subcommand};
use runledger::{Error, GroupBy, GroupSettings, LimitSettings, QueueGroups, QueueLimits, RateLimit, Result, Store};

use crate::output::Output;

#[derive(Args)]
pub struct QueueArgs {
    #[command(subcommand)]
    action: QueueAction,
}

#[derive(Subcommand)]
enum QueueAction {
    /// Configure the queue's groups, rate limits and caps; what is not given is kept.
    Set(SetArgs),
    /// Print the queue's group settings, rate limits, caps, and what is paused.
    Show { queue: String },
    /// Stop claims of the queue, or of one group of it; runs stay queued.
    Pause(PauseArgs),
    /// Restart what `pause` stopped.
    Resume(PauseArgs),
}

#[derive(Args)]
struct SetArgs {
    queue: String,
    /// conversation_id, thread_id, bot_id, workspace_id, group_key, or none (the queue stops grouping).
    #[arg(long)]
    group_by: Option<String>,
    /// Runs of one group claimed at once (default 1).
    #[arg(long)]
    group_concurrency: Option<u32>,
    /// GROUP=N: a limit of one group's own (0 holds it); GROUP= drops it. Repeat.
    #[arg(long = "group-limit", value_name = "GROUP=N")]
    group_limits: Vec<String>,
    /// At most N claims of the queue per SECS seconds (N alone: per second); 0 removes it.
    #[arg(long, value_name = "N[/SECS]")]
    rate_limit: Option<String>,
    /// At most N claims of each group per SECS seconds; 0 removes it.
    #[arg(long, value_name = "N[/SECS]")]
    group_rate_limit: Option<String>,
    /// At most N runs queued in the queue (a create past it fails, exit 6); 0 removes it.
    #[arg(long, value_name = "N")]
    cap: Option<u32>,
    /// At most N runs queued in each group; 0 removes it.
    #[arg(long, value_name = "N")]
    group_cap: Option<u32>,
    /// At most N runs queued of each workspace (workspace_id); 0 removes it.
    #[arg(long, value_name = "N")]
    workspace_cap: Option<u32>,
    /// GROUP=N[/SECS]: a rate limit of one group's own, in place of --group-rate-limit
    /// (0 holds the group's claims); GROUP= drops it. Repeat.
    #[arg(long = "group-rate-limit-for", value_name = "GROUP=N[/SECS]")]
    group_rate_limits_for: Vec<String>,
    /// GROUP=N: a cap of one group's own, in place of --group-cap (0 refuses every
    /// new queued run of the group); GROUP= drops it. Repeat.
    #[arg(long = "group-cap-for", value_name = "GROUP=N")]
    group_caps_for: Vec<String>,
}

#[derive(Args)]
struct PauseArgs {
    queue: String,
    /// Only this group of the queue.
    #[arg(long)]
    group: Option<String>,
    /// Who asks, for the queue's audit stream (default: $USER).
    #[arg(long)]
    by: Option<String>,
}

pub async fn run(store: &Store, out: &Output, a: QueueArgs) -> Result<()> {
    match a.action {
        QueueAction::Set(a) => {
            let group_by = match a.group_by.as_deref() {
                None => None,
                Some("none") => Some(None),
                Some(text) => Some(Some(text.parse::<GroupBy>()?)),
            };
            let overrides =
                a.group_limits.iter().map(|pair| group_value("--group-limit", pair)).collect::<Result<Vec<_>>>()?;
            let group_rate_overrides =
                a.group_rate_limits_for.iter().map(|pair| group_rate_limit(pair)).collect::<Result<Vec<_>>>()?;
            let group_cap_overrides =
                a.group_caps_for.iter().map(|pair| group_value("--group-cap-for", pair)).collect::<Result<Vec<_>>>()?;
            let groups = GroupSettings { group_by, concurrency: a.group_concurrency, overrides };
            let limits = LimitSettings {
                rate: a.rate_limit.as_deref().map(|v| rate_limit("--rate-limit", v)).transpose()?,
                group_rate: a.group_rate_limit.as_deref().map(|v| rate_limit("--group-rate-limit", v)).transpose()?,
                cap: a.cap.map(|n| (n > 0).then_some(n)),
                group_cap: a.group_cap.map(|n| (n > 0).then_some(n)),
                workspace_cap: a.workspace_cap.map(|n| (n > 0).then_some(n)),
                group_rate_overrides,
                group_cap_overrides,
            };
            // Limits first: a refused limit leaves the groups as they were too.
            let limits = store.set_limits(&a.queue, &limits).await?;
            print_rules(out, &store.set_groups(&a.queue, &groups).await?, &limits, None);
        }
        QueueAction::Show { queue } => {
            let limits = store.queue_limits(&queue).await?;
            let groups = store.queue_groups(&queue).await?;
            let stats = store.queue_stats(&queue, 0).await?;
            let pauses = Pauses {
                queue: stats.paused,
                groups: store.paused_groups(&queue, PAUSED_GROUPS_SHOWN).await?,
                group_count: stats.paused_groups,
            };
            print_rules(out, &groups, &limits, Some(&pauses));
        }
        QueueAction::Pause(a) => pause(store, out, a, true).await?,
        QueueAction::Resume(a) => pause(store, out, a, false).await?,
    }
    Ok(())
}

/// `GROUP=N` or `GROUP=` (a group's own value dropped).
fn group_value(flag: &str, pair: &str) -> Result<(String, Option<u32>)> {
    let Some((group, limit)) = pair.rsplit_once('=') else {
        return Err(Error::Invalid(format!("{flag} takes GROUP=N, got {pair:?}")));
    };
    if limit.is_empty() {
        return Ok((group.to_string(), None));
    }
    let n = limit.parse().map_err(|_| Error::Invalid(format!("{flag} {pair:?}: N must be a whole number")))?;
    Ok((group.to_string(), Some(n)))
}

/// `GROUP=N[/SECS]` (N = 0 holds the group) or `GROUP=`.
fn group_rate_limit(pair: &str) -> Result<(String, Option<RateLimit>)> {
    const FLAG: &str = "--group-rate-limit-for";
    let Some((group, limit)) = pair.rsplit_once('=') else {
        return Err(Error::Invalid(format!("{FLAG} takes GROUP=N[/SECS], got {pair:?}")));
    };
    if limit.is_empty() {
        return Ok((group.to_string(), None));
    }
    let (max, window) = parse_rate(FLAG, limit)?;
    Ok((group.to_string(), Some(RateLimit { max, window })))
}

/// `N` (per second), `N/SECS`, or `0` (no limit).
fn rate_limit(flag: &str, text: &str) -> Result<Option<RateLimit>> {
    let (max, window) = parse_rate(flag, text)?;
    Ok((max > 0).then_some(RateLimit { max, window }))
}

/// `N` or `N/SECS`: the claims and the window.
fn parse_rate(flag: &str, text: &str) -> Result<(u32, Duration)> {
    let bad = || Error::Invalid(format!("{flag} takes N or N/SECS (claims per seconds), got {text:?}"));
    let (max, secs) = text.split_once('/').unwrap_or((text, "1"));
    let max: u32 = max.trim().parse().map_err(|_| bad())?;
    let secs: f64 = secs.trim().parse().map_err(|_| bad())?;
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 {
        return Err(Error::Invalid(format!("{flag} {text:?}: the window must be more than 0 and at most 86400 s")));
    }
    Ok((max, Duration::from_secs_f64(secs)))
}

async fn pause(store: &Store, out: &Output, a: PauseArgs, paused: bool) -> Result<()> {
    let by = a.by.or_else(|| std::env::var("USER").ok());
    let changed = if paused {
        store.pause(&a.queue, a.group.as_deref(), by.as_deref()).await?
    } else {
        store.resume(&a.queue, a.group.as_deref(), by.as_deref()).await?
    };
    let what = match &a.group {
        Some(g) => format!("group {g} of queue {}", a.queue),
        None => format!("queue {}", a.queue),
    };
    if out.json {
        out.json(&serde_json::json!({
            "queue_name": a.queue, "group": a.group, "paused": paused, "changed": changed,
        }));
    } else {
        let state = if paused { "paused" } else { "resumed" };
        println!("{what} {}{state}", if changed { "" } else { "was already " });
    }
    Ok(())
}

/// Paused groups `queue show` lists; past that it says how many it left out.
const PAUSED_GROUPS_SHOWN: usize = 100;

/// What `queue show` adds to the settings: the queue's pause and its paused groups.
struct Pauses {
    queue: bool,
    groups: Vec<String>,
    /// All the paused groups, `groups` being at most [`PAUSED_GROUPS_SHOWN`] of them.
    group_count: i64,
}

fn print_rules(out: &Output, groups: &QueueGroups, limits: &QueueLimits, pauses: Option<&Pauses>) {
    if out.json {
        let mut value = serde_json::json!(groups);
        if let (Some(object), serde_json::Value::Object(more)) = (value.as_object_mut(), serde_json::json!(limits)) {
            object.extend(more);
            if let Some(p) = pauses {
                object.insert("paused".into(), p.queue.into());
                object.insert("paused_groups".into(), serde_json::json!(p.groups));
                object.insert("paused_group_count".into(), p.group_count.into());
            }
        }
        out.json(&value);
        return;
    }
    if let Some(p) = pauses {
        if p.queue {
            println!("{}: paused (claims hand out nothing until `queue resume`)", groups.queue_name);
        }
        for g in &p.groups {
            println!("  group {g}: paused");
        }
        let more = p.group_count - p.groups.len() as i64;
        if more > 0 {
            println!("  and {more} more paused groups");
        }
    }
    match &groups.group_by {
        None => println!("{}: runs are not grouped", groups.queue_name),
        Some(by) => {
            println!("{}: grouped by {by}, {} claimed at once per group", groups.queue_name, groups.group_concurrency);
            for (g, n) in &groups.group_limits {
                println!("  group {g}: {n}");
            }
        }
    }
    let rate = |r: &RateLimit| format!("{} claims per {} s", r.max, r.window.as_secs_f64());
    if let Some(r) = &limits.rate {
        println!("  rate limit: {}", rate(r));
    }
    if let Some(r) = &limits.group_rate {
        println!("  rate limit per group: {}", rate(r));
    }
    for (g, r) in &limits.group_rate_limits {
        println!("  rate limit of group {g}: {}", rate(r));
    }
    for (what, cap) in [("queue", limits.cap), ("group", limits.group_cap), ("workspace", limits.workspace_cap)] {
        if let Some(n) = cap {
            println!("  cap per {what}: {n} queued runs");
        }
    }
    for (g, n) in &limits.group_caps {
        println!("  cap of group {g}: {n} queued runs");
    }
}
