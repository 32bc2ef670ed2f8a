-- rezero(): zero the event counters (inserted, failed) of the queue and its jobs, recount the
-- queue's state counters from the structures themselves. Returns HGETALL of the counters.
reclaim(now_ms(), false, -1)
flush()
redis.call('HSET', K.counts,
  'inserted', 0,
  'failed', 0,
  'queued', ready_count() + redis.call('ZCARD', K.delayed),
  'leased', redis.call('ZCARD', K.leases),
  'dead', redis.call('HLEN', K.dead))
for _, job in ipairs(redis.call('ZRANGE', K.jobs, 0, -1)) do
  if redis.call('EXISTS', JK('jc', job)) == 1 then
    redis.call('HSET', JK('jc', job), 'inserted', 0, 'failed', 0)
  end
end
return redis.call('HGETALL', K.counts)
