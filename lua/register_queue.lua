-- register_queue: give a queue its number, once (idempotent).
--
-- KEYS[1] <P>:queues  HASH queue name -> queue number, every queue of the prefix
-- ARGV[1] queue name   ARGV[2] the most queues allowed (numbers 0 .. ARGV[2]-1)
-- Returns the queue's number. Numbers are handed out in order and never
-- reused, so the low part of a run id (see create_run.lua) names one queue.
-- Errors: INVALID (bad name, or every number is taken).
check_id('queue_name', ARGV[1])
local max = check_int('max queues', ARGV[2], 1, 4096)
local n = redis.call('HGET', KEYS[1], ARGV[1])
if n then return tonumber(n) end
n = redis.call('HLEN', KEYS[1])
if n >= max then
  fail('INVALID', 'queue ' .. ARGV[1] .. ' would be queue number ' .. (n + 1) .. '; at most ' .. max ..
    ' queues per prefix')
end
redis.call('HSET', KEYS[1], ARGV[1], n)
return n
