//! Run events: append (fenced, idempotent, batched), audit, paging.

use std::time::Duration;

use serde_json::Value;

use super::{Conn, Store, reply};
use crate::error::{Error, Result};
use crate::model::{Direction, EventPage, NewEvent, RunEvent};
use crate::validate;

/// The JSON strings an event is stored as. Empty metadata and artifact lists
/// are stored as absent, so a retry compares equal however it spells them.
fn encode(event: &NewEvent, max: usize) -> Result<[String; 7]> {
    if !(1..=MAX_SEQUENCE).contains(&event.sequence) {
        return Err(Error::Invalid(format!("event sequence must be in [1, {MAX_SEQUENCE}], got {}", event.sequence)));
    }
    validate::id("event type", &event.event_type)?;
    validate::id("event source", &event.source)?;
    let data = validate::object("event data", &event.data, max)?;
    let usage = validate::opt_object("event usage", event.usage.as_ref(), max)?;
    let refs = if event.artifact_refs.is_empty() {
        String::new()
    } else {
        validate::sized("event artifact_refs", &Value::Array(event.artifact_refs.clone()), max)?
    };
    let metadata = match &event.metadata {
        Some(Value::Object(map)) if map.is_empty() => String::new(),
        other => validate::opt_object("event metadata", other.as_ref(), max)?,
    };
    Ok([event.sequence.to_string(), event.event_type.clone(), data, usage, event.source.clone(), refs, metadata])
}

/// The largest event sequence: exact as a double (Lua, JSON), 2^53 - 1.
pub const MAX_SEQUENCE: i64 = 9_007_199_254_740_991;

/// The most events one `append_events` call takes (one script call).
pub const MAX_EVENTS_PER_CALL: usize = 1000;

impl Store {
    /// Appends one event (the seed's append_event). See [`Store::append_events`].
    pub async fn append_event(&self, run_id: &str, claim_token: Option<&str>, event: &NewEvent) -> Result<RunEvent> {
        let mut events = self.append_events(run_id, claim_token, std::slice::from_ref(event)).await?;
        events.pop().ok_or_else(|| Error::Protocol("append: empty reply".into()))
    }

    /// Appends events in one round trip. With a claim token the write is fenced
    /// ([`Error::StaleToken`] once the claim is lost). A sequence that exists
    /// with the same content is an idempotent retry; with other content it is
    /// [`Error::Conflict`]. The batch lands whole or not at all.
    pub async fn append_events(
        &self,
        run_id: &str,
        claim_token: Option<&str>,
        events: &[NewEvent],
    ) -> Result<Vec<RunEvent>> {
        validate::id("run_id", run_id)?;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        if events.len() > MAX_EVENTS_PER_CALL {
            return Err(Error::Invalid(format!("at most {MAX_EVENTS_PER_CALL} events per call, got {}", events.len())));
        }
        let max = self.max_json();
        let (keys, mut k) = self.run_keys(run_id).await?;
        k.push(keys.events(run_id));
        let mut args = vec![
            keys.base.clone(),
            run_id.to_string(),
            claim_token.unwrap_or_default().to_string(),
            max.to_string(),
            self.config().max_events_per_run.to_string(),
        ];
        for event in events {
            args.extend(encode(event, max)?);
        }
        let value = self.eval(&self.scripts().append_events, &k, &args).await?;
        let results = reply::array(value)?;
        if results.len() != events.len() {
            return Err(Error::Protocol("append: reply does not match the events sent".into()));
        }
        results
            .into_iter()
            .zip(events)
            .map(|(item, event)| {
                let mut parts = reply::array(item)?.into_iter();
                let _seq = parts.next();
                let created_ms = parts.next().map(reply::int).transpose()?.unwrap_or(0);
                Ok(RunEvent {
                    id: event.sequence,
                    run_id: run_id.to_string(),
                    sequence: event.sequence,
                    event_type: event.event_type.clone(),
                    data: event.data.clone(),
                    usage: event.usage.clone(),
                    created_at: created_ms.div_euclid(1000),
                    source: event.source.clone(),
                    artifact_refs: Value::Array(event.artifact_refs.clone()),
                    metadata: event.metadata.clone().unwrap_or_else(|| Value::Object(Default::default())),
                })
            })
            .collect()
    }

