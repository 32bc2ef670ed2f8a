-- failed_payloads(job): {task, payload, ...} of the job's dead letters and cancelled tasks.
local job = ARGV[2]
local out = {}
for _, task in ipairs(redis.call('HKEYS', JK('results', job))) do
  local payload = redis.call('HGET', K.dead_payload, task)
  if payload then
    out[#out + 1] = task
    out[#out + 1] = payload
  end
end
local cancelled = redis.call('HGETALL', JK('cancelled', job))
for i = 1, #cancelled do
  out[#out + 1] = cancelled[i]
end
return out
