-- reap: one housekeeping pass over a queue.
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- ARGV[1] key base
-- ARGV[2] now in epoch ms ('' = the server's clock)
-- ARGV[3] limit per kind of work (1 .. 1000)
-- ARGV[4] retention ms
-- ARGV[5] publish command for cancel notices (SPUBLISH | PUBLISH, see request_cancel.lua)
-- ARGV[6] running timeout ms ('' = none): `running` runs (executed directly,
--         not claimed) started longer ago end `timeout`, since no lease tells
--         whether their host is still alive
-- Does, each at most `limit` times: promote due delayed runs; take back
-- expired leases (dead-lettering runs out of attempts); time out runs past
-- their deadline, and running runs past the running timeout; purge runs
-- finished longer ago than the retention, with their events and list-index
-- entries (purge_finished in include/queue.lua).
-- Returns {promoted, reclaimed, timed_out, purged, run ids purged...}: the
-- client drops the purged runs' locators (another slot on a cluster).
local B = ARGV[1]
local now = check_opt_int('now', ARGV[2], 0, 1e15)
local limit = check_int('limit', ARGV[3], 1, 1000)
local retention = check_int('retention ms', ARGV[4], 0, 1e13)
local publish = check_publish(ARGV[5])
local running_timeout = check_opt_int('running timeout ms', ARGV[6] or '', 1, 1e13)
now = now or now_ms()

local promoted = promote_delayed(B, now, limit)
local reclaimed = #recover_expired(B, now, limit, 'queued', 'claim lease expired')

local timed_out = 0
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', K.deadlines, '-inf', now, 'LIMIT', 0, limit)) do
  local h = route_fields(B .. 'run:' .. rid)
  if h and not TERMINAL[h.status] then
    -- Notice first, as in request_cancel.lua: a refused PUBLISH writes nothing.
    if h.status == 'claimed' then redis.call(publish, B .. 'cancel', rid) end
    finish(B, rid, h, 'timeout', 'deadline passed', now)
    timed_out = timed_out + 1
  else
    redis.call('ZREM', K.deadlines, rid)
  end
end

if running_timeout then
  local since = fmt(now - running_timeout)
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', B .. 'running', '-inf', since, 'LIMIT', 0, limit)) do
    local h = route_fields(B .. 'run:' .. rid)
    if h and h.status == 'running' then
      finish(B, rid, h, 'timeout', 'running for longer than ' .. fmt(running_timeout / 1000) ..
        ' s without being finished (running timeout)', now)
      timed_out = timed_out + 1
    else
      redis.call('ZREM', B .. 'running', rid)
    end
  end
end

local purged_ids = purge_finished(B, now, retention, limit)
local out = { promoted, reclaimed, timed_out, #purged_ids }
for _, rid in ipairs(purged_ids) do out[#out + 1] = rid end
return out
