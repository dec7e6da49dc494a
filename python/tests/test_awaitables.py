"""How store calls reach asyncio: each result lands on the future of its
own call, on whichever loop and thread awaited it; a cancelled call runs to
its end without disturbing the loop; a call outside a loop says so."""

import asyncio
import threading

import pytest

import runledger


async def test_a_burst_of_calls_each_gets_its_own_answer(store):
    ids = [f"burst-{i}" for i in range(500)]
    created = await asyncio.gather(*(store.create_run(run_id=i, runner_id="a", status="queued") for i in ids))
    assert [r["run_id"] for r in created] == ids
    fetched = await asyncio.gather(*(store.get_run(i) for i in reversed(ids)))
    assert [r["run_id"] for r in fetched] == list(reversed(ids))
    # errors land on their own futures too, between successes
    mixed = await asyncio.gather(
        *(store.get_run(i) if n % 2 else store.finalize_run(run_id=i, status="bogus") for n, i in enumerate(ids[:40])),
        return_exceptions=True,
    )
    for n, (i, answer) in enumerate(zip(ids[:40], mixed)):
        if n % 2:
            assert answer["run_id"] == i
        else:
            assert isinstance(answer, ValueError) and str(answer).startswith("Unknown run status: 'bogus'")


async def test_a_cancelled_call_still_lands_and_the_loop_goes_on(store):
    pending = [asyncio.ensure_future(store.create_run(run_id=f"c{i}", runner_id="a")) for i in range(100)]
    await asyncio.sleep(0)  # every task starts, sends its call and waits for it
    for future in pending:
        future.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    assert all(f.cancelled() for f in pending)
    # the calls were sent before the cancel: they finish, and their results are dropped
    # (the page is what counts: list_runs reads its total in a later call, so
    # a total can already count runs that landed after the page was read)
    for _ in range(500):
        runs, _, _, _ = await store.list_runs(limit=200)
        if len(runs) == 100:
            break
        await asyncio.sleep(0.01)
    assert sorted(r["run_id"] for r in runs) == sorted(f"c{i}" for i in range(100))
    assert (await store.get_run("c7"))["status"] == "running"  # the default status


def test_loops_in_several_threads_and_one_after_another(redis_url, prefix):
    store = runledger.RunLedgerStore(redis_url, prefix=prefix)
    answers = {}

    async def lifecycle(name):
        got = []
        for i in range(30):
            run_id = f"{name}-{i}"
            await store.create_run(run_id=run_id, runner_id="a", status="running")
            await store.append_event(run_id=run_id, sequence=1, event_type="step", data={"i": i})
            got.append((await store.finalize_run(run_id=run_id, status="completed"))["run_id"])
        return got

    def in_thread(name):
        answers[name] = asyncio.run(lifecycle(name))

    threads = [threading.Thread(target=in_thread, args=(f"t{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    # meanwhile two loops in turn on this thread, with the same store
    answers["main1"] = asyncio.run(lifecycle("main1"))
    answers["main2"] = asyncio.run(lifecycle("main2"))
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    for name, got in answers.items():
        assert got == [f"{name}-{i}" for i in range(30)]
    assert len(answers) == 6


def test_a_call_outside_a_running_loop_says_so(store):
    call = store.get_run("x")
    with pytest.raises(RuntimeError, match="inside a running asyncio event loop"):
        call.send(None)
