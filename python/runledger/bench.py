"""The Python side of ``runledger bench --host-shape`` (the binding's overhead).

The host's workload, ``create_run`` as ``running``, three ``append_event``
and ``finalize_run``, from ``--tasks`` asyncio tasks on one event loop. It
prints one JSON line, ``{"runs": N, "tasks": T, "seconds": S, "per_s": R}``.

``runledger bench --host-shape`` runs it as a child process beside the Rust
library doing the same, and passes the workload (ids, metadata, event data,
usage) as ``--workload JSON``, so both sides send the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
import uuid

from runledger import RunLedgerStore

async def lifecycles(store: RunLedgerStore, workload: dict, runs: int, tasks: int) -> None:
    """``runs`` host-shaped lifecycles from ``tasks`` concurrent tasks."""
    counter = itertools.count()

    async def task() -> None:
        while next(counter) < runs:
            run_id = str(uuid.uuid4())
            await store.create_run(
                run_id=run_id,
                runner_id=workload["runner_id"],
                queue_name=workload["queue_name"],
                conversation_id=workload["conversation_id"],
                bot_id=workload["bot_id"],
                metadata=workload["metadata"],
                status="running",
            )
            for sequence in (1, 2, 3):
                await store.append_event(
                    run_id=run_id,
                    sequence=sequence,
                    event_type=workload["event_type"],
                    data=workload["event_data"],
                )
            await store.finalize_run(run_id=run_id, status="completed", usage=workload["usage"])

    await asyncio.gather(*(task() for _ in range(tasks)))


async def measure(redis_url: str, prefix: str, runs: int, tasks: int, workload: dict, cluster: bool) -> dict:
    """Warms up (connects, loads the scripts), then times ``runs`` lifecycles."""
    store = RunLedgerStore(redis_url, prefix, cluster=cluster)
    await lifecycles(store, workload, tasks, tasks)
    start = time.perf_counter()
    await lifecycles(store, workload, runs, tasks)
    seconds = time.perf_counter() - start
    return {"runs": runs, "tasks": tasks, "seconds": seconds, "per_s": runs / seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runledger.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--redis", required=True, help="Redis URL (redis+cluster:// for a cluster)")
    parser.add_argument("--prefix", required=True, help="key prefix; use a fresh one, the runs stay until retention")
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--cluster", action="store_true", help="the URL names seed nodes of a Redis Cluster")
    parser.add_argument(
        "--workload",
        type=json.loads,
        required=True,
        help="the lifecycle's arguments as JSON: runner_id, queue_name, conversation_id, bot_id, metadata, "
        "event_type, event_data, usage (runledger bench --host-shape passes them)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.tasks < 1:
        parser.error("--runs and --tasks must be at least 1")
    figures = asyncio.run(measure(args.redis, args.prefix, args.runs, args.tasks, args.workload, args.cluster))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
