-- register_runtime: create or update a runtime and record a heartbeat.
--
-- KEYS[1] <P>:runtime:<runtime_id>  HASH the runtime; expires when heartbeats stop
-- ARGV[1] runtime_id   ARGV[2] status   ARGV[3] display_name   ARGV[4] endpoint
-- ARGV[5] version      ARGV[6] capabilities JSON   ARGV[7] labels JSON
-- ARGV[8] metadata JSON   ('' = none for ARGV[3..8]; the seed clears them too)
-- ARGV[9] heartbeat deadline ms (1 .. 86400000)
-- ARGV[10] grace ms: the key outlives its deadline by this much, shown as `stale`
-- ARGV[11] max JSON bytes
-- ARGV[12] numeric id for a new runtime (the client took it from
--          <P>:runtimes:seq; an existing runtime keeps its own)
-- Returns HGETALL of the runtime. The client then records it in the index
-- <P>:runtimes (another slot on a cluster) with its heartbeat_deadline_at.
check_id('runtime_id', ARGV[1])
check_id('status', ARGV[2])
check_text('display_name', ARGV[3], 4096)
check_text('endpoint', ARGV[4], 4096)
check_text('version', ARGV[5], 4096)
local max_bytes = check_int('max JSON bytes', ARGV[11], 1, 512 * 1024 * 1024)
check_json('capabilities', ARGV[6], '{', '}', max_bytes)
check_json('labels', ARGV[7], '{', '}', max_bytes)
check_json('metadata', ARGV[8], '{', '}', max_bytes)
local deadline = check_int('heartbeat deadline ms', ARGV[9], 1, 86400000)
local grace = check_int('grace ms', ARGV[10], 0, 86400000 * 30)
local fresh_id = check_int('runtime number', ARGV[12], 1, 9007199254740991)

local key = KEYS[1]
local now = now_ms()
if redis.call('EXISTS', key) == 0 then
  redis.call('HSET', key, 'id', fmt(fresh_id), 'runtime_id', ARGV[1], 'created_at', now)
end
local names = { 'display_name', 'endpoint', 'version', 'capabilities', 'labels', 'metadata' }
for i, name in ipairs(names) do
  local v = ARGV[2 + i]
  if v == '' then redis.call('HDEL', key, name) else redis.call('HSET', key, name, v) end
end
redis.call('HSET', key, 'status', ARGV[2], 'last_heartbeat_at', now, 'heartbeat_deadline_at', now + deadline,
  'updated_at', now)
redis.call('PEXPIRE', key, deadline + grace)
return hgetall(key)
