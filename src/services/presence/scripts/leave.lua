-- Presence: the grace of a Zero is over. Is the leave still owed (nobody
-- came back, and no other Zero took the user since)? Taken if so.
-- KEYS[1] owed leaves   KEYS[2] totals   ARGV[1] user   ARGV[2] token
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 1 end
end
return 0
