-- POST /v1/usage {"events": [...]} with `size` events, fresh uids, accounts round-robin.
-- args: accounts account_prefix token run_id timestamp size
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

local n, prefix, run, ts, size, headers, i = 0, "", "", "", 0, nil, 0

function init(args)
  n, prefix, run, ts, size = tonumber(args[1]), args[2], args[4], args[5], tonumber(args[6])
  headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. args[3]}
  i = 0
end

function request()
  i = i + 1
  local parts = {}
  for j = 1, size do
    parts[j] = string.format(
      '{"uid": "%s-%d-%d-%d", "account": "%s-%d", "product": "api", "amount": "0.01", ' ..
      '"timestamp": "%s"}', run, tid or 0, i, j, prefix, (j + i) % n, ts)
  end
  return wrk.format("POST", "/v1/usage", headers, '{"events": [' .. table.concat(parts, ",") .. ']}')
end
