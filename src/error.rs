//! The library's error type: one variant per thing a caller can act on.

use redis::RedisError;

/// Everything a runledger operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument was rejected before anything was written.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The run or runtime does not exist (or has expired).
    #[error("not found: {0}")]
    NotFound(String),
    /// The claim token no longer holds the run: the lease was lost.
    #[error("claim lost: {0}")]
    StaleToken(String),
    /// The write contradicts what is stored (another terminal status, an event
    /// with the same sequence and other content).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The run is finished and takes no new runner events.
    #[error("run finished: {0}")]
    Finished(String),
    /// An event sequence at or below the stream's last one that is not a retry.
    #[error("out of order: {0}")]
    OutOfOrder(String),
    /// The write would pass a configured limit (events per run): nothing was
    /// written. Not transient: the same call fails again.
    #[error("limit reached: {0}")]
    Limit(String),
    /// A create would take a queue, a group or a workspace past its cap of
    /// queued runs: nothing was written. Not transient until runs leave.
    #[error("queue full: {0}")]
    QueueFull(String),
    /// The run passed its deadline; it is now `timeout`.
    #[error("deadline passed: {0}")]
    DeadlinePassed(String),
    /// The write concern was not met: the write was applied on the master,
    /// but fewer replicas than asked for acknowledged it in time, so a
    /// failover right now could lose it. Retrying is safe (scripts are
    /// idempotent by run id, sequence or token).
    #[error("write concern not met: {0}")]
    WriteConcern(String),
    /// Redis could not be reached or answered with an error of its own.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// A reply had a shape the library did not expect (a bug or a foreign key).
    #[error("unexpected reply from Redis: {0}")]
    Protocol(String),
    /// Starting or talking to a private redis-server failed.
    #[error("redis-server: {0}")]
    Server(String),
    /// The Redis server could not be reached.
    #[error("cannot reach Redis at {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Turns a script's `CODE message` error into its variant; other Redis
    /// errors stay [`Error::Redis`].
    pub(crate) fn from_redis(err: RedisError) -> Error {
        let message = || {
            let detail = err.detail().unwrap_or_default();
            // Redis appends " script: <sha>, on @user_script:<line>." to errors raised by scripts.
            detail.split(" script: ").next().unwrap_or(detail).trim().to_string()
        };
        match err.code() {
            Some("INVALID") => Error::Invalid(message()),
            Some("NOT_FOUND") => Error::NotFound(message()),
            Some("STALE_TOKEN") => Error::StaleToken(message()),
            Some("CONFLICT") => Error::Conflict(message()),
            Some("FINISHED") => Error::Finished(message()),
            Some("OUT_OF_ORDER") => Error::OutOfOrder(message()),
            Some("DEADLINE") => Error::DeadlinePassed(message()),
            Some("LIMIT") => Error::Limit(message()),
            Some("QUEUE_FULL") => Error::QueueFull(message()),
            Some("CORRUPT") => Error::Protocol(message()),
            _ if err.kind() == redis::ErrorKind::Client
                && err.detail().is_some_and(|d| d.starts_with("WRITE_CONCERN ")) =>
            {
                Error::WriteConcern(err.detail().unwrap_or_default().trim_start_matches("WRITE_CONCERN ").to_string())
            }
            _ => Error::Redis(err),
        }
    }

    /// True for failures of Redis itself (unreachable, a failover, a write
    /// concern not met) rather than of the call: the same call may succeed
    /// later.
    ///
    /// Not a refusal that the same call meets again: `NOPERM` (an ACL user
    /// without the rights), a wrong password, a script error. A worker
    /// retrying those would wait for ever.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::WriteConcern(_) | Error::Unreachable { .. } => true,
            Error::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || Error::is_cluster_transient(e)
                    || matches!(
                        e.code(),
                        Some("LOADING" | "BUSY" | "READONLY" | "OOM" | "MASTERDOWN" | "UNBLOCKED" | "NOREPLICAS")
                    )
                    // Sentinel: no master named yet (a failover under way).
                    || matches!(e.kind(), redis::ErrorKind::MasterNameNotFoundBySentinel)
            }
            _ => false,
        }
    }

    /// True when a script asked the client to re-read and try again.
    pub(crate) fn is_retry(err: &RedisError) -> bool {
        err.code() == Some("RETRY")
    }

    /// True for the answers of a cluster in motion (a slot moved, a failover
    /// under way): the command was not run, and the same call can be sent
    /// again once the client has read the slots afresh.
    pub(crate) fn is_cluster_transient(err: &RedisError) -> bool {
        use redis::ServerErrorKind::*;
        matches!(err.kind(), redis::ErrorKind::Server(Moved | Ask | TryAgain | ClusterDown | MasterDown))
    }

    /// True when the connection itself failed, so it should be replaced.
    pub(crate) fn is_connection_failure(err: &RedisError) -> bool {
        err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal() || err.is_timeout()
    }
}
