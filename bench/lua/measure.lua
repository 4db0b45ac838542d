-- POST /v1/measurements: one measurement per request (size 1) or {"measurements": [...]} of
-- `size`, fresh uids, accounts round-robin; each measurement is {"calls": 1} on the bench meter.
-- args: accounts account_prefix token run_id timestamp meter size
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

local n, prefix, run, ts, meter, size, headers, i = 0, "", "", "", "", 1, nil, 0

function init(args)
  n, prefix, run, ts, meter = tonumber(args[1]), args[2], args[4], args[5], args[6]
  size = tonumber(args[7])
  headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. args[3]}
  i = 0
end

local function one(j, account)
  return string.format(
    '{"uid": "%s-%d-%d-%d", "account": "%s-%d", "meter": "%s", "timestamp": "%s", ' ..
    '"data": {"calls": 1}}', run, tid or 0, i, j, prefix, account, meter, ts)
end

function request()
  i = i + 1
  if size == 1 then
    return wrk.format("POST", "/v1/measurements", headers,
                      one(0, (i + (tid or 0) * 7919) % n))
  end
  local parts = {}
  for j = 1, size do
    parts[j] = one(j, (j + i) % n)
  end
  return wrk.format("POST", "/v1/measurements", headers,
                    '{"measurements": [' .. table.concat(parts, ",") .. ']}')
end
