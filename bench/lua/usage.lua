-- Single-event POST /v1/usage (or, with a sixth argument "hold", POST
-- /v1/accounts/<account>/holds): a fresh uid per request, accounts round-robin.
-- args: accounts account_prefix token run_id timestamp [hold]
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

local n, prefix, run, ts, headers, i, hold = 0, "", "", "", nil, 0, false

function init(args)
  n, prefix, run, ts, hold = tonumber(args[1]), args[2], args[4], args[5], args[6] == "hold"
  headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. args[3]}
  i = 0
end

function request()
  i = i + 1
  if hold then
    local account = string.format("%s-%d", prefix, (i + (tid or 0) * 7919) % n)
    return wrk.format("POST", "/v1/accounts/" .. account .. "/holds", headers, string.format(
      '{"uid": "%s-%d-%d", "product": "api", "amount": "0.01"}', run, tid or 0, i))
  end
  local body = string.format(
    '{"uid": "%s-%d-%d", "account": "%s-%d", "product": "api", "amount": "0.01", ' ..
    '"timestamp": "%s"}', run, tid or 0, i, prefix, (i + (tid or 0) * 7919) % n, ts)
  return wrk.format("POST", "/v1/usage", headers, body)
end
