-- Add an account to a loaded root, or change its status. No-op on a cold root: the next
-- load reads the account from Postgres.
-- ARGV: account id, status, parent id ('' for a root)
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', T .. ':a:' .. ARGV[1], 'st', ARGV[2], 'par', ARGV[3])
return 1
