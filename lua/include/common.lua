-- common.lua: helpers every runledger script uses: errors, argument checks,
-- the server clock and fencing.
--
-- The Rust side prepends it to each script in lua/ (queue scripts also get
-- include/queue.lua, the two that claim include/claim.lua), so each operation
-- is still one self-contained EVALSHA. A script gets only the includes it
-- uses, because every call runs their definitions again.
--
-- Errors are raised as `CODE message`; codes: INVALID, NOT_FOUND, STALE_TOKEN,
-- CONFLICT, FINISHED, OUT_OF_ORDER, DEADLINE, RETRY. Every script validates
-- all of its arguments before its first write.

local TERMINAL = { completed = true, failed = true, cancelled = true, timeout = true }

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

-- Loads only what fencing needs (status, claim_token) of a run that must exist:
-- the event path reads two fields, not every routing field.
local function load_holder(rk, rid)
  local v = redis.call('HMGET', rk, 'status', 'claim_token')
  if not v[1] then fail('NOT_FOUND', 'run ' .. rid .. ' does not exist') end
  return { status = v[1], claim_token = v[2] or nil }
end

-- Fencing: with a token ('' = host call), the run must still be held with it.
local function check_holder(h, rid, token)
  if token ~= '' and (h.status ~= 'claimed' or h.claim_token ~= token) then
    fail('STALE_TOKEN', 'run ' .. rid .. ' is no longer held with this claim token (status ' .. h.status .. ')')
  end
end
