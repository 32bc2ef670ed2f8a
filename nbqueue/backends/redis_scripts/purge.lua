-- purge(): delete every key of the queue. Per-job keys are found through the jobs index and
-- function blobs through their digest set, so no SCAN is needed.
for _, job in ipairs(redis.call('ZRANGE', K.jobs, 0, -1)) do
  redis.call('DEL', unpack(job_keys(job, JOB_KINDS)))
end
for _, digest in ipairs(redis.call('SMEMBERS', K.functions)) do
  redis.call('DEL', JK(FN_KIND, digest))
end
for _, key in pairs(K) do
  redis.call('DEL', key)
end
return 1
