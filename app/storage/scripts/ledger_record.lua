-- Record one deployment in its pipeline's ledger, idempotently: a webhook and a poll (or two
-- replicas, or a ledger rebuild) may report the same build twice.
-- KEYS: the deployment, the pipeline's ledger, the pipelines, their info.
-- ARGV: the deployment's JSON, its number, when it finished (0: not final yet), when it
-- expires (unix s), entries kept, the pipeline, when it started (unix s), the deployment
-- keys' prefix, the pipeline's info JSON ('' if unknown), how long the indexes are kept (s),
-- and the oldest time a pipeline's last deployment may have to stay listed.
-- A final report replaces a running one, and a later final (a retried build) an earlier one;
-- a running report never replaces anything. Returns 1 if written, 0 if nothing changed.
local finished = tonumber(ARGV[3])
local old = redis.call('GET', KEYS[1])
if old then
  local was = cjson.decode(old)['f']
  local before = (type(was) == 'number') and was or 0
  if finished == 0 or finished <= before then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'EXAT', ARGV[4])
local keep = tonumber(ARGV[10])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], keep)
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if extra > 0 then
  for _, number in ipairs(redis.call('ZRANGE', KEYS[2], 0, extra - 1)) do
    redis.call('DEL', ARGV[8] .. number)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
end
redis.call('ZADD', KEYS[3], 'GT', ARGV[7], ARGV[6])
local cutoff = '(' .. ARGV[11]
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', cutoff)) do
  redis.call('HDEL', KEYS[4], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', cutoff)
redis.call('EXPIRE', KEYS[3], keep)
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[6], ARGV[9])
  redis.call('EXPIRE', KEYS[4], keep)
end
return 1
