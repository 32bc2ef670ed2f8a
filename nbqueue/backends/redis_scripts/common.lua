-- Helpers shared by every script. The preamble redis.py puts before this file defines:
--   P        the queue's key prefix, "nbq:{NAME}:" (KEYS[1]); every key shares its hash tag
--   K        the queue's fixed key names, K.ready, K.leases, ...
--   JK       JK(kind, job_id), a per-job key name
--   TTL      seconds a finished job's keys live (ARGV[1] of every script)
--   NOTIFY_MAX, RECLAIM_LIMIT, INSERT_MEMORY_MS, LOG_ENTRY_IDS, FN_KIND

-- Milliseconds from the server's clock: deadlines never depend on a client's clock.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Microseconds as a string: a number this large would lose digits on its way to ZADD.
local function now_us()
  local t = redis.call('TIME')
  return t[1] .. string.format('%06d', tonumber(t[2]))
end

-- Same as base.job_of: everything before the last '-'.
local function job_of(task)
  return string.match(task, '^(.*)%-') or task
end

-- Counter changes are summed per job and written once at the end of a script (flush).
local deltas = {}

local function bump(job, field, d)
  local jd = deltas[job]
  if not jd then
    jd = {}
    deltas[job] = jd
  end
  jd[field] = (jd[field] or 0) + d
end

-- A job's keys live while it has tasks queued or leased; once none are left they expire
-- TTL seconds after the last change, so a long-running job never loses its record.
local function touch_job(job)
  local live = redis.call('HMGET', JK('jc', job), 'queued', 'leased')
  local alive = (tonumber(live[1]) or 0) + (tonumber(live[2]) or 0) > 0
  for _, kind in ipairs({'jc', 'results', 'log', 'job', 'cancel', 'cancelled', 'ran'}) do
    if alive then
      redis.call('PERSIST', JK(kind, job))
    else
      redis.call('EXPIRE', JK(kind, job), TTL)
    end
  end
end

-- Commit a task's record into the job's results. Its id goes onto the job's commit log, a
-- stream that waiters block on (XREAD) and readers follow from a cursor: one entry per job per
-- script (flush_log), its field t the ids committed, space-separated, so a batch of 64 commits
-- costs the server one entry, not 64.
local logged = {}

