-- release_pins: let any runtime claim the runs pinned to a runtime that is gone.
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- ARGV[1] key base   ARGV[2] runtime_id (its <P>:runtime:<id> key is absent:
--         the client checked, it lives in another slot)
-- ARGV[3] pin grace ms: only runs created longer ago are released, so a
--         runtime that has not registered yet keeps its new runs a while
-- ARGV[4] limit (1 .. 1000)
-- A pinned run waits for its runtime; default runtime ids are random per
-- process, so a runtime that is gone never comes back. Its runs lose the pin
-- (requested_runtime_id is cleared, status_reason says why) and join the
-- queue like any other run.
-- Returns the number of runs released.
local B = ARGV[1]
local runtime = ARGV[2]
check_id('runtime_id', runtime)
local grace = check_int('pin grace ms', ARGV[3], 0, 1e13)
local limit = check_int('limit', ARGV[4], 1, 1000)

local lane = B .. 'pinned:' .. runtime
local now = now_ms()
local released = 0
for _, rid in ipairs(redis.call('ZRANGE', lane, '0', fmt(limit - 1))) do
  local rk = B .. 'run:' .. rid
  local h = route_fields(rk)
  local created = tonumber(redis.call('HGET', rk, 'created_at') or '')
  if not h or h.status ~= 'queued' or h.requested_runtime_id ~= runtime then
    redis.call('ZREM', lane, rid)
  elseif created and created <= now - grace then
    redis.call('ZREM', lane, rid)
    -- An admitted run of a group is admitted again, into the shared lane.
    if h.group then redis.call('ZREM', group_key(B, h.group, 'admitted'), rid) end
    redis.call('HDEL', rk, 'requested_runtime_id')
    redis.call('HSET', rk, 'status_reason', 'pinned runtime ' .. runtime ..
      ' is gone; released to any runtime', 'updated_at', fmt(now))
    h.requested_runtime_id = nil
    requeue(B, rid, h, now)
    released = released + 1
  end
end
if redis.call('EXISTS', lane) == 0 then
  redis.call('SREM', B .. 'pins', runtime)
  pins_left(B)
  redis.call('DEL', B .. 'wake:pin:' .. runtime)
end
return released
