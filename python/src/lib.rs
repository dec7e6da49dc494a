//! The `runledger._native` extension module: a thin PyO3 layer over the
//! runledger library. Nothing here implements an operation; every method
//! converts its arguments, calls the Rust `Store` or `Worker`, and converts
//! the answer. The Python package (`runledger/`) re-exports it.

mod completion;
mod convert;
mod errors;
mod server;
mod store;
mod worker;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<store::RunLedgerStore>()?;
    m.add_class::<worker::Worker>()?;
    m.add_class::<worker::RunContext>()?;
    m.add_class::<server::RedisServer>()?;
    m.add_class::<server::RedisCluster>()?;
    m.add_class::<server::RedisSentinel>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
