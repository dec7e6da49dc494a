//! How a Rust future becomes an asyncio awaitable.
//!
//! The plain way (`pyo3_async_runtimes::tokio::future_into_py`) finishes
//! each call on the tokio thread that ran it: that thread takes the GIL to
//! build the result and to call `loop.call_soon_threadsafe`. With many calls
//! in flight the tokio threads queue on the GIL, and while one waits, every
//! other future on that thread (Redis replies included) waits with it; the
//! host benchmark measured the binding at a quarter of the library's rate.
//!
//! Here a finished call never touches Python on the tokio side. It pushes
//! its future and its value onto the loop's [`Completions`] queue and, when
//! the queue was empty, writes one byte to a socket that the event loop
//! watches (`loop.add_reader`). The loop thread, which holds the GIL anyway,
//! then resolves every queued future in one pass: one wake-up for a burst of
//! replies, and the conversion to Python objects happens where the caller
//! will use them.
//!
//! Cancelling the awaiting task does not stop such a call: it runs to the
//! end (each is one short Redis round trip, atomic in Lua) and its result is
//! dropped. Long waits that must stop with their task (the Python Worker's
//! `run`, `RunContext.wait_stopped`) use [`cancellable`] instead.

use std::future::Future;

use pyo3::prelude::*;

/// Awaits `fut` on the tokio runtime; `out` turns its value into a Python
/// object on the event loop's thread once it is ready.
pub fn awaitable<'py, T, F, O>(py: Python<'py>, fut: F, out: O) -> PyResult<Bound<'py, PyAny>>
where
    T: Send + 'static,
    F: Future<Output = PyResult<T>> + Send + 'static,
    O: for<'a> FnOnce(Python<'a>, T) -> PyResult<Bound<'a, PyAny>> + Send + 'static,
{
    #[cfg(unix)]
    {
        unix::awaitable(py, fut, out)
    }
    #[cfg(not(unix))]
    {
        cancellable(py, fut, out)
    }
}

/// Like [`awaitable`], but cancelling the awaiting task drops `fut` at once
/// (its completion takes the GIL on a tokio thread: for long waits only).
pub fn cancellable<'py, T, F, O>(py: Python<'py>, fut: F, out: O) -> PyResult<Bound<'py, PyAny>>
where
    T: Send + 'static,
    F: Future<Output = PyResult<T>> + Send + 'static,
    O: for<'a> FnOnce(Python<'a>, T) -> PyResult<Bound<'a, PyAny>> + Send + 'static,
{
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        let value = fut.await?;
        Python::attach(|py| out(py, value).map(Bound::unbind))
    })
}

#[cfg(unix)]
mod unix {
    use std::cell::RefCell;
    use std::future::Future;
    use std::io::{ErrorKind, Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex, PoisonError};

    use pyo3::exceptions::PyRuntimeError;
    use pyo3::intern;
    use pyo3::prelude::*;
    use pyo3::sync::PyOnceLock;
    use pyo3::types::{PyCFunction, PyDict, PyTuple};

    /// Builds the Python value of a finished call, on the loop's thread.
    type Resolve = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

    /// The finished calls of one event loop, waiting for its thread.
    struct Completions {
        queue: Mutex<Vec<(Py<PyAny>, Resolve)>>,
        /// Written (one byte) when the queue stops being empty.
        wake: UnixStream,
        /// The loop's reader end.
        watch: UnixStream,
    }

    impl Completions {
        fn push(&self, future: Py<PyAny>, resolve: Resolve) {
            let was_empty = {
                let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                queue.push((future, resolve));
                queue.len() == 1
            };
            if was_empty {
                // A full socket buffer means a wake-up is pending already.
                let _ = (&self.wake).write(&[1]);
            }
        }

