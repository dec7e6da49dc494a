-- finalize_run: move a run to a terminal status, with usage, cost and metadata.
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- KEYS[8]     <P>:{Q}:run:<run_id>  HASH the run
-- KEYS[9]     optional, on a single server only: <P>:locator:<run_id> (another
--             slot), which a finish gives the run's TTL (retention + 1 day)
--             itself; else the client does, in a call of its own
-- ARGV[1] key base   ARGV[2] run_id
-- ARGV[3] status: completed | failed | cancelled | timeout
-- ARGV[4] status_reason ('' = keep)
-- ARGV[5] usage JSON object ('' = keep)   ARGV[6] cost JSON object ('' = keep)
-- ARGV[7] '1' when ARGV[8..9] carry metadata, else '0'
-- ARGV[8] the run's metadata as the client read it ('' = none): a compare-and-set
--         guard, because the client merged the new keys into it
-- ARGV[9] merged metadata JSON object
-- ARGV[10] claim token ('' = host call without fencing)
-- ARGV[11] max JSON bytes   ARGV[12] retention ms
-- ARGV[13] '1' = reply without the run (workers do not read it back)
-- ARGV[14..] optional: claim the next run of this queue in the same call,
--   with the claim spec of claim_next_run (runtime_id, lease ms, new token,
--   retention ms, the four scope filters, runner_ids...). Saves a worker one round trip per run.
-- A fenced finish records its token as `finish_token`, so that the same
-- holder's retry is an idempotent no-op while any other token is STALE_TOKEN.
-- A fenced finish needs an active claim: a lease that expired by the server's
-- clock is STALE_TOKEN even when nobody has claimed the run again.
-- Resent with the same claim spec (same new token), it hands out the run the
-- first call claimed (see claim_again in claim_next_run.lua).
-- Returns {1 = finished now | 0 = already had this status, HGETALL... or {} when
-- quiet, the claim's reply when a claim was asked for (else 0), then the ids
-- of the runs this call purged (up to PURGE_PER_FINISH, past the retention):
-- the client deletes their locators, which live in other slots}.
-- Errors: NOT_FOUND, STALE_TOKEN, CONFLICT (finished with another status),
-- RETRY (metadata changed since the client read it; the library retries).
local B = ARGV[1]
local rid = ARGV[2]
check_id('run_id', rid)
local status = ARGV[3]
if not TERMINAL[status] then
  fail('INVALID', "finalize status must be completed, failed, cancelled or timeout, got '" .. status .. "'")
end
check_text('status_reason', ARGV[4], 4096)
local max_bytes = check_int('max JSON bytes', ARGV[11], 1, 512 * 1024 * 1024)
check_json('usage', ARGV[5], '{', '}', max_bytes)
check_json('cost', ARGV[6], '{', '}', max_bytes)
local with_meta = ARGV[7] == '1'
if with_meta then check_json('metadata', ARGV[9], '{', '}', max_bytes) end
local token = ARGV[10]
local retention = check_int('retention ms', ARGV[12], 0, 1e13)
local quiet = ARGV[13] == '1'
local next_claim = (ARGV[14] or '') ~= '' and parse_claim(14) or nil

local rk = KEYS[8]
local h = load_run(rk, rid)
-- The run's metadata as stored (read back from where it was moved).
local function current_metadata()
  return doc_text(B, rid, 'metadata', h.stored.metadata)
end
-- A document field's new stored value (see doc_value).
local function doc(field, v)
  return doc_value(B, rid, field, v, h.stored[field])
end
if TERMINAL[h.status] then
  -- A fenced call on a finished run is a retry only from the claim that
  -- finished it; any other token lost the run (its usage would be dropped).
  if token ~= '' and redis.call('HGET', rk, 'finish_token') ~= token then
    fail('STALE_TOKEN', 'run ' .. rid .. ' is no longer held with this claim token (status ' .. h.status .. ')')
  end
  if h.status == status then
    -- Finalized again with its status (LangBot's host does): metadata is
    -- merged, usage and cost replaced, a reason written, when given;
    -- finished_at stays. A resend of the same call writes the same values.
    if with_meta and current_metadata() ~= ARGV[8] then
      fail('RETRY', 'metadata of run ' .. rid .. ' changed meanwhile')
    end
    local again_now = now_ms()
    local fields = { 'updated_at', fmt(again_now) }
    if with_meta then fields[#fields + 1] = 'metadata'; fields[#fields + 1] = doc('metadata', ARGV[9]) end
    if ARGV[5] ~= '' then fields[#fields + 1] = 'usage'; fields[#fields + 1] = doc('usage', ARGV[5]) end
    if ARGV[6] ~= '' then fields[#fields + 1] = 'cost'; fields[#fields + 1] = doc('cost', ARGV[6]) end
    if ARGV[4] ~= '' then fields[#fields + 1] = 'status_reason'; fields[#fields + 1] = ARGV[4] end
    if #fields > 2 then redis.call('HSET', rk, unpack(fields)) end
    -- A resend after a lost reply answers as the first call did, with the run
    -- that call claimed (its receipt); a new request claims nothing here.
    local again = next_claim and claim_again(B, next_claim.token, again_now)
    return { 0, quiet and {} or run_fields(B, rid), again or 0 }
  end
  fail('CONFLICT', 'Cannot transition terminal run ' .. rid .. ' from ' .. h.status .. ' to ' .. status)
end
local now = now_ms()
check_holder(h, rid, token, now)
if with_meta and current_metadata() ~= ARGV[8] then
  fail('RETRY', 'metadata of run ' .. rid .. ' changed meanwhile')
end
-- The documents go in the finish's own HSET.
local extra = {}
if token ~= '' then extra[#extra + 1] = 'finish_token'; extra[#extra + 1] = token end
if with_meta then extra[#extra + 1] = 'metadata'; extra[#extra + 1] = doc('metadata', ARGV[9]) end
if ARGV[5] ~= '' then extra[#extra + 1] = 'usage'; extra[#extra + 1] = doc('usage', ARGV[5]) end
if ARGV[6] ~= '' then extra[#extra + 1] = 'cost'; extra[#extra + 1] = doc('cost', ARGV[6]) end
finish(B, rid, h, status, ARGV[4], now, extra)
if KEYS[9] then redis.call('PEXPIRE', KEYS[9], fmt(retention + 86400000)) end
-- Each finish purges up to two runs past the retention: the finished
-- stream shrinks at least as fast as it grows, with no reaper running.
-- The run is read back first: with a short retention it can be among those purged.
local fields = quiet and {} or run_fields(B, rid)
local purged = purge_finished(B, now, retention, PURGE_PER_FINISH)
-- The finish lands now for the first time, so its chained claim's token is new:
-- a resend of this call takes the terminal path above, to claim_again.
local reply = { 1, fields, next_claim and claim(B, next_claim, now, true) or 0 }
for _, id in ipairs(purged) do reply[#reply + 1] = id end
return reply
