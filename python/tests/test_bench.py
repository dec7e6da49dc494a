"""``runledger bench --host-shape``: the Rust library and this package doing
the host's workload side by side, on a tiny workload. A benchmark, not a
timed test: only the shape and sanity of the figures are checked."""

import json
import math
import os
import re
import subprocess
import sys

from conftest import redis_cli, runledger_binary


def bench(*global_args, cwd=None):
    """The bench's JSON figures and its stderr; `global_args` go before `bench`."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RUNLEDGER_PREFIX", "RUST_LOG")}
    done = subprocess.run(
        [runledger_binary(), *global_args, "--json", "bench", "--host-shape", "--runs", "200", "--rounds", "2",
         "--tasks", "8", "--python", sys.executable],
        capture_output=True, text=True, timeout=120, env=env, cwd=cwd,
    )
    assert done.returncode == 0, f"bench failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout), done.stderr


def check(figures):
    assert figures["runs"] == 200 and figures["tasks"] == 8 and figures["rounds"] == 2, figures
    assert figures["redis_version"].split(".")[0].isdigit(), figures
    for side in ("rust", "python"):
        rounds = figures[f"{side}_per_s"]
        assert len(rounds) == 2 and all(math.isfinite(r) and r > 0 for r in rounds), figures
        median = figures[f"{side}_median_per_s"]
        assert min(rounds) <= median <= max(rounds), figures
    ratio = figures["python_over_rust"]
    assert math.isfinite(ratio) and ratio > 0, figures
    # the median over rounds of the two rates measured side by side in each
    per_round = sorted(p / r for p, r in zip(figures["python_per_s"], figures["rust_per_s"]))
    assert math.isclose(ratio, (per_round[0] + per_round[1]) / 2, rel_tol=1e-6), figures
    assert figures["python"] == sys.executable, figures


def test_host_shape_on_a_private_server(tmp_path):
    # Run from a directory whose `runledger` is not the package (as the
    # source tree without its compiled module is, in `python/`): the Python
    # side must still import the installed one.
    (tmp_path / "runledger").mkdir()
    (tmp_path / "runledger" / "__init__.py").write_text("raise ImportError('not the installed package')\n")
    figures, stderr = bench(cwd=tmp_path)
    check(figures)
    assert "private redis-server" in stderr, stderr


def test_host_shape_on_a_given_server_removes_its_keys(redis_server, prefix):
    redis_cli(redis_server.port, "HSET", f"{prefix}:mine", "keep", "me")
    figures, stderr = bench("--redis", redis_server.url, "--prefix", prefix)
    check(figures)
    used = re.search(r"key prefix (\S+)", stderr).group(1)
    assert used.startswith(f"{prefix}-bench-"), stderr  # a fresh prefix, never the caller's
    assert redis_cli(redis_server.port, "--scan", "--pattern", f"{used}*").split() == []
    assert redis_cli(redis_server.port, "HGET", f"{prefix}:mine", "keep").strip() == "me"
    assert "bench: removed " in stderr, stderr
