-- complete(task_1, token_1, result_1, ...): commit results; one 1/0 per task (0: stale token).
local now = now_ms()
local out = {}
for i = 2, #ARGV, 3 do
  local task = ARGV[i]
  if current(task, ARGV[i + 1], now) then
    local job = job_of(task)
    drop_lease(task)
    redis.call('HDEL', K.payload, task)
    redis.call('HDEL', K.attempts, task)
    redis.call('SREM', K.suspects, task)
    put_record(job, task, ARGV[i + 2])
    bump(job, 'leased', -1)
    bump(job, 'completed', 1)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
flush()
return out
