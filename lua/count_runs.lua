-- count_runs: how many runs of one queue match list_runs' filters (its
-- `total`), walking one list index from a cursor, oldest first.
--
-- KEYS[1] the index to count (a STREAM with entry <id>-0 per run): <P>:{Q}:runs or
--         <P>:{Q}:idx:<conversation|bot|workspace|thread>:<value>
-- ARGV[1] key base
-- ARGV[2] '0' = the index's own filter is the only one: the count is XLEN
--         (O(1), ARGV[3..] unused); '1' = check each run's fields
-- ARGV[3] start after this entry id, exclusive ('' = from the oldest)
-- ARGV[4] how many index entries to look at, at most (1 .. 100000)
-- ARGV[5] statuses, comma separated ('' = any)
-- ARGV[6] conversation_id   ARGV[7] bot_id   ARGV[8] workspace_id ('' = any)
-- ARGV[9] thread filter: '' = none, '=' .. id = that thread, '-' = runs without a thread
-- ARGV[10] runner_id   ARGV[11] binding_id ('' = any)
-- Returns {matches, exhausted 1|0, last entry id looked at ('' if none)}.
-- Read only. Cost: O(1) with ARGV[2] = '0'; else one HMGET per entry looked
-- at, ARGV[4] at most per call; the client calls again from the cursor until
-- the index is exhausted, so a total costs one look per run of the index.
local B = ARGV[1]
if ARGV[2] == '0' then return { redis.call('XLEN', KEYS[1]), 1, '' } end
if ARGV[2] ~= '1' then fail('INVALID', "count mode must be '0' or '1'") end
local after = ARGV[3]
if after ~= '' and not string.find(after, '^%d+%-%d+$') then fail('INVALID', 'cursor must be a stream entry id') end
local budget = check_int('scan limit', ARGV[4], 1, 100000)
local statuses = {}
local any_status = ARGV[5] == ''
for s in string.gmatch(ARGV[5], '[^,]+') do statuses[s] = true end
local runner, binding = ARGV[10] or '', ARGV[11] or ''

local count, seen, last = 0, 0, after
local min = after ~= '' and ('(' .. after) or '-'
while seen < budget do
  local batch = math.min(100, budget - seen)
  local entries = redis.call('XRANGE', KEYS[1], min, '+', 'COUNT', batch)
  for _, entry in ipairs(entries) do
    seen = seen + 1
    last = entry[1]
    local v = redis.call('HMGET', B .. 'run:' .. entry[2][2], 'status', 'conversation_id', 'bot_id',
      'workspace_id', 'thread_id', 'runner_id', 'binding_id')
    if v[1] and (any_status or statuses[v[1]])
      and (ARGV[6] == '' or v[2] == ARGV[6]) and (ARGV[7] == '' or v[3] == ARGV[7])
      and (ARGV[8] == '' or v[4] == ARGV[8])
      and (ARGV[9] == '' or (ARGV[9] == '-' and not v[5]) or (v[5] and ARGV[9] == '=' .. v[5]))
      and (runner == '' or v[6] == runner) and (binding == '' or v[7] == binding) then
      count = count + 1
    end
  end
  if #entries < batch then return { count, 1, last } end
  min = '(' .. last
end
return { count, 0, last }
