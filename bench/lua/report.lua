-- Shared by every scenario script: thread numbering and a JSON summary line for run.py.
local threads = {}
local next_thread = 0

function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end

-- Round-robin over requests prepared in init (static.lua, balances.lua): init fills
-- `prepared`, each thread starts at its own offset. Scripts that build each request define
-- their own `request` after loading this file.
prepared = {}
local at = nil

function request()
  at = (at or (tid or 0) * 7919) + 1
  return prepared[(at % #prepared) + 1]
end
