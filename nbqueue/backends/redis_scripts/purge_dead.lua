-- purge_dead('all' | 'some', task...): delete dead letters; how many.
-- Only the queue's dead count drops: the job keeps its error record and counts it as dead.
local ids = chosen_dead()
for _, task in ipairs(ids) do
  drop_dead(task)
end
if #ids > 0 then
  redis.call('HINCRBY', K.counts, 'dead', -#ids)
end
return #ids
