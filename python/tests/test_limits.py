"""Rate limits and caps through the Python package: a create past a cap of
the queue or of a workspace raises QueueFull and writes nothing, a claim past
the queue's rate finds nothing until its window ends, and bad settings are
refused."""

import pytest

import runledger
from conftest import redis_cli


def keyspace(port, prefix):
    """Every key of the test's prefix with its DUMP: what a refused call must leave as it was."""
    keys = sorted(redis_cli(port, "--scan", "--pattern", f"{prefix}:*").split())
    return {key: redis_cli(port, "--no-raw", "DUMP", key) for key in keys}


def queued(run_id, **fields):
    return dict(run_id=run_id, runner_id="r", status="queued", queue_name="chat", **fields)


async def test_a_create_past_a_cap_raises_queue_full_and_writes_nothing(redis_server, prefix):
    store = runledger.RunLedgerStore(redis_server.url, prefix=prefix)
    shown = await store.set_queue_limits("chat", cap=2, workspace_cap=1)
    assert (shown["cap"], shown["workspace_cap"], shown["rate"]) == (2, 1, None)
    await store.create_run(**queued("a", workspace_id="w"))
    before = keyspace(redis_server.port, prefix)
    with pytest.raises(runledger.QueueFull, match="workspace w"):
        await store.create_run(**queued("b", workspace_id="w"))
    assert keyspace(redis_server.port, prefix) == before
    await store.create_run(**queued("c"))
    before = keyspace(redis_server.port, prefix)
    with pytest.raises(runledger.QueueFull, match="queue chat"):
        await store.create_run(**queued("d"))
    assert keyspace(redis_server.port, prefix) == before
    # A claim makes room; no cap at all lets anything in.
    assert (await store.claim_next_run(runtime_id="rt", queue_name="chat"))["run_id"] == "a"
    await store.create_run(**queued("d"))
    await store.set_queue_limits("chat", cap=0, workspace_cap=0)
    for i in range(3):
        await store.create_run(**queued(f"more{i}", workspace_id="w"))


async def test_a_claim_past_the_rate_finds_nothing(store):
    shown = await store.set_queue_limits("chat", rate_limit=1, rate_window=30)
    assert shown["rate"] == {"max": 1, "window": 30.0}
    await store.create_run(**queued("a"))
    await store.create_run(**queued("b"))
    assert (await store.claim_next_run(runtime_id="rt", queue_name="chat"))["run_id"] == "a"
    assert await store.claim_next_run(runtime_id="rt", queue_name="chat") is None
    assert (await store.get_run("b"))["status"] == "queued"
    await store.set_queue_limits("chat", rate_limit=0)
    assert (await store.claim_next_run(runtime_id="rt", queue_name="chat"))["run_id"] == "b"


async def test_bad_limits_are_refused(store):
    with pytest.raises(ValueError, match="rate_window"):
        await store.set_queue_limits("chat", rate_limit=5, rate_window=0)
    with pytest.raises(ValueError, match="group_rate_window"):
        await store.set_queue_limits("chat", group_rate_limit=5, group_rate_window=100000)
    with pytest.raises(ValueError, match="cap"):
        await store.set_queue_limits("chat", cap=2_000_000_000)
    with pytest.raises(ValueError):
        await store.set_queue_limits("bad{queue}", cap=1)
    assert (await store.set_queue_limits("chat"))["cap"] is None


async def test_a_groups_own_rate_and_cap_take_the_place_of_the_queues(redis_server, prefix):
    store = runledger.RunLedgerStore(redis_server.url, prefix=prefix)
    await store.set_queue_groups("chat", group_by="conversation_id", group_concurrency=10)
    shown = await store.set_queue_limits(
        "chat", group_rate_limit=1, group_rate_window=60, group_cap=2,
        group_rate_limits={"vip": (2, 60), "held": (0, 1)}, group_caps={"vip": 3, "closed": 0},
    )
    assert shown["group_rate_limits"] == [["held", {"max": 0, "window": 1.0}], ["vip", {"max": 2, "window": 60.0}]]
    assert shown["group_caps"] == [["closed", 0], ["vip", 3]]
    for i in range(3):
        await store.create_run(**queued(f"v{i}", conversation_id="vip"))
    await store.create_run(**queued("h0", conversation_id="held"))
    before = keyspace(redis_server.port, prefix)
    with pytest.raises(runledger.QueueFull, match="group vip"):
        await store.create_run(**queued("v3", conversation_id="vip"))
    with pytest.raises(runledger.QueueFull, match="group closed"):
        await store.create_run(**queued("x", conversation_id="closed"))
    assert keyspace(redis_server.port, prefix) == before
    got = []
    while (run := await store.claim_next_run(runtime_id="rt", queue_name="chat")) is not None:
        got.append(run["run_id"])
    assert sorted(got) == ["v0", "v1"], "vip's own rate of 2, held's 0"
    shown = await store.set_queue_limits("chat", group_rate_limits={"held": None}, group_caps={"vip": None})
    assert shown["group_rate_limits"] == [["vip", {"max": 2, "window": 60.0}]] and shown["group_caps"] == [["closed", 0]]
    assert (await store.claim_next_run(runtime_id="rt", queue_name="chat"))["run_id"] == "h0"
    with pytest.raises(ValueError, match="window"):
        await store.set_queue_limits("chat", group_rate_limits={"vip": (1, 0)})
    with pytest.raises(ValueError):
        await store.set_queue_limits("chat", group_caps={"bad{group}": 1})
