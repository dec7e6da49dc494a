"""Runtimes through the host API: register, heartbeat, read, list, mark
stale."""

import asyncio
import time

import runledger

RUNTIME_KEYS = set(
    "id runtime_id status display_name endpoint version capabilities labels metadata last_heartbeat_at "
    "heartbeat_deadline_at created_at updated_at".split()
)


async def test_register_then_read(store):
    before = time.time()
    rt = await store.register_runtime(
        runtime_id="rt-1", display_name="Runtime one", endpoint="http://127.0.0.1:9", version="1.2",
        capabilities={"gpu": False}, labels={"zone": "a", "tier": "1"}, metadata={"m": 1},
        heartbeat_deadline_seconds=30,
    )
    after = time.time()
    assert set(rt) == RUNTIME_KEYS
    assert (rt["runtime_id"], rt["status"], rt["display_name"], rt["endpoint"], rt["version"]) == (
        "rt-1", "online", "Runtime one", "http://127.0.0.1:9", "1.2")
    assert rt["capabilities"] == {"gpu": False} and rt["labels"] == {"zone": "a", "tier": "1"}
    assert int(before) + 30 <= rt["heartbeat_deadline_at"] <= after + 30
    assert await store.get_runtime("rt-1") == rt
    assert await store.get_runtime("nobody") is None


async def test_heartbeat_merges_metadata_and_replaces_labels(store):
    await store.register_runtime(runtime_id="rt", labels={"a": "1"}, metadata={"x": 1, "y": 1})
    beat = await store.heartbeat_runtime(
        runtime_id="rt", status="busy", heartbeat_deadline_seconds=120, labels={"b": "2"}, metadata={"y": 2}
    )
    assert beat["status"] == "busy" and beat["labels"] == {"b": "2"} and beat["metadata"] == {"x": 1, "y": 2}
    assert beat["heartbeat_deadline_at"] >= time.time() + 100
    assert await store.heartbeat_runtime(runtime_id="nobody") is None


async def test_list_runtimes_statuses_labels_limit_and_total(store):
    for i in range(5):
        await store.register_runtime(runtime_id=f"rt-{i}", status="online" if i < 4 else "draining",
                                     labels={"zone": "a" if i % 2 else "b", "n": str(i)})
    items, total = await store.list_runtimes()
    assert [r["runtime_id"] for r in items] == [f"rt-{i}" for i in range(5)] and total == 5
    items, total = await store.list_runtimes(limit=2)
    assert len(items) == 2 and total == 5
    items, total = await store.list_runtimes(statuses=["draining"])
    assert [r["runtime_id"] for r in items] == ["rt-4"] and total == 1
    items, total = await store.list_runtimes(labels={"zone": "a"})
    assert [r["runtime_id"] for r in items] == ["rt-1", "rt-3"] and total == 2
    items, total = await store.list_runtimes(labels={"zone": "a", "n": "3"}, limit=0)
    assert [r["runtime_id"] for r in items] == ["rt-3"] and total == 1


async def test_mark_stale_runtimes(store):
    await store.register_runtime(runtime_id="old", heartbeat_deadline_seconds=60)
    await store.register_runtime(runtime_id="fresh", heartbeat_deadline_seconds=600)
    assert await store.mark_stale_runtimes() == []
    marked = await store.mark_stale_runtimes(now=time.time() + 120)
    assert [r["runtime_id"] for r in marked] == ["old"] and marked[0]["status"] == "stale"
    await asyncio.sleep(1.1)
    marked = await store.mark_stale_runtimes(stale_status="gone", stale_after_seconds=0.5)
    assert {r["runtime_id"] for r in marked} == {"old", "fresh"} and {r["status"] for r in marked} == {"gone"}
    assert (await store.get_runtime("fresh"))["status"] == "gone"


async def test_runtime_stats(store):
    await store.register_runtime(runtime_id="a", heartbeat_deadline_seconds=600)
    await store.register_runtime(runtime_id="b", heartbeat_deadline_seconds=600)
    await store.create_run(run_id="r1", runner_id="x", status="queued")
    await store.create_run(run_id="r2", runner_id="x", status="running")
    await store.claim_next_run(runtime_id="a")
    stats = await store.get_runtime_stats()
    assert stats["total_count"] == 2 and stats["online_count"] == 2 and stats["stale_count"] == 0
    assert stats["active_runs"] == 2 and stats["claimed_runs"] == 1
    assert 0 <= stats["avg_heartbeat_age_seconds"] <= stats["max_heartbeat_age_seconds"] <= 5
