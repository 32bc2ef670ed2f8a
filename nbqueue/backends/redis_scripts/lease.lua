-- lease(lease_ms, n, nonce): lease up to n ready tasks; the i-th one leased gets token nonce..':'..i
-- (one random nonce per call, not one token per task: a worker asks for up to 64 at a time).
-- Returns {wait_ms, task, token, attempt, payload, suspect (0/1), ...}; when nothing was leased, wait_ms is how
-- long until the next delayed task is due or lease expires (-1: neither, or tasks were leased),
-- so a blocking caller knows when to retry.
local now = now_ms()
local deadline = now + tonumber(ARGV[2])
reclaim(now, false, RECLAIM_LIMIT)
local out = {-1}
local want = tonumber(ARGV[3])
local leased = 0
local none_left = false
while leased < want and not none_left do
  local tasks
  tasks, none_left = take_ready(want - leased)
  for _, task in ipairs(tasks) do
    local record = cancel_record(task)
    if record then  -- marked cancelled: never handed out, it ends here
      end_cancelled(task, record, 'queued')
    else
      leased = leased + 1
      local token = ARGV[4] .. ':' .. leased
      local attempt = redis.call('HINCRBY', K.attempts, task, 1)
      redis.call('HSET', K.tokens, task, token)
      redis.call('ZADD', K.leases, deadline, task)
      bump(job_of(task), 'queued', -1)
      bump(job_of(task), 'leased', 1)
      out[#out + 1] = task
      out[#out + 1] = token
      out[#out + 1] = attempt
      out[#out + 1] = redis.call('HGET', K.payload, task)
      out[#out + 1] = redis.call('SISMEMBER', K.suspects, task)
    end
  end
end
flush()
-- Wake-up tokens only say "there is ready work"; with none left they would wake waiters
-- for nothing.
if none_left or not has_ready() then
  redis.call('DEL', K.notify)
end
-- Only a caller that got nothing waits, so only then is the time to the next event needed.
if #out == 1 then
  for _, key in ipairs({K.delayed, K.leases}) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if first[2] then
      local wait = math.max(tonumber(first[2]) - now, 0)
      if out[1] < 0 or wait < out[1] then
        out[1] = wait
      end
    end
  end
end
return out
