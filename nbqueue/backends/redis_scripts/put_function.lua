-- put_function(digest, blob): store a function blob once. Blobs have no TTL: a task may sit
-- queued for longer than any TTL, and without its function it could never run. purge() and
-- the digest set bound their lifetime instead.
local digest = ARGV[2]
redis.call('SET', JK(FN_KIND, digest), ARGV[3], 'NX')
redis.call('SADD', K.functions, digest)
return 1
