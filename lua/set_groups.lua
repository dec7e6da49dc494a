-- set_groups: configure a queue's groups (see groups in include/queue.lua):
-- which run field names a run's group, how many runs of one group may be
-- claimed at once, and per-group limits.
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- ARGV[1] key base <P>:{Q}:
-- ARGV[2] group_by: conversation_id | thread_id | bot_id | workspace_id |
--         group_key, '' = the queue no longer groups, '-' = keep as it is
-- ARGV[3] default limit per group (1 .. 1000000), '' = keep
-- ARGV[4..] pairs: group, limit ('' = drop the group's own limit)
-- The setting holds for runs created from now on (a run's group is written
-- at create). Every group with queued runs is rebalanced at once: a raised
-- limit admits its next runs, a lowered one takes admitted runs back to the
-- group (claimed runs keep their leases), no grouping admits them all.
-- Cost O(groups with queued runs), an operator's call.
-- Returns {group_by, default limit, then group, limit pairs of the overrides}.
local B = ARGV[1]
local by = ARGV[2]
local BY = { conversation_id = true, thread_id = true, bot_id = true, workspace_id = true, group_key = true }
if by ~= '' and by ~= '-' and not BY[by] then
  fail('INVALID', "group_by must be conversation_id, thread_id, bot_id, workspace_id or group_key, got '" .. by .. "'")
end
local limit = ARGV[3] ~= '' and check_int('group limit', ARGV[3], 1, 1000000) or nil
if (#ARGV - 3) % 2 ~= 0 then fail('INVALID', 'per-group limits come as group, limit pairs') end
for i = 4, #ARGV, 2 do
  check_id('group', ARGV[i])
  if ARGV[i + 1] ~= '' then check_int('limit of group ' .. ARGV[i], ARGV[i + 1], 0, 1000000) end
end

local meta = B .. 'meta'
if by == '' then
  redis.call('HDEL', meta, 'group_by')
elseif by ~= '-' then
  redis.call('HSET', meta, 'group_by', by)
end
if limit then redis.call('HSET', meta, 'group_limit', fmt(limit)) end
for i = 4, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', B .. 'group-limits', ARGV[i])
  else
    redis.call('HSET', B .. 'group-limits', ARGV[i], ARGV[i + 1])
  end
end
-- A call that changes nothing (`queue show`) reads only.
if by ~= '-' or limit or #ARGV > 3 then
  local now = now_ms()
  for _, g in ipairs(redis.call('SMEMBERS', B .. 'groups')) do rebalance(B, g, now) end
end
local v = redis.call('HMGET', meta, 'group_by', 'group_limit')
local out = { v[1] or '', v[2] or '1' }
for _, x in ipairs(redis.call('HGETALL', B .. 'group-limits')) do out[#out + 1] = x end
return out
