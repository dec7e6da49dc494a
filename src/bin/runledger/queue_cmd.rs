//! `runledger queue`: a queue's rules. `set` configures its groups (which
//! run field is the group, how many runs of one group are claimed at once,
//! per-group limits), `pause` and `resume` stop and restart its claims (the
//! whole queue or one group), `show` prints the settings.

use clap::{Args, Subcommand};
use runledger::{Error, GroupBy, GroupSettings, QueueGroups, Result, Store};

use crate::output::Output;

#[derive(Args)]
pub struct QueueArgs {
    #[command(subcommand)]
    action: QueueAction,
}

#[derive(Subcommand)]
enum QueueAction {
    /// Configure the queue's groups; what is not given is kept.
    Set(SetArgs),
    /// Print the queue's group settings.
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
            let overrides = a.group_limits.iter().map(|pair| group_limit(pair)).collect::<Result<Vec<_>>>()?;
            let settings = GroupSettings { group_by, concurrency: a.group_concurrency, overrides };
            print_groups(out, &store.set_groups(&a.queue, &settings).await?);
        }
        QueueAction::Show { queue } => print_groups(out, &store.queue_groups(&queue).await?),
        QueueAction::Pause(a) => pause(store, out, a, true).await?,
        QueueAction::Resume(a) => pause(store, out, a, false).await?,
    }
    Ok(())
}

/// `GROUP=N` or `GROUP=`.
fn group_limit(pair: &str) -> Result<(String, Option<u32>)> {
    let Some((group, limit)) = pair.rsplit_once('=') else {
        return Err(Error::Invalid(format!("--group-limit takes GROUP=N, got {pair:?}")));
    };
    if limit.is_empty() {
        return Ok((group.to_string(), None));
    }
    let n = limit.parse().map_err(|_| Error::Invalid(format!("--group-limit {pair:?}: N must be a whole number")))?;
    Ok((group.to_string(), Some(n)))
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

fn print_groups(out: &Output, groups: &QueueGroups) {
    if out.json {
        out.json(groups);
        return;
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
}
