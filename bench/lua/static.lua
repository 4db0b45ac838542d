-- bare, check and naive: a fixed request per account, accounts taken round-robin.
-- args: kind (bare|bare_redis|bare_fast|check|naive) accounts account_prefix token
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

function init(args)
  local kind, accounts, prefix, token = args[1], tonumber(args[2]), args[3], args[4]
  local headers = {["Content-Type"] = "application/json"}
  if token ~= nil and token ~= "-" then headers["Authorization"] = "Bearer " .. token end
  for a = 0, accounts - 1 do
    local body, path
    if kind == "naive" then
      path = "/debit"
      body = string.format('{"account": %d, "amount": 1}', a + 1)
    elseif kind == "check" then
      path = "/v1/check"
      body = string.format('{"account": "%s-%d", "product": "api", "amount": "0.01"}', prefix, a)
    else
      path = "/" .. kind
      body = string.format('{"account": "%s-%d", "product": "api", "amount": "0.01"}', prefix, a)
    end
    prepared[a + 1] = wrk.format("POST", path, headers, body)
  end
end