    /// A host-authored event after the run's last sequence (the seed's
    /// append_audit_event); allowed on finished runs.
    pub async fn append_audit_event(
        &self,
        run_id: &str,
        event_type: &str,
        data: Option<&Value>,
        metadata: Option<&Value>,
    ) -> Result<RunEvent> {
        validate::id("event type", event_type)?;
        let max = self.max_json();
        let empty = Value::Object(Default::default());
        let data = data.unwrap_or(&empty);
        let data_text = validate::object("event data", data, max)?;
        let meta_text = match metadata {
            Some(Value::Object(map)) if map.is_empty() => String::new(),
            other => validate::opt_object("event metadata", other, max)?,
        };
        let (keys, mut k) = self.run_keys(run_id).await?;
        k.push(keys.events(run_id));
        // A request id, so that a resend after a lost reply does not write the event twice.
        let request = uuid::Uuid::new_v4().simple().to_string();
        let args = vec![
            keys.base.clone(),
            run_id.to_string(),
            event_type.to_string(),
            data_text,
            meta_text,
            max.to_string(),
            request,
            self.config().max_events_per_run.to_string(),
        ];
        let value = self.eval(&self.scripts().append_audit_event, &k, &args).await?;
        let mut parts = reply::array(value)?.into_iter();
        let sequence = parts.next().map(reply::int).transpose()?.unwrap_or(0);
        let created_ms = parts.next().map(reply::int).transpose()?.unwrap_or(0);
        Ok(RunEvent {
            id: sequence,
            run_id: run_id.to_string(),
            sequence,
            event_type: event_type.to_string(),
            data: data.clone(),
            usage: None,
            created_at: created_ms.div_euclid(1000),
            source: "host".into(),
            artifact_refs: Value::Array(Vec::new()),
            metadata: metadata.cloned().unwrap_or(empty),
        })
    }

    /// A page of a run's events (the seed's page_run_events): sequences above
    /// `after` and below `before`, `limit` capped to 1..=100.
    pub async fn page_run_events(
        &self,
        run_id: &str,
        before: Option<i64>,
        after: Option<i64>,
        limit: usize,
        direction: Direction,
    ) -> Result<EventPage> {
        let limit = limit.clamp(1, 100);
        let queue = self.locate(run_id).await?;
        let key = self.queue_keys(&queue).events(run_id);
        let low = after.map(|a| format!("({}-0", a.max(0))).unwrap_or_else(|| "-".into());
        let high = before.map(|b| format!("({}-0", b.max(0))).unwrap_or_else(|| "+".into());
        let mut conn = self.conn().await?;
        // An exclusive bound at 0-0 is an error in Redis; nothing lies below sequence 1.
        if before.is_some_and(|b| b <= 1) {
            return Ok(EventPage { items: Vec::new(), next_cursor: None, prev_cursor: None, has_more: false });
        }
        let cmd = match direction {
            Direction::Forward => {
                redis::cmd("XRANGE").arg(&key).arg(&low).arg(&high).arg("COUNT").arg(limit + 1).clone()
            }
            Direction::Backward => {
                redis::cmd("XREVRANGE").arg(&key).arg(&high).arg(&low).arg("COUNT").arg(limit + 1).clone()
            }
        };
        let value: redis::Value = cmd.query_async(&mut conn).await.map_err(|e| self.failed(e))?;
        let mut items = stream_events(run_id, value)?;
        let has_more = items.len() > limit;
        items.truncate(limit);
        let next_cursor = if has_more { items.last().map(|e| e.sequence) } else { None };
        let prev_cursor = items.first().map(|e| e.sequence);
        Ok(EventPage { items, next_cursor, prev_cursor, has_more })
    }
}

impl Store {
    /// The events after sequence `after`, waiting up to `timeout` for the
    /// first one when there is none yet (XREAD BLOCK), at most 100. `conn`
    /// must be a [`Store::dedicated_conn`]: a blocked read would hold up
    /// every call sharing a connection. Empty after the timeout.
    pub async fn wait_run_events(
        &self,
        conn: &mut Conn,
        run_id: &str,
        after: i64,
        timeout: Duration,
    ) -> Result<Vec<RunEvent>> {
        let queue = self.locate(run_id).await?;
        let key = self.queue_keys(&queue).events(run_id);
        let value: redis::Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(100)
            .arg("BLOCK")
            .arg(timeout.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&key)
            .arg(format!("{}-0", after.max(0)))
            .query_async(conn)
            .await
            .map_err(|e| self.failed(e))?;
        // [[key, entries]] (RESP2) or {key: entries} (RESP3); nil on timeout.
        let entries = match value {
            redis::Value::Nil => return Ok(Vec::new()),
            redis::Value::Map(mut pairs) => pairs.pop().map(|(_, v)| v),
            other => reply::array(other)?.pop().map(reply::array).transpose()?.and_then(|mut stream| stream.pop()),
        };
        match entries {
            Some(entries) => stream_events(run_id, entries),
            None => Ok(Vec::new()),
        }
    }
}

/// Stream entries (`<sequence>-0`, fields) as the run's events.
fn stream_events(run_id: &str, value: redis::Value) -> Result<Vec<RunEvent>> {
    let mut items = Vec::new();
    for entry in reply::array(value)? {
        let mut parts = reply::array(entry)?.into_iter();
        let id = parts.next().map(reply::string).transpose()?.unwrap_or_default();
        let sequence = id
            .split('-')
            .next()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| Error::Protocol(format!("stream entry id {id} is not <sequence>-0")))?;
        let fields = parts.next().ok_or_else(|| Error::Protocol("stream entry without fields".into()))?;
        items.push(RunEvent::from_entry(run_id, sequence, reply::fields(fields)?)?);
    }
    Ok(items)
}
