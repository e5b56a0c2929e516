-- Clear the held DMs a summary carried, and the person's due summary once none is left: a DM
-- held while that summary was being sent stays, for the next one (nothing is lost).
-- KEYS[1] the person's held DMs, KEYS[2] the due summaries; ARGV[1] the person, ARGV[2..] the
-- fields the summary carried. Returns how many held DMs are left.
for i = 2, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
end
local left = redis.call('HLEN', KEYS[1])
if left == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return left
