-- balances and balances_token: GET /v1/accounts/<account>/balances, accounts round-robin,
-- with one API key for all ("-" tokens) or each account's own customer token.
-- args: accounts account_prefix key tokens (comma-separated, in account order, or "-")
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

local reqs, n, i = {}, 0, 0

function init(args)
  local accounts, prefix, key, tokens = tonumber(args[1]), args[2], args[3], args[4]
  local own = {}
  if tokens ~= nil and tokens ~= "-" then
    for t in string.gmatch(tokens, "[^,]+") do own[#own + 1] = t end
  end
  for a = 0, accounts - 1 do
    local headers = {["Authorization"] = "Bearer " .. (own[a + 1] or key)}
    reqs[a + 1] = wrk.format("GET", string.format("/v1/accounts/%s-%d/balances", prefix, a),
                             headers)
  end
  n = accounts
  i = (tid or 0) * 7919
end

function request()
  i = i + 1
  return reqs[(i % n) + 1]
end
