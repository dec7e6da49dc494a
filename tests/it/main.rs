//! The integration suite: one test binary, one module per subject.
//!
//! Every module used to be a binary of its own, each linking the library,
//! tokio, redis and the dev-dependencies again; as modules of one crate they
//! build and link once. `common` is the harness (private servers, the shared
//! local cluster, keyspace snapshots); the local Redis Cluster is started
//! once per process, on first use, for every cluster case of every module.
//!
//! Run one module with `cargo test --profile quick --test it -- <module>::`
//! (for example `seed_ops::`), or one case by its full path.

#[macro_use]
mod common;

mod acl;
mod active_claim;
mod bench;
mod chaos;
mod cli;
mod cluster;
mod cluster_failover;
mod cluster_harness;
mod compose;
mod concurrency;
mod durability;
mod fencing_events;
mod groups;
mod hints;
mod host_api;
mod hostile_input;
mod keys;
mod layout;
mod limits;
mod listing;
mod outage;
mod redis_settings;
mod resend;
mod resilience;
mod retention;
mod runner_lanes;
mod runs_end;
mod runtimes;
mod seed_ops;
mod sentinel;
mod smoke;
mod stats;
mod tls;
mod ui;
mod ui_browser;
mod validation;
mod wakeups;
mod worker;
mod worker_faults;
mod worker_metrics;
mod worker_smoke;
