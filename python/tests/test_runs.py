"""Runs through the host API: create, claim, renew, release, finish, cancel,
read; each method with its arguments, defaults, result shapes and the
messages LangBot's store gives."""

import asyncio
import datetime
import inspect
import time
import uuid

import pytest

import runledger

RUN_KEYS = set(
    "id run_id event_id agent_id binding_id runner_id conversation_id thread_id workspace_id bot_id status "
    "status_reason queue_name priority requested_runtime_id claimed_by_runtime_id "
    "claim_lease_expires_at dispatch_attempts last_claimed_at created_at started_at finished_at updated_at "
    "deadline_at cancel_requested_at usage cost metadata".split()
)
# As in LangBot's store, only claim_next_run's result has the token: everywhere else the key is absent.
CLAIM_KEYS = RUN_KEYS | {"claim_token"}
EVENT_KEYS = {"id", "run_id", "sequence", "type", "data", "usage", "created_at", "source", "metadata", "artifact_refs"}


def test_every_method_is_a_coroutine_function():
    for name in [
        "create_run", "claim_next_run", "renew_claim", "release_claim", "validate_active_claim",
        "release_expired_claims", "append_event", "append_audit_event", "finalize_run", "request_cancel",
        "get_run", "list_runs", "page_run_events", "register_runtime", "heartbeat_runtime", "get_runtime",
        "list_runtimes", "mark_stale_runtimes", "get_run_stats", "get_runtime_stats", "get_runner_stats",
    ]:
        assert inspect.iscoroutinefunction(getattr(runledger.RunLedgerStore, name)), name


async def test_create_run_has_the_seed_fields_and_defaults_to_running(store):
    now = int(time.time())
    run = await store.create_run(
        run_id="r1", event_id="e1", binding_id="b1", runner_id="agent", conversation_id="c1", thread_id="t1",
        workspace_id="w1", bot_id="bot1", agent_id="a1", deadline_at=now + 300.5,
        authorization={"scope": ["x"]}, metadata={"k": {"n": [1, 2.5, None, True]}},
    )
    assert set(run) == RUN_KEYS
    assert run["status"] == "running"  # the SQL store's default
    assert run["started_at"] is not None and abs(run["started_at"] - now) <= 2
    assert (run["event_id"], run["binding_id"], run["agent_id"]) == ("e1", "b1", "a1")
    assert (run["conversation_id"], run["thread_id"], run["workspace_id"], run["bot_id"]) == ("c1", "t1", "w1", "bot1")
    assert run["deadline_at"] == now + 300
    assert run["metadata"] == {"k": {"n": [1, 2.5, None, True]}}
    assert "claim_token" not in run and run["dispatch_attempts"] == 0
    assert isinstance(run["id"], int) and 0 < run["id"] < 2**53
    assert await store.get_run("r1") == run


async def test_create_run_is_idempotent_by_run_id_across_queues(store):
    first = await store.create_run(run_id="same", runner_id="r", status="queued", queue_name="q1", priority=3)
    again = await store.create_run(run_id="same", runner_id="other", status="queued", queue_name="q2")
    assert again == first and again["queue_name"] == "q1"
    assert await store.claim_next_run(runtime_id="rt", queue_name="q2") is None


async def test_an_unknown_status_is_refused_before_anything_even_for_an_existing_run(store):
    await store.create_run(run_id="x", runner_id="r", status="queued")
    for call in [
        store.create_run(run_id="x", runner_id="r", status="bogus"),
        store.create_run(run_id="new", runner_id="r", status="bogus"),
        store.release_claim(run_id="x", claim_token="nope", status="bogus"),
        store.release_expired_claims(status="bogus"),
        store.finalize_run(run_id="x", status="bogus"),
        store.finalize_run(run_id="missing", status="bogus"),
    ]:
        with pytest.raises(ValueError, match="^Unknown run status"):
            await call
    assert await store.get_run("new") is None
    assert (await store.get_run("x"))["status"] == "queued"


