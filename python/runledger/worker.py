"""``Worker``: runs an ``async def handler(ctx)`` for every run it claims.

The Rust worker does the work: it registers and heartbeats the runtime,
waits for runs without polling, renews leases, delivers cancellation, retries
with backoff and shuts down gracefully. The handler runs on the asyncio loop
that awaits ``Worker.run()``.

The handler gets a ``RunContext``: ``ctx.run`` (the claimed run's dict),
``await ctx.emit(type, data)``, ``ctx.cancelled`` and ``ctx.stop_reason``,
``await ctx.wait_stopped()``. It returns ``None`` or a dict with ``usage``,
``cost`` and ``metadata`` to complete the run; it raises ``runledger.Retry``
to send the run back with a backoff, any other exception to fail it. When
the run is cancelled, its lease lost or the worker out of grace time, the
handler's task is cancelled (a ``CancelledError`` inside it).
"""

from runledger import _native
from runledger._aio import delegate
from runledger.errors import InvalidInput


class RunContext:
    """What a handler gets for one run (see the module doc)."""

    __slots__ = ("_native",)

    def __init__(self, native):
        self._native = native

    @property
    def run(self):
        """The claimed run, as ``get_run`` shows it, with its claim token."""
        return self._native.run

    @property
    def run_id(self):
        return self._native.run_id

    @property
    def claim_token(self):
        return self._native.claim_token

    @property
    def cancelled(self):
        """True once ``request_cancel`` reached this run."""
        return self._native.cancelled

    @property
    def stopping(self):
        """True once the handler is asked to stop, for any reason."""
        return self._native.stopping

    @property
    def stop_reason(self):
        """``"cancelled"``, ``"lease_lost"``, ``"shutdown"``, or ``None``."""
        return self._native.stop_reason

    def __repr__(self):
        return repr(self._native)


delegate(RunContext, _native.RunContext, ["emit", "emit_many", "wait_stopped"])


class Worker:
    """A worker: ``await worker.run()`` until ``worker.stop()``.

    ``Worker(store, handler, *, queues=["default"], runner_ids=None,
    runtime_id=None, concurrency=1, lease_seconds=30, heartbeat_seconds=10,
    grace_seconds=10, reap_every_seconds=5, max_attempts=5,
    backoff_base_seconds=1, backoff_max_seconds=300)``.
    """

    __slots__ = ("_native",)

    def __init__(self, store, handler, **settings):
        if not callable(handler):
            raise InvalidInput("handler must be an async function taking the run's context")

        async def call(native_ctx):
            return await handler(RunContext(native_ctx))

        self._native = _native.Worker(store._native, call, **settings)

    @property
    def stopping(self):
        return self._native.stopping


delegate(Worker, _native.Worker, ["run"], plain=["stop"])
