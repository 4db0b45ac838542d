-- Shared helpers, prepended to every script when it is loaded.
-- KEYS[1] is always the root key "cg:{<root id>}:root"; every other key of the billing root
-- shares its hash tag, so the scripts run unchanged on Redis Cluster.
-- Amounts are scaled integers. Lua numbers are doubles: the app keeps each below 2^50.
local T = string.sub(KEYS[1], 1, -6)

local function akey(kind, acct) return T .. ':' .. kind .. ':' .. acct end

-- (a comma-separated list: account chains, product scopes)
local function split(s)
  local out = {}
  if s == nil or s == '' then return out end
  for part in string.gmatch(s, '[^,]+') do out[#out + 1] = part end
  return out
end

-- def: "<credit type>|<priority>|<effective ms>|<expires ms or 0>|<status a/p/v/x>|<products or *>"
local function parse_def(s)
  local ct, prio, eff, exp, st, prods =
    string.match(s, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  return {ct = ct, prio = tonumber(prio), eff = tonumber(eff), exp = tonumber(exp), st = st,
          prods = prods}
end

local function with_status(def, st)
  local d = parse_def(def)
  return table.concat({d.ct, d.prio, d.eff, d.exp, st, d.prods}, '|')
end

local function covers(prods, product)
  if prods == '*' then return true end
  for p in string.gmatch(prods, '[^,]+') do
    if p == product then return true end
  end
  return false
end

-- Account statuses read by `loaded`, for `blocked` (one script call's cache: a status does
-- not change inside the scripts that read it).
local statuses = {}

-- true when every account of the chain is in the hot state (every account hash has `st`)
local function loaded(chain)
  if redis.call('EXISTS', KEYS[1]) == 0 then return false end
  for _, acct in ipairs(chain) do
    local st = statuses[acct] or redis.call('HGET', akey('a', acct), 'st')
    if not st then return false end
    statuses[acct] = st
  end
  return true
end

-- (after `loaded` of the same chain)
local function blocked(chain)
  for _, acct in ipairs(chain) do
    if statuses[acct] == 'blocked' then return true end
  end
  return false
end

-- An account's balances, parsed: {bid, id, acct, ct, prio, eff, exp, st, prods, rem}, with two
-- reads (definitions and remaining amounts). `cache` (optional, one script call's table) keeps
-- them for the call's later events: a caller that changes a remaining amount in Redis must
-- change `rem` of the cached object too (decide.lua does).
local function balances_of(acct, cache)
  local found = cache and cache[acct]
  if found then return found end
  found = {}
  local defs = redis.call('HGETALL', akey('d', acct))
  if #defs > 0 then
    local rems, raw = {}, redis.call('HGETALL', akey('b', acct))
    for i = 1, #raw, 2 do rems[raw[i]] = tonumber(raw[i + 1]) end
    for i = 1, #defs, 2 do
      local d = parse_def(defs[i + 1])
      d.bid, d.id, d.acct, d.rem = defs[i], tonumber(defs[i]), acct, rems[defs[i]] or 0
      if d.exp == 0 then d.exp = math.huge end
      found[#found + 1] = d
    end
  end
  if cache then cache[acct] = found end
  return found
end

local function drawdown_order(a, b)
  if a.ci ~= b.ci then return a.ci < b.ci end
  if a.prio ~= b.prio then return a.prio < b.prio end
  if a.exp ~= b.exp then return a.exp < b.exp end
  return a.id < b.id
end

-- Eligible balances in drawdown order: the account's own before its parents', then
-- priority (lower first), expiry (soonest first, never last), creation (balance id).
-- (`ci`, the chain position, is written on the balance object for the sort only.)
local function eligible(chain, product, ct, at, cache)
  local out = {}
  for ci, acct in ipairs(chain) do
    for _, d in ipairs(balances_of(acct, cache)) do
      if d.ct == ct and d.st == 'a' and d.eff <= at and at < d.exp and covers(d.prods, product) then
        d.ci = ci
        out[#out + 1] = d
      end
    end
  end
  table.sort(out, drawdown_order)
  return out
end

-- The next instant after `at` at which some balance of the chain becomes effective or expires.
local function next_change(chain, at, cache)
  local soonest = math.huge
  for _, acct in ipairs(chain) do
    for _, d in ipairs(balances_of(acct, cache)) do
      if d.eff > at and d.eff < soonest then soonest = d.eff end
      if d.exp > at and d.exp < soonest then soonest = d.exp end
    end
  end
  return soonest == math.huge and '0' or string.format('%d', soonest)
end

local function total(list)
  local sum = 0
  for _, b in ipairs(list) do sum = sum + b.rem end
  return sum
end

-- Record the entitlement flag of (account, product, credit type); returns the transition
-- ("granted" / "revoked") or "" when the flag did not change. `known` (optional, one script
-- call's table) keeps the flags read and written, so that the call's later events read none.
local function set_flag(acct, product, ct, allowed, known)
  local key, field = akey('e', acct), product .. '|' .. ct
  local new = allowed and '1' or '0'
  local memo = known and known[key]
  local old
  if memo and memo[field] ~= nil then
    old = memo[field]
  else
    old = redis.call('HGET', key, field)  -- false when never recorded
    if known and not memo then memo = {}; known[key] = memo end
  end
  if memo then memo[field] = new end
  if old == new then return '' end
  redis.call('HSET', key, field, new)
  if old == false and allowed then return '' end
  return allowed and 'granted' or 'revoked'
end

-- Re-derive the recorded flags of one credit type of an account after its balances changed.
-- Returns "product|ct|granted/revoked|available" items joined by ';'.
local function refresh_flags(acct, chain, ct, at)
  local out = {}
  local fields = redis.call('HKEYS', akey('e', acct))
  for _, field in ipairs(fields) do
    local product, fct = string.match(field, '^(.*)|(.*)$')
    if fct == ct then
      local avail = total(eligible(chain, product, ct, at))
      local change = set_flag(acct, product, ct, avail > 0)
      if change ~= '' then
        out[#out + 1] = product .. '|' .. ct .. '|' .. change .. '|' .. string.format('%d', avail)
      end
    end
  end
  return table.concat(out, ';')
end

-- The account's own drawable credit of one credit type, whatever the product (from `cache`,
-- balances_of's, when given: its remaining amounts are the call's, written or not).
local function own_total(acct, ct, at, cache)
  local sum = 0
  for _, d in ipairs(balances_of(acct, cache)) do
    if d.ct == ct and d.st == 'a' and d.eff <= at and at < d.exp then sum = sum + d.rem end
  end
  return sum
end

-- Threshold watches: hash w:<account>, field "<name>|<ct>" -> "<threshold>|<armed 1/0>|<lt/le>".
-- A watch fires once when the own total crosses below (lt) or to-or-below (le) its threshold,
-- and re-arms silently once the total is back above.
-- Appends "name|account|ct|total|threshold" to out. `cache` as for own_total; `known`
-- (optional, one script call's table) keeps the watches read, and follows what is written.
local function check_watches(acct, ct, at, out, cache, known)
  local key = akey('w', acct)
  local fields = known and known[key]
  if not fields then
    fields = redis.call('HGETALL', key)
    if known then known[key] = fields end
  end
  local sum = nil
  for i = 1, #fields, 2 do
    local name, wct = string.match(fields[i], '^(.*)|(.*)$')
    if wct == ct then
      sum = sum or own_total(acct, ct, at, cache)
      local th, armed, op = string.match(fields[i + 1], '^([^|]*)|([^|]*)|([^|]*)$')
      local below = (op == 'le' and sum <= tonumber(th)) or (op == 'lt' and sum < tonumber(th))
      if armed == '1' and below then
        fields[i + 1] = th .. '|0|' .. op
        redis.call('HSET', key, fields[i], fields[i + 1])
        out[#out + 1] = name .. '|' .. acct .. '|' .. ct .. '|' .. string.format('%d', sum) .. '|' .. th
      elseif armed == '0' and not below then
        fields[i + 1] = th .. '|1|' .. op
        redis.call('HSET', key, fields[i], fields[i + 1])
      end
    end
  end
end

-- The root's generation (set by a rebuild, install.lua, never inside a script that reads it):
-- read once per script call.
local the_gen
local function gen()
  if the_gen == nil then the_gen = redis.call('HGET', KEYS[1], 'gen') end
  return the_gen
end

-- Appends one entry to the root's journal. The op counter `:v` is bumped once per script call
-- that journals (a rebuild compares it before and after: it only asks whether it moved), and
-- the stream is known to exist after the call's first entry.
local journalled = false
local function journal(fields)
  local j, id = T .. ':j', '*'
  if journalled then return redis.call('XADD', j, id, unpack(fields)) end
  journalled = true
  redis.call('INCR', T .. ':v')
  if redis.call('EXISTS', j) == 0 then
    -- the orphan sweep deletes a stream it finds empty and keeps its last id in `:jl`
    -- (sweep.lua): the new stream's ids go on after it, even within the same millisecond
    -- (they order a root's webhooks)
    local last = redis.call('GET', T .. ':jl')
    if last then
      local ms, seq = string.match(last, '^(%d+)-(%d+)$')
      local t = redis.call('TIME')
      if ms and tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) <= tonumber(ms) then
        id = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
      end
    end
  end
  return redis.call('XADD', j, id, unpack(fields))
end
