-- Check, check-and-consume and usage debits for one billing root, atomically.
-- ARGV: now_ms, today (uid bucket day number), mark_ttl_s, then 9 per event:
--   account id, chain (self,parent,..,root), uid, product, credit type, amount, at_ms,
--   mode (q: check only, c: consume if allowed, u: usage, always recorded), payload (opaque JSON)
-- Returns {"cold"} when the root is not in the hot state, else per event
--   {status, available after, overage, allocations "bid:acct:amt,...", stream id, gen,
--    flag change "product|ct|granted/revoked|available", threshold crossings}
--   and for a check (q) a ninth: the next instant (ms, '0' for none) at which a balance of the
--   chain becomes effective or expires, when its answer may change with no write to Redis.
-- KEYS beyond the first are not used: a check declares the hashes its answer reads so that
-- Redis tracks them for the caller's check cache (app/hotstate/checkcache.py).
-- The journal entry also carries threshold crossings ("wc", see check_watches).
local now, today, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = (#ARGV - 3) / 9
local results = {}
-- per call: each chain split and checked once, each account's balances read once
local chains, cache = {}, {}
local expiring = {}  -- uid-mark hashes whose time to live this call has set

for i = 0, n - 1 do
  local text = ARGV[3 + i * 9 + 2]
  if not chains[text] then
    local chain = split(text)
    if not loaded(chain) then return {'cold'} end
    chains[text] = chain
  end
end

for i = 0, n - 1 do
  local o = 3 + i * 9
  local acct, chain, uid, product = ARGV[o + 1], chains[ARGV[o + 2]], ARGV[o + 3], ARGV[o + 4]
  local ct, amount, at, mode, payload = ARGV[o + 5], tonumber(ARGV[o + 6]), tonumber(ARGV[o + 7]),
    ARGV[o + 8], ARGV[o + 9]
  local today_key, yday_key = akey('u', acct .. ':' .. today), akey('u', acct .. ':' .. (today - 1))
  local list = eligible(chain, product, ct, at, cache)
  local avail = total(list)
  local status = 'ok'
  if mode ~= 'q' and uid ~= '' and (redis.call('HEXISTS', today_key, uid) == 1
      or redis.call('HEXISTS', yday_key, uid) == 1) then
    status = 'duplicate'
  elseif mode ~= 'u' then
    if blocked(chain) then status = 'account_blocked'
    elseif #list == 0 then status = 'no_eligible_balance'
    elseif avail < amount or avail <= 0 then status = 'insufficient_balance' end
  end
  if mode == 'q' then
    results[#results + 1] = {status, avail, 0, '', '', '', '', '', next_change(chain, at, cache)}
  elseif status ~= 'ok' then
    results[#results + 1] = {status, avail, 0, '', '', '', '', ''}
  else
    local need, allocs = amount, {}
    for _, b in ipairs(list) do
      if need <= 0 then break end
      local take = math.min(b.rem, need)
      if take > 0 then
        redis.call('HINCRBY', akey('b', b.acct), b.bid, -take)
        b.rem = b.rem - take  -- the cached copy follows Redis
        allocs[#allocs + 1] = b.bid .. ':' .. b.acct .. ':' .. string.format('%d', take)
        need = need - take
      end
    end
    if need > 0 then redis.call('HINCRBY', akey('o', acct), ct, need) end
    redis.call('HSET', today_key, uid, '1')
    if not expiring[today_key] then  -- once per call and key: the call's last write is now
      redis.call('EXPIRE', today_key, ttl)
      expiring[today_key] = true
    end
    local after = avail - (amount - need)
    local change = set_flag(acct, product, ct, after > 0)
    if change ~= '' then change = product .. '|' .. ct .. '|' .. change .. '|' .. string.format('%d', after) end
    local crossings, owners = {}, {}
    for _, a in ipairs(allocs) do
      local owner = string.match(a, '^[^:]*:([^:]*):')
      if not owners[owner] then
        owners[owner] = true
        check_watches(owner, ct, at, crossings)
      end
    end
    local alloc = table.concat(allocs, ',')
    local id = journal({'k', 'usage', 'p', payload, 'al', alloc, 'ov', string.format('%d', need),
                        't', now, 'g', gen(), 'fc', change, 'wc', table.concat(crossings, ';')})
    results[#results + 1] = {status, after, need, alloc, id, gen(), change, table.concat(crossings, ';')}
  end
end
return results
