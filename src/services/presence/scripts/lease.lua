-- Presence: this node's lease, and the lapsed leases it takes over.
-- KEYS[1] the leases (zset node -> expiry, Redis ms)   KEYS[2] namespaces
-- (hash node -> digest)
-- ARGV[1] node id   ARGV[2] lease (ms)   ARGV[3] our namespaces' digest
-- ARGV[4] the key prefix of the claims and the nodes' room sets
-- Returns { new (1: our lease was absent), distinct digests, claimed node,
-- its room-set entries..., '', claimed node, ... }
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local new = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local out = { new, 0 }
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 8)
for _, node in ipairs(lapsed) do
  -- One claimant per lapsed node (a claim outlives a reap of many rooms).
  if redis.call('SET', ARGV[4] .. 'reap:' .. node, ARGV[1], 'NX', 'PX', 60000) then
    out[#out + 1] = node
    local rooms = redis.call('SMEMBERS', ARGV[4] .. 'rooms:' .. node)
    for _, r in ipairs(rooms) do out[#out + 1] = r end
    out[#out + 1] = ''
  end
end
local seen, n = {}, 0
for _, d in ipairs(redis.call('HVALS', KEYS[2])) do
  if not seen[d] then seen[d] = true; n = n + 1 end
end
out[2] = n
return out
