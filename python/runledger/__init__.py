"""runledger: a Redis-backed run ledger and work queue.

``RunLedgerStore`` is a drop-in for LangBot's SQL ``RunLedgerStore``: the same
async methods, keyword arguments and result dicts, over Redis. ``Worker``
turns an ``async def handler(ctx)`` into a worker with leases, renewals,
cancellation and graceful shutdown. Both run on the runledger Rust library;
nothing here implements an operation of its own.
"""

from runledger._native import __version__
from runledger.store import RunLedgerStore
from runledger.worker import RunContext, Worker
from runledger import errors
from runledger.errors import *  # noqa: F401,F403 (the exception hierarchy)

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "timeout"})
RUN_STATUSES = frozenset({"created", "queued", "claimed", "running"}) | TERMINAL_STATUSES

__all__ = [
    "RunLedgerStore",
    "Worker",
    "RunContext",
    "TERMINAL_STATUSES",
    "RUN_STATUSES",
    "__version__",
    *errors.__all__,
]
