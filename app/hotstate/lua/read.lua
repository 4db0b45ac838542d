-- Real-time view of one account: {status, balances {bid, remaining}, defs, overage}, or cold.
-- ARGV: account id
local acct = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', akey('a', acct)) == 0 then
  return {'cold'}
end
return {redis.call('HGET', akey('a', acct), 'st'), redis.call('HGETALL', akey('b', acct)),
        redis.call('HGETALL', akey('d', acct)), redis.call('HGETALL', akey('o', acct))}
