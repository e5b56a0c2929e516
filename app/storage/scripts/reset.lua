-- Let a build's phase move back (it left a block step, or a finished build's jobs were retried).
-- Answers the build's generation, or -1 when it is not tracked.
local rec = load(KEYS[1])
if not rec then return -1 end
if ARGV[1] == '1' then rec.g = rec.g + 1 end
rec.r = 0
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
save(KEYS[1], rec, ARGV[4])
expire(KEYS[1], rec, ARGV[5], ARGV[4])
return rec.g
