-- Free a lock only while we still hold it (it may have expired and been taken by another).
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
