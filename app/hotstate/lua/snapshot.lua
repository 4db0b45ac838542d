-- Before a load: is the root loaded, its op counter, and its unflushed journal.
local loaded = redis.call('EXISTS', KEYS[1])
local ver = redis.call('GET', T .. ':v') or '0'
local entries = redis.call('XRANGE', T .. ':j', '-', '+')
return {loaded, ver, entries}
