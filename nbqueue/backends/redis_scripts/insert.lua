-- insert(job, nonce, delay_ms, priority, record, fence, task_1, payload_1, ...): queue every task
-- of the batch, or none; with a delay (ms, "" for none) they wait in K.delayed, as retries do, until
-- the server's clock says they are due. A priority other than 0 is the job's (its first insert's).
-- A record ("" for none) is stored as the job's, with the tasks. A fence ("" for none) is the queue
-- identity the tasks are signed for: with another one (or none) stored, nothing is written.
-- Returns nil; or the id of a task that already exists; or {'identity', the stored id or ''} for a
-- fence that does not match (nothing changed then, either).
local job, nonce, delay, priority, record = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local fence = ARGV[7]
local now = now_ms()
-- A client retry after a lost reply must not fail as a duplicate of its own first try.
if redis.call('ZSCORE', K.inserts, nonce) then
  return nil
end
if fence ~= '' then
  local id = redis.call('GET', K.id)
  if id ~= fence then
    return {'identity', id or ''}
  end
end
for i = 8, #ARGV, 2 do
  if redis.call('HEXISTS', K.payload, ARGV[i]) == 1 then
    return ARGV[i]
  end
end
-- Redis refuses a script at maxmemory on its first write that takes memory, and lets the rest
-- of a script that has written anything run past the limit; so the first write must be one that
-- takes memory (the index's ZADD, the HSETs), or a full server would take the batch anyway.
index_job(job)
if priority ~= 0 then
  redis.call('HSETNX', K.priority, job, priority)
end
-- A new job's priority is this insert's (set just above), so its turn needs no lookup.
local known_priority = new_jobs[job] and priority or nil
local n = 0
for i = 8, #ARGV, 2 do
  local task = ARGV[i]
  -- No attempts field yet: a missing one reads as 0, and lease's HINCRBY makes it.
  redis.call('HSET', K.payload, task, ARGV[i + 1])
  if delay then
    delay_task(task, now + delay)
  else
    push_ready(task, known_priority)
  end
  n = n + 1
end
-- The old nonces go on one insert in 16 (the nonce is random hex), not on each: nonces are
-- remembered at least INSERT_MEMORY_MS, a little longer between prunings.
if string.sub(nonce, 1, 1) == '0' then
  redis.call('ZREMRANGEBYSCORE', K.inserts, '-inf', now - INSERT_MEMORY_MS)
end
redis.call('ZADD', K.inserts, now, nonce)
if record ~= '' then
  redis.call('SET', JK('job', job), record)
end
bump(job, 'inserted', n)
bump(job, 'queued', n)
flush()
if not delay then
  notify(n)
end
return nil
