-- Helpers shared by every script. The preamble redis.py puts before this file defines:
--   P        the queue's key prefix, "nbq:{NAME}:" (KEYS[1]); every key shares its hash tag
--   K        the queue's fixed key names, K.ready, K.leases, ...
--   JK       JK(kind, job_id), a per-job key name
--   TTL      seconds a finished job's keys live (ARGV[1] of every script)
--   JOB_KINDS, EXPIRING_KINDS  the kinds of per-job keys (see job_keys)
--   NOTIFY_MAX, RECLAIM_LIMIT, INSERT_MEMORY_MS, LOG_ENTRY_IDS, FN_KIND

-- The server's clock, read once per script: deadlines never depend on a client's clock, and
-- every time a script writes is the same instant.
local clock

local function server_time()
  if not clock then
    clock = redis.call('TIME')
  end
  return clock
end

-- Milliseconds.
local function now_ms()
  local t = server_time()
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Microseconds as a string: a number this large would lose digits on its way to ZADD.
local function now_us()
  local t = server_time()
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

-- The keys of a job of the given kinds (JOB_KINDS: all of them, for purge and list_jobs;
-- EXPIRING_KINDS: those that expire with a finished job, whose ready list and delayed set are
-- empty by then).
local function job_keys(job, kinds)
  local keys = {}
  for i, kind in ipairs(kinds) do
    keys[i] = JK(kind, job)
  end
  return keys
end

-- Jobs this script added to the jobs index. Such a job had no keys: list_jobs drops a job from
-- the index only once every key of it is gone, and the scripts that may write to a job not in
-- the index (insert, put_job, cancel, redrive, retry, put_results, put_dead) index it.
local new_jobs = {}

-- List a job in the jobs index (by first insert), so purge() and list_jobs find its keys.
local function index_job(job)
  if redis.call('ZADD', K.jobs, 'NX', now_us(), job) == 1 then
    new_jobs[job] = true
  end
end

-- A job's keys live while it has tasks queued or leased; once none are left they expire
-- TTL seconds after the last change, so a long-running job never loses its record.
-- `changed` holds this script's changes to the job's counters, `counts` their values after
-- them, as far as the caller knows them (neither: a script that changed none). Keys are
-- created without a TTL and only this function gives them one, when the job has nothing left
-- to run: so a job live before the script and after it (or new and live) has no TTL to take
-- away, and nothing is written.
local function touch_job(job, changed, counts)
  changed, counts = changed or {}, counts or {}
  local jc = JK('jc', job)
  if counts.queued == nil and counts.leased == nil then
    local live = redis.call('HMGET', jc, 'queued', 'leased')
    counts.queued, counts.leased = tonumber(live[1]) or 0, tonumber(live[2]) or 0
  end
  local function count(field)
    if counts[field] == nil then
      counts[field] = tonumber(redis.call('HGET', jc, field)) or 0
    end
    return counts[field]
  end
  local function before(field)
    return count(field) - (changed[field] or 0)
  end
  local live = count('queued') > 0 or count('leased') > 0
  if live and (new_jobs[job] or before('queued') > 0 or before('leased') > 0) then
    return
  end
  for _, key in ipairs(job_keys(job, EXPIRING_KINDS)) do
    if live then
      redis.call('PERSIST', key)
    else
      redis.call('EXPIRE', key, TTL)
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
  for job, changed in pairs(deltas) do
    local counts = {}
    for field, d in pairs(changed) do
      if d ~= 0 then
        counts[field] = redis.call('HINCRBY', JK('jc', job), field, d)
        total[field] = (total[field] or 0) + d
      end
    end
    touch_job(job, changed, counts)
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
  local tokens = {}
  for i = 1, n do
    tokens[i] = 1
  end
  if redis.call('LPUSH', K.notify, unpack(tokens)) > NOTIFY_MAX then
    redis.call('LTRIM', K.notify, 0, NOTIFY_MAX - 1)
  end
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

-- `priority`, when the caller knows the job's, saves looking it up.
local function turn_score(job, priority)
  priority = priority or tonumber(redis.call('HGET', K.priority, job) or '0') or 0
  return -priority * TURN_SPAN + redis.call('INCR', K.turn)
end

local function push_ready(task, priority)
  local job = job_of(task)
  if redis.call('RPUSH', JK('ready', job), task) == 1 then
    redis.call('ZADD', K.turns, turn_score(job, priority), job)
  end
end

-- Up to n ready tasks: those an older nbqueue queued in the single list first, then from the
-- job whose turn it is, then the next. Second, true when it took every ready task, so that
-- the caller need not look again.
local function take_ready(n)
  local out = {}
  while #out < n do
    local task = redis.call('LPOP', K.ready)
    if not task then
      break
    end
    out[#out + 1] = task
  end
  if #out == n then
    return out, false
  end
  -- Two jobs at a time: whether another waits behind the one served comes with it.
  local jobs = redis.call('ZRANGE', K.turns, 0, 1)
  while jobs[1] do
    local job, want = jobs[1], n - #out
    local key = JK('ready', job)
    local got = redis.call('LRANGE', key, 0, want - 1)
    for _, task in ipairs(got) do
      out[#out + 1] = task
    end
    if #got == want then
      redis.call('LTRIM', key, want, -1)
      if redis.call('EXISTS', key) == 0 then
        redis.call('ZREM', K.turns, job)
      else
        redis.call('ZADD', K.turns, turn_score(job), job)  -- its turn is over
      end
      return out, false
    end
    redis.call('DEL', key)  -- all of it taken
    redis.call('ZREM', K.turns, job)
    if not jobs[2] then
      return out, true
    end
    jobs = redis.call('ZRANGE', K.turns, 0, 1)
  end
  return out, true
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
  local marks = redis.call('HMGET', JK('cancel', job_of(task)), task, '*')
  return marks[1] or marks[2]
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
