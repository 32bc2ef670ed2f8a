-- add_job_worker(job, worker): the worker ran tasks of the job. Kept, and expired, with the job's
-- other keys (touch_job: no expiry while it has tasks to run).
local job, worker = ARGV[2], ARGV[3]
redis.call('SADD', JK('ran', job), worker)
touch_job(job)
return 1
