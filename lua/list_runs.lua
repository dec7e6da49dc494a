-- list_runs: one page of a queue's runs, newest id first, from a list index.
--
-- KEYS[1] the index to walk (a STREAM with entry <id>-0 per run): <P>:{Q}:runs or
--         <P>:{Q}:idx:<conversation|bot|workspace|thread>:<value>
-- ARGV[1] key base
-- ARGV[2] before id, exclusive ('' = from the newest)
-- ARGV[3] how many matches to return (1 .. 101)
-- ARGV[4] how many index entries to look at, at most (1 .. 100000)
-- ARGV[5] statuses, comma separated ('' = any)
-- ARGV[6] conversation_id   ARGV[7] bot_id   ARGV[8] workspace_id ('' = any)
-- ARGV[9] thread filter: '' = none, '=' .. id = that thread, '-' = runs without a thread
-- ARGV[10] runner_id   ARGV[11] binding_id ('' = any)
-- Returns {exhausted 1|0, lowest id looked at ('' if none), HGETALL...}.
-- Filters other than the index's own are checked on each run it yields; the
-- walk stops after ARGV[4] entries so one call is bounded even when few match.
local B = ARGV[1]
local before = check_opt_int('before id', ARGV[2], 0, 9007199254740991)
local want = check_int('limit', ARGV[3], 1, 101)
local budget = check_int('scan limit', ARGV[4], 1, 100000)
local statuses = {}
local any_status = ARGV[5] == ''
for s in string.gmatch(ARGV[5], '[^,]+') do statuses[s] = true end
local runner, binding = ARGV[10] or '', ARGV[11] or ''

local out = { 0, '' }
local found = 0
local seen = 0
if before and before <= 1 then
  out[1] = 1
  return out
end
local max = before and ('(' .. fmt(before) .. '-0') or '+'
while found < want and seen < budget do
  local batch = math.min(100, budget - seen)
  local entries = redis.call('XREVRANGE', KEYS[1], max, '-', 'COUNT', batch)
  if #entries == 0 then out[1] = 1; break end
  for _, entry in ipairs(entries) do
    seen = seen + 1
    local id = string.match(entry[1], '^(%d+)')
    out[2] = id
    max = '(' .. entry[1]
    local rk = B .. 'run:' .. entry[2][2]
    local v = redis.call('HMGET', rk, 'status', 'conversation_id', 'bot_id', 'workspace_id', 'thread_id',
      'runner_id', 'binding_id')
    local ok = v[1] and (any_status or statuses[v[1]])
      and (ARGV[6] == '' or v[2] == ARGV[6]) and (ARGV[7] == '' or v[3] == ARGV[7])
      and (ARGV[8] == '' or v[4] == ARGV[8])
      and (ARGV[9] == '' or (ARGV[9] == '-' and not v[5]) or (v[5] and ARGV[9] == '=' .. v[5]))
      and (runner == '' or v[6] == runner) and (binding == '' or v[7] == binding)
    if ok then
      out[#out + 1] = run_fields(B, entry[2][2])
      found = found + 1
      if found >= want then break end
    end
  end
  if #entries < batch and found < want then out[1] = 1; break end
end
return out
