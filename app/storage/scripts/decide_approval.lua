-- Decide a pending approval once: the first approve/reject wins, and nothing wins after expiry.
-- Answers 'decided' for the call that decided it, 'expired_now' for the call that found it
-- expired, else its status ('approved', 'rejected', 'refused', 'expired') or 'missing'.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'pending' then return status end
if tonumber(ARGV[3]) >= tonumber(redis.call('HGET', KEYS[1], 'expires_at')) then
  redis.call('HSET', KEYS[1], 'status', 'expired')
  redis.call('ZREM', KEYS[2], ARGV[4])
  return 'expired_now'
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'decided_by', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[4])
return 'decided'
