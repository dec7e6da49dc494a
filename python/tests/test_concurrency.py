"""Many asyncio tasks on one store: every run is claimed once, creates of
one run id agree, and nothing is lost."""

import asyncio
import collections

import runledger


async def test_many_claimers_take_each_run_exactly_once(store):
    runs = 300

    async def create(batch):
        for i in range(batch * 10, batch * 10 + 10):
            await store.create_run(run_id=f"r{i}", runner_id="a", status="queued", priority=i % 3)

    await asyncio.gather(*(create(b) for b in range(runs // 10)))
    claims = []

    async def claimer(n):
        while True:
            run = await store.claim_next_run(runtime_id=f"rt-{n}", lease_seconds=60)
            if run is None:
                return
            claims.append(run)
            await store.append_event(run_id=run["run_id"], sequence=1, event_type="step",
                                     data={"by": n}, claim_token=run["claim_token"])
            await store.finalize_run(run_id=run["run_id"], status="completed", claim_token=run["claim_token"])

    await asyncio.gather(*(claimer(n) for n in range(32)))
    per_run = collections.Counter(c["run_id"] for c in claims)
    assert len(per_run) == runs and set(per_run.values()) == {1}
    assert len({c["claim_token"] for c in claims}) == runs
    assert (await store.list_runs(statuses=["completed"]))[3] == runs
    for c in claims[:20]:
        events, _, _, _ = await store.page_run_events(run_id=c["run_id"])
        assert [e["sequence"] for e in events] == [1]


async def test_racing_creates_of_one_run_id_agree(store):
    results = await asyncio.gather(*(
        store.create_run(run_id="contested", runner_id=f"r{n}", status="queued", queue_name=f"q{n % 4}")
        for n in range(20)
    ))
    assert len({(r["id"], r["queue_name"], r["runner_id"]) for r in results}) == 1


async def test_racing_runner_and_audit_events_lose_nothing(store):
    await store.create_run(run_id="r", runner_id="a")

    async def runner():
        seq = 1
        for i in range(40):
            while True:
                try:
                    await store.append_event(run_id="r", sequence=seq, event_type="runner", data={"i": i})
                    seq += 1
                    break
                except runledger.Conflict:
                    # An audit event took the number (the SQL store dropped
                    # one of the two here, silently): go on after the last.
                    last, _, _, _ = await store.page_run_events(run_id="r", direction="backward", limit=1)
                    seq = last[0]["sequence"] + 1

    async def host():
        for _ in range(20):
            await store.append_audit_event(run_id="r", event_type="audit")
            await asyncio.sleep(0)

    await asyncio.gather(runner(), host())
    events, _, _, _ = await store.page_run_events(run_id="r", limit=100)
    kinds = collections.Counter(e["type"] for e in events)
    assert kinds["audit"] == 20 and kinds["runner"] == 40
    assert [e["data"]["i"] for e in events if e["type"] == "runner"] == list(range(40))
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
