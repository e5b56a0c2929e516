-- Start tracking a build in a channel: the build's record (once), its number index, and the
-- channel's message entry (once per channel). A channel joining a build already followed gets a
-- transition of its own so that its message is posted; a new build gets its first one from
-- observe. Answers created * 2 + added.
local key, bynum, stream = KEYS[1], KEYS[2], KEYS[3]
local build_id, channel, ttl = ARGV[1], ARGV[3], ARGV[5]
local rec = load(key)
local created, added = 0, 0
if not rec then
  rec = cjson.decode(ARGV[2])
  redis.call('SET', bynum, build_id, 'EX', ttl)
  created = 1
end
if rec.m[channel] == nil then
  rec.m[channel] = cjson.decode(ARGV[4])
  added = 1
end
if created == 1 then
  save(key, rec, ttl)
elseif added == 1 then
  save(key, rec)
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[6], '*', 'build_id', build_id,
             'from', rec.ph, 'to', rec.ph, 'gen', rec.g, 'channel', channel)
end
return created * 2 + added
