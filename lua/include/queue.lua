-- queue.lua: the queue machinery shared by the scripts that move runs:
-- lanes, wake-ups, finishing, requeueing, lease recovery. Prepended after
-- common.lua.
--
-- Queue scripts share one KEYS layout (all keys of one queue, one hash slot):
--   KEYS[1] <P>:{Q}:queued     ZSET unpinned queued runs, score = lane score
--   KEYS[2] <P>:{Q}:leases     ZSET claimed runs, score = lease expiry (ms)
--   KEYS[3] <P>:{Q}:delayed    ZSET queued runs not due yet, score = due time (ms)
--   KEYS[4] <P>:{Q}:deadlines  ZSET unfinished runs with a deadline, score = deadline (ms)
--   KEYS[5] <P>:{Q}:finished   STREAM finished runs in finish order, field r = run_id
--   KEYS[6] <P>:{Q}:stats      HASH cumulative counters
--   KEYS[7] <P>:{Q}:wake       LIST at most one wake-up token for blocked workers
-- ARGV[1] is always the queue's key base `<P>:{Q}:`. Keys that depend on a
-- run's stored fields (its hash, event stream, runner lane, pinned lane, list
-- indexes) are built from it inside the script: they carry the same hash tag,
-- so the script never leaves the queue's slot.

local K = {
  queued = KEYS[1], leases = KEYS[2], delayed = KEYS[3], deadlines = KEYS[4],
  finished = KEYS[5], stats = KEYS[6], wake = KEYS[7],
}

-- Run ids are clock * QUEUES + queue number (see create_run.lua); the clock
-- grows with creation within a queue and has at most 41 bits.
local QUEUES = 4096
local ID_EPOCH = 1767225600000 -- 2026-01-01T00:00:00Z in ms
local CLOCK_LIMIT = 2199023255552 -- 2^41

