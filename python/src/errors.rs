//! The library's errors as the Python exceptions of `runledger.errors`.
//!
//! The exception classes are defined in Python (`runledger/errors.py`, with
//! the multiple inheritance that lets `except ValueError` catch what the SQL
//! store raised as `ValueError`); this maps each [`runledger::Error`] variant
//! to one of them, with the library's message.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use runledger::Error;

/// The exception for a library error.
pub fn to_py_err(err: Error) -> PyErr {
    let class = match &err {
        Error::Invalid(_) => "InvalidInput",
        Error::NotFound(_) => "NotFound",
        Error::StaleToken(_) => "StaleToken",
        Error::Conflict(_) => "Conflict",
        Error::OutOfOrder(_) => "OutOfOrder",
        Error::Finished(_) => "RunFinished",
        Error::DeadlinePassed(_) => "DeadlinePassed",
        Error::Limit(_) => "LimitExceeded",
        Error::QueueFull(_) => "QueueFull",
        Error::WriteConcern(_) => "WriteConcernError",
        Error::Protocol(_) => "ProtocolError",
        e if e.is_transient() => "Unavailable",
        _ => "RedisError",
    };
    // The bare message: "Unknown run status: ..." as the SQL store says it,
    // not the Display form's "invalid input: " in front.
    let message = match &err {
        Error::Invalid(m)
        | Error::NotFound(m)
        | Error::StaleToken(m)
        | Error::Conflict(m)
        | Error::OutOfOrder(m)
        | Error::Finished(m)
        | Error::DeadlinePassed(m)
        | Error::Limit(m)
        | Error::QueueFull(m)
        | Error::WriteConcern(m)
        | Error::Protocol(m) => m.clone(),
        other => other.to_string(),
    };
    Python::attach(|py| match exception(py, class, &message) {
        Ok(err) => err,
        Err(import_failed) => import_failed,
    })
}

fn exception(py: Python<'_>, class: &str, message: &str) -> PyResult<PyErr> {
    let class = py.import("runledger.errors")?.getattr(class)?;
    Ok(PyErr::from_value(class.call1((message,))?))
}

/// Turns a library result into a Python one.
pub trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for runledger::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py_err)
    }
}

/// A failure inside the binding itself (should not happen).
pub fn internal(message: impl Into<String>) -> PyErr {
    PyRuntimeError::new_err(message.into())
}

/// `runledger.InvalidInput` (a `ValueError`) with this message.
pub fn invalid(message: impl Into<String>) -> PyErr {
    to_py_err(Error::Invalid(message.into()))
}
