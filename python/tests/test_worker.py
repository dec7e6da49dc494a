"""runledger.Worker: a Python handler under the Rust worker's leases,
renewals, cancellation, retries and shutdown."""

import asyncio
import time

import pytest

import runledger


async def wait_for(predicate, what, timeout=20):
    """Polls `predicate` (async) until true; the timeout is a hang guard."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"hang guard: {what} did not happen within {timeout} s")


async def status_of(store, run_id):
    return (await store.get_run(run_id))["status"]


async def test_a_python_handler_completes_runs_with_events_and_usage(store):
    for i in range(6):
        await store.create_run(run_id=f"r{i}", runner_id="echo", status="queued")
    seen = []

    async def handler(ctx):
        assert ctx.run["status"] == "claimed" and ctx.claim_token == ctx.run["claim_token"]
        first = await ctx.emit("step", {"n": 1})
        more = await ctx.emit_many([("step", {"n": 2}), ("step", {"n": 3})])
        seen.append((ctx.run_id, first["sequence"], [e["sequence"] for e in more]))
        return {"usage": {"tokens": 7}, "metadata": {"answer": ctx.run_id}}

    worker = runledger.Worker(store, handler, concurrency=3, lease_seconds=10, runtime_id="py-worker")
    task = asyncio.create_task(worker.run())

    async def all_done():
        return all([await status_of(store, f"r{i}") == "completed" for i in range(6)])

    await wait_for(all_done, "every run completed")
    assert (await store.get_runtime("py-worker"))["status"] == "online"
    worker.stop()
    report = await asyncio.wait_for(task, 30)
    assert report["claimed"] == 6 and report["completed"] == 6 and report["failed"] == 0
    assert sorted(seen) == [(f"r{i}", 1, [2, 3]) for i in range(6)]
    run = await store.get_run("r0")
    assert run["usage"] == {"tokens": 7} and run["metadata"]["answer"] == "r0"
    assert run["claimed_by_runtime_id"] is None
    events, _, _, _ = await store.page_run_events(run_id="r0")
    assert [(e["sequence"], e["data"]) for e in events] == [(1, {"n": 1}), (2, {"n": 2}), (3, {"n": 3})]
    assert await store.get_runtime("py-worker") is None  # a stopped worker deregisters


async def test_cancellation_reaches_the_handler_and_cancels_its_task(store):
    await store.create_run(run_id="long", runner_id="slow", status="queued")
    events = []
    started = asyncio.Event()

    async def handler(ctx):
        started.set()
        try:
            await ctx.wait_stopped()
            events.append(("stopped", ctx.stop_reason, ctx.cancelled))
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            events.append("task cancelled")
            raise

    worker = runledger.Worker(store, handler, lease_seconds=10)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 20)
    await store.request_cancel(run_id="long", status_reason="user cancelled")
    await wait_for(lambda: _is(store, "long", "cancelled"), "the run cancelled")
    await wait_for(lambda: _true(len(events) == 2), "the handler stopped")
    worker.stop()
    report = await asyncio.wait_for(task, 30)
    assert events == [("stopped", "cancelled", True), "task cancelled"]
    assert report["cancelled"] == 1


async def _is(store, run_id, status):
    return await status_of(store, run_id) == status


async def _true(value):
    return value


async def test_retry_backs_off_then_fails_and_other_errors_fail_at_once(store):
    await store.create_run(run_id="flaky", runner_id="x", status="queued")
    await store.create_run(run_id="broken", runner_id="x", status="queued")
    attempts = []
    flaky_started = []

    async def handler(ctx):
        attempts.append(ctx.run_id)
        if ctx.run_id == "flaky":
            flaky_started.append(asyncio.get_running_loop().time())
            raise runledger.Retry("try again")
        raise KeyError("no such thing")

    worker = runledger.Worker(store, handler, lease_seconds=10, max_attempts=2,
                              backoff_base_seconds=0.2, backoff_max_seconds=0.4)
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: _is(store, "flaky", "failed"), "flaky failed after its attempts")
    await wait_for(lambda: _is(store, "broken", "failed"), "broken failed")
    worker.stop()
    report = await asyncio.wait_for(task, 30)
    assert attempts.count("flaky") == 2 and attempts.count("broken") == 1
    assert report["retried"] == 1 and report["failed"] == 2
    broken = await store.get_run("broken")
    assert "KeyError" in broken["status_reason"] and broken["dispatch_attempts"] == 1
    assert (await store.get_run("flaky"))["dispatch_attempts"] == 2
    # It backed off: the second attempt started no sooner than the jittered
    # base delay (50-100 % of 0.2 s) after the first (a lower bound, so a slow
    # machine cannot fail it).
    assert len(flaky_started) == 2
    assert flaky_started[1] - flaky_started[0] >= 0.1, flaky_started


async def test_stopping_gives_back_what_is_held(store):
    await store.create_run(run_id="held", runner_id="x", status="queued")
    started = asyncio.Event()

    async def handler(ctx):
        started.set()
        await asyncio.sleep(60)

    worker = runledger.Worker(store, handler, lease_seconds=10, grace_seconds=0.2)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 20)
    assert worker.stopping is False
    task.cancel()  # cancelling the awaiting task stops the worker the same way
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: _is(store, "held", "queued"), "the held run back in the queue")
    assert (await store.get_run("held"))["claimed_by_runtime_id"] is None


def test_a_handler_that_is_not_callable_is_refused(store):
    with pytest.raises(ValueError, match="handler"):
        runledger.Worker(store, "not a function")
    with pytest.raises(ValueError, match="lease_seconds"):
        runledger.Worker(store, lambda ctx: None, lease_seconds=-1)
