//! Turning script replies (nested arrays) into Rust values.

use std::collections::HashMap;

use redis::Value;

use crate::error::{Error, Result};
use crate::model::Fields;

pub fn array(value: Value) -> Result<Vec<Value>> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(Error::Protocol(format!("expected an array, got {other:?}"))),
    }
}

pub fn string(value: Value) -> Result<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).map_err(|_| Error::Protocol("reply is not UTF-8".into())),
        Value::SimpleString(s) => Ok(s),
        Value::Okay => Ok("OK".into()),
        Value::Int(n) => Ok(n.to_string()),
        Value::Double(d) => Ok(d.to_string()),
        other => Err(Error::Protocol(format!("expected a string, got {other:?}"))),
    }
}

pub fn int(value: Value) -> Result<i64> {
    match value {
        Value::Int(n) => Ok(n),
        other => {
            let text = string(other)?;
            text.parse::<i64>()
                .or_else(|_| text.parse::<f64>().map(|f| f as i64))
                .map_err(|_| Error::Protocol(format!("expected an integer, got {text}")))
        }
    }
}

pub fn opt_int(value: Value) -> Result<Option<i64>> {
    match value {
        Value::Nil => Ok(None),
        other => {
            let text = string(other)?;
            if text.is_empty() {
                Ok(None)
            } else {
                text.parse::<i64>().map(Some).map_err(|_| Error::Protocol(format!("expected an integer, got {text}")))
            }
        }
    }
}

/// A TIME reply (seconds, microseconds) in epoch milliseconds.
pub fn time_ms(value: Value) -> Result<i64> {
    let mut parts = array(value)?.into_iter();
    let secs = parts.next().map(int).transpose()?.ok_or_else(|| Error::Protocol("TIME: empty reply".into()))?;
    let micros = parts.next().map(int).transpose()?.unwrap_or(0);
    Ok(secs * 1000 + micros / 1000)
}

/// A flat `[field, value, ...]` array (HGETALL, stream entry) as a map.
pub fn fields(value: Value) -> Result<Fields> {
    let items = match value {
        Value::Map(pairs) => {
            let mut map = HashMap::with_capacity(pairs.len());
            for (k, v) in pairs {
                map.insert(string(k)?, string(v)?);
            }
            return Ok(Fields(map));
        }
        other => array(other)?,
    };
    let mut map = HashMap::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        map.insert(string(k)?, string(v)?);
    }
    Ok(Fields(map))
}
