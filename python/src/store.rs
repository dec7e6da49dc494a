//! `runledger.RunLedgerStore`: LangBot's store, method for method, over the
//! Rust [`Store`]. Each method checks and converts its arguments, awaits the
//! library's operation on the tokio runtime, and shapes the answer as the
//! SQL store does (dicts, tuples, `None` where it returned nothing).
//!
//! Stores are cheap to build: every `RunLedgerStore` made with the same URL
//! and settings shares one connected [`Store`] (its pool), made on first use,
//! since LangBot builds a store per call.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use runledger::{
    ClaimRequest, Direction, Error, Finish, GroupBy, GroupSettings, Heartbeat, LimitSettings, NewEvent, NewRun,
    RateLimit, RegisterRuntime, Release, RunFilter, RunStatus, Store, StoreConfig,
};
use serde_json::Value;

use crate::completion::awaitable;
use crate::convert::{epoch_ms, opt_json, serialize};
use crate::errors::{IntoPy, internal, invalid, to_py_err};

/// One connected store per distinct URL and settings, shared by every
/// `RunLedgerStore` built with them.
struct Shared {
    url: String,
    cfg: StoreConfig,
    store: tokio::sync::OnceCell<Store>,
}

static SHARED: LazyLock<Mutex<HashMap<String, Arc<Shared>>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

impl Shared {
    async fn store(&self) -> PyResult<Store> {
        self.store
            .get_or_try_init(|| Store::connect_with(&self.url, self.cfg.clone()))
            .await
            .cloned()
            .map_err(to_py_err)
    }
}

fn dict<T: serde::Serialize>(py: Python<'_>, value: T) -> PyResult<Bound<'_, PyAny>> {
    serialize(py, &value)
}

fn opt_dict<T: serde::Serialize>(py: Python<'_>, value: Option<T>) -> PyResult<Bound<'_, PyAny>> {
    match value {
        Some(v) => serialize(py, &v),
        None => Ok(py.None().into_bound(py)),
    }
}

/// `None` for a run or runtime that does not exist, as the SQL store answers.
fn unless_missing<T>(result: runledger::Result<T>) -> PyResult<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(Error::NotFound(_)) => Ok(None),
        Err(e) => Err(to_py_err(e)),
    }
}

/// `None` when the claim is not active (lost, expired, another holder, an
/// unknown run): what the SQL store's renew and release answer then.
fn unless_inactive<T>(result: runledger::Result<T>) -> PyResult<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(Error::NotFound(_) | Error::StaleToken(_) | Error::DeadlinePassed(_)) => Ok(None),
        Err(e) => Err(to_py_err(e)),
    }
}

fn status(name: &str) -> PyResult<RunStatus> {
    name.parse().py_err()
}

fn statuses(names: Option<Vec<String>>) -> PyResult<Vec<RunStatus>> {
    names.unwrap_or_default().iter().map(|s| status(s)).collect()
}

/// Seconds (int or float) as a duration; the library checks the range.
fn seconds(value: &Bound<'_, PyAny>, what: &str) -> PyResult<Duration> {
    let s: f64 = value.extract().map_err(|_| {
        to_py_err(Error::Invalid(format!(
            "{what} must be a number of seconds, got {}",
            value.repr().map_or_else(|_| "?".into(), |r| r.to_string())
        )))
    })?;
    if !s.is_finite() || !(0.0..=1e12).contains(&s) {
        return Err(to_py_err(Error::Invalid(format!("{what} must be a positive number of seconds, got {s}"))));
    }
    Ok(Duration::from_secs_f64(s))
}

