-- Shared by every script on a build's record (prepended to it). `load` returns the decoded
-- record, or nil when there is none. `save` keeps the key's TTL unless given one; `expire` sets
-- the TTL of the record and of its number index together. The index's name is built here from
-- the record (its template is an argument), in the same Cluster slot as every key of the bot.
local function load(key)
  local raw = redis.call('GET', key)
  if not raw then return nil end
  return cjson.decode(raw)
end
local function save(key, rec, ttl)
  if ttl then return redis.call('SET', key, cjson.encode(rec), 'EX', ttl) end
  return redis.call('SET', key, cjson.encode(rec), 'KEEPTTL')
end
local function expire(key, rec, bynum_template, ttl)
  redis.call('EXPIRE', key, ttl)
  redis.call('EXPIRE', string.format(bynum_template, rec.p, rec.n), ttl)
end
