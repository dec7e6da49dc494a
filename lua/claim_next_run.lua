-- claim_next_run: hand the next run of one queue to a runtime under a lease.
-- The whole claim is in this file. finalize_run chains a claim after its
-- finish with the same code: it gets this file's definitions, everything but
-- the last line (see src/scripts.rs).
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- ARGV[1]  key base <P>:{Q}:
-- ARGV[2]  runtime_id
-- ARGV[3]  lease length in ms (1 .. 86400000)
-- ARGV[4]  new claim token (chosen by the client, 32 hex chars)
-- ARGV[5]  retention ms (checked, unused: finished runs carry no TTL; kept so the positions stay)
-- ARGV[6]  conversation_id filter ('' = any)   ARGV[7] bot_id ('' = any)
-- ARGV[8]  workspace_id ('' = any)
-- ARGV[9]  thread filter: '' = any, '-' = runs without a thread, '=' .. id = that thread
-- ARGV[10..] runner_ids filter (none = any runner)
-- A claim records a receipt (<P>:{Q}:receipt:<token> = run_id, for the lease's
-- length), so that a resend after a lost reply hands out the same run, not a
-- second one. Returns {1, HGETALL..., last event sequence} with the claimed run (a
-- re-claimed run continues its event stream), or {0, next_due_ms, now_ms} where
-- next_due_ms is the earliest time a delayed run or a lease falls due ('' if none)
-- and now_ms the server's clock.
--
-- Order is the seed's: priority descending, then creation order. Before
-- choosing, it promotes due delayed runs and takes back expired leases (at most
-- 100 each, so the work per call is bounded), when the queue's hints
-- (<P>:{Q}:hints, see include/queue.lua) say that one may be due; most
-- claims read only the hints (and a queue written by an earlier build gets
-- its lane mark there, once: see shared_lanes). Candidates are the heads of a few
-- sorted sets: the queue (or one lane per runner in the filter) and this
-- runtime's pinned lane, so the cost is O(log n) in the queue depth, times the
-- number of runner ids in the filter.
-- With a scope filter (ARGV[6..9]) each of those lanes is walked from its
-- head, in claim order, to its first run in scope, SCOPE_BUDGET (500)
-- entries at most in all per call (one HMGET each): the best run in scope
-- among them is claimed, and a run in scope behind 500 runs of other scopes
-- is not found by this call. Without a scope filter nothing extra is read.