async def test_bad_input_is_a_value_error_and_writes_nothing(store):
    with pytest.raises(runledger.InvalidInput, match="metadata"):
        await store.create_run(run_id="bad", runner_id="r", metadata=[1, 2])
    with pytest.raises(ValueError, match="not JSON"):
        await store.create_run(run_id="bad", runner_id="r", metadata={"when": datetime.datetime.now()})
    with pytest.raises(ValueError, match="key that is not a string"):
        await store.create_run(run_id="bad", runner_id="r", metadata={1: "x"})
    with pytest.raises(ValueError, match="lease_seconds"):
        await store.claim_next_run(runtime_id="rt", lease_seconds="soon")
    with pytest.raises(ValueError, match="run_id"):
        await store.create_run(run_id="", runner_id="r")
    assert await store.get_run("bad") is None
    items, _, _, total = await store.list_runs()
    assert items == [] and total == 0


async def test_claim_order_filters_pins_and_the_token_only_for_the_claimer(store):
    await store.create_run(run_id="low", runner_id="a", status="queued", priority=0)
    await store.create_run(run_id="high", runner_id="a", status="queued", priority=5)
    await store.create_run(run_id="old-low", runner_id="b", status="queued", priority=0)
    await store.create_run(run_id="pinned", runner_id="a", status="queued", priority=9, requested_runtime_id="rt-2")
    await store.create_run(run_id="elsewhere", runner_id="a", status="queued", queue_name="other", priority=100)

    before = time.time()
    claimed = await store.claim_next_run(runtime_id="rt-1", queue_name="default", lease_seconds=60)
    after = time.time()
    assert claimed["run_id"] == "high" and claimed["status"] == "claimed"
    assert set(claimed) == CLAIM_KEYS
    assert len(claimed["claim_token"]) >= 32 and claimed["claimed_by_runtime_id"] == "rt-1"
    assert claimed["dispatch_attempts"] == 1 and claimed["started_at"] is not None
    # Whole seconds, 60 s after the claim (Redis here runs on this machine's clock).
    assert int(before) + 60 <= claimed["claim_lease_expires_at"] <= after + 60
    assert "claim_token" not in await store.get_run("high")

    assert (await store.claim_next_run(runtime_id="rt-1", queue_name="default", runner_ids=["b"]))["run_id"] == "old-low"
    assert await store.claim_next_run(runtime_id="rt-1", queue_name="default", runner_ids=["zzz"]) is None
    assert (await store.claim_next_run(runtime_id="rt-2", queue_name="default"))["run_id"] == "pinned"
    assert (await store.claim_next_run(runtime_id="rt-1", queue_name="default"))["run_id"] == "low"
    assert await store.claim_next_run(runtime_id="rt-1", queue_name="default") is None
    assert (await store.claim_next_run(runtime_id="rt-1"))["run_id"] == "elsewhere"


async def test_claim_scope_filters(store):
    await store.create_run(run_id="c1", runner_id="a", status="queued", conversation_id="conv-1", bot_id="bot-1")
    await store.create_run(run_id="c2", runner_id="a", status="queued", conversation_id="conv-2", workspace_id="ws-2")
    await store.create_run(run_id="t1", runner_id="a", status="queued", conversation_id="conv-3", thread_id="th-1")
    await store.create_run(run_id="t0", runner_id="a", status="queued", conversation_id="conv-3")
    claim = store.claim_next_run
    assert (await claim(runtime_id="rt", conversation_id="conv-2"))["run_id"] == "c2"
    assert await claim(runtime_id="rt", bot_id="bot-9") is None
    assert (await claim(runtime_id="rt", bot_id="bot-1"))["run_id"] == "c1"
    assert await claim(runtime_id="rt", workspace_id="ws-2") is None  # c2 is taken
    # thread_id counts only with strict_thread; then None means "no thread".
    assert (await claim(runtime_id="rt", conversation_id="conv-3", thread_id=None, strict_thread=True))["run_id"] == "t0"
    assert await claim(runtime_id="rt", thread_id="th-x", strict_thread=True) is None
    assert (await claim(runtime_id="rt", thread_id="th-x"))["run_id"] == "t1"


