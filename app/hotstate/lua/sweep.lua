-- The orphan sweep's look at one root's journal: the entries up to ARGV[1] (older than the
-- orphan age: left by a process that died before committing them), and, when the stream is
-- empty, the stream deleted. An acknowledged entry is only XDEL'd (ack.lua), which leaves the
-- key; every sweep used to read every root that had ever been written to. Now a root is read by
-- at most one sweep after its last write. The stream's last id is kept in `:jl`, so the next
-- stream's ids go on after it (lib.lua `journal`).
-- ARGV: max id
local j = T .. ':j'
if redis.call('XLEN', j) == 0 then
  if redis.call('EXISTS', j) == 1 then
    local info = redis.call('XINFO', 'STREAM', j)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        redis.call('SET', T .. ':jl', info[i + 1])
        break
      end
    end
    redis.call('DEL', j)
  end
  return {}
end
return redis.call('XRANGE', j, '-', ARGV[1])