fn object(value: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<Value>> {
    opt_json(value, what)
}

/// LangBot's `RunLedgerStore` over Redis.
#[pyclass(module = "runledger._native", name = "RunLedgerStore", frozen)]
pub struct RunLedgerStore {
    shared: Arc<Shared>,
}

#[pymethods]
impl RunLedgerStore {
    /// `redis_url` defaults to `$REDIS_URL`, else `redis://127.0.0.1:6379/`;
    /// a `redis+cluster://` URL (or `cluster=True`) is a Redis Cluster.
    #[new]
    #[pyo3(signature = (redis_url=None, prefix="rl", *, cluster=false, tls_ca_file=None, retention_seconds=None, max_json_bytes=None, max_events_per_run=None, connections=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        redis_url: Option<String>,
        prefix: &str,
        cluster: bool,
        tls_ca_file: Option<String>,
        retention_seconds: Option<Bound<'_, PyAny>>,
        max_json_bytes: Option<usize>,
        max_events_per_run: Option<u32>,
        connections: Option<usize>,
    ) -> PyResult<Self> {
        let url = redis_url
            .or_else(|| std::env::var("REDIS_URL").ok())
            .unwrap_or_else(|| "redis://127.0.0.1:6379/".to_string());
        let mut cfg = StoreConfig { prefix: prefix.to_string(), cluster, ..StoreConfig::default() };
        runledger::validate::prefix(prefix).py_err()?;
        cfg.tls_ca_file = tls_ca_file.map(Into::into);
        if let Some(r) = retention_seconds {
            cfg.retention = seconds(&r, "retention_seconds")?;
        }
        if let Some(m) = max_json_bytes {
            cfg.max_json_bytes = m;
        }
        if let Some(m) = max_events_per_run {
            cfg.max_events_per_run = m;
        }
        if let Some(c) = connections {
            cfg.connections = c;
        }
        let key = format!("{url}\n{cfg:?}");
        let mut all = SHARED.lock().map_err(|_| internal("store registry poisoned"))?;
        let shared = all
            .entry(key)
            .or_insert_with(|| Arc::new(Shared { url, cfg, store: tokio::sync::OnceCell::new() }))
            .clone();
        Ok(RunLedgerStore { shared })
    }

    #[getter]
    fn prefix(&self) -> String {
        self.shared.cfg.prefix.clone()
    }

    fn __repr__(&self) -> String {
        format!("RunLedgerStore({:?}, prefix={:?})", redact(&self.shared.url), self.shared.cfg.prefix)
    }

    #[pyo3(signature = (*, run_id, runner_id, event_id=None, binding_id=None, conversation_id=None, thread_id=None, workspace_id=None, bot_id=None, agent_id=None, deadline_at=None, authorization=None, metadata=None, status="running", queue_name=None, priority=0, requested_runtime_id=None, not_before=None, max_attempts=0, group_key=None))]
    #[allow(clippy::too_many_arguments)]
    fn create_run<'py>(
        &self,
        py: Python<'py>,
        run_id: String,
        runner_id: String,
        event_id: Option<String>,
        binding_id: Option<String>,
        conversation_id: Option<String>,
        thread_id: Option<String>,
        workspace_id: Option<String>,
        bot_id: Option<String>,
        agent_id: Option<String>,
        deadline_at: Option<Bound<'py, PyAny>>,
        authorization: Option<Bound<'py, PyAny>>,
        metadata: Option<Bound<'py, PyAny>>,
        status: &str,
        queue_name: Option<String>,
        priority: i64,
        requested_runtime_id: Option<String>,
        not_before: Option<Bound<'py, PyAny>>,
        max_attempts: u32,
        group_key: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let status = self::status(status)?;
        let run = NewRun {
            run_id,
            runner_id,
            queue: queue_name,
            event_id,
            binding_id,
            conversation_id,
            thread_id,
            workspace_id,
            bot_id,
            agent_id,
            deadline_at: epoch_ms(deadline_at.as_ref(), "deadline_at")?.map(|ms| ms as f64 / 1000.0),
            authorization: object(authorization.as_ref(), "authorization")?,
            metadata: object(metadata.as_ref(), "metadata")?,
            status: Some(status),
            priority,
            requested_runtime_id,
            not_before: epoch_ms(not_before.as_ref(), "not_before")?.map(|ms| ms as f64 / 1000.0),
            max_attempts,
            partition_key: None,
            group_key,
        };
        let shared = self.shared.clone();
        awaitable(py, async move { shared.store().await?.create_run(&run).await.py_err() }, dict)
    }

    #[pyo3(signature = (*, runtime_id, queue_name=None, lease_seconds=None, runner_ids=None, conversation_id=None, bot_id=None, workspace_id=None, thread_id=None, strict_thread=false))]
    #[allow(clippy::too_many_arguments)]
    fn claim_next_run<'py>(
        &self,
        py: Python<'py>,
        runtime_id: String,
        queue_name: Option<String>,
        lease_seconds: Option<Bound<'py, PyAny>>,
        runner_ids: Option<Vec<String>>,
        conversation_id: Option<String>,
        bot_id: Option<String>,
        workspace_id: Option<String>,
        thread_id: Option<String>,
        strict_thread: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut request = ClaimRequest::new(runtime_id);
        request.conversation_id = conversation_id;
        request.bot_id = bot_id;
        request.workspace_id = workspace_id;
        request.thread_id = thread_id;
        request.strict_thread = strict_thread;
        request.queues.extend(queue_name);
        request.runner_ids = runner_ids.unwrap_or_default();
        request.lease = lease(lease_seconds.as_ref())?;
        let shared = self.shared.clone();
        awaitable(py, async move { shared.store().await?.claim_next_run(&request).await.py_err() }, opt_dict)
    }

    #[pyo3(signature = (*, run_id, claim_token, runtime_id=None, lease_seconds=None))]
    fn renew_claim<'py>(
        &self,
        py: Python<'py>,
        run_id: String,
        claim_token: String,
        runtime_id: Option<String>,
        lease_seconds: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let lease = lease(lease_seconds.as_ref())?;
        let shared = self.shared.clone();
        awaitable(
            py,
            async move {
                let store = shared.store().await?;
                unless_inactive(store.renew_claim_by(&run_id, &claim_token, runtime_id.as_deref(), lease).await)
            },
            opt_dict,
        )
    }

    #[pyo3(signature = (*, run_id, claim_token, runtime_id=None, status="queued", status_reason=None, retry_in_seconds=None))]
    #[allow(clippy::too_many_arguments)]
    fn release_claim<'py>(
        &self,
        py: Python<'py>,
        run_id: String,
        claim_token: String,
        runtime_id: Option<String>,
        status: &str,
        status_reason: Option<String>,
        retry_in_seconds: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let release = Release {
            status: self::status(status)?,
            status_reason,
            retry_in: retry_in_seconds.as_ref().map(|s| seconds(s, "retry_in_seconds")).transpose()?,
            runtime_id,
        };
        let shared = self.shared.clone();
        awaitable(
            py,
            async move {
                let store = shared.store().await?;
                unless_inactive(store.release_claim(&run_id, &claim_token, &release).await)
            },
            opt_dict,
        )
    }

    #[pyo3(signature = (*, run_id, runtime_id, claim_token))]
    fn validate_active_claim<'py>(
        &self,
        py: Python<'py>,
        run_id: String,
        runtime_id: Option<String>,
        claim_token: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let shared = self.shared.clone();
        awaitable(
            py,
            async move {
                let store = shared.store().await?;
                store.validate_active_claim(&run_id, runtime_id.as_deref(), &claim_token).await.py_err()
            },
            |py, ok: bool| Ok(pyo3::types::PyBool::new(py, ok).to_owned().into_any()),
        )
    }

    #[pyo3(signature = (*, now=None, status="queued", status_reason="claim lease expired", limit=100))]
    fn release_expired_claims<'py>(
        &self,
        py: Python<'py>,
        now: Option<Bound<'py, PyAny>>,
        status: &str,
        status_reason: &str,
        limit: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let status = self::status(status)?;
        let now_ms = epoch_ms(now.as_ref(), "now")?;
        let reason = status_reason.to_string();
        let limit = limit.clamp(1, 500) as usize;
        let shared = self.shared.clone();
        awaitable(
            py,
            async move {
                let store = shared.store().await?;
                store.release_expired_claims(&[], now_ms, status, &reason, limit).await.py_err()
            },
            dict,
        )
    }

    #[pyo3(signature = (*, run_id, sequence, event_type, data=None, usage=None, source="runner", artifact_refs=None, metadata=None, claim_token=None))]
    #[allow(clippy::too_many_arguments)]
    fn append_event<'py>(
        &self,
        py: Python<'py>,
        run_id: String,
        sequence: i64,
        event_type: String,
        data: Option<Bound<'py, PyAny>>,
        usage: Option<Bound<'py, PyAny>>,
        source: &str,
        artifact_refs: Option<Bound<'py, PyAny>>,
        metadata: Option<Bound<'py, PyAny>>,
        claim_token: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut event = NewEvent::new(
            sequence,
            event_type,
            object(data.as_ref(), "data")?.unwrap_or(Value::Object(Default::default())),
        );
        event.usage = object(usage.as_ref(), "usage")?;
        event.source = source.to_string();
        event.metadata = object(metadata.as_ref(), "metadata")?;
        event.artifact_refs = match object(artifact_refs.as_ref(), "artifact_refs")? {
            None => Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(to_py_err(Error::Invalid("artifact_refs must be a list".into()))),
        };
        let shared = self.shared.clone();
        awaitable(
            py,
            async move { shared.store().await?.append_event(&run_id, claim_token.as_deref(), &event).await.py_err() },
            dict,
        )
    }

    #[pyo3(signature = (*, run_id, event_type, data=None, metadata=None))]
    fn append_audit_event<'py>(
        &self,
        py: Python<'py>,
        run_id: String,
        event_type: String,
        data: Option<Bound<'py, PyAny>>,
        metadata: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let data = object(data.as_ref(), "data")?;
        let metadata = object(metadata.as_ref(), "metadata")?;
        let shared = self.shared.clone();
        awaitable(
            py,
            async move {
                let store = shared.store().await?;
                unless_missing(store.append_audit_event(&run_id, &event_type, data.as_ref(), metadata.as_ref()).await)
            },
            opt_dict,
        )
    }

    #[pyo3(signature = (*, run_id, status, status_reason=None, usage=None, cost=None, metadata=None, claim_token=None))]
    #[allow(clippy::too_many_arguments)]
    fn finalize_run<'py>(
        &self,
        py: Python<'py>,
        run_id: String,
        status: &str,
        status_reason: Option<String>,
        usage: Option<Bound<'py, PyAny>>,
        cost: Option<Bound<'py, PyAny>>,
        metadata: Option<Bound<'py, PyAny>>,
        claim_token: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let finish = Finish {
            status: self::status(status)?,
            status_reason,
            usage: object(usage.as_ref(), "usage")?,
            cost: object(cost.as_ref(), "cost")?,
            metadata: object(metadata.as_ref(), "metadata")?,
        };
        let shared = self.shared.clone();
        awaitable(
            py,
            async move {
                let store = shared.store().await?;
                unless_missing(store.finalize_run(&run_id, &finish, claim_token.as_deref()).await)
            },
            opt_dict,
        )
    }

    #[pyo3(signature = (*, run_id, status_reason=None))]
    fn request_cancel<'py>(
        &self,
        py: Python<'py>,
        run_id: String,
        status_reason: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let shared = self.shared.clone();
        awaitable(
            py,
            async move { unless_missing(shared.store().await?.request_cancel(&run_id, status_reason.as_deref()).await) },
            opt_dict,
        )
    }

    fn get_run<'py>(&self, py: Python<'py>, run_id: String) -> PyResult<Bound<'py, PyAny>> {
        let shared = self.shared.clone();
        awaitable(py, async move { unless_missing(shared.store().await?.get_run(&run_id).await) }, opt_dict)
    }

    #[pyo3(signature = (*, conversation_id=None, statuses=None, before_id=None, limit=50, bot_id=None, workspace_id=None, thread_id=None, strict_thread=false, runner_id=None, binding_id=None))]
    #[allow(clippy::too_many_arguments)]
    fn list_runs<'py>(
        &self,
        py: Python<'py>,
        conversation_id: Option<String>,
        statuses: Option<Vec<String>>,
        before_id: Option<i64>,
        limit: i64,
        bot_id: Option<String>,
        workspace_id: Option<String>,
        thread_id: Option<String>,
        strict_thread: bool,
        runner_id: Option<String>,
        binding_id: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let filter = RunFilter {
            runner_id,
            binding_id,
            conversation_id,
            statuses: self::statuses(statuses)?,
            before_id,
            limit: limit.clamp(1, 100) as usize,
            bot_id,
            workspace_id,
            thread_id,
            strict_thread,
            ..RunFilter::default()
        };
        let shared = self.shared.clone();
        awaitable(py, async move { shared.store().await?.list_runs(&filter).await.py_err() }, |py, page| {
            let items = serialize(py, &page.items)?;
            (items, page.next_cursor, page.has_more, page.total).into_pyobject(py).map(Bound::into_any)
        })
    }

    #[pyo3(signature = (*, run_id, before_sequence=None, after_sequence=None, limit=50, direction="forward"))]
    fn page_run_events<'py>(
        &self,
        py: Python<'py>,
        run_id: String,
        before_sequence: Option<i64>,
        after_sequence: Option<i64>,
        limit: i64,
        direction: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        // As the SQL store: anything but "backward" pages forward.
        let direction = if direction == "backward" { Direction::Backward } else { Direction::Forward };
        let limit = limit.clamp(1, 100) as usize;
        let shared = self.shared.clone();
        awaitable(
            py,
            async move {
                let store = shared.store().await?;
                unless_missing(store.page_run_events(&run_id, before_sequence, after_sequence, limit, direction).await)
            },
            |py, page| match page {
                Some(page) => {
                    let items = serialize(py, &page.items)?;
                    (items, page.next_cursor, page.prev_cursor, page.has_more).into_pyobject(py).map(Bound::into_any)
                }
                // The SQL store pages an unknown run's (no) events.
                None => (pyo3::types::PyList::empty(py), None::<i64>, None::<i64>, false)
                    .into_pyobject(py)
                    .map(Bound::into_any),
            },
        )
    }

    #[pyo3(signature = (*, runtime_id, status="online", display_name=None, endpoint=None, version=None, capabilities=None, labels=None, metadata=None, heartbeat_deadline_seconds=None))]
    #[allow(clippy::too_many_arguments)]
    fn register_runtime<'py>(
        &self,
        py: Python<'py>,
        runtime_id: String,
        status: &str,
        display_name: Option<String>,
        endpoint: Option<String>,
        version: Option<String>,
        capabilities: Option<Bound<'py, PyAny>>,
        labels: Option<Bound<'py, PyAny>>,
        metadata: Option<Bound<'py, PyAny>>,
        heartbeat_deadline_seconds: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut runtime = RegisterRuntime::new(runtime_id);
        runtime.status = status.to_string();
        runtime.display_name = display_name;
        runtime.endpoint = endpoint;
        runtime.version = version;
        runtime.capabilities = object(capabilities.as_ref(), "capabilities")?;
        runtime.labels = object(labels.as_ref(), "labels")?;
        runtime.metadata = object(metadata.as_ref(), "metadata")?;
        runtime.heartbeat_deadline = heartbeat_deadline(heartbeat_deadline_seconds.as_ref())?;
        let shared = self.shared.clone();
        awaitable(py, async move { shared.store().await?.register_runtime(&runtime).await.py_err() }, dict)
    }

    #[pyo3(signature = (*, runtime_id, status="online", heartbeat_deadline_seconds=None, capabilities=None, labels=None, metadata=None))]
    #[allow(clippy::too_many_arguments)]
    fn heartbeat_runtime<'py>(
        &self,
        py: Python<'py>,
        runtime_id: String,
        status: &str,
        heartbeat_deadline_seconds: Option<Bound<'py, PyAny>>,
        capabilities: Option<Bound<'py, PyAny>>,
        labels: Option<Bound<'py, PyAny>>,
        metadata: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let beat = Heartbeat {
            status: status.to_string(),
            heartbeat_deadline: heartbeat_deadline(heartbeat_deadline_seconds.as_ref())?,
            capabilities: object(capabilities.as_ref(), "capabilities")?,
            labels: object(labels.as_ref(), "labels")?,
            metadata: object(metadata.as_ref(), "metadata")?,
        };
        let shared = self.shared.clone();
        awaitable(
            py,
            async move { unless_missing(shared.store().await?.heartbeat_runtime(&runtime_id, &beat).await) },
            opt_dict,
        )
    }

    fn get_runtime<'py>(&self, py: Python<'py>, runtime_id: String) -> PyResult<Bound<'py, PyAny>> {
        let shared = self.shared.clone();
        awaitable(py, async move { unless_missing(shared.store().await?.get_runtime(&runtime_id).await) }, opt_dict)
    }

    #[pyo3(signature = (*, statuses=None, labels=None, limit=100))]
    fn list_runtimes<'py>(
        &self,
        py: Python<'py>,
        statuses: Option<Vec<String>>,
        labels: Option<Bound<'py, PyAny>>,
        limit: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let labels = match object(labels.as_ref(), "labels")? {
            None => None,
            Some(Value::Object(map)) => Some(map),
            Some(_) => return Err(to_py_err(Error::Invalid("labels must be a dict".into()))),
        };
        let statuses = statuses.unwrap_or_default();
        let limit = limit.clamp(1, 500) as usize;
        let shared = self.shared.clone();
        awaitable(
            py,
            async move { shared.store().await?.page_runtimes(&statuses, labels.as_ref(), limit).await.py_err() },
            |py, page| {
                let items = serialize(py, &page.items)?;
                (items, page.total).into_pyobject(py).map(Bound::into_any)
            },
        )
    }

    #[pyo3(signature = (*, now=None, stale_status="stale", stale_after_seconds=None))]
    fn mark_stale_runtimes<'py>(
        &self,
        py: Python<'py>,
        now: Option<Bound<'py, PyAny>>,
        stale_status: &str,
        stale_after_seconds: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let now_ms = epoch_ms(now.as_ref(), "now")?;
        let stale_after = stale_after_seconds.as_ref().map(|s| seconds(s, "stale_after_seconds")).transpose()?;
        let stale_status = stale_status.to_string();
        let shared = self.shared.clone();
        awaitable(
            py,
            async move { shared.store().await?.mark_stale_runtimes(now_ms, &stale_status, stale_after).await.py_err() },
            dict,
        )
    }

    #[pyo3(signature = (*, start_time, end_time, runner_id=None))]
    fn get_run_stats<'py>(
        &self,
        py: Python<'py>,
        start_time: Bound<'py, PyAny>,
        end_time: Bound<'py, PyAny>,
        runner_id: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (start, end) = (window_end(&start_time, "start_time")?, window_end(&end_time, "end_time")?);
        let shared = self.shared.clone();
        awaitable(
            py,
            async move { shared.store().await?.get_run_stats(start, end, runner_id.as_deref()).await.py_err() },
            dict,
        )
    }

    fn get_runtime_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let shared = self.shared.clone();
        awaitable(py, async move { shared.store().await?.get_runtime_stats().await.py_err() }, dict)
    }

    #[pyo3(signature = (*, start_time, end_time, limit=50))]
    fn get_runner_stats<'py>(
        &self,
        py: Python<'py>,
        start_time: Bound<'py, PyAny>,
        end_time: Bound<'py, PyAny>,
        limit: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (start, end) = (window_end(&start_time, "start_time")?, window_end(&end_time, "end_time")?);
        let limit = limit.clamp(1, 100) as usize;
        let shared = self.shared.clone();
        awaitable(py, async move { shared.store().await?.get_runner_stats(start, end, limit).await.py_err() }, dict)
    }

    /// Configures the groups of a queue (beyond the SQL store): `group_by` a run
    /// field or "group_key" ("none": no grouping; None keeps it), runs of one
    /// group claimed at once, and per-group limits ({group: n}, None drops one).
    #[pyo3(signature = (queue_name, *, group_by=None, group_concurrency=None, group_limits=None))]
    fn set_queue_groups<'py>(
        &self,
        py: Python<'py>,
        queue_name: String,
        group_by: Option<String>,
        group_concurrency: Option<u32>,
        group_limits: Option<HashMap<String, Option<u32>>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let group_by = match group_by.as_deref() {
            None => None,
            Some("none") => Some(None),
            Some(text) => Some(Some(text.parse::<GroupBy>().py_err()?)),
        };
        let mut overrides: Vec<(String, Option<u32>)> = group_limits.unwrap_or_default().into_iter().collect();
        overrides.sort();
        let settings = GroupSettings { group_by, concurrency: group_concurrency, overrides };
        let shared = self.shared.clone();
        awaitable(py, async move { shared.store().await?.set_groups(&queue_name, &settings).await.py_err() }, dict)
    }

    /// Sets a queue's rate limits (claims per window, of the queue and of
    /// each group; 0 removes one) and caps (queued runs in the queue, a
    /// group, a workspace; 0 removes one). None keeps what is set.
    /// `group_rate_limits` ({group: (n, seconds)}) and `group_caps` ({group:
    /// n}) give groups their own, in place of the queue's per-group ones (an
    /// n of 0 holds the group's claims, or refuses its new runs); None as a
    /// value drops a group's own.
    #[pyo3(signature = (queue_name, *, rate_limit=None, rate_window=1.0, group_rate_limit=None,
        group_rate_window=1.0, cap=None, group_cap=None, workspace_cap=None, group_rate_limits=None,
        group_caps=None))]
    #[allow(clippy::too_many_arguments)]
    fn set_queue_limits<'py>(
        &self,
        py: Python<'py>,
        queue_name: String,
        rate_limit: Option<u32>,
        rate_window: f64,
        group_rate_limit: Option<u32>,
        group_rate_window: f64,
        cap: Option<u32>,
        group_cap: Option<u32>,
        workspace_cap: Option<u32>,
        group_rate_limits: Option<HashMap<String, Option<(u32, f64)>>>,
        group_caps: Option<HashMap<String, Option<u32>>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let rate = |max: Option<u32>, window: f64, name: &str| -> PyResult<Option<Option<RateLimit>>> {
            let Some(max) = max else { return Ok(None) };
            if max == 0 {
                return Ok(Some(None));
            }
            if !window.is_finite() || window <= 0.0 || window > 86_400.0 {
                return Err(invalid(format!("{name} must be more than 0 and at most 86400 seconds, got {window}")));
            }
            Ok(Some(Some(RateLimit { max, window: Duration::from_secs_f64(window) })))
        };
        let cap_of = |n: Option<u32>| n.map(|n| (n > 0).then_some(n));
        let mut group_rate_overrides = Vec::new();
        for (group, limit) in group_rate_limits.unwrap_or_default() {
            let limit = match limit {
                None => None,
                Some((max, window)) => {
                    if !window.is_finite() || window <= 0.0 || window > 86_400.0 {
                        return Err(invalid(format!(
                            "the window of group_rate_limits[{group:?}] must be more than 0 and at most 86400 seconds, got {window}"
                        )));
                    }
                    Some(RateLimit { max, window: Duration::from_secs_f64(window) })
                }
            };
            group_rate_overrides.push((group, limit));
        }
        group_rate_overrides.sort_by(|a, b| a.0.cmp(&b.0));
        let mut group_cap_overrides: Vec<(String, Option<u32>)> = group_caps.unwrap_or_default().into_iter().collect();
        group_cap_overrides.sort();
        let settings = LimitSettings {
            rate: rate(rate_limit, rate_window, "rate_window")?,
            group_rate: rate(group_rate_limit, group_rate_window, "group_rate_window")?,
            cap: cap_of(cap),
            group_cap: cap_of(group_cap),
            workspace_cap: cap_of(workspace_cap),
            group_rate_overrides,
            group_cap_overrides,
        };
        let shared = self.shared.clone();
        awaitable(py, async move { shared.store().await?.set_limits(&queue_name, &settings).await.py_err() }, dict)
    }

    /// Pauses a queue, or one group of it: claims skip it, runs stay queued.
    /// Returns False when it was paused already.
    #[pyo3(signature = (queue_name, *, group=None, by=None))]
    fn pause_queue<'py>(
        &self,
        py: Python<'py>,
        queue_name: String,
        group: Option<String>,
        by: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.set_paused(py, queue_name, group, by, true)
    }

    /// Resumes what pause_queue paused. Returns False when it was not paused.
    #[pyo3(signature = (queue_name, *, group=None, by=None))]
    fn resume_queue<'py>(
        &self,
        py: Python<'py>,
        queue_name: String,
        group: Option<String>,
        by: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.set_paused(py, queue_name, group, by, false)
    }

    /// The paused groups of a queue, sorted; at most `limit` (1 to 1000) of
    /// them. queue_stats()["paused_groups"] counts them all.
    #[pyo3(signature = (queue_name, *, limit=100))]
    fn paused_groups<'py>(&self, py: Python<'py>, queue_name: String, limit: usize) -> PyResult<Bound<'py, PyAny>> {
        let shared = self.shared.clone();
        awaitable(py, async move { shared.store().await?.paused_groups(&queue_name, limit).await.py_err() }, dict)
    }

    /// Queue depths and counters of one queue (beyond the SQL store).
    #[pyo3(signature = (queue_name="default"))]
    fn queue_stats<'py>(&self, py: Python<'py>, queue_name: &str) -> PyResult<Bound<'py, PyAny>> {
        let queue = queue_name.to_string();
        let shared = self.shared.clone();
        awaitable(py, async move { shared.store().await?.queue_stats(&queue, 10).await.py_err() }, dict)
    }
}