async def test_renew_checks_token_holder_and_expiry(store):
    await store.create_run(run_id="r", runner_id="a", status="queued")
    c = await store.claim_next_run(runtime_id="rt", lease_seconds=60)
    token = c["claim_token"]
    renewed = await store.renew_claim(run_id="r", claim_token=token, lease_seconds=120)
    assert renewed["claim_lease_expires_at"] >= c["claim_lease_expires_at"] + 60
    assert set(renewed) == RUN_KEYS, "renew leaves the token out"
    assert (await store.renew_claim(run_id="r", claim_token=token, runtime_id="rt"))["run_id"] == "r"
    assert await store.renew_claim(run_id="r", claim_token=token, runtime_id="someone-else") is None
    assert await store.renew_claim(run_id="r", claim_token="wrong") is None
    assert await store.renew_claim(run_id="missing", claim_token=token) is None
    # An expired lease cannot be renewed, even when nobody took the run yet.
    await store.renew_claim(run_id="r", claim_token=token, lease_seconds=1)
    await asyncio.sleep(1.3)
    assert await store.renew_claim(run_id="r", claim_token=token) is None
    assert await store.release_claim(run_id="r", claim_token=token) is None
    assert await store.validate_active_claim(run_id="r", runtime_id="rt", claim_token=token) is False


async def test_release_claim_back_to_the_queue_or_to_an_end(store):
    await store.create_run(run_id="r", runner_id="a", status="queued")
    c = await store.claim_next_run(runtime_id="rt")
    assert await store.release_claim(run_id="r", claim_token=c["claim_token"], runtime_id="other") is None
    back = await store.release_claim(run_id="r", claim_token=c["claim_token"], runtime_id="rt", status_reason="later")
    assert back["status"] == "queued" and back["status_reason"] == "later"
    assert set(back) == RUN_KEYS, "release leaves the token out"
    assert back["claimed_by_runtime_id"] is None and back["claim_lease_expires_at"] is None
    c2 = await store.claim_next_run(runtime_id="rt")
    assert c2["dispatch_attempts"] == 2
    # Without a reason the previous one is cleared, as the SQL store does.
    cleared = await store.release_claim(run_id="r", claim_token=c2["claim_token"])
    assert cleared["status_reason"] is None
    c3 = await store.claim_next_run(runtime_id="rt")
    done = await store.release_claim(run_id="r", claim_token=c3["claim_token"], status="failed", status_reason="gave up")
    assert done["status"] == "failed" and done["finished_at"] is not None
    assert set(done) == RUN_KEYS
    assert await store.release_claim(run_id="r", claim_token=c3["claim_token"]) is None


async def test_release_with_a_retry_delay(store):
    await store.create_run(run_id="r", runner_id="a", status="queued")
    c = await store.claim_next_run(runtime_id="rt")
    await store.release_claim(run_id="r", claim_token=c["claim_token"], retry_in_seconds=60)
    assert await store.claim_next_run(runtime_id="rt") is None
    # Claimable once due: a second run released for 0.3 s, then waited out.
    await store.create_run(run_id="s", runner_id="a", status="queued")
    d = await store.claim_next_run(runtime_id="rt")
    assert d["run_id"] == "s"
    await store.release_claim(run_id="s", claim_token=d["claim_token"], retry_in_seconds=0.3)
    await asyncio.sleep(0.5)
    assert (await store.claim_next_run(runtime_id="rt"))["run_id"] == "s"


