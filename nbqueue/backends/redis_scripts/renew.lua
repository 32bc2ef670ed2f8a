-- renew(task, token, lease_ms): 1 if the lease now ends lease_ms from now, 0 if stale.
local task, token = ARGV[2], ARGV[3]
local now = now_ms()
if not current(task, token, now) then
  return 0
end
redis.call('ZADD', K.leases, 'XX', now + tonumber(ARGV[4]), task)
return 1
