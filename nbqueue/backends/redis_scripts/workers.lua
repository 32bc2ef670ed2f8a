-- workers(): {worker, info, ...} of every worker whose last heartbeat has not expired.
drop_expired_workers(now_ms())
return redis.call('HGETALL', K.workers)
