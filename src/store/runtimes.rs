//! The runtime registry: expiring hashes plus one sorted index, so listing and
//! staleness never SCAN the keyspace. Each runtime hash and the index are
//! written by calls of their own, since on a cluster they live in different slots.

use std::time::Duration;

use futures_util::future::join_all;

use super::{Store, reply};
use crate::error::{Error, Result};
use crate::model::{Heartbeat, RegisterRuntime, Runtime, RuntimePage};
use crate::validate;

fn deadline_ms(deadline: Duration) -> Result<String> {
    Ok(validate::lease_ms("heartbeat deadline", deadline)?.to_string())
}

impl Store {
    fn grace_ms(&self) -> String {
        self.config().runtime_grace.as_millis().to_string()
    }

    /// A runtime the script just refreshed, which is then moved in the index
    /// `<P>:runtimes` to its new deadline (a key of its own slot, so its own
    /// call). Its deadline lies ahead, so it is not stale.
    async fn refreshed_runtime(&self, value: redis::Value) -> Result<Runtime> {
        let fields = reply::fields(value)?;
        let deadline_ms = fields.0.get("heartbeat_deadline_at").cloned().unwrap_or_default();
        let runtime = Runtime::from_fields(fields, i64::MIN)?;
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("ZADD")
            .arg(self.global().runtimes())
            .arg(deadline_ms)
            .arg(&runtime.runtime_id)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(runtime)
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
            self.next_runtime_number().await?.to_string(),
        ];
        let key = self.global().runtime(&runtime.runtime_id);
        let value = self.eval(&self.scripts().register_runtime, &[key], &args).await?;
        self.refreshed_runtime(value).await
    }

    /// A numeric id for a runtime that may be new (the seed's autoincrement id).
    async fn next_runtime_number(&self) -> Result<i64> {
        let mut conn = self.conn().await?;
        redis::cmd("INCR").arg(self.global().runtime_seq()).query_async(&mut conn).await.map_err(|e| self.failed(e))
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
        let keys = [self.global().runtime(runtime_id)];
        for _ in 0..20 {
            let (flag, expected, merged) = match &beat.metadata {
                None => ("0", String::new(), String::new()),
                Some(patch) => {
                    let (expected, merged) = self.merged_metadata(&keys[0], None, patch).await?;
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
            match self.eval_raw(&self.scripts().heartbeat_runtime, &keys, &args).await {
                Ok(value) => return self.refreshed_runtime(value).await,
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
        let mut del = redis::cmd("DEL");
        del.arg(g.runtime(runtime_id));
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(g.runtimes()).arg(runtime_id);
        conn.query_all(vec![del, zrem]).await.map_err(|e| self.failed(e))?;
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
        Ok(self.page_runtimes(statuses, None, limit).await?.items)
    }

    /// LangBot's `list_runtimes`: runtimes in id order, with the given
    /// statuses (none = all) whose labels hold every pair of `labels`, at most
    /// `limit` (clamped to 1..=500), and the `total` that match.
    pub async fn page_runtimes(
        &self,
        statuses: &[String],
        labels: Option<&serde_json::Map<String, serde_json::Value>>,
        limit: usize,
    ) -> Result<RuntimePage> {
        let limit = limit.clamp(1, 500);
        let mut out = self.runtimes_matching(statuses, labels).await?;
        let total = out.len();
        out.truncate(limit);
        Ok(RuntimePage { items: out, total })
    }

    /// Every runtime with one of `statuses` (none = all) whose labels hold
    /// every pair of `labels`, in id order.
    pub(crate) async fn runtimes_matching(
        &self,
        statuses: &[String],
        labels: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<Vec<Runtime>> {
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
        let mut cmds: Vec<redis::Cmd> = ids
            .iter()
            .map(|id| {
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(g.runtime(id));
                cmd
            })
            .collect();
        cmds.push(redis::cmd("TIME"));
        let mut values = conn.query_all(cmds).await.map_err(|e| self.failed(e))?;
        let now_ms = reply::time_ms(values.pop().unwrap_or(redis::Value::Nil))?;
        let mut out = Vec::new();
        for value in values {
            let fields = reply::fields(value)?;
            if fields.0.is_empty() {
                continue;
            }
            let runtime = Runtime::from_fields(fields, now_ms)?;
            let labelled = labels
                .is_none_or(|wanted| wanted.iter().all(|(k, v)| runtime.labels.get(k).is_some_and(|have| have == v)));
            if labelled && (statuses.is_empty() || statuses.contains(&runtime.status)) {
                out.push(runtime);
            }
        }
        out.sort_by_key(|r| r.id);
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
        let mut conn = self.conn().await?;
        // Candidates from the index: overdue by their deadline (by the
        // server's clock unless `now_ms` is given), or every runtime when a
        // heartbeat age counts too. Only candidates cost a script call.
        let mut range = redis::cmd("ZRANGE");
        match stale_after {
            Some(_) => range.arg(g.runtimes()).arg(0).arg(-1),
            None => {
                let now = match now_ms {
                    Some(now) => now,
                    None => self.server_time_ms().await?,
                };
                range.arg(g.runtimes()).arg("-inf").arg(format!("({now}")).arg("BYSCORE")
            }
        };
        let ids: Vec<String> = range.query_async(&mut conn).await.map_err(|e| self.failed(e))?;
        let args = vec![
            now_ms.map(|n| n.to_string()).unwrap_or_default(),
            stale_status.to_string(),
            stale_after.map(|d| d.as_millis().to_string()).unwrap_or_default(),
        ];
        let lua = &self.scripts().mark_stale_runtime;
        let marks = join_all(ids.iter().map(|id| {
            let key = [g.runtime(id)];
            let args = &args;
            async move { self.eval(lua, &key, args).await }
        }))
        .await;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (id, mark) in ids.iter().zip(marks) {
            match mark? {
                redis::Value::Int(-1) => gone.push(id.clone()),
                redis::Value::Int(_) => {}
                item => {
                    // Its status is the stale status whatever the clock says.
                    let mut runtime = Runtime::from_fields(reply::fields(item)?, i64::MIN)?;
                    runtime.status = stale_status.to_string();
                    out.push(runtime);
                }
            }
        }
        if !gone.is_empty() {
            let _: i64 = redis::cmd("ZREM")
                .arg(g.runtimes())
                .arg(&gone)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.failed(e))?;
        }
        Ok(out)
    }
}
