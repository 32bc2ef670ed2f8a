-- ready_ids(limit, with_delayed): ready task ids, the single old list's first and then each job's
-- in turn order (limit -1: all of them); with_delayed '1' adds the delayed ones. One atomic read.
local limit, with_delayed = tonumber(ARGV[2]), ARGV[3] == '1'
local out = redis.call('LRANGE', K.ready, 0, limit < 0 and -1 or limit - 1)
for _, job in ipairs(redis.call('ZRANGE', K.turns, 0, -1)) do
  if limit >= 0 and #out >= limit then
    break
  end
  local last = limit < 0 and -1 or limit - #out - 1
  for _, task in ipairs(redis.call('LRANGE', JK('ready', job), 0, last)) do
    out[#out + 1] = task
  end
end
if with_delayed then
  for _, task in ipairs(redis.call('ZRANGE', K.delayed, 0, -1)) do
    out[#out + 1] = task
  end
end
return out
