-- list_jobs(): ids of jobs with a record, oldest first. Jobs whose keys have all expired
-- leave the index here.
local out = {}
for _, job in ipairs(redis.call('ZRANGE', K.jobs, 0, -1)) do
  if redis.call('EXISTS', JK('job', job)) == 1 then
    out[#out + 1] = job
  elseif redis.call('EXISTS', JK('jc', job), JK('results', job)) == 0 then
    redis.call('ZREM', K.jobs, job)
  end
end
return out
