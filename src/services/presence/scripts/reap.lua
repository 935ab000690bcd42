-- Presence: a dead writer's connections stop counting in one room (its
-- node's lease lapsed), and the leaves its node owed become ours.
-- KEYS[1] the dead writer's hash   KEYS[2] totals   KEYS[3] member order
-- KEYS[4] clients   KEYS[5] owed leaves
-- ARGV[1] our token for a Zero or Vacant   ARGV[2] flags as set.lua's
-- ARGV[3] owed-leave key TTL (ms)   ARGV[4] the dead writer's token prefix
-- ('<writer>:')
-- Returns { 'z', user, ... } and { 'v', '' }: leaves (and vacated) now
-- owed under ARGV[1].
local out = {}
local jl = string.find(ARGV[2], 'j', 1, true) ~= nil
local rooms = string.find(ARGV[2], 'r', 1, true) ~= nil
local before = tonumber(redis.call('GET', KEYS[4]) or '0')
local w = redis.call('HGETALL', KEYS[1])
for i = 1, #w, 2 do
  local user, old = w[i], tonumber(w[i + 1])
  local clients = redis.call('INCRBY', KEYS[4], -old)
  if clients <= 0 then redis.call('DEL', KEYS[4]) end
  local total = redis.call('HINCRBY', KEYS[2], user, -old)
  if total <= 0 then
    redis.call('HDEL', KEYS[2], user)
    redis.call('ZREM', KEYS[3], user)
    if jl then
      redis.call('HSET', KEYS[5], user, ARGV[1])
      out[#out + 1] = 'z'
      out[#out + 1] = user
    end
  end
end
redis.call('DEL', KEYS[1])
if rooms and before > 0 and redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('HSET', KEYS[5], '', ARGV[1])
  out[#out + 1] = 'v'
  out[#out + 1] = ''
end
-- What the dead writer still owed (its grace timers died with it).
local p = redis.call('HGETALL', KEYS[5])
for i = 1, #p, 2 do
  if string.sub(p[i + 1], 1, #ARGV[4]) == ARGV[4] then
    redis.call('HSET', KEYS[5], p[i], ARGV[1])
    if p[i] == '' then out[#out + 1] = 'v' else out[#out + 1] = 'z' end
    out[#out + 1] = p[i]
  end
end
if #out > 0 then redis.call('PEXPIRE', KEYS[5], ARGV[3]) end
return out
