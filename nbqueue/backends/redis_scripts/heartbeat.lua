-- heartbeat(worker, info, ttl_ms): the worker is alive until now + ttl_ms by the server's
-- clock; ttl_ms 0 withdraws it. Expired workers are forgotten on the way.
local worker, ttl = ARGV[2], tonumber(ARGV[4])
local now = now_ms()
drop_expired_workers(now)
if ttl > 0 then
  redis.call('HSET', K.workers, worker, ARGV[3])
  redis.call('ZADD', K.worker_expiry, now + ttl, worker)
else
  redis.call('HDEL', K.workers, worker)
  redis.call('ZREM', K.worker_expiry, worker)
end
return 1
