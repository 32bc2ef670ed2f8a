-- redrive('all' | 'some', task...): queue dead letters again with a fresh attempt count.
local ids = chosen_dead()
for _, task in ipairs(ids) do
  local job = job_of(task)
  redis.call('HSET', K.payload, task, redis.call('HGET', K.dead_payload, task))
  redis.call('HSET', K.attempts, task, 0)
  drop_dead(task)
  redis.call('HDEL', JK('results', job), task)
  push_ready(task)
  -- The job's keys may have expired and been dropped from the index: purge must find them.
  index_job(job)
  bump(job, 'dead', -1)
  bump(job, 'queued', 1)
end
flush()
notify(#ids)
return #ids
