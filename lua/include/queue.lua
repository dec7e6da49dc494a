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

-- Bound to this call's KEYS by bind_call (below).
local K = {}

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

-- Runner lanes: `runners` (HASH runner_id -> runs in `queued`) counts the
-- runs of `queued` by runner, always. A queue whose queued runs have one
-- runner keeps no lane: `queued` is that runner's lane (meta `lanes` '0').
-- When a second runner's run arrives, every runner gets a lane
-- `runner:<r>` (same scores; the first one's is a copy of `queued`), kept
-- until `queued` is empty again (meta `lanes` '1'). A claim with a runner
-- filter reads the heads of the lanes it names; the unfiltered claim reads
-- `queued`. A run leaves `queued` and its lane together.
local function runner_lane(B, r)
  return B .. 'runner:' .. r
end

-- This call's reading of meta `lanes`: '1' (a lane per runner) or '0' (none).
local lanes_mode

-- Hints: `<P>:{Q}:hints` HASH, a cache that lets a claim skip reads that
-- would find nothing (its fields are lower bounds, never promises):
--   next_due  ms: no delayed run falls due and no lease expires before it;
--             every ZADD to `delayed` or `leases` keeps it so (lower_next_due)
--   pinned    '0' while no pinned lane holds runs ('1': one may)
--   lanes     a copy of meta `lanes` (see runner_lane)
-- A missing hash or field means unknown: the next claim probes and rebuilds
-- it. A claim looks at most HINT_MS ahead, so even an entry added by hand
-- waits no longer than that.
local HINT_MS = 1000

-- next_due as this call last read or wrote it (nil: not read yet, false: unknown).
local hinted_due

-- The queue's rate limits and caps as this call read them (see read_limits;
-- nil: not read yet, false: the queue has none).
local limits_read

-- Binds the queue keys of this call and forgets what an earlier call read.
-- A script runs it once as it starts; the Functions library (which defines
-- these locals once, see src/scripts.rs) runs it at the start of every call.
local function bind_call()
  K.queued, K.leases, K.delayed, K.deadlines = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  K.finished, K.stats, K.wake = KEYS[5], KEYS[6], KEYS[7]
  hinted_due = nil
  lanes_mode = nil
  limits_read = nil
end
bind_call()

-- Keeps next_due at or below t (a run delayed until t, a lease ending at t).
local function lower_next_due(B, t)
  if hinted_due == nil then
    hinted_due = tonumber(redis.call('HGET', B .. 'hints', 'next_due') or '') or false
  end
  if hinted_due and t < hinted_due then
    redis.call('HSET', B .. 'hints', 'next_due', fmt(t))
    hinted_due = t
  end
end

-- After a runtime left `pins`: the pinned hint drops when no lane is left.
local function pins_left(B)
  if redis.call('EXISTS', B .. 'pins') == 0 then redis.call('HSET', B .. 'hints', 'pinned', '0') end
end

