-- Presence (PROTOCOL.md §11): one writer (a node's shard) sets its absolute
-- count of each listed user's connections in one room; the room's totals,
-- member order and owed leaves follow, and the transitions are returned.
-- The same steps as `services/presence/table.rs` (Table::set).
--
-- KEYS[1] the writer's hash (user -> count)   KEYS[2] totals (user -> count)
-- KEYS[3] member order (zset, score 0)        KEYS[4] clients (string)
-- KEYS[5] owed leaves (user -> token)
-- ARGV[1] token for a Zero or Vacant   ARGV[2] flags: 'j' join/leave, 'r'
-- occupied/vacated   ARGV[3] owed-leave key TTL (ms)   ARGV[4] n
-- ARGV[5..] n pairs user, count   (an ARGV after them, the run id the link
-- stamps, is ignored)
-- Returns { kind, user, ... } with kind 'j' (join), 'z' (zero: a leave is
-- owed after the grace, under ARGV[1]), 'o' (occupied) or 'v' (vacant:
-- vacated is owed, under ARGV[1], in the owed-leave hash as user '').
local out = {}
local n = tonumber(ARGV[4])
local jl = string.find(ARGV[2], 'j', 1, true) ~= nil
local rooms = string.find(ARGV[2], 'r', 1, true) ~= nil
local before = tonumber(redis.call('GET', KEYS[4]) or '0')
for i = 0, n - 1 do
  local user = ARGV[5 + 2 * i]
  local count = tonumber(ARGV[6 + 2 * i])
  local old = tonumber(redis.call('HGET', KEYS[1], user) or '0')
  if count ~= old then
    if count == 0 then
      redis.call('HDEL', KEYS[1], user)
    else
      redis.call('HSET', KEYS[1], user, count)
    end
    local d = count - old
    local clients = redis.call('INCRBY', KEYS[4], d)
    if clients <= 0 then redis.call('DEL', KEYS[4]) end
    local total = redis.call('HINCRBY', KEYS[2], user, d)
    if total == d and d > 0 then
      redis.call('ZADD', KEYS[3], 0, user)
      if jl and redis.call('HDEL', KEYS[5], user) == 0 then
        out[#out + 1] = 'j'
        out[#out + 1] = user
      end
    elseif total <= 0 then
      redis.call('HDEL', KEYS[2], user)
      redis.call('ZREM', KEYS[3], user)
      if jl then
        redis.call('HSET', KEYS[5], user, ARGV[1])
        redis.call('PEXPIRE', KEYS[5], ARGV[3])
        out[#out + 1] = 'z'
        out[#out + 1] = user
      end
    end
  end
end
if rooms then
  local after = tonumber(redis.call('GET', KEYS[4]) or '0')
  if before == 0 and after > 0 and redis.call('HDEL', KEYS[5], '') == 0 then
    out[#out + 1] = 'o'
    out[#out + 1] = ''
  elseif before > 0 and after == 0 then
    redis.call('HSET', KEYS[5], '', ARGV[1])
    redis.call('PEXPIRE', KEYS[5], ARGV[3])
    out[#out + 1] = 'v'
    out[#out + 1] = ''
  end
end
return out
