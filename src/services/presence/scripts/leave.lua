-- Presence: the grace of a Zero (or the debounce of a Vacant: user '') is
-- over. Is it still owed (nobody came back, and no later transition took
-- it)? Taken if so.
-- KEYS[1] owed leaves   KEYS[2] totals   KEYS[3] clients
-- ARGV[1] user ('' for the room)   ARGV[2] token
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  if ARGV[1] == '' then
    if redis.call('EXISTS', KEYS[3]) == 0 then return 1 end
  elseif redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
    return 1
  end
end
return 0
