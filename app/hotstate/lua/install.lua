-- Install a root's state computed from Postgres plus its unflushed journal, unless another
-- process loaded it or an operation ran since the snapshot.
-- ARGV: expected op counter, new gen, now_ms,
--       JSON {accounts: [{id, st, par, b: {}, d: {}, o: {}, w: [[name, ct, threshold, op]]}]}
-- Watches start disarmed when the total is already below them: a rebuild never re-fires one.
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
if (redis.call('GET', T .. ':v') or '0') ~= ARGV[1] then return 'moved' end
local state = cjson.decode(ARGV[4])
for _, a in ipairs(state.accounts) do
  redis.call('DEL', akey('a', a.id), akey('b', a.id), akey('d', a.id), akey('o', a.id),
             akey('w', a.id))
  redis.call('HSET', akey('a', a.id), 'st', a.st, 'par', a.par)
  for bid, rem in pairs(a.b) do redis.call('HSET', akey('b', a.id), bid, rem) end
  for bid, def in pairs(a.d) do redis.call('HSET', akey('d', a.id), bid, def) end
  for ct, amt in pairs(a.o) do redis.call('HSET', akey('o', a.id), ct, amt) end
end
for _, a in ipairs(state.accounts) do
  for _, w in ipairs(a.w) do
    local sum, th = own_total(a.id, w[2], tonumber(ARGV[3])), tonumber(w[3])
    local below = (w[4] == 'le' and sum <= th) or (w[4] == 'lt' and sum < th)
    redis.call('HSET', akey('w', a.id), w[1] .. '|' .. w[2], w[3] .. '|' .. (below and '0' or '1') .. '|' .. w[4])
  end
end
redis.call('HSET', KEYS[1], 'gen', ARGV[2])
return 'ok'
