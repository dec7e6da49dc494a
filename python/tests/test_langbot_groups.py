"""The LangBot shape with groups: two host processes and four runtimes over
one Redis; at most one active run per conversation (50 conversations), and
within each conversation the runs are claimed in creation order."""

import asyncio
import subprocess
import sys
import time

import runledger

HOST = """
import asyncio, sys
import runledger

async def main(url, prefix, host):
    store = runledger.RunLedgerStore(url, prefix=prefix)
    for m in range(3):
        for c in range(50):
            await store.create_run(run_id=f"h{host}-c{c}-m{m}", runner_id="agent", status="queued",
                                   queue_name="langbot", conversation_id=f"conv-{c}")

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""


async def test_two_hosts_four_runtimes_one_run_per_conversation(redis_url, prefix):
    store = runledger.RunLedgerStore(redis_url, prefix=prefix)
    await store.set_queue_groups("langbot", group_by="conversation_id", group_concurrency=1)
    hosts = [
        # -I: the installed package, not the source folder beside the tests.
        subprocess.Popen([sys.executable, "-I", "-c", HOST, redis_url, prefix, str(h)]) for h in range(2)
    ]
    spans = []  # (conversation, id, claimed at, finished at)

    async def runtime(n):
        mine = runledger.RunLedgerStore(redis_url, prefix=prefix)
        idle_since = None
        while True:
            run = await mine.claim_next_run(runtime_id=f"rt-{n}", queue_name="langbot", lease_seconds=30)
            if run is None:
                if all(h.poll() is not None for h in hosts):
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > 1.0:
                        return
                await asyncio.sleep(0.01)
                continue
            idle_since = None
            start = time.monotonic()
            await asyncio.sleep(0.002)
            end = time.monotonic()
            await mine.finalize_run(run_id=run["run_id"], status="completed", claim_token=run["claim_token"])
            spans.append((run["conversation_id"], run["id"], start, end, run["run_id"]))

    await asyncio.wait_for(asyncio.gather(*(runtime(n) for n in range(4))), timeout=120)
    for h in hosts:
        assert h.wait(timeout=30) == 0
    assert len(spans) == 300 and len({s[4] for s in spans}) == 300, "every run completed once"
    by_conversation = {}
    for conv, run_id, start, end, name in spans:
        by_conversation.setdefault(conv, []).append((start, end, run_id, name))
    assert len(by_conversation) == 50
    for conv, items in by_conversation.items():
        items.sort()
        for a, b in zip(items, items[1:]):
            assert b[0] >= a[1], f"{conv}: {a[3]} and {b[3]} were active at once"
        ids = [i[2] for i in items]
        assert ids == sorted(ids), f"{conv}: claimed out of creation order: {[i[3] for i in items]}"