-- Reads a claim spec from ARGV[a..]: runtime_id, lease ms, new token,
-- retention ms (checked, unused), the scope filters conversation_id, bot_id,
-- workspace_id ('' = any) and thread ('' = any, '-' = runs without a thread,
-- '=' .. id = that thread), then the runner_ids filter (none = any runner).
local function parse_claim(a)
  local c = { runtime = ARGV[a], token = ARGV[a + 2], runners = {} }
  check_id('runtime_id', c.runtime)
  c.lease = check_int('lease ms', ARGV[a + 1], 1, 86400000)
  if #c.token < 16 or #c.token > 64 then fail('INVALID', 'claim token must be 16..64 bytes') end
  c.retention = check_int('retention ms', ARGV[a + 3], 0, 1e13)
  local conversation, bot, workspace, thread = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
  if conversation == nil or bot == nil or workspace == nil or thread == nil then
    fail('INVALID', 'a claim spec needs the four scope filters (empty for none)')
  end
  check_opt_id('conversation_id', conversation)
  check_opt_id('bot_id', bot)
  check_opt_id('workspace_id', workspace)
  if thread ~= '' and thread ~= '-' then
    if string.sub(thread, 1, 1) ~= '=' then fail('INVALID', "thread filter must be '', '-' or '=' .. thread_id") end
    check_id('thread_id', string.sub(thread, 2))
  end
  if conversation ~= '' or bot ~= '' or workspace ~= '' or thread ~= '' then
    c.scope = { conversation = conversation, bot = bot, workspace = workspace, thread = thread }
  end
  for i = a + 8, #ARGV do
    check_id('runner_id', ARGV[i])
    c.runners[#c.runners + 1] = ARGV[i]
  end
  return c
end

-- A filtered claim looks at no more than this many lane entries per call
-- (over all the lanes it reads): a matching run further down is not found
-- by that call. Keeps a filtered claim bounded however many runs of other
-- scopes wait ahead of it.
local SCOPE_BUDGET = 500

-- True when run rk has the scope values of filter s.
local function in_scope(rk, s)
  local v = redis.call('HMGET', rk, 'conversation_id', 'bot_id', 'workspace_id', 'thread_id')
  return (s.conversation == '' or v[1] == s.conversation) and (s.bot == '' or v[2] == s.bot)
    and (s.workspace == '' or v[3] == s.workspace)
    and (s.thread == '' or (s.thread == '-' and not v[4]) or (v[4] and s.thread == '=' .. v[4]))
end

-- The answer to a claim whose token already has a receipt: the claim was
-- made, and its reply lost. The run is handed out again while the token
-- still holds it; nil when the token has no receipt.
local function claim_again(B, token, now)
  local rid = redis.call('GET', receipt_key(B, token))
  if not rid then return nil end
  local rk = B .. 'run:' .. rid
  local v = redis.call('HMGET', rk, 'status', 'claim_token')
  if v[1] == 'claimed' and v[2] == token then
    return { 1, run_fields(B, rid), last_sequence(B .. 'events:' .. rid) }
  end
  -- Lost since (released, expired, finished): nothing is held with it now.
  return { 0, '', fmt(now) }
end

-- Promotes due delayed runs and takes back expired leases (at most 100
-- each) when the hints say some may be due, and rebuilds the hints then.
-- Returns whether a pinned lane may hold runs, and whether the queue is
-- paused (see pause.lua). Most claims read one hash here.
local function due_work(B, now)
  local hints = B .. 'hints'
  local v = redis.call('HMGET', hints, 'next_due', 'pinned', 'lanes', 'paused', 'limits')
  if v[4] == '1' then return false, true end
  -- A queue without rate limits or caps reads none (see Limits in include/queue.lua).
  if v[5] ~= '1' then limits_read = false end
  local due = tonumber(v[1] or '')
  if due and due > now and v[2] and (v[3] == '0' or v[3] == '1') then
    hinted_due = due
    lanes_mode = v[3]
    return v[2] ~= '0'
  end
  -- Hints rebuilt (lost, or never written): the pause and limits marks come
  -- from meta again.
  local marks = redis.call('HMGET', B .. 'meta', 'paused', 'limits')
  limits_read = nil
  shared_lanes(B)
  promote_delayed(B, now, '100')
  recover_expired(B, now, '100', 'queued', 'claim lease expired')
  local due_keys = { K.delayed, K.leases }
  if marks[2] == '1' and read_limits(B) and limits_read.group_rated then
    rearm_groups(B, now)
    due_keys[3] = B .. 'group-rates'
  end
  -- What is left is exact now; past the limit of 100 the head is due still,
  -- and the next claim probes again.
  due = now + HINT_MS
  for _, key in ipairs(due_keys) do
    local head = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES')
    if head[2] and tonumber(head[2]) < due then due = tonumber(head[2]) end
  end
  local pins = redis.call('EXISTS', B .. 'pins') == 1
  redis.call('HSET', hints, 'next_due', fmt(due), 'pinned', pins and '1' or '0', 'lanes', lanes_mode)
  hinted_due = due
  if marks[2] == '1' then redis.call('HSET', hints, 'limits', '1') end
  if marks[1] == '1' then
    redis.call('HSET', hints, 'paused', '1')
    return pins, true
  end
  return pins, false
end

-- Claims the next run of the queue for c (see this file's header for the
-- order and the cost). Returns {1, HGETALL..., last event sequence} or
-- {0, next_due_ms or '', now_ms}. `now` (ms) is the caller's clock reading, if it has one.
-- A resend with the same token gives the first call's run (see claim_again).
-- `first_send`: the caller knows this is the token's first use (a finish
-- applied now for the first time, chaining its claim), so no receipt can exist.
local function claim(B, c, now, first_send)
  local runtime, lease, token, retention, runners = c.runtime, c.lease, c.token, c.retention, c.runners
  now = now or now_ms()
  if not first_send then
    local again = claim_again(B, token, now)
    if again then return again end
  end
  local pins_maybe, paused = due_work(B, now)
  -- A paused queue hands out nothing; resume wakes its workers.
  if paused then return { 0, '', fmt(now) } end
  -- A queue at its rate limit answers when it allows the next claim.
  local allowed = rate_refused(B, now)
  if allowed then return { 0, fmt(allowed), fmt(now) } end

  local wanted = {}
  for _, r in ipairs(runners) do wanted[r] = true end
  local pinned = B .. 'pinned:' .. runtime

  -- How many runs `queued` held at the last unfiltered pick, up to 2: then
  -- no ZCARD is needed to know whether one remains after the claim.
  local queued_seen
  -- A scope filter walks each lane from its head to its first run in scope,
  -- SCOPE_BUDGET entries in all per call (see SCOPE_BUDGET).
  local scope = c.scope
  local scanned = 0
  -- The first entry of `lane` in scope (and, with `runner_check`, of a
  -- wanted runner): {rid, score} or nil.
  local function scoped_head(lane, runner_check)
    local at = 0
    while scanned < SCOPE_BUDGET do
      local n = math.min(50, SCOPE_BUDGET - scanned)
      local entries = redis.call('ZRANGE', lane, fmt(at), fmt(at + n - 1), 'WITHSCORES')
      for i = 1, #entries, 2 do
        scanned = scanned + 1
        local rk = B .. 'run:' .. entries[i]
        if (not runner_check or wanted[redis.call('HGET', rk, 'runner_id')]) and in_scope(rk, scope) then
          return { entries[i], entries[i + 1] }
        end
      end
      if #entries < 2 * n then return nil end
      at = at + n
    end
    return nil
  end
  -- Returns the best candidate {rid, score, from_queued}.
  local function pick()
    local best
    local function consider(rid, score, from_queued)
      score = tonumber(score)
      if not best or score < best[2] then best = { rid, score, from_queued } end
    end
    local function consider_scoped(lane, runner_check)
      local head = scoped_head(lane, runner_check)
      if head then consider(head[1], head[2]) end
    end
    if #runners == 0 and scope then
      consider_scoped(K.queued)
      if pins_maybe then consider_scoped(pinned) end
    elseif #runners == 0 then
      local head = redis.call('ZRANGE', K.queued, '0', '1', 'WITHSCORES')
      queued_seen = #head / 2
      if head[1] then consider(head[1], head[2], true) end
      if pins_maybe then
        head = redis.call('ZRANGE', pinned, '0', '0', 'WITHSCORES')
        if head[1] then consider(head[1], head[2]) end
      end
    else
      for _, r in ipairs(runners) do
        local lane = lane_of(B, r)
        if not lane then
          -- No queued run of r.
        elseif scope then
          consider_scoped(lane)
        else
          local head = redis.call('ZRANGE', lane, '0', '0', 'WITHSCORES')
          if head[1] then consider(head[1], head[2]) end
        end
      end
      if not pins_maybe then
        -- No pinned lane holds runs.
      elseif scope then
        consider_scoped(pinned, true)
      else
        -- Pinned runs of other runners are skipped; bounded so a claim stays cheap.
        local heads = redis.call('ZRANGE', pinned, '0', '49', 'WITHSCORES')
        for i = 1, #heads, 2 do
          if wanted[redis.call('HGET', B .. 'run:' .. heads[i], 'runner_id')] then
            consider(heads[i], heads[i + 1])
            break
          end
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
      -- The hash vanished (deleted by hand): drop the dangling entries, and
      -- find its runner by the lane that held it to keep `runners` exact.
      redis.call('ZREM', pinned, rid)
      if redis.call('ZREM', K.queued, rid) == 1 then
        for _, r in ipairs(redis.call('HKEYS', B .. 'runners')) do
          -- Without lanes `runners` names one runner: the run was its.
          if not shared_lanes(B) or redis.call('ZSCORE', runner_lane(B, r), rid) then
            runner_left(B, r, rid)
            break
          end
        end
      end
    elseif h.deadline_at and h.deadline_at <= now then
      finish(B, rid, h, 'timeout', 'deadline passed before the run was claimed', now)
    else
      if h.group then group_remove(B, rid, h) else lane_remove(B, rid, h) end
      local attempts = h.dispatch_attempts + 1
      local now_s, expires = fmt(now), fmt(now + lease)
      local fields = { 'status', 'claimed', 'claimed_by_runtime_id', runtime, 'claim_token', token,
        'claim_lease_expires_at', expires, 'dispatch_attempts', attempts, 'updated_at', now_s }
      -- The first claim's time is started_at; last_claimed_at is written
      -- from the second claim on (readers take started_at until then).
      fields[#fields + 1] = h.started_at and 'last_claimed_at' or 'started_at'
      fields[#fields + 1] = now_s
      redis.call('HSET', rk, unpack(fields))
      redis.call('ZADD', K.leases, expires, rid)
      -- The group's slot is this lease (see groups in include/queue.lua).
      if h.group then redis.call('ZADD', group_key(B, h.group, 'active'), expires, rid) end
      lower_next_due(B, now + lease)
      redis.call('SET', receipt_key(B, token), rid, 'PX', fmt(lease))
      -- Chain the wake-up: another idle worker can take the next run (not
      -- while the queue's rate window is full: the next claim would be refused).
      local window_full = claimed_limits(B, h, now)
      local left
      if window_full then
        left = 0
      elseif queued_seen then
        left = queued_seen - (best[3] and 1 or 0)
      else
        left = redis.call('ZCARD', K.queued)
      end
      if left > 0 then wake() end
      -- Chain the wake-ups of filtered and pinned workers the same way.
      if h.requested_runtime_id then
        if redis.call('EXISTS', pinned) == 1 then wake_pin(B, runtime) end
      elseif #runners > 0 and tonumber(redis.call('HGET', B .. 'runners', h.runner_id) or '0') > 0 then
        wake_runner(B, h.runner_id, now)
      end
      return { 1, run_fields(B, rid), last_sequence(B .. 'events:' .. rid) }
    end
  end

  -- A stale token would wake idle workers for nothing (pinned runs have
  -- wake lists of their own).
  if redis.call('ZCARD', K.queued) == 0 then redis.call('DEL', K.wake) end
  local due = ''
  local d = redis.call('ZRANGE', K.delayed, '0', '0', 'WITHSCORES')
  if d[2] then due = tonumber(d[2]) end
  local later = { K.leases }
  -- A group waiting for its rate window: its runs come back at the window's end.
  if read_limits(B) and limits_read.group_rated then later[2] = B .. 'group-rates' end
  for _, key in ipairs(later) do
    local l = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES')
    if l[2] and (due == '' or tonumber(l[2]) < due) then due = tonumber(l[2]) end
  end
  return { 0, due == '' and '' or fmt(due), fmt(now) }
end

return claim(ARGV[1], parse_claim(2))
