-- set_limits: configure a queue's rate limits and caps (see Limits in
-- include/queue.lua).
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- ARGV[1] key base <P>:{Q}:
-- ARGV[2] rate limit: claims of the queue per window (1 .. 1000000000), '0' = none, '' = keep
-- ARGV[3] its window in ms (1 .. 86400000), '' = keep (1000 when none is set)
-- ARGV[4] group rate limit: claims of one group per window, as ARGV[2]
-- ARGV[5] its window in ms, as ARGV[3]
-- ARGV[6] cap: queued runs in the queue (1 .. 1000000000), '0' = none, '' = keep
-- ARGV[7] group cap: queued runs of one group, as ARGV[6]
-- ARGV[8] workspace cap: queued runs of one workspace, as ARGV[6]
-- ARGV[9] k: how many per-group rate limits follow (0 .. 1000)
-- ARGV[10 .. 9+3k] triples: group, claims per window (0 .. 1000000000; 0
--         holds the group) or '' (drop its own), window ms (1 .. 86400000)
-- ARGV[10+3k ..] pairs: group, cap (0 .. 1000000000; 0 takes no new queued
--         run of it) or '' (drop its own)
-- A group's own rate limit or cap takes the place of the queue's
-- (group_rate, group_cap) for that group, set or not (see Limits in
-- include/queue.lua); a group whose own rate limit changed is rebalanced.
-- A rate limit holds from the next claim on; a window under way keeps its
-- count. A cap refuses creates from now on (runs queued past a new, lower
-- cap stay). Setting a first cap counts the queued runs once: O(queued runs),
-- an operator's call; while a cap is set every move in or out of `queued`
-- keeps the counts. A call that changes nothing (`queue show`) reads only.
-- Returns {rate limit, window, group rate limit, group window, cap, group
-- cap, workspace cap, {group, 'N/MS', ...}, {group, cap, ...}}, '' for each
-- one not set, then the groups' own rate limits and caps.
local B = ARGV[1]
local function limit_arg(name, v)
  if v == nil then fail('INVALID', name .. ' is missing') end
  if v == '' then return nil end
  return check_int(name, v, 0, 1000000000)
end
local function window_arg(name, v)
  if v == nil then fail('INVALID', name .. ' is missing') end
  if v == '' then return nil end
  return check_int(name, v, 1, 86400000)
end
local rate, window = limit_arg('rate limit', ARGV[2]), window_arg('rate window', ARGV[3])
local group_rate, group_window = limit_arg('group rate limit', ARGV[4]), window_arg('group rate window', ARGV[5])
local caps = { cap = limit_arg('cap', ARGV[6]), group_cap = limit_arg('group cap', ARGV[7]),
  workspace_cap = limit_arg('workspace cap', ARGV[8]) }
local k = check_int('number of group rate limits', ARGV[9], 0, 1000)
local cap_at = 10 + 3 * k
if #ARGV < cap_at - 1 or (#ARGV - cap_at + 1) % 2 ~= 0 then
  fail('INVALID', 'group rate limits come as group, limit, window triples, then caps as group, cap pairs')
