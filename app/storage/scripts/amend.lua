-- A small change to a build's record, under its current TTL; -1 when the build is not tracked.
-- 'target' sets a channel's message; 'mark' sets a marker (1 if this call set it, 0 if it was
-- set); 'retried' flags the build as retried; 'count' counts one more auto-retry (the new count).
local rec = load(KEYS[1])
if not rec then return -1 end
local op, result = ARGV[1], 1
if op == 'target' then
  rec.m[ARGV[2]] = cjson.decode(ARGV[3])
elseif op == 'mark' then
  rec.k = rec.k or {}
  if rec.k[ARGV[2]] then return 0 end
  rec.k[ARGV[2]] = 1
elseif op == 'retried' then
  rec.rt = 1
elseif op == 'count' then
  rec.ar = (rec.ar or 0) + 1
  result = rec.ar
end
save(KEYS[1], rec)
return result
