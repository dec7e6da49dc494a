//! A MONITOR recorder: the server's own, totally ordered account of every
//! command it executed, for checking a run's history after a chaos test.
//!
//! [`Monitor::start`] opens a plain connection straight to Redis (never
//! through a fault-injecting proxy: the record must be complete), sends
//! `MONITOR` and records every line in a background task until
//! [`Monitor::stop`]. [`parse_line`] turns a line such as
//!
//! ```text
//! 1733142727.123456 [0 127.0.0.1:5555] "EVALSHA" "sha" "8" ...
//! 1733142727.123457 [0 lua] "HSET" "rl:{q}:run:abc" "status" "claimed" ...
//! ```
//!
//! into a [`Command`] (server time in µs, source, args). Commands a script
//! runs have source `lua`; redis-server 7.0 shows the EVAL/EVALSHA line first
//! and then its inner commands, so [`commands`] gives each inner command the
//! index of the script call that ran it.
//!
//! [`run_histories`] builds, per run id, the ordered writes on its hash
//! (`<prefix>:{<queue>}:run:<run_id>`: HSETs) and on its event stream
//! (`<prefix>:{<queue>}:events:<run_id>`: XADDs with their entry id).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// One executed command as MONITOR reported it.
#[derive(Clone, Debug)]
pub struct Command {
    /// Server wall clock when the command was fed to monitors, µs since the epoch.
    pub time_us: u64,
    /// `lua` for commands run by a script, else the client's `ip:port`.
    pub source: String,
    /// Command name (as sent, any case) and arguments, unescaped. Binary
    /// bytes that are not UTF-8 are replaced (keys, tokens and statuses are ASCII).
    pub args: Vec<String>,
    /// For a `lua` command: index (in the same list) of the EVAL/EVALSHA/FCALL that ran it.
    pub script: Option<usize>,
}

impl Command {
    pub fn name_is(&self, name: &str) -> bool {
        self.args.first().is_some_and(|a| a.eq_ignore_ascii_case(name))
    }

    pub fn is_inside_script(&self) -> bool {
        self.source == "lua"
    }

    pub fn is_script_call(&self) -> bool {
        !self.is_inside_script() && ["EVALSHA", "EVAL", "FCALL", "FCALL_RO"].iter().any(|name| self.name_is(name))
    }

    /// For an EVAL/EVALSHA/FCALL/FCALL_RO: (its body, SHA or function name; KEYS; ARGV).
    pub fn script_parts(&self) -> Option<(&str, &[String], &[String])> {
        if !self.is_script_call() || self.args.len() < 3 {
            return None;
        }
        let numkeys: usize = self.args[2].parse().ok()?;
        let keys = self.args.get(3..3 + numkeys)?;
        let argv = &self.args[(3 + numkeys).min(self.args.len())..];
        Some((&self.args[1], keys, argv))
    }

    /// True for a call of `lua`, either way in: `EVALSHA` of its SHA or `FCALL` of its function.
    pub fn calls(&self, lua: &runledger::scripts::Lua) -> bool {
        self.script_parts().is_some_and(|(id, _, _)| {
            id.eq_ignore_ascii_case(lua.script.get_hash()) || id == lua.function || id == lua.code
        })
    }
}

/// The recorder; see the module docs.
pub struct Monitor {
    lines: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
    addr: String,
}

