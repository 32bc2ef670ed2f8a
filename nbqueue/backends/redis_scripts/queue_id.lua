-- queue_id(new_id): the queue's identity, set to new_id when it has none: on first use, after
-- purge() (which deletes it with every other key), or after the server lost its data.
local id = redis.call('GET', K.id)
if id then
  return id
end
redis.call('SET', K.id, ARGV[2])
return ARGV[2]
