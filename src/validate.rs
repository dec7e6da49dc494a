//! Argument checks done before anything is sent, so a bad call fails with one
//! clear error: the full checks (JSON parsed and sized, nesting depth, UTF-8,
//! ids, ranges) live here, at the edge, because the CLI, the Worker, the
//! dashboard and the Python package all come through this library. The Lua
//! keeps what only the server can decide (state, tokens, the clock) and O(1)
//! checks of each argument's type, range and shape, so that a raw call can
//! never half-write; it does not parse JSON (see `check_json` in
//! lua/include/common.lua).

use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, Result};

pub const MAX_ID_BYTES: usize = 200;
pub const MAX_LEASE: Duration = Duration::from_secs(86_400);

/// Ids, queue names, runner ids: non-empty, at most 200 bytes, no control
/// characters and no `{` `}` (they would break the queue's hash tag).
pub fn id(name: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::Invalid(format!("{name} must not be empty")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(Error::Invalid(format!("{name} is longer than {MAX_ID_BYTES} bytes")));
    }
    if value.chars().any(|c| c.is_control() || c == '{' || c == '}') {
        return Err(Error::Invalid(format!("{name} must not contain control characters, {{ or }}: {value:?}")));
    }
    Ok(())
}

/// A key prefix: an id without `:`. Every key of a prefix starts with
/// `<prefix>:`, so prefixes without `:` never nest (`rl` and `rl:runtime`
/// would: runtime `queues` of the first is the queue set of the second), and an ACL
/// pattern `~<prefix>:*` holds exactly one tenant's keys.
pub fn prefix(value: &str) -> Result<()> {
    id("prefix", value)?;
    if value.contains(':') {
        return Err(Error::Invalid(format!("prefix must not contain ':' (prefixes would nest): {value:?}")));
    }
    Ok(())
}

pub fn opt_id(name: &str, value: Option<&str>) -> Result<()> {
    value.map_or(Ok(()), |v| id(name, v))
}

/// A JSON value that must be an object, serialized, within `max_bytes`.
pub fn object(name: &str, value: &Value, max_bytes: usize) -> Result<String> {
    if !value.is_object() {
        return Err(Error::Invalid(format!("{name} must be a JSON object, got {}", kind(value))));
    }
    sized(name, value, max_bytes)
}

pub fn opt_object(name: &str, value: Option<&Value>, max_bytes: usize) -> Result<String> {
    value.map_or(Ok(String::new()), |v| object(name, v, max_bytes))
}

/// How deep a JSON document may nest: deeper ones are refused before they
/// are stored, not found unreadable later.
pub const MAX_JSON_DEPTH: usize = 64;

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

pub fn sized(name: &str, value: &Value, max_bytes: usize) -> Result<String> {
    if depth(value) > MAX_JSON_DEPTH {
        return Err(Error::Invalid(format!("{name} nests deeper than {MAX_JSON_DEPTH} levels")));
    }
    let text = serde_json::to_string(value).map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
    if text.len() > max_bytes {
        return Err(Error::Invalid(format!("{name} is {} bytes, over the limit of {max_bytes}", text.len())));
    }
    Ok(text)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses text the user gave as a JSON object (CLI flags).
pub fn parse_object(name: &str, text: &str) -> Result<Value> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| Error::Invalid(format!("{name} is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(Error::Invalid(format!("{name} must be a JSON object, got {}", kind(&value))));
    }
    Ok(value)
}

pub fn priority(value: i64) -> Result<()> {
    if !(-1000..=1000).contains(&value) {
        return Err(Error::Invalid(format!("priority must be in -1000..=1000, got {value}")));
    }
    Ok(())
}

/// A lease, in whole milliseconds, more than zero and at most a day.
pub fn lease_ms(name: &str, value: Duration) -> Result<u64> {
    let ms = value.as_millis();
    if ms == 0 || value > MAX_LEASE {
        return Err(Error::Invalid(format!(
            "{name} must be more than 0 and at most {} seconds, got {:?}",
            MAX_LEASE.as_secs(),
            value
        )));
    }
    Ok(ms as u64)
}

/// Epoch seconds (fractions allowed) to epoch milliseconds.
pub fn epoch_ms(name: &str, seconds: f64) -> Result<i64> {
    if !seconds.is_finite() || !(0.0..=1e12).contains(&seconds) {
        return Err(Error::Invalid(format!("{name} must be epoch seconds, got {seconds}")));
    }
    Ok((seconds * 1000.0).round() as i64)
}

/// Seconds given on the command line (may be fractional), as a Duration.
pub fn seconds(name: &str, seconds: f64) -> Result<Duration> {
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 1e9 {
        return Err(Error::Invalid(format!("{name} must be a positive number of seconds, got {seconds}")));
    }
    Ok(Duration::from_secs_f64(seconds))
}

pub fn text(name: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(Error::Invalid(format!("{name} is longer than {max} bytes")));
    }
    Ok(())
}
