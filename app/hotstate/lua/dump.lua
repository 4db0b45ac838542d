-- For `creditgate hotstate verify`: whether the root is loaded, its op counter, its unflushed
-- journal and the given accounts as installed (status and parent, remaining amounts, balance
-- definitions, overage), read in one atomic step.
-- ARGV: account ids
local loaded = redis.call('EXISTS', KEYS[1])
local ver = redis.call('GET', T .. ':v') or '0'
if loaded == 0 then return {0, ver, {}, {}} end
local entries = redis.call('XRANGE', T .. ':j', '-', '+')
local accounts = {}
for _, id in ipairs(ARGV) do
  accounts[#accounts + 1] = {redis.call('HGETALL', akey('a', id)), redis.call('HGETALL', akey('b', id)),
                             redis.call('HGETALL', akey('d', id)), redis.call('HGETALL', akey('o', id))}
end
return {loaded, ver, entries, accounts}
