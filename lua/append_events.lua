-- append_events: append one or more events to a run's stream, in one call.
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- KEYS[8]     <P>:{Q}:run:<run_id>         HASH the run
-- KEYS[9]     <P>:{Q}:events:<run_id>  STREAM its events, entry id <sequence>-0
-- ARGV[1] key base   ARGV[2] run_id
-- ARGV[3] claim token ('' = host call without fencing)
-- ARGV[4] max JSON bytes
-- ARGV[5] the most events a run may hold (1 .. 10,000,000)
-- ARGV[6..] 7 values per event: sequence, type, data (JSON object),
--   usage (JSON object or ''), source, artifact_refs (JSON array or ''),
--   metadata (JSON object or '')
-- Returns one {sequence, created_at_ms, 1 = appended | 0 = identical retry} per event.
--
-- A sequence that already exists is an idempotent retry when its content is
-- the same and a CONFLICT when it differs. A new sequence must be above the
-- stream's last one (OUT_OF_ORDER otherwise) and the run must not be finished
-- (FINISHED), and the run may hold at most ARGV[5] events (LIMIT past it).
-- A token that no longer holds the run, or whose lease expired
-- by the server's clock, is STALE_TOKEN. Every event
-- is checked before the first one is written, so a batch lands whole or not at all.
local B = ARGV[1]
local rid = ARGV[2]
check_id('run_id', rid)
local token = ARGV[3]
local max_bytes = check_int('max JSON bytes', ARGV[4], 1, 512 * 1024 * 1024)
local max_events = check_int('max events per run', ARGV[5], 1, 1e7)
local n = (#ARGV - 5) / 7
if n < 1 or n ~= math.floor(n) then fail('INVALID', 'events must come as 7 values each, at least one') end
if n > MAX_EVENTS_PER_CALL then
  fail('INVALID', 'at most ' .. MAX_EVENTS_PER_CALL .. ' events per call, got ' .. n)
end
local events = {}
for i = 0, n - 1 do
  local a = 6 + i * 7
  local e = {
    seq = check_int('sequence', ARGV[a], 1, MAX_SEQUENCE), type = ARGV[a + 1], data = ARGV[a + 2],
    usage = ARGV[a + 3], source = ARGV[a + 4], artifact_refs = ARGV[a + 5], metadata = ARGV[a + 6],
  }
  check_id('event type', e.type)
  check_id('event source', e.source)
  if e.data == '' then fail('INVALID', 'event data must be a JSON object') end
  check_json('event data', e.data, '{', '}', max_bytes)
  check_json('event usage', e.usage, '{', '}', max_bytes)
  check_json('event artifact_refs', e.artifact_refs, '[', ']', max_bytes)
  check_json('event metadata', e.metadata, '{', '}', max_bytes)
  events[#events + 1] = e
end

local rk, sk = KEYS[8], KEYS[9]
local h = load_holder(rk, rid)
local now = now_ms()
check_holder(h, rid, token, now)

local now_s = fmt(now)
local function entry_fields(e)
  local f = { 'type', e.type, 'data', e.data, 'source', e.source, 'created_at', now_s }
  if e.usage ~= '' then f[#f + 1] = 'usage'; f[#f + 1] = e.usage end
  if e.artifact_refs ~= '' then f[#f + 1] = 'artifact_refs'; f[#f + 1] = e.artifact_refs end
  if e.metadata ~= '' then f[#f + 1] = 'metadata'; f[#f + 1] = e.metadata end
  return f
end

-- The common case, new events in order on a live run within the cap (the
-- stream holds at most the highest sequence after the append): the first
-- XADD is the first write, and the stream refuses it when its sequence is
-- not above the last one; then each event is decided below instead. So a
-- batch lands whole or not at all either way, without reading the stream first.
local in_order = not TERMINAL[h.status] and events[#events].seq <= max_events
for i = 2, #events do
  if events[i].seq <= events[i - 1].seq then in_order = false end
end
if in_order then
  -- fmt, not `..`: Lua writes 1e14 as "1e+14", which is no stream id.
  local added = redis.pcall('XADD', sk, fmt(events[1].seq) .. '-0', unpack(entry_fields(events[1])))
  if not (type(added) == 'table' and added.err) then
    local out = { { events[1].seq, now, 1 } }
    for i = 2, #events do
      redis.call('XADD', sk, fmt(events[i].seq) .. '-0', unpack(entry_fields(events[i])))
      out[i] = { events[i].seq, now, 1 }
    end
    return out
  end
end

local last = last_sequence(sk)

local function same(fields, e)
  local m = {}
  for j = 1, #fields, 2 do m[fields[j]] = fields[j + 1] end
  return m.type == e.type and m.data == e.data and m.source == e.source and (m.usage or '') == e.usage
    and (m.artifact_refs or '') == e.artifact_refs and (m.metadata or '') == e.metadata, m.created_at
end

-- First pass: decide every event without writing.
local out = {}
local high = last
for i, e in ipairs(events) do
  if e.seq <= high then
    local found = e.seq <= last and redis.call('XRANGE', sk, fmt(e.seq) .. '-0', fmt(e.seq) .. '-0')[1]
    if not found then
      fail('OUT_OF_ORDER', 'event sequence ' .. fmt(e.seq) .. ' of run ' .. rid .. ' is not above the last one (' .. fmt(high) .. ')')
    end
    local equal, created = same(found[2], e)
    if not equal then
      fail('CONFLICT', 'event sequence ' .. fmt(e.seq) .. ' of run ' .. rid .. ' already exists with other content')
    end
    out[i] = { e.seq, created, 0 }
  else
    if TERMINAL[h.status] then
      fail('FINISHED', 'run ' .. rid .. ' is ' .. h.status .. '; it takes no new events')
    end
    high = e.seq
    out[i] = false
  end
end

local new = 0
for i = 1, #events do
  if not out[i] then new = new + 1 end
end
-- Sequences are distinct and at least 1, so the stream holds at most `high`
-- events after the append: only a run that may pass the cap is counted.
if new > 0 and high > max_events then
  local held = redis.call('XLEN', sk)
  if held + new > max_events then
    fail('LIMIT', 'run ' .. rid .. ' holds ' .. held .. ' events; ' .. new .. ' more would pass the limit of ' ..
      fmt(max_events) .. ' events per run')
  end
end

for i, e in ipairs(events) do
  if not out[i] then
    redis.call('XADD', sk, fmt(e.seq) .. '-0', unpack(entry_fields(e)))
    out[i] = { e.seq, now, 1 }
  end
end
return out
