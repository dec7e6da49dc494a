"""The calls LangBot makes, shaped as its host and its runtimes make them,
against the same Redis as a Rust worker (`runledger worker`)."""

import asyncio
import os
import subprocess
import time
import uuid

import pytest

import runledger
from conftest import runledger_binary


async def test_host_shaped_chat_run(store):
    """Created `running`, the runner's events appended in order, get_run
    polled for a cancel between events, finalized."""
    run_id = str(uuid.uuid4())
    await store.create_run(run_id=run_id, event_id=str(uuid.uuid4()), binding_id="binding", runner_id="plugin/runner",
                           conversation_id="conv", bot_id="bot", deadline_at=time.time() + 300, status="running")
    last = 0
    for i in range(5):
        run = await store.get_run(run_id)
        assert run["cancel_requested_at"] is None
        last += 1
        await store.append_event(run_id=run_id, sequence=last, event_type="message.delta", data={"text": str(i)})
    await store.append_audit_event(run_id=run_id, event_type="host.note")
    done = await store.finalize_run(run_id=run_id, status="completed", usage={"tokens": 10})
    assert done["status"] == "completed" and done["usage"] == {"tokens": 10}
    events, _, _, _ = await store.page_run_events(run_id=run_id)
    assert [e["sequence"] for e in events] == [1, 2, 3, 4, 5, 6] and events[-1]["source"] == "host"

    # A cancel from elsewhere is seen by the next poll.
    other = str(uuid.uuid4())
    await store.create_run(run_id=other, event_id=None, binding_id=None, runner_id="plugin/runner", status="running")
    await store.request_cancel(run_id=other, status_reason="user cancelled")
    assert (await store.get_run(other))["cancel_requested_at"] is not None
    assert (await store.finalize_run(run_id=other, status="cancelled"))["status"] == "cancelled"


async def test_python_runtimes_and_a_rust_worker_share_one_queue(redis_url, prefix):
    """A runtime-shaped Python loop (register, claim with lease_seconds=60,
    renew, finalize) and `runledger worker` drain one queue together: every
    run ends completed, claimed once, by one of them."""
    store = runledger.RunLedgerStore(redis_url, prefix=prefix)
    queue = "shared"
    runs = [f"job-{i}" for i in range(40)]
    for run_id in runs:
        await store.create_run(run_id=run_id, event_id=None, binding_id=None, runner_id="demo",
                               status="queued", queue_name=queue)
    env = dict(os.environ, REDIS_URL=redis_url, RUST_LOG="warn")
    args = [runledger_binary(), "--prefix", prefix]  # a redis+cluster:// URL says "cluster" itself
    worker = subprocess.Popen(
        args + ["worker", "--queue", queue, "--runtime-id", "rust-worker", "--concurrency", "2",
                "--work-ms", "30", "--steps", "2", "--fail-rate", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        await store.register_runtime(runtime_id="py-runtime", heartbeat_deadline_seconds=60)
        python_took = []
        deadline = time.monotonic() + 60  # hang guard
        while time.monotonic() < deadline:
            run = await store.claim_next_run(runtime_id="py-runtime", queue_name=queue, lease_seconds=60)
            if run is None:
                finished = await asyncio.gather(*(store.get_run(r) for r in runs))
                if all(r["status"] == "completed" for r in finished):
                    break
                await asyncio.sleep(0.05)
                continue
            python_took.append(run["run_id"])
            await store.heartbeat_runtime(runtime_id="py-runtime")
            renewed = await store.renew_claim(run_id=run["run_id"], claim_token=run["claim_token"],
                                              runtime_id="py-runtime", lease_seconds=60)
            assert renewed is not None
            await store.append_event(run_id=run["run_id"], sequence=1, event_type="py", claim_token=run["claim_token"])
            await store.finalize_run(run_id=run["run_id"], status="completed", claim_token=run["claim_token"])
        else:
            pytest.fail("hang guard: the queue was not drained in 60 s")
        _, total = await store.list_runtimes()
        assert total == 2  # the Python runtime and the Rust worker, side by side
    finally:
        worker.terminate()
        try:
            _, err = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            _, err = worker.communicate()
    assert worker.returncode == 0, err.decode(errors="replace")[-2000:]
    finished = await asyncio.gather(*(store.get_run(r) for r in runs))
    assert all(r["status"] == "completed" and r["dispatch_attempts"] == 1 for r in finished)
    rust_took = [r["run_id"] for r in finished if r["run_id"] not in python_took]
    assert len(python_took) + len(rust_took) == len(runs) and rust_took, "the Rust worker took no run"
    assert len(set(python_took)) == len(python_took)
