-- put_results(job, task_1, record_1, ...): store the records of tasks that ran elsewhere (a
-- copied queue), each counted as inserted and completed. Returns nil, or the id of a task that
-- already has a record (then nothing changed).
local job = ARGV[2]
local recorded = first_recorded(job, 3, 2)
if recorded then
  return recorded
end
for i = 3, #ARGV, 2 do
  put_record(job, ARGV[i], ARGV[i + 1])
end
count_restored(job, (#ARGV - 2) / 2, 'completed')
return nil
