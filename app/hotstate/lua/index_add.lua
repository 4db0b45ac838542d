-- Announce that this process may journal for a root (KEYS[1]: the root's journal index shard,
-- ARGV[1]: root id), at Redis's own clock, so that every process and the sweep read one clock.
-- GT: the score only moves forward. Sent without lib.lua, by EVAL (HotState._announcement).
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], 'GT', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
           ARGV[1])
return 1
