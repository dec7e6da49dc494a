//! JSON values between Python and Rust. Results leave the Rust `Store` as
//! serde values shaped like the seed's dicts; this turns them into Python
//! dicts, lists and numbers, and turns the caller's dicts into JSON.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};

/// Nesting past this is refused here already (the store allows 64 levels).
const MAX_DEPTH: usize = 128;

/// A serde value as a Python object.
pub fn to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any(),
            (None, Some(u)) => u.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, v) in map {
                dict.set_item(k, to_py(py, v)?)?;
            }
            dict.into_any()
        }
    })
}

/// Anything serde can serialize (a run, a page...) as a Python object.
pub fn serialize<'py, T: serde::Serialize>(py: Python<'py>, value: &T) -> PyResult<Bound<'py, PyAny>> {
    let value =
        serde_json::to_value(value).map_err(|e| crate::errors::invalid(format!("cannot encode result: {e}")))?;
    to_py(py, &value)
}

/// A Python object (dict, list, str, number, bool, None) as JSON. `what`
/// names the argument in the error.
pub fn from_py(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Value> {
    from_py_at(obj, what, 0)
}

fn from_py_at(obj: &Bound<'_, PyAny>, what: &str, depth: usize) -> PyResult<Value> {
    if depth > MAX_DEPTH {
        return Err(crate::errors::invalid(format!("{what} is nested deeper than {MAX_DEPTH} levels")));
    }
    if obj.is_none() {
        return Ok(Value::Null);
    }
    // bool before int: True is an int in Python.
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::from(u));
        }
        return Err(crate::errors::invalid(format!("{what} holds an integer too large for JSON: {obj}")));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        let f = f.value();
        return Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| crate::errors::invalid(format!("{what} holds {f}, which JSON cannot represent")));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::String(s.to_str()?.to_owned()));
    }
    if let Ok(dict) = obj.cast::<PyDict>() {
        let mut map = Map::new();
        for (k, v) in dict.iter() {
            let key = k.cast::<PyString>().map_err(|_| {
                crate::errors::invalid(format!(
                    "{what} has a key that is not a string: {}",
                    k.repr().map_or_else(|_| "?".into(), |r| r.to_string())
                ))
            })?;
            map.insert(key.to_str()?.to_owned(), from_py_at(&v, what, depth + 1)?);
        }
        return Ok(Value::Object(map));
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        let mut items = Vec::new();
        for item in obj.try_iter()? {
            items.push(from_py_at(&item?, what, depth + 1)?);
        }
        return Ok(Value::Array(items));
    }
    let type_name = obj.get_type().name().map_or_else(|_| "?".to_string(), |n| n.to_string());
    Err(crate::errors::invalid(format!(
        "{what} holds a {type_name}, which is not JSON (dict, list, str, int, float, bool or None)"
    )))
}

/// An optional dict argument as JSON (`None` stays `None`).
pub fn opt_json(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<Value>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) => from_py(o, what).map(Some),
    }
}

/// A time given as epoch seconds (int or float) or as a `datetime`, in ms.
pub fn epoch_ms(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<i64>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(None) };
    let seconds: f64 = if obj.hasattr("timestamp")? && !obj.is_instance_of::<PyFloat>() {
        // A naive datetime means UTC in the seed (it stores naive UTC times).
        let aware = match obj.getattr("tzinfo")?.is_none() {
            true => {
                let utc = obj.py().import("datetime")?.getattr("timezone")?.getattr("utc")?;
                let kwargs = PyDict::new(obj.py());
                kwargs.set_item("tzinfo", utc)?;
                obj.call_method("replace", (), Some(&kwargs))?
            }
            false => obj.clone(),
        };
        aware.call_method0("timestamp")?.extract()?
    } else {
        obj.extract()
            .map_err(|_| crate::errors::invalid(format!("{what} must be epoch seconds or a datetime, got {obj}")))?
    };
    if !seconds.is_finite() {
        return Err(crate::errors::invalid(format!("{what} must be a finite number of seconds, got {seconds}")));
    }
    Ok(Some((seconds * 1000.0).round() as i64))
}
