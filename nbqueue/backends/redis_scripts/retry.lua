-- retry(job, task_1, payload_1, ...): queue dead or cancelled tasks of the job again under their
-- ids, with new payloads and fresh attempts; lifts the job's cancel. Refuses (an error, nothing
-- changed) a task that is neither.
local job = ARGV[2]
local cancelled = JK('cancelled', job)
for i = 3, #ARGV, 2 do
  local task = ARGV[i]
  if redis.call('HEXISTS', K.dead, task) == 0 and redis.call('HEXISTS', cancelled, task) == 0 then
    return redis.error_reply('task ' .. task .. ' did not end dead or cancelled: it cannot be retried')
  end
end
local mark = JK('cancel', job)
-- The job's keys may have expired and been dropped from the index: purge must find them.
index_job(job)
redis.call('HDEL', mark, '*')
for i = 3, #ARGV, 2 do
  local task, payload = ARGV[i], ARGV[i + 1]
  if redis.call('HEXISTS', K.dead, task) == 1 then
    drop_dead(task)
    bump(job, 'dead', -1)
  else
    redis.call('HDEL', cancelled, task)
    bump(job, 'cancelled', -1)
  end
  redis.call('HDEL', mark, task)
  redis.call('HDEL', JK('results', job), task)
  redis.call('HSET', K.payload, task, payload)
  redis.call('HSET', K.attempts, task, 0)
  redis.call('SREM', K.suspects, task)
  push_ready(task)
  bump(job, 'queued', 1)
end
flush()
notify((#ARGV - 2) / 2)
return (#ARGV - 2) / 2
