-- common.lua: helpers every runledger script uses: errors, argument checks,
-- the server clock and fencing.
--
-- The Rust side prepends it to each script in lua/ (queue scripts also get
-- include/queue.lua; finalize_run also the claim of claim_next_run.lua), so each operation
-- is still one self-contained EVALSHA. A script gets only the includes it
-- uses, because every call runs their definitions again.
--
-- Errors are raised as `CODE message`; codes: INVALID, NOT_FOUND, STALE_TOKEN,
-- CONFLICT, FINISHED, OUT_OF_ORDER, DEADLINE, RETRY, UNREGISTERED, LIMIT, CORRUPT (a run
-- hash edited into a state no script writes). Every script validates
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
-- Every number formatted here is an integer (times in ms, counts, lane
-- scores, all below 2^53): '%d' prints it as one, at half the cost of '%.0f'.
local function fmt(n)
  return string.format('%d', n)
end

-- True when s is valid UTF-8 (no overlongs, no surrogates): ids end up in
-- key names and replies that every reader decodes as text. Ids are at most
-- 200 bytes, so this stays O(1). Each well-formed sequence is replaced by
-- an ASCII byte, in C (gsub), so no two leftovers join into a false match;
-- any high byte left over is malformed. ASCII, the common case, costs one find.
local function valid_utf8(s)
  if not string.find(s, '[\128-\255]') then return true end
  local t = string.gsub(s, '[\194-\223][\128-\191]', 'x')
  t = string.gsub(t, '\224[\160-\191][\128-\191]', 'x')
  t = string.gsub(t, '[\225-\236\238\239][\128-\191][\128-\191]', 'x')
  t = string.gsub(t, '\237[\128-\159][\128-\191]', 'x')
  t = string.gsub(t, '\240[\144-\191][\128-\191][\128-\191]', 'x')
  t = string.gsub(t, '[\241-\243][\128-\191][\128-\191][\128-\191]', 'x')
  t = string.gsub(t, '\244[\128-\143][\128-\191][\128-\191]', 'x')
  return not string.find(t, '[\128-\255]')
end

local function check_utf8(name, v)
  if not valid_utf8(v) then fail('INVALID', name .. ' is not valid UTF-8') end
end

local function check_id(name, v)
  if v == nil or v == '' then fail('INVALID', name .. ' must not be empty') end
  if #v > 200 then fail('INVALID', name .. ' is longer than 200 bytes') end
  -- ASCII controls, C1 controls (U+0080..U+009F), and the hash-tag braces;
  -- a plain ASCII id (the common case) costs one find.
  if string.find(v, '[%c{}\128-\255]') then
    if string.find(v, '[%c{}]') or string.find(v, '\194[\128-\159]') then
      fail('INVALID', name .. ' must not contain control characters, { or }')
    end
    check_utf8(name, v)
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

