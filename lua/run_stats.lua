-- run_stats: the runs of one queue created in a time window, for the stats
-- (run, runner) that the client sums over every queue.
--
-- KEYS[1] <P>:{Q}:runs  STREAM every run, entry <id>-0, field r = run_id
-- ARGV[1] key base
-- ARGV[2] window start, created_at ms, inclusive   ARGV[3] window end, ms, inclusive
-- ARGV[4] continue after this entry id, exclusive ('' = from the window's start)
-- ARGV[5] how many index entries to look at, at most (1 .. 100000)
-- ARGV[6] runner_id filter ('' = every runner)
-- Returns {exhausted 1|0, last entry id looked at ('' if none), then five
-- values per run in the window: runner_id, status, created_at ms,
-- started_at ms ('' = not started), finished_at ms ('' = not finished)}.
-- Ids grow with creation and their clock is never behind created_at (see
-- create_run.lua), so the walk starts at the first id whose clock could be in
-- the window and stops at the first run created after it: it reads every run
-- created in the window (plus, at its start, runs a burst pushed ahead of
-- their creation time), ARGV[5] per call; the client calls again from the cursor.
-- A server clock set back can put a run created later before an earlier one's
-- created_at; such a run may be missed by a window that ends between them.
-- Read only.
local QUEUES = 4096
local ID_EPOCH = 1767225600000
local B = ARGV[1]
local lo = check_int('window start ms', ARGV[2], 0, 1e15)
local hi = check_int('window end ms', ARGV[3], 0, 1e15)
local after = ARGV[4]
if after ~= '' and not string.find(after, '^%d+%-%d+$') then fail('INVALID', 'cursor must be a stream entry id') end
local budget = check_int('scan limit', ARGV[5], 1, 100000)
local runner = ARGV[6]
check_opt_id('runner_id', runner)

local out = { 0, after }
if hi < lo then out[1] = 1; return out end
local min = after ~= '' and ('(' .. after) or (fmt(math.max(0, lo - ID_EPOCH) * QUEUES) .. '-0')
local seen = 0
while seen < budget do
  local batch = math.min(100, budget - seen)
  local entries = redis.call('XRANGE', KEYS[1], min, '+', 'COUNT', batch)
  for _, entry in ipairs(entries) do
    seen = seen + 1
    out[2] = entry[1]
    local v = redis.call('HMGET', B .. 'run:' .. entry[2][2], 'runner_id', 'status', 'created_at', 'started_at',
      'finished_at')
    local created = tonumber(v[3] or '')
    if created and created > hi then out[1] = 1; return out end
    if created and created >= lo and v[1] and (runner == '' or v[1] == runner) then
      out[#out + 1] = v[1]
      out[#out + 1] = v[2] or ''
      out[#out + 1] = v[3]
      out[#out + 1] = v[4] or ''
      out[#out + 1] = v[5] or ''
    end
  end
  if #entries < batch then out[1] = 1; return out end
  min = '(' .. out[2]
end
return out
