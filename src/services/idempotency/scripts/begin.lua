-- Idempotency (POST /api/publish, PROTOCOL.md §12): claims key K for one
-- call, or says who has it.
-- KEYS[1] {<prefix>idem:<hex K>}, a hash: fp (the targets' fingerprint),
--   state ('p' in flight, 'd' done), token (the claimer's), reply (done).
-- ARGV[1] fingerprint   ARGV[2] token   ARGV[3] in-flight TTL (ms)
-- ARGV[4] the stamped run id (ignored).
-- Returns {'new'}, {'conflict'}, {'pending'} or {'done', reply}.
local v = redis.call('HMGET', KEYS[1], 'fp', 'state', 'reply')
if not v[1] then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'state', 'p', 'token', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'new'}
end
if v[1] ~= ARGV[1] then return {'conflict'} end
if v[2] == 'd' then return {'done', v[3]} end
return {'pending'}
