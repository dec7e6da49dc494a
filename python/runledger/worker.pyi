from typing import Any, Awaitable, Callable, Optional, Sequence

from runledger.store import RunLedgerStore

Json = dict[str, Any]

class RunContext:
    @property
    def run(self) -> Json: ...
    @property
    def run_id(self) -> str: ...
    @property
    def claim_token(self) -> str: ...
    @property
    def cancelled(self) -> bool: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def stop_reason(self) -> Optional[str]: ...
    async def emit(self, event_type: str, data: Optional[Json] = None) -> Json: ...
    async def emit_many(self, events: Sequence[tuple[str, Json]]) -> list[Json]: ...
    async def wait_stopped(self) -> None: ...

class Worker:
    def __init__(
        self,
        store: RunLedgerStore,
        handler: Callable[[RunContext], Awaitable[Optional[Json]]],
        *,
        queues: Optional[Sequence[str]] = None,
        runner_ids: Optional[Sequence[str]] = None,
        runtime_id: Optional[str] = None,
        concurrency: int = 1,
        lease_seconds: float = 30.0,
        heartbeat_seconds: float = 10.0,
        grace_seconds: float = 10.0,
        reap_every_seconds: Optional[float] = 5.0,
        max_attempts: int = 5,
        backoff_base_seconds: float = 1.0,
        backoff_max_seconds: float = 300.0,
    ) -> None: ...
    @property
    def stopping(self) -> bool: ...
    async def run(self) -> dict[str, int]: ...
    def stop(self) -> None: ...
