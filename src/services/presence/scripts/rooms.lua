-- Presence: this node's set of (shard, room) it writes presence in, for a
-- reaper after its death. KEYS[1] the set   ARGV[1] '+' or '-'   ARGV[2..n+1]
-- entries '<shard>:<room>'; ARGV[n+2] is the stamped run id (ignored):
-- ARGV[#ARGV] is never an entry.
local n = #ARGV - 2
for i = 2, n + 1 do
  if ARGV[1] == '+' then redis.call('SADD', KEYS[1], ARGV[i]) else redis.call('SREM', KEYS[1], ARGV[i]) end
end
return n