        /// Runs on the loop's thread when the socket is readable. The bytes
        /// are read before the queue is taken: a call queued after the take
        /// finds the queue empty and writes a byte of its own.
        fn drain(&self, py: Python<'_>) {
            let mut bytes = [0u8; 256];
            loop {
                match (&self.watch).read(&mut bytes) {
                    Ok(n) if n == bytes.len() => continue,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    _ => break,
                }
            }
            let ready = std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner));
            for (future, resolve) in ready {
                let future = future.into_bound(py);
                // A cancelled task's future is done already; its result is dropped.
                if future.call_method0(intern!(py, "done")).is_ok_and(|done| done.is_truthy().unwrap_or(true)) {
                    continue;
                }
                let outcome = match resolve(py) {
                    Ok(value) => future.call_method1(intern!(py, "set_result"), (value,)),
                    Err(err) => future.call_method1(intern!(py, "set_exception"), (err.into_value(py),)),
                };
                if let Err(err) = outcome {
                    tracing::warn!("could not hand a result to asyncio: {err}");
                }
            }
        }
    }

    /// The event loops seen on this thread, each with its queue. A loop is
    /// held until it is closed, so the pointer that identifies it stays its own.
    struct Known {
        event_loop: Py<PyAny>,
        completions: Arc<Completions>,
    }

    thread_local! {
        static LOOPS: RefCell<Vec<Known>> = const { RefCell::new(Vec::new()) };
    }

    fn running_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let get = GET_RUNNING_LOOP.get_or_try_init(py, || {
            py.import("asyncio").and_then(|m| m.getattr("get_running_loop")).map(Bound::unbind)
        })?;
        get.call0(py)
            .map_err(|_| PyRuntimeError::new_err("runledger calls must be awaited inside a running asyncio event loop"))
            .map(|l| l.into_bound(py))
    }

    fn completions_for(event_loop: &Bound<'_, PyAny>) -> PyResult<Arc<Completions>> {
        let py = event_loop.py();
        let found = LOOPS.with_borrow(|loops| {
            loops.iter().find(|k| k.event_loop.as_ptr() == event_loop.as_ptr()).map(|k| k.completions.clone())
        });
        if let Some(completions) = found {
            return Ok(completions);
        }
        let (wake, watch) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        watch.set_nonblocking(true)?;
        let completions = Arc::new(Completions { queue: Mutex::new(Vec::new()), wake, watch });
        let drain = {
            let completions = completions.clone();
            PyCFunction::new_closure(
                py,
                None,
                None,
                move |args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>| -> PyResult<()> {
                    completions.drain(args.py());
                    Ok(())
                },
            )?
        };
        event_loop.call_method1(intern!(py, "add_reader"), (completions.watch.as_raw_fd(), drain))?;
        LOOPS.with_borrow_mut(|loops| {
            // A closed loop's selector is gone with it: its queue can go too.
            loops.retain(|k| {
                !k.event_loop.bind(py).call_method0("is_closed").is_ok_and(|c| c.is_truthy().unwrap_or(false))
            });
            loops.push(Known { event_loop: event_loop.clone().unbind(), completions: completions.clone() });
        });
        Ok(completions)
    }

    pub fn awaitable<'py, T, F, O>(py: Python<'py>, fut: F, out: O) -> PyResult<Bound<'py, PyAny>>
    where
        T: Send + 'static,
        F: Future<Output = PyResult<T>> + Send + 'static,
        O: for<'a> FnOnce(Python<'a>, T) -> PyResult<Bound<'a, PyAny>> + Send + 'static,
    {
        let event_loop = running_loop(py)?;
        let completions = completions_for(&event_loop)?;
        let future = event_loop.call_method0(intern!(py, "create_future"))?;
        let pending = future.clone().unbind();
        pyo3_async_runtimes::tokio::get_runtime().spawn(async move {
            let result = fut.await;
            let resolve: Resolve = Box::new(move |py| out(py, result?).map(Bound::unbind));
            completions.push(pending, resolve);
        });
        Ok(future)
    }
}
