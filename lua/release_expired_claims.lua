-- release_expired_claims: take back claims whose lease has expired.
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- ARGV[1] key base
-- ARGV[2] now in epoch ms ('' = the server's clock)
-- ARGV[3] status for the released runs: queued (default) or a terminal status
-- ARGV[4] status_reason
-- ARGV[5] limit (1 .. 500)
-- ARGV[6] retention ms (checked, unused: finished runs carry no TTL; kept so the positions stay)
-- With status queued a run that used up max_attempts ends `failed` (dead).
-- Returns an array of HGETALL replies, oldest lease first.
-- Cost: O(limit * log n).
local B = ARGV[1]
local now = check_opt_int('now', ARGV[2], 0, 1e15)
local status = ARGV[3]
if status ~= 'queued' and not TERMINAL[status] then
  fail('INVALID', "status must be queued or terminal, got '" .. status .. "'")
end
check_text('status_reason', ARGV[4], 4096)
local limit = check_int('limit', ARGV[5], 1, 500)
local retention = check_int('retention ms', ARGV[6], 0, 1e13)
now = now or now_ms()
local ids = recover_expired(B, now, limit, status, ARGV[4])
local out = {}
for _, rid in ipairs(ids) do
  out[#out + 1] = run_fields(B, rid)
end
return out
