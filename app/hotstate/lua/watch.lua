-- Set or remove a threshold watch of an account; armed unless already below it.
-- ARGV: account id, name, credit type, threshold ('' removes), op (lt/le), at_ms
-- Returns 0 on a cold root (the next load reads watches from Postgres).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local acct, field = ARGV[1], ARGV[2] .. '|' .. ARGV[3]
if ARGV[4] == '' then
  redis.call('HDEL', akey('w', acct), field)
  return 1
end
local sum, th = own_total(acct, ARGV[3], tonumber(ARGV[6])), tonumber(ARGV[4])
local below = (ARGV[5] == 'le' and sum <= th) or (ARGV[5] == 'lt' and sum < th)
redis.call('HSET', akey('w', acct), field, ARGV[4] .. '|' .. (below and '0' or '1') .. '|' .. ARGV[5])
return 1
