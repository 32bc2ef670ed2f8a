-- counts(job): the counters of a job (of the queue when job is ''), then how many of its queued
-- tasks are scheduled: not ready until later, by the server's clock.
local job = ARGV[2]
local now = now_ms()
local counters, delayed
if job == '' then
  counters, delayed = K.counts, K.delayed
else
  counters, delayed = JK('jc', job), JK('delayed', job)
end
return {redis.call('HGETALL', counters), redis.call('ZCOUNT', delayed, '(' .. now, '+inf')}
