-- Install a root's state computed from Postgres plus its unflushed journal, unless another
-- process loaded it or an operation ran since the snapshot.
-- ARGV: expected op counter, new gen, JSON {accounts: [{id, st, par, b: {}, d: {}, o: {}}]}
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
if (redis.call('GET', T .. ':v') or '0') ~= ARGV[1] then return 'moved' end
local state = cjson.decode(ARGV[3])
for _, a in ipairs(state.accounts) do
  redis.call('DEL', akey('a', a.id), akey('b', a.id), akey('d', a.id), akey('o', a.id))
  redis.call('HSET', akey('a', a.id), 'st', a.st, 'par', a.par)
  for bid, rem in pairs(a.b) do redis.call('HSET', akey('b', a.id), bid, rem) end
  for bid, def in pairs(a.d) do redis.call('HSET', akey('d', a.id), bid, def) end
  for ct, amt in pairs(a.o) do redis.call('HSET', akey('o', a.id), ct, amt) end
end
redis.call('HSET', KEYS[1], 'gen', ARGV[2])
return 'ok'
