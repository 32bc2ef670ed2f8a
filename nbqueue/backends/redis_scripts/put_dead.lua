-- put_dead(job, task_1, attempts_1, payload_1, error_1, ...): store dead letters of tasks that
-- failed elsewhere (a copied queue), each counted as inserted and dead; the error record joins
-- the job's results as fail() puts it. Returns nil, or the id of a task that already has a
-- record (then nothing changed).
local job = ARGV[2]
local recorded = first_recorded(job, 3, 4)
if recorded then
  return recorded
end
local n = 0
for i = 3, #ARGV, 4 do
  local task = ARGV[i]
  redis.call('HSET', K.dead, task, ARGV[i + 3])
  redis.call('HSET', K.dead_payload, task, ARGV[i + 2])
  redis.call('HSET', K.dead_attempts, task, ARGV[i + 1])
  redis.call('HSET', JK('results', job), task, ARGV[i + 3])
  n = n + 1
end
redis.call('ZADD', K.jobs, 'NX', now_us(), job)
bump(job, 'inserted', n)
bump(job, 'dead', n)
flush()
return nil
