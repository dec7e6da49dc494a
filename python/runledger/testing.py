"""Helpers for tests and scripts: a private ``redis-server``.

``RedisServer()`` starts ``redis-server`` from PATH on a free loopback port,
with a temp dir of its own, and waits until it answers (the same embedded
server the Rust tests and ``runledger demo`` use). Use it as a context
manager, or call ``stop()``; it is stopped by its PID, never another.
"""

from runledger._native import RedisCluster, RedisServer

__all__ = ["RedisServer", "RedisCluster"]
