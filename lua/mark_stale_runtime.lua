-- mark_stale_runtime: set the stale status of one runtime whose heartbeat is overdue.
--
-- KEYS[1] <P>:runtime:<runtime_id>  HASH the runtime
-- ARGV[1] now ms ('' = server clock)   ARGV[2] stale status (default 'stale')
-- ARGV[3] stale_after ms ('' = only the deadline counts): also mark the
--         runtime when its last heartbeat is older than this
-- The client walks the index <P>:runtimes (another slot on a cluster) and
-- calls this per candidate, so the check and the write are one step.
-- Returns HGETALL of the runtime when it was marked, 0 when it was not
-- (already stale, or not overdue), -1 when its key has expired.
local now = check_opt_int('now', ARGV[1], 0, 1e15)
check_id('stale status', ARGV[2])
local after = check_opt_int('stale_after ms', ARGV[3], 0, 1e13)
now = now or now_ms()
local key = KEYS[1]
local v = redis.call('HMGET', key, 'status', 'heartbeat_deadline_at', 'last_heartbeat_at')
if not v[1] then return -1 end
if v[1] == ARGV[2] then return 0 end
local overdue = tonumber(v[2]) < now or (after and tonumber(v[3]) < now - after)
if not overdue then return 0 end
redis.call('HSET', key, 'status', ARGV[2], 'updated_at', now)
return hgetall(key)
