-- request_cancel: cancel a run, or ask its holder to stop.
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- KEYS[8]     <P>:{Q}:run:<run_id>  HASH the run
-- KEYS[9]     <P>:{Q}:cancel        pub/sub channel the workers listen on
-- ARGV[1] key base   ARGV[2] run_id   ARGV[3] status_reason ('' = none)
-- ARGV[4] retention ms (checked, unused: finished runs carry no TTL; kept so the positions stay)
-- ARGV[5] publish command: SPUBLISH on a cluster (KEYS[9] is a sharded
--         channel in the queue's slot), PUBLISH on a single server
-- A queued (or delayed) or created run becomes `cancelled` at once and leaves the queue
-- (nobody holds it, so nobody needs a notice).
-- A claimed or running run gets cancel_requested_at, and its run_id is
-- published on the cancel channel so the worker holding it stops at once.
-- A finished run is returned unchanged.
-- Returns HGETALL of the run. Errors: NOT_FOUND.
local B = ARGV[1]
local rid = ARGV[2]
check_id('run_id', rid)
check_text('status_reason', ARGV[3], 4096)
local retention = check_int('retention ms', ARGV[4], 0, 1e13)
local publish = check_publish(ARGV[5])

local rk = KEYS[8]
local h = load_run(rk, rid)
if TERMINAL[h.status] then return run_fields(B, rid) end
local now = now_ms()
-- The notice goes out before the first write: a user without rights on the
-- channel is refused with nothing written (the holder reads nothing from
-- the hash when notified, so the order does not matter to it).
local unheld = h.status == 'queued' or h.status == 'created'
if not unheld then redis.call(publish, KEYS[9], rid) end
redis.call('HSET', rk, 'cancel_requested_at', now, 'updated_at', now)
if ARGV[3] ~= '' then redis.call('HSET', rk, 'status_reason', ARGV[3]) end
if unheld then
  finish(B, rid, h, 'cancelled', ARGV[3] ~= '' and ARGV[3] or ('cancelled while ' .. h.status), now)
end
return run_fields(B, rid)
