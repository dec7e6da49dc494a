"""Stores are cheap to build and share one pool per URL: LangBot builds a
store per call."""

import asyncio

import runledger
from conftest import redis_cli


def connected_clients(port):
    for line in redis_cli(port, "INFO", "clients").splitlines():
        if line.startswith("connected_clients:"):
            return int(line.split(":")[1])
    raise AssertionError("INFO clients has no connected_clients")


async def test_a_thousand_stores_share_one_pool(redis_server, prefix):
    first = runledger.RunLedgerStore(redis_server.url, prefix=prefix)
    await first.create_run(run_id="r", runner_id="a")
    before = connected_clients(redis_server.port)
    stores = [runledger.RunLedgerStore(redis_server.url, prefix=prefix) for _ in range(1000)]
    runs = await asyncio.gather(*(s.get_run("r") for s in stores))
    assert all(r["run_id"] == "r" for r in runs)
    # The pool may open a connection or two under load, never one per store.
    assert connected_clients(redis_server.port) <= before + 4


async def test_other_settings_get_a_store_of_their_own(redis_server, prefix):
    a = runledger.RunLedgerStore(redis_server.url, prefix=prefix)
    b = runledger.RunLedgerStore(redis_server.url, prefix=prefix + "b")
    await a.create_run(run_id="only-in-a", runner_id="x")
    assert await b.get_run("only-in-a") is None
    assert a.prefix == prefix and b.prefix == prefix + "b"


async def test_an_unreachable_redis_is_a_connection_error_and_the_next_call_retries(redis_server, prefix):
    store = runledger.RunLedgerStore("redis://127.0.0.1:1/", prefix=prefix)
    try:
        await store.get_run("x")
    except runledger.Unavailable as e:
        assert isinstance(e, ConnectionError) and isinstance(e, runledger.Error)
    else:
        raise AssertionError("no error from a Redis that is not there")


def test_a_bad_prefix_is_refused_at_construction():
    try:
        runledger.RunLedgerStore("redis://127.0.0.1:1/", prefix="a:b")
    except ValueError as e:
        assert "prefix" in str(e)
    else:
        raise AssertionError("a prefix with ':' was accepted")
