//! runledger: a Redis-backed distributed work queue and run ledger.
//!
//! Hosts create runs; workers claim them under leases, append events and
//! finish them. Every state change is one Lua script in `lua/`, run by SHA.
//! Start with [`Store`]: its methods are the operations of the seed
//! `RunLedgerStore`, plus batch enqueue, queue stats and a reaper pass.

pub mod embedded;
pub mod embedded_cluster;
pub mod embedded_sentinel;
pub mod error;
pub mod keys;
pub mod model;
pub mod scripts;
pub mod store;
pub mod validate;
pub mod worker;

pub use error::{Error, Result};
pub use model::*;
pub use store::{ClaimOutcome, ConfigAdvice, Release, RunStats, RunnerStats, RuntimeStats, Waiter};
pub use store::{GroupBy, GroupSettings, LimitSettings, QueueGroups, QueueLimits, RateLimit, Store, StoreConfig};
pub use worker::{Backoff, Done, Failure, HandlerResult, RunContext, StopReason, Worker, WorkerReport};