async def test_validate_active_claim(store):
    await store.create_run(run_id="r", runner_id="a", status="queued")
    c = await store.claim_next_run(runtime_id="rt")
    token = c["claim_token"]
    assert await store.validate_active_claim(run_id="r", runtime_id="rt", claim_token=token) is True
    assert await store.validate_active_claim(run_id="r", runtime_id=None, claim_token=token) is True
    assert await store.validate_active_claim(run_id="r", runtime_id="x", claim_token=token) is False
    assert await store.validate_active_claim(run_id="r", runtime_id="rt", claim_token="nope") is False
    assert await store.validate_active_claim(run_id="missing", runtime_id="rt", claim_token=token) is False


@pytest.mark.parametrize("as_datetime", [False, True])
async def test_release_expired_claims_with_now_status_reason_and_limit(store, as_datetime):
    for i in range(3):
        await store.create_run(run_id=f"r{i}", runner_id="a", status="queued")
        await store.claim_next_run(runtime_id="rt", lease_seconds=60)
    assert await store.release_expired_claims() == []
    later = time.time() + 120
    now = datetime.datetime.fromtimestamp(later, tz=datetime.timezone.utc) if as_datetime else later
    first = await store.release_expired_claims(now=now, limit=2)
    assert len(first) == 2 and {r["status"] for r in first} == {"queued"}
    assert {r["status_reason"] for r in first} == {"claim lease expired"}
    rest = await store.release_expired_claims(now=now, status="timeout", status_reason="lost", limit=0)
    assert [(r["status"], r["status_reason"]) for r in rest] == [("timeout", "lost")]
    assert rest[0]["finished_at"] is not None


async def test_append_event_is_idempotent_and_refuses_conflicts(store):
    await store.create_run(run_id="r", runner_id="a")
    e = await store.append_event(
        run_id="r", sequence=1, event_type="delta", data={"text": "hi"}, usage={"tokens": 2},
        artifact_refs=[{"uri": "s3://x"}], metadata={"m": 1},
    )
    assert set(e) == EVENT_KEYS
    assert (e["sequence"], e["type"], e["source"], e["data"], e["usage"]) == (1, "delta", "runner", {"text": "hi"}, {"tokens": 2})
    assert e["artifact_refs"] == [{"uri": "s3://x"}] and e["metadata"] == {"m": 1}
    again = await store.append_event(
        run_id="r", sequence=1, event_type="delta", data={"text": "hi"}, usage={"tokens": 2},
        artifact_refs=[{"uri": "s3://x"}], metadata={"m": 1},
    )
    assert again == e
    with pytest.raises(runledger.Conflict):
        await store.append_event(run_id="r", sequence=1, event_type="delta", data={"text": "other"})
    with pytest.raises(runledger.NotFound):
        await store.append_event(run_id="missing", sequence=1, event_type="delta")
    await store.finalize_run(run_id="r", status="completed")
    with pytest.raises(runledger.RunFinished):
        await store.append_event(run_id="r", sequence=2, event_type="late")


async def test_events_are_fenced_by_the_claim_token(store):
    await store.create_run(run_id="r", runner_id="a", status="queued")
    c = await store.claim_next_run(runtime_id="rt")
    await store.append_event(run_id="r", sequence=1, event_type="x", claim_token=c["claim_token"])
    with pytest.raises(runledger.StaleToken):
        await store.append_event(run_id="r", sequence=2, event_type="x", claim_token="not-the-token")
    with pytest.raises(runledger.StaleToken):
        await store.finalize_run(run_id="r", status="completed", claim_token="not-the-token")


async def test_append_audit_event_goes_after_the_last_sequence(store):
    await store.create_run(run_id="r", runner_id="a")
    await store.append_event(run_id="r", sequence=4, event_type="x")
    audit = await store.append_audit_event(run_id="r", event_type="note", data={"who": "op"}, metadata={"m": 2})
    assert (audit["sequence"], audit["source"], audit["data"], audit["metadata"]) == (5, "host", {"who": "op"}, {"m": 2})
    assert await store.append_audit_event(run_id="missing", event_type="note") is None
    await store.finalize_run(run_id="r", status="failed")
    assert (await store.append_audit_event(run_id="r", event_type="after"))["sequence"] == 6


