-- release_claim: give up a claim, back to the queue or to a terminal status.
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- KEYS[8]     <P>:{Q}:run:<run_id>  HASH the run
-- ARGV[1] key base   ARGV[2] run_id   ARGV[3] claim token
-- ARGV[4] status: queued | completed | failed | cancelled | timeout
-- ARGV[5] status_reason ('' = none: the old reason is cleared, as in the seed)
-- ARGV[6] retry delay ms (0 = claimable at once; only with status queued)
-- ARGV[7] retention ms (checked, unused: finished runs carry no TTL; kept so the positions stay)
-- ARGV[8] runtime id ('' or absent = any): the claim must be held by that runtime too
-- Returns HGETALL of the run. Errors: NOT_FOUND, STALE_TOKEN (also when the
-- lease expired by the server's clock).
-- A release leaves a receipt (<P>:{Q}:receipt:<token> = '{released}' and a
-- digest of the request), so a resend of the same release after a lost reply
-- returns the run instead of STALE_TOKEN; another release with that token is
-- STALE_TOKEN as usual.
local B = ARGV[1]
local rid = ARGV[2]
check_id('run_id', rid)
local token = ARGV[3]
if token == '' then fail('INVALID', 'claim token must not be empty') end
local status = ARGV[4]
if status ~= 'queued' and not TERMINAL[status] then
  fail('INVALID', "release status must be queued, completed, failed, cancelled or timeout, got '" .. status .. "'")
end
check_text('status_reason', ARGV[5], 4096)
local delay = check_int('retry delay ms', ARGV[6], 0, 1e12)
if delay > 0 and status ~= 'queued' then fail('INVALID', 'a retry delay needs status queued') end
local retention = check_int('retention ms', ARGV[7], 0, 1e13)
local runtime = ARGV[8] or ''
check_opt_id('runtime_id', runtime)

local rk = KEYS[8]
local h = load_run(rk, rid)
local receipt = receipt_key(B, token)
local request = '{released}' .. redis.sha1hex(status .. '\0' .. ARGV[5] .. '\0' .. ARGV[6])
if redis.call('GET', receipt) == request then return run_fields(B, rid) end
local now = now_ms()
check_holder(h, rid, token, now, runtime)
redis.call('SET', receipt, request, 'PX', RECEIPT_MS)
-- The release's reason replaces the old one, and none clears it (as the
-- seed does): a run released back to the queue should not keep saying
-- "user cancelled".
if ARGV[5] == '' then redis.call('HDEL', rk, 'status_reason') end
if TERMINAL[status] then
  finish(B, rid, h, status, ARGV[5], now)
  return run_fields(B, rid)
end
redis.call('ZREM', K.leases, rid)
if h.group then group_lease_ended(B, rid, h) end
clear_claim(rk)
redis.call('HSET', rk, 'status', 'queued', 'updated_at', now)
if ARGV[5] ~= '' then redis.call('HSET', rk, 'status_reason', ARGV[5]) end
if delay > 0 then
  h.not_before = fmt(now + delay)
  redis.call('HSET', rk, 'not_before', h.not_before)
else
  h.not_before = nil
  redis.call('HDEL', rk, 'not_before')
end
h.status = 'queued'
count_queued(B, h, 1)
requeue(B, rid, h, now)
return run_fields(B, rid)
