-- After a journal batch committed to Postgres: drop its entries, and report the current gen
-- so the caller can tell whether a reload happened meanwhile.
-- On a cold root, bump the op counter instead: a rebuild that read Postgres before this commit
-- and whose journal snapshot lacks these entries (FLUSHALL emptied it) must not install.
-- ARGV: stream ids
if #ARGV > 0 then redis.call('XDEL', T .. ':j', unpack(ARGV)) end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('INCR', T .. ':v')
  return ''
end
return redis.call('HGET', KEYS[1], 'gen') or ''
