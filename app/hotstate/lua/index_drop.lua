-- After the orphan sweep read the journals of these roots: drop each from the index (KEYS[1],
-- one shard) unless it was announced again after ARGV[1] (then a process may have journalled
-- since, and the next sweeps must look at it again). ARGV[2..]: root ids.
local dropped = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= tonumber(ARGV[1]) then
    dropped = dropped + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return dropped