end
-- {group, 'N/MS' or false (drop)} and {group, 'N' or false}.
local own_rates, own_caps = {}, {}
for i = 10, cap_at - 1, 3 do
  check_id('group', ARGV[i])
  local v = false
  if ARGV[i + 1] ~= '' then
    local max = check_int('rate limit of group ' .. ARGV[i], ARGV[i + 1], 0, 1000000000)
    v = fmt(max) .. '/' .. fmt(check_int('rate window of group ' .. ARGV[i], ARGV[i + 2], 1, 86400000))
  end
  own_rates[#own_rates + 1] = { ARGV[i], v }
end
for i = cap_at, #ARGV, 2 do
  check_id('group', ARGV[i])
  local v = false
  if ARGV[i + 1] ~= '' then v = fmt(check_int('cap of group ' .. ARGV[i], ARGV[i + 1], 0, 1000000000)) end
  own_caps[#own_caps + 1] = { ARGV[i], v }
end

local meta = B .. 'meta'
local FIELDS = { 'rate_limit', 'rate_window', 'group_rate', 'group_rate_window', 'cap', 'group_cap', 'workspace_cap',
  'group_rate_overrides', 'group_cap_overrides' }
local RATES, CAPS = B .. 'group-rate-limits', B .. 'group-caps'
local function current()
  return redis.call('HMGET', meta, unpack(FIELDS))
end
local before = current()
local changes = {}
local function want(field, v)
  if v ~= nil then changes[field] = v end
end
want('rate_limit', rate)
want('rate_window', window or (rate and rate > 0 and not before[2] and 1000) or nil)
want('group_rate', group_rate)
want('group_rate_window', group_window or (group_rate and group_rate > 0 and not before[4] and 1000) or nil)
for field, v in pairs(caps) do want(field, v) end

-- What the call returns: the settings as stored now.
local function reply(v)
  local out = {}
  for i = 1, 7 do out[i] = v[i] or '' end
  out[8] = redis.call('HGETALL', RATES)
  out[9] = redis.call('HGETALL', CAPS)
  return out
end

local changed = false
for i, field in ipairs(FIELDS) do
  local v = changes[field]
  if v ~= nil then
    -- A limit of 0 is no limit; a window stays with its limit gone (harmless).
    local stored = fmt(v)
    if v == 0 and not string.find(field, 'window') then stored = nil end
    if stored ~= before[i] then
      changed = true
      if stored then redis.call('HSET', meta, field, stored) else redis.call('HDEL', meta, field) end
    end
  end
end
-- The groups' own limits; the groups whose own rate limit changed.
local rated = {}
local function set_own(key, entries, on_change)
  for _, e in ipairs(entries) do
    local g, v = e[1], e[2]
    if v ~= (redis.call('HGET', key, g) or false) then
      changed = true
      if v then redis.call('HSET', key, g, v) else redis.call('HDEL', key, g) end
      if on_change then on_change(g) end
    end
  end
end
set_own(RATES, own_rates, function(g) rated[#rated + 1] = g end)
set_own(CAPS, own_caps)
if not changed then return reply(before) end
-- The marks that tell the hot path to read the groups' own limits.
for field, key in pairs({ group_rate_overrides = RATES, group_cap_overrides = CAPS }) do
  if redis.call('EXISTS', key) == 1 then redis.call('HSET', meta, field, '1') else redis.call('HDEL', meta, field) end
end

local after = current()
local any = after[1] or after[3] or after[5] or after[6] or after[7] or after[8] or after[9]
if any then
  redis.call('HSET', meta, 'limits', '1')
  redis.call('HSET', B .. 'hints', 'limits', '1')
else
  redis.call('HDEL', meta, 'limits')
  redis.call('HDEL', B .. 'hints', 'limits')
end

-- Counting queued runs starts with the first cap and stops with the last.
local counted_before = before[5] or before[6] or before[7] or before[9]
local counted_after = after[5] or after[6] or after[7] or after[9]
local count_key = B .. 'queued-count'
if counted_after and not counted_before then
  redis.call('DEL', count_key)
  local seen, counts, order = {}, {}, {}
  local function visit(rid)
    if seen[rid] then return end
    seen[rid] = true
    local v = redis.call('HMGET', B .. 'run:' .. rid, 'status', 'group', 'workspace_id')
    if v[1] == 'queued' then tally_queued(counts, order, v[2], v[3]) end
  end
  -- Every queued run is in one of these: the claim lane (runner lanes are
  -- copies of it), the delayed set, a pinned lane, or its group's waiting set.
  local sources = { K.queued, K.delayed }
  for _, runtime in ipairs(redis.call('SMEMBERS', B .. 'pins')) do sources[#sources + 1] = B .. 'pinned:' .. runtime end
  for _, g in ipairs(redis.call('SMEMBERS', B .. 'groups')) do sources[#sources + 1] = group_key(B, g, 'queued') end
  for _, key in ipairs(sources) do
    for _, rid in ipairs(redis.call('ZRANGE', key, '0', '-1')) do visit(rid) end
  end
  for _, field in ipairs(order) do redis.call('HSET', count_key, field, counts[field]) end
elseif counted_before and not counted_after then
  redis.call('DEL', count_key)
end

local now = now_ms()
if not after[1] and before[1] then
  redis.call('DEL', B .. 'rate')
  if redis.call('ZCARD', K.queued) > 0 then wake() end
end
-- A group rate limit set, changed or dropped: every waiting group is
-- rebalanced by it now; a group's own: that group.
if not after[3] and not after[8] then redis.call('DEL', B .. 'group-rates') end
if after[3] ~= before[3] or after[4] ~= before[4] then
  for _, g in ipairs(redis.call('SMEMBERS', B .. 'groups')) do rebalance(B, g, now) end
else
  for _, g in ipairs(rated) do
    if redis.call('SISMEMBER', B .. 'groups', g) == 1 then rebalance(B, g, now) end
  end
end
return reply(after)
