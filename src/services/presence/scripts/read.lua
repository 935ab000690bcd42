-- Presence: the room's counts and a page of members after ARGV[1]
-- ('' = from the start), at most ARGV[2] (0: counts only).
-- KEYS[1] totals   KEYS[2] member order   KEYS[3] clients
-- Returns { clients, users, more (0/1), user, count, ... }
local clients = tonumber(redis.call('GET', KEYS[3]) or '0')
local users = redis.call('ZCARD', KEYS[2])
local limit = tonumber(ARGV[2])
local out = { clients, users, 0 }
if limit > 0 then
  local from = '-'
  if ARGV[1] ~= '' then from = '(' .. ARGV[1] end
  local ids = redis.call('ZRANGEBYLEX', KEYS[2], from, '+', 'LIMIT', 0, limit + 1)
  if #ids > limit then
    out[3] = 1
    ids[#ids] = nil
  end
  if #ids > 0 then
    local counts = redis.call('HMGET', KEYS[1], unpack(ids))
    for i = 1, #ids do
      out[#out + 1] = ids[i]
      out[#out + 1] = tonumber(counts[i] or '0')
    end
  end
end
return out
