-- After a journal batch committed to Postgres: drop its entries, and report the current gen
-- so the caller can tell whether a reload happened meanwhile.
-- ARGV: stream ids
if #ARGV > 0 then redis.call('XDEL', T .. ':j', unpack(ARGV)) end
return redis.call('HGET', KEYS[1], 'gen') or ''
