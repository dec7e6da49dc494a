-- append_audit_event: a host-authored event after the run's last sequence.
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- KEYS[8]     <P>:{Q}:run:<run_id>         HASH the run
-- KEYS[9]     <P>:{Q}:events:<run_id>  STREAM its events
-- ARGV[1] key base   ARGV[2] run_id   ARGV[3] type
-- ARGV[4] data (JSON object)   ARGV[5] metadata (JSON object or '')
-- ARGV[6] max JSON bytes
-- ARGV[7] request id ('' = none): a resend with the same id returns the first
--         call's event instead of writing it twice (receipt <P>:{Q}:receipt:<id>)
-- ARGV[8] the most events a run may hold (1 .. 10,000,000)
-- Allowed on finished runs too.
-- Returns {sequence, created_at_ms}. Errors: NOT_FOUND, LIMIT (the run holds ARGV[8] events).
local rid = ARGV[2]
check_id('run_id', rid)
check_id('event type', ARGV[3])
local max_bytes = check_int('max JSON bytes', ARGV[6], 1, 512 * 1024 * 1024)
if ARGV[4] == '' then fail('INVALID', 'event data must be a JSON object') end
check_json('event data', ARGV[4], '{', '}', max_bytes)
check_json('event metadata', ARGV[5], '{', '}', max_bytes)
local request = ARGV[7] or ''
local max_events = check_int('max events per run', ARGV[8], 1, 1e7)
if request ~= '' then check_request_id(request) end

local rk, sk = KEYS[8], KEYS[9]
if redis.call('EXISTS', rk) == 0 then fail('NOT_FOUND', 'run ' .. rid .. ' does not exist') end
local receipt = request ~= '' and receipt_key(ARGV[1], request)
if receipt then
  local earlier = redis.call('GET', receipt)
  if earlier then
    local seq, at = string.match(earlier, '^(%d+) (%d+)$')
    return { tonumber(seq), tonumber(at) }
  end
end
local held = redis.call('XLEN', sk)
if held >= max_events then
  fail('LIMIT', 'run ' .. rid .. ' holds ' .. held .. ' events, the limit of ' .. fmt(max_events) .. ' events per run')
end
local seq = last_sequence(sk) + 1
if seq > MAX_SEQUENCE then fail('INVALID', 'run ' .. rid .. ' has no event sequence left') end
local now = now_ms()
local f = { 'type', ARGV[3], 'data', ARGV[4], 'source', 'host', 'created_at', now }
if ARGV[5] ~= '' then f[#f + 1] = 'metadata'; f[#f + 1] = ARGV[5] end
redis.call('XADD', sk, fmt(seq) .. '-0', unpack(f))
if receipt then redis.call('SET', receipt, fmt(seq) .. ' ' .. fmt(now), 'PX', RECEIPT_MS) end
return { seq, now }
