-- corecast: read a room's history position and messages (PROTOCOL.md §7),
-- atomically with respect to publish.lua. Writes nothing, but for the
-- catch-up fence (ARGV[7]).
--
-- KEYS[1] {<prefix>room:R}:meta   KEYS[2] {<prefix>room:R}:log
-- ARGV[1] a candidate epoch (for the fence)
-- ARGV[2] TTL in seconds (of a history the fence renews)
-- ARGV[3] the epoch to read after ('' = the last messages)
-- ARGV[4] the offset to read after
-- ARGV[5] at most this many messages
-- ARGV[6] '1' for a listing (the history op): ARGV[3] from another epoch
--         reads the last messages instead of none
-- ARGV[7] '1' for a node's catch-up: ARGV[3]/ARGV[4] is a position the node
--         delivered. If it is past the history in the same epoch, this
--         history lost messages although this process wrote it (a failover
--         back to a primary that had resynced from a replica missing them):
--         a new epoch starts now, so that no offset is ever used for another
--         message than the one delivered under it.
-- ARGV[8] at most this many bytes of messages (at least one message): a page
-- ARGV[9] the run_id of this Redis process, as for publish.lua
-- Returns {epoch, T, id1, msg1, id2, msg2, ...} in offset order; {'', 0}
-- when the room has no history this process wrote (none, expired, or
-- loaded/replicated from elsewhere: publish.lua starts a new epoch there).
local run = ARGV[9]
if run == '' then
  local info = redis.call('INFO', 'server')
  local at = string.find(info, 'run_id:', 1, true)
  run = string.sub(info, at + 7, at + 46)
end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'offset', 'run')
local epoch = meta[1]
if not epoch or meta[3] ~= run then
  return {'', 0}
end
local last = tonumber(meta[2])
if ARGV[7] == '1' and ARGV[3] == epoch and tonumber(ARGV[4]) > last then
  local t = redis.call('TIME')
  epoch = ARGV[1] .. '-' .. t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0, 'run', run)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {epoch, 0}
end
local out = {epoch, last}
local limit = tonumber(ARGV[5])
local budget = tonumber(ARGV[8])
-- Appends one entry unless the page is full (the first always goes in).
local function add(e)
  local m = e[2][2]
  if #out > 2 and budget < #m then
    return false
  end
  budget = budget - #m
  out[#out + 1] = e[1]
  out[#out + 1] = m
  return true
end
if limit == 0 or last == 0 then
  return out
end
local entries
if ARGV[3] == '' or (ARGV[6] == '1' and ARGV[3] ~= epoch) then
  entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', limit)
  for i = #entries, 1, -1 do
    if not add(entries[i]) then
      break
    end
  end
  return out
end
local after = tonumber(ARGV[4])
if ARGV[3] ~= epoch or after >= last then
  return out
end
entries = redis.call('XRANGE', KEYS[2], string.format('%d', after + 1), '+', 'COUNT', limit)
for i = 1, #entries do
  if not add(entries[i]) then
    break
  end
end
return out
