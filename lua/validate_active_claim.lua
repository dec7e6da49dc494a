-- validate_active_claim: is the run held with this token, by this runtime,
-- under a lease that has not expired by the server's clock? (LangBot's
-- validate_active_claim, for a host that lets a runtime write on its behalf.)
--
-- KEYS[1] <P>:{Q}:run:<run_id>  HASH the run
-- ARGV[1] run_id   ARGV[2] claim token   ARGV[3] runtime id ('' = any holder)
-- Returns 1 for an active claim, else 0 (also for a run that does not exist).
-- Reads only.
check_id('run_id', ARGV[1])
if ARGV[2] == '' then fail('INVALID', 'claim token must not be empty') end
check_opt_id('runtime_id', ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'status', 'claim_token', 'claim_lease_expires_at', 'claimed_by_runtime_id')
if v[1] ~= 'claimed' or v[2] ~= ARGV[2] then return 0 end
if ARGV[3] ~= '' and v[4] ~= ARGV[3] then return 0 end
local expires = tonumber(v[3] or '')
if not expires or expires <= now_ms() then return 0 end
return 1
