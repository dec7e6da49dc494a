import datetime
from typing import Any, Optional, Sequence, Union

Json = dict[str, Any]
Time = Union[int, float, datetime.datetime]

class RunLedgerStore:
    def __init__(
        self,
        redis_url: Optional[str] = None,
        prefix: str = "rl",
        *,
        cluster: bool = False,
        tls_ca_file: Optional[str] = None,
        retention_seconds: Optional[float] = None,
        max_json_bytes: Optional[int] = None,
        max_events_per_run: Optional[int] = None,
        connections: Optional[int] = None,
    ) -> None: ...
    @property
    def prefix(self) -> str: ...
    async def create_run(
        self, *, run_id: str, runner_id: str, event_id: Optional[str] = None, binding_id: Optional[str] = None,
        conversation_id: Optional[str] = None, thread_id: Optional[str] = None, workspace_id: Optional[str] = None,
        bot_id: Optional[str] = None, agent_id: Optional[str] = None, deadline_at: Optional[Time] = None,
        authorization: Optional[Json] = None, metadata: Optional[Json] = None, status: str = "running",
        queue_name: Optional[str] = None, priority: int = 0, requested_runtime_id: Optional[str] = None,
        not_before: Optional[Time] = None, max_attempts: int = 0, group_key: Optional[str] = None,
    ) -> Json: ...
    async def claim_next_run(
        self, *, runtime_id: str, queue_name: Optional[str] = None, lease_seconds: float = 60,
        runner_ids: Optional[Sequence[str]] = None, conversation_id: Optional[str] = None,
        bot_id: Optional[str] = None, workspace_id: Optional[str] = None, thread_id: Optional[str] = None,
        strict_thread: bool = False,
    ) -> Optional[Json]: ...
    async def renew_claim(
        self, *, run_id: str, claim_token: str, runtime_id: Optional[str] = None, lease_seconds: float = 60
    ) -> Optional[Json]: ...
    async def release_claim(
        self, *, run_id: str, claim_token: str, runtime_id: Optional[str] = None, status: str = "queued",
        status_reason: Optional[str] = None, retry_in_seconds: Optional[float] = None,
    ) -> Optional[Json]: ...
    async def validate_active_claim(self, *, run_id: str, runtime_id: Optional[str], claim_token: str) -> bool: ...
    async def release_expired_claims(
        self, *, now: Optional[Time] = None, status: str = "queued", status_reason: str = "claim lease expired",
        limit: int = 100,
    ) -> list[Json]: ...
    async def append_event(
        self, *, run_id: str, sequence: int, event_type: str, data: Optional[Json] = None,
        usage: Optional[Json] = None, source: str = "runner", artifact_refs: Optional[list[Json]] = None,
        metadata: Optional[Json] = None, claim_token: Optional[str] = None,
    ) -> Json: ...
    async def append_audit_event(
        self, *, run_id: str, event_type: str, data: Optional[Json] = None, metadata: Optional[Json] = None
    ) -> Optional[Json]: ...
    async def finalize_run(
        self, *, run_id: str, status: str, status_reason: Optional[str] = None, usage: Optional[Json] = None,
        cost: Optional[Json] = None, metadata: Optional[Json] = None, claim_token: Optional[str] = None,
    ) -> Optional[Json]: ...
    async def request_cancel(self, *, run_id: str, status_reason: Optional[str] = None) -> Optional[Json]: ...
    async def get_run(self, run_id: str) -> Optional[Json]: ...
    async def list_runs(
        self, *, conversation_id: Optional[str] = None, statuses: Optional[Sequence[str]] = None,
        before_id: Optional[int] = None, limit: int = 50, bot_id: Optional[str] = None,
        workspace_id: Optional[str] = None, thread_id: Optional[str] = None, strict_thread: bool = False,
        runner_id: Optional[str] = None, binding_id: Optional[str] = None,
    ) -> tuple[list[Json], Optional[int], bool, int]: ...
    async def page_run_events(
        self, *, run_id: str, before_sequence: Optional[int] = None, after_sequence: Optional[int] = None,
        limit: int = 50, direction: str = "forward",
    ) -> tuple[list[Json], Optional[int], Optional[int], bool]: ...
    async def register_runtime(
        self, *, runtime_id: str, status: str = "online", display_name: Optional[str] = None,
        endpoint: Optional[str] = None, version: Optional[str] = None, capabilities: Optional[Json] = None,
        labels: Optional[Json] = None, metadata: Optional[Json] = None, heartbeat_deadline_seconds: float = 60,
    ) -> Json: ...
    async def heartbeat_runtime(
        self, *, runtime_id: str, status: str = "online", heartbeat_deadline_seconds: float = 60,
        capabilities: Optional[Json] = None, labels: Optional[Json] = None, metadata: Optional[Json] = None,
    ) -> Optional[Json]: ...
    async def get_runtime(self, runtime_id: str) -> Optional[Json]: ...
    async def list_runtimes(
        self, *, statuses: Optional[Sequence[str]] = None, labels: Optional[dict[str, Any]] = None, limit: int = 100
    ) -> tuple[list[Json], int]: ...
    async def mark_stale_runtimes(
        self, *, now: Optional[Time] = None, stale_status: str = "stale", stale_after_seconds: Optional[float] = None
    ) -> list[Json]: ...
    async def get_run_stats(self, *, start_time: Time, end_time: Time, runner_id: Optional[str] = None) -> Json: ...
    async def get_runtime_stats(self) -> Json: ...
    async def get_runner_stats(self, *, start_time: Time, end_time: Time, limit: int = 50) -> list[Json]: ...
    async def queue_stats(self, queue_name: str = "default") -> Json: ...
    async def set_queue_groups(
        self, queue_name: str, *, group_by: Optional[str] = None, group_concurrency: Optional[int] = None,
        group_limits: Optional[dict[str, Optional[int]]] = None,
    ) -> Json: ...
    async def set_queue_limits(
        self, queue_name: str, *, rate_limit: Optional[int] = None, rate_window: float = 1.0,
        group_rate_limit: Optional[int] = None, group_rate_window: float = 1.0, cap: Optional[int] = None,
        group_cap: Optional[int] = None, workspace_cap: Optional[int] = None,
        group_rate_limits: Optional[dict[str, Optional[tuple[int, float]]]] = None,
        group_caps: Optional[dict[str, Optional[int]]] = None,
    ) -> Json: ...
    async def pause_queue(self, queue_name: str, *, group: Optional[str] = None, by: Optional[str] = None) -> bool: ...
    async def resume_queue(self, queue_name: str, *, group: Optional[str] = None, by: Optional[str] = None) -> bool: ...
    async def paused_groups(self, queue_name: str, *, limit: int = 100) -> list[str]: ...
