//! Printing results: the seed's JSON with `--json`, short text otherwise.

use chrono::{TimeZone, Utc};
use runledger::{EventPage, QueueStats, Run, RunEvent, RunPage, Runtime};
use serde::Serialize;

pub struct Output {
    pub json: bool,
}

pub fn time(epoch_s: Option<i64>) -> String {
    match epoch_s.and_then(|s| Utc.timestamp_opt(s, 0).single()) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        None => "-".into(),
    }
}

impl Output {
    pub fn json<T: Serialize>(&self, value: &T) {
        match serde_json::to_string_pretty(value) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("runledger: cannot print JSON: {e}"),
        }
    }

    pub fn json_line<T: Serialize>(&self, value: &T) {
        match serde_json::to_string(value) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("runledger: cannot print JSON: {e}"),
        }
    }

    pub fn run(&self, run: &Run) {
        if self.json {
            return self.json(run);
        }
        println!(
            "run {} (id {})  {}  queue {}  priority {}",
            run.run_id, run.id, run.status, run.queue_name, run.priority
        );
        println!("  runner {}  attempts {}", run.runner_id, run.dispatch_attempts);
        if let Some(holder) = &run.claimed_by_runtime_id {
            println!("  held by {holder} until {}", time(run.claim_lease_expires_at));
        }
        if let Some(token) = &run.claim_token {
            println!("  claim token {token}");
        }
        if let Some(rt) = &run.requested_runtime_id {
            println!("  pinned to runtime {rt}");
        }
        println!(
            "  created {}  started {}  finished {}",
            time(Some(run.created_at)),
            time(run.started_at),
            time(run.finished_at)
        );
        if run.deadline_at.is_some() || run.not_before.is_some() {
            println!("  not before {}  deadline {}", time(run.not_before), time(run.deadline_at));
        }
        if let Some(reason) = &run.status_reason {
            println!("  reason: {reason}");
        }
        if run.cancel_requested_at.is_some() {
            println!("  cancel requested at {}", time(run.cancel_requested_at));
        }
        if run.metadata.as_object().is_some_and(|m| !m.is_empty()) {
            println!("  metadata {}", run.metadata);
        }
        if let Some(usage) = &run.usage {
            println!("  usage {usage}");
        }
        if let Some(cost) = &run.cost {
            println!("  cost {cost}");
        }
    }

    pub fn runs(&self, page: &RunPage) {
        if self.json {
            return self.json(page);
        }
        println!("{:>8}  {:<36}  {:<10}  {:<12}  {:>4}  {:<19}", "ID", "RUN", "STATUS", "QUEUE", "PRIO", "CREATED");
        for run in &page.items {
            println!(
                "{:>8}  {:<36}  {:<10}  {:<12}  {:>4}  {:<19}",
                run.id,
                run.run_id,
                run.status.as_str(),
                run.queue_name,
                run.priority,
                time(Some(run.created_at))
            );
        }
        println!("{} of {} matching runs", page.items.len(), page.total);
        if let Some(next) = page.next_cursor {
            println!("more: --before {next}");
        }
    }

    pub fn event(&self, event: &RunEvent) {
        if self.json {
            return self.json_line(event);
        }
        println!(
            "{:>5}  {}  {:<8}  {:<16}  {}",
            event.sequence,
            time(Some(event.created_at)),
            event.source,
            event.event_type,
            event.data
        );
    }

    pub fn events(&self, page: &EventPage) {
        if self.json {
            return self.json(page);
        }
        for event in &page.items {
            self.event(event);
        }
        if let Some(next) = page.next_cursor {
            println!("more after cursor {next}");
        }
    }

    pub fn runtimes(&self, runtimes: &[Runtime]) {
        if self.json {
            return self.json(&runtimes);
        }
        println!("{:>4}  {:<40}  {:<8}  {:<19}  {:<19}", "ID", "RUNTIME", "STATUS", "LAST HEARTBEAT", "DEADLINE");
        for rt in runtimes {
            println!(
                "{:>4}  {:<40}  {:<8}  {:<19}  {:<19}",
                rt.id,
                rt.runtime_id,
                rt.status,
                time(rt.last_heartbeat_at),
                time(rt.heartbeat_deadline_at)
            );
        }
    }

    pub fn queues(&self, stats: &[QueueStats]) {
        if self.json {
            return self.json(&stats);
        }
        println!(
            "{:<16}  {:>8}  {:>7}  {:>7}  {:>7}  {:>7}  {:>8}  {:>6}  {:>10}",
            "QUEUE", "QUEUED", "PINNED", "DELAYED", "CLAIMED", "RUNNING", "FINISHED", "DEAD", "OLDEST(s)"
        );
        for s in stats {
            let name = if s.partition_of.is_some() { format!("  {}", s.queue_name) } else { s.queue_name.clone() };
            println!(
                "{:<16}  {:>8}  {:>7}  {:>7}  {:>7}  {:>7}  {:>8}  {:>6}  {:>10}",
                name,
                s.queued,
                s.pinned,
                s.delayed,
                s.claimed,
                s.running,
                s.finished,
                s.dead,
                s.oldest_queued_age.map(|a| format!("{a:.1}")).unwrap_or_else(|| "-".into())
            );
            if s.paused {
                println!("    paused: claims hand out nothing until `queue resume`");
            }
            if s.paused_groups > 0 {
                println!("    {} paused group(s); `queue show` lists them", s.paused_groups);
            }
            if let Some(age) = s.oldest_running_age {
                println!(
                    "    oldest running run started {age:.0} s ago (timed out by the reaper after the running timeout)"
                );
            }
            for h in &s.lease_holders {
                println!(
                    "    {} held by {} until {}",
                    h.run_id,
                    h.runtime_id,
                    time(Some(h.claim_lease_expires_at as i64))
                );
            }
            if !s.queued_by_runner.is_empty() {
                let by_runner: Vec<String> = s.queued_by_runner.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("    queued by runner: {}", by_runner.join(" "));
            }
            if !s.counters.is_empty() {
                let counters: Vec<String> = s.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("    totals: {}", counters.join(" "));
            }
        }
    }
}

/// The URL without its passwords (the user's and the sentinels'), to print.
pub fn redacted(url: &str) -> String {
    runledger::store::conn::redact_url(url)
}
