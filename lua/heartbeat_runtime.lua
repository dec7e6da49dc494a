-- heartbeat_runtime: refresh a registered runtime's heartbeat.
--
-- KEYS[1] <P>:runtime:<runtime_id>  HASH the runtime
-- ARGV[1] runtime_id   ARGV[2] status
-- ARGV[3] heartbeat deadline ms (1 .. 86400000)   ARGV[4] grace ms
-- ARGV[5] capabilities JSON ('' = keep)   ARGV[6] labels JSON ('' = keep)
-- ARGV[7] '1' when ARGV[8..9] carry metadata
-- ARGV[8] metadata as the client read it (compare-and-set guard)
-- ARGV[9] merged metadata JSON
-- ARGV[10] max JSON bytes
-- Returns HGETALL of the runtime; the client then moves it in the index
-- <P>:runtimes (another slot on a cluster) to its new heartbeat_deadline_at. Errors: NOT_FOUND (never registered or
-- expired), RETRY (metadata changed since the client read it).
check_id('runtime_id', ARGV[1])
check_id('status', ARGV[2])
local deadline = check_int('heartbeat deadline ms', ARGV[3], 1, 86400000)
local grace = check_int('grace ms', ARGV[4], 0, 86400000 * 30)
local max_bytes = check_int('max JSON bytes', ARGV[10], 1, 512 * 1024 * 1024)
check_json('capabilities', ARGV[5], '{', '}', max_bytes)
check_json('labels', ARGV[6], '{', '}', max_bytes)
local with_meta = ARGV[7] == '1'
if with_meta then check_json('metadata', ARGV[9], '{', '}', max_bytes) end

local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then fail('NOT_FOUND', 'runtime ' .. ARGV[1] .. ' is not registered') end
if with_meta and (redis.call('HGET', key, 'metadata') or '') ~= ARGV[8] then
  fail('RETRY', 'metadata of runtime ' .. ARGV[1] .. ' changed meanwhile')
end
local now = now_ms()
if ARGV[5] ~= '' then redis.call('HSET', key, 'capabilities', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', key, 'labels', ARGV[6]) end
if with_meta then redis.call('HSET', key, 'metadata', ARGV[9]) end
redis.call('HSET', key, 'status', ARGV[2], 'last_heartbeat_at', now, 'heartbeat_deadline_at', now + deadline,
  'updated_at', now)
redis.call('PEXPIRE', key, deadline + grace)
return hgetall(key)
