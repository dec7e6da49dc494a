-- reap: one housekeeping pass over a queue.
--
-- KEYS[1..7]  the queue keys (see include/common.lua)
-- ARGV[1] key base
-- ARGV[2] now in epoch ms ('' = the server's clock)
-- ARGV[3] limit per kind of work (1 .. 1000)
-- ARGV[4] retention ms
-- Does, each at most `limit` times: promote due delayed runs; take back
-- expired leases (dead-lettering runs out of attempts); time out runs past
-- their deadline; purge runs finished longer ago than the retention, with
-- their events and list-index entries.
-- Returns {promoted, reclaimed, timed_out, purged}.
local B = ARGV[1]
local now = check_opt_int('now', ARGV[2], 0, 1e15)
local limit = check_int('limit', ARGV[3], 1, 1000)
local retention = check_int('retention ms', ARGV[4], 0, 1e13)
now = now or now_ms()

local promoted = promote_delayed(B, now, limit)
local reclaimed = #recover_expired(B, now, limit, 'queued', 'claim lease expired', retention)

local timed_out = 0
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', K.deadlines, '-inf', now, 'LIMIT', 0, limit)) do
  local h = route_fields(B .. 'run:' .. rid)
  if h and not TERMINAL[h.status] then
    finish(B, rid, h, 'timeout', 'deadline passed', now, retention)
    if h.status == 'claimed' then redis.call('PUBLISH', B .. 'cancel', rid) end
    timed_out = timed_out + 1
  else
    redis.call('ZREM', K.deadlines, rid)
  end
end

local purged = 0
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', K.finished, '-inf', now - retention, 'LIMIT', 0, limit)) do
  local rk = B .. 'run:' .. rid
  local v = redis.call('HMGET', rk, 'conversation_id', 'bot_id', 'workspace_id', 'thread_id')
  local scopes = { 'conversation', 'bot', 'workspace', 'thread' }
  for i = 1, 4 do
    if v[i] then redis.call('ZREM', B .. 'idx:' .. scopes[i] .. ':' .. v[i], rid) end
  end
  redis.call('ZREM', B .. 'runs', rid)
  redis.call('DEL', rk, rk .. ':events')
  redis.call('ZREM', K.finished, rid)
  purged = purged + 1
end
return { promoted, reclaimed, timed_out, purged }
