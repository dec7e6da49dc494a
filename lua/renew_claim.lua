-- renew_claim: extend the lease of a claim the caller still holds.
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- KEYS[8]     <P>:{Q}:run:<run_id>  HASH the run
-- ARGV[1] key base   ARGV[2] run_id   ARGV[3] claim token
-- ARGV[4] lease ms (1 .. 86400000)    ARGV[5] retention ms (checked, unused: no TTL on finished runs)
-- ARGV[6] runtime id ('' or absent = any): the claim must be held by that runtime too
-- Returns HGETALL of the run; its cancel_requested_at tells the holder that a
-- cancellation was asked for. Errors: NOT_FOUND, STALE_TOKEN (the claim was
-- lost, or its lease expired by the server's clock even if nobody claimed the
-- run since), DEADLINE (the run passed its deadline and is now `timeout`).
-- Safe to resend: a second renewal extends the lease from its own time.
local B = ARGV[1]
local rid = ARGV[2]
check_id('run_id', rid)
local token = ARGV[3]
if token == '' then fail('INVALID', 'claim token must not be empty') end
local lease = check_int('lease ms', ARGV[4], 1, 86400000)
local retention = check_int('retention ms', ARGV[5], 0, 1e13)
local runtime = ARGV[6] or ''
check_opt_id('runtime_id', runtime)

local rk = KEYS[8]
local h = load_run(rk, rid)
local now = now_ms()
check_holder(h, rid, token, now, runtime)
if h.deadline_at and h.deadline_at <= now then
  finish(B, rid, h, 'timeout', 'deadline passed', now)
  fail('DEADLINE', 'run ' .. rid .. ' passed its deadline and is now timeout')
end
redis.call('HSET', rk, 'claim_lease_expires_at', now + lease, 'updated_at', now)
redis.call('ZADD', K.leases, now + lease, rid)
if h.group then redis.call('ZADD', group_key(B, h.group, 'active'), 'XX', now + lease, rid) end
-- A shorter lease than the one it replaces can end before the hint says.
if now + lease < h.lease_expires then lower_next_due(B, now + lease) end
return run_fields(B, rid)
