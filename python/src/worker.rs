//! `runledger.Worker` and its `RunContext`: the Rust [`runledger::Worker`]
//! (registration, heartbeats, blocking claims, lease renewal, cancellation,
//! graceful shutdown) running an `async def handler(ctx)` of Python's.
//!
//! Each claimed run's handler coroutine is handed to the asyncio loop that
//! awaits `Worker.run()` (`run_coroutine_threadsafe`); the Rust side awaits
//! its result. When the Rust worker stops a handler (a lost lease at once,
//! a cancellation or shutdown after a short window) it drops that wait, and
//! dropping it cancels the Python task.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyDict, PyTuple};
use runledger::{Backoff, Done, Failure, HandlerResult, StopReason};
use tokio_util::sync::CancellationToken;

use crate::completion::{awaitable, cancellable};
use crate::convert::{from_py, opt_json, serialize};
use crate::errors::{IntoPy, internal};
use crate::store::RunLedgerStore;

/// What every handler call needs: the handler and the loop it runs on.
struct Handler {
    function: Py<PyAny>,
    event_loop: Py<PyAny>,
}

#[derive(Clone)]
struct Settings {
    queues: Vec<String>,
    runner_ids: Vec<String>,
    runtime_id: Option<String>,
    concurrency: usize,
    lease: Duration,
    heartbeat: Duration,
    grace: Duration,
    reap_every: Option<Duration>,
    backoff: Backoff,
}

/// Runs `handler(ctx)` for every run it claims from `queues`.
#[pyclass(module = "runledger._native", name = "Worker", frozen)]
pub struct Worker {
    store: Py<RunLedgerStore>,
    handler: Py<PyAny>,
    settings: Settings,
    shutdown: CancellationToken,
}

fn secs(value: f64, what: &str) -> PyResult<Duration> {
    if !value.is_finite() || !(0.0..=1e9).contains(&value) {
        return Err(crate::errors::to_py_err(runledger::Error::Invalid(format!(
            "{what} must be a positive number of seconds, got {value}"
        ))));
    }
    Ok(Duration::from_secs_f64(value))
}

#[pymethods]
impl Worker {
    #[new]
    #[pyo3(signature = (store, handler, *, queues=None, runner_ids=None, runtime_id=None, concurrency=1, lease_seconds=30.0, heartbeat_seconds=10.0, grace_seconds=10.0, reap_every_seconds=Some(5.0), max_attempts=5, backoff_base_seconds=1.0, backoff_max_seconds=300.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        store: Py<RunLedgerStore>,
        handler: Bound<'_, PyAny>,
        queues: Option<Vec<String>>,
        runner_ids: Option<Vec<String>>,
        runtime_id: Option<String>,
        concurrency: usize,
        lease_seconds: f64,
        heartbeat_seconds: f64,
        grace_seconds: f64,
        reap_every_seconds: Option<f64>,
        max_attempts: i64,
        backoff_base_seconds: f64,
        backoff_max_seconds: f64,
    ) -> PyResult<Self> {
        if !handler.is_callable() {
            return Err(crate::errors::to_py_err(runledger::Error::Invalid(
                "handler must be an async function taking the run's context".into(),
            )));
        }
        let settings = Settings {
            queues: queues.unwrap_or_else(|| vec![runledger::DEFAULT_QUEUE.to_string()]),
            runner_ids: runner_ids.unwrap_or_default(),
            runtime_id,
            concurrency,
            lease: secs(lease_seconds, "lease_seconds")?,
            heartbeat: secs(heartbeat_seconds, "heartbeat_seconds")?,
            grace: secs(grace_seconds, "grace_seconds")?,
            reap_every: reap_every_seconds.map(|s| secs(s, "reap_every_seconds")).transpose()?,
            backoff: Backoff {
                base: secs(backoff_base_seconds, "backoff_base_seconds")?,
                max: secs(backoff_max_seconds, "backoff_max_seconds")?,
                max_attempts,
            },
        };
        Ok(Worker { store, handler: handler.unbind(), settings, shutdown: CancellationToken::new() })
    }

    /// Runs until `stop()` (or until the awaiting task is cancelled, which
    /// stops it the same way): in-flight handlers get `grace_seconds` to
    /// finish, then what is still held goes back to the queue. Returns the
    /// worker's report (claimed, completed, failed, retried, cancelled,
    /// lease_lost, released_on_shutdown).
    fn run<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let event_loop = py.import("asyncio")?.call_method0("get_running_loop")?.unbind();
        let handler = Arc::new(Handler { function: self.handler.clone_ref(py), event_loop });
        let store = self.store.get().shared_store();
        let settings = self.settings.clone();
        let shutdown = self.shutdown.clone();
        cancellable(
            py,
            async move {
                let store = store.await?;
                let mut builder = runledger::Worker::builder(&store)
                    .queues(settings.queues.clone())
                    .concurrency(settings.concurrency)
                    .lease(settings.lease)
                    .heartbeat(settings.heartbeat)
                    .grace(settings.grace)
                    .reap_every(settings.reap_every)
                    .backoff(settings.backoff.clone())
                    .shutdown_token(shutdown.clone())
                    .handle_signals(false);
                for runner in &settings.runner_ids {
                    builder = builder.runner(runner.clone());
                }
                if let Some(id) = &settings.runtime_id {
                    builder = builder.runtime_id(id.clone());
                }
                let worker = builder.build(move |ctx| call_handler(handler.clone(), ctx)).py_err()?;
                // The worker runs as a task of its own: if the awaiting Python
                // task is cancelled, this future is dropped, which fires the
                // shutdown, and the worker still winds down in good order.
                let _stop_when_dropped = shutdown.clone().drop_guard();
                let report = tokio::spawn(worker.run()).await.map_err(|e| internal(format!("worker task: {e}")))?;
                report.py_err()
            },
            |py, report| {
                let out = PyDict::new(py);
                out.set_item("claimed", report.claimed)?;
                out.set_item("completed", report.completed)?;
                out.set_item("failed", report.failed)?;
                out.set_item("retried", report.retried)?;
                out.set_item("cancelled", report.cancelled)?;
                out.set_item("lease_lost", report.lease_lost)?;
                out.set_item("released_on_shutdown", report.released_on_shutdown)?;
                Ok(out.into_any())
            },
        )
    }

    /// Starts a graceful shutdown; `run()` returns once it is done.
    fn stop(&self) {
        self.shutdown.cancel();
    }

    #[getter]
    fn stopping(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}

