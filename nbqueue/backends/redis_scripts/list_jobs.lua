-- list_jobs(): ids of jobs with a record, oldest first. Jobs whose keys have all expired
-- leave the index here (only then: a job new to the index has no keys, see new_jobs).
local out = {}
for _, job in ipairs(redis.call('ZRANGE', K.jobs, 0, -1)) do
  if redis.call('EXISTS', JK('job', job)) == 1 then
    out[#out + 1] = job
  elseif redis.call('EXISTS', unpack(job_keys(job, JOB_KINDS))) == 0 then
    redis.call('ZREM', K.jobs, job)
  end
end
return out
