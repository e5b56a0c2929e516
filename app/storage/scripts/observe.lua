-- Compare-and-set of a build's phase. Only the process whose call changes the phase emits the
-- transition, so a change seen by a webhook, a poll and an API answer at once is emitted once.
-- A phase only moves forward (a late webhook cannot undo a newer state); a seemingly earlier
-- phase is answered {'regressed'} so the tracker can confirm it with Buildkite and `reset` first.
-- A change is answered {'changed', old phase} (and announced on the changes channel); no change
-- (or no record) false. A call for a build that is no longer tracked also drops it from the
-- pending set.
local key, pending, stream = KEYS[1], KEYS[2], KEYS[3]
local build_id, phase, rank = ARGV[1], ARGV[2], tonumber(ARGV[3])
local snapshot, final, now = ARGV[4], ARGV[5], ARGV[6]
local final_rank, bynum = tonumber(ARGV[10]), ARGV[11]
local rec = load(key)
if not rec then
  redis.call('ZREM', pending, build_id)
  return false
end
local old, old_rank = rec.ph, tonumber(rec.r)
if old == phase or rank <= old_rank then
  if old_rank < final_rank then
    redis.call('ZADD', pending, now, build_id)
    expire(key, rec, bynum, ARGV[9])
  end
  if old == phase then return false end
  return {'regressed'}
end
rec.ph, rec.r, rec.s = phase, rank, cjson.decode(snapshot)
redis.call('XADD', stream, 'MAXLEN', '~', ARGV[7], '*', 'build_id', build_id,
           'from', old, 'to', phase, 'gen', rec.g)
local ttl = ARGV[9]
if final == '1' then
  redis.call('ZREM', pending, build_id)
  ttl = ARGV[8]
else
  redis.call('ZADD', pending, now, build_id)
end
save(key, rec, ttl)
expire(key, rec, bynum, ttl)
-- Beside the stream, in the same step: wakes whoever waits on this build (agents), in any
-- replica, before the notifier's slower Slack work. Best effort (pcall): waits re-read anyway.
redis.pcall('PUBLISH', ARGV[13], ARGV[12])
return {'changed', old}