async def test_finalize_run_merges_on_the_same_status_and_refuses_another(store):
    assert await store.finalize_run(run_id="missing", status="completed") is None
    await store.create_run(run_id="r", runner_id="a", metadata={"a": 1, "b": 1})
    done = await store.finalize_run(
        run_id="r", status="completed", status_reason="ok", usage={"t": 1}, cost={"usd": 0.5}, metadata={"b": 2}
    )
    assert (done["status"], done["status_reason"], done["usage"], done["cost"]) == ("completed", "ok", {"t": 1}, {"usd": 0.5})
    assert done["metadata"] == {"a": 1, "b": 2}
    assert "claim_token" not in done and done["claim_lease_expires_at"] is None
    await asyncio.sleep(1.05)
    again = await store.finalize_run(run_id="r", status="completed", usage={"t": 9}, metadata={"c": 3})
    assert again["finished_at"] == done["finished_at"]
    assert again["usage"] == {"t": 9} and again["cost"] == {"usd": 0.5} and again["status_reason"] == "ok"
    assert again["metadata"] == {"a": 1, "b": 2, "c": 3}
    with pytest.raises(ValueError, match="^Cannot transition terminal run"):
        await store.finalize_run(run_id="r", status="failed")


async def test_request_cancel(store):
    assert await store.request_cancel(run_id="missing") is None
    await store.create_run(run_id="queued", runner_id="a", status="queued")
    cancelled = await store.request_cancel(run_id="queued", status_reason="user cancelled")
    assert cancelled["status"] == "cancelled" and cancelled["status_reason"] == "user cancelled"
    assert await store.claim_next_run(runtime_id="rt") is None
    await store.create_run(run_id="live", runner_id="a")
    asked = await store.request_cancel(run_id="live")
    assert asked["status"] == "running" and asked["cancel_requested_at"] is not None
    assert (await store.get_run("live"))["cancel_requested_at"] == asked["cancel_requested_at"]


async def test_get_run_of_an_unknown_run_is_none(store):
    assert await store.get_run("nobody") is None
    assert await store.get_run(run_id="nobody") is None


async def test_page_run_events_forward_backward_and_cursors(store):
    await store.create_run(run_id="r", runner_id="a")
    for seq in range(1, 8):
        await store.append_event(run_id="r", sequence=seq, event_type="e", data={"i": seq})
    items, next_cursor, prev_cursor, has_more = await store.page_run_events(run_id="r", limit=3)
    assert [e["sequence"] for e in items] == [1, 2, 3] and (next_cursor, prev_cursor, has_more) == (3, 1, True)
    items, next_cursor, _, has_more = await store.page_run_events(run_id="r", after_sequence=next_cursor, limit=3)
    assert [e["sequence"] for e in items] == [4, 5, 6] and has_more
    items, _, _, has_more = await store.page_run_events(run_id="r", after_sequence=6)
    assert [e["sequence"] for e in items] == [7] and not has_more
    back, next_cursor, _, has_more = await store.page_run_events(run_id="r", direction="backward", limit=2)
    assert [e["sequence"] for e in back] == [7, 6] and next_cursor == 6 and has_more
    back, _, _, _ = await store.page_run_events(run_id="r", direction="backward", before_sequence=6, limit=2)
    assert [e["sequence"] for e in back] == [5, 4]
    sideways, _, _, _ = await store.page_run_events(run_id="r", direction="sideways", limit=1)
    assert [e["sequence"] for e in sideways] == [1]
    assert len((await store.page_run_events(run_id="r", limit=1000))[0]) == 7
    assert await store.page_run_events(run_id="missing") == ([], None, None, False)


