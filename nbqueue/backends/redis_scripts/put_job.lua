-- put_job(job, meta): create or replace a job's record; new jobs join the index.
local job = ARGV[2]
redis.call('SET', JK('job', job), ARGV[3])
index_job(job)
touch_job(job)
return 1
