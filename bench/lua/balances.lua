-- balances and balances_token: GET /v1/accounts/<account>/balances, accounts round-robin,
-- with one API key for all ("-" tokens) or each account's own customer token.
-- args: accounts account_prefix key tokens (comma-separated, in account order, or "-")
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

function init(args)
  local accounts, prefix, key, tokens = tonumber(args[1]), args[2], args[3], args[4]
  local own = {}
  if tokens ~= nil and tokens ~= "-" then
    for t in string.gmatch(tokens, "[^,]+") do own[#own + 1] = t end
  end
  for a = 0, accounts - 1 do
    local headers = {["Authorization"] = "Bearer " .. (own[a + 1] or key)}
    prepared[a + 1] = wrk.format("GET", string.format("/v1/accounts/%s-%d/balances", prefix, a),
                                 headers)
  end
end
