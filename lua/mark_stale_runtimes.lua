-- mark_stale_runtimes: set the status of runtimes whose heartbeat is overdue.
--
-- KEYS[1] <P>:runtimes  ZSET runtime ids, score = heartbeat deadline (ms)
-- ARGV[1] runtime key base <P>:runtime:  (runtime hashes are built from it)
-- ARGV[2] now ms ('' = server clock)   ARGV[3] stale status (default 'stale')
-- ARGV[4] stale_after ms ('' = only the deadline counts): also mark runtimes
--         whose last heartbeat is older than this
-- Runtimes whose key already expired are dropped from KEYS[1].
-- Returns an array of HGETALL replies of the runtimes it marked.
local base = ARGV[1]
local now = check_opt_int('now', ARGV[2], 0, 1e15)
check_id('stale status', ARGV[3])
local after = check_opt_int('stale_after ms', ARGV[4], 0, 1e13)
now = now or now_ms()
local ids
if after then
  ids = redis.call('ZRANGE', KEYS[1], 0, -1)
else
  ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. fmt(now))
end
local out = {}
for _, id in ipairs(ids) do
  local key = base .. id
  local v = redis.call('HMGET', key, 'status', 'heartbeat_deadline_at', 'last_heartbeat_at')
  if not v[1] then
    redis.call('ZREM', KEYS[1], id)
  elseif v[1] ~= ARGV[3] then
    local overdue = tonumber(v[2]) < now or (after and tonumber(v[3]) < now - after)
    if overdue then
      redis.call('HSET', key, 'status', ARGV[3], 'updated_at', now)
      out[#out + 1] = hgetall(key)
    end
  end
end
return out
