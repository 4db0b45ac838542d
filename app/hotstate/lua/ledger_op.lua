-- Grants, adjustments, voids and expiries of one balance, journalled atomically.
-- ARGV: now_ms, kind (grant|adjustment|rollover|release|void|expire|refund|clawback|pay), account
--       id, chain, balance id, amount (grant; adjustment: signed; rollover: what comes in from
--       the period before; refund: what the balance was granted, less what was clawed back;
--       clawback: what a partial refund takes back; pay: unused, it pays all it can),
--       def (grant), at_ms, payload (opaque JSON)
-- Returns {"cold"} | {"missing"} (unknown balance, or a grant id already used) |
--         {"insufficient", remaining} |
--         {"ok", amount applied, remaining after, stream id, gen, flag changes, crossings,
--          owed (refund, clawback: what the balance could not give back, now overage;
--                pay: less than zero, what the balance paid of the overage)}
local now, kind, acct, chain, bid = ARGV[1], ARGV[2], ARGV[3], split(ARGV[4]), ARGV[5]
local amount, def, at, payload = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8]), ARGV[9]
if not loaded(chain) then return {'cold'} end

local dkey, bkey = akey('d', acct), akey('b', acct)
local current = redis.call('HGET', dkey, bid)
local rem = tonumber(redis.call('HGET', bkey, bid) or '0')
local applied, owed = 0, 0

if kind == 'grant' then
  if current then return {'missing'} end
  redis.call('HSET', dkey, bid, def)
  redis.call('HSET', bkey, bid, string.format('%d', amount))
  applied = amount
else
  if not current then return {'missing'} end
  local st = parse_def(current).st
  if st == 'v' or st == 'x' then return {'missing'} end
  if kind == 'adjustment' or kind == 'rollover' or kind == 'release' then
    if rem + amount < 0 then return {'insufficient', rem} end
    applied = amount
  elseif kind == 'refund' then
    -- the purchase's payment was refunded: void what is left, owe what was spent
    applied = 0 - rem
    redis.call('HSET', dkey, bid, with_status(current, 'v'))
    owed = math.max(amount - rem, 0)  -- more than granted is left after an adjustment up
  elseif kind == 'clawback' then
    -- part of a purchase's payment was refunded: take its share back, owe what is spent
    local taken = math.min(amount, rem)
    applied = 0 - taken
    owed = amount - taken
  elseif kind == 'pay' then
    -- a purchase that pays what the account owes in this credit type: as much as it holds
    local due = tonumber(redis.call('HGET', akey('o', acct), parse_def(current).ct) or '0')
    local taken = math.max(math.min(rem, due), 0)
    applied = 0 - taken
    owed = 0 - taken
  else
    applied = 0 - rem  -- not -rem: -0 reaches HINCRBY as "-0", which Redis rejects
    redis.call('HSET', dkey, bid, with_status(current, kind == 'void' and 'v' or 'x'))
  end
  redis.call('HINCRBY', bkey, bid, applied)
  if owed ~= 0 then redis.call('HINCRBY', akey('o', acct), parse_def(current).ct, owed) end
end

local ct = parse_def(redis.call('HGET', dkey, bid)).ct
local changes = refresh_flags(acct, chain, ct, at)
local crossings = {}
check_watches(acct, ct, at, crossings)
local id = journal({'k', kind, 'p', payload, 'x', string.format('%d', applied), 't', now,
                                    'g', gen(), 'fc', changes, 'wc', table.concat(crossings, ';'),
                    'ov', string.format('%d', owed)})
return {'ok', applied, rem + applied, id, gen(), changes, table.concat(crossings, ';'), owed}