local function put_record(job, task, record)
  redis.call('HSET', JK('results', job), task, record)
  local ids = logged[job]
  if not ids then
    ids = {}
    logged[job] = ids
  end
  ids[#ids + 1] = task
end

local function flush_log()
  for job, ids in pairs(logged) do
    -- At most LOG_ENTRY_IDS ids an entry: cancelling a million waiting tasks writes many
    -- entries, so that a reader never has to take a million ids at once.
    for first = 1, #ids, LOG_ENTRY_IDS do
      local last = math.min(first + LOG_ENTRY_IDS - 1, #ids)
      redis.call('XADD', JK('log', job), '*', 't', table.concat(ids, ' ', first, last))
    end
  end
  logged = {}
end

local function flush()
  flush_log()
  local total = {}
  for job, jd in pairs(deltas) do
    for field, d in pairs(jd) do
      if d ~= 0 then
        redis.call('HINCRBY', JK('jc', job), field, d)
        total[field] = (total[field] or 0) + d
      end
    end
    touch_job(job)
  end
  for field, d in pairs(total) do
    if d ~= 0 then
      redis.call('HINCRBY', K.counts, field, d)
    end
  end
  deltas = {}
end

-- Wake up to n blocked lease calls. Each waiter pops one element, so one per ready task;
-- the list is trimmed because tokens nobody pops only cause one spare lease attempt each.
local function notify(n)
  n = math.min(n, NOTIFY_MAX)
  if n <= 0 then
    return
  end
  for _ = 1, n do
    redis.call('LPUSH', K.notify, 1)
  end
  redis.call('LTRIM', K.notify, 0, NOTIFY_MAX - 1)
end

-- The current lease of a task: the token matches and the deadline has not passed.
local function current(task, token, now)
  if redis.call('HGET', K.tokens, task) ~= token then
    return false
  end
  local deadline = redis.call('ZSCORE', K.leases, task)
  return deadline ~= false and tonumber(deadline) > now
end

local function drop_lease(task)
  redis.call('ZREM', K.leases, task)
  redis.call('HDEL', K.tokens, task)
end

-- Ready tasks wait in a list per job, JK('ready', job); K.turns holds the jobs that have some,
-- scored so the lowest is served next: higher priority first, then the job served least
-- recently. A job joins at the back of its priority and goes to the back once served.
local TURN_SPAN = 1099511627776  -- 2^40 turns per priority level

local function turn_score(job)
  local priority = tonumber(redis.call('HGET', K.priority, job) or '0') or 0
  return -priority * TURN_SPAN + redis.call('INCR', K.turn)
end

local function push_ready(task)
  local job = job_of(task)
  if redis.call('RPUSH', JK('ready', job), task) == 1 then
    redis.call('ZADD', K.turns, turn_score(job), job)
  end
end

-- Up to n ready tasks: those an older nbqueue queued in the single list first, then from the
-- job whose turn it is, then the next.
local function take_ready(n)
  local out = {}
  while #out < n do
    local task = redis.call('LPOP', K.ready)
    if not task then
      break
    end
    out[#out + 1] = task
  end
  while #out < n do
    local job = redis.call('ZRANGE', K.turns, 0, 0)[1]
    if not job then
      break
    end
    local key = JK('ready', job)
    local got = redis.call('LRANGE', key, 0, n - #out - 1)
    redis.call('LTRIM', key, #got, -1)
    for _, task in ipairs(got) do
      out[#out + 1] = task
    end
    if redis.call('EXISTS', key) == 0 then
      redis.call('ZREM', K.turns, job)
    else
      redis.call('ZADD', K.turns, turn_score(job), job)  -- its turn is over
    end
  end
  return out
end

-- A task not ready until `at` (ms): a retry waiting out its backoff, or a delayed insert. The
-- job's own zset of them makes its count of scheduled tasks one ZCOUNT.
local function delay_task(task, at)
  redis.call('ZADD', K.delayed, at, task)
  redis.call('ZADD', JK('delayed', job_of(task)), at, task)
end

local function undelay_task(task)
  redis.call('ZREM', K.delayed, task)
  redis.call('ZREM', JK('delayed', job_of(task)), task)
end

local function has_ready()
  return redis.call('LLEN', K.ready) > 0 or redis.call('ZCARD', K.turns) > 0
end

local function ready_count()
  local n = redis.call('LLEN', K.ready)
  for _, job in ipairs(redis.call('ZRANGE', K.turns, 0, -1)) do
    n = n + redis.call('LLEN', JK('ready', job))
  end
  return n
end

-- The record a task marked cancelled ends with (its own mark, else its job's), or false. Marks
-- live in the job's hash JK('cancel', job): field '*' for the whole job, a task id for one task.
local function cancel_record(task)
  local key = JK('cancel', job_of(task))
  return redis.call('HGET', key, task) or redis.call('HGET', key, '*')
end

-- End a task that was `was` (queued or leased) as cancelled, with `record` as its record. Its
-- payload moves to JK('cancelled', job), so that retry can run it again.
local function end_cancelled(task, record, was)
  local job = job_of(task)
  put_record(job, task, record)
  redis.call('HSET', JK('cancelled', job), task, redis.call('HGET', K.payload, task))
  redis.call('HDEL', K.payload, task)
  redis.call('HDEL', K.attempts, task)
  redis.call('SREM', K.suspects, task)
  bump(job, was, -1)
  bump(job, 'cancelled', 1)
end

-- A lease that ended without a result (already dropped): a marked task ends cancelled (true);
-- any other is for the caller to queue again (false).
local function back_from_lease(task)
  local record = cancel_record(task)
  if not record then
    return false
  end
  end_cancelled(task, record, 'leased')
  return true
end

-- Return expired leases (all of them with force) to the queue and promote delayed retries
-- that are due. At most `limit` of each per call (-1: no limit). Returns the leases moved.
local function reclaim(now, force, limit)
  local expired
  if force then
    expired = redis.call('ZRANGE', K.leases, 0, -1)
  else
    expired = redis.call('ZRANGEBYSCORE', K.leases, '-inf', now, 'LIMIT', 0, limit)
  end
  for _, task in ipairs(expired) do
    -- A live lease taken back by force is a release, not a crash: its attempt is given back.
    -- An expired one keeps its attempt and makes the task a suspect (Lease.suspect).
    if force and tonumber(redis.call('ZSCORE', K.leases, task)) > now then
      redis.call('HINCRBY', K.attempts, task, -1)
    else
      redis.call('SADD', K.suspects, task)
    end
    drop_lease(task)
    if not back_from_lease(task) then
      push_ready(task)
      bump(job_of(task), 'leased', -1)
      bump(job_of(task), 'queued', 1)
    end
  end
  local due = redis.call('ZRANGEBYSCORE', K.delayed, '-inf', now, 'LIMIT', 0, limit)
  for _, task in ipairs(due) do
    undelay_task(task)
    push_ready(task)
  end
  notify(#expired + #due)
  return #expired
end

-- Task ids a dead-letter verb works on: ARGV[2] is 'all', or 'some' followed by the ids.
local function chosen_dead()
  if ARGV[2] == 'all' then
    return redis.call('HKEYS', K.dead)
  end
  local ids, seen = {}, {}
  for i = 3, #ARGV do
    local task = ARGV[i]
    if not seen[task] and redis.call('HEXISTS', K.dead, task) == 1 then
      seen[task] = true
      ids[#ids + 1] = task
    end
  end
  return ids
end

-- Forget workers whose last heartbeat has expired.
local function drop_expired_workers(now)
  for _, worker in ipairs(redis.call('ZRANGEBYSCORE', K.worker_expiry, '-inf', now)) do
    redis.call('HDEL', K.workers, worker)
  end
  redis.call('ZREMRANGEBYSCORE', K.worker_expiry, '-inf', now)
end

-- List a job in the jobs index (by first insert), so purge() and list_jobs find its keys.
local function index_job(job)
  redis.call('ZADD', K.jobs, 'NX', now_us(), job)
end

-- A dead letter: its error, payload and attempts, and the error as the job's record.
local function store_dead(task, job, err, payload, attempts)
  redis.call('HSET', K.dead, task, err)
  redis.call('HSET', K.dead_payload, task, payload)
  redis.call('HSET', K.dead_attempts, task, attempts)
  put_record(job, task, err)
end

local function drop_dead(task)
  redis.call('HDEL', K.dead, task)
  redis.call('HDEL', K.dead_payload, task)
  redis.call('HDEL', K.dead_attempts, task)
end

-- n tasks of a job restored from another queue (put_results, put_dead): counted as inserted
-- and as `field` (completed or dead).
local function count_restored(job, n, field)
  index_job(job)
  bump(job, 'inserted', n)
  bump(job, field, n)
  flush()
end

-- The first task of ARGV[first], ARGV[first + step], ... that already has a record, or nil:
-- the restoring scripts write nothing when one has.
local function first_recorded(job, first, step)
  for i = first, #ARGV, step do
    if redis.call('HEXISTS', JK('results', job), ARGV[i]) == 1 then
      return ARGV[i]
    end
  end
  return nil
end