-- ZADD of {score, member, ...} entries, at most 500 pairs per call (unpack
-- has a limit).
local function zadd_entries(key, entries)
  for i = 1, #entries, 1000 do
    redis.call('ZADD', key, unpack(entries, i, math.min(i + 999, #entries)))
  end
end

local function set_lanes(B, mode)
  redis.call('HSET', B .. 'meta', 'lanes', mode)
  redis.call('HSET', B .. 'hints', 'lanes', mode)
  lanes_mode = mode
end

-- True while the queue keeps a lane per runner. A queue an earlier build
-- wrote without the mark kept lanes only with two or more runners (as now);
-- one of the build before this one ('1') kept them always, which holds too.
local function shared_lanes(B)
  if lanes_mode == nil then
    local mode = redis.call('HGET', B .. 'meta', 'lanes')
    if mode ~= '0' and mode ~= '1' then
      mode = redis.call('HLEN', B .. 'runners') > 1 and '1' or '0'
      set_lanes(B, mode)
    end
    lanes_mode = mode
  end
  return lanes_mode == '1'
end

-- The lane runner r's runs are claimed from: its own, or `queued` while it
-- is the queue's one runner (nil when r has no queued run).
local function lane_of(B, r)
  if shared_lanes(B) then return runner_lane(B, r) end
  if redis.call('HGET', B .. 'runners', r) then return K.queued end
  return nil
end

-- Puts unpinned, due runs of runner r into `queued` (and r's lane).
-- entries: {lane score, run_id, ...}.
local function queue_runs(B, r, entries)
  local n = #entries / 2
  local count = redis.call('HINCRBY', B .. 'runners', r, n)
  if count == n and not shared_lanes(B) and redis.call('HLEN', B .. 'runners') > 1 then
    -- A second runner: the first one's lane is `queued` as it is now.
    for _, other in ipairs(redis.call('HKEYS', B .. 'runners')) do
      if other ~= r then redis.call('ZUNIONSTORE', runner_lane(B, other), '1', K.queued) end
    end
    set_lanes(B, '1')
  end
  if shared_lanes(B) then zadd_entries(runner_lane(B, r), entries) end
  zadd_entries(K.queued, entries)
end

-- Puts a queued run into the lane it is claimed from.
local function lane_add(B, rid, h)
  local score = lane_score(tonumber(h.priority), tonumber(h.id))
  if h.requested_runtime_id then
    redis.call('ZADD', B .. 'pinned:' .. h.requested_runtime_id, score, rid)
    if redis.call('SADD', B .. 'pins', h.requested_runtime_id) == 1 then
      redis.call('HSET', B .. 'hints', 'pinned', '1')
    end
  else
    queue_runs(B, h.runner_id, { score, rid })
  end
end

-- Counts a run out of `queued` for its runner (after it left `queued`).
-- The last run out of a queue that kept lanes ends them (they are all empty).
local function runner_left(B, r, rid)
  local gone = redis.call('HINCRBY', B .. 'runners', r, '-1') <= 0
  if gone then redis.call('HDEL', B .. 'runners', r) end
  if shared_lanes(B) then
    redis.call('ZREM', runner_lane(B, r), rid)
    if gone and redis.call('EXISTS', B .. 'runners') == 0 then set_lanes(B, '0') end
  end
end

local function lane_remove(B, rid, h)
  if h.requested_runtime_id then
    local lane = B .. 'pinned:' .. h.requested_runtime_id
    -- `pins` names only lanes that hold runs (the claim's wake-up test reads it).
    if redis.call('ZREM', lane, rid) == 1 and redis.call('EXISTS', lane) == 0 then
      redis.call('SREM', B .. 'pins', h.requested_runtime_id)
      pins_left(B)
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
    'claim_lease_expires_at', 'claimed_by_runtime_id', 'group', 'workspace_id', 'metadata', 'usage', 'cost')
  if not v[1] then return nil end
  check_stored(rk, v[2], v[12])
  if not string.find(v[1], '^%d+$') then corrupt(rk, 'id', v[1]) end
  if not tonumber(v[3] or '') then corrupt(rk, 'priority', v[3]) end
  if not v[4] then corrupt(rk, 'runner_id', v[4]) end
  if v[7] and not string.find(v[7], '^%d+$') then corrupt(rk, 'dispatch_attempts', v[7]) end
  if v[8] and not string.find(v[8], '^%d+$') then corrupt(rk, 'max_attempts', v[8]) end
  if v[9] and not tonumber(v[9]) then corrupt(rk, 'deadline_at', v[9]) end
  return {
    id = v[1], status = v[2], priority = v[3], runner_id = v[4], requested_runtime_id = v[5] or nil,
    claim_token = v[6] or nil, dispatch_attempts = tonumber(v[7] or '0'), max_attempts = tonumber(v[8] or '0'),
    deadline_at = tonumber(v[9] or ''), not_before = v[10] or nil, started_at = v[11] or nil,
    lease_expires = tonumber(v[12] or ''), holder = v[13] or nil, group = v[14] or nil,
    workspace = v[15] or nil,
    -- The documents a finish may rewrite, as stored (see doc_value).
    stored = { metadata = v[16] or '', usage = v[17] or '', cost = v[18] or '' },
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

-- Groups: a queue may allow at most `limit` runs of one group (a run field or
-- an explicit group_key, named by meta `group_by`; the run's value is its
-- `group` field, written at create) to be claimed at once. Per group g:
--   group:<g>:queued    ZSET every queued, due run of g (lane scores)
--   group:<g>:admitted  ZSET those of them now in their claim lane
--   group:<g>:active    ZSET claimed runs of g, score = lease expiry (ms)
--   groups              SET the groups that have queued runs
--   group-limits        HASH g -> limit (overrides meta `group_limit`)
--   paused-groups       SET groups whose runs are not admitted
-- A run waits in its group's ZSET and enters its claim lane (`queued`, a
-- runner lane or a pinned lane) only while the group has a free slot: at
-- most limit - (leases of g still running by the server's clock) of its best
-- runs are admitted. So the claim itself is the same O(log n) pick as for
-- any queue: runs of a group at its limit are not in the lanes, and never
-- block, delay or cost the runs of other groups. The active count is read
-- from the lease expiries, so a crashed worker's slot frees when its lease
-- ends (the claim that takes the lease back admits the next run), and a
-- purged or deleted run can never hold a slot past its lease.
local function group_key(B, g, what)
  return B .. 'group:' .. g .. ':' .. what
end

-- The limit of group g now (0 while it or its queue is paused; huge when the
-- queue no longer groups, so that its waiting runs are all admitted), and
-- the claims its rate limit still allows in its window (nil: no rate limit).
local group_rate_of -- defined with the limits, below

local function group_limit(B, g)
  local meta = redis.call('HMGET', B .. 'meta', 'group_by', 'group_limit', 'group_rate', 'group_rate_overrides')
  if not meta[1] or meta[1] == '' then return 1e9 end
  if redis.call('SISMEMBER', B .. 'paused-groups', g) == 1 then return 0 end
  local own = redis.call('HGET', B .. 'group-limits', g)
  local limit = tonumber(own or '') or tonumber(meta[2] or '') or 1
  local rate = group_rate_of(B, g, tonumber(meta[3] or ''), nil, meta[4] == '1')
  if rate then rate = rate - tonumber(redis.call('GET', group_key(B, g, 'rate')) or '0') end
  return limit, rate
end

-- Admits the best runs of group g while it has free slots (and, with a
-- group rate limit, claims left in its window: see count_claim), and takes
-- back admitted runs past them (a better run arrived, the limit dropped, the
-- group was paused). Cost O(limit log n).
local function rebalance(B, g, now)
  local limit, rate_left = group_limit(B, g)
  local queued = group_key(B, g, 'queued')
  local admitted = group_key(B, g, 'admitted')
  local active = redis.call('ZCOUNT', group_key(B, g, 'active'), '(' .. fmt(now), '+inf')
  local free = math.min(limit - active, 1000)
  if rate_left then free = math.min(free, rate_left) end
  local want = {}
  if free > 0 then
    local best = redis.call('ZRANGE', queued, '0', fmt(free - 1), 'WITHSCORES')
    for i = 1, #best, 2 do want[best[i]] = best[i + 1] end
  end
  for _, rid in ipairs(redis.call('ZRANGE', admitted, '0', '-1')) do
    if want[rid] then
      want[rid] = nil
    else
      redis.call('ZREM', admitted, rid)
      local h = route_fields(B .. 'run:' .. rid)
      if h then lane_remove(B, rid, h) end
    end
  end
  for rid, score in pairs(want) do
    local h = route_fields(B .. 'run:' .. rid)
    if h and h.status == 'queued' then
      redis.call('ZADD', admitted, score, rid)
      lane_add(B, rid, h)
      wake_for(B, h, now)
    else
      redis.call('ZREM', queued, rid)
    end
  end
  if redis.call('EXISTS', queued) == 0 then redis.call('SREM', B .. 'groups', g) end
end

-- A queued, due run of a group joins it (and its lane once admitted).
local function group_add(B, rid, h, now)
  local score = lane_score(tonumber(h.priority), tonumber(h.id))
  redis.call('ZADD', group_key(B, h.group, 'queued'), score, rid)
  redis.call('SADD', B .. 'groups', h.group)
  rebalance(B, h.group, now)
end

-- A queued run of a group leaves it (and its lane when it was admitted).
-- `claimed`: it leaves because a claim took it (its slot moves to active).
local function group_remove(B, rid, h)
  redis.call('ZREM', group_key(B, h.group, 'queued'), rid)
  if redis.call('ZREM', group_key(B, h.group, 'admitted'), rid) == 1 then lane_remove(B, rid, h) end
end

-- A claimed run of a group no longer holds a slot (released, finished, taken back).
local function group_lease_ended(B, rid, h)
  redis.call('ZREM', group_key(B, h.group, 'active'), rid)
end

-- Limits: rate limits and caps of a queue (set_limits.lua), in meta:
--   rate_limit, rate_window   at most rate_limit claims per window (ms)
--   group_rate, group_rate_window   the same for each group
--   cap, group_cap, workspace_cap   at most so many queued runs in the
--             queue, in one group, of one workspace (create refuses more)
--   group_rate_overrides, group_cap_overrides   '1' while the hashes
--             below hold an entry, so a queue without overrides reads neither
--   limits    '1' while any is set; copied to the hints that every claim
--             reads, so a queue without limits reads nothing more
-- Keys:
--   rate             STRING claims in the queue's window; expires at its end
--   group:<g>:rate   STRING the same for group g
--   group-rate-limits  HASH g -> 'N/MS': group g's own rate limit (N claims
--                    per MS ms; N = 0 holds the group), in place of group_rate
--   group-caps       HASH g -> N: group g's own cap (0: it takes no new
--                    queued run), in place of group_cap
--   group-rates      ZSET groups whose window ends, score = its end (ms): the
--                    claim that finds it due rebalances them (see due_work)
--   queued-count     HASH while a cap is set: queued runs ('queue'), of a
--                    group ('g:<g>'), of a workspace ('w:<w>'); set_limits
--                    counts them once when a first cap is set
-- Windows are fixed: the first claim starts one, for rate_window ms.

-- The queue's limits (see above), once per call; false when it has none.
local function read_limits(B)
  if limits_read == nil then
    local v = redis.call('HMGET', B .. 'meta', 'limits', 'rate_limit', 'rate_window', 'group_rate',
      'group_rate_window', 'cap', 'group_cap', 'workspace_cap', 'group_rate_overrides', 'group_cap_overrides')
    if v[1] ~= '1' then
      limits_read = false
    else
      limits_read = {
        rate = tonumber(v[2] or ''), window = tonumber(v[3] or ''), group_rate = tonumber(v[4] or ''),
        group_window = tonumber(v[5] or ''), cap = tonumber(v[6] or ''), group_cap = tonumber(v[7] or ''),
        workspace_cap = tonumber(v[8] or ''), rate_own = v[9] == '1', cap_own = v[10] == '1',
      }
      limits_read.counted = limits_read.cap or limits_read.group_cap or limits_read.workspace_cap
        or limits_read.cap_own
      -- Some group has a rate limit: the queue's for every group, or one's own.
      limits_read.group_rated = limits_read.group_rate or limits_read.rate_own
    end
  end
  return limits_read
end

-- The rate limit of group g: claims per window (ms), its own when `own`
-- (the queue has overrides) and it has one, else the queue's `base` per
-- `window`; nil when neither is set.
group_rate_of = function(B, g, base, window, own)
  if own then
    local v = redis.call('HGET', B .. 'group-rate-limits', g)
    if v then
      local max, ms = string.match(v, '^(%d+)/(%d+)$')
      if not max then corrupt(B .. 'group-rate-limits', g, v) end
      return tonumber(max), tonumber(ms)
    end
  end
  return base, window
end

-- The fields of queued-count that a queued run with group g and workspace
-- w counts in.
local function count_fields(g, w)
  local fields = { 'queue' }
  if g and g ~= '' then fields[#fields + 1] = 'g:' .. g end
  if w and w ~= '' then fields[#fields + 1] = 'w:' .. w end
  return fields
end

-- Adds one run with group g and workspace w to `counts` (field -> runs),
-- `order` keeping the fields in the order first met.
local function tally_queued(counts, order, g, w)
  for _, field in ipairs(count_fields(g, w)) do
    if not counts[field] then
      counts[field] = 0
      order[#order + 1] = field
    end
    counts[field] = counts[field] + 1
  end
end

-- Counts run h in (delta 1) or out (-1) of the queued runs, while a cap is set.
local function count_queued(B, h, delta)
  local L = read_limits(B)
  if not (L and L.counted) then return end
  local key = B .. 'queued-count'
  for _, field in ipairs(count_fields(h.group, h.workspace)) do
    if redis.call('HINCRBY', key, field, delta) <= 0 then redis.call('HDEL', key, field) end
  end
end

-- Adds one claim to a rate window (key k, window ms), starting the window
-- with the first. Returns the claims in the window and, when this one
-- started it, its end.
local function count_claim(k, window, now)
  local n = redis.call('INCR', k)
  if n == 1 then
    redis.call('PEXPIRE', k, fmt(window))
    return n, now + window
  end
  return n
end

-- A claim of run h counts in the rate windows (a group's first claim in a
-- window schedules the group's rebalance at its end) and leaves the queued
-- count. Returns true when the queue's window is full now.
local function claimed_limits(B, h, now)
  local L = read_limits(B)
  if not L then return false end
  count_queued(B, h, -1)
  if h.group and L.group_rated then
    local max, window = group_rate_of(B, h.group, L.group_rate, L.group_window, L.rate_own)
    if max and window then
      local _, ends = count_claim(group_key(B, h.group, 'rate'), window, now)
      if ends then
        redis.call('ZADD', B .. 'group-rates', fmt(ends), h.group)
        lower_next_due(B, ends)
      end
    end
  end
  if L.rate then return count_claim(B .. 'rate', L.window, now) >= L.rate end
  return false
end

-- When a claim of the queue is allowed again (ms), or nil when it is now.
local function rate_refused(B, now)
  local L = read_limits(B)
  if not (L and L.rate) then return nil end
  local k = B .. 'rate'
  if tonumber(redis.call('GET', k) or '0') < L.rate then return nil end
  local left = redis.call('PTTL', k)
  -- A window without an end (set by hand) would hold the queue for good.
  if left < 0 then
    redis.call('PEXPIRE', k, fmt(L.window))
    left = L.window
  end
  return now + left
end

-- Rebalances the groups whose rate window ended (at most 100 per call).
local function rearm_groups(B, now)
  local key = B .. 'group-rates'
  for _, g in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', fmt(now), 'LIMIT', '0', '100')) do
    redis.call('ZREM', key, g)
    rebalance(B, g, now)
  end
end

-- Events a finish compacts (see finish); runs purged by each finalize.
local COMPACT_EVENTS = 1000
local PURGE_PER_FINISH = 2

-- Moves a run to a terminal status: it leaves every queue, lease and
-- deadline index, gets finished_at, and enters the finished stream, whose
-- old end purge_finished trims at the retention. No TTL: a run expiring on
-- its own would leave its list-index entries behind for good (they are
-- found through the hash), so runs go only with a purge that removes them all.
-- `extra`: more field/value pairs to set in the same HSET (may be nil).
local function finish(B, rid, h, status, reason, now, extra)
  local rk = B .. 'run:' .. rid
  -- Whether the run keeps an updated_at of its own (only a claimed run's goes).
  local touched = true
  if h.status == 'queued' then
    if h.group then group_remove(B, rid, h) else lane_remove(B, rid, h) end
    redis.call('ZREM', K.delayed, rid)
    count_queued(B, h, -1)
  elseif h.status == 'claimed' then
    redis.call('ZREM', K.leases, rid)
    if h.group then group_lease_ended(B, rid, h) end
    -- The claim's receipt goes with the claim: its claimer has the run, or
    -- has lost it; either way no resend of that claim may get it back.
    if h.claim_token then redis.call('DEL', receipt_key(B, h.claim_token)) end
    -- updated_at goes too: a finished run's is its finished_at (readers take it).
    redis.call('HDEL', rk, 'claim_token', 'claimed_by_runtime_id', 'claim_lease_expires_at', 'updated_at')
    touched = false
  elseif h.status == 'running' then
    redis.call('ZREM', B .. 'running', rid)
  end
  if h.deadline_at then redis.call('ZREM', K.deadlines, rid) end
  local now_s = fmt(now)
  local fields = { 'status', status, 'finished_at', now_s }
  if touched then
    fields[#fields + 1] = 'updated_at'
    fields[#fields + 1] = now_s
  end
  if reason and reason ~= '' then
    fields[#fields + 1] = 'status_reason'
    fields[#fields + 1] = reason
  end
  for _, v in ipairs(extra or {}) do fields[#fields + 1] = v end
  redis.call('HSET', rk, unpack(fields))
  -- The finished index is a stream in finish order (entry ids are the
  -- server's clock), which purge_finished trims from the old end.
  redis.call('XADD', K.finished, '*', 'r', rid)
  redis.call('HINCRBY', K.stats, status, '1')
  -- Its slot, or its place among the admitted, goes to the group's next run.
  if h.group and (h.status == 'queued' or h.status == 'claimed') then rebalance(B, h.group, now) end
  -- A finished run's stream is complete: a copy drops the preallocated
  -- space of its last node (about 4 KB for a short stream, down to its
  -- size). COPY and RENAME, not DUMP/RESTORE: RESTORE is @dangerous, and
  -- managed Redis services refuse it. Long streams waste little: left as is.
  local sk = B .. 'events:' .. rid
  local n = redis.call('XLEN', sk)
  if n > 0 and n <= COMPACT_EVENTS then
    local tmp = B .. 'events-copy'
    redis.call('COPY', sk, tmp, 'REPLACE')
    redis.call('RENAME', tmp, sk)
  end
end

local PURGE_SCOPES = { 'conversation', 'bot', 'workspace', 'thread' }

-- Purges up to `limit` runs finished longer ago than `retention` ms, oldest
-- first: the hash, the events, the finished entry and every list-index
-- entry. Returns the ids of the runs purged; their locators live in other
-- slots, so the caller deletes those (only where they still name this queue).
local function purge_finished(B, now, retention, limit)
  local ids = {}
  if now - retention < 0 then return ids end
  for _, entry in ipairs(redis.call('XRANGE', K.finished, '-', fmt(now - retention), 'COUNT', limit)) do
    local rid = entry[2][2]
    local rk = B .. 'run:' .. rid
    local v = redis.call('HMGET', rk, 'id', 'conversation_id', 'bot_id', 'workspace_id', 'thread_id', 'status',
      'metadata', 'authorization', 'usage', 'cost')
    -- A finished entry whose run is live again is impossible by the
    -- scripts; a hand-edited one is skipped rather than destroyed.
    if v[1] and TERMINAL[v[6] or ''] then
      local index_entry = v[1] .. '-0'
      redis.call('XDEL', B .. 'runs', index_entry)
      for i = 1, 4 do
        if v[i + 1] then
          local idx = B .. 'idx:' .. PURGE_SCOPES[i] .. ':' .. v[i + 1]
          redis.call('XDEL', idx, index_entry)
          -- An empty stream stays a key; a scope value that has no runs left goes.
          if redis.call('XLEN', idx) == 0 then redis.call('DEL', idx) end
        end
      end
      redis.call('ZREM', B .. 'dead', rid)
      redis.call('DEL', rk, B .. 'events:' .. rid)
      drop_docs(B, rid, { v[7], v[8], v[9], v[10] })
      ids[#ids + 1] = rid
    end
    redis.call('XDEL', K.finished, entry[1])
  end
  return ids
end

-- Puts a queued run where it belongs: the delayed set when not due, else its
-- lane, and wakes a worker then unless `no_wake` (a batch wakes once).
-- Returns whether the run is claimable now.
local function requeue(B, rid, h, now, no_wake)
  local due = tonumber(h.not_before or '')
  if due and due > now then
    redis.call('ZADD', K.delayed, due, rid)
    lower_next_due(B, due)
    return false
  end
  if h.group then
    group_add(B, rid, h, now)
    return true
  end
  lane_add(B, rid, h)
  if not no_wake then wake_for(B, h, now) end
  return true
end

-- Takes back claims whose lease expired before `now`, at most `limit`.
-- status 'queued' requeues them unless they used up max_attempts (then they
-- end `failed`, counted as dead); a terminal status finishes them.
-- Returns the run ids touched.
local function recover_expired(B, now, limit, status, reason)
  local ids = redis.call('ZRANGEBYSCORE', K.leases, '-inf', fmt(now), 'LIMIT', '0', limit)
  for _, rid in ipairs(ids) do
    local rk = B .. 'run:' .. rid
    local h = route_fields(rk)
    redis.call('ZREM', K.leases, rid)
    if h and h.group then group_lease_ended(B, rid, h) end
    if h and h.status == 'claimed' then
      if TERMINAL[status] then
        finish(B, rid, h, status, reason, now)
      elseif h.max_attempts > 0 and h.dispatch_attempts >= h.max_attempts then
        finish(B, rid, h, 'failed', 'dead: lease expired after ' .. h.dispatch_attempts .. ' of ' ..
          h.max_attempts .. ' attempts', now)
        redis.call('HINCRBY', K.stats, 'dead', 1)
        -- The dead set lists them for operators (a dashboard's "dead" tab,
        -- a requeue); purge_finished takes them out with the run.
        redis.call('ZADD', B .. 'dead', now, rid)
      else
        clear_claim(rk)
        redis.call('HSET', rk, 'status', 'queued', 'status_reason', reason, 'updated_at', now)
        redis.call('HINCRBY', K.stats, 'reclaimed', 1)
        h.status = 'queued'
        count_queued(B, h, 1)
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
    if h and h.status == 'queued' and h.group then
      group_add(B, rid, h, now)
    elseif h and h.status == 'queued' then
      lane_add(B, rid, h)
      wake_for(B, h, now)
    end
  end
  return #ids
end
