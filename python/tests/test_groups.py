"""Groups and pause through the Python package: one active run per
conversation, other conversations unaffected, pause and resume of a queue
and of one group, and refused settings that write nothing."""

import pytest


async def test_one_active_run_per_conversation(store):
    settings = await store.set_queue_groups("chat", group_by="conversation_id", group_concurrency=1)
    assert settings["group_by"] == "conversation_id" and settings["group_concurrency"] == 1
    for i in range(3):
        await store.create_run(run_id=f"a{i}", runner_id="r", status="queued", queue_name="chat", conversation_id="A")
    await store.create_run(run_id="b0", runner_id="r", status="queued", queue_name="chat", conversation_id="B")
    first = await store.claim_next_run(runtime_id="rt", queue_name="chat")
    second = await store.claim_next_run(runtime_id="rt", queue_name="chat")
    assert (first["run_id"], second["run_id"]) == ("a0", "b0")
    assert first["group_key"] == "A"
    assert await store.claim_next_run(runtime_id="rt", queue_name="chat") is None, "A is at its limit"
    await store.finalize_run(run_id="a0", status="completed", claim_token=first["claim_token"])
    assert (await store.claim_next_run(runtime_id="rt", queue_name="chat"))["run_id"] == "a1"


async def test_pause_and_resume_a_queue_and_a_group(store):
    await store.set_queue_groups("chat", group_by="group_key")
    await store.create_run(run_id="x", runner_id="r", status="queued", queue_name="chat", group_key="g1")
    await store.create_run(run_id="y", runner_id="r", status="queued", queue_name="chat", group_key="g2")
    assert await store.pause_queue("chat", by="ops") is True
    assert await store.pause_queue("chat") is False
    assert await store.claim_next_run(runtime_id="rt", queue_name="chat") is None
    assert await store.resume_queue("chat") is True
    assert await store.pause_queue("chat", group="g1") is True
    assert await store.pause_queue("chat", group="g0") is True
    assert await store.paused_groups("chat") == ["g0", "g1"]
    assert await store.paused_groups("chat", limit=1) in (["g0"], ["g1"])
    assert (await store.queue_stats("chat"))["paused_groups"] == 2
    assert await store.resume_queue("chat", group="g0") is True
    assert await store.paused_groups("chat") == ["g1"]
    assert (await store.claim_next_run(runtime_id="rt", queue_name="chat"))["run_id"] == "y"
    assert await store.claim_next_run(runtime_id="rt", queue_name="chat") is None
    assert (await store.get_run("x"))["status"] == "queued"
    await store.resume_queue("chat", group="g1")
    assert (await store.claim_next_run(runtime_id="rt", queue_name="chat"))["run_id"] == "x"
    assert await store.paused_groups("chat") == []


async def test_bad_group_settings_are_refused(store):
    with pytest.raises(ValueError, match="group_by"):
        await store.set_queue_groups("chat", group_by="colour")
    with pytest.raises(ValueError, match="concurrency"):
        await store.set_queue_groups("chat", group_by="bot_id", group_concurrency=0)
    with pytest.raises(ValueError):
        await store.pause_queue("chat", group="bad{group}")
    assert (await store.set_queue_groups("chat"))["group_by"] is None
