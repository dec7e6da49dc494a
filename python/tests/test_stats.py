"""Run and runner stats (LangBot's get_run_stats / get_runner_stats), with
the duration percentiles upstream leaves empty."""

import time

import pytest


async def test_run_stats_and_runner_stats(store):
    start = int(time.time()) - 5
    for i in range(4):
        await store.create_run(run_id=f"ok{i}", runner_id="good", status="queued")
    await store.create_run(run_id="bad", runner_id="poor", status="queued")
    await store.create_run(run_id="late", runner_id="poor", status="queued")
    await store.create_run(run_id="live", runner_id="poor", status="running")
    for _ in range(6):
        c = await store.claim_next_run(runtime_id="rt")
        status = {"bad": "failed", "late": "timeout"}.get(c["run_id"], "completed")
        await store.finalize_run(run_id=c["run_id"], status=status, claim_token=c["claim_token"])
    end = int(time.time()) + 5

    stats = await store.get_run_stats(start_time=start, end_time=end)
    assert stats["start_time"] == start and stats["end_time"] == end
    assert stats["total_count"] == 7
    assert (stats["completed_count"], stats["failed_count"], stats["timeout_count"], stats["running_count"]) == (4, 1, 1, 1)
    assert stats["queued_count"] == stats["claimed_count"] == stats["cancelled_count"] == stats["created_count"] == 0
    assert stats["success_rate"] == round(4 / 7, 4) and stats["failure_rate"] == round(2 / 7, 4)
    assert stats["throughput_per_hour"] > 0
    runs = [await store.get_run(f"ok{i}") for i in range(4)]
    # Stats use the stored milliseconds; the dicts show whole seconds.
    durations = sorted(r["finished_at"] - r["started_at"] for r in runs)
    assert abs(stats["avg_duration_seconds"] - sum(durations) / 4) <= 1
    assert 0 <= stats["p50_duration_seconds"] <= stats["p95_duration_seconds"] <= stats["p99_duration_seconds"]
    assert abs(stats["p99_duration_seconds"] - durations[-1]) <= 1
    assert stats["avg_queue_wait_seconds"] is not None and stats["avg_queue_wait_seconds"] >= 0

    only_poor = await store.get_run_stats(start_time=start, end_time=end, runner_id="poor")
    assert only_poor["total_count"] == 3 and only_poor["success_rate"] == 0.0
    empty = await store.get_run_stats(start_time=0, end_time=1)
    assert empty["total_count"] == 0 and empty["success_rate"] is None and empty["p50_duration_seconds"] is None

    runners = await store.get_runner_stats(start_time=start, end_time=end)
    assert [r["runner_id"] for r in runners] == ["good", "poor"]
    good, poor = runners
    assert (good["total_runs"], good["completed_runs"], good["failed_runs"], good["active_runs"]) == (4, 4, 0, 0)
    assert good["success_rate"] == 1.0
    assert (poor["total_runs"], poor["completed_runs"], poor["failed_runs"], poor["active_runs"]) == (3, 0, 2, 1)
    assert poor["success_rate"] == 0.0
    assert len(await store.get_runner_stats(start_time=start, end_time=end, limit=1)) == 1


async def test_runs_created_terminal_count_and_are_never_claimed(store):
    """LangBot's own stats tests create failed runs directly."""
    start = int(time.time()) - 5
    for i in range(3):
        run = await store.create_run(run_id=f"f{i}", runner_id="r", status="failed")
        assert run["status"] == "failed" and run["finished_at"] is None and "claim_token" not in run
    await store.create_run(run_id="c0", runner_id="r", status="completed")
    assert await store.claim_next_run(runtime_id="rt") is None
    stats = await store.get_run_stats(start_time=start, end_time=int(time.time()) + 5)
    assert (stats["total_count"], stats["failed_count"], stats["completed_count"]) == (4, 3, 1)
    assert stats["failure_rate"] == 0.75 and stats["success_rate"] == 0.25
    (runner,) = await store.get_runner_stats(start_time=start, end_time=int(time.time()) + 5)
    assert (runner["failed_runs"], runner["active_runs"], runner["success_rate"]) == (3, 0, 0.25)
    assert runner["runner_label"] is None and runner["plugin_identity"] is None
    # A run is claimed only by claim_next_run.
    with pytest.raises(ValueError):
        await store.create_run(run_id="held", runner_id="r", status="claimed")


async def test_throughput_is_per_window_hour_with_a_floor_and_two_decimals(store):
    now = int(time.time())
    await store.create_run(run_id="one", runner_id="r", status="queued")
    stats = await store.get_run_stats(start_time=now - 3600, end_time=now + 3600)
    assert stats["throughput_per_hour"] == 0.5
    # A window of no length counts as 0.001 h.
    same = await store.get_run_stats(start_time=now - 1, end_time=now - 1)
    assert same["throughput_per_hour"] in (0, 1000.0)
    assert (await store.get_run_stats(start_time=0, end_time=1))["throughput_per_hour"] == 0