impl Monitor {
    /// Connects to `host:port` directly and starts recording. Returns once
    /// Redis has acknowledged MONITOR, so every later command is recorded.
    pub async fn start(addr: &str) -> Monitor {
        let mut stream = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("monitor: connect {addr}: {e}"));
        stream.write_all(b"MONITOR\r\n").await.expect("monitor: send MONITOR");
        let mut reader = BufReader::new(stream);
        let mut ok = String::new();
        reader.read_line(&mut ok).await.expect("monitor: read the MONITOR acknowledgement");
        assert_eq!(ok.trim_end(), "+OK", "monitor: unexpected answer to MONITOR");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let task = tokio::spawn(record(reader, lines.clone()));
        Monitor { lines, task, addr: addr.to_string() }
    }

    /// Lines recorded so far.
    pub fn len(&self) -> usize {
        lock(&self.lines).len()
    }

    /// Waits until at least `n` recorded commands match `what` (a hang
    /// guard of 30 s, not a speed limit): proof that a client got that far.
    pub async fn until_seen(&self, n: usize, label: &str, what: impl Fn(&Command) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let lines = lock(&self.lines).clone();
            let seen = lines.iter().filter_map(|l| parse_line(l)).filter(|c| what(c)).count();
            if seen >= n {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "hang guard: {seen} of {n} {label} after 30 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops recording and returns every line, complete up to now: a marker
    /// command is sent on a fresh connection and the recorder runs until it
    /// has seen it, so nothing executed before this call is missing.
    pub async fn stop(self) -> Vec<String> {
        let marker = format!("chaos-monitor-end-{}", uuid::Uuid::new_v4().simple());
        let mut conn = TcpStream::connect(&self.addr).await.expect("monitor: connect for the end marker");
        let echo = format!("*2\r\n$4\r\nECHO\r\n${}\r\n{marker}\r\n", marker.len());
        conn.write_all(echo.as_bytes()).await.expect("monitor: send the end marker");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            if lock(&self.lines).iter().rev().take(1000).any(|l| l.contains(&marker)) {
                break;
            }
            assert!(!self.task.is_finished(), "monitor: the MONITOR connection ended before the end marker");
            assert!(tokio::time::Instant::now() < deadline, "hang guard: monitor end marker not seen within 120 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.task.abort();
        std::mem::take(&mut *lock(&self.lines))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads MONITOR's status lines (`+<line>\r\n`) until the connection ends.
async fn record(mut reader: BufReader<TcpStream>, lines: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::with_capacity(4096);
    let mut batch = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\r', '\n']);
        batch.push(line.strip_prefix('+').unwrap_or(line).to_string());
        // Take the lock once per buffered burst, not once per line.
        if reader.buffer().is_empty() {
            lock(&lines).append(&mut batch);
        }
    }
    lock(&lines).append(&mut batch);
}

/// Parses one MONITOR line; None for lines of another shape.
pub fn parse_line(line: &str) -> Option<Command> {
    let (time, rest) = line.split_once(' ')?;
    let (secs, micros) = time.split_once('.')?;
    let time_us = secs.parse::<u64>().ok()? * 1_000_000 + micros.parse::<u64>().ok()?;
    let rest = rest.strip_prefix('[')?;
    let (client, rest) = rest.split_once("] ")?;
    let (_db, source) = client.split_once(' ')?;
    let args = parse_args(rest)?;
    Some(Command { time_us, source: source.to_string(), args, script: None })
}

/// Space-separated, double-quoted arguments with C-style escapes
/// (\" \\ \n \r \t \a \b \xNN), as Redis's sdscatrepr writes them.
fn parse_args(mut s: &str) -> Option<Vec<String>> {
    let mut args = Vec::new();
    loop {
        s = s.trim_start_matches(' ');
        if s.is_empty() {
            return Some(args);
        }
        let body = s.strip_prefix('"')?;
        let (arg, rest) = unquote(body)?;
        args.push(arg);
        s = rest;
    }
}

/// Decodes up to the closing quote; returns the argument and what follows.
fn unquote(body: &str) -> Option<(String, &str)> {
    let bytes = body.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return Some((String::from_utf8_lossy(&out).into_owned(), &body[i + 1..])),
            b'\\' => {
                let esc = *bytes.get(i + 1)?;
                i += 2;
                match esc {
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'a' => out.push(0x07),
                    b'b' => out.push(0x08),
                    b'x' => {
                        let hex = std::str::from_utf8(bytes.get(i..i + 2)?).ok()?;
                        out.push(u8::from_str_radix(hex, 16).ok()?);
                        i += 2;
                    }
                    other => out.push(other), // \" and \\
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    None // no closing quote
}

/// Parses every line and links each script-run command to its script call.
/// Panics on a line it cannot read or a `lua` command with no script call
/// before it: the history would be incomplete and every check on it moot.
pub fn commands(lines: &[String]) -> Vec<Command> {
    let mut out: Vec<Command> = Vec::with_capacity(lines.len());
    let mut current_script = None;
    for line in lines {
        let mut cmd = parse_line(line).unwrap_or_else(|| panic!("monitor: cannot parse line {line:?}"));
        if cmd.is_inside_script() {
            let script = current_script
                .unwrap_or_else(|| panic!("monitor: script command before any EVAL/EVALSHA/FCALL: {line:?}"));
            cmd.script = Some(script);
        } else {
            current_script = cmd.is_script_call().then_some(out.len());
        }
        out.push(cmd);
    }
    out
}

/// One write on a run, in server order.
#[derive(Clone, Debug)]
pub enum Write {
    /// HSET on the run's hash, field/value pairs in order.
    Hset(Vec<(String, String)>),
    /// XADD on the run's event stream: entry id as given (`<seq>-0`) and fields.
    Xadd { id: String, fields: Vec<(String, String)> },
}

/// A write with where it came from.
#[derive(Clone, Debug)]
pub struct RunWrite {
    /// Index of the command in the [`commands`] list (the server's order).
    pub index: usize,
    pub time_us: u64,
    /// Index of the EVAL/EVALSHA/FCALL that made it, when a script did.
    pub script: Option<usize>,
    pub write: Write,
}

impl RunWrite {
    /// Value of an HSET field (the last one when set twice) or XADD field.
    pub fn field(&self, name: &str) -> Option<&str> {
        let fields = match &self.write {
            Write::Hset(f) => f,
            Write::Xadd { fields, .. } => fields,
        };
        fields.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn is_hset(&self) -> bool {
        matches!(self.write, Write::Hset(_))
    }

    /// For an XADD: the sequence of its `<seq>-0` entry id.
    pub fn event_sequence(&self) -> Option<i64> {
        match &self.write {
            Write::Xadd { id, .. } => id.strip_suffix("-0")?.parse().ok(),
            Write::Hset(_) => None,
        }
    }
}

/// Every write on each run of one queue: run_id -> writes in server order.
pub fn run_histories(cmds: &[Command], prefix: &str, queue: &str) -> HashMap<String, Vec<RunWrite>> {
    let run_key = format!("{prefix}:{{{queue}}}:run:");
    let events_key = format!("{prefix}:{{{queue}}}:events:");
    let mut out: HashMap<String, Vec<RunWrite>> = HashMap::new();
    for (index, cmd) in cmds.iter().enumerate() {
        let Some(key) = cmd.args.get(1) else { continue };
        let write = if cmd.name_is("HSET") {
            let Some(run_id) = key.strip_prefix(&run_key) else { continue };
            (run_id, Write::Hset(pairs(&cmd.args[2..])))
        } else if cmd.name_is("XADD") {
            let Some(run_id) = key.strip_prefix(&events_key) else { continue };
            let Some(id) = cmd.args.get(2) else { continue };
            (run_id, Write::Xadd { id: id.clone(), fields: pairs(&cmd.args[3..]) })
        } else {
            continue;
        };
        out.entry(write.0.to_string()).or_default().push(RunWrite {
            index,
            time_us: cmd.time_us,
            script: cmd.script,
            write: write.1,
        });
    }
    out
}

fn pairs(args: &[String]) -> Vec<(String, String)> {
    args.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0].clone(), c[1].clone())).collect()
}
