-- corecast: publish one message into a room with history (PROTOCOL.md §7),
-- in one atomic step: assign the next offset, append to the room's stream,
-- trim it, refresh the TTLs, publish the completed message.
--
-- KEYS[1] {<prefix>room:R}:meta   hash: epoch, offset
-- KEYS[2] {<prefix>room:R}:log    stream, entry id <offset>-0, field m
-- KEYS[3] <prefix>room:R          the room's channel
-- ARGV[1] the message JSON without its closing brace
-- ARGV[2] a candidate epoch (random, from the node)
-- ARGV[3] history size N (MAXLEN)
-- ARGV[4] TTL in seconds
-- ARGV[5] PUBLISH or SPUBLISH
-- Returns {epoch, offset}.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  -- No history (new room, expired, deleted, or a Redis that lost its data):
  -- a new epoch, and nothing left of an older stream.
  local t = redis.call('TIME')
  epoch = ARGV[2] .. '-' .. t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
local n = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local id = string.format('%d', n)
local msg = ARGV[1] .. ',"epoch":"' .. epoch .. '","offset":' .. id .. '}'
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], id .. '-0', 'm', msg)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call(ARGV[5], KEYS[3], msg)
return {epoch, n}
