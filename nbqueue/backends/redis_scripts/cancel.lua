-- cancel(job, record, 'job') or cancel(job, record, 'tasks', task_1, ...): mark the job (or the
-- tasks) cancelled and end its waiting tasks now, with `record` as their record. Leased tasks
-- stay marked: they end when their lease comes back (fail, release, expiry), and lease never
-- hands out a marked task. Returns how many tasks ended now.
local job, record, what = ARGV[2], ARGV[3], ARGV[4]
local mark, ready, delayed = JK('cancel', job), JK('ready', job), JK('delayed', job)
local ended = 0
if what == 'job' then
  redis.call('HSET', mark, '*', record)
  for _, task in ipairs(redis.call('LRANGE', ready, 0, -1)) do
    end_cancelled(task, record, 'queued')
    ended = ended + 1
  end
  redis.call('DEL', ready)
  redis.call('ZREM', K.turns, job)
  for _, task in ipairs(redis.call('ZRANGE', delayed, 0, -1)) do
    undelay_task(task)
    end_cancelled(task, record, 'queued')
    ended = ended + 1
  end
else
  for i = 5, #ARGV do
    local task = ARGV[i]
    redis.call('HSET', mark, task, record)
    if redis.call('LREM', ready, 0, task) > 0 then
      end_cancelled(task, record, 'queued')
      ended = ended + 1
    elseif redis.call('ZSCORE', delayed, task) then
      undelay_task(task)
      end_cancelled(task, record, 'queued')
      ended = ended + 1
    end
  end
  if redis.call('EXISTS', ready) == 0 then
    redis.call('ZREM', K.turns, job)
  end
end
index_job(job)  -- so purge finds the marks
bump(job, 'cancelled', 0)  -- touch the job's keys: a finished job's marks expire with them
flush()
return ended
