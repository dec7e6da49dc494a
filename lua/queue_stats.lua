-- queue_stats: what an operator asks first about one queue.
-- Read only, except that it drops runtimes whose pinned lane is empty from KEYS[8].
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- KEYS[8]     <P>:{Q}:pins  SET runtime ids that have a pinned lane
-- ARGV[1] key base   ARGV[2] how many lease holders to list (0 .. 1000)
-- Returns {queued, pinned, delayed, claimed, finished, oldest queued created_at ms
-- ('' if none), {run_id, runtime_id, lease_expires_at_ms}..., stats HGETALL, server time ms,
-- queued runs by runner HGETALL, running (directly executed, unfinished),
-- oldest running start ms ('' if none), dead (retained runs that died of expired leases),
-- runs waiting for a slot of their group, paused (1|0), paused groups}.
-- Cost O(groups with queued runs) beyond the rest.
-- The oldest queued run is the head of the lowest-id priority band; the walk
-- visits one entry per distinct priority, not every queued run.
local B = ARGV[1]
local holders_wanted = check_int('holders', ARGV[2], 0, 1000)
local oldest_id, oldest_rid
local function scan_bands(key)
  local min = '-inf'
  for _ = 1, 2001 do
    local head = redis.call('ZRANGEBYSCORE', key, min, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    if not head[1] then return end
    local score = tonumber(head[2])
    local band = math.floor(score / BAND)
    local id = score - band * BAND
    if not oldest_id or id < oldest_id then oldest_id = id; oldest_rid = head[1] end
    min = fmt((band + 1) * BAND)
  end
end
scan_bands(K.queued)
local pinned = 0
for _, rt in ipairs(redis.call('SMEMBERS', KEYS[8])) do
  local key = B .. 'pinned:' .. rt
  local n = redis.call('ZCARD', key)
  if n == 0 then redis.call('SREM', KEYS[8], rt) else pinned = pinned + n; scan_bands(key) end
end
local oldest = ''
if oldest_rid then oldest = redis.call('HGET', B .. 'run:' .. oldest_rid, 'created_at') or '' end
local holders = {}
if holders_wanted > 0 then
  local l = redis.call('ZRANGE', K.leases, 0, holders_wanted - 1, 'WITHSCORES')
  for i = 1, #l, 2 do
    holders[#holders + 1] = { l[i], redis.call('HGET', B .. 'run:' .. l[i], 'claimed_by_runtime_id') or '', l[i + 1] }
  end
end
-- Runs of groups at their limit wait outside `queued` (see groups in include/queue.lua).
local waiting = 0
for _, g in ipairs(redis.call('SMEMBERS', B .. 'groups')) do
  waiting = waiting + redis.call('ZCARD', B .. 'group:' .. g .. ':queued') - redis.call('ZCARD', B .. 'group:' .. g .. ':admitted')
end
local paused = redis.call('HGET', B .. 'meta', 'paused') == '1' and 1 or 0
local running = B .. 'running'
local first_running = redis.call('ZRANGE', running, '0', '0', 'WITHSCORES')
return { redis.call('ZCARD', K.queued), pinned, redis.call('ZCARD', K.delayed), redis.call('ZCARD', K.leases),
  redis.call('XLEN', K.finished), oldest, holders, redis.call('HGETALL', K.stats), now_ms(),
  redis.call('HGETALL', B .. 'runners'), redis.call('ZCARD', running), first_running[2] or '', redis.call('ZCARD', B .. 'dead'),
  waiting, paused, redis.call('SCARD', B .. 'paused-groups') }
