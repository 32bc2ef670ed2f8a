-- put_dead(job, task_1, attempts_1, payload_1, error_1, ...): store dead letters of tasks that
-- failed elsewhere (a copied queue), each counted as inserted and dead; the error record joins
-- the job's results as fail() puts it. Returns nil, or the id of a task that already has a
-- record (then nothing changed).
local job = ARGV[2]
local recorded = first_recorded(job, 3, 4)
if recorded then
  return recorded
end
for i = 3, #ARGV, 4 do
  store_dead(ARGV[i], job, ARGV[i + 3], ARGV[i + 2], ARGV[i + 1])
end
count_restored(job, (#ARGV - 2) / 4, 'dead')
return nil
