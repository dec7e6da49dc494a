//! `runledger.testing.RedisServer`: a private `redis-server` on a free
//! loopback port with its own temp dir, the embedded default the Rust tests
//! and `runledger demo` use, for Python tests and scripts. Stopped (by its
//! PID) on `stop()`, on leaving a `with` block, or when garbage collected.

use std::sync::Mutex;

use pyo3::prelude::*;
use runledger::embedded::RedisServer as Embedded;

use crate::errors::{IntoPy, internal};

#[pyclass(module = "runledger._native", name = "RedisServer", frozen)]
pub struct RedisServer {
    server: Mutex<Option<Embedded>>,
    url: String,
    port: u16,
    pid: u32,
}

#[pymethods]
impl RedisServer {
    /// Starts the server (extra `redis-server` arguments allowed) and waits
    /// until it answers.
    #[new]
    #[pyo3(signature = (*args))]
    fn new(py: Python<'_>, args: Vec<String>) -> PyResult<Self> {
        let server = py.detach(|| {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            Embedded::start_with(&refs)
        });
        let server = server.py_err()?;
        Ok(RedisServer { url: server.url(), port: server.port(), pid: server.pid(), server: Mutex::new(Some(server)) })
    }

    #[getter]
    fn url(&self) -> String {
        self.url.clone()
    }

    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    #[getter]
    fn pid(&self) -> u32 {
        self.pid
    }

    /// Stops the server; a second call does nothing.
    fn stop(&self) -> PyResult<()> {
        let mut server = self.server.lock().map_err(|_| internal("server lock poisoned"))?;
        if let Some(mut s) = server.take() {
            s.stop();
        }
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: Vec<Py<PyAny>>) -> PyResult<bool> {
        self.stop()?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("RedisServer(url={:?}, pid={})", self.url, self.pid)
    }
}

/// A private local Redis Cluster (3 masters, 3 replicas by default), started
/// like [`RedisServer`] and stopped by the PIDs of its nodes.
#[pyclass(module = "runledger._native", name = "RedisCluster", frozen)]
pub struct RedisCluster {
    cluster: Mutex<Option<runledger::embedded_cluster::RedisCluster>>,
    url: String,
}

#[pymethods]
impl RedisCluster {
    #[new]
    #[pyo3(signature = (masters=3, replicas_per_master=1))]
    fn new(py: Python<'_>, masters: usize, replicas_per_master: usize) -> PyResult<Self> {
        let cluster = py
            .detach(|| runledger::embedded_cluster::RedisCluster::start_with(masters, replicas_per_master))
            .py_err()?;
        Ok(RedisCluster { url: cluster.url(), cluster: Mutex::new(Some(cluster)) })
    }

    /// `redis+cluster://` naming every node.
    #[getter]
    fn url(&self) -> String {
        self.url.clone()
    }

    fn stop(&self) -> PyResult<()> {
        let mut cluster = self.cluster.lock().map_err(|_| internal("cluster lock poisoned"))?;
        drop(cluster.take());
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: Vec<Py<PyAny>>) -> PyResult<bool> {
        self.stop()?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("RedisCluster(url={:?})", self.url)
    }
}

/// A private Redis Sentinel setup (a master, 2 replicas, 3 sentinels by
/// default), the one the Rust tests and `runledger demo --sentinel` use,
/// stopped by the PIDs of its processes. `failover()` and
/// `wait_new_master()` let a test switch masters the way an operator would.
#[pyclass(module = "runledger._native", name = "RedisSentinel", frozen)]
pub struct RedisSentinel {
    setup: Mutex<Option<runledger::embedded_sentinel::RedisSentinel>>,
    url: String,
}

impl RedisSentinel {
    fn with<T>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&runledger::embedded_sentinel::RedisSentinel) -> runledger::Result<T> + Send,
    ) -> PyResult<T>
    where
        T: Send,
    {
        let setup = self.setup.lock().map_err(|_| internal("sentinel lock poisoned"))?;
        let setup = setup.as_ref().ok_or_else(|| internal("the Sentinel setup is stopped"))?;
        // The probes block (bounded by their timeouts): off the GIL.
        py.detach(|| f(setup)).py_err()
    }
}

#[pymethods]
impl RedisSentinel {
    #[new]
    #[pyo3(signature = (replicas=2, sentinels=3))]
    fn new(py: Python<'_>, replicas: usize, sentinels: usize) -> PyResult<Self> {
        let setup =
            py.detach(|| runledger::embedded_sentinel::RedisSentinel::start_with(replicas, sentinels)).py_err()?;
        Ok(RedisSentinel { url: setup.url(), setup: Mutex::new(Some(setup)) })
    }

    /// `redis+sentinel://127.0.0.1:p1,.../<master-name>`.
    #[getter]
    fn url(&self) -> String {
        self.url.clone()
    }

    /// The master's port, once every sentinel names it and it says it is one.
    fn master_port(&self, py: Python<'_>) -> PyResult<u16> {
        self.with(py, |s| s.master_port())
    }

    /// A planned switch: `SENTINEL FAILOVER` on a sentinel.
    fn failover(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |s| s.failover())
    }

    /// Waits (at most `timeout` seconds) until the sentinels agree on a
    /// master other than `old`; its port.
    #[pyo3(signature = (old, timeout=60.0))]
    fn wait_new_master(&self, py: Python<'_>, old: u16, timeout: f64) -> PyResult<u16> {
        let timeout = std::time::Duration::from_secs_f64(timeout.clamp(0.0, 600.0));
        self.with(py, move |s| s.wait_new_master(old, timeout))
    }

    /// Waits (at most `timeout` seconds) until the setup could fail over again.
    #[pyo3(signature = (timeout=60.0))]
    fn wait_ready(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let timeout = std::time::Duration::from_secs_f64(timeout.clamp(0.0, 600.0));
        self.with(py, move |s| s.wait_ready(timeout))
    }

    fn stop(&self) -> PyResult<()> {
        let mut setup = self.setup.lock().map_err(|_| internal("sentinel lock poisoned"))?;
        drop(setup.take());
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: Vec<Py<PyAny>>) -> PyResult<bool> {
        self.stop()?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("RedisSentinel(url={:?})", self.url)
    }
}