impl RunLedgerStore {
    /// pause_queue and resume_queue.
    fn set_paused<'py>(
        &self,
        py: Python<'py>,
        queue: String,
        group: Option<String>,
        by: Option<String>,
        pause: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let shared = self.shared.clone();
        awaitable(
            py,
            async move {
                let store = shared.store().await?;
                let (group, by) = (group.as_deref(), by.as_deref());
                if pause { store.pause(&queue, group, by).await } else { store.resume(&queue, group, by).await }
                    .py_err()
            },
            dict,
        )
    }

    /// The connected library store (for the Worker).
    pub async fn store(&self) -> PyResult<Store> {
        self.shared.store().await
    }
    pub fn shared_store(&self) -> impl Future<Output = PyResult<Store>> + Send + 'static {
        let shared = self.shared.clone();
        async move { shared.store().await }
    }
}

/// The lease of a claim: `lease_seconds` (default 60), at least one second
/// as the SQL store rounds it.
fn lease(value: Option<&Bound<'_, PyAny>>) -> PyResult<Duration> {
    match value.filter(|v| !v.is_none()) {
        None => Ok(Duration::from_secs(60)),
        Some(v) => Ok(seconds(v, "lease_seconds")?.max(Duration::from_secs(1))),
    }
}

fn heartbeat_deadline(value: Option<&Bound<'_, PyAny>>) -> PyResult<Duration> {
    match value.filter(|v| !v.is_none()) {
        None => Ok(Duration::from_secs(60)),
        Some(v) => Ok(seconds(v, "heartbeat_deadline_seconds")?.max(Duration::from_secs(1))),
    }
}

/// A stats window's end in whole epoch seconds (a datetime or a number).
fn window_end(value: &Bound<'_, PyAny>, what: &str) -> PyResult<i64> {
    let ms = epoch_ms(Some(value), what)?.ok_or_else(|| to_py_err(Error::Invalid(format!("{what} is required"))))?;
    Ok(ms.div_euclid(1000))
}

/// The URL without its passwords (the user's and a Sentinel URL's
/// `sentinel_password`), for reprs and messages.
fn redact(url: &str) -> String {
    runledger::store::conn::redact_url(url)
}
