-- fail(task, token, error, retry_ms): 'queued' (retry_ms given, '' for none: dead letter),
-- 'dead', 'cancelled' (the task is marked cancelled), or nil when the token is stale.
local task, token, err, retry = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now = now_ms()
if not current(task, token, now) then
  return nil
end
local job = job_of(task)
drop_lease(task)
if back_from_lease(task) then
  flush()
  return 'cancelled'
end
bump(job, 'leased', -1)
bump(job, 'failed', 1)
if retry ~= '' then
  local delay = tonumber(retry)
  if delay > 0 then
    delay_task(task, now + delay)
  else
    push_ready(task)
    notify(1)
  end
  bump(job, 'queued', 1)
  flush()
  return 'queued'
end
store_dead(task, job, err, redis.call('HGET', K.payload, task), redis.call('HGET', K.attempts, task))
redis.call('HDEL', K.payload, task)
redis.call('HDEL', K.attempts, task)
redis.call('SREM', K.suspects, task)
bump(job, 'dead', 1)
flush()
return 'dead'
