-- Presence: a lapsed node is reaped: forget its lease, room set, digest.
-- KEYS[1] the leases   KEYS[2] namespaces   KEYS[3] its room set
-- ARGV[1] the node
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
