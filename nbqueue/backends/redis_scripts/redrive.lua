-- redrive('all' | 'some', task...): queue dead letters again with a fresh attempt count.
local now = now_us()
local ids = chosen_dead()
for _, task in ipairs(ids) do
  local job = job_of(task)
  redis.call('HSET', K.payload, task, redis.call('HGET', K.dead_payload, task))
  redis.call('HSET', K.attempts, task, 0)
  redis.call('HDEL', K.dead, task)
  redis.call('HDEL', K.dead_payload, task)
  redis.call('HDEL', K.dead_attempts, task)
  redis.call('HDEL', JK('results', job), task)
  redis.call('RPUSH', K.ready, task)
  -- The job's keys may have expired and been dropped from the index: purge must find them.
  redis.call('ZADD', K.jobs, 'NX', now, job)
  bump(job, 'dead', -1)
  bump(job, 'queued', 1)
end
flush()
notify(#ids)
return #ids
