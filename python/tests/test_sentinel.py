"""The Python package through a Sentinel URL: a private master with 2
replicas under 3 sentinels (``runledger.testing.RedisSentinel``, the setup
the Rust tests use), a ``RunLedgerStore("redis+sentinel://.../runledger")``
and a ``runledger.Worker`` that create, claim and finish runs, before and
after a planned ``SENTINEL FAILOVER``, without a new store or a restart.

Every wait is bounded (a hang guard); nothing is asserted on how long it took.
"""

import asyncio
import time

import pytest

import runledger
from runledger.testing import RedisSentinel


@pytest.fixture(scope="module")
def sentinel_setup():
    with RedisSentinel() as setup:
        yield setup


async def wait_for(predicate, what, timeout=60):
    """Polls `predicate` (async) until true; the timeout is a hang guard.
    Errors count as "not yet": the host's own reads may meet the switch."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if await predicate():
                return
        except runledger.Error as e:  # transient around the switch
            last = e
        await asyncio.sleep(0.1)
    pytest.fail(f"hang guard: {what} did not happen within {timeout} s (last error: {last!r})")


async def retried(call, what, timeout=60):
    """Awaits `call()` until it succeeds, for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except runledger.Error:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.1)


async def test_store_and_worker_through_sentinel_survive_a_planned_failover(sentinel_setup, prefix):
    url = sentinel_setup.url
    assert url.startswith("redis+sentinel://") and url.endswith("/runledger")
    store = runledger.RunLedgerStore(url, prefix=prefix)
    assert "redis+sentinel://" in repr(store)

    handled = []

    async def handler(ctx):
        await ctx.emit("step", {"run": ctx.run_id})
        handled.append(ctx.run_id)
        return {"metadata": {"master": "any"}}

    worker = runledger.Worker(
        store, handler, runner_ids=["echo"], concurrency=2, lease_seconds=10, heartbeat_seconds=1,
        runtime_id="py-sentinel",
    )
    task = asyncio.create_task(worker.run())
    try:
        for i in range(5):
            created = await store.create_run(run_id=f"before-{i}", runner_id="echo", status="queued")
            assert created["status"] == "queued"

        async def done(names):
            runs = [await store.get_run(n) for n in names]
            return all(r is not None and r["status"] == "completed" for r in runs)

        before = [f"before-{i}" for i in range(5)]
        await wait_for(lambda: done(before), "the runs before the switch completed")

        # A host-side claim and finish on the master, through the sentinels.
        await store.create_run(run_id="manual", runner_id="manual-runner", status="queued")
        claim = await store.claim_next_run(runtime_id="py-host", lease_seconds=10, runner_ids=["manual-runner"])
        assert claim is not None and claim["run_id"] == "manual" and claim["claim_token"]
        finished = await store.finalize_run(run_id="manual", status="completed", claim_token=claim["claim_token"])
        assert finished["status"] == "completed"

        old = await asyncio.to_thread(sentinel_setup.master_port)
        await asyncio.to_thread(sentinel_setup.failover)
        new = await asyncio.to_thread(sentinel_setup.wait_new_master, old, 60.0)
        assert new != old
        # Until the sentinels demote the old master it still takes writes
        # (README, "Why no +switch-master subscription"): wait for that.
        await asyncio.to_thread(sentinel_setup.wait_ready, 60.0)

        # The same store and the same worker, on the new master.
        after = [f"after-{i}" for i in range(5)]
        for run_id in after:
            await retried(lambda: store.create_run(run_id=run_id, runner_id="echo", status="queued"), run_id)
        await wait_for(lambda: done(after), "the runs enqueued after the switch completed")

        await retried(lambda: store.create_run(run_id="manual-2", runner_id="manual-runner", status="queued"), "m2")
        claim = await retried(
            lambda: store.claim_next_run(runtime_id="py-host", lease_seconds=10, runner_ids=["manual-runner"]), "claim"
        )
        assert claim is not None and claim["run_id"] == "manual-2"
        finished = await store.finalize_run(run_id="manual-2", status="completed", claim_token=claim["claim_token"])
        assert finished["status"] == "completed"
        # What was written before the switch is on the new master too.
        for run_id in before + ["manual"]:
            assert (await store.get_run(run_id))["status"] == "completed"
    finally:
        worker.stop()
        report = await asyncio.wait_for(task, 60)
    assert report["failed"] == 0, report
    assert set(handled) >= set(before + after)
    events, _, _, _ = await store.page_run_events(run_id="after-0")
    assert [e["data"] for e in events] == [{"run": "after-0"}]


async def test_a_master_name_no_sentinel_monitors_is_bad_input(sentinel_setup, prefix):
    wrong = sentinel_setup.url.rsplit("/", 1)[0] + "/nosuchmaster"
    store = runledger.RunLedgerStore(wrong, prefix=prefix)
    with pytest.raises(runledger.InvalidInput):
        await asyncio.wait_for(store.get_run("x"), 60)
