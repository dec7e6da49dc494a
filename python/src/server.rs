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
