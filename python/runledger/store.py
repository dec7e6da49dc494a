"""``RunLedgerStore``: LangBot's run ledger store, over Redis.

Build it like LangBot builds its SQL store, one per call if you like: stores
made with the same URL and settings share one connection pool. Every method
is an ``async def`` taking the SQL store's keyword arguments and returning
its dicts and tuples; see ``shared/langbot-api.md`` and the README.
"""

from runledger import _native
from runledger._aio import delegate

_COROUTINES = (
    "create_run",
    "claim_next_run",
    "renew_claim",
    "release_claim",
    "validate_active_claim",
    "release_expired_claims",
    "append_event",
    "append_audit_event",
    "finalize_run",
    "request_cancel",
    "get_run",
    "list_runs",
    "page_run_events",
    "register_runtime",
    "heartbeat_runtime",
    "get_runtime",
    "list_runtimes",
    "mark_stale_runtimes",
    "get_run_stats",
    "get_runtime_stats",
    "get_runner_stats",
    "queue_stats",
    "set_queue_groups",
    "set_queue_limits",
    "pause_queue",
    "resume_queue",
    "paused_groups",
)


class RunLedgerStore:
    """LangBot's ``RunLedgerStore`` over Redis.

    ``redis_url`` defaults to ``$REDIS_URL``, else ``redis://127.0.0.1:6379/``;
    ``redis+cluster://`` (or ``cluster=True``) means a Redis Cluster.
    Settings: ``prefix`` (default ``rl``), ``tls_ca_file``,
    ``retention_seconds``, ``max_json_bytes``, ``max_events_per_run``,
    ``connections``.
    """

    __slots__ = ("_native",)

    def __init__(self, redis_url=None, prefix="rl", **settings):
        self._native = _native.RunLedgerStore(redis_url, prefix, **settings)

    @property
    def prefix(self):
        return self._native.prefix

    def __repr__(self):
        return repr(self._native)


delegate(RunLedgerStore, _native.RunLedgerStore, [n for n in _COROUTINES if hasattr(_native.RunLedgerStore, n)])