/// Calls the Python handler for one run and waits for its outcome.
async fn call_handler(handler: Arc<Handler>, ctx: runledger::RunContext) -> HandlerResult {
    let (tx, rx) = tokio::sync::oneshot::channel::<HandlerResult>();
    let submitted = Python::attach(|py| -> PyResult<Py<PyAny>> {
        let context = Py::new(py, RunContext::new(py, ctx)?)?;
        let coroutine = handler.function.call1(py, (context,))?;
        let asyncio = py.import("asyncio")?;
        let future = asyncio.call_method1("run_coroutine_threadsafe", (coroutine, handler.event_loop.bind(py)))?;
        let tx = Mutex::new(Some(tx));
        let done = PyCFunction::new_closure(
            py,
            None,
            None,
            move |args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>| -> PyResult<()> {
                let outcome = outcome(&args.get_item(0)?);
                if let Some(tx) = tx.lock().ok().and_then(|mut slot| slot.take()) {
                    let _ = tx.send(outcome);
                }
                Ok(())
            },
        )?;
        future.call_method1("add_done_callback", (done,))?;
        Ok(future.unbind())
    });
    let future = match submitted {
        Ok(future) => CancelOnDrop(Some(future)),
        Err(e) => return Err(Failure::fatal(format!("the handler could not start: {e}"))),
    };
    let outcome = rx.await.unwrap_or_else(|_| Err(Failure::fatal("the handler's task vanished")));
    future.disarm();
    outcome
}

/// What a finished handler task comes to: `None` or a dict of `usage`,
/// `cost` and `metadata` completes the run; `runledger.Retry` sends it back
/// with a backoff; any other exception fails it.
fn outcome(future: &Bound<'_, PyAny>) -> HandlerResult {
    let py = future.py();
    match future.call_method0("result") {
        Ok(value) if value.is_none() => Ok(Done::default()),
        Ok(value) => match value.cast::<PyDict>() {
            Ok(dict) => {
                let field = |name: &str| -> std::result::Result<Option<serde_json::Value>, Failure> {
                    let item = dict.get_item(name).map_err(|e| Failure::fatal(e.to_string()))?;
                    opt_json(item.as_ref(), name).map_err(|e| Failure::fatal(format!("the handler's {name}: {e}")))
                };
                Ok(Done { usage: field("usage")?, cost: field("cost")?, metadata: field("metadata")? })
            }
            Err(_) => Err(Failure::fatal(format!(
                "the handler returned {}, expected None or a dict with usage, cost and metadata",
                value.get_type().name().map_or_else(|_| "?".to_string(), |n| n.to_string())
            ))),
        },
        Err(err) => {
            let retry = py.import("runledger.errors").and_then(|m| m.getattr("Retry"));
            let text = err.value(py).str().map_or_else(|_| String::new(), |s| s.to_string());
            match retry {
                Ok(retry) if err.is_instance(py, &retry) => Err(Failure::retryable(text)),
                _ => {
                    let kind = err.get_type(py).name().map_or_else(|_| "Exception".to_string(), |n| n.to_string());
                    Err(Failure::fatal(if text.is_empty() { kind } else { format!("{kind}: {text}") }))
                }
            }
        }
    }
}