-- Lane score: priority descending, then creation order (the id's clock).
-- 2^42 clock values per priority band; priorities are bounded to [-1000,
-- 1000], so the largest score (2000 * 2^42 + 2^41) stays an exact double.
local BAND = 4398046511104

local function lane_score(priority, id)
  return (1000 - priority) * BAND + math.floor(id / QUEUES)
end

-- Runner lanes: a claim with a runner filter reads `runner:<r>` lanes, which
-- copy `queued` split by runner. They cost a sorted-set entry per queued run,
-- so a queue keeps them only while its queued runs have two or more runners
-- (then every runner with queued runs has a lane) and drops them when it
-- empties. `runners` (HASH runner_id -> runs in `queued`) tells which case
-- holds: one field and no lane for it = one runner, `queued` is its lane.
local function runner_lane(B, r)
  return B .. 'runner:' .. r
end

-- ZADD of {score, member, ...} entries, at most 500 pairs per call (unpack
-- has a limit).
local function zadd_entries(key, entries)
  for i = 1, #entries, 1000 do
    redis.call('ZADD', key, unpack(entries, i, math.min(i + 999, #entries)))
  end
end

-- Puts unpinned, due runs of runner r into `queued` (and its lane when the
-- queue keeps lanes). entries: {lane score, run_id, ...}.
local function queue_runs(B, r, entries)
  local n = #entries / 2
  local runners = B .. 'runners'
  local lane = runner_lane(B, r)
  local laned
  if redis.call('HINCRBY', runners, r, n) == n then
    local names = redis.call('HKEYS', runners)
    laned = #names > 1
    if #names == 2 then
      -- The second runner arrives: the first one's runs are all of `queued`
      -- (an empty `queued` stores nothing). Done once until the queue empties.
      local first = names[1] == r and names[2] or names[1]
      if redis.call('EXISTS', runner_lane(B, first)) == 0 then
        redis.call('ZUNIONSTORE', runner_lane(B, first), '1', K.queued)
      end
    end
  else
    laned = redis.call('EXISTS', lane) == 1
  end
  if laned then zadd_entries(lane, entries) end
  zadd_entries(K.queued, entries)
end

-- Puts a queued run into the lane it is claimed from.
local function lane_add(B, rid, h)
  local score = lane_score(tonumber(h.priority), tonumber(h.id))
  if h.requested_runtime_id then
    redis.call('ZADD', B .. 'pinned:' .. h.requested_runtime_id, score, rid)
    redis.call('SADD', B .. 'pins', h.requested_runtime_id)
  else
    queue_runs(B, h.runner_id, { score, rid })
  end
end

-- Counts a run out of `queued` for its runner (after it left `queued`).
local function runner_left(B, r, rid)
  if redis.call('HINCRBY', B .. 'runners', r, '-1') <= 0 then redis.call('HDEL', B .. 'runners', r) end
  redis.call('ZREM', runner_lane(B, r), rid)
end

local function lane_remove(B, rid, h)
  if h.requested_runtime_id then
    local lane = B .. 'pinned:' .. h.requested_runtime_id
    -- `pins` names only lanes that hold runs (the claim's wake-up test reads it).
    if redis.call('ZREM', lane, rid) == 1 and redis.call('EXISTS', lane) == 0 then
      redis.call('SREM', B .. 'pins', h.requested_runtime_id)
    end
  elseif redis.call('ZREM', K.queued, rid) == 1 then
    runner_left(B, h.runner_id, rid)
  end
end

-- Wake-up lists, each holding one token at most (see store/waiting.rs), so
-- that a token is taken only by a worker that can claim what it announces:
--   `wake`             workers without a runner filter;
--   `wake:runner:<r>`  workers filtering on runner r, pushed only while one
--                      listens (`listeners` HASH r -> until ms, written by them);
--   `wake:pin:<rt>`    runtime rt, for its pinned runs.
local LISTENED_TOKEN_MS = '60000'

local function push_token(key)
  if redis.call('LLEN', key) == 0 then
    redis.call('LPUSH', key, '1')
    return true
  end
  return false
end

-- Wakes one blocked worker without a runner filter.
local function wake()
  push_token(K.wake)
end

-- Wakes one worker filtering on runner r, if one listens.
local function wake_runner(B, r, now)
  local until_ms = tonumber(redis.call('HGET', B .. 'listeners', r) or '')
  if not until_ms then return end
  if until_ms <= now then
    redis.call('HDEL', B .. 'listeners', r)
    return
  end
  local key = B .. 'wake:runner:' .. r
  -- A token nobody takes (its listener left) goes away on its own.
  if push_token(key) then redis.call('PEXPIRE', key, LISTENED_TOKEN_MS) end
end

-- Wakes the runtime a run is pinned to.
local function wake_pin(B, runtime)
  push_token(B .. 'wake:pin:' .. runtime)
end

-- Wakes the workers that may claim run h, which just became claimable.
local function wake_for(B, h, now)
  if h.requested_runtime_id then
    wake_pin(B, h.requested_runtime_id)
  else
    wake()
    wake_runner(B, h.runner_id, now)
  end
end

-- Reads the fields the scripts route on; nil when the run does not exist.
local function route_fields(rk)
  local v = redis.call('HMGET', rk, 'id', 'status', 'priority', 'runner_id', 'requested_runtime_id',
    'claim_token', 'dispatch_attempts', 'max_attempts', 'deadline_at', 'not_before', 'started_at',
    'claim_lease_expires_at')
  if not v[1] then return nil end
  return {
    id = v[1], status = v[2], priority = v[3], runner_id = v[4], requested_runtime_id = v[5] or nil,
    claim_token = v[6] or nil, dispatch_attempts = tonumber(v[7] or '0'), max_attempts = tonumber(v[8] or '0'),
    deadline_at = tonumber(v[9] or ''), not_before = v[10] or nil, started_at = v[11] or nil,
    lease_expires = tonumber(v[12] or ''),
  }
end

-- Loads a run that must exist.
local function load_run(rk, rid)
  local h = route_fields(rk)
  if not h then fail('NOT_FOUND', 'run ' .. rid .. ' does not exist') end
  return h
end

local function clear_claim(rk)
  redis.call('HDEL', rk, 'claim_token', 'claimed_by_runtime_id', 'claim_lease_expires_at')
end

-- Moves a run to a terminal status: it leaves every queue, lease and
-- deadline index, gets finished_at, and expires after the retention period
-- (the reaper purges it and its index entries at retention; the TTL, one day
-- later, is the backstop when no reaper runs).
-- `extra`: more field/value pairs to set in the same HSET (may be nil).
local function finish(B, rid, h, status, reason, now, retention_ms, extra)
  local rk = B .. 'run:' .. rid
  if h.status == 'queued' then
    lane_remove(B, rid, h)
    redis.call('ZREM', K.delayed, rid)
  elseif h.status == 'claimed' then
    redis.call('ZREM', K.leases, rid)
    clear_claim(rk)
  elseif h.status == 'running' then
    redis.call('ZREM', B .. 'running', rid)
  end
  if h.deadline_at then redis.call('ZREM', K.deadlines, rid) end
  local now_s = fmt(now)
  local fields = { 'status', status, 'finished_at', now_s, 'updated_at', now_s }
  if reason and reason ~= '' then
    fields[#fields + 1] = 'status_reason'
    fields[#fields + 1] = reason
  end
  for _, v in ipairs(extra or {}) do fields[#fields + 1] = v end
  redis.call('HSET', rk, unpack(fields))
  -- The finished index is a stream in finish order (entry ids are the
  -- server's clock), which the reaper trims from the old end.
  redis.call('XADD', K.finished, '*', 'r', rid)
  redis.call('HINCRBY', K.stats, status, '1')
  local ttl = fmt(retention_ms + 86400000)
  redis.call('PEXPIRE', rk, ttl)
  -- A finished run's stream is complete: rewriting it drops the preallocated
  -- space of its last node (about 4 KB for a short stream down to its size).
  local sk = B .. 'events:' .. rid
  local blob = redis.call('DUMP', sk)
  if blob then redis.call('RESTORE', sk, ttl, blob, 'REPLACE') end
end

-- Puts a queued run where it belongs: the delayed set when not due, else its
-- lane, and wakes a worker then unless `no_wake` (a batch wakes once).
-- Returns whether the run is claimable now.
local function requeue(B, rid, h, now, no_wake)
  local due = tonumber(h.not_before or '')
  if due and due > now then
    redis.call('ZADD', K.delayed, due, rid)
    return false
  end
  lane_add(B, rid, h)
  if not no_wake then wake_for(B, h, now) end
  return true
end

-- Takes back claims whose lease expired before `now`, at most `limit`.
-- status 'queued' requeues them unless they used up max_attempts (then they
-- end `failed`, counted as dead); a terminal status finishes them.
-- Returns the run ids touched.
local function recover_expired(B, now, limit, status, reason, retention_ms)
  local ids = redis.call('ZRANGEBYSCORE', K.leases, '-inf', fmt(now), 'LIMIT', '0', limit)
  for _, rid in ipairs(ids) do
    local rk = B .. 'run:' .. rid
    local h = route_fields(rk)
    redis.call('ZREM', K.leases, rid)
    if h and h.status == 'claimed' then
      if TERMINAL[status] then
        finish(B, rid, h, status, reason, now, retention_ms)
      elseif h.max_attempts > 0 and h.dispatch_attempts >= h.max_attempts then
        finish(B, rid, h, 'failed', 'dead: lease expired after ' .. h.dispatch_attempts .. ' of ' ..
          h.max_attempts .. ' attempts', now, retention_ms)
        redis.call('HINCRBY', K.stats, 'dead', 1)
      else
        clear_claim(rk)
        redis.call('HSET', rk, 'status', 'queued', 'status_reason', reason, 'updated_at', now)
        redis.call('HINCRBY', K.stats, 'reclaimed', 1)
        h.status = 'queued'
        requeue(B, rid, h, now)
      end
    end
  end
  return ids
end

-- Moves due delayed runs into their lanes, at most `limit`.
local function promote_delayed(B, now, limit)
  local ids = redis.call('ZRANGEBYSCORE', K.delayed, '-inf', fmt(now), 'LIMIT', '0', limit)
  for _, rid in ipairs(ids) do
    redis.call('ZREM', K.delayed, rid)
    local h = route_fields(B .. 'run:' .. rid)
    if h and h.status == 'queued' then
      lane_add(B, rid, h)
      wake_for(B, h, now)
    end
  end
  return #ids
end
