-- release_all(force): return expired leases (every lease when force is '1'); how many moved.
local moved = reclaim(now_ms(), ARGV[2] == '1', -1)
flush()
return moved