async def test_list_runs_filters_pages_and_total(store):
    for i in range(7):
        await store.create_run(
            run_id=f"r{i}", runner_id="alpha" if i % 2 else "beta", binding_id="bind-1" if i < 3 else "bind-2",
            conversation_id="conv", bot_id="bot" if i < 5 else "bot-x", workspace_id="ws",
            thread_id="th" if i == 6 else None, status="queued" if i % 3 else "running",
        )
    items, cursor, has_more, total = await store.list_runs(conversation_id="conv", limit=3)
    assert [r["run_id"] for r in items] == ["r6", "r5", "r4"] and has_more and cursor == items[-1]["id"] and total == 7
    items2, cursor2, has_more2, total2 = await store.list_runs(conversation_id="conv", limit=3, before_id=cursor)
    assert [r["run_id"] for r in items2] == ["r3", "r2", "r1"] and has_more2 and total2 == 7
    items3, cursor3, has_more3, total3 = await store.list_runs(conversation_id="conv", limit=3, before_id=cursor2)
    assert [r["run_id"] for r in items3] == ["r0"] and not has_more3 and cursor3 is None and total3 == 7
    assert (await store.list_runs(statuses=["running"]))[3] == 3
    assert [r["run_id"] for r in (await store.list_runs(runner_id="alpha"))[0]] == ["r5", "r3", "r1"]
    assert [r["run_id"] for r in (await store.list_runs(binding_id="bind-1"))[0]] == ["r2", "r1", "r0"]
    assert [r["run_id"] for r in (await store.list_runs(bot_id="bot-x"))[0]] == ["r6", "r5"]
    assert (await store.list_runs(workspace_id="ws"))[3] == 7
    assert [r["run_id"] for r in (await store.list_runs(thread_id="th", strict_thread=True))[0]] == ["r6"]
    assert (await store.list_runs(thread_id=None, strict_thread=True))[3] == 6
    assert (await store.list_runs(thread_id="th"))[3] == 7  # the thread counts only when strict
    items, _, has_more, total = await store.list_runs(limit=0)
    assert len(items) == 1 and has_more and total == 7
    assert len((await store.list_runs(limit=1000))[0]) == 7
    with pytest.raises(ValueError, match="Unknown run status"):
        await store.list_runs(statuses=["nope"])


async def test_created_runs_wait_outside_the_queue(store):
    run = await store.create_run(run_id="c", runner_id="a", status="created")
    assert run["status"] == "created" and run["started_at"] is None
    assert await store.claim_next_run(runtime_id="rt") is None
    assert (await store.finalize_run(run_id="c", status="cancelled"))["status"] == "cancelled"


async def test_host_shaped_calls_with_uuid_run_ids(store):
    run_id = uuid.uuid4().hex
    run = await store.create_run(
        run_id=run_id, event_id=str(uuid.uuid4()), binding_id=None, runner_id="plugin:author/runner",
        deadline_at=time.time() + 300, status="running",
    )
    assert run["status"] == "running"


async def test_only_claim_next_run_carries_the_claim_token(store):
    """LangBot's store: the key is absent (not null) from every other result."""
    await store.create_run(run_id="r", runner_id="a", status="queued")
    c = await store.claim_next_run(runtime_id="rt", lease_seconds=1)
    assert set(c) == CLAIM_KEYS
    renewed = await store.renew_claim(run_id="r", claim_token=c["claim_token"], lease_seconds=1)
    assert "claim_token" not in renewed
    assert "claim_token" not in await store.get_run("r")
    items, _, _, _ = await store.list_runs()
    assert all("claim_token" not in item for item in items)
    await asyncio.sleep(1.2)
    expired = await store.release_expired_claims()
    assert [r["run_id"] for r in expired] == ["r"] and all("claim_token" not in r for r in expired)
    c2 = await store.claim_next_run(runtime_id="rt")
    released = await store.release_claim(run_id="r", claim_token=c2["claim_token"])
    assert "claim_token" not in released
    c3 = await store.claim_next_run(runtime_id="rt")
    done = await store.finalize_run(run_id="r", status="completed", claim_token=c3["claim_token"])
    assert set(done) == RUN_KEYS
