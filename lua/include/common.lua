-- common.lua: helpers every runledger script uses: errors, argument checks,
-- the server clock and fencing.
--
-- The Rust side prepends it to each script in lua/ (queue scripts also get
-- include/queue.lua, the two that claim include/claim.lua), so each operation
-- is still one self-contained EVALSHA. A script gets only the includes it
-- uses, because every call runs their definitions again.
--
-- Errors are raised as `CODE message`; codes: INVALID, NOT_FOUND, STALE_TOKEN,
-- CONFLICT, FINISHED, OUT_OF_ORDER, DEADLINE, RETRY, UNREGISTERED. Every script validates
-- all of its arguments before its first write.

local TERMINAL = { completed = true, failed = true, cancelled = true, timeout = true }

-- Event sequences are exact integers in Lua (a double) and in JSON: below 2^53.
local MAX_SEQUENCE = 9007199254740991
local MAX_EVENTS_PER_CALL = 1000

local function fail(code, msg)
  error({ err = code .. ' ' .. msg })
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Numbers passed to redis.call are formatted with snprintf on every call;
-- the hot paths pass strings (constants as literals, `now` formatted once).
local function fmt(n)
  return string.format('%.0f', n)
end

local function check_id(name, v)
  if v == nil or v == '' then fail('INVALID', name .. ' must not be empty') end
  if #v > 200 then fail('INVALID', name .. ' is longer than 200 bytes') end
  if string.find(v, '[%c{}]') then
    fail('INVALID', name .. ' must not contain control characters, { or }')
  end
end

local function check_opt_id(name, v)
  if v ~= '' then check_id(name, v) end
end

local function check_int(name, v, lo, hi)
  local n = tonumber(v)
  if n == nil or n ~= math.floor(n) or n < lo or n > hi then
    fail('INVALID', name .. ' must be an integer in [' .. fmt(lo) .. ', ' .. fmt(hi) .. '], got ' .. tostring(v))
  end
  return n
end

local function check_opt_int(name, v, lo, hi)
  if v == '' then return nil end
  return check_int(name, v, lo, hi)
end

-- A cheap shape check; the client has already parsed the JSON with serde.
local function check_json(name, v, open, close, max_bytes)
  if v == '' then return end
  if #v > max_bytes then
    fail('INVALID', name .. ' is ' .. #v .. ' bytes, over the limit of ' .. max_bytes)
  end
  if string.sub(v, 1, 1) ~= open or string.sub(v, -1) ~= close then
    fail('INVALID', name .. ' must be a JSON ' .. (open == '{' and 'object' or 'array'))
  end
end

local function check_publish(v)
  if v ~= 'PUBLISH' and v ~= 'SPUBLISH' then fail('INVALID', 'publish command must be PUBLISH or SPUBLISH') end
  return v
end

local function check_text(name, v, max_bytes)
  if #v > max_bytes then fail('INVALID', name .. ' is longer than ' .. max_bytes .. ' bytes') end
end

local function hgetall(rk)
  return redis.call('HGETALL', rk)
end

-- Loads only what fencing needs (status, claim_token, lease expiry) of a run
-- that must exist: the event path reads three fields, not every routing field.
local function load_holder(rk, rid)
  local v = redis.call('HMGET', rk, 'status', 'claim_token', 'claim_lease_expires_at')
  if not v[1] then fail('NOT_FOUND', 'run ' .. rid .. ' does not exist') end
  return { status = v[1], claim_token = v[2] or nil, lease_expires = tonumber(v[3] or '') }
end

-- Fencing: with a token ('' = host call), the run must still be held with it
-- under a lease that has not expired by the server's clock `now` (an active
-- claim): an expired lease can neither be renewed nor written to, even when
-- nobody has claimed the run again yet.
local function check_holder(h, rid, token, now)
  if token == '' then return end
  if h.status ~= 'claimed' or h.claim_token ~= token then
    fail('STALE_TOKEN', 'run ' .. rid .. ' is no longer held with this claim token (status ' .. h.status .. ')')
  end
  if not h.lease_expires or h.lease_expires <= now then
    fail('STALE_TOKEN', 'the lease on run ' .. rid .. ' expired at ' .. fmt(h.lease_expires or 0) ..
      ' ms (server clock ' .. fmt(now) .. '); the run may be claimed again')
  end
end

-- The sequence of a stream's last event (0 when it has none).
local function last_sequence(sk)
  local top = redis.call('XREVRANGE', sk, '+', '-', 'COUNT', '1')
  if top[1] then return tonumber(string.match(top[1][1], '^(%d+)')) end
  return 0
end

-- Receipts make a resent call (its first reply was lost) give the first
-- call's answer: `<P>:{Q}:receipt:<request id>` STRING, kept RECEIPT_MS. The
-- request id is the claim token for claims and releases, a random id for
-- audit events. Values never collide with run ids, which cannot contain braces.
local RECEIPT_MS = '600000'

local function receipt_key(B, request)
  return B .. 'receipt:' .. request
end

local function check_request_id(v)
  if #v < 16 or #v > 64 or string.find(v, '[^%w%-_]') then
    fail('INVALID', 'request id must be 16..64 letters, digits, - or _')
  end
end
