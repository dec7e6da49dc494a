"""Helpers for tests and scripts: a private ``redis-server``.

``RedisServer()`` starts ``redis-server`` from PATH on a free loopback port,
with a temp dir of its own, and waits until it answers (the same embedded
server the Rust tests and ``runledger demo`` use). Use it as a context
manager, or call ``stop()``; it is stopped by its PID, never another.
``RedisCluster()`` and ``RedisSentinel()`` start a private cluster, or a
master with 2 replicas under 3 sentinels (``url`` is a
``redis+sentinel://`` one; ``failover()`` is a planned ``SENTINEL
FAILOVER``), the same way.
"""

from runledger._native import RedisCluster, RedisSentinel, RedisServer

__all__ = ["RedisServer", "RedisCluster", "RedisSentinel"]
