"""Fixtures: every test runs against real Redis, on two backends.

- ``single``: a private ``redis-server`` per test module (``RedisServer``,
  the embedded default the Rust tests use: a free loopback port, a temp dir
  of its own, stopped by its PID).
- ``cluster``: one private 6-node Redis Cluster (3 masters, 3 replicas) for
  the whole session.

Without ``redis-server`` (and ``redis-cli`` for the cluster) on PATH the
fixtures fail with a message saying what to install; nothing is skipped.
Each test gets a key prefix of its own, so tests never see each other's keys.
"""

import itertools
import os
import shutil
import subprocess

import pytest

import runledger
from runledger.testing import RedisCluster, RedisServer

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster():
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(params=["single", "cluster"])
def backend(request):
    return request.param


@pytest.fixture
def redis_url(request, backend):
    if backend == "cluster":
        return request.getfixturevalue("redis_cluster").url
    return request.getfixturevalue("redis_server").url


@pytest.fixture
def prefix():
    return f"t{os.getpid()}x{next(_prefixes)}"


@pytest.fixture
def store(redis_url, prefix):
    return runledger.RunLedgerStore(redis_url, prefix=prefix)


def redis_cli(port, *args):
    """One redis-cli command against a server of ours; its output."""
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.fail("redis-cli is not on PATH: install redis-tools (Debian/Ubuntu) or redis (macOS)")
    return subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", str(port), *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


def runledger_binary():
    """The CLI built by cargo (the test profile `quick` first), for tests that run a Rust worker."""
    explicit = os.environ.get("RUNLEDGER_BIN")
    if explicit:
        return os.path.abspath(explicit)
    root = os.path.join(os.path.dirname(__file__), "..", "..", "target")
    for profile in ("quick", "release", "debug"):
        path = os.path.abspath(os.path.join(root, profile, "runledger"))
        if os.path.exists(path):
            return path
    pytest.fail("the runledger CLI is not built: run `cargo build --profile quick` first, or set RUNLEDGER_BIN")