/// Cancels the handler's asyncio task unless disarmed: the Rust worker drops
/// the wait when it stops a handler.
struct CancelOnDrop(Option<Py<PyAny>>);

impl CancelOnDrop {
    fn disarm(mut self) {
        if let Some(future) = self.0.take() {
            Python::attach(|_py| drop(future));
        }
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(future) = self.0.take() {
            Python::attach(|py| {
                let _ = future.call_method0(py, "cancel");
            });
        }
    }
}

/// What a handler gets: the run, event emission and the stop signal.
#[pyclass(module = "runledger._native", name = "RunContext", frozen)]
pub struct RunContext {
    inner: runledger::RunContext,
    run: Py<PyAny>,
}

impl RunContext {
    fn new(py: Python<'_>, inner: runledger::RunContext) -> PyResult<Self> {
        let run = serialize(py, inner.run.as_ref())?.unbind();
        Ok(RunContext { inner, run })
    }
}

#[pymethods]
impl RunContext {
    /// The claimed run, as `get_run` shows it (with its claim token).
    #[getter]
    fn run(&self, py: Python<'_>) -> Py<PyAny> {
        self.run.clone_ref(py)
    }

    #[getter]
    fn run_id(&self) -> String {
        self.inner.run_id().to_string()
    }

    #[getter]
    fn claim_token(&self) -> String {
        self.inner.claim_token().to_string()
    }

    /// True once `request_cancel` reached this run: the handler should stop;
    /// the run ends `cancelled` whatever it returns.
    #[getter]
    fn cancelled(&self) -> bool {
        self.inner.stop_reason() == Some(StopReason::Cancelled)
    }

    /// Why the handler is asked to stop: `"cancelled"`, `"lease_lost"`,
    /// `"shutdown"`, or `None` while it may go on.
    #[getter]
    fn stop_reason(&self) -> Option<&'static str> {
        self.inner.stop_reason().map(|r| match r {
            StopReason::Cancelled => "cancelled",
            StopReason::LeaseLost(_) => "lease_lost",
            StopReason::Shutdown => "shutdown",
        })
    }

    #[getter]
    fn stopping(&self) -> bool {
        self.inner.is_stopped()
    }

    /// Appends one event with the next sequence number (fenced by the claim
    /// token); returns the stored event.
    #[pyo3(signature = (event_type, data=None))]
    fn emit<'py>(
        &self,
        py: Python<'py>,
        event_type: String,
        data: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let data = opt_json(data.as_ref(), "data")?.unwrap_or_else(|| serde_json::Value::Object(Default::default()));
        let ctx = self.inner.clone();
        awaitable(py, async move { ctx.emit(&event_type, data).await.py_err() }, |py, event| serialize(py, &event))
    }

    /// Appends several `(event_type, data)` events in one round trip, in order.
    fn emit_many<'py>(&self, py: Python<'py>, events: Vec<(String, Bound<'py, PyAny>)>) -> PyResult<Bound<'py, PyAny>> {
        let events =
            events.into_iter().map(|(kind, data)| Ok((kind, from_py(&data, "data")?))).collect::<PyResult<Vec<_>>>()?;
        let ctx = self.inner.clone();
        awaitable(py, async move { ctx.emit_many(events).await.py_err() }, |py, events| serialize(py, &events))
    }

    /// Resolves when the handler is asked to stop (see `stop_reason`).
    fn wait_stopped<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let ctx = self.inner.clone();
        cancellable(
            py,
            async move {
                ctx.stopped().await;
                Ok(())
            },
            |py, ()| Ok(py.None().into_bound(py)),
        )
    }

    fn __repr__(&self) -> String {
        format!("RunContext(run_id={:?})", self.inner.run_id())
    }
}
