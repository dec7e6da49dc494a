-- pause: pause or resume a queue, or one group of it. Claims skip what is
-- paused; its runs stay queued.
--
-- KEYS[1..7]  the queue keys (see include/queue.lua)
-- ARGV[1] key base <P>:{Q}:
-- ARGV[2] '1' = pause, '0' = resume
-- ARGV[3] group ('' = the whole queue)
-- ARGV[4] who asks (free text, up to 200 bytes, '' = unknown)
-- A paused queue answers every claim with nothing (meta `paused`, copied to
-- the hints that every claim reads, so a queue never paused costs nothing);
-- a paused group's runs leave the claim lanes (its limit is 0, see
-- group_limit in include/queue.lua) and come back on resume. Each change is
-- an audit entry in the queue's `audit` STREAM (fields type, group, by),
-- capped at about 1000 entries. A pause of what is paused already, or a
-- resume of what is not, changes nothing and records nothing.
-- Returns {1 = changed | 0 = already so, paused now 1|0}.
local B = ARGV[1]
local pause = ARGV[2]
if pause ~= '1' and pause ~= '0' then fail('INVALID', "pause must be '1' or '0'") end
local group = ARGV[3]
check_opt_id('group', group)
check_text('by', ARGV[4], 200)

local changed
if group == '' then
  local was = redis.call('HGET', B .. 'meta', 'paused') == '1'
  changed = was ~= (pause == '1')
  if changed and pause == '1' then
    redis.call('HSET', B .. 'meta', 'paused', '1')
    redis.call('HSET', B .. 'hints', 'paused', '1')
  elseif changed then
    redis.call('HDEL', B .. 'meta', 'paused')
    redis.call('HDEL', B .. 'hints', 'paused')
    -- Workers blocked on an empty claim look again.
    if redis.call('ZCARD', K.queued) > 0 then wake() end
  end
else
  if pause == '1' then
    changed = redis.call('SADD', B .. 'paused-groups', group) == 1
  else
    changed = redis.call('SREM', B .. 'paused-groups', group) == 1
  end
  if changed then rebalance(B, group, now_ms()) end
end
if changed then
  redis.call('XADD', B .. 'audit', 'MAXLEN', '~', '1000', '*', 'type', pause == '1' and 'paused' or 'resumed',
    'group', group, 'by', ARGV[4])
end
local paused
if group == '' then
  paused = redis.call('HGET', B .. 'meta', 'paused') == '1'
else
  paused = redis.call('SISMEMBER', B .. 'paused-groups', group) == 1
end
return { changed and 1 or 0, paused and 1 or 0 }