-- A JSON object (open '{') or array (open '['), by its shape and size only:
-- the Rust library, which every entry point calls, parses and sizes each
-- document in full before it is sent (src/validate.rs), and a document is
-- stored as the text it was given. Parsing it again here would cost the hot
-- path a decode per document; the shape keeps a raw call from storing a
-- scalar where readers expect an object.
local function check_json(name, v, open, close, max_bytes)
  if v == '' then return end
  if #v > max_bytes then
    fail('INVALID', name .. ' is ' .. #v .. ' bytes, over the limit of ' .. max_bytes)
  end
  if string.byte(v, 1) ~= string.byte(open) or string.byte(v, -1) ~= string.byte(close) then
    fail('INVALID', name .. ' must be a JSON ' .. (open == '{' and 'object' or 'array'))
  end
end

local function check_publish(v)
  if v ~= 'PUBLISH' and v ~= 'SPUBLISH' then fail('INVALID', 'publish command must be PUBLISH or SPUBLISH') end
  return v
end

-- Free text (reasons, names): its size; the library sends only UTF-8.
local function check_text(name, v, max_bytes)
  if #v > max_bytes then fail('INVALID', name .. ' is longer than ' .. max_bytes .. ' bytes') end
end

local function hgetall(rk)
  return redis.call('HGETALL', rk)
end

-- A run's documents (metadata, authorization, usage, cost) longer than
-- DOC_INLINE_MAX bytes live in the queue's HASH <P>:{Q}:docs, in field
-- <letter>:<run_id> (m, a, u, c: DOC_FIELD), and the run hash holds DOCS_MARK
-- in their field (no JSON document starts with '@'). So the run hash keeps to
-- short values and stays a listpack at Redis's stock hash-max-listpack-value
-- (64), about half the memory of a hash table; and a field of one shared hash
-- costs about 45 bytes less than a key of its own (no key object, a shorter name).
-- Runs of earlier builds read as they were written: documents inline, or
-- DOC_MARK with the document in its own STRING key <P>:{Q}:doc:<field>:<run_id>.
local DOC_INLINE_MAX = 64
local DOCS_MARK = '@docs'
local DOC_MARK = '@doc'
local DOC_FIELD = { metadata = 'm:', authorization = 'a:', usage = 'u:', cost = 'c:' }

local function doc_key(B, rid, field)
  return B .. 'doc:' .. field .. ':' .. rid
end

-- The value to store in document field `field` of run rid: `v` itself when
-- short, else DOCS_MARK, with `v` written to the queue's docs hash. `old` is
-- the field as stored before (nil for a new run): a copy it points to that
-- `v` does not overwrite is deleted, so no document outlives its field.
local function doc_value(B, rid, field, v, old)
  if old == DOC_MARK then redis.call('DEL', doc_key(B, rid, field)) end
  if #v <= DOC_INLINE_MAX then
    if old == DOCS_MARK then redis.call('HDEL', B .. 'docs', DOC_FIELD[field] .. rid) end
    return v
  end
  redis.call('HSET', B .. 'docs', DOC_FIELD[field] .. rid, v)
  return DOCS_MARK
end

-- A document field's stored value, read back from where it was moved.
local function doc_text(B, rid, field, stored)
  if stored == DOCS_MARK then return redis.call('HGET', B .. 'docs', DOC_FIELD[field] .. rid) or '' end
  if stored == DOC_MARK then return redis.call('GET', doc_key(B, rid, field)) or '' end
  return stored
end

-- The fields of DOCUMENTS_ORDER hold documents (see DOC_INLINE_MAX).
local DOCUMENTS_ORDER = { 'metadata', 'authorization', 'usage', 'cost' }

-- Deletes the documents run rid moved out; `stored` holds its document
-- fields as stored, in DOCUMENTS_ORDER.
local function drop_docs(B, rid, stored)
  local fields, keys = {}, {}
  for i, field in ipairs(DOCUMENTS_ORDER) do
    if stored[i] == DOCS_MARK then fields[#fields + 1] = DOC_FIELD[field] .. rid end
    if stored[i] == DOC_MARK then keys[#keys + 1] = doc_key(B, rid, field) end
  end
  if fields[1] then redis.call('HDEL', B .. 'docs', unpack(fields)) end
  if keys[1] then redis.call('DEL', unpack(keys)) end
end

-- Every field of run rid as HGETALL gives them, documents read back in place,
-- with run_id and queue_name, which the hash does not store: its key names
-- them (<P>:{queue_name}:run:<run_id>). A run of an earlier build stores
-- them too, with the same values.
local function run_fields(B, rid)
  local f = redis.call('HGETALL', B .. 'run:' .. rid)
  if #f == 0 then return f end
  for i = 2, #f, 2 do
    local v = f[i]
    if v == DOCS_MARK or v == DOC_MARK then f[i] = doc_text(B, rid, f[i - 1], v) end
  end
  f[#f + 1] = 'run_id'
  f[#f + 1] = rid
  f[#f + 1] = 'queue_name'
  f[#f + 1] = string.match(B, '{(.*)}:$')
  return f
end

-- Loads only what fencing needs (status, claim_token, lease expiry) of a run
-- that must exist: the event path reads three fields, not every routing field.
local STATUSES = {
  created = true, queued = true, claimed = true, running = true, completed = true, failed = true, cancelled = true, timeout = true,
}

-- A run hash edited into a state no script writes: refused, never guessed at.
local function corrupt(rk, field, value)
  fail('CORRUPT', rk .. ' has ' .. field .. ' = ' .. string.format('%q', tostring(value)) ..
    ', which no runledger script writes; fix or delete the run by hand')
end

-- The fields every script decides with: a known status, a numeric lease.
local function check_stored(rk, status, lease_expires)
  if not STATUSES[status or ''] then corrupt(rk, 'status', status) end
  if lease_expires and not tonumber(lease_expires) then corrupt(rk, 'claim_lease_expires_at', lease_expires) end
  if status == 'claimed' and not lease_expires then corrupt(rk, 'claim_lease_expires_at', nil) end
end

local function load_holder(rk, rid)
  local v = redis.call('HMGET', rk, 'status', 'claim_token', 'claim_lease_expires_at', 'claimed_by_runtime_id')
  if not v[1] then fail('NOT_FOUND', 'run ' .. rid .. ' does not exist') end
  check_stored(rk, v[1], v[3])
  return { status = v[1], claim_token = v[2] or nil, lease_expires = tonumber(v[3] or ''), holder = v[4] or nil }
end

-- Fencing: with a token ('' = host call), the run must still be held with it
-- under a lease that has not expired by the server's clock `now` (an active
-- claim): an expired lease can neither be renewed nor written to, even when
-- nobody has claimed the run again yet.
-- With `runtime` (optional, '' or nil = any), the holder must be that runtime too.
local function check_holder(h, rid, token, now, runtime)
  if token == '' then return end
  if h.status ~= 'claimed' or h.claim_token ~= token then
    fail('STALE_TOKEN', 'run ' .. rid .. ' is no longer held with this claim token (status ' .. h.status .. ')')
  end
  if runtime and runtime ~= '' and h.holder ~= runtime then
    fail('STALE_TOKEN', 'run ' .. rid .. ' is held by runtime ' .. tostring(h.holder) .. ', not ' .. runtime)
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
