-- claim_next_run: hand the next run of one queue to a runtime under a lease.
--
-- KEYS[1..7]  the queue keys (see include/common.lua)
-- ARGV[1]  key base <P>:{Q}:
-- ARGV[2]  runtime_id
-- ARGV[3]  lease length in ms (1 .. 86400000)
-- ARGV[4]  new claim token (chosen by the client, 32 hex chars)
-- ARGV[5]  retention of finished runs in ms (for runs that time out here)
-- ARGV[6..] runner_ids filter (none = any runner)
-- Returns {1, HGETALL..., last event sequence} with the claimed run (a
-- re-claimed run continues its event stream), or {0, next_due_ms} where
-- next_due_ms is the earliest time a delayed run or a lease falls due ('' if none).
--
-- Order is the seed's: priority descending, then creation order. Before
-- choosing, it promotes due delayed runs and takes back expired leases (at most
-- 100 each, so the work per call is bounded). Candidates are the heads of a few
-- sorted sets: the queue (or one lane per runner in the filter) and this
-- runtime's pinned lane, so the cost is O(log n) in the queue depth, times the
-- number of runner ids in the filter.
local B = ARGV[1]
local runtime = ARGV[2]
check_id('runtime_id', runtime)
local lease = check_int('lease ms', ARGV[3], 1, 86400000)
local token = ARGV[4]
if #token < 16 or #token > 64 then fail('INVALID', 'claim token must be 16..64 bytes') end
local retention = check_int('retention ms', ARGV[5], 0, 1e13)
local runners = {}
for i = 6, #ARGV do
  check_id('runner_id', ARGV[i])
  runners[#runners + 1] = ARGV[i]
end

local now = now_ms()
promote_delayed(B, now, 100)
recover_expired(B, now, 100, 'queued', 'claim lease expired', retention)

local wanted = {}
for _, r in ipairs(runners) do wanted[r] = true end
local pinned = B .. 'pinned:' .. runtime

-- Returns the best candidate {rid, score, lane}.
local function pick()
  local best
  local function consider(rid, score)
    score = tonumber(score)
    if not best or score < best[2] then best = { rid, score } end
  end
  if #runners == 0 then
    local head = redis.call('ZRANGE', K.queued, 0, 0, 'WITHSCORES')
    if head[1] then consider(head[1], head[2]) end
    head = redis.call('ZRANGE', pinned, 0, 0, 'WITHSCORES')
    if head[1] then consider(head[1], head[2]) end
  else
    for _, r in ipairs(runners) do
      local head = redis.call('ZRANGE', B .. 'runner:' .. r, 0, 0, 'WITHSCORES')
      if head[1] then consider(head[1], head[2]) end
    end
    -- Pinned runs of other runners are skipped; bounded so a claim stays cheap.
    local heads = redis.call('ZRANGE', pinned, 0, 49, 'WITHSCORES')
    for i = 1, #heads, 2 do
      if wanted[redis.call('HGET', B .. 'run:' .. heads[i], 'runner_id')] then
        consider(heads[i], heads[i + 1])
        break
      end
    end
  end
  return best
end

for _ = 1, 50 do
  local best = pick()
  if not best then break end
  local rid = best[1]
  local rk = B .. 'run:' .. rid
  local h = route_fields(rk)
  if not h then
    -- The hash vanished (deleted by hand): drop the dangling lane entries.
    redis.call('ZREM', K.queued, rid)
    redis.call('ZREM', pinned, rid)
    for _, r in ipairs(runners) do redis.call('ZREM', B .. 'runner:' .. r, rid) end
  elseif h.deadline_at and h.deadline_at <= now then
    finish(B, rid, h, 'timeout', 'deadline passed before the run was claimed', now, retention)
  else
    lane_remove(B, rid, h)
    local attempts = h.dispatch_attempts + 1
    local fields = { 'status', 'claimed', 'claimed_by_runtime_id', runtime, 'claim_token', token,
      'claim_lease_expires_at', now + lease, 'dispatch_attempts', attempts, 'last_claimed_at', now,
      'updated_at', now }
    if not h.started_at then
      fields[#fields + 1] = 'started_at'
      fields[#fields + 1] = now
    end
    redis.call('HSET', rk, unpack(fields))
    redis.call('ZADD', K.leases, now + lease, rid)
    -- Chain the wake-up: another idle worker can take the next run.
    if redis.call('ZCARD', K.queued) > 0 then wake() end
    local last = 0
    local top = redis.call('XREVRANGE', rk .. ':events', '+', '-', 'COUNT', 1)
    if top[1] then last = tonumber(string.match(top[1][1], '^(%d+)')) end
    return { 1, hgetall(rk), last }
  end
end

if redis.call('ZCARD', K.queued) == 0 then redis.call('DEL', K.wake) end
local due = ''
local d = redis.call('ZRANGE', K.delayed, 0, 0, 'WITHSCORES')
if d[2] then due = tonumber(d[2]) end
local l = redis.call('ZRANGE', K.leases, 0, 0, 'WITHSCORES')
if l[2] and (due == '' or tonumber(l[2]) < due) then due = tonumber(l[2]) end
return { 0, due == '' and '' or fmt(due) }
