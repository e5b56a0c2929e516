-- Take member ARGV[1] of a sorted set whose score (when it is due, or its lease) has come by
-- ARGV[2]: leased to the caller until ARGV[3]. Answers the score it had for the one caller
-- that took it, nil for the others.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return score
end
return false
