//! The server's own figures, read around each phase of the bench: INFO
//! (memory, CPU, commandstats) and CONFIG GET, which an ACL user limited to
//! its prefix may lack (a refused one makes its figures n/a).

use std::collections::HashMap;
use std::sync::Mutex;

use runledger::{Result, Store};

/// True when the server refused a command rather than failed it: an ACL
/// user without it (NOPERM), or a command renamed away. The figures that
/// need it are then n/a instead of the bench dying.
fn refused(e: &redis::RedisError) -> bool {
    matches!(e.kind(), redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm))
        || (e.code() == Some("ERR")
            && e.detail().is_some_and(|d| d.contains("unknown command") || d.contains("unknown subcommand")))
}

/// The server-wide commands the bench reads its figures with (INFO, CONFIG
/// GET, MEMORY PURGE), which an ACL user limited to its prefix may lack: a
/// refused one says so once on stderr and its figures are n/a.
pub(crate) struct Probe<'a> {
    store: &'a Store,
    refused: Mutex<Vec<&'static str>>,
}

impl<'a> Probe<'a> {
    pub(crate) fn new(store: &'a Store) -> Self {
        Probe { store, refused: Mutex::new(Vec::new()) }
    }

    pub(crate) fn is_refused(&self, command: &'static str) -> bool {
        self.refused.lock().map(|r| r.contains(&command)).unwrap_or(false)
    }

    /// Notes (once) that `command` was refused; the figures it feeds are n/a.
    fn note_refused(&self, command: &'static str, e: &redis::RedisError, consequence: &str) {
        if let Ok(mut r) = self.refused.lock()
            && !r.contains(&command)
        {
            r.push(command);
            let reason = e.detail().unwrap_or("refused");
            eprintln!("bench: note: the server refuses {command} ({reason}): {consequence}");
        }
    }

    /// INFO `section` as key -> value; `None` when the server refuses INFO.
    pub(crate) async fn info(&self, section: &str) -> Result<Option<HashMap<String, String>>> {
        if self.is_refused("INFO") {
            return Ok(None);
        }
        let mut conn = self.store.conn().await?;
        let text: String = match redis::cmd("INFO").arg(section).query_async(&mut conn).await {
            Ok(text) => text,
            Err(e) if refused(&e) => {
                self.note_refused("INFO", &e, "the Redis version and the memory, CPU and command figures are n/a");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Some(
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect(),
        ))
    }

    /// CONFIG GET `name` as (name, value) pairs; `None` when refused.
    pub(crate) async fn config_get(&self, name: &str) -> Result<Option<Vec<String>>> {
        if self.is_refused("CONFIG GET") {
            return Ok(None);
        }
        let mut conn = self.store.conn().await?;
        match redis::cmd("CONFIG").arg("GET").arg(name).query_async(&mut conn).await {
            Ok(pair) => Ok(Some(pair)),
            Err(e) if refused(&e) => {
                self.note_refused("CONFIG GET", &e, "the server's settings are not shown nor checked");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn used_memory(&self) -> Result<Option<f64>> {
        if self.is_refused("INFO") {
            return Ok(None);
        }
        if !self.is_refused("MEMORY PURGE") {
            // Let lazy frees settle so the figure is stable (optional: only steadier figures).
            let mut conn = self.store.conn().await?;
            if let Err(e) = redis::cmd("MEMORY").arg("PURGE").query_async::<()>(&mut conn).await
                && refused(&e)
            {
                self.note_refused("MEMORY PURGE", &e, "memory figures are read without purging first");
            }
        }
        Ok(self.info("memory").await?.map(|m| m.get("used_memory").and_then(|v| v.parse().ok()).unwrap_or(0.0)))
    }

    pub(crate) async fn redis_cpu(&self) -> Result<Option<f64>> {
        Ok(self.info("cpu").await?.map(|cpu| {
            let get = |k: &str| cpu.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            get("used_cpu_sys") + get("used_cpu_user")
        }))
    }

    /// Microseconds the server has spent running runledger's operations (either way in).
    pub(crate) async fn script_usec(&self) -> Result<Option<f64>> {
        Ok(self
            .command_calls()
            .await?
            .map(|c| OPERATION_CALLS.iter().map(|name| c.get(*name).map(|(_, usec)| *usec).unwrap_or(0.0)).sum()))
    }

    /// Per command: (calls, microseconds spent running it), from INFO commandstats.
    pub(crate) async fn command_calls(&self) -> Result<Option<HashMap<String, (f64, f64)>>> {
        let Some(stats) = self.info("commandstats").await? else { return Ok(None) };
        let mut out = HashMap::new();
        for (k, v) in stats {
            if let Some(name) = k.strip_prefix("cmdstat_") {
                let field = |key: &str| v.split(',').find_map(|p| p.strip_prefix(key)).and_then(|c| c.parse().ok());
                out.insert(name.to_string(), (field("calls=").unwrap_or(0.0), field("usec=").unwrap_or(0.0)));
            }
        }
        Ok(Some(out))
    }
}

/// The commands that run runledger's operations: `FCALL` (and `FCALL_RO` for
/// reads) of the Functions library, or `EVALSHA` where Functions are refused.
pub(crate) const OPERATION_CALLS: &[&str] = &["fcall", "fcall_ro", "evalsha"];

/// `after - before` per run, when both were read.
pub(crate) fn per_run(before: Option<f64>, after: Option<f64>, scale: f64, runs: usize) -> Option<f64> {
    Some((after? - before?) * scale / runs as f64)
}

/// What the server ran between two INFO commandstats readings, per run.
#[derive(Default)]
pub(crate) struct CommandCounts {
    /// Commands per run, those run inside scripts included.
    pub total: f64,
    /// Calls per run of each command.
    pub by_command: HashMap<String, f64>,
    /// Microseconds per run spent running each command (a script's time
    /// includes that of the commands it called).
    pub us_by_command: HashMap<String, f64>,
    /// Microseconds per run spent running scripts (FCALL, FCALL_RO, EVALSHA).
    pub script_us: f64,
}

/// The commands the server ran between two INFO commandstats readings, per
/// run. The bench's own probes (INFO, CONFIG GET, MEMORY PURGE, the XINFO
/// STREAM of its progress polls, which no script of a lifecycle sends) are
/// left out.
pub(crate) fn commands_between(
    before: &HashMap<String, (f64, f64)>,
    after: &HashMap<String, (f64, f64)>,
    runs: usize,
) -> CommandCounts {
    let mut out = CommandCounts::default();
    let runs = runs as f64;
    for (name, (calls_after, usec_after)) in after {
        if name == "info" || name == "config|get" || name == "memory|purge" || name == "xinfo|stream" {
            continue;
        }
        let (calls_before, usec_before) = before.get(name).copied().unwrap_or_default();
        let usec = (usec_after - usec_before) / runs;
        if OPERATION_CALLS.contains(&name.as_str()) {
            out.script_us += usec;
        }
        let delta = calls_after - calls_before;
        if delta > 0.0 {
            out.by_command.insert(name.clone(), delta / runs);
            out.us_by_command.insert(name.clone(), usec);
            out.total += delta / runs;
        }
    }
    out
}
