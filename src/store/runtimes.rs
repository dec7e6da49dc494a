//! The runtime registry: expiring hashes plus one sorted index, so listing and
//! staleness never SCAN the keyspace.

use std::time::Duration;

use super::{Store, reply};
use crate::error::{Error, Result};
use crate::model::{Heartbeat, RegisterRuntime, Runtime};
use crate::validate;

fn deadline_ms(deadline: Duration) -> Result<String> {
    Ok(validate::lease_ms("heartbeat deadline", deadline)?.to_string())
}

impl Store {
    fn runtime_keys(&self, runtime_id: &str) -> Vec<String> {
        let g = self.global();
        vec![g.runtime(runtime_id), g.runtimes(), g.runtime_seq()]
    }

    fn grace_ms(&self) -> String {
        self.config().runtime_grace.as_millis().to_string()
    }

    /// A runtime the script just refreshed: its deadline lies ahead, so it is
    /// not stale and no clock reading is needed.
    fn refreshed_runtime(value: redis::Value) -> Result<Runtime> {
        Runtime::from_fields(reply::fields(value)?, i64::MIN)
    }

    /// Creates or updates a runtime and records a heartbeat (the seed's register_runtime).
    pub async fn register_runtime(&self, runtime: &RegisterRuntime) -> Result<Runtime> {
        validate::id("runtime_id", &runtime.runtime_id)?;
        validate::id("status", &runtime.status)?;
        let max = self.max_json();
        for (name, value) in
            [("display_name", &runtime.display_name), ("endpoint", &runtime.endpoint), ("version", &runtime.version)]
        {
            validate::text(name, value.as_deref().unwrap_or_default(), 4096)?;
        }
        let args = vec![
            runtime.runtime_id.clone(),
            runtime.status.clone(),
            runtime.display_name.clone().unwrap_or_default(),
            runtime.endpoint.clone().unwrap_or_default(),
            runtime.version.clone().unwrap_or_default(),
            validate::opt_object("capabilities", runtime.capabilities.as_ref(), max)?,
            validate::opt_object("labels", runtime.labels.as_ref(), max)?,
            validate::opt_object("metadata", runtime.metadata.as_ref(), max)?,
            deadline_ms(runtime.heartbeat_deadline)?,
            self.grace_ms(),
            max.to_string(),
        ];
        let keys = self.runtime_keys(&runtime.runtime_id);
        let value = self.eval(&self.scripts().register_runtime, &keys, &args).await?;
        Self::refreshed_runtime(value)
    }

    /// Refreshes a runtime's heartbeat (the seed's heartbeat_runtime);
    /// [`Error::NotFound`] when it was never registered or has expired.
    pub async fn heartbeat_runtime(&self, runtime_id: &str, beat: &Heartbeat) -> Result<Runtime> {
        validate::id("runtime_id", runtime_id)?;
        validate::id("status", &beat.status)?;
        let max = self.max_json();
        let capabilities = validate::opt_object("capabilities", beat.capabilities.as_ref(), max)?;
        let labels = validate::opt_object("labels", beat.labels.as_ref(), max)?;
        if let Some(m) = &beat.metadata {
            validate::object("metadata", m, max)?;
        }
        let keys = self.runtime_keys(runtime_id);
        for _ in 0..20 {
            let (flag, expected, merged) = match &beat.metadata {
                None => ("0", String::new(), String::new()),
                Some(patch) => {
                    let (expected, merged) = self.merged_metadata(&keys[0], patch).await?;
                    ("1", expected, merged)
                }
            };
            let args = vec![
                runtime_id.to_string(),
                beat.status.clone(),
                deadline_ms(beat.heartbeat_deadline)?,
                self.grace_ms(),
                capabilities.clone(),
                labels.clone(),
                flag.to_string(),
                expected,
                merged,
                max.to_string(),
            ];
            match self.eval_raw(&self.scripts().heartbeat_runtime, &keys[..2], &args).await {
                Ok(value) => return Self::refreshed_runtime(value),
                Err(e) if Error::is_retry(&e) => continue,
                Err(e) => return Err(self.failed(e)),
            }
        }
        Err(Error::Conflict(format!("metadata of runtime {runtime_id} kept changing; heartbeat gave up")))
    }

    /// Marks a runtime gone: its key is deleted and it leaves the index.
    pub async fn deregister_runtime(&self, runtime_id: &str) -> Result<()> {
        validate::id("runtime_id", runtime_id)?;
        let g = self.global();
        let mut conn = self.conn().await?;
        let _: () = redis::pipe()
            .cmd("DEL")
            .arg(g.runtime(runtime_id))
            .ignore()
            .cmd("ZREM")
            .arg(g.runtimes())
            .arg(runtime_id)
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    /// One runtime; its status reads `stale` once its heartbeat deadline passed.
    pub async fn get_runtime(&self, runtime_id: &str) -> Result<Runtime> {
        validate::id("runtime_id", runtime_id)?;
        let mut conn = self.conn().await?;
        // The clock comes in the same round trip, to tell a stale runtime.
        let (value, time): (redis::Value, redis::Value) = redis::pipe()
            .cmd("HGETALL")
            .arg(self.global().runtime(runtime_id))
            .cmd("TIME")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        let fields = reply::fields(value)?;
        if fields.0.is_empty() {
            return Err(Error::NotFound(format!("runtime {runtime_id} is not registered")));
        }
        Runtime::from_fields(fields, reply::time_ms(time)?)
    }

    /// Runtimes ordered by id (the seed's list_runtimes), read from the index
    /// `<P>:runtimes`; `limit` capped to 1..=500.
    pub async fn list_runtimes(&self, statuses: &[String], limit: usize) -> Result<Vec<Runtime>> {
        let limit = limit.clamp(1, 500);
        let g = self.global();
        let mut conn = self.conn().await?;
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(g.runtimes())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGETALL").arg(g.runtime(id));
        }
        pipe.cmd("TIME");
        let mut values: Vec<redis::Value> = pipe.query_async(&mut conn).await.map_err(|e| self.failed(e))?;
        let now_ms = reply::time_ms(values.pop().unwrap_or(redis::Value::Nil))?;
        let mut out = Vec::new();
        for value in values {
            let fields = reply::fields(value)?;
            if fields.0.is_empty() {
                continue;
            }
            let runtime = Runtime::from_fields(fields, now_ms)?;
            if statuses.is_empty() || statuses.contains(&runtime.status) {
                out.push(runtime);
            }
        }
        out.sort_by_key(|r| r.id);
        out.truncate(limit);
        Ok(out)
    }

    /// Sets `stale_status` on runtimes whose heartbeat deadline passed, or whose
    /// last heartbeat is older than `stale_after` (the seed's mark_stale_runtimes).
    pub async fn mark_stale_runtimes(
        &self,
        now_ms: Option<i64>,
        stale_status: &str,
        stale_after: Option<Duration>,
    ) -> Result<Vec<Runtime>> {
        validate::id("stale status", stale_status)?;
        let g = self.global();
        let args = vec![
            g.runtime_base(),
            now_ms.map(|n| n.to_string()).unwrap_or_default(),
            stale_status.to_string(),
            stale_after.map(|d| d.as_millis().to_string()).unwrap_or_default(),
        ];
        let value = self.eval(&self.scripts().mark_stale_runtimes, &[g.runtimes()], &args).await?;
        reply::array(value)?
            .into_iter()
            .map(|item| {
                // Their status is the stale status whatever the clock says.
                let mut runtime = Runtime::from_fields(reply::fields(item)?, i64::MIN)?;
                runtime.status = stale_status.to_string();
                Ok(runtime)
            })
            .collect()
    }
}
