-- create_run: create a run if it does not exist yet (idempotent by run_id).
--
-- KEYS[1..7]  the queue keys (see include/common.lua)
-- KEYS[8]     <P>:{Q}:run:<run_id>   HASH the run
-- KEYS[9]     <P>:id                 STRING global run id counter
-- KEYS[10]    <P>:queues             SET names of known queues
--   KEYS[9] and KEYS[10] are the only keys outside the queue's slot; see the
--   README ("Redis Cluster") for how a cluster deployment handles them.
-- ARGV[1]  key base <P>:{Q}:
-- ARGV[2]  run_id          ARGV[3]  event_id        ARGV[4]  binding_id
-- ARGV[5]  runner_id       ARGV[6]  conversation_id ARGV[7]  thread_id
-- ARGV[8]  workspace_id    ARGV[9]  bot_id          ARGV[10] agent_id
-- ARGV[11] deadline_at ms  ARGV[12] authorization JSON object
-- ARGV[13] metadata JSON object                     ARGV[14] status: queued | running
-- ARGV[15] queue_name      ARGV[16] priority [-1000, 1000]
-- ARGV[17] requested_runtime_id                     ARGV[18] not_before ms
-- ARGV[19] max_attempts (0 = unlimited)             ARGV[20] max JSON bytes
--   '' means "not set" for every optional argument.
-- Returns {1, id, created_at_ms} when created (the caller knows the rest),
-- {0, HGETALL...} when it existed.
-- Cost: O(log n) in the queue depth.
local B = ARGV[1]
local rid = ARGV[2]
check_id('run_id', rid)
check_opt_id('event_id', ARGV[3])
check_opt_id('binding_id', ARGV[4])
check_id('runner_id', ARGV[5])
check_opt_id('conversation_id', ARGV[6])
check_opt_id('thread_id', ARGV[7])
check_opt_id('workspace_id', ARGV[8])
check_opt_id('bot_id', ARGV[9])
check_opt_id('agent_id', ARGV[10])
local deadline = check_opt_int('deadline_at', ARGV[11], 0, 1e15)
local max_bytes = check_int('max JSON bytes', ARGV[20], 1, 512 * 1024 * 1024)
check_json('authorization', ARGV[12], '{', '}', max_bytes)
check_json('metadata', ARGV[13], '{', '}', max_bytes)
local status = ARGV[14]
if status ~= 'queued' and status ~= 'running' then
  fail('INVALID', "status must be 'queued' or 'running', got '" .. status .. "'")
end
check_id('queue_name', ARGV[15])
local priority = check_int('priority', ARGV[16], -1000, 1000)
check_opt_id('requested_runtime_id', ARGV[17])
local not_before = check_opt_int('not_before', ARGV[18], 0, 1e15)
local max_attempts = check_int('max_attempts', ARGV[19], 0, 1000000)

local rk = KEYS[8]
if redis.call('EXISTS', rk) == 1 then
  return { 0, hgetall(rk) }
end

local now = now_ms()
local id = redis.call('INCR', KEYS[9])
redis.call('SADD', KEYS[10], ARGV[15])
local fields = {
  'id', id, 'run_id', rid, 'runner_id', ARGV[5], 'status', status, 'queue_name', ARGV[15],
  'priority', priority, 'dispatch_attempts', 0, 'created_at', now, 'updated_at', now,
}
local optional = {
  event_id = ARGV[3], binding_id = ARGV[4], conversation_id = ARGV[6], thread_id = ARGV[7],
  workspace_id = ARGV[8], bot_id = ARGV[9], agent_id = ARGV[10], deadline_at = ARGV[11],
  authorization = ARGV[12], metadata = ARGV[13], requested_runtime_id = ARGV[17],
  not_before = ARGV[18],
}
for name, v in pairs(optional) do
  if v ~= '' then
    fields[#fields + 1] = name
    fields[#fields + 1] = v
  end
end
if max_attempts > 0 then
  fields[#fields + 1] = 'max_attempts'
  fields[#fields + 1] = max_attempts
end
if status == 'running' then
  fields[#fields + 1] = 'started_at'
  fields[#fields + 1] = now
end
redis.call('HSET', rk, unpack(fields))

redis.call('ZADD', B .. 'runs', id, rid)
for _, scope in ipairs({ { 'conversation', ARGV[6] }, { 'bot', ARGV[9] }, { 'workspace', ARGV[8] }, { 'thread', ARGV[7] } }) do
  if scope[2] ~= '' then redis.call('ZADD', B .. 'idx:' .. scope[1] .. ':' .. scope[2], id, rid) end
end
if deadline then redis.call('ZADD', K.deadlines, deadline, rid) end
redis.call('HINCRBY', K.stats, 'created', 1)

if status == 'queued' then
  local h = { id = id, priority = priority, runner_id = ARGV[5], not_before = ARGV[18] ~= '' and ARGV[18] or nil }
  if ARGV[17] ~= '' then h.requested_runtime_id = ARGV[17] end
  requeue(B, rid, h, now)
end
return { 1, id, now }
