-- release(task, token): 1 if the task is queued again without counting the attempt, 0 if stale.
local task, token = ARGV[2], ARGV[3]
if not current(task, token, now_ms()) then
  return 0
end
local job = job_of(task)
drop_lease(task)
if back_from_lease(task) then
  flush()
  return 1
end
redis.call('HINCRBY', K.attempts, task, -1)
push_ready(task)
bump(job, 'leased', -1)
bump(job, 'queued', 1)
flush()
notify(1)
return 1
