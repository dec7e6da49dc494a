-- create_run: create runs of one queue unless they exist (idempotent by run_id).
-- One call creates one run or a whole batch.
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- KEYS[8]     <P>:{Q}:meta  HASH number (the queue's number), clock (of the last id),
--             lanes ('1': runner lanes are kept for every runner, see include/queue.lua)
-- KEYS[9..8+n]  <P>:{Q}:run:<run_id>  HASH of each of the n runs, in the order of ARGV
-- KEYS[9+n..8+2n]  optional, on a single server only: <P>:locator:<run_id> of
--             each run (another slot). Given, the script takes them itself
--             (one round trip for a create); else the client took them before.
-- ARGV[1] key base <P>:{Q}:   ARGV[2] queue name   ARGV[3] max JSON bytes
-- ARGV[4] queue number (0 .. 4095, from register_queue.lua; checked against KEYS[8])
-- ARGV[5] '1' when the client registered the queue just before this call
--         (a queue without KEYS[8] is refused with UNREGISTERED otherwise)
-- ARGV[6] the group_by ('' = none) the client placed the runs by, when this
--         queue is a partition of a partitioned queue (see
--         src/store/partitions.rs); '-' = not placed, not checked. A
--         partition whose meta group_by differs refuses the call (MISPLACED,
--         nothing written): the client reads the setting again and places anew.
-- ARGV[7..] 18 values per run:
--   run_id, event_id, binding_id, runner_id, conversation_id, thread_id,
--   workspace_id, bot_id, agent_id, deadline_at ms, authorization (JSON object),
--   metadata (JSON object), status (queued | running | created | a terminal one), priority [-1000, 1000],
--   requested_runtime_id, not_before ms, max_attempts (0 = unlimited),
--   group_key (the run's group when the queue groups by group_key)
--   '' means "not set" for every optional value.
-- Every run is checked before the first one is written, and so are the
-- queue's caps: a batch past one fails with QUEUE_FULL and writes nothing.
-- Returns one reply per run: {1, id, created_at_ms, group ('' = none)} when created (the caller
-- knows the rest), {0, HGETALL...} when it existed, {2, queue} when its
-- locator (given in KEYS) names another queue, which holds the run.
--
-- Run ids: id = clock * 4096 + queue number, where clock = max(last clock + 1,
-- ms since 2026-01-01) is kept per queue. So ids are unique across queues
-- (the low part names the queue), grow with creation within a queue (the
-- list indexes are streams keyed by id), follow creation time across queues
-- (newest first by id is newest first), and stay below 2^53: the clock has 41
-- bits, 69 years of milliseconds. The claim order uses the clock (see
-- lane_score). The run id locator (<P>:locator:<run_id>, another slot) is
-- taken by the client before this script runs on a cluster, and by the script
-- on a single server (see src/store/locator.rs for what each answer means).
-- Cost: O(log n) per run in the queue depth.
local B = ARGV[1]
local queue = ARGV[2]
check_id('queue_name', queue)
local max_bytes = check_int('max JSON bytes', ARGV[3], 1, 512 * 1024 * 1024)
local number = check_int('queue number', ARGV[4], 0, QUEUES - 1)
local meta = redis.call('HMGET', KEYS[8], 'number', 'clock', 'lanes', 'group_by', 'cap', 'group_cap', 'workspace_cap',
  'group_cap_overrides')
-- The queue's caps (see Limits in include/queue.lua); none on most queues.
-- `own`: some groups have caps of their own (read only then).
local caps = { queue = tonumber(meta[5] or ''), group = tonumber(meta[6] or ''), workspace = tonumber(meta[7] or ''),
  own = meta[8] == '1' }
local capped = caps.queue or caps.group or caps.workspace or caps.own
-- A new queue starts without lanes (see runner_lane in include/queue.lua).
if not meta[1] then lanes_mode = '0' elseif meta[3] == '0' or meta[3] == '1' then lanes_mode = meta[3] end
if meta[1] and tonumber(meta[1]) ~= number then
  fail('CONFLICT', 'queue ' .. queue .. ' has number ' .. meta[1] .. ', not ' .. ARGV[4])
end
-- A queue this server has never seen takes a number only from a client that
-- has just registered it: a number remembered from before a restart that
-- lost the data may belong to another queue by now.
if not meta[1] and ARGV[5] ~= '1' then
  fail('UNREGISTERED', 'queue ' .. queue .. ' is not registered on this server')
end
local placed_by = ARGV[6]
if placed_by == nil then fail('INVALID', 'the placement (ARGV[6]) is missing') end
if placed_by ~= '-' and placed_by ~= (meta[4] or '') then
  fail('MISPLACED', 'queue ' .. queue .. " groups by '" .. (meta[4] or '') .. "', the runs were placed by '" ..
    placed_by .. "'")
end
local WIDTH = 18
local n = (#ARGV - 6) / WIDTH
if n < 1 or n ~= math.floor(n) or (#KEYS ~= 8 + n and #KEYS ~= 8 + 2 * n) then
  fail('INVALID', 'runs must come as 18 values each with one key each (and one locator each), at least one')
end
local with_locators = #KEYS == 8 + 2 * n
-- The client sends 500 per call; a bound keeps one call (and its unpacks) short.
if n > 1000 then fail('INVALID', 'at most 1000 runs per call, got ' .. n) end

local OPTIONAL_IDS = { 'event_id', 'binding_id', 'conversation_id', 'thread_id', 'workspace_id', 'bot_id',
  'agent_id', 'requested_runtime_id' }
local runs = {}
for i = 0, n - 1 do
  local a = 7 + i * WIDTH
  local r = {
    rid = ARGV[a], event_id = ARGV[a + 1], binding_id = ARGV[a + 2], runner_id = ARGV[a + 3],
    conversation_id = ARGV[a + 4], thread_id = ARGV[a + 5], workspace_id = ARGV[a + 6],
    bot_id = ARGV[a + 7], agent_id = ARGV[a + 8], deadline_at = ARGV[a + 9],
    authorization = ARGV[a + 10], metadata = ARGV[a + 11], status = ARGV[a + 12],
    requested_runtime_id = ARGV[a + 14], not_before = ARGV[a + 15], group_key = ARGV[a + 17], key = KEYS[9 + i],
    locator = with_locators and KEYS[9 + n + i] or nil,
  }
  check_id('run_id', r.rid)
  for _, name in ipairs(OPTIONAL_IDS) do
    check_opt_id(name, r[name])
  end
  check_id('runner_id', r.runner_id)
  r.deadline = check_opt_int('deadline_at', r.deadline_at, 0, 1e15)
  check_json('authorization', r.authorization, '{', '}', max_bytes)
  check_json('metadata', r.metadata, '{', '}', max_bytes)
  -- `created` is stored and listed but enters no lane: nothing claims it.
  -- A terminal status (LangBot's stats tests create failed runs) is recorded
  -- as finished at once, without finished_at, as upstream leaves it.
  if r.status ~= 'queued' and r.status ~= 'running' and r.status ~= 'created' and not TERMINAL[r.status] then
    fail('INVALID', "status must be 'queued', 'running', 'created' or terminal, got '" .. r.status .. "'")
  end
  r.priority = check_int('priority', ARGV[a + 13], -1000, 1000)
  check_opt_int('not_before', r.not_before, 0, 1e15)
  r.max_attempts = check_int('max_attempts', ARGV[a + 16], 0, 1000000)
  if r.group_key == nil then fail('INVALID', 'a run needs its group_key value (empty for none)') end
  check_opt_id('group_key', r.group_key)
  -- Its group, when the queue groups runs (see groups in include/queue.lua).
  local by = meta[4]
  if by and by ~= '' then
    local g = by == 'group_key' and r.group_key or r[by]
    if g and g ~= '' then r.group = g end
  end
  runs[#runs + 1] = r
end

local OPTIONAL = { 'event_id', 'binding_id', 'conversation_id', 'thread_id', 'workspace_id', 'bot_id',
  'agent_id', 'deadline_at', 'authorization', 'metadata', 'requested_runtime_id', 'not_before' }
-- The fields that hold JSON documents (long ones move out, see doc_value).
local DOCUMENTS = { authorization = true, metadata = true }
local SCOPES = { { 'conversation', 'conversation_id' }, { 'bot', 'bot_id' }, { 'workspace', 'workspace_id' },
  { 'thread', 'thread_id' } }
local now = now_ms()
local now_s = fmt(now)
local out = {}
local fresh = 0
local first = {} -- run key -> index of its first occurrence in this batch
local repeats = {}
for i, r in ipairs(runs) do
  if first[r.key] then
    repeats[#repeats + 1] = i
    out[i] = true
  elseif redis.call('EXISTS', r.key) == 1 then
    out[i] = { 0, run_fields(B, r.rid) }
  else
    fresh = fresh + 1
  end
  first[r.key] = first[r.key] or i
end
-- A batch that would take the queue, a group or a workspace past its cap is
-- refused whole, before anything is written.
local count_add, count_order = {}, {}
local function tally(r)
  tally_queued(count_add, count_order, r.group, r.workspace_id)
end
if capped then
  for i, r in ipairs(runs) do
    if not out[i] and r.status == 'queued' then tally(r) end
  end
  if #count_order > 0 then
    local have = redis.call('HMGET', B .. 'queued-count', unpack(count_order))
    -- The groups' own caps, one HMGET for the groups of the batch.
    local own = {}
    if caps.own then
      local names = {}
      for _, field in ipairs(count_order) do
        local name = string.match(field, '^g:(.*)$')
        if name then names[#names + 1] = name end
      end
      if #names > 0 then
        for j, v in ipairs(redis.call('HMGET', B .. 'group-caps', unpack(names))) do
          if v then own[names[j]] = tonumber(v) end
        end
      end
    end
    for j, field in ipairs(count_order) do
      local kind, name = string.match(field, '^(%a):(.*)$')
      local cap = kind == 'g' and (own[name] or caps.group) or kind == 'w' and caps.workspace
        or not kind and caps.queue
      local held = tonumber(have[j] or '0')
      if cap and held + count_add[field] > cap then
        local what = kind == 'g' and ('group ' .. name .. ' of queue ' .. queue)
          or kind == 'w' and ('workspace ' .. name .. ' in queue ' .. queue) or ('queue ' .. queue)
        fail('QUEUE_FULL', what .. ' holds ' .. held .. ' queued runs (its cap is ' .. cap .. '): ' ..
          count_add[field] .. ' more refused')
      end
    end
  end
  -- Counted again below as they are written (a locator held elsewhere drops one).
  count_add, count_order = {}, {}
end
-- The clocks of the whole batch, in order (see the header).
local clock = math.max(tonumber(meta[2] or '0'), now - ID_EPOCH)
-- The `runs` index takes ids in order only: after its last id, whatever the
-- queue's clock says (a meta hash edited or lost, a server clock set back).
-- The first new run's index entry is its first write: when the index refuses
-- it (it is ahead), the clock moves past the index's last id and the batch's
-- ids follow from there, before anything of the run is written.
local function index_clock()
  local info = redis.call('XINFO', 'STREAM', B .. 'runs')
  for j = 1, #info, 2 do
    if info[j] == 'last-generated-id' then
      return math.floor((tonumber(string.match(info[j + 1], '^(%d+)')) or 0) / QUEUES)
    end
  end
  return 0
end
local function check_clock(left)
  if clock + left >= CLOCK_LIMIT then fail('INVALID', 'the id clock of queue ' .. queue .. ' is exhausted') end
end
check_clock(fresh)
-- The locators, after the last check: a run id that another queue holds is
-- that queue's run; one this queue holds (a retry, or a finished run whose
-- locator has a TTL) is kept for good while the run lives.
if with_locators then
  for i, r in ipairs(runs) do
    if first[r.key] == i then
      local held = redis.call('SET', r.locator, queue, 'NX', 'GET')
      if held and held ~= queue then
        if not out[i] then fresh = fresh - 1 end
        out[i] = { 2, held }
      elseif held then
        redis.call('PERSIST', r.locator)
      end
    end
  end
end
local claimable = false
-- Whether this call has written its first index entry (see index_clock).
local indexed = false
-- Unpinned runs due now go into `queued` together, one ZADD per runner.
local by_runner, runner_order = {}, {}
for i, r in ipairs(runs) do
  local rk = r.key
  if not out[i] then
    clock = clock + 1
    local id = clock * QUEUES + number
    local entry = fmt(id) .. '-0'
    -- List indexes are streams: entry <id>-0 names the run; cheaper than a
    -- sorted set entry and still paged newest first with XREVRANGE.
    if indexed then
      redis.call('XADD', B .. 'runs', entry, 'r', r.rid)
    else
      indexed = true
      local added = redis.pcall('XADD', B .. 'runs', entry, 'r', r.rid)
      if type(added) == 'table' and added.err then
        clock = math.max(clock, index_clock() + 1)
        check_clock(fresh)
        id = clock * QUEUES + number
        entry = fmt(id) .. '-0'
        redis.call('XADD', B .. 'runs', entry, 'r', r.rid)
      end
    end
    local id_s = fmt(id)
    -- No updated_at (it is created_at until the run changes), no
    -- dispatch_attempts (0), no run_id nor queue_name (the key names them, see
    -- run_fields): a field is 20 to 60 bytes of every run.
    local fields = {
      'id', id_s, 'runner_id', r.runner_id, 'status', r.status, 'priority', r.priority, 'created_at', now_s,
    }
    for _, name in ipairs(OPTIONAL) do
      if r[name] ~= '' then
        fields[#fields + 1] = name
        fields[#fields + 1] = DOCUMENTS[name] and doc_value(B, r.rid, name, r[name]) or r[name]
      end
    end
    if r.max_attempts > 0 then
      fields[#fields + 1] = 'max_attempts'
      fields[#fields + 1] = r.max_attempts
    end
    if r.status == 'running' then
      fields[#fields + 1] = 'started_at'
      fields[#fields + 1] = now_s
    end
    if r.group then
      fields[#fields + 1] = 'group'
      fields[#fields + 1] = r.group
    end
    redis.call('HSET', rk, unpack(fields))

    for _, scope in ipairs(SCOPES) do
      local v = r[scope[2]]
      if v ~= '' then redis.call('XADD', B .. 'idx:' .. scope[1] .. ':' .. v, entry, 'r', r.rid) end
    end
    if TERMINAL[r.status] then
      -- In the finished index like any finished run, so the retention purges it.
      redis.call('XADD', K.finished, '*', 'r', r.rid)
      redis.call('HINCRBY', K.stats, r.status, '1')
    elseif r.deadline then
      redis.call('ZADD', K.deadlines, r.deadline, r.rid)
    end
    -- Runs executed directly, by start time: the reaper times out those whose
    -- host never finished them (see reap.lua).
    if r.status == 'running' then redis.call('ZADD', B .. 'running', now_s, r.rid) end
    if r.status == 'queued' and r.requested_runtime_id == '' and r.not_before == '' and not r.group then
      local entries = by_runner[r.runner_id]
      if not entries then
        entries = {}
        by_runner[r.runner_id] = entries
        runner_order[#runner_order + 1] = r.runner_id
      end
      entries[#entries + 1] = lane_score(r.priority, id)
      entries[#entries + 1] = r.rid
      claimable = true
    elseif r.status == 'queued' then
      local h = { id = id, priority = r.priority, runner_id = r.runner_id }
      if r.not_before ~= '' then h.not_before = r.not_before end
      if r.requested_runtime_id ~= '' then h.requested_runtime_id = r.requested_runtime_id end
      h.group = r.group
      requeue(B, r.rid, h, now)
    end
    if capped and r.status == 'queued' then tally(r) end
    out[i] = { 1, id, now, r.group or '' }
  end
end
-- A run given twice in one batch is created once; the repeat sees it as existing.
for _, i in ipairs(repeats) do
  local of_first = out[first[runs[i].key]]
  out[i] = of_first[1] == 2 and of_first or { 0, run_fields(B, runs[i].rid) }
end
for _, runner in ipairs(runner_order) do queue_runs(B, runner, by_runner[runner]) end
-- One wake-up per batch, and one per runner for workers filtering on it.
if claimable then
  wake()
  for _, runner in ipairs(runner_order) do wake_runner(B, runner, now) end
end
for _, field in ipairs(count_order) do
  redis.call('HINCRBY', B .. 'queued-count', field, count_add[field])
end
if fresh > 0 then
  if meta[1] then
    redis.call('HSET', KEYS[8], 'number', ARGV[4], 'clock', fmt(clock))
  else
    redis.call('HSET', KEYS[8], 'number', ARGV[4], 'clock', fmt(clock), 'lanes', lanes_mode)
  end
  redis.call('HINCRBY', K.stats, 'created', fresh)
end
return out
