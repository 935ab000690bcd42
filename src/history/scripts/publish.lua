-- corecast: publish one message into a room with history (PROTOCOL.md §7),
-- in one atomic step: assign the next offset, append to the room's stream,
-- trim it, refresh the TTLs, publish the completed message.
--
-- KEYS[1] {<prefix>room:R}:meta   hash: epoch, offset, run
-- KEYS[2] {<prefix>room:R}:log    stream, entry id <offset>-0, field m
-- KEYS[3] <prefix>room:R          the room's channel
-- ARGV[1] the message JSON without its closing brace
-- ARGV[2] a candidate epoch (random, from the node)
-- ARGV[3] history size N (MAXLEN)
-- ARGV[4] TTL in seconds
-- ARGV[5] PUBLISH or SPUBLISH
-- ARGV[6] the run_id of this Redis process (INFO server), as the node's
--         link read it when it connected; '' = ask Redis here
-- Returns {epoch, offset}.
--
-- The epoch is bound to the Redis process that drew it (`run` in meta). A
-- history this process did not write itself (loaded from an older
-- snapshot after a restart, or replicated to a replica that was then
-- promoted, maybe without the last writes) cannot be trusted to hold every
-- offset already delivered: a new epoch starts and the old stream goes.
local run = ARGV[6]
if run == '' then
  local info = redis.call('INFO', 'server')
  local at = string.find(info, 'run_id:', 1, true)
  run = string.sub(info, at + 7, at + 46)
end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'run')
local epoch = meta[1]
if not epoch or meta[2] ~= run then
  -- No trusted history (new room, expired, deleted, a Redis that lost its
  -- data, restarted or failed over): a new epoch, nothing left of the old.
  local t = redis.call('TIME')
  epoch = ARGV[2] .. '-' .. t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0, 'run', run)
end
local n = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local id = string.format('%d', n)
local msg = ARGV[1] .. ',"epoch":"' .. epoch .. '","offset":' .. id .. '}'
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], id .. '-0', 'm', msg)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call(ARGV[5], KEYS[3], msg)
return {epoch, n}
