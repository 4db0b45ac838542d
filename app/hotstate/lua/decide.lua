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
-- One call's reads are made once and its writes at its end: each chain split and checked
-- once, each account's balances, flags and watches read once; what the debits draw and owe,
-- the new uid marks and the journal entries are written after every event is decided (the
-- call's copies follow the changes meanwhile; a uid is a duplicate when marked before the
-- call or earlier in it). So a mistake that stops the script mid-way has drawn, marked and
-- journalled nothing (an entitlement flag or threshold watch it changed stays changed).
local chains, cache = {}, {}
local flags, watches  -- (a single event reads each once anyway: no tables kept for it)
if n > 1 then flags, watches = {}, {} end
local day, yday = string.format('%d', today), string.format('%d', today - 1)
local marks = {}     -- uid-mark hash -> {uid -> true}: the marks this call will write
local drawn = {}     -- balance hash -> {balance id -> amount taken}
local owed = {}      -- overage hash -> {credit type -> amount owed}
local marked = {}    -- uid-mark hash -> {uid, '1', ...}: the new marks
local journalled, fields_of = {}, {}  -- the results that journal, and their entries' fields

local function add(t, key, field, amount)
  local h = t[key]
  if not h then h = {}; t[key] = h end
  h[field] = (h[field] or 0) + amount
end

for i = 0, n - 1 do
  local o = 3 + i * 9
  local text = ARGV[o + 2]
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
  local today_key, yday_key = akey('u', acct .. ':' .. day), akey('u', acct .. ':' .. yday)
  local list = eligible(chain, product, ct, at, cache)
  local avail = total(list)
  local status = 'ok'
  if mode ~= 'q' and uid ~= '' and (marks[today_key] and marks[today_key][uid]
      or redis.call('HEXISTS', today_key, uid) == 1 or redis.call('HEXISTS', yday_key, uid) == 1) then
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
        add(drawn, akey('b', b.acct), b.bid, take)
        b.rem = b.rem - take  -- the cached copy follows what will be written
        allocs[#allocs + 1] = b.bid .. ':' .. b.acct .. ':' .. string.format('%d', take)
        need = need - take
      end
    end
    if need > 0 then add(owed, akey('o', acct), ct, need) end
    local new = marked[today_key]
    if not new then new = {}; marked[today_key] = new; marks[today_key] = {} end
    marks[today_key][uid] = true
    new[#new + 1] = uid
    new[#new + 1] = '1'
    local after = avail - (amount - need)
    local change = set_flag(acct, product, ct, after > 0, flags)
    if change ~= '' then change = product .. '|' .. ct .. '|' .. change .. '|' .. string.format('%d', after) end
    local crossings, owners = {}, {}
    for _, a in ipairs(allocs) do
      local owner = string.match(a, '^[^:]*:([^:]*):')
      if not owners[owner] then
        owners[owner] = true
        check_watches(owner, ct, at, crossings, cache, watches)
      end
    end
    local alloc, crossed = table.concat(allocs, ','), table.concat(crossings, ';')
    results[#results + 1] = {status, after, need, alloc, '', gen(), change, crossed}
    journalled[#journalled + 1] = #results
    fields_of[#fields_of + 1] = {'k', 'usage', 'p', payload, 'al', alloc,
                                 'ov', string.format('%d', need), 't', now, 'g', gen(),
                                 'fc', change, 'wc', crossed}
  end
end

for key, taken in pairs(drawn) do
  for bid, amount in pairs(taken) do redis.call('HINCRBY', key, bid, string.format('%d', -amount)) end
end
for key, due in pairs(owed) do
  for ct, amount in pairs(due) do redis.call('HINCRBY', key, ct, string.format('%d', amount)) end
end
for key, new in pairs(marked) do
  redis.call('HSET', key, unpack(new))
  redis.call('EXPIRE', key, ttl)
end
for j, at in ipairs(journalled) do results[at][5] = journal(fields_of[j]) end
return results
