-- Idempotency: the claimer's call is done. With ARGV[2] '+' its reply is
-- kept for the TTL; with '-' (it failed) the claim is dropped, so that a
-- retry does the call. Only the claim's own token may (a claim that
-- expired and was taken again is someone else's).
-- KEYS[1] the key (see begin.lua)   ARGV[1] token   ARGV[2] '+' or '-'
-- ARGV[3] reply   ARGV[4] TTL (ms)   ARGV[5] the stamped run id (ignored).
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if ARGV[2] == '+' then
  redis.call('HSET', KEYS[1], 'state', 'd', 'reply', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  redis.call('DEL', KEYS[1])
end
return 1
